"""Sophia and Hutchinson's Hessian-diagonal estimator (:mod:`functrain.optim.clipped_newton`).

References: a float64 per-element loop of optax 0.2.8's formulas with a deterministic Hessian
diagonal (the probes of the real estimator differ from JAX's by design), exact diagonals of
quadratics, and the estimator's mean over many probes within 4 standard errors.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from tests.optim import _alias_contract as contract

F64 = torch.float64


def diag_fn(u: Any, p: Any) -> Any:
    """A deterministic stand-in for a Hessian diagonal, of either sign (``None``: masked out)."""
    return {k: None if u[k] is None else u[k] * p[k] + 0.3 * u[k] ** 2 for k in u}


DIAG = ft.stateless(diag_fn)
SQUARE = ft.stateless(lambda u, p: ft.tree.map(torch.square, u))


def obj_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """A smooth objective on ``contract.tree_data``'s structure with off-diagonal curvature."""
    w, b, k = p["w"], p["b"], p["k"]
    return (w**2).sum() + (w.sum(0) * b).sum() + (b**4).sum() + (k.sin() * k).sum()


def _grads(n: int) -> list[dict[str, torch.Tensor]]:
    gs = [contract.tree_data(seed=s) for s in range(1, n + 1)]
    gs[2] = {k: torch.zeros_like(v) for k, v in gs[2].items()}  # an all-zero step
    gs[3] = {k: -v for k, v in gs[1].items()}  # a sign flip
    return gs


def _reference(grads, params, b1, b2, eps, gamma, clip, interval, wd=0.0, lr=None):
    """optax's Sophia, element by element in float64 Python floats."""
    keys = list(params)
    p = {k: params[k].reshape(-1).tolist() for k in keys}
    mu = {k: [0.0] * len(p[k]) for k in keys}
    nu = {k: [0.0] * len(p[k]) for k in keys}
    outs = []
    for t, g in enumerate(grads, start=1):
        pt = {k: torch.tensor(p[k], dtype=F64).reshape(params[k].shape) for k in keys}
        h = diag_fn(g, pt)
        out = {}
        for k in keys:
            gk, hk, res = g[k].reshape(-1).tolist(), h[k].reshape(-1).tolist(), []
            for i, gi in enumerate(gk):
                mu[k][i] = b1 * mu[k][i] + (1 - b1) * gi
                u = mu[k][i] / (1 - b1**t) / max(gamma * nu[k][i], eps)
                if clip is not None:
                    u = min(max(u, -clip), clip)
                if (t - 1) % interval == 0:
                    nu[k][i] = b2 * nu[k][i] + (1 - b2) * hk[i]
                if lr is not None:
                    u = -lr * (u + wd * p[k][i])
                res.append(u)
            out[k] = res
        for k in keys:  # params move by the updates (contract.run applies them)
            p[k] = [a + b for a, b in zip(p[k], out[k])]
        outs.append(out)
    return outs


@pytest.mark.parametrize(
    "b1, b2, eps, gamma, clip, interval",
    [
        (0.965, 0.99, 1e-8, 0.01, 1.0, 10),
        (0.5, 0.8, 1e-3, 0.5, None, 3),
        (0.0, 0.0, 1e-2, 2.0, 0.5, 1),
    ],
)
def test_scale_by_sophia_matches_hand_reference(b1, b2, eps, gamma, clip, interval) -> None:
    params, grads = contract.tree_data(), _grads(12)
    tx = ft.scale_by_sophia(b1, b2, eps, gamma, clip, interval, DIAG)
    outs, _ = contract.run(tx, grads, params)  # params move by the raw updates
    ref = _reference(grads, params, b1, b2, eps, gamma, clip, interval)
    for got, want in zip(outs, ref):
        for k in got:
            assert got[k].reshape(-1).tolist() == pytest.approx(want[k], rel=1e-12, abs=1e-14)


def test_sophia_alias_matches_hand_reference() -> None:
    params, grads = contract.tree_data(), _grads(8)
    tx = ft.sophia(0.05, 0.9, 0.95, 1e-4, 0.1, None, 0.2, 0.8, 2, DIAG)
    outs, _ = contract.run(tx, grads, params)
    ref = _reference(grads, params, 0.9, 0.95, 1e-4, 0.2, 0.8, 2, wd=0.1, lr=0.05)
    for got, want in zip(outs, ref):
        for k in got:
            assert got[k].reshape(-1).tolist() == pytest.approx(want[k], rel=1e-12, abs=1e-14)


def test_hutchinson_is_exact_for_a_separable_objective() -> None:
    a = {"w": torch.rand(4, 3, dtype=F64) + 0.5, "b": torch.rand(3, dtype=F64)}

    def f(p: Any) -> torch.Tensor:
        return sum((a[k] * p[k] ** 2).sum() + p[k].sum() for k in p)

    params = {k: torch.randn_like(v) for k, v in a.items()}
    tx = ft.hutchinson_estimator_diag_hessian(7)
    state = tx.init(params)
    for _ in range(3):
        diag, state = tx.update(None, state, params, obj_fn=f)
        for k in a:
            torch.testing.assert_close(diag[k], 2 * a[k], rtol=1e-14, atol=0)


def test_hutchinson_is_unbiased_for_a_dense_quadratic() -> None:
    """The mean of N estimates of ``diag(A)`` for ``f = ½ xᵀAx`` is within 4 standard errors:
    each estimate is ``A_ii + Σ_{j≠i} A_ij z_i z_j``, of variance ``Σ_{j≠i} A_ij²``."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(9, 9, generator=g, dtype=F64)
    a = m + m.T

    def f(p: Any) -> torch.Tensor:
        x = torch.cat([p["w"].reshape(-1), p["b"]])
        return 0.5 * x @ a @ x

    params = {"w": torch.randn(2, 3, dtype=F64), "b": torch.randn(3, dtype=F64)}
    tx = ft.hutchinson_estimator_diag_hessian(11)
    update = tx.update
    state, total, n = tx.init(params), torch.zeros(9, dtype=F64), 4000
    for _ in range(n):
        d, state = update(None, state, params, obj_fn=f)
        total += torch.cat([d["w"].reshape(-1), d["b"]])
    mean = total / n
    se = torch.sqrt(((a**2).sum(1) - a.diag() ** 2) / n)
    assert torch.all((mean - a.diag()).abs() < 4 * se), (mean - a.diag()) / se


def test_hutchinson_probes_are_signs_reproducible_and_keyed() -> None:
    params = {"w": torch.zeros(64, 64, dtype=F64), "b": torch.zeros(64, dtype=F64)}

    def probe(seed: int, steps: int) -> dict[str, torch.Tensor]:
        # For f = ½ Σ x², Hz = z: the estimate is z ⊙ z = 1; read z from the gradient instead.
        tx = ft.hutchinson_estimator_diag_hessian(seed)
        state = tx.init(params)
        for _ in range(steps):
            _, state = tx.update(None, state, params, obj_fn=lambda p: p["w"].sum())
        key = ft.optim._prng.split(state.key)[1]
        return {
            k: ft.optim.hessian_diagonal._rademacher_like(key, v, i)
            for i, (k, v) in enumerate(sorted(params.items()))
        }

    z = probe(0, 0)
    for v in z.values():
        assert set(v.unique().tolist()) <= {-1.0, 1.0}
        assert abs(v.mean().item()) < 4 / math.sqrt(v.numel())
    assert torch.equal(z["w"], probe(0, 0)["w"])
    assert not torch.equal(z["w"], probe(1, 0)["w"])
    assert not torch.equal(z["w"], probe(0, 1)["w"])
    assert not torch.equal(z["w"][0], z["w"][1])
    assert not torch.equal(z["b"], z["w"][0])


def test_interval_refreshes_nu_and_estimator_state_only_on_schedule() -> None:
    params = {"w": torch.ones(3, dtype=F64)}
    f = lambda p: (torch.tensor([1.0, 2.0, 3.0], dtype=F64) * p["w"] ** 2).sum()  # noqa: E731
    tx = ft.scale_by_sophia(
        b2=0.5, update_interval=3, hessian_diagonal_fn=ft.hutchinson_estimator_diag_hessian(5)
    )
    state = tx.init(params)
    keys, nus = [state.hessian_fn_state.key], [state.nu["w"]]
    for _ in range(7):
        _, state = tx.update({"w": torch.ones(3, dtype=F64)}, state, params, obj_fn=f)
        keys.append(state.hessian_fn_state.key)
        nus.append(state.nu["w"])
    changed = [not torch.equal(a, b) for a, b in itertools.pairwise(keys)]
    assert changed == [True, False, False, True, False, False, True]
    assert [not torch.equal(a, b) for a, b in itertools.pairwise(nus)] == changed
    torch.testing.assert_close(nus[1], 0.5 * torch.tensor([2.0, 4.0, 6.0], dtype=F64))


def test_sophia_h_pure_loop_trains_a_model() -> None:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(32, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: Any) -> torch.Tensor:
        return ((torch.func.functional_call(model, p, (x,)) - y) ** 2).mean()

    tx = ft.sophia(0.05, gamma=0.05, update_interval=2)
    state, first = tx.init(params), float(loss(params))
    for _ in range(40):
        grads = torch.func.grad(loss)(params)
        u, state = tx.update(grads, state, params, obj_fn=loss)
        params = ft.apply_updates(params, u)
    assert float(loss(params)) < 0.5 * first


def test_contract_pure_bfloat16_masked() -> None:
    contract.check_pure(ft.sophia(0.1, hessian_diagonal_fn=DIAG, update_interval=2))
    contract.check_pure(ft.sophia(0.1), obj_fn=obj_fn)
    contract.check_bfloat16(ft.scale_by_sophia(hessian_diagonal_fn=SQUARE, update_interval=1))
    contract.check_masked(ft.sophia(0.1, hessian_diagonal_fn=DIAG, update_interval=2))
    contract.check_masked(ft.scale_by_sophia(0.9, hessian_diagonal_fn=SQUARE, update_interval=1))


def test_bfloat16_state_dtypes() -> None:
    params = contract.tree_data(torch.bfloat16)
    tx = ft.scale_by_sophia(hessian_diagonal_fn=SQUARE, mu_dtype=torch.float32)
    u, state = tx.update(contract.tree_data(torch.bfloat16, 1), tx.init(params), params)
    assert {v.dtype for v in u.values()} == {torch.bfloat16}
    assert {v.dtype for v in state.mu.values()} == {torch.float32}
    assert {v.dtype for v in state.nu.values()} == {torch.bfloat16}


@pytest.mark.parametrize("hutchinson", [False, True])
def test_compiles_fullgraph_once(hutchinson: bool) -> None:
    if hutchinson:
        contract.check_compiles(ft.sophia(0.1, update_interval=2), steps=4, obj_fn=obj_fn)
    else:
        sched = ft.linear_schedule(0.1, 0.01, 5)
        contract.check_compiles(ft.sophia(sched, hessian_diagonal_fn=DIAG, update_interval=2))


def test_vmap_over_init_and_update() -> None:
    tx = ft.scale_by_sophia(hessian_diagonal_fn=SQUARE, update_interval=1)
    params = {"w": torch.randn(5, 3, dtype=F64)}
    grads = {"w": torch.randn(5, 3, dtype=F64)}
    states = torch.func.vmap(tx.init)(params)
    u, _ = torch.func.vmap(tx.update)(grads, states, params)
    for i in range(5):
        ui, _ = tx.update(
            {"w": grads["w"][i]}, tx.init({"w": params["w"][i]}), {"w": params["w"][i]}
        )
        torch.testing.assert_close(u["w"][i], ui["w"], rtol=0, atol=0)


def test_train_step_with_a_deterministic_estimator() -> None:
    contract.check_train_step(ft.sophia(0.05, hessian_diagonal_fn=SQUARE, update_interval=1))


def test_train_step_with_hutchinson_says_how_to_use_it() -> None:
    tx = ft.sophia(0.05)
    step = ft.make_train_step(lambda p, b: (p["w"] ** 2).sum(), tx)
    state = ft.TrainState.create(params={"w": torch.ones(2)}, tx=tx)
    with pytest.raises(ValueError, match=r"obj_fn.*make_train_step passes only value="):
        step(state, {"x": torch.ones(1)})


def test_inject_hyperparams_learning_rate() -> None:
    tx = ft.inject_hyperparams(ft.sophia)(learning_rate=0.1, hessian_diagonal_fn=DIAG)
    ref = ft.sophia(0.1, hessian_diagonal_fn=DIAG)
    params, grads = contract.tree_data(), _grads(4)
    a, _ = contract.run(tx, grads, params)
    b, _ = contract.run(ref, grads, params)
    for x, y in zip(a, b):
        ft.testing.assert_trees_all_close(x, y, rtol=1e-15, atol=0)


def test_empty_tree_and_none_leaves() -> None:
    tx = ft.sophia(0.1, hessian_diagonal_fn=SQUARE)
    u, state = tx.update({}, tx.init({}), {})
    assert u == {} and int(state[0].count) == 1
    params = {"a": torch.ones(2), "b": None}
    u, _ = tx.update({"a": torch.ones(2), "b": None}, tx.init(params), params)
    assert u["b"] is None


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3),
    st.floats(0.01, 10.0),
)
def test_updates_never_exceed_the_clip_threshold(values: list[float], clip: float) -> None:
    tx = ft.scale_by_sophia(clip_threshold=clip, hessian_diagonal_fn=DIAG, update_interval=1)
    params = {"w": torch.tensor(values, dtype=F64)}
    state = tx.init(params)
    for s in (1.0, -3.0, 0.0):
        u, state = tx.update({"w": s * params["w"]}, state, params)
        assert bool((u["w"].abs() <= clip).all())


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="b1"):
        ft.scale_by_sophia(b1=1.0)
    with pytest.raises(ValueError, match="b2"):
        ft.sophia(0.1, b2=1.5)
    with pytest.raises(ValueError, match="eps"):
        ft.scale_by_sophia(eps=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        ft.scale_by_sophia(gamma=float("nan"))
    with pytest.raises(ValueError, match="clip_threshold"):
        ft.scale_by_sophia(clip_threshold=-1.0)
    with pytest.raises(ValueError, match="update_interval"):
        ft.scale_by_sophia(update_interval=0)
    with pytest.raises(TypeError, match="hessian_diagonal_fn"):
        ft.scale_by_sophia(hessian_diagonal_fn=lambda g: g)
    with pytest.raises(TypeError, match="seed"):
        ft.hutchinson_estimator_diag_hessian(1.5)
    with pytest.raises(ValueError, match="random_seed"):
        ft.hutchinson_estimator_diag_hessian(torch.zeros(2, dtype=torch.int64))
    tx = ft.scale_by_sophia(hessian_diagonal_fn=DIAG)
    p = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p))
    h = ft.hutchinson_estimator_diag_hessian()
    with pytest.raises(ValueError, match="obj_fn"):
        h.update(p, h.init(p), p)
    pc = {"z": torch.ones(2, dtype=torch.complex128)}
    with pytest.raises(TypeError, match=r"params\['z'\].*complex"):
        h.update(pc, h.init(pc), pc, obj_fn=lambda q: q["z"].abs().sum())
    bad = ft.scale_by_sophia(hessian_diagonal_fn=ft.stateless(lambda u, p: {"w": torch.ones(3)}))
    with pytest.raises(ft.tree.TreeMismatchError, match="hessian diagonal"):
        bad.update(p, bad.init(p), p)


def test_update_reads_nothing_on_the_host() -> None:
    """Tensor hyperparameters, the refresh condition and the estimator's key stay on the
    device: no ``item()`` / ``_local_scalar_dense`` in a step (a sync on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}

    class NoHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in reads:
                raise AssertionError(f"host read of a tensor: {func}")
            return func(*args, **(kwargs or {}))

    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    tx = ft.inject_hyperparams(ft.sophia)(
        learning_rate=0.1,
        b1=t(0.9),
        b2=t(0.95),
        eps=t(1e-6),
        gamma=t(0.05),
        clip_threshold=t(0.7),
        update_interval=torch.tensor(2),
    )
    params = contract.tree_data()
    state = tx.init(params)
    expected = []
    for g in _grads(5):
        u, state = tx.update(g, state, params, obj_fn=obj_fn)
        expected.append(u)
    state, got = tx.init(params), []
    with NoHostReads():
        for g in _grads(5):
            u, state = tx.update(g, state, params, obj_fn=obj_fn)
            got.append(u)
    for u, want in zip(got, expected):
        ft.testing.assert_trees_all_close(u, want, rtol=0, atol=0)


def test_complex_updates_are_refused_by_path() -> None:
    tx = ft.scale_by_sophia(hessian_diagonal_fn=SQUARE)
    z = {"a": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)}
    with pytest.raises(TypeError, match=r"updates\['z'\] is torch.complex64"):
        tx.update(z, tx.init(z), z)
