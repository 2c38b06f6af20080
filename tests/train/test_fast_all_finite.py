"""``functrain.train.fast.all_finite`` agrees with ``ft.all_finite`` (the reference)."""

import pytest
import torch

import functrain as ft
from functrain.train.fast import all_finite

BAD = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [None, *BAD])
@pytest.mark.parametrize("where", [0, 5, 999])
def test_matches_the_reference(dtype, bad, where):
    gen = torch.Generator().manual_seed(where)
    tree = {
        "a": torch.randn(1000, generator=gen).to(dtype),
        "b": [torch.randn(3, 4, generator=gen).to(dtype), torch.empty(0, dtype=dtype)],
    }
    if bad is not None:
        tree["a"][where] = bad
    got = all_finite(tree)
    assert got.dtype == torch.bool and got.shape == ()
    assert bool(got) == bool(ft.all_finite(tree)) == (bad is None)


def test_large_finite_values_are_finite():
    # A 2-norm would overflow here; an all-finite check must not.
    assert bool(all_finite([torch.full((10,), 3e38)]))


@pytest.mark.parametrize(
    "tree",
    [
        [torch.ones(2), torch.ones(2, dtype=torch.float64)],  # mixed dtypes
        [torch.ones(2), torch.tensor([1 + 1j, complex("nan")])],  # complex
        [torch.arange(3)],  # integers only
        [],
        {"x": None},
    ],
)
def test_unusual_trees_give_the_reference_answer(tree):
    assert bool(all_finite(tree)) == bool(ft.all_finite(tree))
