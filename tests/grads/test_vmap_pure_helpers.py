"""The pure gradient-statistics helpers under ``torch.func.vmap`` (e.g. over an ensemble's
per-member gradients): each must equal a Python loop over the batch. Before, the foreach
kernels inside them raised "Batching rule not implemented"."""

from __future__ import annotations

import torch

import functrain as ft


def test_cosine_accumulator_add_under_vmap_equals_a_loop():
    gen = torch.Generator().manual_seed(0)
    grads = {"w": torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)}
    start = ft.cosine_accumulator_init({"w": torch.randn(3, 2, generator=gen, dtype=torch.float64)})

    def unit_sum(g):
        return ft.cosine_accumulator_add(start, g).unit_sum["w"]

    got = torch.func.vmap(unit_sum)(grads)
    expected = torch.stack([unit_sum({"w": g}) for g in grads["w"]])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_merge_grad_moments_under_vmap_equals_a_loop():
    gen = torch.Generator().manual_seed(1)
    # Per member: 5 and 3 per-sample gradients of a (2, 2) parameter; the two groups' moments
    # are formed member by member, merged under vmap.
    first = torch.randn(4, 5, 2, 2, generator=gen, dtype=torch.float64)
    second = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    parts = [[ft.grad_moments({"w": group[i]}) for i in range(4)] for group in (first, second)]
    stacked = [
        (torch.stack([m.mean["w"] for m in ms]), torch.stack([m.m2["w"] for m in ms]))
        for ms in parts
    ]

    def merged(mean_a, m2_a, mean_b, m2_b):
        a = ft.GradMoments(5, {"w": mean_a}, {"w": m2_a})
        m = ft.merge_grad_moments(a, ft.GradMoments(3, {"w": mean_b}, {"w": m2_b}))
        return m.mean["w"], m.m2["w"]

    mean, m2 = torch.func.vmap(merged)(*stacked[0], *stacked[1])
    for i in range(4):
        whole = torch.cat([first[i], second[i]])
        torch.testing.assert_close(mean[i], whole.mean(0), rtol=1e-12, atol=1e-14)
        centred = whole - whole.mean(0)
        torch.testing.assert_close(m2[i], (centred**2).sum(0), rtol=1e-12, atol=1e-14)


def test_grad_moments_under_vmap_equals_a_loop_without_warnings():
    # Before: torch's "performance drop ... batching rule for aten::addmm_" warning (an error
    # under warnings-as-errors), from the in-place matrix-vector sums.
    per_member = torch.randn(3, 6, 2, 5, generator=torch.Generator().manual_seed(2)).double()

    def moments(g):
        m = ft.grad_moments({"w": g})
        return m.mean["w"], m.m2["w"]

    mean, m2 = torch.func.vmap(moments)(per_member)
    for i in range(3):
        torch.testing.assert_close(mean[i], per_member[i].mean(0), rtol=1e-12, atol=1e-14)
        centred = per_member[i] - per_member[i].mean(0)
        torch.testing.assert_close(m2[i], (centred**2).sum(0), rtol=1e-12, atol=1e-14)
