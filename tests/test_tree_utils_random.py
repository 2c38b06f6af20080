"""tree_utils' random helpers: tree_split_key_like, tree_random_like, tree_unwrap_random_key_data.

Keys are checked against ``ft.split_key`` (optax splits the key once into one per leaf), samples
against the standard normal's moments (bounds of several standard errors, fixed keys, so
deterministic) and scipy's Kolmogorov-Smirnov test.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import functrain as ft
import functrain.tree_utils as tu
from functrain.tree import _random

TREE = {
    "b": torch.zeros(3),
    "a": (torch.zeros(2, 2, dtype=torch.float64), None),
    "c": torch.zeros(()),
}


def test_split_key_like_gives_split_key_s_keys_per_leaf():
    key = ft.random_key(0)
    keys = tu.tree_split_key_like(key, TREE)
    assert ft.tree.structure(keys) == ft.tree.structure(TREE)
    assert keys["a"][1] is None
    leaves = ft.tree.leaves(keys)
    # flatten order: a[0], b, c (dict keys sorted)
    expected = ft.split_key(key, 3)
    assert [int(k) for k in leaves] == [int(k) for k in expected]
    assert len({int(k) for k in leaves}) == 3
    for k in leaves:
        assert k.shape == () and k.dtype == torch.int64 and k.device.type == "cpu"
    # they are functrain keys: usable with fold_in
    ft.fold_in(leaves[0], 1)
    # an int seed stands for ft.random_key(seed)
    assert [int(k) for k in ft.tree.leaves(tu.tree_split_key_like(0, TREE))] == [
        int(k) for k in expected
    ]


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 3), max_size=3), min_size=1, max_size=5),
    seed=st.integers(0, 2**40),
)
def test_random_like_shapes_keys_and_reproducibility(shapes, seed):
    tree = [torch.zeros(tuple(s)) for s in shapes]
    keys = ft.tree.leaves(tu.tree_split_key_like(seed, tree))
    assert len({int(k) for k in keys}) == len(tree)
    a = tu.tree_random_like(ft.random_key(seed), tree)
    b = tu.tree_random_like(ft.random_key(seed), tree)
    assert [t.shape for t in a] == [t.shape for t in tree]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # leaf i is the default sampler's draw from its own key
    for leaf, key, target in zip(a, keys, tree):
        assert torch.equal(leaf, _random._standard_normal(key, target.shape, target.dtype))


def test_other_keys_and_other_leaves_draw_differently():
    tree = {"x": torch.zeros(1000), "y": torch.zeros(1000)}
    a = tu.tree_random_like(ft.random_key(1), tree)
    b = tu.tree_random_like(ft.random_key(2), tree)
    assert not torch.equal(a["x"], b["x"])
    # same-shaped leaves get independent streams: sample correlation ~ N(0, 1/n)
    corr = torch.corrcoef(torch.stack([a["x"], a["y"]]))[0, 1]
    assert abs(corr) < 5 / math.sqrt(1000)


def test_default_sampler_is_standard_normal():
    n = 200_000
    z = tu.tree_random_like(ft.random_key(7), {"w": torch.zeros(n, dtype=torch.float64)})["w"]
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(z.numpy(), stats.norm.cdf).pvalue > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtype_follows_the_target_or_the_argument(dtype):
    out = tu.tree_random_like(0, {"w": torch.zeros(4, 5, dtype=dtype)})
    assert out["w"].dtype == dtype and torch.isfinite(out["w"]).all()
    out = tu.tree_random_like(0, {"w": torch.zeros(4, 5, dtype=dtype)}, dtype=torch.float64)
    assert out["w"].dtype == torch.float64


def test_custom_samplers_with_and_without_device():
    calls = []

    def uniform(key, shape, dtype):
        calls.append((key.device.type, shape, dtype))
        return torch.rand(shape, dtype=dtype, generator=ft.key_generator(key))

    tree = {"w": torch.zeros(3, 2, dtype=torch.float64), "m": torch.zeros(2, device="meta")}
    out = tu.tree_random_like(ft.random_key(0), tree, uniform)
    # the key stays a CPU functrain key; the result is moved to the leaf's device
    assert calls == [("cpu", (2,), torch.float32), ("cpu", (3, 2), torch.float64)]
    assert out["m"].device.type == "meta" and out["w"].device.type == "cpu"
    assert ((out["w"] >= 0) & (out["w"] < 1)).all()

    seen = []

    def with_device(key, shape, dtype, device=None):
        seen.append(torch.device(device))
        return torch.zeros(shape, dtype=dtype, device=device)

    out = tu.tree_random_like(ft.random_key(0), tree, with_device)
    assert seen == [torch.device("meta"), torch.device("cpu")]
    # the default sampler also draws directly on the leaf's device
    assert tu.tree_random_like(0, tree)["m"].device.type == "meta"

    # integer samplers work for integer targets (the dtype is the leaf's)
    def rademacher(key, shape, dtype):
        bits = torch.randint(0, 2, shape, generator=ft.key_generator(key))
        return (2 * bits - 1).to(dtype)

    signs = tu.tree_random_like(3, {"s": torch.zeros(100, dtype=torch.int32)}, rademacher)["s"]
    assert signs.dtype == torch.int32 and set(signs.tolist()) == {-1, 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_leaves_draw_the_cpu_values_on_cuda():
    tree = {"w": torch.zeros(1000, dtype=torch.float64)}
    cpu = tu.tree_random_like(ft.random_key(0), tree)["w"]
    cuda = tu.tree_random_like(ft.random_key(0), {"w": tree["w"].cuda()})["w"]
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_naming_the_leaf():
    with pytest.raises(TypeError, match=r"target_tree\['a'\] must be a tensor, got float"):
        tu.tree_random_like(0, {"a": 1.0})
    with pytest.raises(ValueError, match=r"shape \(1,\) for target_tree\['a'\] of shape \(2,\)"):
        tu.tree_random_like(0, {"a": torch.zeros(2)}, lambda k, s, d: torch.zeros(1))
    with pytest.raises(TypeError, match="dtype must be a floating"):
        tu.tree_random_like(0, {"a": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(TypeError, match="rng_key must be a functrain key"):
        tu.tree_split_key_like(1.5, {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="must be a 0-d tensor"):
        tu.tree_split_key_like(torch.zeros(2, dtype=torch.int64), {"a": torch.zeros(2)})


def test_unwrap_random_key_data_is_the_identity_on_leaves():
    key = ft.random_key(0)
    state = {"key": key, "w": torch.ones(2), "n": None, "t": (ft.split_key(key, 2), 3)}
    out = tu.tree_unwrap_random_key_data(state)
    assert ft.tree.structure(out) == ft.tree.structure(state)
    assert out is not state  # new containers, as optax's tree.map
    assert out["key"] is key and out["t"][0] is state["t"][0] and out["t"][1] == 3
    assert torch.equal(out["key"], key)


def test_signatures_are_optax_s():
    sig = inspect.signature(tu.tree_random_like)
    assert list(sig.parameters) == ["rng_key", "target_tree", "sampler", "dtype"]
    assert sig.parameters["dtype"].default is None
    assert list(inspect.signature(tu.tree_split_key_like).parameters) == ["rng_key", "target_tree"]
    assert list(inspect.signature(tu.tree_unwrap_random_key_data).parameters) == ["input_tree"]
