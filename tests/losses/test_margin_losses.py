"""Hinge, perceptron and sparsemax losses against naive float64 loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft

D = torch.float64
L = ft.losses


def _x(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale


def test_binary_hinge_and_perceptron_are_the_formulas():
    f = _x(4, 5)
    y = torch.where(_x(4, 5, seed=1) > 0, 1.0, -1.0).to(D)
    torch.testing.assert_close(ft.hinge_loss(f, y), torch.clamp_min(1 - f * y, 0))
    torch.testing.assert_close(L.perceptron_loss(f, y), torch.clamp_min(-f * y, 0))
    with pytest.raises(
        ValueError,
        match=r"perceptron_loss: predictor_outputs shape \(4, 5\) does not match targets shape \(5,\)",
    ):
        L.perceptron_loss(f, y[0])
    with pytest.raises(ValueError, match="hinge_loss: predictor_outputs shape"):
        ft.hinge_loss(f, y[:, :2])


def _sparse_plus(z: float) -> float:
    return 0.0 if z <= -1 else z if z >= 1 else (z + 1) ** 2 / 4


def test_binary_sparsemax_loss_is_sparse_plus_of_the_signed_logit():
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 4.0], dtype=D)
    for label in (0, 1):
        got = L.sparsemax_loss(logits, torch.full((6,), label))
        want = [_sparse_plus(-v if label else v) for v in logits.tolist()]
        torch.testing.assert_close(got, torch.tensor(want, dtype=D))


def test_multiclass_hinge_and_perceptron_against_loops():
    scores, labels = _x(6, 4), torch.tensor([0, 3, 1, 2, 2, 0])
    hinge, perceptron = (
        L.multiclass_hinge_loss(scores, labels),
        L.multiclass_perceptron_loss(scores, labels),
    )
    for i in range(6):
        s, y = scores[i].tolist(), int(labels[i])
        want_h = max(s[j] + (0.0 if j == y else 1.0) for j in range(4)) - s[y]
        assert math.isclose(hinge[i].item(), want_h, rel_tol=1e-12)
        assert math.isclose(perceptron[i].item(), max(s) - s[y], rel_tol=1e-12, abs_tol=1e-15)
    # An out-of-range label has a zero one-hot row (jax.nn.one_hot), read without a host sync.
    got = L.multiclass_hinge_loss(scores[:1], torch.tensor([7]))
    torch.testing.assert_close(got, (scores[:1] + 1).amax(-1))


def _sparsemax_reference(z: list[float]) -> list[float]:
    """The simplex projection by its textbook definition, in float64."""
    srt = sorted(z, reverse=True)
    k, cum = 0, 0.0
    for i, v in enumerate(srt, 1):
        if 1 + i * v > cum + v:
            k, cum = i, cum + v
        else:
            break
    tau = (cum - 1) / k
    return [max(v - tau, 0.0) for v in z]


def test_multiclass_sparsemax_loss_against_the_definition():
    scores, labels = _x(8, 5), torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(3))
    got = L.multiclass_sparsemax_loss(scores, labels)
    for i in range(8):
        s, y = scores[i].tolist(), int(labels[i])
        p = _sparsemax_reference(s)
        want = sum(pj * (sj - s[y]) for pj, sj in zip(p, s)) + 0.5 * (1 - sum(pj * pj for pj in p))
        assert math.isclose(got[i].item(), want, rel_tol=1e-12, abs_tol=1e-14), i


@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=6), st.integers(0, 5))
def test_multiclass_sparsemax_loss_is_nonnegative_and_zero_iff_sparsemax_is_the_label(s, y):
    y = y % len(s)
    scores = torch.tensor([s], dtype=D)
    got = L.multiclass_sparsemax_loss(scores, torch.tensor([y])).item()
    assert got >= -1e-12
    p = _sparsemax_reference(s)
    if p[y] > 1 - 1e-9:
        assert abs(got) < 1e-9
    else:
        assert got > 0


@pytest.mark.parametrize(
    "fn",
    [
        lambda s: L.multiclass_hinge_loss(s, torch.tensor([0, 2, 1])),
        lambda s: L.multiclass_perceptron_loss(s, torch.tensor([0, 2, 1])),
        lambda s: L.multiclass_sparsemax_loss(s, torch.tensor([0, 2, 1])),
        lambda s: L.sparsemax_loss(s, torch.tensor([[1, 0, 1, 0]] * 3)),
        lambda s: ft.hinge_loss(s, torch.ones(3, 4, dtype=D)),
    ],
)
def test_gradients_match_finite_differences(fn):
    # away from the kinks, where the losses are differentiable
    s = torch.tensor(
        [[0.31, -0.42, 1.7, 0.05], [2.2, -1.3, 0.4, 0.9], [0.15, 0.62, -0.33, 0.11]], dtype=D
    )
    assert torch.autograd.gradcheck(fn, (s.requires_grad_(True),))


def test_multiclass_label_errors():
    with pytest.raises(TypeError, match="multiclass_hinge_loss: labels must be an integer"):
        L.multiclass_hinge_loss(_x(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(
        ValueError,
        match=r"multiclass_perceptron_loss: labels shape \(3,\) is not broadcastable to scores without its last axis shape \(2,\)",
    ):
        L.multiclass_perceptron_loss(_x(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="multiclass_sparsemax_loss: scores must be a floating"):
        L.multiclass_sparsemax_loss(torch.ones(2, 3, dtype=torch.int64), torch.tensor([0, 1]))
