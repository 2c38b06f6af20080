"""Half precision in one place: which dtypes are narrow, and how sums and moments widen them.

float16 overflows at 65504 and bfloat16 keeps 8 bits of mantissa, so norms, sums over
micro-batches or chunks, moments and Gram matrices of such tensors are accumulated in float32
and rounded once, as PyTorch's fused kernels do.
"""

from __future__ import annotations

import torch

HALF = frozenset({torch.float16, torch.bfloat16})


def widen(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 if it is float16 or bfloat16, else ``x`` itself."""
    return x.float() if x.dtype in HALF else x


def widen_all(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`widen` of each tensor; ``xs`` itself (the same list) when none is half precision."""
    if not any(x.dtype in HALF for x in xs):  # a generator: dynamo cannot trace attrgetter
        return xs
    return [widen(x) for x in xs]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of ``dtype`` values are kept in: at least float32."""
    return torch.promote_types(dtype, torch.float32)
