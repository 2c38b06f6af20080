"""Review regressions for Sophia-H (:mod:`functrain.optim.clipped_newton`) and GaLore
(:mod:`functrain.optim.low_rank_projection`).

References: NumPy float64 SVDs written in the test (GaLore's projection ``P Pᵀ G`` does not
depend on the singular vectors' signs) and exact Hessian diagonals of separable objectives.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft

F64 = torch.float64


def _top_projection(g: np.ndarray, r: int) -> np.ndarray:
    """``P Pᵀ G`` (tall) or ``G P Pᵀ`` (wide) for the top-``r`` singular vectors, in float64."""
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    if g.shape[0] >= g.shape[1]:
        return u[:, :r] @ (u[:, :r].T @ g)
    return (g @ vh[:r].T) @ vh[:r]


# --- GaLore -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_galore_zero_size_leaf_is_legal(shape: tuple[int, int]) -> None:
    # Old: the non-finite check took amax() of the empty gradient and raised.
    tx = ft.galore(0.1, rank=2)
    params = {"w": torch.zeros(shape), "b": torch.ones(3)}
    grads = {"w": torch.zeros(shape), "b": torch.ones(3)}
    state = tx.init(params)
    for _ in range(2):
        u, state = tx.update(grads, state, params)
        assert u["w"].shape == shape
        assert torch.isfinite(u["b"]).all()


def test_galore_repeated_axis_is_refused_by_path() -> None:
    # Old: reduction_axis=(0, 0) passed the checks and laid a (6, 4) weight out as 36 x 4.
    dims = ft.GaLoreDimensionNumbers(reduction_axis=(0, 0), output_axis=1)
    tx = ft.scale_by_galore(rank=2, weight_dimension_numbers=dims)
    with pytest.raises(ValueError, match=r"params\['w'\].*repeated"):
        tx.init({"w": torch.zeros(6, 4)})
    tx = ft.scale_by_galore(rank=2, weight_dimension_numbers={"w": dims})
    with pytest.raises(ValueError, match=r"updates\['w'\].*repeated"):
        tx.update(
            {"w": torch.zeros(6, 4)}, ft.scale_by_galore(rank=2).init({"w": torch.zeros(6, 4)})
        )


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from([(6, 4), (3, 7), (5, 5)]),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
)
def test_galore_updates_in_another_dtype_than_the_params(
    shape: tuple[int, int], rank: int, seed: int
) -> None:
    # Old: the refreshed projector was promoted to the params' float32 and the product with a
    # bfloat16 gradient raised "expected m1 and m2 to have the same dtype" (Adam accepts it).
    rng = np.random.default_rng(seed)
    g64 = rng.standard_normal(shape)
    tx = ft.scale_by_galore(rank=rank, update_proj_gap=2, base_optimizer=ft.identity())
    state = tx.init({"w": torch.zeros(shape)})
    grads = {"w": torch.tensor(g64, dtype=torch.bfloat16)}
    for _ in range(3):  # a refresh, a step on the kept projector, a refresh
        u, state = tx.update(grads, state)
        assert u["w"].dtype == torch.bfloat16
        assert state.projector["w"].dtype == torch.float32
        r = min(rank, *shape)
        want = _top_projection(grads["w"].double().numpy(), r)
        np.testing.assert_allclose(u["w"].double().numpy(), want, rtol=0, atol=0.1)


def test_galore_adam_base_with_bfloat16_grads_and_float32_params_trains() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    target = torch.randn(8, 6, generator=g)

    def loss(p: Any) -> torch.Tensor:
        return ((x @ p["w"] - x @ target) ** 2).mean()

    finals = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = {"w": torch.zeros(8, 6)}
        tx = ft.galore(0.05, rank=3, update_proj_gap=5)
        state = tx.init(params)
        for _ in range(60):
            grads = ft.tree.map(lambda t, d=dtype: t.to(d), torch.func.grad(loss)(params))
            u, state = tx.update(grads, state, params)
            params = ft.apply_updates(params, u)
        assert params["w"].dtype == torch.float32
        finals[dtype] = float(loss(params))
    first = float(loss({"w": torch.zeros(8, 6)}))
    assert finals[torch.bfloat16] < 0.7 * first
    assert abs(finals[torch.bfloat16] - finals[torch.float32]) < 0.25 * finals[torch.float32]


# --- Sophia-H -----------------------------------------------------------------------------


def test_hutchinson_under_masked_names_the_missing_leaf() -> None:
    # Old: torch.func's "Thing passed to transform API must be Tensor, got NoneType".
    params = {"w": torch.ones(3), "b": torch.ones(2)}

    def obj(p: Any) -> torch.Tensor:
        return (p["w"] ** 2).sum() + (p["b"] ** 2).sum()

    tx = ft.masked(ft.sophia(0.1), {"w": True, "b": False})
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"params\['b'\] is None.*ft\.masked"):
        tx.update(torch.func.grad(obj)(params), state, params, obj_fn=obj)


def test_hutchinson_with_parameters_under_no_grad_holds_no_graph() -> None:
    # The documented way to use nn.Parameter leaves: the state carries no autograd graph and
    # the estimate is the exact diagonal of a separable objective, 2 * a.
    a = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    params = {"w": torch.nn.Parameter(torch.ones(3, dtype=F64))}

    def obj(p: Any) -> torch.Tensor:
        return (a * p["w"] ** 2).sum()

    tx = ft.scale_by_sophia(b1=0.0, b2=0.0, update_interval=1)
    state = tx.init(params)
    with torch.no_grad():
        for _ in range(2):
            _, state = tx.update(torch.func.grad(obj)(params), state, params, obj_fn=obj)
    assert not state.nu["w"].requires_grad and state.nu["w"].grad_fn is None
    torch.testing.assert_close(state.nu["w"], 2 * a, rtol=0, atol=0)


def test_sophia_h_checkpoint_round_trip_resumes_the_same_probes() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4, generator=g, dtype=F64)
    y = torch.randn(16, 2, generator=g, dtype=F64)

    def obj(p: Any) -> torch.Tensor:
        return ((torch.tanh(x @ p["w"]) - y) ** 2).mean()

    tx = ft.sophia(
        0.05, update_interval=2, hessian_diagonal_fn=ft.hutchinson_estimator_diag_hessian(7)
    )
    params = {"w": torch.randn(4, 2, generator=g, dtype=F64)}
    state = tx.init(params)
    for _ in range(3):
        u, state = tx.update(torch.func.grad(obj)(params), state, params, obj_fn=obj)
        params = ft.apply_updates(params, u)
    buf = io.BytesIO()
    torch.save((params, state), buf)
    buf.seek(0)
    params2, state2 = torch.load(buf, weights_only=False)
    for _ in range(4):
        u, state = tx.update(torch.func.grad(obj)(params), state, params, obj_fn=obj)
        u2, state2 = tx.update(torch.func.grad(obj)(params2), state2, params2, obj_fn=obj)
        torch.testing.assert_close(u, u2, rtol=0, atol=0)
        params, params2 = ft.apply_updates(params, u), ft.apply_updates(params2, u2)
    assert torch.equal(state[0].hessian_fn_state.key, state2[0].hessian_fn_state.key)
