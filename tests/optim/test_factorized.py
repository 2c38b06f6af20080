"""Adafactor's factored RMS against a literal transcription of optax's ``factorized.py``."""

from __future__ import annotations

import math

import pytest
import torch

import functrain as ft
from functrain import testing

EPS = 1e-30


def _decay(step: int, exponent: float = 0.8) -> float:
    # optax evaluates the default schedule in float32.
    t = torch.tensor(step, dtype=torch.float32) + 1.0
    return float(1.0 - t ** (-exponent))


def _reference_leaf(grads: list[torch.Tensor], dims, decay_fn=_decay) -> list[torch.Tensor]:
    shape = grads[0].shape
    out = []
    if dims is None:
        v = torch.zeros(shape, dtype=torch.float64)
        for step, g in enumerate(grads):
            b = decay_fn(step)
            v = b * v + (1 - b) * (g * g + EPS)
            out.append(g * v**-0.5)
        return out
    d1, d0 = dims
    v_row = torch.zeros([s for i, s in enumerate(shape) if i != d0], dtype=torch.float64)
    v_col = torch.zeros([s for i, s in enumerate(shape) if i != d1], dtype=torch.float64)
    for step, g in enumerate(grads):
        b = decay_fn(step)
        sq = g * g + EPS
        v_row = b * v_row + (1 - b) * sq.mean(dim=d0)
        v_col = b * v_col + (1 - b) * sq.mean(dim=d1)
        reduced = d1 - 1 if d1 > d0 else d1
        row_factor = (v_row / v_row.mean(dim=reduced, keepdim=True)) ** -0.5
        out.append(g * row_factor.unsqueeze(d0) * (v_col**-0.5).unsqueeze(d1))
    return out


def test_matches_reference_for_factored_and_full_leaves() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = {"mat": (4, 6), "tall": (7, 3), "cube": (3, 5, 4), "vec": (6,), "small": (2, 6)}
    steps = 6
    grads = [
        {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
        for _ in range(steps)
    ]
    tx = ft.scale_by_factored_rms(min_dim_size_to_factor=3)
    params = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    state = tx.init(params)
    # (second largest, largest) dims, optax's np.argsort order; "small" has a dim below 3.
    dims = {"mat": (0, 1), "tall": (1, 0), "cube": (2, 1), "vec": None, "small": None}
    assert tuple(state.v_row["cube"].shape) == (3, 4) and tuple(state.v_col["cube"].shape) == (3, 5)
    assert tuple(state.v["vec"].shape) == (6,) and tuple(state.v["mat"].shape) == (1,)
    got = []
    for g in grads:
        u, state = tx.update(g, state, params)
        got.append(u)
    for k in shapes:
        expected = _reference_leaf([g[k] for g in grads], dims[k])
        testing.assert_trees_all_close([u[k] for u in got], expected, rtol=1e-10)
    assert int(state.count) == steps


def test_unfactored_option_and_custom_decay() -> None:
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(4)]

    def decay_fn(step, rate):
        return 0.5 + 0.1 * torch.tanh(step.to(torch.float64) * rate)

    tx = ft.scale_by_factored_rms(
        factored=False, decay_rate=0.5, step_offset=2, decay_rate_fn=decay_fn
    )
    state = tx.init([torch.zeros(4, 5, dtype=torch.float64)])
    got = []
    for g in grads:
        u, state = tx.update([g], state)
        got.append(u[0])
    expected = _reference_leaf(grads, None, lambda s: 0.5 + 0.1 * math.tanh((s - 2) * 0.5))
    testing.assert_trees_all_close(got, expected, rtol=1e-12)


def test_float32_params_keep_float32_statistics() -> None:
    tx = ft.scale_by_factored_rms(min_dim_size_to_factor=2)
    params = {"w": torch.zeros(3, 4, dtype=torch.bfloat16)}
    state = tx.init(params)
    assert state.v_row["w"].dtype == torch.float32
    u, state = tx.update({"w": torch.ones(3, 4, dtype=torch.bfloat16)}, state, params)
    assert u["w"].dtype == torch.bfloat16


def test_state_mismatch_names_the_path() -> None:
    tx = ft.scale_by_factored_rms(min_dim_size_to_factor=2)
    state = tx.init({"w": torch.zeros(3, 4)})
    with pytest.raises(ft.tree.TreeMismatchError, match=r"\['w'\].*v_row"):
        tx.update({"w": torch.zeros(5, 4)}, state)
    with pytest.raises(ft.tree.TreeMismatchError, match="'x'"):
        tx.update({"x": torch.zeros(3, 4)}, state)
