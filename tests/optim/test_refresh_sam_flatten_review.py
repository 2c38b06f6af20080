"""Second-eyes review of ``refresh_on_host`` (GaLore, Sophia), ``sam`` and ``flatten`` where
they meet the library's wrappers, checkpoints and compiled steps.

References: ``refresh_on_host=True`` promises the default path's numbers bit for bit, so the
default path is the reference there; the compiled ``sam`` / ``flatten`` updates are compared in
float64 with the eager ones at 1e-12, with one compile for ten steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch

import functrain as ft
from functrain import checkpoint

STEPS = 10
BACKEND = os.environ.get("FUNCTRAIN_TEST_COMPILE_BACKEND", "aot_eager")


def _assert_identical(got: Any, want: Any) -> None:
    """Same structure, dtypes, shapes and bits."""
    got_leaves, got_spec = optree.tree_flatten(got)
    want_leaves, want_spec = optree.tree_flatten(want)
    assert got_spec == want_spec
    for a, b in zip(got_leaves, want_leaves):
        if not isinstance(b, torch.Tensor):
            assert a == b
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(6, 4, generator=gen, dtype=torch.float64),
        "b": torch.randn(4, generator=gen, dtype=torch.float64),
    }


def _grads() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in _params().items()}
        for _ in range(STEPS)
    ]


def _square_diag() -> ft.GradientTransformation:
    """A Hessian-diagonal stand-in that needs no objective (usable in a train step)."""
    return ft.stateless(lambda g, p: ft.tree.map(torch.square, g))


def _run(tx: ft.GradientTransformation, **extra: Any) -> list[tuple[Any, Any]]:
    params, out = _params(), []
    state = tx.init(params)
    for g in _grads():
        u, state = tx.update(g, state, params, **extra)
        out.append((u, state))
    return out


# Each factory takes refresh_on_host and returns the transform to compare.
WRAPPED: dict[str, Callable[[bool], ft.GradientTransformation]] = {
    "inject_galore": lambda h: ft.inject_hyperparams(ft.galore)(
        learning_rate=0.1, rank=2, update_proj_gap=3, refresh_on_host=h
    ),
    "inject_sophia_tensor_interval": lambda h: ft.inject_hyperparams(ft.sophia)(
        learning_rate=0.1,
        update_interval=torch.tensor(3),
        hessian_diagonal_fn=_square_diag(),
        refresh_on_host=h,
    ),
    "masked_galore": lambda h: ft.masked(
        ft.galore(0.1, rank=2, update_proj_gap=3, refresh_on_host=h), {"w": True, "b": False}
    ),
    "partition": lambda h: ft.partition(
        {
            "g": ft.galore(0.1, rank=2, update_proj_gap=3, refresh_on_host=h),
            "s": ft.sophia(
                0.1, update_interval=3, hessian_diagonal_fn=_square_diag(), refresh_on_host=h
            ),
        },
        {"w": "g", "b": "s"},
    ),
    "multisteps_galore": lambda h: ft.MultiSteps(
        ft.galore(0.1, rank=2, update_proj_gap=3, refresh_on_host=h), 2
    ),
    "multisteps_sophia": lambda h: ft.MultiSteps(
        ft.sophia(0.1, update_interval=3, hessian_diagonal_fn=_square_diag(), refresh_on_host=h),
        2,
    ),
}


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_refresh_on_host_is_bit_identical_inside_wrappers(name: str) -> None:
    make = WRAPPED[name]
    for got, want in zip(_run(make(True)), _run(make(False))):
        _assert_identical(got, want)


def test_refresh_on_host_is_static_under_inject_hyperparams() -> None:
    # A bool (and the int interval) stay Python values: nothing to read in the state.
    tx = ft.inject_hyperparams(ft.sophia)(
        learning_rate=0.1, update_interval=torch.tensor(3), refresh_on_host=True
    )
    injected = tx.init(_params()).hyperparams
    assert "refresh_on_host" not in injected and "update_interval" not in injected


@pytest.mark.parametrize("which", ["galore", "sophia"])
def test_checkpoint_round_trip_mid_gap_keeps_the_refresh_schedule(
    which: str, tmp_path: Any
) -> None:
    def make(host: bool) -> ft.GradientTransformation:
        if which == "galore":
            return ft.galore(0.1, rank=2, update_proj_gap=4, refresh_on_host=host)
        return ft.sophia(0.1, update_interval=4, refresh_on_host=host)  # Hutchinson: keyed

    extra = {"obj_fn": lambda p: (p["w"] ** 2).sum() + p["b"].sin().sum()}
    extra = extra if which == "sophia" else {}
    want = _run(make(False), **extra)
    tx, params, grads = make(True), _params(), _grads()
    state = tx.init(params)
    for g in grads[:6]:  # stop between refreshes (steps 4 and 8)
        _, state = tx.update(g, state, params, **extra)
    path = str(tmp_path / "ckpt")
    checkpoint.save(path, state)
    state = checkpoint.restore(path, target=tx.init(params))
    for t in range(6, STEPS):
        u, state = tx.update(grads[t], state, params, **extra)
        _assert_identical((u, state), want[t])


def _loss(p: Any, b: Any) -> torch.Tensor:
    return ((torch.tanh(b["x"] @ p["w"]) @ p["v"] + p["c"] - b["y"]) ** 2).mean()


def _train(tx: ft.GradientTransformation, k: int, donate: bool, compile_: Any) -> list[Any]:
    gen = torch.Generator().manual_seed(2)
    batch = {
        "x": torch.randn(16, 6, generator=gen, dtype=torch.float64),
        "y": torch.randn(16, 3, generator=gen, dtype=torch.float64),
    }
    params = {
        "w": torch.randn(6, 5, generator=gen, dtype=torch.float64),
        "v": torch.randn(5, 3, generator=gen, dtype=torch.float64),
        "c": torch.zeros(3, dtype=torch.float64),
    }
    step = ft.make_train_step(_loss, tx, micro_batches=k, donate=donate, compile=compile_)
    state, out = ft.TrainState.create(params=params, tx=tx), []
    for _ in range(6):
        state, _ = step(state, batch)
        out.append(ft.tree.map(torch.clone, state.params))
    return out


STEP_TXS: dict[str, Callable[[bool], ft.GradientTransformation]] = {
    "galore": lambda h: ft.galore(0.05, rank=2, update_proj_gap=3, refresh_on_host=h),
    "sophia": lambda h: ft.sophia(
        0.05, update_interval=3, hessian_diagonal_fn=_square_diag(), refresh_on_host=h
    ),
}


@pytest.mark.parametrize("name", sorted(STEP_TXS))
def test_refresh_on_host_in_train_step_eager_and_compiled(name: str) -> None:
    make = STEP_TXS[name]
    want = _train(make(False), 2, donate=False, compile_=False)
    # Eager: the host path, bit for bit.
    _assert_identical(_train(make(True), 2, donate=True, compile_=False), want)
    # Compiled: the option falls back to the where path inside the graph, one compile.
    torch._dynamo.reset()
    with ft.testing.assert_max_compiles(1):
        got = _train(make(True), 2, donate=True, compile_={"backend": BACKEND})
    ft.testing.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)


COMPILED_TXS: dict[str, Callable[[], ft.GradientTransformation]] = {
    "sam": lambda: ft.sam(ft.adam(0.1), ft.chain(ft.normalize(), ft.sgd(0.05))),
    "sam_period3_no_reset": lambda: ft.sam(
        ft.sgd(0.1, momentum=0.9),
        ft.chain(ft.normalize(), ft.adam(0.05)),
        sync_period=3,
        reset_state=False,
    ),
    "flatten_lamb": lambda: ft.flatten(ft.chain(ft.clip_by_global_norm(1.0), ft.lamb(0.1))),
    "sam_of_flatten": lambda: ft.sam(
        ft.flatten(ft.adam(0.1)), ft.flatten(ft.chain(ft.normalize(), ft.sgd(0.05)))
    ),
}


@pytest.mark.parametrize("name", sorted(COMPILED_TXS))
def test_sam_and_flatten_compile_once_and_match_eager(name: str) -> None:
    tx = COMPILED_TXS[name]()
    torch._dynamo.reset()
    update = torch.compile(tx.update, fullgraph=True, backend=BACKEND)
    p_eager = p_comp = _params()
    s_eager = s_comp = tx.init(p_eager)
    with ft.testing.assert_max_compiles(1):
        for g in _grads():
            u_eager, s_eager = tx.update(g, s_eager, p_eager)
            u_comp, s_comp = update(g, s_comp, p_comp)
            ft.testing.assert_trees_all_close(u_comp, u_eager, rtol=1e-12, atol=1e-12)
            ft.testing.assert_trees_all_close(s_comp, s_eager, rtol=1e-12, atol=1e-12)
            p_eager = ft.apply_updates(p_eager, u_eager)
            p_comp = ft.apply_updates(p_comp, u_comp)


@pytest.mark.parametrize("name", ["sam", "flatten_adamw"])
def test_sam_and_flatten_in_compiled_train_step(name: str) -> None:
    def make() -> ft.GradientTransformation:
        if name == "sam":
            return ft.sam(ft.adam(0.1), ft.chain(ft.normalize(), ft.sgd(0.05)))
        return ft.flatten(ft.adamw(0.1))

    want = _train(make(), 2, donate=False, compile_=False)
    torch._dynamo.reset()
    with ft.testing.assert_max_compiles(1):
        got = _train(make(), 2, donate=True, compile_={"backend": BACKEND})
    ft.testing.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)
