"""``ft.all_finite`` (aminmax on the CPU, inf-norm elsewhere) against a plain isfinite reference."""

import pytest
import torch

import functrain as ft

BAD = [float("nan"), float("inf"), -float("inf")]


def reference(tree) -> bool:
    return all(
        bool(torch.isfinite(x).all())
        for x in ft.tree.leaves(tree)
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())
    )


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
    got = ft.all_finite(tree)
    assert got.dtype == torch.bool and got.shape == ()
    assert bool(got) == reference(tree) == (bad is None)


def test_large_finite_values_are_finite():
    # A 2-norm would overflow here; an all-finite check must not.
    assert bool(ft.all_finite([torch.full((10,), 3e38)]))


@pytest.mark.parametrize(
    "tree",
    [
        [torch.ones(2), torch.ones(2, dtype=torch.float64)],  # mixed dtypes
        [torch.ones(2), torch.tensor([float("nan")], dtype=torch.float64)],
        [torch.ones(2), torch.tensor([1 + 1j, complex("nan")])],  # complex
        [torch.ones(2), torch.tensor([1 + 1j])],
        [torch.arange(3)],  # integers only
        [],
        {"x": None},
    ],
)
def test_unusual_trees_give_the_reference_answer(tree):
    assert bool(ft.all_finite(tree)) == reference(tree)


def test_compiles_without_graph_breaks():
    check = torch.compile(ft.all_finite, fullgraph=True, backend="aot_eager")
    tree = [torch.ones(3), torch.tensor([1.0, float("nan")])]
    assert not bool(check(tree)) and bool(check([torch.ones(3)]))
