"""CTC against torch.nn.functional.ctc_loss (values and gradients) and a brute-force sum."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import functrain as ft

D = torch.float64


def _problem(seed: int = 0, blank: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 9, 6, generator=gen, dtype=D) * 2
    frames = torch.tensor([9, 7, 5, 9])
    lengths = torch.tensor([3, 4, 1, 0])
    labels = torch.tensor([[1, 2, 2, 0], [3, 3, 4, 1], [2, 0, 0, 0], [0, 0, 0, 0]])
    if blank:
        labels = labels + (labels >= blank)  # no label is the blank
    logit_pad = (torch.arange(9) >= frames[:, None]).to(D)
    label_pad = (torch.arange(4) >= lengths[:, None]).to(D)
    return logits, logit_pad, labels, label_pad, frames, lengths


@pytest.mark.parametrize("blank", [0, 2])
def test_ctc_loss_equals_torch_ctc_loss_without_reduction(blank):
    logits, logit_pad, labels, label_pad, frames, lengths = _problem(blank=blank)
    x = logits.clone().requires_grad_(True)
    got = ft.ctc_loss(x, logit_pad, labels, label_pad, blank_id=blank)
    y = logits.clone().requires_grad_(True)
    log_probs = torch.log_softmax(y, -1).transpose(0, 1)  # torch: time-major log-probs
    want = F.ctc_loss(log_probs, labels, frames, lengths, blank=blank, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    (gx,) = torch.autograd.grad(got.sum(), x)
    (gy,) = torch.autograd.grad(want.sum(), y)
    torch.testing.assert_close(gx, gy, rtol=1e-8, atol=1e-10)


def test_ctc_loss_is_the_sum_over_alignments():
    # 2 classes {blank, a}, 3 frames, label "a a": paths collapse to "aa" only with a blank
    # between the two a's: "a_a" alone.
    logits = torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(1), dtype=D)
    p = torch.softmax(logits[0], -1)
    for label, want_paths in (([1], None), ([1, 1], ["101"])):
        total = 0.0
        for path in itertools.product((0, 1), repeat=3):
            collapsed = [k for i, k in enumerate(path) if k != 0 and (i == 0 or path[i - 1] != k)]
            if collapsed == label:
                if want_paths is not None:
                    assert "".join(map(str, path)) in want_paths
                total += math.prod(p[t, k].item() for t, k in enumerate(path))
        got = ft.ctc_loss(
            logits, torch.zeros(1, 3), torch.tensor([label]), torch.zeros(1, len(label))
        )
        assert math.isclose(got.item(), -math.log(total), rel_tol=1e-12)


def test_forward_probs_shapes_and_final_value():
    logits, logit_pad, labels, label_pad, _, lengths = _problem()
    loss, blank, emit = ft.ctc_loss_with_forward_probs(logits, logit_pad, labels, label_pad)
    assert blank.shape == (9, 4, 5) and emit.shape == (9, 4, 4)  # [T, B, N + 1], [T, B, N]
    # the loss is minus the last frame's blank variable at each sequence's label length
    torch.testing.assert_close(loss, -blank[-1, torch.arange(4), lengths])
    torch.testing.assert_close(loss, ft.ctc_loss(logits, logit_pad, labels, label_pad))


def test_unalignable_sequences_give_about_minus_log_epsilon():
    logits = torch.zeros(1, 2, 4, dtype=D)
    got = ft.ctc_loss(logits, torch.zeros(1, 2), torch.tensor([[1, 2, 3]]), torch.zeros(1, 3))
    assert torch.isfinite(got).all() and got.item() > 1e5 - 100


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_float32_results(dtype):
    # the forward variables reach log_epsilon = -1e5, beyond float16's range (as optax's,
    # the results are float32)
    logits, logit_pad, labels, label_pad, _, _ = _problem()
    got = ft.ctc_loss_with_forward_probs(logits.to(dtype), logit_pad, labels, label_pad)
    want = ft.ctc_loss_with_forward_probs(logits.to(dtype).double(), logit_pad, labels, label_pad)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-3)


def test_ctc_errors_name_the_argument():
    logits, logit_pad, labels, label_pad, _, _ = _problem()
    with pytest.raises(ValueError, match=r"logits must have rank 3, got shape \(9, 6\)"):
        ft.ctc_loss_with_forward_probs(logits[0], logit_pad, labels, label_pad)
    with pytest.raises(
        ValueError, match=r"labels shape \(4, 4\) does not match label_paddings shape \(4, 3\)"
    ):
        ft.ctc_loss(logits, logit_pad, labels, label_pad[:, :3])
    with pytest.raises(ValueError, match=r"logit_paddings shape \(4, 8\) does not match"):
        ft.ctc_loss(logits, logit_pad[:, :8], labels, label_pad)
    with pytest.raises(ValueError, match="labels batch size 3 does not match logits batch size 4"):
        ft.ctc_loss(logits, logit_pad, labels[:3], label_pad[:3])
    with pytest.raises(ValueError, match=r"blank_id 6 is not in \[0, 6\)"):
        ft.ctc_loss(logits, logit_pad, labels, label_pad, blank_id=6)
    with pytest.raises(TypeError, match="ctc_loss: labels must be an integer"):
        ft.ctc_loss(logits, logit_pad, labels.to(D), label_pad)
