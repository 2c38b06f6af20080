"""Review leftovers: ``optimizer_state_bytes`` counts distinct memory, ``shard_sizes`` refuses None.

The byte counts are worked out by hand, or (for random strided views) by writing through every
view into a zeroed copy of the buffer and counting the bytes that changed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import distributed as dist


def test_the_same_tensor_twice_counts_once() -> None:
    x = torch.zeros(10)
    assert dist.optimizer_state_bytes({"a": x, "b": x, "c": [x]}) == 10 * 4


def test_overlapping_views_count_the_union() -> None:
    buf = torch.zeros(10)
    # Elements 0..5 and 4..9: ten distinct floats, not twelve.
    assert dist.optimizer_state_bytes([buf[:6], buf[4:]]) == 10 * 4
    # Same start, different lengths: the longer one decides, in either order.
    assert dist.optimizer_state_bytes([buf[:4], buf[:8]]) == 8 * 4
    assert dist.optimizer_state_bytes([buf[:8], buf[:4]]) == 8 * 4
    assert dist.optimizer_state_bytes([buf, buf[2:5], buf[7:]]) == 10 * 4


def test_disjoint_views_of_one_buffer_add_up() -> None:
    buf = torch.zeros(10, dtype=torch.float64)
    assert dist.optimizer_state_bytes({"a": buf[:3], "b": buf[5:]}) == (3 + 5) * 8


def test_non_contiguous_views() -> None:
    m = torch.zeros(4, 6)
    assert dist.optimizer_state_bytes(m[:, ::2]) == 12 * 4  # the elements read, not the gaps
    assert dist.optimizer_state_bytes([m[:, ::2], m[:, 1::2]]) == 24 * 4  # interleaved halves
    assert dist.optimizer_state_bytes([m, m[:, ::2]]) == 24 * 4
    assert dist.optimizer_state_bytes([m, m.t()]) == 24 * 4
    # Rows 0-1 whole (12) and the even columns of rows 2-3 (6).
    assert dist.optimizer_state_bytes([m[:, ::2], m[:2]]) == 18 * 4


def test_expanded_and_reinterpreted_views() -> None:
    assert dist.optimizer_state_bytes(torch.zeros(3).expand(4, 3)) == 3 * 4
    buf = torch.zeros(4)  # 16 bytes; the int16 view reads bytes 4..11
    assert dist.optimizer_state_bytes([buf, buf.view(torch.int16)[2:6]]) == 16


def test_fresh_state_is_unchanged() -> None:
    # mu and nu of 100 float32 each, and the int32 count.
    assert dist.optimizer_state_bytes(ft.adam(1e-3).init({"w": torch.zeros(100)})) == 804
    assert dist.optimizer_state_bytes(ft.EmptyState()) == 0
    assert dist.optimizer_state_bytes({"a": torch.zeros(0), "b": 3}) == 0


_FILL = {torch.int32: 0x01010101, torch.int16: 0x0101, torch.int8: 1}


@st.composite
def _views(draw: st.DrawFn) -> list[tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(list(_FILL)))
        capacity = 64 * 4 // torch.empty(0, dtype=dtype).element_size()
        ndim = draw(st.integers(0, 3))
        size = tuple(draw(st.integers(0, 4)) for _ in range(ndim))
        stride = tuple(draw(st.integers(0, 9)) for _ in range(ndim))
        last = sum((n - 1) * s for n, s in zip(size, stride) if n)
        offset = draw(st.integers(0, max(0, capacity - 1 - last)))
        if offset + last < capacity:
            out.append((dtype, size, stride, offset))
    return out


@settings(max_examples=60, deadline=None)
@given(views=_views())
def test_random_strided_views_match_the_bytes_they_write(views) -> None:
    base = torch.zeros(64, dtype=torch.int32)
    leaves = [base.view(d).as_strided(size, stride, off) for d, size, stride, off in views]
    written = torch.zeros_like(base)
    for d, size, stride, off in views:
        written.view(d).as_strided(size, stride, off).fill_(_FILL[d])
    expected = int((written.view(torch.uint8) != 0).sum())
    assert dist.optimizer_state_bytes(leaves) == expected


@pytest.mark.parametrize("world_size", [0, -2, None, True, 2.0, "2"])
def test_shard_sizes_refuses_a_bad_world_size(world_size) -> None:
    # None used to be read as "the process group's size", 1 outside a job: [10].
    with pytest.raises(ValueError, match=f"world_size must be a positive int, got {world_size!r}"):
        dist.shard_sizes(10, world_size)


def test_shard_sizes_accepts_numpy_and_python_ints() -> None:
    np = pytest.importorskip("numpy")
    assert dist.shard_sizes(10, np.int32(3)) == [4, 3, 3]
    assert dist.shard_sizes(2, 4) == [1, 1, 0, 0]
