import math

import pytest
import torch
from grad_problems import PROBLEMS, mlp_problem, naive_per_sample, tied_problem
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import tree
from functrain.testing import assert_trees_all_close


def _flat(per_sample):
    """(n, P) matrix of per-sample gradients: the explicit reference for every statistic."""
    return torch.cat([x.reshape(x.shape[0], -1) for x in tree.leaves(per_sample)], dim=1)


@pytest.fixture(scope="module")
def reference():
    loss_fn, params, batch = mlp_problem(7)
    return loss_fn, params, batch, naive_per_sample(loss_fn, params, batch)


def test_per_sample_norms_on_materialized(reference):
    *_, ps = reference
    norms = ft.per_sample_norms(ps)
    assert_trees_all_close(norms.global_norm, _flat(ps).norm(dim=1), rtol=1e-12)
    expected_leaves = tree.map(lambda g: torch.stack([gi.norm() for gi in g]), ps)
    assert_trees_all_close(norms.leaf_norms, expected_leaves, rtol=1e-12)


@given(chunk_size=st.one_of(st.none(), st.integers(1, 8)))
def test_streaming_norms_equal_naive(reference, chunk_size):
    loss_fn, params, batch, ps = reference
    got = ft.per_sample_grad_norms(loss_fn, params, batch, chunk_size=chunk_size)
    expected = ft.GradNorms(_flat(ps).norm(dim=1), tree.map(lambda g: g.flatten(1).norm(dim=1), ps))
    assert_trees_all_close(got, expected, rtol=1e-10)


@given(chunk_size=st.one_of(st.none(), st.integers(1, 8)))
def test_streaming_moments_equal_naive(reference, chunk_size):
    loss_fn, params, batch, ps = reference
    m = ft.per_sample_grad_moments(loss_fn, params, batch, chunk_size=chunk_size)
    assert m.count == 7
    assert_trees_all_close(m.mean, tree.map(lambda g: g.mean(0), ps), rtol=1e-10, atol=1e-14)
    assert_trees_all_close(
        ft.grad_variance(m), tree.map(lambda g: g.var(0, correction=1), ps), rtol=1e-9, atol=1e-15
    )
    assert_trees_all_close(
        ft.grad_variance(m, ddof=0),
        tree.map(lambda g: g.var(0, correction=0), ps),
        rtol=1e-9,
        atol=1e-15,
    )
    assert_trees_all_close(
        m.sum_of_squares(), tree.map(lambda g: (g**2).sum(0), ps), rtol=1e-9, atol=1e-15
    )
    assert_trees_all_close(
        m.mean_square(), tree.map(lambda g: (g**2).mean(0), ps), rtol=1e-9, atol=1e-15
    )
    snr = ft.grad_snr(m)
    expected_snr = tree.map(lambda g: g.mean(0) ** 2 / g.var(0, correction=1), ps)
    assert_trees_all_close(snr, expected_snr, rtol=1e-7)


@given(
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    seed=st.integers(0, 1000),
)
def test_merge_moments_equals_moments_of_union(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    data = {"a": torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64) + 5.0}
    parts = torch.split(data["a"], sizes)
    acc = ft.grad_moments({"a": parts[0]})
    for p in parts[1:]:
        acc = ft.merge_grad_moments(acc, ft.grad_moments({"a": p}))
    full = ft.grad_moments(data)
    assert acc.count == full.count
    assert_trees_all_close(acc.mean, full.mean, rtol=1e-12)
    assert_trees_all_close(acc.m2, full.m2, rtol=1e-9)


def test_variance_needs_enough_examples():
    with pytest.raises(ValueError, match="ddof=1"):
        ft.grad_variance(ft.grad_moments([torch.ones(1, 2)]))


@pytest.mark.parametrize("cosine", [False, True])
@given(chunk_size=st.one_of(st.none(), st.integers(1, 8)))
def test_streaming_gram_equals_naive(reference, cosine, chunk_size):
    loss_fn, params, batch, ps = reference
    flat = _flat(ps)
    expected = flat @ flat.T
    if cosine:
        norms = flat.norm(dim=1)
        expected = expected / torch.outer(norms, norms)
    got = ft.per_sample_gram(loss_fn, params, batch, cosine=cosine, chunk_size=chunk_size)
    assert_trees_all_close(got, expected, rtol=1e-9, atol=1e-14)
    assert_trees_all_close(ft.grad_gram(ps, cosine=cosine), expected, rtol=1e-10, atol=1e-14)


def test_gram_with_tied_weights():
    loss_fn, params, batch = tied_problem(5)
    ps = naive_per_sample(loss_fn, params, batch)
    flat = _flat(ps)
    got = ft.per_sample_gram(loss_fn, params, batch, chunk_size=2)
    assert_trees_all_close(got, flat @ flat.T, rtol=1e-9, atol=1e-14)


def test_cosine_of_zero_gradient_is_zero():
    g = {"w": torch.tensor([[0.0, 0.0], [1.0, 0.0]])}
    c = ft.grad_gram(g, cosine=True)
    assert torch.equal(c, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_tree_gram_matches_explicit_inner_products():
    g = torch.Generator().manual_seed(0)
    trees = [
        {
            "a": torch.randn(3, 2, generator=g, dtype=torch.float64),
            "b": torch.randn(4, generator=g, dtype=torch.float64),
        }
        for _ in range(4)
    ]
    vecs = torch.stack([torch.cat([t["a"].reshape(-1), t["b"]]) for t in trees])
    expected = torch.tensor(
        [[float(torch.dot(vecs[i], vecs[j])) for j in range(4)] for i in range(4)],
        dtype=torch.float64,
    )
    assert_trees_all_close(ft.tree_gram(trees), expected, rtol=1e-12)
    cos = torch.tensor(
        [
            [
                float(torch.dot(vecs[i], vecs[j]) / (vecs[i].norm() * vecs[j].norm()))
                for j in range(4)
            ]
            for i in range(4)
        ],
        dtype=torch.float64,
    )
    assert_trees_all_close(ft.tree_gram(trees, cosine=True), cos, rtol=1e-12)
    assert math.isclose(float(ft.tree_gram(trees, cosine=True)[2, 2]), 1.0, rel_tol=1e-12)


def test_tree_gram_structure_mismatch():
    with pytest.raises(tree.TreeMismatchError, match="trees\\[1\\]"):
        ft.tree_gram([{"a": torch.ones(2)}, {"b": torch.ones(2)}])


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_streaming_stats_on_other_models(name):
    loss_fn, params, batch = PROBLEMS[name]()
    ps = naive_per_sample(loss_fn, params, batch)
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, chunk_size=3)
    assert_trees_all_close(norms.global_norm, _flat(ps).norm(dim=1), rtol=1e-9)
    m = ft.per_sample_grad_moments(loss_fn, params, batch, chunk_size=3)
    assert_trees_all_close(
        ft.grad_variance(m), tree.map(lambda g: g.var(0), ps), rtol=1e-8, atol=1e-14
    )
