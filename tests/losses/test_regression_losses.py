"""Regression losses and KL divergences against torch.nn.functional and float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft

D = torch.float64


def _x(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale


def _probs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.softmax(_x(*shape, seed=seed), -1)


# -- squared_error, l2_loss, huber_loss, log_cosh ------------------------------------------


def test_squared_error_and_l2_loss_are_elementwise_mse():
    a, b = _x(4, 3), _x(4, 3, seed=1)
    torch.testing.assert_close(ft.squared_error(a, b), F.mse_loss(a, b, reduction="none"))
    torch.testing.assert_close(ft.l2_loss(a, b), 0.5 * F.mse_loss(a, b, reduction="none"))
    torch.testing.assert_close(ft.squared_error(a, b).mean(), F.mse_loss(a, b))
    torch.testing.assert_close(ft.squared_error(a), a * a)
    torch.testing.assert_close(ft.l2_loss(a), 0.5 * a * a)


def test_squared_error_does_not_broadcast_targets():
    with pytest.raises(
        ValueError,
        match=r"squared_error: predictions shape \(4, 3\) does not match targets shape \(3,\)",
    ):
        ft.squared_error(_x(4, 3), _x(3))
    with pytest.raises(ValueError, match="l2_loss: predictions shape"):
        ft.l2_loss(_x(4, 3), _x(1, 3))
    with pytest.raises(TypeError, match="squared_error: predictions must be a floating"):
        ft.squared_error(torch.tensor([1, 2]))


@pytest.mark.parametrize("delta", [1.0, 0.5, 3.0])
def test_huber_loss_equals_torch_huber_without_reduction(delta):
    a, b = _x(5, 4), _x(5, 4, seed=1)
    got = ft.huber_loss(a, b, delta=delta)
    torch.testing.assert_close(got, F.huber_loss(a, b, reduction="none", delta=delta))
    # smooth_l1 is the Huber loss divided by delta (its beta)
    torch.testing.assert_close(got / delta, F.smooth_l1_loss(a, b, reduction="none", beta=delta))
    # targets broadcast (unlike squared_error) and None stands for zeros
    torch.testing.assert_close(
        ft.huber_loss(a, b[0], delta=delta),
        F.huber_loss(a, b[0].expand(5, 4), reduction="none", delta=delta),
    )
    torch.testing.assert_close(
        ft.huber_loss(a, delta=delta),
        F.huber_loss(a, torch.zeros_like(a), reduction="none", delta=delta),
    )


def test_huber_gradient_is_the_clipped_error():
    a = _x(20, scale=3.0).requires_grad_(True)
    (g,) = torch.autograd.grad(ft.huber_loss(a, delta=1.5).sum(), a)
    torch.testing.assert_close(g, a.detach().clamp(-1.5, 1.5))


@given(st.floats(-700, 700, allow_nan=False))
def test_log_cosh_is_log_of_cosh_and_finite_for_large_errors(e):
    got = ft.log_cosh(torch.tensor([e], dtype=D)).item()
    # log cosh e = |e| + log((1 + exp(-2|e|)) / 2), in float64 without overflow
    want = abs(e) + math.log1p(math.exp(-2 * abs(e))) - math.log(2.0)
    assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-15)


def test_log_cosh_float32_beyond_cosh_overflow():
    x = torch.tensor([0.5, 100.0, -300.0])
    assert torch.isinf(torch.log(torch.cosh(x))).tolist() == [False, True, True]  # naive
    got = ft.log_cosh(x, torch.zeros(3))
    assert got.dtype == torch.float32
    want = [math.log(math.cosh(0.5)), 100 - math.log(2.0), 300 - math.log(2.0)]
    torch.testing.assert_close(got, torch.tensor(want))


# -- cosine_similarity, cosine_distance ----------------------------------------------------


def test_cosine_similarity_equals_torch_for_nonzero_vectors():
    a, b = _x(6, 5), _x(6, 5, seed=1)
    got = ft.cosine_similarity(a, b)
    torch.testing.assert_close(got, F.cosine_similarity(a, b, dim=-1))
    torch.testing.assert_close(ft.cosine_distance(a, b), 1 - got)
    torch.testing.assert_close(ft.cosine_similarity(a.T, b.T, axis=0), got)


def test_cosine_epsilon_bounds_the_squared_norms():
    a = torch.tensor([[0.0, 0.0], [3e-3, 4e-3]], dtype=D)
    b = torch.tensor([[1.0, 0.0], [3.0, 4.0]], dtype=D)
    assert torch.isnan(ft.cosine_similarity(a, b)[0])  # 0/0 with the default epsilon=0
    got = ft.cosine_similarity(a, b, epsilon=1e-4)
    # |a_1|^2 = 2.5e-5 < 1e-4: its norm is taken as 1e-2
    torch.testing.assert_close(got, torch.tensor([0.0, (9e-3 + 16e-3) / (1e-2 * 5.0)], dtype=D))


def test_cosine_where_and_tuple_axis_use_the_kept_elements():
    a, b = _x(3, 2, 4), _x(3, 2, 4, seed=1)
    where = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(5)) < 0.7
    got = ft.cosine_similarity(a, b, axis=(1, 2), where=where)
    for i in range(3):
        u, v = a[i][where[i]], b[i][where[i]]
        want = (u @ v) / (u.norm() * v.norm())
        torch.testing.assert_close(got[i], want)


def test_cosine_errors_name_the_function_and_argument():
    with pytest.raises(
        ValueError,
        match=r"cosine_distance: predictions shape \(2, 3\) does not broadcast with targets shape \(4,\)",
    ):
        ft.cosine_distance(_x(2, 3), _x(4))
    with pytest.raises(TypeError, match="cosine_similarity: targets must be a floating"):
        ft.cosine_similarity(_x(2, 3), torch.ones(2, 3, dtype=torch.int64))


# -- KL divergences ------------------------------------------------------------------------


def test_kl_divergence_is_torch_kl_div_summed_per_example():
    log_p, t = torch.log(_probs(5, 4)), _probs(5, 4, seed=2)
    got = ft.kl_divergence(log_p, t)
    torch.testing.assert_close(got, F.kl_div(log_p, t, reduction="none").sum(-1))
    torch.testing.assert_close(got.sum() / 5, F.kl_div(log_p, t, reduction="batchmean"))
    log_t = torch.log(t)
    torch.testing.assert_close(
        ft.losses.kl_divergence_with_log_targets(log_p, log_t),
        F.kl_div(log_p, log_t, reduction="none", log_target=True).sum(-1),
    )


def test_kl_divergence_zero_targets_count_zero_with_finite_gradients():
    log_p = torch.log(_probs(3, 4)).requires_grad_(True)
    t = torch.tensor([[0.5, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25] * 4], dtype=D)
    t.requires_grad_(True)
    got = ft.kl_divergence(log_p, t)
    want = [
        sum(
            t[i, j].item() * (math.log(t[i, j].item()) - log_p[i, j].item())
            for j in range(4)
            if t[i, j] > 0
        )
        for i in range(3)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=D))
    got.sum().backward()
    assert torch.isfinite(log_p.grad).all() and torch.isfinite(t.grad).all()


def test_generalized_kl_adds_the_mass_difference_and_convex_is_the_same():
    log_p, t = (
        _x(4, 3, scale=0.5),
        torch.rand(4, 3, generator=torch.Generator().manual_seed(1), dtype=D) + 0.1,
    )
    got = ft.generalized_kl_divergence(log_p, t)
    want = (t * (torch.log(t) - log_p) + torch.exp(log_p) - t).sum(-1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ft.convex_kl_divergence(log_p, t), got)
    # for normalised distributions it is the KL divergence
    log_q, u = torch.log(_probs(4, 3)), _probs(4, 3, seed=3)
    torch.testing.assert_close(ft.generalized_kl_divergence(log_q, u), ft.kl_divergence(log_q, u))


def test_kl_axis_and_where():
    log_p, t = torch.log(_probs(4, 3)), _probs(4, 3, seed=2)
    where = torch.tensor([[1, 0, 1]] * 4, dtype=torch.bool)
    got = ft.kl_divergence(log_p, t, where=where)
    torch.testing.assert_close(got, (t * (torch.log(t) - log_p))[:, [0, 2]].sum(-1))
    torch.testing.assert_close(ft.kl_divergence(log_p.T, t.T, axis=0), ft.kl_divergence(log_p, t))
    torch.testing.assert_close(
        ft.kl_divergence(log_p, t, axis=None), ft.kl_divergence(log_p, t).sum()
    )


@given(
    st.lists(st.floats(-5, 5), min_size=2, max_size=5),
    st.lists(st.floats(-5, 5), min_size=2, max_size=5),
)
def test_kl_divergence_is_nonnegative_and_zero_on_equal_distributions(a, b):
    n = min(len(a), len(b))
    log_p = torch.log_softmax(torch.tensor(a[:n], dtype=D), 0)
    t = torch.softmax(torch.tensor(b[:n], dtype=D), 0)
    assert ft.kl_divergence(log_p, t).item() >= -1e-12
    assert abs(ft.kl_divergence(log_p, torch.exp(log_p)).item()) < 1e-12


def test_divergence_errors_name_the_argument():
    with pytest.raises(TypeError, match="kl_divergence: targets must be a floating"):
        ft.kl_divergence(_x(2, 3), torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(
        ValueError,
        match=r"kl_divergence_with_log_targets: log_predictions shape \(2, 3\) does not broadcast with log_targets shape \(2,\)",
    ):
        ft.losses.kl_divergence_with_log_targets(_x(2, 3), _x(2))
    with pytest.raises(ValueError, match="generalized_kl_divergence: axis 3 is out of bounds"):
        ft.generalized_kl_divergence(_x(2, 3), _x(2, 3), axis=3)


@pytest.mark.parametrize(
    "fn",
    [
        ft.squared_error,
        ft.l2_loss,
        lambda a, b: ft.huber_loss(a, b, delta=0.7),
        ft.log_cosh,
        ft.cosine_similarity,
        lambda a, b: ft.cosine_distance(a, b, epsilon=1e-3),
        lambda a, b: ft.kl_divergence(torch.log_softmax(a, -1), torch.softmax(b, -1)),
        lambda a, b: ft.generalized_kl_divergence(a, torch.exp(b)),
        lambda a, b: ft.losses.kl_divergence_with_log_targets(a, b),
    ],
)
def test_gradients_match_finite_differences(fn):
    a = _x(3, 4, scale=1.3).requires_grad_(True)
    b = _x(3, 4, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (a, b))
