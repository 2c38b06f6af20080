"""GaLore (:mod:`functrain.optim.low_rank_projection`).

References are written in NumPy float64 from the paper's / optax 0.2.8's formulas. SVD signs
are arbitrary, so they compare quantities that do not depend on them: ``P Pᵀ`` (a stateless
base optimizer, refreshed projectors) and ``P · adam(Pᵀ G)`` with one projector (Adam is odd).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from tests.optim import _alias_contract as contract

F64 = torch.float64


def _svd_basis(g: np.ndarray, r: int) -> np.ndarray:
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    return u[:, :r] if g.shape[0] >= g.shape[1] else vh[:r].T


def _project(g: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p.T @ g if g.shape[0] >= g.shape[1] else g @ p


def _back(x: np.ndarray, p: np.ndarray, tall: bool) -> np.ndarray:
    return p @ x if tall else x @ p.T


def _grads(shape: tuple[int, ...], n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    gs = [rng.standard_normal(shape) for _ in range(n)]
    gs[2] = -gs[1]  # a sign flip
    gs[3] = gs[3].copy()
    gs[3][0] = 0.0  # a zero row
    return gs


@pytest.mark.parametrize("shape, rank, gap", [((6, 4), 2, 1), ((3, 7), 2, 3), ((5, 5), 9, 2)])
def test_identity_base_is_the_scaled_projection_on_refreshed_subspaces(shape, rank, gap) -> None:
    tx = ft.scale_by_galore(rank, gap, 0.5, ft.identity())
    gs = _grads(shape, 7)
    state = tx.init({"w": torch.zeros(shape, dtype=F64)})
    r = min(rank, *shape)
    for t, g in enumerate(gs):
        if t % gap == 0:
            p = _svd_basis(g, r)
        u, state = tx.update({"w": torch.tensor(g)}, state)
        want = 0.5 * _back(_project(g, p), p, shape[0] >= shape[1])
        np.testing.assert_allclose(u["w"].numpy(), want, rtol=1e-12, atol=1e-12)


def test_adam_base_with_one_projector_matches_a_hand_reference() -> None:
    b1, b2, eps = 0.9, 0.999, 1e-8  # scale_by_adam defaults
    gs = _grads((8, 3), 6, seed=1)
    p = _svd_basis(gs[0], 2)
    m = v = np.zeros((2, 3))
    tx = ft.scale_by_galore(rank=2, update_proj_gap=100, scale=2.0)
    state = tx.init({"w": torch.zeros(8, 3, dtype=F64), "b": torch.zeros(3, dtype=F64)})
    mb = vb = np.zeros(3)
    for t, g in enumerate(gs, start=1):
        r = _project(g, p)
        m, v = b1 * m + (1 - b1) * r, b2 * v + (1 - b2) * r**2
        step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        gb = g[0]
        mb, vb = b1 * mb + (1 - b1) * gb, b2 * vb + (1 - b2) * gb**2
        step_b = (mb / (1 - b1**t)) / (np.sqrt(vb / (1 - b2**t)) + eps)
        u, state = tx.update({"w": torch.tensor(g), "b": torch.tensor(gb)}, state)
        np.testing.assert_allclose(u["w"].numpy(), 2.0 * (p @ step), rtol=1e-10, atol=1e-12)
        # A 1-D leaf is not projected and, as in optax, not scaled.
        np.testing.assert_allclose(u["b"].numpy(), step_b, rtol=1e-12, atol=1e-14)
    assert state.base_optimizer_state.mu["w"].shape == (2, 3)  # the memory saving


def test_dimension_numbers_reshape_like_the_matrix() -> None:
    gs = _grads((4, 2, 3), 4, seed=2)
    dims = {"k": ft.GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))}
    tx = ft.scale_by_galore(2, 1, 1.0, ft.identity(), dims)
    flat = ft.scale_by_galore(2, 1, 1.0, ft.identity())
    s, sf = (
        tx.init({"k": torch.zeros(4, 2, 3, dtype=F64)}),
        flat.init({"k": torch.zeros(4, 6, dtype=F64)}),
    )
    for g in gs:
        u, s = tx.update({"k": torch.tensor(g)}, s)
        uf, sf = flat.update({"k": torch.tensor(g.reshape(4, 6))}, sf)
        torch.testing.assert_close(u["k"], uf["k"].reshape(4, 2, 3), rtol=1e-12, atol=1e-12)
    # Transposed axes (negative ones included) project the transpose.
    t = ft.scale_by_galore(1, 1, 1.0, ft.identity(), ft.GaLoreDimensionNumbers(-1, 0))
    g = _grads((5, 3), 4)[0]
    u, _ = t.update({"w": torch.tensor(g)}, t.init({"w": torch.zeros(5, 3, dtype=F64)}))
    pt = _svd_basis(g.T, 1)
    np.testing.assert_allclose(u["w"].numpy(), _back(_project(g.T, pt), pt, False).T, atol=1e-12)


def test_default_projects_2d_leaves_and_callable_dims() -> None:
    params = contract.tree_data()
    state = ft.scale_by_galore(rank=2).init(params)
    assert state.projector["w"].shape == (4, 2)
    assert state.projector["b"].shape == (0, 0) and state.projector["k"].shape == (0, 0)
    tx = ft.scale_by_galore(
        rank=2,
        weight_dimension_numbers=lambda p: {
            k: ft.GaLoreDimensionNumbers((0, 1), 2) if v.dim() == 3 else None for k, v in p.items()
        },
    )
    state = tx.init(params)
    assert state.projector["k"].shape == (6, 2) and state.projector["w"].shape == (0, 0)
    wide = ft.scale_by_galore(rank=2).init({"w": torch.zeros(3, 7)})
    assert wide.projector["w"].shape == (7, 2)


def test_non_finite_gradient_off_refresh_keeps_projector_and_nan_on_refresh() -> None:
    tx = ft.scale_by_galore(2, 2, 1.0, ft.identity())
    g = torch.tensor(_grads((4, 3), 4)[0])
    bad = g.clone()
    bad[0, 0] = float("nan")
    _, s1 = tx.update({"w": g}, tx.init({"w": g}))
    u, s2 = tx.update({"w": bad}, s1)  # step 2: no refresh, no SVD failure
    assert torch.equal(s2.projector["w"], s1.projector["w"])
    assert torch.isnan(u["w"][:, 0]).all() and torch.isfinite(u["w"][:, 1:]).all()
    _, s3 = tx.update({"w": bad.clone().fill_(float("inf"))}, s2)  # step 3 refreshes
    assert torch.isnan(s3.projector["w"]).all()


def test_contract_pure_bfloat16_masked_train_step() -> None:
    contract.check_pure(ft.galore(0.1, rank=2, update_proj_gap=2, weight_decay=0.1))
    contract.check_bfloat16(ft.scale_by_galore(rank=2, update_proj_gap=2))
    contract.check_masked(ft.galore(0.1, rank=2, update_proj_gap=2))
    contract.check_train_step(ft.galore(0.1, rank=1))


def test_train_step_on_a_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g, dtype=F64)
    batch = {"x": x, "y": x @ torch.randn(6, 4, generator=g, dtype=F64)}

    def loss_fn(params: Any, batch: Any) -> torch.Tensor:
        return ((batch["x"] @ params["w"] - batch["y"]) ** 2).mean()

    tx = ft.galore(0.05, rank=2, update_proj_gap=3)
    for k in (1, 2):
        step = ft.make_train_step(loss_fn, tx, micro_batches=k)
        state = ft.TrainState.create(params={"w": torch.zeros(6, 4, dtype=F64)}, tx=tx)
        first = float(loss_fn(state.params, batch))
        for _ in range(10):
            state, _ = step(state, batch)
        assert float(loss_fn(state.params, batch)) < 0.7 * first


def test_compiles_fullgraph_once() -> None:
    contract.check_compiles(ft.galore(ft.linear_schedule(0.1, 0.01, 5), rank=2, update_proj_gap=2))


def test_vmap_over_init_and_update() -> None:
    tx = ft.scale_by_galore(2, 1, 1.0, ft.identity())
    gs = torch.tensor(np.stack(_grads((5, 3), 4)))  # 4 independent 5x3 problems
    states = torch.func.vmap(tx.init)({"w": gs})
    u, _ = torch.func.vmap(tx.update)({"w": gs}, states)
    for i in range(4):
        ui, _ = tx.update({"w": gs[i]}, tx.init({"w": gs[i]}))
        torch.testing.assert_close(u["w"][i], ui["w"], rtol=1e-12, atol=1e-12)


def test_inject_hyperparams_learning_rate() -> None:
    tx = ft.inject_hyperparams(ft.galore)(learning_rate=0.1, rank=2, weight_decay=0.01)
    ref = ft.galore(0.1, rank=2, weight_decay=0.01)
    params = contract.tree_data()
    grads = [contract.tree_data(seed=s) for s in (1, 2, 3)]
    a, _ = contract.run(tx, grads, params)
    b, _ = contract.run(ref, grads, params)
    for x, y in zip(a, b):
        ft.testing.assert_trees_all_close(x, y, rtol=1e-14, atol=0)


def test_empty_tree() -> None:
    tx = ft.galore(0.1)
    u, state = tx.update({}, tx.init({}), {})
    assert u == {} and int(state[0].count) == 1


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 7), st.integers(0, 2**16))
def test_full_rank_identity_reproduces_and_low_rank_shrinks(m, n, rank, seed) -> None:
    g = torch.tensor(np.random.default_rng(seed).standard_normal((m, n)))
    tx = ft.scale_by_galore(rank, 1, 1.0, ft.identity(), ft.GaLoreDimensionNumbers())
    u, _ = tx.update({"w": g}, tx.init({"w": g}))
    if rank >= min(m, n):
        torch.testing.assert_close(u["w"], g, rtol=1e-10, atol=1e-10)
    else:
        assert torch.linalg.matrix_rank(u["w"]) <= rank
        assert torch.linalg.norm(u["w"]) <= torch.linalg.norm(g) * (1 + 1e-12)


def test_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match="rank"):
        ft.scale_by_galore(rank=True)
    with pytest.raises(ValueError, match="rank"):
        ft.galore(0.1, rank=0)
    with pytest.raises(ValueError, match="update_proj_gap"):
        ft.scale_by_galore(update_proj_gap=0)
    with pytest.raises(ValueError, match="scale"):
        ft.scale_by_galore(scale=float("inf"))
    with pytest.raises(TypeError, match="base_optimizer"):
        ft.scale_by_galore(base_optimizer=lambda g: g)
    w = {"w": torch.zeros(2, 3, 4)}
    for dims, match in [
        (ft.GaLoreDimensionNumbers(0, (0, 1)), "disjoint"),
        (ft.GaLoreDimensionNumbers(0, 1), "every axis"),
    ]:
        with pytest.raises(ValueError, match=match):
            ft.scale_by_galore(weight_dimension_numbers=dims).init(w)
    with pytest.raises(ValueError, match=r"params\['b'\].*at least 2"):
        ft.scale_by_galore(weight_dimension_numbers={"b": ft.GaLoreDimensionNumbers()}).init(
            {"b": torch.zeros(3)}
        )
    with pytest.raises(TypeError, match=r"weight_dimension_numbers\['w'\]"):
        ft.scale_by_galore(weight_dimension_numbers={"w": (0, 1)}).init({"w": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match=r"updates\['z'\] is complex"):
        z = {"z": torch.ones(2, 2, dtype=torch.complex128)}
        ft.scale_by_galore().update(z, ft.scale_by_galore().init({"z": torch.ones(2, 2)}))
