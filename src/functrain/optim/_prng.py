"""A counter-based, pure pseudo-random generator on integer tensors (no global RNG state).

A *key* is a 0-d int64 tensor holding a 32-bit value. ``split`` derives the next key and a
sampling key; ``normal_like`` turns a key into standard-normal noise shaped like a tensor by
hashing (key, element index) with a keyed 32-bit integer mix (Wellons' *lowbias32*) and a
Box–Muller transform. Everything is ordinary tensor arithmetic, so it is reproducible from the
key alone, identical on every device (up to the last bit of ``log``/``cos``), free of host syncs
and traceable by ``torch.compile``. It is meant for optimizer noise, not for cryptography.
"""

from __future__ import annotations

import math

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


def split(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(next_key, sample_key)``, both derived from ``key``."""
    key = key & MASK32
    return mix32(key ^ 0x9E3779B9), mix32(key ^ 0x85EBCA6B)


def _bits(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    # A keyed 32-bit hash of 32-bit indices: two rounds with the key injected before each.
    return mix32(mix32((index + key) & MASK32) ^ key)


def normal_like(key: torch.Tensor, like: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """Standard-normal samples with ``like``'s shape, dtype and device, from ``key``.

    ``stream`` separates independent draws from the same key (e.g. one per pytree leaf).
    Samples are truncated at about ±6.66 (the smallest uniform is ``2⁻³²``).
    """
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    n = like.numel()
    key = mix32((key.to(like.device) & MASK32) ^ mix32(stream & MASK32))
    index = torch.arange(n, dtype=torch.int64, device=like.device) * 2
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
