"""Property tests of ``ft.tree`` against a plain-Python reference on random pytrees.

Trees mix dicts, lists, tuples, NamedTuples and ``None`` subtrees; leaves are float32 or
float64 tensors of rank 0 to 2, empty tensors included. The reference turns each leaf into a
Python list of floats and computes by hand in double precision.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import testing


class Pair(NamedTuple):
    first: Any
    second: Any


@dataclasses.dataclass(frozen=True)
class Spec:
    """A leaf placeholder in a skeleton (an optree leaf: dataclasses are not optree nodes)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


# Leaf shapes: scalars, empty tensors, vectors and small matrices.
SHAPES = st.sampled_from([(), (0,), (1,), (3,), (2, 3), (0, 2), (4, 1)])
FLOATS = st.sampled_from([torch.float32, torch.float64])


def _is_spec(x: Any) -> bool:
    return isinstance(x, Spec)


def skeletons(dtypes: st.SearchStrategy = FLOATS, min_leaves: int = 0) -> st.SearchStrategy:
    """Random tree structures whose leaves are ``Spec``s or ``None``."""
    leaf = st.one_of(st.builds(Spec, SHAPES, dtypes), st.none())
    tree = st.recursive(
        leaf,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(st.sampled_from(["w", "b", "fc", "0x"]), children, max_size=3),
            st.builds(Pair, children, children),
        ),
        max_leaves=6,
    )
    return tree.filter(lambda t: len(ft.tree.leaves(t)) >= min_leaves)


def ref_paths(t: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, leaf) pairs in optree's order, computed by hand: dict keys sorted, None empty."""
    if t is None:
        return []
    if isinstance(t, Spec):
        return [(prefix, t)]
    if isinstance(t, dict):
        return [pl for k in sorted(t) for pl in ref_paths(t[k], (*prefix, k))]
    if isinstance(t, (list, tuple)):  # NamedTuples included
        return [pl for i, x in enumerate(t) for pl in ref_paths(x, (*prefix, i))]
    return [(prefix, t)]


def rebuild(t: Any, values: list[Any]) -> Any:
    """Replaces the leaves of ``t`` (in ``ref_paths`` order) by ``values``, by hand."""
    it = iter(values)

    def go(x: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, Spec):
            return next(it)
        if isinstance(x, dict):
            return {k: go(x[k]) for k in sorted(x)}
        if isinstance(x, Pair):
            return Pair(go(x.first), go(x.second))
        if isinstance(x, (list, tuple)):
            return type(x)(go(v) for v in x)
        return next(it)

    out = go(t)
    assert next(it, None) is None
    return out


def specs(skeleton: Any) -> list[Spec]:
    return [leaf for _, leaf in ref_paths(skeleton)]


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def fill(data: st.DataObject, skeleton: Any, elements: st.SearchStrategy | None = None) -> Any:
    """Draws a tensor for every ``Spec`` of ``skeleton``."""
    if elements is None:
        elements = st.floats(-8, 8, width=32)
    leaves = []
    for s in specs(skeleton):
        vals = data.draw(st.lists(elements, min_size=numel(s.shape), max_size=numel(s.shape)))
        leaves.append(torch.tensor(vals, dtype=s.dtype).reshape(s.shape))
    return rebuild(skeleton, leaves)


def py(t: torch.Tensor) -> list[float]:
    """The plain-Python view of a leaf: its elements as a flat list of Python numbers."""
    return t.reshape(-1).tolist()


def expect(skeleton: Any, values: list[list[float]], dtypes: list[torch.dtype] | None = None):
    """A tree of tensors holding reference values (one flat list per leaf)."""
    ss = specs(skeleton)
    dtypes = dtypes or [s.dtype for s in ss]
    return rebuild(
        skeleton,
        [torch.tensor(v, dtype=d).reshape(s.shape) for s, v, d in zip(ss, values, dtypes)],
    )


def check(actual: Any, expected: Any, rtol32: float = 2e-6, atol32: float = 1e-5) -> None:
    """Same structure, shapes and dtypes; float32 leaves to float32 rounding, float64 tightly."""
    testing.assert_trees_all_equal_structs(actual, expected)
    testing.assert_trees_all_equal_dtypes(actual, expected)
    for (path, a), (_, e) in zip(ref_paths(actual), ref_paths(expected)):
        tight = a.dtype == torch.float64
        try:
            testing.assert_trees_all_close(
                a, e, rtol=1e-12 if tight else rtol32, atol=1e-12 if tight else atol32
            )
        except AssertionError as err:
            raise AssertionError(f"at {path}: {err}") from None


def leafwise(fn, *trees: Any) -> list[list[float]]:
    columns = [[py(leaf) for _, leaf in ref_paths(t)] for t in trees]
    return [[fn(*xs) for xs in zip(*leaf_vals)] for leaf_vals in zip(*columns)]


def all_values(t: Any) -> list[float]:
    return [v for _, leaf in ref_paths(t) for v in py(leaf)]


def promoted(skeleton: Any) -> torch.dtype:
    """The dtype of a reduction over a tree: float64 if any leaf is, float32 otherwise."""
    return (
        torch.float64 if any(s.dtype == torch.float64 for s in specs(skeleton)) else torch.float32
    )


NONZERO = st.one_of(st.floats(0.5, 8, width=32), st.floats(-8, -0.5, width=32))
SCALARS = st.floats(-4, 4, width=32)


# --------------------------------------------------------------------------------------------
# Element-wise arithmetic
# --------------------------------------------------------------------------------------------


@given(skeletons(), st.data())
def test_add_sub_mul(skeleton, data):
    a, b, c = fill(data, skeleton), fill(data, skeleton), fill(data, skeleton)
    check(ft.tree.add(a, b), expect(skeleton, leafwise(lambda x, y: x + y, a, b)))
    check(ft.tree.add(a, b, c), expect(skeleton, leafwise(lambda x, y, z: x + y + z, a, b, c)))
    check(ft.tree.sub(a, b), expect(skeleton, leafwise(lambda x, y: x - y, a, b)))
    check(ft.tree.mul(a, b), expect(skeleton, leafwise(lambda x, y: x * y, a, b)), atol32=1e-4)


@given(skeletons(), st.data())
def test_div(skeleton, data):
    a, b = fill(data, skeleton), fill(data, skeleton, NONZERO)
    check(ft.tree.div(a, b), expect(skeleton, leafwise(lambda x, y: x / y, a, b)))


@given(skeletons(), st.data())
def test_binary_ops_promote_mixed_dtypes(skeleton, data):
    a = fill(data, skeleton)
    b = ft.tree.cast(fill(data, skeleton), torch.float64)
    dtypes = [torch.float64] * len(specs(skeleton))
    check(ft.tree.add(a, b), expect(skeleton, leafwise(lambda x, y: x + y, a, b), dtypes))
    want = sum(x * y for x, y in zip(all_values(a), all_values(b)))
    testing.assert_trees_all_close(ft.tree.vdot(a, b), torch.tensor(want), rtol=1e-5, atol=1e-4)


@given(skeletons(), SCALARS, st.data())
def test_scale_and_add_scale(skeleton, s, data):
    a, b = fill(data, skeleton), fill(data, skeleton)
    want = expect(skeleton, leafwise(lambda x: s * x, a))
    check(ft.tree.scale(s, a), want, atol32=1e-4)
    # A float64 0-d scalar keeps each leaf's dtype (no promotion of 0-d float32 leaves).
    check(ft.tree.scale(torch.tensor(s, dtype=torch.float64), a), want, atol32=1e-4)
    want = expect(skeleton, leafwise(lambda x, y: x + s * y, a, b))
    check(ft.tree.add_scale(a, s, b), want, atol32=1e-4)
    check(ft.tree.add_scale(a, torch.tensor(s, dtype=torch.float64), b), want, atol32=1e-4)


def test_scale_by_tensor_does_not_truncate_integer_leaves():
    out = ft.tree.scale(torch.tensor(0.5), {"n": torch.arange(3)})
    testing.assert_trees_all_close(out, {"n": torch.tensor([0.0, 0.5, 1.0])})


@given(skeletons(), st.data())
def test_clip(skeleton, data):
    a = fill(data, skeleton)
    lo = data.draw(st.one_of(st.none(), st.floats(-4, 0)))
    hi = data.draw(st.one_of(st.none(), st.floats(0, 4)))

    def ref(x: float) -> float:
        x = x if lo is None else max(x, lo)
        return x if hi is None else min(x, hi)

    want = expect(skeleton, leafwise(ref, a))
    check(ft.tree.clip(a, lo, hi), want)


@given(skeletons(), st.data())
def test_where(skeleton, data):
    a, b = fill(data, skeleton), fill(data, skeleton)
    flag = data.draw(st.booleans())
    check(ft.tree.where(torch.tensor(flag), a, b), a if flag else b)
    cond = fill(
        data, rebuild(skeleton, [Spec(s.shape, torch.bool) for s in specs(skeleton)]), st.booleans()
    )
    want = expect(skeleton, leafwise(lambda c, x, y: x if c else y, cond, a, b))
    check(ft.tree.where(cond, a, b), want)


# --------------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------------


@given(skeletons(), st.data())
def test_vdot_sum_max_size(skeleton, data):
    a, b = fill(data, skeleton), fill(data, skeleton)
    xs, ys = all_values(a), all_values(b)
    dtype = promoted(skeleton)
    got = ft.tree.vdot(a, b)
    assert got.dtype == dtype and got.shape == ()
    want = torch.tensor(sum(x * y for x, y in zip(xs, ys)), dtype=torch.float64)
    testing.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-3)
    got = ft.tree.sum(a)
    assert got.dtype == dtype and got.shape == ()
    testing.assert_trees_all_close(got, torch.tensor(sum(xs), dtype=torch.float64), atol=1e-4)
    assert ft.tree.size(a) == len(xs) == sum(numel(s.shape) for s in specs(skeleton))
    if xs:
        got = ft.tree.max(a)
        assert got.dtype == dtype and got.shape == ()
        testing.assert_trees_all_close(got, torch.tensor(max(xs), dtype=dtype))
    else:
        with pytest.raises(ValueError, match="undefined"):
            ft.tree.max(a)


@given(skeletons(), st.sampled_from([1, 2, float("inf")]), st.data())
def test_norm(skeleton, ord, data):
    a = fill(data, skeleton)
    xs = all_values(a)
    if ord == 1:
        want = sum(abs(x) for x in xs)
    elif ord == 2:
        want = math.sqrt(sum(x * x for x in xs))
    else:
        want = max((abs(x) for x in xs), default=0.0)
    got = ft.tree.norm(a, ord=ord)
    assert got.shape == ()
    if specs(skeleton):
        assert got.dtype == promoted(skeleton)
    testing.assert_trees_all_close(got, torch.tensor(want, dtype=got.dtype), rtol=1e-5, atol=1e-6)
    if ord == 2:
        got = ft.tree.norm(a, squared=True)
        testing.assert_trees_all_close(
            got, torch.tensor(sum(x * x for x in xs), dtype=got.dtype), rtol=1e-5, atol=1e-5
        )


def test_norm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="squared=True needs ord=2"):
        ft.tree.norm([torch.ones(2)], ord=1, squared=True)
    with pytest.raises(ValueError, match="ord must be 1, 2 or inf"):
        ft.tree.norm([torch.ones(2)], ord=3)


@given(skeletons(), st.data())
def test_allclose(skeleton, data):
    a = fill(data, skeleton)
    # Perturbations far inside or far outside the tolerance, so float32 rounding cannot flip them.
    deltas = st.sampled_from([0.0, 1e-9, 1e-2, -0.5])
    b = ft.tree.map(lambda x: x + torch.tensor(data.draw(deltas), dtype=x.dtype), a)
    want = all(abs(x - y) <= 1e-8 + 1e-5 * abs(y) for x, y in zip(all_values(a), all_values(b)))
    assert ft.tree.allclose(a, b) is want
    assert ft.tree.allclose(a, ft.tree.cast(b, torch.float64)) is want


def test_norm_ord_none_is_the_l2_norm_as_in_optax():
    tree = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0, 12.0]])}
    assert float(ft.tree.norm(tree, ord=None)) == 13.0
    assert float(ft.tree.norm(tree, ord=None, squared=True)) == 169.0


def test_allclose_equal_nan():
    a = [torch.tensor([1.0, float("nan")])]
    assert not ft.tree.allclose(a, a)
    assert ft.tree.allclose(a, a, equal_nan=True)
    assert not ft.tree.allclose(a, [torch.tensor([float("nan"), 1.0])], equal_nan=True)


def test_allclose_structure_or_shape_mismatch_is_false():
    assert not ft.tree.allclose({"a": torch.ones(2)}, {"b": torch.ones(2)})
    assert not ft.tree.allclose([torch.ones(2)], [torch.ones(3)])
    assert not ft.tree.allclose([torch.ones(2)], [None])


# --------------------------------------------------------------------------------------------
# Constructors and casts (integer leaves included)
# --------------------------------------------------------------------------------------------

ANY_DTYPE = st.sampled_from([torch.float32, torch.float64, torch.int64, torch.int32])


@given(skeletons(ANY_DTYPE), st.sampled_from([None, torch.float64, torch.float16]), st.data())
def test_constructors(skeleton, dtype, data):
    a = fill(data, skeleton, st.integers(-5, 5))
    n = [numel(s.shape) for s in specs(skeleton)]
    dtypes = [dtype or s.dtype for s in specs(skeleton)]
    for fn, value in ((ft.tree.zeros_like, 0), (ft.tree.ones_like, 1)):
        got = fn(a, dtype=dtype)
        testing.assert_trees_all_equal(got, expect(skeleton, [[value] * k for k in n], dtypes))
    got = ft.tree.full_like(a, 3, dtype=dtype)
    testing.assert_trees_all_equal(got, expect(skeleton, [[3] * k for k in n], dtypes))


@given(skeletons(ANY_DTYPE), st.sampled_from([None, torch.float64, torch.bfloat16]), st.data())
def test_cast(skeleton, dtype, data):
    a = fill(data, skeleton, st.integers(-5, 5))  # small integers are exact in every dtype
    got = ft.tree.cast(a, dtype)
    dtypes = [
        dtype if dtype is not None and s.dtype.is_floating_point else s.dtype
        for s in specs(skeleton)
    ]
    testing.assert_trees_all_equal(
        got, expect(skeleton, [py(x) for x in ft.tree.leaves(a)], dtypes)
    )


# --------------------------------------------------------------------------------------------
# map / map_with_path / flatten / unflatten
# --------------------------------------------------------------------------------------------


@given(skeletons(), st.data())
def test_map_and_map_with_path(skeleton, data):
    a, b = fill(data, skeleton), fill(data, skeleton)
    check(ft.tree.map(lambda x: 2 * x + 1, a), expect(skeleton, leafwise(lambda x: 2 * x + 1, a)))
    check(ft.tree.map(torch.maximum, a, b), expect(skeleton, leafwise(max, a, b)))
    seen = []
    out = ft.tree.map_with_path(lambda p, x, y: seen.append(p) or x - y, a, b)
    assert seen == [p for p, _ in ref_paths(a)]
    check(out, expect(skeleton, leafwise(lambda x, y: x - y, a, b)))


def test_map_passes_none_of_rest_to_fn_like_optax():
    # A None in ``rest`` where ``tree`` has a leaf is a masked-out entry: fn receives None.
    out = ft.tree.map(
        lambda g, m: g if m is None else g * m,
        [torch.ones(1), torch.ones(1)],
        [None, torch.zeros(1)],
    )
    testing.assert_trees_all_equal(out, [torch.ones(1), torch.zeros(1)])
    with pytest.raises(ft.tree.TreeMismatchError, match=r"rest\[0\]\[0\] has no counterpart"):
        ft.tree.map(torch.add, [None, torch.ones(1)], [torch.ones(1), torch.ones(1)])


@given(skeletons(ANY_DTYPE), st.data())
def test_flatten_unflatten_roundtrip(skeleton, data):
    a = fill(data, skeleton, st.integers(-5, 5))
    leaves, spec = ft.tree.flatten(a)
    ref = ref_paths(a)
    assert [id(x) for x in leaves] == [id(x) for _, x in ref]
    assert [id(x) for x in ft.tree.leaves(a)] == [id(x) for x in leaves]
    paths, leaves2, spec2 = ft.tree.flatten_with_paths(a)
    assert paths == [p for p, _ in ref] and spec2 == spec
    assert all(x is y for x, y in zip(leaves2, leaves))
    assert ft.tree.structure(a) == spec and spec.num_leaves == len(ref)
    back = ft.tree.unflatten(spec, leaves)
    testing.assert_trees_all_equal(back, a)
    assert type(back) is type(a)
    doubled = ft.tree.unflatten(spec, [2 * x for x in leaves])
    testing.assert_trees_all_equal(doubled, ft.tree.map(lambda x: 2 * x, a))


# --------------------------------------------------------------------------------------------
# Mismatches name the path
# --------------------------------------------------------------------------------------------

BINARY = {
    "add": ft.tree.add,
    "sub": ft.tree.sub,
    "mul": ft.tree.mul,
    "div": ft.tree.div,
    "add_scale": lambda a, b: ft.tree.add_scale(a, 0.5, b),
    "vdot": ft.tree.vdot,
    "where": lambda a, b: ft.tree.where(torch.tensor(True), a, b),
    "map": lambda a, b: ft.tree.map(torch.add, a, b),
}


@given(skeletons(min_leaves=1), st.sampled_from(sorted(BINARY)), st.data())
def test_shape_mismatch_names_the_path(skeleton, name, data):
    ss = specs(skeleton)
    i = data.draw(st.integers(0, len(ss) - 1))
    path = ref_paths(skeleton)[i][0]
    wrong = [Spec((*s.shape, 2), s.dtype) if j == i else s for j, s in enumerate(ss)]
    a, b = fill(data, skeleton), fill(data, rebuild(skeleton, wrong))
    if name == "map":
        # map applies fn to the leaves, so the error is torch's broadcasting error (or none at
        # all when shapes broadcast); the structure check is covered below.
        return
    with pytest.raises(ft.tree.TreeMismatchError) as err:
        BINARY[name](a, b)
    # The message names the arguments as optax spells them (tree_x, tree_y).
    assert f"{ft.tree.path_str(path, 'tree_x')}: shape {ss[i].shape}" in str(err.value)
    assert f"{ft.tree.path_str(path, 'tree_y')} shape {wrong[i].shape}" in str(err.value)


@given(skeletons(min_leaves=1), st.sampled_from(sorted(set(BINARY) - {"map"})), st.data())
def test_none_or_missing_leaf_names_the_path(skeleton, name, data):
    ss = specs(skeleton)
    i = data.draw(st.integers(0, len(ss) - 1))
    path = ref_paths(skeleton)[i][0]
    a = fill(data, skeleton)
    b_leaves = [None if j == i else x for j, x in enumerate(ft.tree.leaves(fill(data, skeleton)))]
    b = rebuild(skeleton, b_leaves)
    for x, y in ((a, b), (b, a)):
        with pytest.raises(ft.tree.TreeMismatchError) as err:
            BINARY[name](x, y)
        msg = str(err.value)
        assert ft.tree.path_str(path, "tree_x") in msg or ft.tree.path_str(path, "tree_y") in msg


def test_structure_mismatch_messages():
    a = {"fc": {"w": torch.ones(2), "b": torch.ones(1)}}
    with pytest.raises(
        ft.tree.TreeMismatchError, match=r"tree_x\['fc'\]\['w'\] has no counterpart in tree_y"
    ):
        ft.tree.add(a, {"fc": {"v": torch.ones(2), "b": torch.ones(1)}})
    with pytest.raises(ft.tree.TreeMismatchError, match=r"tree_y\['fc'\]\['b'\] is None"):
        ft.tree.sub(a, {"fc": {"w": torch.ones(2), "b": None}})
    with pytest.raises(
        ft.tree.TreeMismatchError,
        match=r"tree_x\['fc'\]\['b'\]: shape \(1,\) does not match tree_y\['fc'\]\['b'\] shape \(3,\)",
    ):
        ft.tree.vdot(a, {"fc": {"w": torch.ones(2), "b": torch.ones(3)}})
    with pytest.raises(ft.tree.TreeMismatchError, match=r"rest\[0\]"):
        ft.tree.map(torch.add, a, {"fc": [torch.ones(2), torch.ones(1)]})


def test_none_subtrees_pass_through():
    a = {"w": torch.ones(2), "frozen": None, "pair": Pair(None, torch.ones(1))}
    out = ft.tree.add_scale(a, 2.0, a)
    assert out["frozen"] is None and out["pair"].first is None
    testing.assert_trees_all_equal(out["w"], torch.full((2,), 3.0))
    assert ft.tree.size({"only": None}) == 0
    testing.assert_trees_all_equal(ft.tree.norm({"only": None}), torch.zeros(()))


@pytest.mark.parametrize("ord", [1, 2, float("inf")])
def test_norm_of_complex_leaves_is_real(ord):
    """As ``torch.linalg.vector_norm``: the norm of complex leaves is a real number (the metrics
    of a complex model's step are norms; a complex tensor with a zero imaginary part, or an
    error for the inf-norm, is not one)."""
    tree = {"a": torch.tensor([3 + 4j, 1j]), "b": torch.tensor([-2.0, 0.5]), "c": torch.zeros(0)}
    flat = torch.cat([x.reshape(-1).to(torch.complex128) for x in ft.tree.leaves(tree)])
    want = torch.linalg.vector_norm(flat, ord)
    got = ft.tree.norm(tree, ord=ord)
    assert not got.is_complex() and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    if ord == 2:
        torch.testing.assert_close(
            ft.tree.norm(tree, squared=True).double(), want**2, rtol=1e-6, atol=0
        )
