"""Review of the squared-norm routes behind ``ft.tree.norm``: torch.func transforms, gradients,
``torch.compile`` and the fast step's ``global_norm``, each against float64 arithmetic."""

from __future__ import annotations

import torch

import functrain as ft
from functrain.train.fast import global_norm

BIG = 1 << 20  # above the rows threshold (functrain._sq_norms.ROWS_MIN_NUMEL)


def test_vmap_of_tree_norm_over_mixed_leaves_matches_float64():
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(3, BIG, generator=gen)
    ys = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    got = torch.func.vmap(lambda x, y: ft.tree.norm({"x": x, "y": y}))(xs, ys)
    expected = (xs.double().square().sum(1) + ys.square().sum(1)).sqrt()
    assert got.dtype == torch.float64
    # Under vmap each float32 leaf takes one vector norm (2^20 values: about 1e-5).
    torch.testing.assert_close(got, expected, rtol=5e-5, atol=0)


def test_vmap_of_global_norm_matches_float64():
    xs = torch.randn(2, BIG, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.func.vmap(lambda x: global_norm([x, x[:3]]))(xs)
    expected = (xs.square().sum(1) + xs[:, :3].square().sum(1)).sqrt()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_gradient_through_tree_norm_of_a_large_leaf_is_x_over_norm():
    x = torch.randn(BIG, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = torch.nn.Parameter(x.clone())
    ft.tree.norm({"p": p, "q": torch.ones(2, dtype=torch.float64)}).backward()
    norm = (x.square().sum() + 2).sqrt()
    torch.testing.assert_close(p.grad, x / norm, rtol=1e-12, atol=0)
    g = torch.func.grad(lambda v: ft.tree.norm([v], squared=True))(x)
    torch.testing.assert_close(g, 2 * x, rtol=1e-12, atol=0)


def test_tree_norm_compiles_without_graph_breaks_and_matches_float64():
    gen = torch.Generator().manual_seed(3)
    leaves = [torch.randn(BIG, generator=gen), torch.randn(5, generator=gen)]
    got = torch.compile(lambda t: ft.tree.norm(t), fullgraph=True, backend="eager")(leaves)
    expected = sum(float(x.double().square().sum()) for x in leaves) ** 0.5
    assert abs(float(got) - expected) <= 5e-5 * expected  # traced: the foreach norm


def test_same_inputs_give_the_same_bits_and_global_norm_equals_tree_norm():
    gen = torch.Generator().manual_seed(4)
    leaves = [torch.randn(3 * BIG, generator=gen), torch.randn(7, generator=gen)]
    first = ft.tree.norm(leaves)
    assert torch.equal(first, ft.tree.norm(leaves))
    assert torch.equal(global_norm(leaves), first)
