"""RMSProp/Adagrad scalings against literal float64 transcriptions of optax's rules."""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain import testing


def _grads(steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(3, 2, generator=gen, dtype=torch.float64),
            torch.randn(5, generator=gen, dtype=torch.float64),
        ]
        for _ in range(steps)
    ]


def _run(tx, grads):
    state = tx.init([torch.zeros_like(g) for g in grads[0]])
    out = []
    for g in grads:
        u, state = tx.update(g, state)
        out.append(u)
    return out, state


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_scale_by_rms_matches_reference(eps_in_sqrt: bool, bias_correction: bool) -> None:
    decay, eps, init = 0.8, 1e-3, 0.5
    grads = _grads(8)
    nus = [torch.full_like(g, init) for g in grads[0]]
    expected = []
    for t, g in enumerate(grads, start=1):
        nus = [(1 - decay) * x * x + decay * n for x, n in zip(g, nus)]
        hats = [n / (1 - decay**t) if bias_correction else n for n in nus]
        if eps_in_sqrt:
            expected.append([x / torch.sqrt(h + eps) for x, h in zip(g, hats)])
        else:
            expected.append([x / (torch.sqrt(h) + eps) for x, h in zip(g, hats)])
    tx = ft.scale_by_rms(decay, eps, init, eps_in_sqrt, bias_correction)
    got, state = _run(tx, grads)
    testing.assert_trees_all_close(got, expected, rtol=1e-12)
    testing.assert_trees_all_close(state.nu, nus, rtol=1e-12)
    if bias_correction:
        assert isinstance(state, ft.ScaleByRmsWithCountState) and int(state.count) == 8
    else:
        assert isinstance(state, ft.ScaleByRmsState)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_scale_by_stddev_matches_reference(eps_in_sqrt: bool, bias_correction: bool) -> None:
    decay, eps = 0.7, 1e-2
    grads = _grads(8, seed=1)
    mus = [torch.zeros_like(g) for g in grads[0]]
    nus = [torch.full_like(g, 1.0) for g in grads[0]]
    expected = []
    for t, g in enumerate(grads, start=1):
        mus = [(1 - decay) * x + decay * m for x, m in zip(g, mus)]
        nus = [(1 - decay) * x * x + decay * n for x, n in zip(g, nus)]
        c = (1 - decay**t) if bias_correction else 1.0
        var = [n / c - (m / c) ** 2 for m, n in zip(mus, nus)]
        if eps_in_sqrt:
            expected.append([x / torch.sqrt(v + eps) for x, v in zip(g, var)])
        else:
            expected.append([x / (torch.sqrt(v) + eps) for x, v in zip(g, var)])
    tx = ft.scale_by_stddev(decay, eps, 1.0, eps_in_sqrt, bias_correction)
    got, state = _run(tx, grads)
    testing.assert_trees_all_close(got, expected, rtol=1e-11)
    expected_type = ft.ScaleByRStdDevWithCountState if bias_correction else ft.ScaleByRStdDevState
    assert isinstance(state, expected_type)


def test_scale_by_rss_matches_reference_and_zero_sum_gives_zero() -> None:
    grads = _grads(6, seed=2)
    for g in grads:
        g[1][0] = 0.0  # an element whose sum of squares stays 0 with a zero initial value
    sums = [torch.zeros_like(g) for g in grads[0]]
    expected = []
    for g in grads:
        sums = [x * x + s for x, s in zip(g, sums)]
        expected.append(
            [torch.where(s > 0, x / torch.sqrt(s + 1e-7), 0.0) for x, s in zip(g, sums)]
        )
    got, state = _run(ft.scale_by_rss(initial_accumulator_value=0.0), grads)
    testing.assert_trees_all_close(got, expected, rtol=1e-12)
    assert all(float(u[1][0]) == 0.0 for u in got)
    testing.assert_trees_all_close(state.sum_of_squares, sums, rtol=1e-12)


def test_tensor_decay_equals_number() -> None:
    grads = _grads(4)
    a, _ = _run(ft.scale_by_rms(0.9), grads)
    b, _ = _run(ft.scale_by_rms(torch.tensor(0.9, dtype=torch.float64)), grads)
    testing.assert_trees_all_close(a, b, rtol=1e-14)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="decay"):
        ft.scale_by_rms(decay=1.5)
    with pytest.raises(ValueError, match="eps"):
        ft.scale_by_stddev(eps=-1.0)
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        ft.scale_by_rss(initial_accumulator_value=-0.1)
    tx = ft.scale_by_rms()
    state = tx.init({"a": torch.zeros(2)})
    with pytest.raises(ft.tree.TreeMismatchError, match=r"\['a'\]"):
        tx.update({"a": torch.zeros(3)}, state)
