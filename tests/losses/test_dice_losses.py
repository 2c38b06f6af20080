"""Dice losses against float64 loops over examples and classes."""

from __future__ import annotations

import math

import pytest
import torch

import functrain as ft

D = torch.float64
L = ft.losses


def _seg(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 3, 3, generator=gen, dtype=D)
    labels = torch.randint(0, 3, (2, 4, 3), generator=gen)
    return logits, torch.nn.functional.one_hot(labels, 3).to(D)


def _dice_loop(probs, targets, alpha=0.5, beta=0.5, smooth=1.0):
    """[batch, classes] Tversky losses summed over every spatial position, by loops."""
    batch, classes = probs.shape[0], probs.shape[-1]
    out = torch.zeros(batch, classes, dtype=D)
    for b in range(batch):
        p, t = probs[b].reshape(-1, classes), targets[b].reshape(-1, classes)
        for k in range(classes):
            inter = math.fsum((p[:, k] * t[:, k]).tolist())
            ps, ts = math.fsum(p[:, k].tolist()), math.fsum(t[:, k].tolist())
            den = inter + alpha * (ps - inter) + beta * (ts - inter) + smooth
            out[b, k] = 1 - (inter + smooth) / den
    return out


def test_dice_loss_per_class_and_reductions():
    logits, targets = _seg()
    ref = _dice_loop(torch.softmax(logits, -1), targets)
    torch.testing.assert_close(L.dice_loss(logits, targets, reduction="none"), ref)
    torch.testing.assert_close(L.dice_loss(logits, targets), ref.mean(-1))
    torch.testing.assert_close(L.dice_loss(logits, targets, reduction="sum"), ref.sum(-1))
    torch.testing.assert_close(
        L.dice_loss(logits, targets, ignore_background=True), ref[:, 1:].mean(-1)
    )
    weights = torch.tensor([0.2, 1.0, 3.0], dtype=D)
    torch.testing.assert_close(
        L.dice_loss(logits, targets, class_weights=weights), (ref * weights).mean(-1)
    )


def test_tversky_weights_and_probabilities_and_custom_axes():
    logits, targets = _seg(1)
    probs = torch.softmax(logits, -1)
    got = L.dice_loss(logits, targets, alpha=0.3, beta=0.7, smooth=0.5, reduction="none")
    torch.testing.assert_close(got, _dice_loop(probs, targets, 0.3, 0.7, 0.5))
    got = L.dice_loss(probs, targets, apply_softmax=False, reduction="none")
    torch.testing.assert_close(got, _dice_loop(probs, targets))
    # axis=(1,): sums over the first spatial axis only
    got = L.dice_loss(logits, targets, axis=(1,), reduction="none")
    want = torch.stack([_dice_loop(probs[:, :, j], targets[:, :, j]) for j in range(3)], 1)
    torch.testing.assert_close(got, want)


def test_binary_dice_uses_a_sigmoid_channel():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, generator=gen, dtype=D)
    targets = torch.randint(0, 2, (3, 5), generator=gen).to(D)
    want = _dice_loop(torch.sigmoid(logits)[..., None], targets[..., None]).mean(-1)
    torch.testing.assert_close(L.binary_dice_loss(logits, targets), want)
    torch.testing.assert_close(
        L.dice_loss(logits[..., None], targets), want
    )  # targets get a channel


def test_generalized_dice_weights_classes_by_inverse_squared_frequency():
    logits, targets = _seg(3)
    freq = targets.sum((0, 1, 2))
    w = 1 / (freq**2 + 1e-7)
    w = w / w.sum() * 3
    want = (_dice_loop(torch.softmax(logits, -1), targets) * w).mean()
    torch.testing.assert_close(L.multiclass_generalized_dice_loss(logits, targets), want)


def test_dice_errors_name_the_argument():
    logits, targets = _seg()
    with pytest.raises(ValueError, match="dice_loss: reduction must be one of"):
        L.dice_loss(logits, targets, reduction="avg")
    with pytest.raises(
        ValueError,
        match=r"dice_loss: predictions shape \(2, 4, 3, 3\) does not match targets shape \(2, 4, 3, 2\)",
    ):
        L.dice_loss(logits, targets[..., :2])
    with pytest.raises(ValueError, match="class_weights must have rank 1"):
        L.dice_loss(logits, targets, class_weights=torch.ones(1, 3))
    with pytest.raises(ValueError, match="multiclass_generalized_dice_loss: predictions shape"):
        L.multiclass_generalized_dice_loss(logits, targets[0])


def test_dice_gradients_match_finite_differences():
    logits, targets = _seg()
    x = logits[:, :2, :2].clone().requires_grad_(True)
    t = targets[:, :2, :2]
    assert torch.autograd.gradcheck(lambda z: L.dice_loss(z, t, alpha=0.3, beta=0.7), (x,))
    assert torch.autograd.gradcheck(lambda z: L.multiclass_generalized_dice_loss(z, t), (x,))
