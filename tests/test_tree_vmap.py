"""``ft.tree`` functions under ``torch.func.vmap`` equal a Python loop over the batch.

The ``torch._foreach_*`` kernels behind the arithmetic and the 1- and inf-norms have no batching
rule ("Batching rule not implemented for aten::_foreach_add.List"); functrain falls back to
per-leaf ops while a functorch transform is active (:mod:`functrain._foreach`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import _foreach

B = 3  # ensemble members


def _batch(seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two trees with a leading batch dimension, float64, some leaves 0-d per member."""
    gen = torch.Generator().manual_seed(seed)

    def tree() -> dict[str, Any]:
        return {
            "w": torch.randn(B, 4, 3, generator=gen, dtype=torch.float64),
            "b": [torch.randn(B, 5, generator=gen, dtype=torch.float64) + 3.0],
            "s": torch.randn(B, generator=gen, dtype=torch.float64),
        }

    return tree(), tree()


def _member(t: Any, i: int) -> Any:
    return ft.tree.map(lambda x: x[i], t)


def _check(fn: Callable[..., Any], *trees: Any) -> None:
    """``vmap(fn)(*trees)`` equals ``fn`` applied to each member, stacked."""
    got = torch.func.vmap(fn)(*trees)
    per = [fn(*(_member(t, i) for t in trees)) for i in range(B)]
    want = ft.tree.map(lambda *xs: torch.stack(xs), *per)
    assert ft.tree.structure(got) == ft.tree.structure(want)
    for g, w in zip(ft.tree.leaves(got), ft.tree.leaves(want)):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# fmt: off
BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": ft.tree.add,
    "add3": lambda a, b: ft.tree.add(a, b, a),
    "sub": ft.tree.sub,
    "mul": ft.tree.mul,
    "div": ft.tree.div,
    "add_scale": lambda a, b: ft.tree.add_scale(a, 0.25, b),
    "add_scale_tensor": lambda a, b: ft.tree.add_scale(a, ft.tree.sum(b), b),
    "vdot": ft.tree.vdot,
    "where_tree": lambda a, b: ft.tree.where(ft.tree.map(lambda x: x > 0, a), a, b),
    "where_scalar": lambda a, b: ft.tree.where(ft.tree.sum(a) > 0, a, b),
}
UNARY: dict[str, Callable[[Any], Any]] = {
    "scale": lambda a: ft.tree.scale(-1.5, a),
    "scale_tensor": lambda a: ft.tree.scale(ft.tree.max(a), a),
    "norm1": lambda a: ft.tree.norm(a, ord=1),
    "norm2": lambda a: ft.tree.norm(a),
    "norm2_squared": lambda a: ft.tree.norm(a, squared=True),
    "norm_inf": lambda a: ft.tree.norm(a, ord=float("inf")),
    "sum": ft.tree.sum,
    "max": ft.tree.max,
    "clip": lambda a: ft.tree.clip(a, -0.5, 0.75),
    "zeros_like": lambda a: ft.tree.add(a, ft.tree.zeros_like(a)),
    "ones_like": lambda a: ft.tree.mul(a, ft.tree.ones_like(a)),
    "full_like": lambda a: ft.tree.sub(a, ft.tree.full_like(a, 2.0)),
    "cast": lambda a: ft.tree.scale(2.0, ft.tree.cast(a, torch.float32)),
}
# fmt: on


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_under_vmap(name: str) -> None:
    _check(BINARY[name], *_batch(0))


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_under_vmap(name: str) -> None:
    _check(UNARY[name], _batch(1)[0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), factor=st.floats(-1e3, 1e3, allow_nan=False))
def test_arithmetic_chain_under_vmap(seed: int, factor: float) -> None:
    """A composition as an ensemble user writes it: a scaled difference and its norms."""

    def fn(a: Any, b: Any) -> Any:
        d = ft.tree.add_scale(ft.tree.sub(a, b), factor, ft.tree.mul(a, b))
        return ft.tree.norm(d, ord=1), ft.tree.norm(d, ord=float("inf")), ft.tree.div(d, b)

    _check(fn, *_batch(seed))


def test_grad_through_tree_ops() -> None:
    """``torch.func.grad`` over tree arithmetic and norms matches autograd's eager gradient."""
    a, b = (_member(t, 0) for t in _batch(2))

    def loss(x: Any) -> torch.Tensor:
        d = ft.tree.add_scale(ft.tree.mul(x, b), 0.5, ft.tree.div(x, b))
        return ft.tree.norm(d, ord=1) + ft.tree.norm(ft.tree.sub(d, x), ord=float("inf"))

    got = torch.func.grad(loss)(a)
    leaves = [x.clone().requires_grad_() for x in ft.tree.leaves(a)]
    loss(ft.tree.unflatten(ft.tree.structure(a), leaves)).backward()
    for g, x in zip(ft.tree.leaves(got), leaves):
        torch.testing.assert_close(g, x.grad, rtol=1e-12, atol=1e-12)


def test_eager_path_calls_the_foreach_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside transforms the fused kernels run, never the per-leaf fallback."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fallback used outside a functorch transform")

    monkeypatch.setattr(_foreach, "_loop", boom)
    a, b = (_member(t, 0) for t in _batch(3))
    ft.tree.add(a, b)
    ft.tree.add_scale(a, 2.0, b)
    ft.tree.norm(a, ord=1)
    ft.tree.norm(a, ord=float("inf"))


def test_compile_does_not_take_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fallback used while compiling")

    monkeypatch.setattr(_foreach, "_loop", boom)
    torch._dynamo.reset()
    fn = torch.compile(
        lambda a, b: ft.tree.norm(ft.tree.add_scale(a, 0.5, b), ord=1),
        backend="eager",
        fullgraph=True,
    )
    a, b = (_member(t, 0) for t in _batch(4))
    want = ft.tree.norm(ft.tree.add_scale(a, 0.5, b), ord=1)
    torch.testing.assert_close(fn(a, b), want, rtol=1e-12, atol=0)
