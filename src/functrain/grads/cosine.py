"""Micro-batch agreement: the mean pairwise cosine between gradients, from a running sum.

``mean cos(gᵢ, gⱼ) = (‖Σᵢ uᵢ‖² − Σᵢ ‖uᵢ‖²) / (K(K − 1))`` with ``uᵢ = gᵢ/‖gᵢ‖``: one
parameter-sized buffer instead of ``K`` stored gradients (see :mod:`functrain.grads.noise_scale`
for the noise scale and diversity of the same micro-batches).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain._precision import HALF as _LOW_PRECISION
from functrain.grads.noise_scale import _sq_norm_vmappable
from functrain.optim import _utils

__all__ = [
    "CosineAccumulator",
    "cosine_accumulator_add",
    "cosine_accumulator_init",
    "mean_pairwise_cosine",
]

PyTree = Any


class CosineAccumulator(NamedTuple):
    """Running sum of normalized gradients, for the mean pairwise cosine.

    Attributes:
        unit_sum: ``Σᵢ gᵢ/‖gᵢ‖`` (a pytree like the gradients, half-precision leaves kept in
            float32; zero gradients add nothing).
        unit_sq_sum: ``Σᵢ ‖gᵢ/‖gᵢ‖‖²``: the number of non-zero gradients, as a tensor.
        count: ``K``, gradients added so far (a Python int: the loop is static).

    Example:
        >>> import torch, functrain as ft
        >>> acc = ft.cosine_accumulator_add(ft.cosine_accumulator_init([torch.zeros(2)]), [torch.ones(2)])
        >>> acc.count, acc.unit_sq_sum
        (1, tensor(1.))
    """

    unit_sum: PyTree
    unit_sq_sum: torch.Tensor
    count: int


def cosine_accumulator_init(params: PyTree) -> CosineAccumulator:
    """An empty :class:`CosineAccumulator` shaped like ``params``.

    Args:
        params: pytree of tensors whose shapes, devices and dtypes the gradients will have.

    Returns:
        A :class:`CosineAccumulator` with zero ``unit_sum`` (half-precision leaves as float32),
        a 0-d zero ``unit_sq_sum`` in at least float32 and ``count`` 0.

    Example:
        >>> import torch, functrain as ft
        >>> ft.cosine_accumulator_init({"w": torch.zeros(2)}).count
        0
    """
    # At least float32: a float16 squared norm under- or overflows for ordinary gradients
    # (below about 2.4e-4 or above 256 in norm), and half-precision unit vectors would cost the
    # cosine its third digit.
    dtype = torch.promote_types(_utils.float_dtype(tree.leaves(params)), torch.float32)
    return CosineAccumulator(
        tree.map(lambda p: torch.zeros_like(p, dtype=_wide(p.dtype, dtype)), params),
        torch.zeros((), dtype=dtype, device=_utils.default_device(params)),
        0,
    )


def _wide(leaf_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The accumulator dtype of a leaf: half precision widened to ``dtype``, others kept."""
    return dtype if leaf_dtype in _LOW_PRECISION else leaf_dtype


def cosine_accumulator_add(
    acc: CosineAccumulator, grad: PyTree, sq_norm: torch.Tensor | None = None
) -> CosineAccumulator:
    """Adds ``grad/‖grad‖`` to the running sum (one parameter-sized buffer, no list of grads).

    Args:
        acc: the accumulator.
        grad: a gradient pytree (e.g. one micro-batch's mean gradient).
        sq_norm: ``‖grad‖²`` when already computed (e.g. for :func:`noise_scale_estimate`).

    Returns:
        A new :class:`CosineAccumulator` (``acc`` and ``grad`` are not modified) with ``count``
        one higher. A zero gradient adds nothing to the sums; a non-finite one, or one whose
        ``‖grad‖²`` overflows, makes ``unit_sum`` NaN.

    Example:
        >>> import torch, functrain as ft
        >>> acc = ft.cosine_accumulator_init([torch.zeros(2)])
        >>> acc = ft.cosine_accumulator_add(acc, [torch.tensor([3.0, 4.0])])
        >>> acc.unit_sum
        [tensor([0.6000, 0.8000])]
    """
    a_leaves, spec, g_leaves, divisor, unit_sq = _unit_terms(acc, grad, sq_norm)
    new_sum = _foreach.add(a_leaves, _foreach.div(g_leaves, divisor))
    return CosineAccumulator(tree.unflatten(spec, new_sum), unit_sq, acc.count + 1)


def _add_in_place(acc: CosineAccumulator, grad: PyTree) -> CosineAccumulator:
    """:func:`cosine_accumulator_add` writing into ``acc.unit_sum``, for an accumulator that
    its caller made and alone holds (the train step's, made afresh every step): no
    parameter-sized temporaries (``addcdiv_`` divides as it adds, bit for bit the same sum)."""
    a_leaves, spec, g_leaves, divisor, unit_sq = _unit_terms(acc, grad, None)
    a_leaves = _add_units_in_place(a_leaves, g_leaves, divisor)
    return CosineAccumulator(tree.unflatten(spec, a_leaves), unit_sq, acc.count + 1)


def _add_units_in_place(
    a_leaves: list[torch.Tensor], g_leaves: list[torch.Tensor], divisor: torch.Tensor
) -> list[torch.Tensor]:
    """``a + g / divisor`` for each pair, written into ``a`` where its dtype allows."""
    g_leaves = [g.to(a.dtype) for a, g in zip(a_leaves, g_leaves)]
    # A 0-d leaf promotes with the 0-d divisor in the pure form (a float32 leaf beside a float64
    # ‖g‖² of mixed-precision params becomes float64); memory cannot change dtype in place, so
    # such leaves take the pure form's ops. Leaves with dimensions keep their dtype either way.
    wide = [
        a.dim() == 0 and torch.promote_types(a.dtype, divisor.dtype) != a.dtype for a in a_leaves
    ]
    narrow = [i for i, w in enumerate(wide) if not w]
    if narrow:
        _foreach.addcdiv_(
            [a_leaves[i] for i in narrow], [g_leaves[i] for i in narrow], [divisor] * len(narrow)
        )
    if len(narrow) < len(a_leaves):
        a_leaves = [
            torch.add(a, torch.div(g, divisor)) if w else a
            for a, g, w in zip(a_leaves, g_leaves, wide)
        ]
    return a_leaves


def _unit_terms(
    acc: CosineAccumulator, grad: PyTree, sq_norm: torch.Tensor | None
) -> tuple[list[torch.Tensor], Any, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(sum leaves, their spec, gradient leaves, ‖g‖ or its stand-in, new unit_sq_sum)``."""
    a_leaves, spec, other = _utils.flat(acc.unit_sum, {"grad": grad})
    # Half-precision gradients are widened to the accumulator's dtype before scaling.
    g_leaves = [g.to(a.dtype) for a, g in zip(a_leaves, other["grad"])]
    if sq_norm is None:
        sq_norm = _sq_norm_vmappable(grad)
    divisor, unit_sq = _unit_divisor(sq_norm, acc.unit_sq_sum)
    return a_leaves, spec, g_leaves, divisor, unit_sq


def _unit_divisor(
    sq_norm: torch.Tensor, unit_sq_sum: torch.Tensor, counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖g‖ or its stand-in, unit_sq_sum plus one for a non-zero g)`` from ``‖g‖²``.

    ``counts`` False (a 0-d bool) makes ``g`` count as zero whatever its norm: the train step's
    backward loop takes the norm of a positive multiple of the micro-batch's mean gradient,
    and that multiple is 0 for a ``LossSum`` micro-batch that counts no unit."""
    sq_norm = sq_norm.to(torch.promote_types(sq_norm.dtype, unit_sq_sum.dtype))
    # Divide by ‖g‖ (rsqrt of a clamped ‖g‖² made the unit vectors of gradients below 1e-19,
    # whose float32 squares are subnormal, far too short). An overflowed ‖g‖² (‖g‖ > 1.8e19 in
    # float32) leaves no direction: NaN, where rsqrt(inf) = 0 counted a zero vector as a unit
    # one. A zero gradient divides by inf and adds nothing. Both norms cost one pass: a scaled,
    # overflow-free norm took two more passes and a leaf-sized temporary per leaf (30x slower).
    norm = torch.where(torch.isinf(sq_norm), torch.nan, sq_norm.sqrt())
    if counts is not None:
        norm = torch.where(counts, norm, 0.0)
    unit_sq = unit_sq_sum + (norm > 0).to(unit_sq_sum.dtype)
    return torch.where(norm == 0, torch.inf, norm), unit_sq


def mean_pairwise_cosine(acc: CosineAccumulator) -> torch.Tensor:
    """Mean of ``cos(gᵢ, gⱼ)`` over pairs ``i ≠ j``: ``(‖Σuᵢ‖² − Σ‖uᵢ‖²) / (K(K − 1))``.

    Near 1 when micro-batches agree (the gradient is mostly signal), near 0 when their
    gradients are mostly noise. Needs ``K ≥ 2``. A zero gradient counts in ``K`` with cosine 0
    to every other gradient (the hook's ``mean_cosine`` leaves zero gradients out instead); a
    non-finite gradient, or a ``‖g‖²`` that overflowed (float32 gradients of norm above 1.8e19),
    makes the result NaN. Float32 gradients of norm below 1e-19 lose precision (their squares
    are subnormal) and below about 4e-23 count as zero.

    Args:
        acc: the accumulator after ``K`` calls of :func:`cosine_accumulator_add`.

    Returns:
        A 0-d tensor in the accumulator's dtype (at least float32).

    Raises:
        ValueError: ``K < 2``.

    Example:
        >>> import torch, functrain as ft
        >>> acc = ft.cosine_accumulator_init([torch.zeros(2)])
        >>> acc = ft.cosine_accumulator_add(acc, [torch.tensor([1.0, 0.0])])
        >>> acc = ft.cosine_accumulator_add(acc, [torch.tensor([1.0, 1.0])])
        >>> ft.mean_pairwise_cosine(acc)
        tensor(0.7071)
    """
    k = acc.count
    if k < 2:
        raise ValueError(f"mean_pairwise_cosine needs at least 2 gradients, got {k}")
    return (tree.norm(acc.unit_sum, squared=True) - acc.unit_sq_sum) / (k * (k - 1))
