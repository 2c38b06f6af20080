"""``ft.projections``: optax's Euclidean projections, against float64 references written here.

References: the simplex projection by an O(n²) search over support sizes (the KKT conditions:
``p = max(x − τ, 0)`` with ``τ`` such that ``sum(p) = scale``), the l1 ball through it, the l2
ball and the hyperplanes by their closed forms, boxes by ``numpy.clip``. Properties
(hypothesis): the result is feasible, projecting twice changes nothing, and it is the closest
feasible point: ``⟨x − P(x), y − P(x)⟩ ≤ 0`` for every feasible ``y``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft
from functrain import projections as P


def ref_simplex(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The projection onto {p ≥ 0, sum p = scale}: the support size k whose threshold keeps
    exactly the k largest entries positive (the KKT conditions), searched over every k."""
    flat = np.asarray(x, np.float64).reshape(-1)
    u = np.sort(flat)[::-1]
    for k in range(1, flat.size + 1):
        tau = (u[:k].sum() - scale) / k
        if u[k - 1] - tau > 0 and (k == flat.size or u[k] - tau <= 0):
            return np.maximum(flat - tau, 0.0).reshape(np.shape(x))
    raise AssertionError("no support size satisfies the KKT conditions")


def ref_l1_ball(x: np.ndarray, scale: float) -> np.ndarray:
    if np.abs(x).sum() <= scale:
        return x
    return np.sign(x) * ref_simplex(np.abs(x), scale)


def ref_l2_ball(x: np.ndarray, scale: float) -> np.ndarray:
    n = math.sqrt((x**2).sum())
    return x if n <= scale else x * scale / n


def _tree(seed: int, dtype: torch.dtype = torch.float64, spread: float = 1.0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": spread * torch.randn(4, 3, generator=gen, dtype=torch.float64).to(dtype),
        "b": [spread * torch.randn(5, generator=gen, dtype=torch.float64).to(dtype)],
        "s": spread * torch.randn((), generator=gen, dtype=torch.float64).to(dtype),
    }


def _vec(t: Any) -> np.ndarray:
    return np.concatenate([x.double().reshape(-1).numpy() for x in ft.tree.leaves(t)])


def _close(a: Any, b: np.ndarray, tol: float = 1e-12) -> None:
    np.testing.assert_allclose(_vec(a), b, rtol=tol, atol=tol)


# ------------------------------------------------------------------ references, whole trees


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale", [1.0, 0.3, 7.5])
def test_simplex_is_the_kkt_point_of_the_whole_tree(seed, scale):
    x = _tree(seed, spread=2.0)
    out = P.projection_simplex(x, scale)
    _close(out, ref_simplex(_vec(x), scale))
    assert ft.tree.structure(out) == ft.tree.structure(x)
    torch.testing.assert_close(ft.tree.sum(out), torch.tensor(scale, dtype=torch.float64))


def test_simplex_tensor_scale_and_ties():
    x = torch.tensor([0.5, 0.5, 0.5, -1.0], dtype=torch.float64)  # ties at the threshold
    _close(P.projection_simplex(x, torch.tensor(1.2, dtype=torch.float64)), ref_simplex(x, 1.2))
    _close(P.projection_simplex(x), [1 / 3, 1 / 3, 1 / 3, 0.0])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [0.5, 2.0, 1e3])
def test_l1_ball_and_sphere(seed, scale):
    x = _tree(seed, spread=1.5)
    v = _vec(x)
    _close(P.projection_l1_ball(x, scale), ref_l1_ball(v, scale))
    sphere = np.sign(v) * ref_simplex(np.abs(v), scale)
    _close(P.projection_l1_sphere(x, scale), sphere)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [0.5, 2.0, 1e3])
def test_l2_ball_and_sphere(seed, scale):
    x = _tree(seed)
    v = _vec(x)
    _close(P.projection_l2_ball(x, scale), ref_l2_ball(v, scale))
    _close(P.projection_l2_sphere(x, scale), v * scale / np.linalg.norm(v))


def test_boxes_and_linf_ball():
    x, lo = _tree(0, spread=2.0), _tree(1)
    hi = ft.tree.map(lambda t: t + 0.5, lo)
    _close(P.projection_box(x, lo, hi), np.clip(_vec(x), _vec(lo), _vec(hi)))
    _close(P.projection_box(x, -0.4, 0.6), np.clip(_vec(x), -0.4, 0.6))
    _close(P.projection_hypercube(x), np.clip(_vec(x), 0.0, 1.0))
    _close(P.projection_hypercube(x, torch.tensor(0.25)), np.clip(_vec(x), 0.0, 0.25))
    _close(P.projection_linf_ball(x, 0.7), np.clip(_vec(x), -0.7, 0.7))
    _close(P.projection_non_negative(x), np.maximum(_vec(x), 0.0))
    # lower > upper: upper wins, as jnp.clip
    _close(P.projection_box(torch.tensor([5.0, -5.0]), 1.0, 0.0), np.array([0.0, 0.0]))


@pytest.mark.parametrize("b", [-3.0, 0.0, 40.0])
def test_vector_hyperplane_halfspace(b):
    x, a = _tree(2), _tree(3)
    xv, av = _vec(x), _vec(a)
    _close(P.projection_vector(x, a), (xv @ av) / (av @ av) * av)
    plane = xv + (b - xv @ av) / (av @ av) * av
    _close(P.projection_hyperplane(x, a, b), plane)
    _close(P.projection_halfspace(x, a, b), xv if xv @ av <= b else plane)


# ------------------------------------------------------------------ properties

FINITE = st.floats(-50, 50, allow_nan=False, width=64)
VECS = st.lists(FINITE, min_size=1, max_size=12).map(lambda v: torch.tensor(v, dtype=torch.float64))


def _feasible_points(proj_name: str, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ys = []
    for _ in range(5):
        z = 3 * torch.randn(n, generator=gen, dtype=torch.float64)
        ys.append(getattr(P, proj_name)(z, *ARGS[proj_name]))
    return ys


A = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64)
ARGS = {
    "projection_simplex": (2.0,),
    "projection_l1_ball": (1.5,),
    "projection_l2_ball": (1.5,),
    "projection_linf_ball": (0.5,),
    "projection_non_negative": (),
    "projection_hypercube": (0.8,),
}


def _feasible(name: str, p: torch.Tensor) -> bool:
    tol = 1e-9
    if name == "projection_simplex":
        return bool((p >= -tol).all()) and abs(float(p.sum()) - 2.0) < tol * max(1, p.numel())
    if name == "projection_l1_ball":
        return float(p.abs().sum()) <= 1.5 + tol
    if name == "projection_l2_ball":
        return float(p.norm()) <= 1.5 + tol
    if name == "projection_linf_ball":
        return float(p.abs().max()) <= 0.5
    if name == "projection_hypercube":
        return bool(((p >= 0) & (p <= 0.8)).all())
    return bool((p >= 0).all())


@pytest.mark.parametrize("name", sorted(ARGS))
@given(x=VECS, seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_projection_properties(name, x, seed):
    proj = getattr(P, name)
    p = proj(x, *ARGS[name])
    assert _feasible(name, p)
    torch.testing.assert_close(proj(p, *ARGS[name]), p, rtol=1e-12, atol=1e-10)
    scale = 1.0 + float(x.abs().max())
    for y in _feasible_points(name, x.numel(), seed):
        assert float((x - p) @ (y - p)) <= 1e-9 * scale**2


@given(x=VECS, b=FINITE, seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_halfspace_properties(x, b, seed):
    a = A[: x.numel()] + 0.1
    p = P.projection_halfspace(x, a, b)
    scale = 1.0 + float(x.abs().max()) + abs(b)
    assert float(a @ p) <= b + 1e-9 * scale
    torch.testing.assert_close(P.projection_halfspace(p, a, b), p, rtol=1e-12, atol=1e-9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        y = P.projection_halfspace(3 * torch.randn(x.numel(), generator=gen, dtype=x.dtype), a, b)
        assert float((x - p) @ (y - p)) <= 1e-9 * scale**2
    # the hyperplane projection lies on the plane, and x − P(x) is normal to it
    q = P.projection_hyperplane(x, a, b)
    assert abs(float(a @ q) - b) <= 1e-9 * scale * float(a.abs().sum())


# ------------------------------------------------------------------ contract


ALL = [
    (P.projection_non_negative, ()),
    (P.projection_box, (-0.5, 0.5)),
    (P.projection_hypercube, ()),
    (P.projection_linf_ball, (0.5,)),
    (P.projection_simplex, (2.0,)),
    (P.projection_l1_sphere, (1.0,)),
    (P.projection_l1_ball, (1.0,)),
    (P.projection_l2_sphere, (1.0,)),
    (P.projection_l2_ball, (1.0,)),
]
PAIRED = [
    (P.projection_vector, ()),
    (P.projection_hyperplane, (0.5,)),
    (P.projection_halfspace, (-0.5,)),
]


def _call(fn: Any, args: tuple, x: Any, a: Any) -> Any:
    return fn(x, a, *args) if (fn, args) in PAIRED else fn(x, *args)


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host read of a tensor: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("fn", "args"), ALL + PAIRED, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pure_dtypes_none_leaves_and_no_host_reads(fn, args, dtype):
    x = {**_tree(0, dtype), "masked": None}
    a = {**_tree(1, dtype), "masked": None}
    before = ft.tree.map(torch.clone, x)
    with _NoHostReads():
        out = _call(fn, args, x, a)
    assert out["masked"] is None
    ft.testing.assert_trees_all_equal(x, before)  # inputs untouched, bit for bit
    for got, leaf in zip(ft.tree.leaves(out), ft.tree.leaves(x)):
        assert got.dtype == dtype and got.shape == leaf.shape
    # float32 agrees with the float64 result to float32 rounding
    x64, a64 = ft.tree.cast(x, torch.float64), ft.tree.cast(a, torch.float64)
    np.testing.assert_allclose(_vec(out), _vec(_call(fn, args, x64, a64)), atol=1e-5)


def test_bfloat16_leaves_are_computed_in_float32():
    x = _tree(4, torch.bfloat16, spread=2.0)
    out = P.projection_simplex(x)
    assert all(t.dtype == torch.bfloat16 for t in ft.tree.leaves(out))
    expected = ref_simplex(_vec(x))  # the bf16 inputs, projected exactly
    np.testing.assert_allclose(_vec(out), expected, atol=4e-3)
    out = P.projection_l2_ball(x, 1.0)
    assert abs(float(ft.tree.norm(ft.tree.cast(out, torch.float64))) - 1.0) < 1e-2


@pytest.mark.parametrize(("fn", "args"), ALL, ids=lambda v: getattr(v, "__name__", ""))
def test_vmap_projects_each_member(fn, args):
    xb = {"w": 2 * torch.randn(3, 4, 2, dtype=torch.float64), "b": torch.randn(3, 5).double()}
    got = torch.func.vmap(lambda t: fn(t, *args))(xb)
    for i in range(3):
        member = fn({k: v[i] for k, v in xb.items()}, *args)
        for k in xb:
            torch.testing.assert_close(got[k][i], member[k], rtol=1e-12, atol=1e-12)


def test_vmap_with_batched_scale():
    x = torch.randn(4, 6, dtype=torch.float64)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    got = torch.func.vmap(P.projection_simplex)(x, scales)
    for i in range(4):
        np.testing.assert_allclose(got[i].numpy(), ref_simplex(x[i].numpy(), float(scales[i])))


@pytest.mark.parametrize(("fn", "args"), ALL + PAIRED, ids=lambda v: getattr(v, "__name__", ""))
def test_compiles_fullgraph(fn, args):
    torch._dynamo.reset()
    x, a = _tree(5), _tree(6)
    compiled = torch.compile(lambda x, a: _call(fn, args, x, a), fullgraph=True, backend="eager")
    got = compiled(x, a)
    np.testing.assert_allclose(_vec(got), _vec(_call(fn, args, x, a)), rtol=1e-12, atol=1e-12)


def test_simplex_compiles_with_inductor():
    torch._dynamo.reset()
    fn = torch.compile(P.projection_simplex, fullgraph=True)
    x = _tree(7)
    _close(fn(x, 1.5), ref_simplex(_vec(x), 1.5))


def test_empty_tree_and_single_element():
    assert P.projection_simplex({}) == {}
    assert P.projection_l2_ball([]) == []
    assert P.projection_l1_ball({"a": None}) == {"a": None}
    _close(P.projection_simplex(torch.tensor([-4.0], dtype=torch.float64), 2.0), [2.0])


def test_zero_input_follows_optax():
    z = torch.zeros(3)
    assert torch.equal(P.projection_l1_sphere(z), z)  # sign(0) = 0, as optax
    assert torch.isnan(P.projection_l2_sphere(z)).all()  # 0/0, as optax
    assert torch.equal(P.projection_l2_ball(z), z)
    assert torch.equal(P.projection_l1_ball(z), z)


@pytest.mark.parametrize(
    "fn", [P.projection_simplex, P.projection_l1_ball, P.projection_l1_sphere, P.projection_l2_ball]
)
@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf")])
def test_bad_scale_raises(fn, scale):
    with pytest.raises(ValueError, match="scale"):
        fn(torch.ones(2), scale)


def test_bad_inputs_name_the_leaf():
    with pytest.raises(ValueError, match="scale"):
        P.projection_linf_ball(torch.ones(2), -0.1)
    with pytest.raises(ValueError, match="scale"):
        P.projection_l2_sphere(torch.ones(2), -1)
    with pytest.raises(TypeError, match="scale"):
        P.projection_simplex(torch.ones(2), "1")
    with pytest.raises(TypeError, match=r"tree\['b'\]"):
        P.projection_simplex({"a": torch.ones(2), "b": torch.arange(3)})
    with pytest.raises(TypeError, match=r"tree\['b'\]"):
        P.projection_l2_ball({"a": torch.ones(2), "b": 0.5})
    with pytest.raises(TypeError, match="tensor"):
        P.projection_l1_ball({"a": torch.ones(2, dtype=torch.complex64)})
