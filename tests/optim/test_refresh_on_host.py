"""``refresh_on_host=True`` for GaLore and Sophia: the SVD / the Hessian estimate run on refresh
steps only, and the trajectory is bit-identical to the default ``torch.where`` path.

References: the default path (the contract of the option is equality with it, bit for bit),
the set of refresh steps ``{t : t mod gap = 0}`` written in the test, and counts of the
dispatched operators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft
from functrain import testing
from tests.optim import _alias_contract as contract

STEPS = 30
SVD = torch.ops.aten._linalg_svd.default
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class _Ops(TorchDispatchMode):
    """Counts the dispatched operators in ``counted``."""

    def __init__(self, counted: set[Any]) -> None:
        super().__init__()
        self.counted, self.calls = counted, 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func in self.counted:
            self.calls += 1
        return func(*args, **(kwargs or {}))


# --- GaLore -------------------------------------------------------------------------------


def _galore_problem(dtype: torch.dtype) -> tuple[Any, Callable[[Any, int], Any]]:
    gen = torch.Generator().manual_seed(0)
    params = {
        "tall": torch.randn(12, 8, generator=gen).to(dtype),
        "wide": torch.randn(5, 9, generator=gen).to(dtype),
        "b": torch.randn(8, generator=gen).to(dtype),
    }
    data = [torch.randn(8, generator=gen).to(dtype) for _ in range(STEPS)]

    def grads(p: Any, t: int) -> Any:
        def loss(q: Any) -> torch.Tensor:
            fit = ((q["tall"] @ data[t] + q["b"].sum()) ** 2).sum()
            return fit + (q["wide"] ** 3).sum() * data[t][0]

        return torch.func.grad(loss)(p)

    return params, grads


def _galore_run(tx: ft.GradientTransformation, dtype: torch.dtype) -> list[tuple[Any, Any, Any]]:
    params, grads = _galore_problem(dtype)
    state, out = tx.init(params), []
    for t in range(STEPS):
        u, state = tx.update(grads(params, t), state, params)
        params = ft.apply_updates(params, u)
        out.append((u, state, params))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_galore_host_refresh_is_bit_identical(dtype: torch.dtype) -> None:
    kw = dict(learning_rate=0.05, rank=3, update_proj_gap=7, weight_decay=0.01)
    want = _galore_run(ft.galore(**kw), dtype)
    got = _galore_run(ft.galore(**kw, refresh_on_host=True), dtype)
    for g, w in zip(got, want):
        testing.assert_trees_all_equal(g, w)


def test_galore_svd_runs_on_refresh_steps_only() -> None:
    params, grads = _galore_problem(torch.float64)
    refreshes = {}
    for host in (False, True):
        tx = ft.galore(0.05, rank=3, update_proj_gap=7, refresh_on_host=host)
        state, steps = tx.init(params), []
        p = params
        for t in range(STEPS):
            g = grads(p, t)
            with _Ops({SVD}) as ops:
                u, state = tx.update(g, state, p)
            steps.append(ops.calls)
            p = ft.apply_updates(p, u)
        refreshes[host] = steps
    assert refreshes[False] == [2] * STEPS  # the default: both matrices at every step
    assert refreshes[True] == [2 if t % 7 == 0 else 0 for t in range(STEPS)]


def test_galore_reads_one_more_scalar_per_step() -> None:
    # Adam's foreach kernels read their CPU scalars (free: no device sync) on both paths; the
    # option adds exactly one read, the refresh condition.
    params, grads = _galore_problem(torch.float32)
    reads = {}
    for host in (False, True):
        tx = ft.scale_by_galore(rank=2, update_proj_gap=3, refresh_on_host=host)
        state, reads[host] = tx.init(params), []
        for t in range(5):
            g = grads(params, t)
            with _Ops(HOST_READS) as ops:
                _, state = tx.update(g, state)
            reads[host].append(ops.calls)
    assert [b - a for a, b in zip(reads[False], reads[True])] == [1] * 5


def test_sophia_reads_one_scalar_per_step() -> None:
    tx = ft.scale_by_sophia(update_interval=2, refresh_on_host=True)
    params = contract.tree_data()
    obj_fn = lambda p: sum((v**2).sum() for v in p.values())  # noqa: E731
    state = tx.init(params)
    for t in range(4):
        g = contract.tree_data(seed=t + 1)
        with _Ops(HOST_READS) as ops:
            _, state = tx.update(g, state, params, obj_fn=obj_fn)
        assert ops.calls == 1


def test_galore_host_refresh_compiles_fullgraph() -> None:
    # Under torch.compile the option keeps the where path: no graph break, one compile.
    contract.check_compiles(
        ft.galore(0.1, rank=2, update_proj_gap=2, refresh_on_host=True), steps=4
    )


def test_galore_host_refresh_under_vmap_falls_back() -> None:
    tx = ft.scale_by_galore(rank=2, update_proj_gap=2, refresh_on_host=True)
    ref = ft.scale_by_galore(rank=2, update_proj_gap=2)
    g = {"w": torch.randn(3, 6, 4, dtype=torch.float64)}
    states = torch.func.vmap(tx.init)(g)
    for _ in range(3):
        u, states = torch.func.vmap(tx.update)(g, states)
    u_ref, s_ref = torch.func.vmap(ref.update)(g, torch.func.vmap(ref.init)(g))
    for _ in range(2):
        u_ref, s_ref = torch.func.vmap(ref.update)(g, s_ref)
    testing.assert_trees_all_equal((u, states), (u_ref, s_ref))


# --- Sophia -------------------------------------------------------------------------------


def _sophia_run(
    tx: ft.GradientTransformation, dtype: torch.dtype, calls: list[int] | None = None
) -> list[tuple[Any, Any, Any]]:
    gen = torch.Generator().manual_seed(1)
    params = {
        "w1": 0.5 * torch.randn(4, 6, generator=gen).to(dtype),
        "b1": torch.zeros(6, dtype=dtype),
        "w2": 0.5 * torch.randn(6, 2, generator=gen).to(dtype),
    }
    xs = [torch.randn(5, 4, generator=gen).to(dtype) for _ in range(STEPS)]
    state, out = tx.init(params), []
    for t in range(STEPS):

        def obj_fn(p: Any, t: int = t) -> torch.Tensor:
            if calls is not None:
                calls.append(t)
            return (torch.tanh(xs[t] @ p["w1"] + p["b1"]) @ p["w2"]).pow(2).mean()

        g = torch.func.grad(obj_fn)(params)
        if calls is not None:
            calls.clear()  # count only the calls made by update
        u, state = tx.update(g, state, params, obj_fn=obj_fn)
        params = ft.apply_updates(params, u)
        out.append((u, state, params, sorted(set(calls or []))))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("interval", [4, torch.tensor(3)])
def test_sophia_host_refresh_is_bit_identical(
    dtype: torch.dtype, interval: int | torch.Tensor
) -> None:
    hess = ft.hutchinson_estimator_diag_hessian(random_seed=5)
    kw = dict(learning_rate=0.05, b2=0.9, update_interval=interval, hessian_diagonal_fn=hess)
    want = _sophia_run(ft.sophia(**kw), dtype)
    got = _sophia_run(ft.sophia(**kw, refresh_on_host=True), dtype)
    for g, w in zip(got, want):
        testing.assert_trees_all_equal(g, w)
    # The key advanced once per refresh on both paths.
    keys = {int(s[1][0].hessian_fn_state.key) for s in got}
    assert len(keys) == -(-STEPS // int(interval))


def test_sophia_obj_fn_runs_on_refresh_steps_only() -> None:
    calls: list[int] = []
    steps = []
    tx = ft.sophia(0.05, update_interval=4, refresh_on_host=True)
    for *_, seen in _sophia_run(tx, torch.float64, calls):
        steps.extend(seen)
    assert steps == [t for t in range(STEPS) if t % 4 == 0]
    calls.clear()
    steps = []
    for *_, seen in _sophia_run(ft.sophia(0.05, update_interval=4), torch.float64, calls):
        steps.extend(seen)
    assert steps == list(range(STEPS))  # the default evaluates it at every step


def test_sophia_host_refresh_compiles_fullgraph() -> None:
    obj_fn = lambda p: (p["w"] ** 2).sum() + (p["b"] ** 4).sum() + p["k"].sin().sum()  # noqa: E731
    tx = ft.sophia(0.1, update_interval=2, refresh_on_host=True)
    contract.check_compiles(tx, steps=4, obj_fn=obj_fn)


def test_refresh_on_host_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="refresh_on_host must be a bool"):
        ft.scale_by_sophia(refresh_on_host=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="refresh_on_host must be a bool"):
        ft.galore(0.1, refresh_on_host="yes")  # type: ignore[arg-type]
