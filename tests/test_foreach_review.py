"""Review of ``functrain._foreach``: each fallback (the per-leaf loop used under functorch
transforms) must give the foreach kernel's dtypes and numbers, the kernel being the reference.

The fallback is forced on plain tensors by making ``_transforms_active`` answer True.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from functrain import _foreach

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_foreach, "_transforms_active", lambda: True)


def _leaves(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = [(torch.randn(s, generator=gen) * 3) for s in [(3,), (2, 2), (0,), ()]]
    return [t.to(dtype) if dtype.is_floating_point else t.round().to(dtype) for t in out]


def _same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["add", "sub", "mul", "div", "add_", "mul_", "div_"]),
    dtype=st.sampled_from(DTYPES),
    scalar=st.sampled_from(
        [2.5, 2, torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.5), torch.tensor(2)]
    ),
    seed=st.integers(0, 2**16),
)
def test_scalar_fallback_matches_kernel(name: str, dtype: torch.dtype, scalar: Any, seed: int):
    """Old code: a 0-d ``float64`` tensor scalar promoted 0-d ``float32`` leaves to ``float64``
    and integer leaves to ``float64`` (the kernel reads it as a number: ``float32``)."""
    fn = getattr(_foreach, name)
    try:
        want_leaves = _leaves(dtype, seed)
        want = fn(want_leaves, scalar)
    except RuntimeError:
        return  # e.g. 2.5 into an int leaf in place: the other test checks the refusal
    old = _foreach._transforms_active
    _foreach._transforms_active = lambda: True
    try:
        got_leaves = _leaves(dtype, seed)
        got = fn(got_leaves, scalar)
    finally:
        _foreach._transforms_active = old
    _same(got_leaves if got is None else got, want_leaves if want is None else want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lerp_zero_d_weight_keeps_dtype(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    start, end = _leaves(dtype, 0), _leaves(dtype, 1)
    weight = torch.tensor(0.3, dtype=torch.float64)
    want = list(torch._foreach_lerp(start, end, weight))
    monkeypatch.setattr(_foreach, "_transforms_active", lambda: True)
    _same(_foreach.lerp(start, end, weight), want)


def test_add_under_vmap_keeps_leaf_dtype() -> None:
    """Under a real ``vmap`` a leaf is logically 0-d: ``float32`` + a ``float64`` number-like
    0-d tensor must stay ``float32``, as outside ``vmap`` (old code: ``float64``)."""
    s = torch.tensor(0.3, dtype=torch.float64)
    x = torch.arange(3.0)
    got = torch.func.vmap(lambda t: _foreach.add([t], s)[0])(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch._foreach_add([x], 0.3)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["add_", "mul_", "div_", "sqrt_"])
def test_in_place_refuses_truncation(forced: None, name: str) -> None:
    """Old code silently truncated 2.5 into integer leaves; the kernel refuses."""
    x = [torch.arange(4)]
    args = () if name == "sqrt_" else (2.5,)
    with pytest.raises(RuntimeError, match="can't be cast"):
        getattr(torch, f"_foreach_{name}")([torch.arange(4)], *args)
    with pytest.raises(RuntimeError, match="can't be cast"):
        getattr(_foreach, name)(x, *args)
    assert torch.equal(x[0], torch.arange(4))


def test_copy_still_converts(forced: None) -> None:
    x = [torch.zeros(3, dtype=torch.int64)]
    _foreach.copy_(x, [torch.tensor([1.7, -2.2, 3.0])])
    assert torch.equal(x[0], torch.tensor([1, -2, 3]))


def test_in_place_aliased_leaf_gets_every_update(forced: None) -> None:
    """A tensor listed twice (tied weights) gets both updates, as from the kernel's loop
    (old code: computed both from the old value, so only one)."""
    t = torch.zeros(2)
    _foreach.add_([t, t], 1.0)
    torch.testing.assert_close(t, torch.full((2,), 2.0), rtol=0, atol=0)
    a, b = torch.ones(2), torch.full((2,), 2.0)
    _foreach.addcmul_([a, b], [b, a], [b, a], 1.0)
    # a = 1 + 2*2 = 5, then b = 2 + 5*5 = 27: each leaf written before the next is read.
    torch.testing.assert_close(a, torch.full((2,), 5.0), rtol=0, atol=0)
    torch.testing.assert_close(b, torch.full((2,), 27.0), rtol=0, atol=0)
