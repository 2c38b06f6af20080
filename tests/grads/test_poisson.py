"""PoissonSampler: every example in every batch independently with probability q."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import functrain as ft


def _inclusion(sampler: ft.PoissonSampler) -> torch.Tensor:
    """``(steps, N)`` 0/1 matrix of which example each batch holds."""
    rows = torch.zeros(len(sampler), sampler.num_examples)
    for t, idx in enumerate(sampler):
        assert idx == sorted(set(idx)), "indices are distinct and increasing"
        rows[t, idx] = 1.0
    return rows


def test_batch_sizes_are_binomial():
    n, q, steps = 500, 0.04, 3000
    sampler = ft.PoissonSampler(n, q, steps=steps, generator=torch.Generator().manual_seed(1))
    sizes = _inclusion(sampler).sum(1).double()
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 4 * math.sqrt(var / steps)
    # the sample variance of a binomial has standard error ≈ var·sqrt(2/steps)
    assert abs(sizes.var() - var) < 4 * var * math.sqrt(2 / steps)


def test_every_example_is_equally_likely_and_draws_are_independent():
    n, q, steps = 200, 0.1, 4000
    sampler = ft.PoissonSampler(n, q, steps=steps, generator=torch.Generator().manual_seed(2))
    rows = _inclusion(sampler)
    per_example = rows.mean(0)
    z = (per_example - q) / math.sqrt(q * (1 - q) / steps)
    assert z.abs().max() < 4.5  # 200 z-scores: max |z| above 4.5 has probability ~1e-3
    # no dependence between consecutive batches, nor between two examples of one batch
    lag = (rows[1:] * rows[:-1]).mean() - q * q
    pair = (rows[:, 0] * rows[:, 1]).mean() - q * q
    se = math.sqrt(q * q * (1 - q * q) / steps)
    assert abs(pair) < 4.5 * se
    assert abs(lag) < 4.5 * math.sqrt(q * q * (1 - q * q) / (steps * n))


def test_empty_batches_are_yielded_not_skipped():
    # q·N = 0.1: most batches are empty, and a DP step must still run (and be accounted) on them
    sampler = ft.PoissonSampler(100, 0.001, steps=500, generator=torch.Generator().manual_seed(3))
    sizes = [len(idx) for idx in sampler]
    assert len(sizes) == 500
    empty = sizes.count(0) / 500
    assert abs(empty - 0.999**100) < 4 * math.sqrt(0.9 * 0.1 / 500)


def test_defaults_seeds_and_expected_size():
    sampler = ft.PoissonSampler(1000, 0.01)
    assert len(sampler) == 100 and sampler.expected_batch_size == 10.0
    one = list(ft.PoissonSampler(50, 0.3, steps=5, generator=torch.Generator().manual_seed(7)))
    two = list(ft.PoissonSampler(50, 0.3, steps=5, generator=torch.Generator().manual_seed(7)))
    other = list(ft.PoissonSampler(50, 0.3, steps=5, generator=torch.Generator().manual_seed(8)))
    assert one == two and one != other
    torch.manual_seed(0)
    first = list(ft.PoissonSampler(50, 0.3, steps=3))
    torch.manual_seed(0)
    assert list(ft.PoissonSampler(50, 0.3, steps=3)) == first  # the global generator


def test_serves_as_a_dataloader_batch_sampler():
    x = torch.arange(40.0).unsqueeze(1)
    sampler = ft.PoissonSampler(40, 0.25, steps=6, generator=torch.Generator().manual_seed(0))
    expected = list(
        ft.PoissonSampler(40, 0.25, steps=6, generator=torch.Generator().manual_seed(0))
    )
    loader = DataLoader(TensorDataset(x), batch_sampler=sampler)
    for (batch,), idx in zip(loader, expected):
        assert batch.flatten().tolist() == [float(i) for i in idx]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_examples": 0, "sample_rate": 0.1}, "num_examples must be an int >= 1"),
        ({"num_examples": 10, "sample_rate": 0.0}, r"sample_rate must be a number in \(0, 1\]"),
        ({"num_examples": 10, "sample_rate": 1.5}, r"sample_rate must be a number in \(0, 1\]"),
        ({"num_examples": 10, "sample_rate": 0.1, "steps": -1}, "steps must be an int >= 0"),
        ({"num_examples": 10, "sample_rate": 0.1, "generator": 3}, "generator must be"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ft.PoissonSampler(**kwargs)
