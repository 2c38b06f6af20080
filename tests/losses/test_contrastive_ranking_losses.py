"""NT-Xent, triplet, ranking, label smoothing and Fenchel–Young losses against loops and
torch.nn.functional."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft

D = torch.float64
L = ft.losses


def _x(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale


# -- ntxent --------------------------------------------------------------------------------


def _ntxent_loop(emb: torch.Tensor, labels: list[int], temperature: float) -> float:
    n = len(labels)
    unit = emb / emb.norm(dim=1, keepdim=True)
    s = (unit @ unit.T / temperature).tolist()
    terms = []
    for i in range(n):
        negatives = [math.exp(s[i][k]) for k in range(n) if labels[k] != labels[i]]
        for j in range(n):
            if j != i and labels[j] == labels[i]:
                terms.append(
                    -math.log(math.exp(s[i][j]) / (math.exp(s[i][j]) + math.fsum(negatives)))
                )
    return math.fsum(terms) / len(terms)


@pytest.mark.parametrize(
    ("labels", "temperature"), [([0, 0, 1, 1, 2, 2], 0.07), ([0, 1, 0, 1, 1, 2], 0.5)]
)
def test_ntxent_is_the_mean_over_positive_pairs(labels, temperature):
    emb = _x(6, 3)
    got = ft.ntxent(emb, torch.tensor(labels), temperature)
    assert got.shape == ()
    assert math.isclose(got.item(), _ntxent_loop(emb, labels, temperature), rel_tol=1e-10)


def test_ntxent_errors_and_gradient():
    with pytest.raises(
        ValueError, match=r"ntxent: labels and embeddings must have the same leading dimension"
    ):
        ft.ntxent(_x(4, 2), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"ntxent: embeddings must have rank 2"):
        ft.ntxent(_x(4), torch.tensor([0, 0, 1, 1]))
    labels = torch.tensor([0, 0, 1, 1])
    assert torch.autograd.gradcheck(
        lambda e: ft.ntxent(e, labels, 0.5), (_x(4, 3).requires_grad_(True),)
    )


# -- triplet_margin_loss -------------------------------------------------------------------


@pytest.mark.parametrize("margin", [1.0, 0.3])
def test_triplet_margin_loss_equals_torch_with_eps_zero(margin):
    a, p, n = _x(5, 4), _x(5, 4, seed=1), _x(5, 4, seed=2)
    got = L.triplet_margin_loss(a, p, n, margin=margin, eps=0.0)
    want = F.triplet_margin_loss(a, p, n, margin=margin, eps=0.0, reduction="none")
    torch.testing.assert_close(got, want)


def test_triplet_margin_loss_eps_is_inside_the_root_and_even_degrees():
    a, p, n = _x(3, 2), _x(3, 2, seed=1), _x(3, 2, seed=2)
    got = L.triplet_margin_loss(a, p, n, norm_degree=4, margin=2.0, eps=1e-3)
    dp = (((a - p) ** 4).sum(-1) + 1e-3) ** 0.25
    dn = (((a - n) ** 4).sum(-1) + 1e-3) ** 0.25
    torch.testing.assert_close(got, torch.clamp_min(dp - dn + 2.0, 0))
    torch.testing.assert_close(
        L.triplet_margin_loss(a.T, p.T, n.T, axis=0), L.triplet_margin_loss(a, p, n)
    )
    with pytest.raises(TypeError, match="triplet_margin_loss: negatives must be a floating"):
        L.triplet_margin_loss(a, p, torch.ones(3, 2, dtype=torch.int64))


# -- smooth_labels -------------------------------------------------------------------------


@given(st.integers(1, 6), st.integers(0, 5), st.floats(0, 1))
def test_smooth_labels_sum_to_one_and_match_the_formula(classes, label, alpha):
    one_hot = F.one_hot(torch.tensor(label % classes), classes).to(D)
    got = ft.smooth_labels(one_hot, alpha)
    assert math.isclose(got.sum().item(), 1.0, rel_tol=1e-12)
    want = [(1 - alpha) * v + alpha / classes for v in one_hot.tolist()]
    assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) for a, b in zip(got.tolist(), want))


def test_smooth_labels_axis_and_where_count_the_classes():
    labels = F.one_hot(torch.tensor([1, 0, 2]), 4).to(D)
    torch.testing.assert_close(
        ft.smooth_labels(labels.T, 0.2, axis=0), ft.smooth_labels(labels, 0.2).T
    )
    torch.testing.assert_close(ft.smooth_labels(labels, 0.2, axis=None), 0.8 * labels + 0.2 / 12)
    where = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    got = ft.smooth_labels(labels, 0.2, where=where)
    torch.testing.assert_close(
        got, 0.8 * labels + 0.2 / torch.tensor([[2.0], [4.0], [2.0]], dtype=D)
    )
    with pytest.raises(TypeError, match="smooth_labels: labels must be a floating"):
        ft.smooth_labels(torch.tensor([0, 1]), 0.1)


# -- ranking_softmax_loss ------------------------------------------------------------------


def _ranking_loop(logits, labels, where, weights):
    out = []
    for i in range(logits.shape[0]):
        keep = where[i] if where is not None else torch.ones(logits.shape[1], dtype=torch.bool)
        if not keep.any():
            out.append(None)
            continue
        y = labels[i][keep] * (weights[i][keep] if weights is not None else 1.0)
        out.append(-(y * torch.log_softmax(logits[i][keep], 0)).sum().item())
    return out


def test_ranking_softmax_loss_reductions_masks_and_weights():
    logits = _x(4, 5, scale=2.0)
    labels = torch.tensor(
        [[1.0, 0, 2, 0, 0], [0, 0, 1, 1, 0], [1, 0, 0, 0, 0], [0, 2, 0, 0, 1]], dtype=D
    )
    where = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) < 0.7
    where[2] = False  # a list with no valid item
    weights = torch.rand(4, 5, generator=torch.Generator().manual_seed(2), dtype=D)
    per = _ranking_loop(logits, labels, where, weights)
    valid = [v for v in per if v is not None]
    kw = {"where": where, "weights": weights}
    got = L.ranking_softmax_loss(logits, labels, **kw)
    assert math.isclose(got.item(), math.fsum(valid) / len(valid), rel_tol=1e-12)
    got = L.ranking_softmax_loss(logits, labels, reduce_fn=torch.sum, **kw)
    assert math.isclose(got.item(), math.fsum(valid), rel_tol=1e-12)
    got = L.ranking_softmax_loss(logits, labels, reduce_fn=None, **kw)
    torch.testing.assert_close(got, torch.tensor([0.0 if v is None else v for v in per], dtype=D))
    plain = _ranking_loop(logits, labels, None, None)
    got = L.ranking_softmax_loss(logits, labels)
    assert math.isclose(got.item(), math.fsum(plain) / 4, rel_tol=1e-12)
    # no valid list: the mean is 0, not NaN; a callable gets the list mask as where=
    none = torch.zeros(4, 5, dtype=torch.bool)
    assert L.ranking_softmax_loss(logits, labels, where=none).item() == 0.0
    seen = {}

    def reduce_fn(loss, where=None):
        seen["where"] = where
        return loss.amax()

    L.ranking_softmax_loss(logits, labels, where=where, reduce_fn=reduce_fn)
    assert seen["where"].tolist() == [True, True, False, True]


def test_ranking_softmax_loss_gradients_are_finite_under_masks():
    logits = _x(3, 4).requires_grad_(True)
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=D)
    where = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda z: L.ranking_softmax_loss(z, labels, where=where), (logits,)
    )
    (g,) = torch.autograd.grad(L.ranking_softmax_loss(logits, labels, where=where), logits)
    assert torch.isfinite(g).all() and (g[~where] == 0).all()


# -- make_fenchel_young_loss ---------------------------------------------------------------


def test_fenchel_young_of_logsumexp_is_softmax_cross_entropy():
    fy = L.make_fenchel_young_loss(lambda s: torch.logsumexp(s, 0))
    scores = _x(2, 3, 5)
    targets = torch.softmax(_x(2, 3, 5, seed=1), -1)
    torch.testing.assert_close(fy(scores, targets), ft.softmax_cross_entropy(scores, targets))
    # keyword arguments reach max_fun unchanged
    tempered = L.make_fenchel_young_loss(lambda s, t=1.0: t * torch.logsumexp(s / t, 0))
    want = 2.0 * torch.logsumexp(scores / 2.0, -1) - (targets * scores).sum(-1)
    torch.testing.assert_close(tempered(scores, targets, t=2.0), want)
    with pytest.raises(TypeError, match="max_fun must be callable"):
        L.make_fenchel_young_loss(3.0)
