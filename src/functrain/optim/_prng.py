"""A counter-based, pure pseudo-random generator on integer tensors (no global RNG state).

A *key* is a 0-d int64 tensor holding a 32-bit value. ``split`` derives the next key and a
sampling key; ``normal_like`` turns a key into standard-normal noise shaped like a tensor by
hashing (key, element index) with a keyed 32-bit integer mix (Wellons' *lowbias32*) and a
Box–Muller transform. Everything is ordinary tensor arithmetic, so it is reproducible from the
key alone, identical on every device (up to the last bit of ``log``/``cos``), free of host syncs
and traceable by ``torch.compile``. It is meant for optimizer noise, not for cryptography.

Because element ``j`` of a draw depends only on (key, stream, ``j``), a *piece* of a tensor (a
sharded optimizer's block of rows, :mod:`functrain.distributed.zero`) can draw exactly its
slice of the whole tensor's noise: pass its :class:`Positions`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor | int, c: int) -> torch.Tensor | int:
    # (x * c) mod 2**32 for 0 <= x < 2**32, split so that no int64 product overflows.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A bijective avalanche hash of 32-bit values (works on ints and int64 tensors)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def make_key(seed: int, device: torch.device | None = None) -> torch.Tensor:
    """A key from a Python integer seed (any size; reduced to 32 bits by hashing)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    folded = 0
    value = abs(seed)
    while True:
        folded = mix32(folded ^ (value & MASK32))
        value >>= 32
        if not value:
            break
    if seed < 0:
        folded = mix32(folded ^ 0x5BD1E995)
    return torch.tensor(folded, dtype=torch.int64, device=device)


def key32(key: Any, name: str = "key") -> torch.Tensor:
    """The 32-bit key of a functrain key (a 0-d integer tensor, e.g. ``ft.random_key``) or of
    an integer seed (:func:`make_key`); errors name the argument as ``name``.

    A 64-bit key keeps its high half: folded in, not dropped, so keys that differ only there
    draw differently. ``mix32(0) == 0``: a saved 32-bit key maps to itself and resumes its
    stream. Tensor arithmetic only: nothing is read back to the host.
    """
    if isinstance(key, torch.Tensor):
        # Complex too: ``.to(int64)`` would drop the imaginary part (with only a warning).
        if (
            key.dim() != 0
            or key.dtype.is_floating_point
            or key.is_complex()
            or key.dtype == torch.bool
        ):
            raise ValueError(
                f"{name} must be an int or a 0-d integer tensor key (ft.random_key), got a "
                f"{key.dtype} tensor of shape {tuple(key.shape)}"
            )
        key = key.detach().to(torch.int64)
        return (key & MASK32) ^ mix32((key >> 32) & MASK32)
    # numbers.Integral: NumPy integers are seeds too (as for ft.random_key); bools are not.
    if isinstance(key, bool) or not isinstance(key, numbers.Integral):
        raise TypeError(
            f"{name} must be an int or a 0-d integer tensor key (ft.random_key), got {key!r}"
        )
    return make_key(int(key))


def split(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(next_key, sample_key)``, both derived from ``key``."""
    key = key & MASK32
    return mix32(key ^ 0x9E3779B9), mix32(key ^ 0x85EBCA6B)


class Positions(NamedTuple):
    """Where the elements of a piece of a tensor sit in the whole tensor (internal).

    Attributes:
        index: int64, the piece's shape: each element's flat row-major index in the whole tensor.
        numel: the whole tensor's number of elements (it decides how wide indices are hashed).

    Example:
        >>> import torch
        >>> whole = torch.arange(6).reshape(2, 3)
        >>> Positions(whole[:, 1:], 6).index
        tensor([[1, 2],
                [4, 5]])
    """

    index: torch.Tensor
    numel: int


def complex_parts(positions: Positions) -> Positions:
    """The positions of the real and imaginary parts (a trailing dimension of 2) of a complex
    piece in the whole tensor's real view (``torch.view_as_real``)."""
    parts = torch.arange(2, dtype=torch.int64, device=positions.index.device)
    return Positions(positions.index.unsqueeze(-1) * 2 + parts, positions.numel * 2)


def shard_positions(value: Any, leaves: Sequence[torch.Tensor], who: str) -> list[Positions | None]:
    """The ``shard_index`` keyword of a noise transform's ``update``, checked against ``leaves``.

    ``value`` is ``None`` (whole leaves) or, per leaf in tree order, a :class:`Positions` of the
    leaf's elements in the whole parameter or ``None`` (the leaf is whole). Shapes only are
    compared: no tensor is read.

    Raises:
        ValueError: ``value`` does not describe ``leaves`` (another number of leaves, or a
            shape that is not the leaf's, e.g. a noise transform inside ``masked``).
    """
    if value is None:
        return [None] * len(leaves)
    if not isinstance(value, (list, tuple)) or len(value) != len(leaves):
        count = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(
            f"{who}: shard_index must give the positions of each of the {len(leaves)} update "
            f"leaves (or None), got {count}; the noise transform must see the whole update tree "
            "(not inside masked or partition)"
        )
    out: list[Positions | None] = []
    for i, (pos, leaf) in enumerate(zip(value, leaves)):
        if pos is not None and (not isinstance(pos, Positions) or pos.index.shape != leaf.shape):
            got = tuple(pos.index.shape) if isinstance(pos, Positions) else type(pos).__name__
            raise ValueError(
                f"{who}: shard_index[{i}] describes a piece of shape {got}, but update leaf {i} "
                f"has shape {tuple(leaf.shape)}"
            )
        out.append(pos)
    return out


def pair_index(like: torch.Tensor, positions: Positions | None) -> tuple[int, torch.Tensor]:
    """``(n, 2 × element indices)`` of the values to draw for ``like``: all of its elements in
    order, or the ``positions`` of a shard; each value takes the two counters ``2i``, ``2i + 1``
    (the Box-Muller pair)."""
    if positions is None:
        n = like.numel()
        return n, torch.arange(n, dtype=torch.int64, device=like.device) * 2
    index = positions.index.to(device=like.device, dtype=torch.int64).reshape(-1)
    return positions.numel, index * 2


def _bits(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    # A keyed 32-bit hash of 32-bit indices: two rounds with the key injected before each.
    return mix32(mix32((index + key) & MASK32) ^ key)


def normal_like(
    key: torch.Tensor, like: torch.Tensor, stream: int = 0, positions: Positions | None = None
) -> torch.Tensor:
    """Standard-normal samples with ``like``'s shape, dtype and device, from ``key``.

    ``stream`` separates independent draws from the same key (e.g. one per pytree leaf).
    Samples are truncated at about ±6.66 (the smallest uniform is ``2⁻³²``). With
    ``positions``, ``like`` is a piece of a whole tensor and gets the whole tensor's draw at
    those positions (the same values, up to the last bit of ``log``/``cos``).
    """
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    key = mix32((key.to(like.device) & MASK32) ^ mix32(stream & MASK32))
    n, index = pair_index(like, positions)
    if 2 * n > MASK32:
        # Indices beyond 32 bits: fold the high part into the key.
        key = mix32(key ^ (index >> 32))
        index = index & MASK32
    b1 = _bits(index, key)
    b2 = _bits(index + 1, key)
    u1 = (b1.to(compute) + 1) * 2.0**-32  # in (0, 1]
    u2 = b2.to(compute) * 2.0**-32  # in [0, 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)
    return z.reshape(like.shape).to(like.dtype)
