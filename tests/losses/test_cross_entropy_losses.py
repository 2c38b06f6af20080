"""Softmax, sigmoid, focal and poly cross entropies against torch.nn.functional and float64
hand formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft

D = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=D) * scale


def _probs(*shape: int, seed: int = 1, dim: int = -1) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=_gen(seed), dtype=D), dim)


def _labels(high: int, *shape: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=_gen(seed))


# -- softmax_cross_entropy_with_integer_labels -------------------------------------------------


def test_integer_labels_equal_torch_cross_entropy_without_reduction():
    logits, labels = _logits(7, 5), _labels(5, 7)
    got = ft.softmax_cross_entropy_with_integer_labels(logits, labels)
    want = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    # torch's default reduction is the mean: the documented difference.
    torch.testing.assert_close(got.mean(), F.cross_entropy(logits, labels))


def test_integer_labels_class_axis_1_equals_torch_layout():
    logits, labels = _logits(3, 4, 6), _labels(4, 3, 6)  # torch: [N, C, d]
    got = ft.softmax_cross_entropy_with_integer_labels(logits, labels, axis=1)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, reduction="none"))


@given(
    st.lists(st.floats(-30, 30, allow_nan=False), min_size=2, max_size=6),
    st.integers(0, 5),
)
def test_integer_labels_are_minus_log_softmax_at_the_label(values, label):
    label = label % len(values)
    logits = torch.tensor(values, dtype=D)
    got = ft.softmax_cross_entropy_with_integer_labels(logits, torch.tensor(label))
    peak = max(values)
    want = peak + math.log(math.fsum(math.exp(v - peak) for v in values)) - values[label]
    assert got.item() >= 0.0
    assert math.isclose(got.item(), want, rel_tol=1e-12, abs_tol=1e-12)
    one_hot = F.one_hot(torch.tensor(label), len(values)).to(D)
    same = ft.softmax_cross_entropy(logits, one_hot)
    assert math.isclose(same.item(), want, rel_tol=1e-12, abs_tol=1e-12)


def test_integer_labels_wrap_negative_and_give_nan_out_of_range_without_host_reads():
    logits = _logits(4, 3)
    got = ft.softmax_cross_entropy_with_integer_labels(logits, torch.tensor([-1, 3, -4, 1]))
    want_0 = F.cross_entropy(logits[:1], torch.tensor([2]), reduction="none")
    torch.testing.assert_close(got[:1], want_0)
    assert torch.isnan(got[1:3]).all()
    torch.testing.assert_close(
        got[3:], F.cross_entropy(logits[3:], torch.tensor([1]), reduction="none")
    )


def test_integer_labels_tuple_axis_is_a_flat_index_in_the_given_order():
    logits = _logits(2, 3, 4)  # classes on axes (2, 1): flat index = i2 * 3 + i1
    labels = torch.tensor([5, 10])
    got = ft.softmax_cross_entropy_with_integer_labels(logits, labels, axis=(2, 1))
    flat = logits.permute(0, 2, 1).reshape(2, 12)
    torch.testing.assert_close(got, F.cross_entropy(flat, labels, reduction="none"))


def test_integer_labels_where_leaves_classes_and_examples_out():
    logits, labels = _logits(4, 5), torch.tensor([0, 2, 4, 1])
    where = torch.tensor(
        [[1, 1, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool
    )
    got = ft.softmax_cross_entropy_with_integer_labels(logits, labels, where=where)
    for i in range(4):
        kept = logits[i][where[i]]
        if kept.numel() == 0:
            want = 0.0  # an example with no included class
        else:
            want = torch.logsumexp(kept, 0).item() - logits[i, labels[i]].item()
        assert math.isclose(got[i].item(), want, rel_tol=1e-12), i
    batch = torch.tensor([True, False, True, False])
    got = ft.softmax_cross_entropy_with_integer_labels(logits, labels, where=batch)
    want = F.cross_entropy(logits, labels, reduction="none") * batch
    torch.testing.assert_close(got, want)


def test_integer_labels_are_stable_for_huge_logits_and_half_precision():
    logits = torch.tensor([[1e4, 0.0, -1e4], [100.0, 100.0, 0.0]], dtype=torch.float32)
    got = ft.softmax_cross_entropy_with_integer_labels(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(got, torch.tensor([1e4, math.log(2.0)]))
    for dtype in (torch.float16, torch.bfloat16):
        x = _logits(6, 50, scale=8.0).to(dtype)  # exp(x) overflows float16 beyond 11
        y = _labels(50, 6)
        got = ft.softmax_cross_entropy_with_integer_labels(x, y)
        assert got.dtype == dtype
        want = F.cross_entropy(x.double(), y, reduction="none")
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def test_integer_label_errors_name_the_argument():
    fn = ft.softmax_cross_entropy_with_integer_labels
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fn(_logits(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        fn(torch.tensor([[1, 2]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels shape \(3,\) is not broadcastable.*\(2,\)"):
        fn(_logits(2, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="axis must be of type 'int' or 'tuple"):
        fn(_logits(2, 5), torch.tensor([0, 1]), axis=None)
    with pytest.raises(ValueError, match="axis 2 is out of bounds"):
        fn(_logits(2, 5), torch.tensor([0, 1]), axis=2)
    with pytest.raises(ValueError, match=r"where shape \(3,\) is not broadcastable"):
        fn(_logits(2, 5), torch.tensor([0, 1]), where=torch.ones(3, dtype=torch.bool))


# -- softmax_cross_entropy and safe_softmax_cross_entropy ----------------------------------


def test_probability_labels_equal_torch_cross_entropy_without_reduction():
    logits, probs = _logits(6, 4), _probs(6, 4)
    got = ft.softmax_cross_entropy(logits, probs)
    torch.testing.assert_close(got, F.cross_entropy(logits, probs, reduction="none"))
    got0 = ft.softmax_cross_entropy(logits.T, probs.T, axis=0)
    torch.testing.assert_close(got0, got)


def test_smooth_labels_give_torch_label_smoothing():
    logits, labels = _logits(5, 6), _labels(6, 5)
    smoothed = ft.smooth_labels(F.one_hot(labels, 6).to(D), 0.1)
    got = ft.softmax_cross_entropy(logits, smoothed)
    want = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(got, want)


def test_softmax_cross_entropy_axis_tuple_and_none():
    logits, probs = _logits(3, 2, 4), _probs(3, 8).reshape(3, 2, 4)
    got = ft.softmax_cross_entropy(logits, probs, axis=(1, 2))
    torch.testing.assert_close(
        got, F.cross_entropy(logits.reshape(3, 8), probs.reshape(3, 8), reduction="none")
    )
    flat = _probs(24).reshape(3, 2, 4)
    got = ft.softmax_cross_entropy(logits, flat, axis=None)
    want = -(flat * torch.log_softmax(logits.reshape(-1), 0).reshape(3, 2, 4)).sum()
    torch.testing.assert_close(got, want)


def test_softmax_cross_entropy_where_renormalises_over_the_kept_classes():
    logits, probs = _logits(3, 5), _probs(3, 5)
    where = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    got = ft.softmax_cross_entropy(logits, probs, where=where)
    for i in range(3):
        keep = where[i]
        want = (
            -(probs[i][keep] * torch.log_softmax(logits[i][keep], 0)).sum() if keep.any() else 0.0
        )
        assert math.isclose(got[i].item(), float(want), rel_tol=1e-12, abs_tol=1e-15)
    # A batch-shaped mask is expanded at the class axis: whole examples are in or out.
    got = ft.softmax_cross_entropy(logits, probs, where=torch.tensor([True, False, True]))
    want = F.cross_entropy(logits, probs, reduction="none") * torch.tensor([1.0, 0.0, 1.0], dtype=D)
    torch.testing.assert_close(got, want)
    # Masked classes get zero gradients, never NaN (even for a fully masked example).
    x = logits.clone().requires_grad_(True)
    y = probs.clone().requires_grad_(True)
    ft.softmax_cross_entropy(x, y, where=where).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert (x.grad[~where] == 0).all()


def test_minus_inf_logits_nan_in_softmax_ce_and_finite_in_safe_variant():
    logits = torch.tensor([[0.5, -math.inf, 1.5], [-math.inf, 0.0, 2.0]], dtype=D)
    labels = torch.tensor([[0.3, 0.0, 0.7], [0.0, 1.0, 0.0]], dtype=D)
    assert torch.isnan(ft.softmax_cross_entropy(logits, labels)).all()  # as optax
    x = logits.clone().requires_grad_(True)
    got = ft.safe_softmax_cross_entropy(x, labels)
    kept = [[0, 2], [1, 2]]
    for i, cols in enumerate(kept):
        want = -(labels[i, cols] * torch.log_softmax(logits[i, cols], 0)).sum()
        torch.testing.assert_close(got[i], want)
    got.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[torch.isinf(logits)] == 0).all()
    finite = _logits(4, 3)
    torch.testing.assert_close(
        ft.safe_softmax_cross_entropy(finite, _probs(4, 3)),
        ft.softmax_cross_entropy(finite, _probs(4, 3)),
    )


def test_softmax_cross_entropy_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"labels shape \(4,\) is not broadcastable.*\(2, 3\)"):
        ft.softmax_cross_entropy(_logits(2, 3), torch.ones(4, dtype=D))
    with pytest.raises(TypeError, match="softmax_cross_entropy: logits must be a floating"):
        ft.softmax_cross_entropy(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"safe_softmax_cross_entropy: labels shape"):
        ft.safe_softmax_cross_entropy(_logits(2, 3), torch.ones(2, 4, dtype=D))


# -- sigmoid_binary_cross_entropy and sigmoid_focal_loss ----------------------------------


def test_sigmoid_binary_cross_entropy_equals_torch_without_reduction():
    logits, labels = _logits(4, 6, scale=5.0), torch.rand(4, 6, generator=_gen(3), dtype=D)
    got = ft.sigmoid_binary_cross_entropy(logits, labels)
    torch.testing.assert_close(
        got, F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    )
    # Integer labels and broadcasting (labels of one row).
    ints = torch.tensor([1, 0, 1, 1, 0, 0])
    got = ft.sigmoid_binary_cross_entropy(logits, ints)
    want = F.binary_cross_entropy_with_logits(logits, ints.to(D).expand(4, 6), reduction="none")
    torch.testing.assert_close(got, want)


def test_sigmoid_binary_cross_entropy_is_finite_for_extreme_logits():
    logits = torch.tensor([-200.0, -50.0, 50.0, 200.0])
    got = ft.sigmoid_binary_cross_entropy(logits, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([200.0, 0.0, 0.0, 200.0]))


def _focal_reference(x: torch.Tensor, y: torch.Tensor, alpha, gamma) -> torch.Tensor:
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** gamma
    return loss if alpha is None else (alpha * y + (1 - alpha) * (1 - y)) * loss


@pytest.mark.parametrize(("alpha", "gamma"), [(None, 2.0), (0.25, 2.0), (0.6, 0.5), (None, 0.0)])
def test_sigmoid_focal_loss_equals_the_formula(alpha, gamma):
    logits = _logits(5, 4, scale=3.0)
    labels = torch.rand(5, 4, generator=_gen(4), dtype=D)
    labels[:2] = labels[:2].round()  # hard and soft labels
    got = ft.sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(got, _focal_reference(logits, labels, alpha, gamma))


def test_sigmoid_focal_loss_log_space_keeps_tiny_losses_and_finite_gradients():
    x = torch.tensor([-100.0, 40.0, 100.0], dtype=D, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 1.0], dtype=D)
    got = ft.sigmoid_focal_loss(x, y, gamma=1.5)
    # (1 - p_t)^γ · (-log p_t) with 1 - p_t = σ(-|x|) ≈ e^{-|x|}: tiny, not 0 or NaN.
    want = [math.exp(-1.5 * 100) * math.exp(-100), math.exp(-1.5 * 40) * math.exp(-40)]
    assert math.isclose(got[0].item(), want[0], rel_tol=1e-9)
    assert math.isclose(got[1].item(), want[1], rel_tol=1e-9)
    got.sum().backward()
    assert torch.isfinite(x.grad).all()


# -- poly_loss_cross_entropy ---------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [2.0, -1.0, 0.0])
def test_poly_loss_is_cross_entropy_plus_epsilon_one_minus_pt(epsilon):
    logits, probs = _logits(6, 4), _probs(6, 4)
    got = ft.losses.poly_loss_cross_entropy(logits, probs, epsilon=epsilon)
    p_t = (probs * torch.softmax(logits, -1)).sum(-1)
    want = F.cross_entropy(logits, probs, reduction="none") + epsilon * (1 - p_t)
    torch.testing.assert_close(got, want)


def test_poly_loss_needs_floating_labels():
    with pytest.raises(TypeError, match="poly_loss_cross_entropy: labels must be a floating"):
        ft.losses.poly_loss_cross_entropy(_logits(2, 3), torch.tensor([[0, 1, 0], [1, 0, 0]]))


# -- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, y: ft.softmax_cross_entropy(x, y),
        lambda x, y: ft.safe_softmax_cross_entropy(x, y),
        lambda x, y: ft.softmax_cross_entropy(x, y, where=torch.tensor([True, False, True])),
        lambda x, y: ft.losses.poly_loss_cross_entropy(x, y, epsilon=1.5),
        lambda x, y: ft.sigmoid_binary_cross_entropy(x, y),
        lambda x, y: ft.sigmoid_focal_loss(x, y, alpha=0.3, gamma=1.5),
    ],
)
def test_gradients_match_finite_differences(fn):
    x = _logits(3, 4).requires_grad_(True)
    y = _probs(3, 4).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, y))


def test_integer_label_gradient_is_softmax_minus_one_hot():
    x = _logits(3, 4).requires_grad_(True)
    labels = torch.tensor([0, 3, 1])
    assert torch.autograd.gradcheck(
        lambda z: ft.softmax_cross_entropy_with_integer_labels(z, labels), (x,)
    )
    (g,) = torch.autograd.grad(ft.softmax_cross_entropy_with_integer_labels(x, labels).sum(), x)
    torch.testing.assert_close(g, torch.softmax(x, -1) - F.one_hot(labels, 4))
