r"""Per-step noise estimates: unbiased ``tr(Σ)`` and ``|G|²``, and gradient diversity.

A step that accumulates ``K ≥ 2`` micro-batches already holds ``K`` gradient estimates. From
their squared norms alone (no stored gradients) we estimate, without bias and for unequal
micro-batch sizes, the squared norm of the true gradient ``|G|²`` and the trace of the
per-example gradient covariance ``tr(Σ)``, and from these the *simple noise scale*
``B_simple = tr(Σ) / |G|²`` of McCandlish et al. 2018 ("An empirical model of large-batch
training"): the batch size beyond which larger batches stop paying off.

Derivation (unequal sizes). Micro-batch ``i`` has ``bᵢ`` examples and mean gradient
``ĝᵢ = G + εᵢ`` with independent ``εᵢ``, ``E[εᵢ] = 0`` and ``Cov(εᵢ) = Σ/bᵢ``. The step gradient is
``ĝ = Σᵢ bᵢĝᵢ / B`` with ``B = Σᵢ bᵢ``, so ``Cov(ĝ) = Σᵢ bᵢ² (Σ/bᵢ) / B² = Σ/B``. Hence
``E‖ĝᵢ‖² = |G|² + tr(Σ)/bᵢ`` and ``E‖ĝ‖² = |G|² + tr(Σ)/B``, and::

    E[Σᵢ bᵢ‖ĝᵢ‖² − B‖ĝ‖²] = B|G|² + K·tr(Σ) − B|G|² − tr(Σ) = (K − 1)·tr(Σ)

so ``S = (Σᵢ bᵢ‖ĝᵢ‖² − B‖ĝ‖²) / (K − 1)`` is unbiased for ``tr(Σ)``, and
``|G|²_est = ‖ĝ‖² − S/B`` is unbiased for ``|G|²`` (``E = |G|² + tr(Σ)/B − tr(Σ)/B``). Both hold
for any sizes; the numerator equals ``Σᵢ bᵢ‖ĝᵢ − ĝ‖² ≥ 0``. With two micro-batches this is
McCandlish et al.'s two-batch-size estimator (their Appendix A).

These are one step's estimates; the moving averages behind ``B_simple`` (and the
``make_train_step`` hook) are in :mod:`functrain.grads.noise_scale`, which re-exports
everything here. Nothing here reads a tensor on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain._precision import HALF as _LOW_PRECISION
from functrain._precision import widen
from functrain._sq_norms import sum_sq_norms
from functrain.grads.stats import GradMoments

__all__ = [
    "NoiseScaleEstimate",
    "gradient_diversity",
    "gradient_diversity_from_moments",
    "noise_scale_estimate",
    "noise_scale_from_moments",
]

PyTree = Any
Numbers = Sequence[float | int | torch.Tensor] | torch.Tensor


def _sq_norm_vmappable(grad: PyTree) -> torch.Tensor:
    # Half-precision leaves are reduced in float32: tr(Σ) is a difference of nearly equal
    # squared norms, and bfloat16's 8-bit mantissa would leave percent-level errors in it.
    leaves = tree.leaves(grad)
    if len(leaves) > 1 and _plain_leaves(leaves):
        # One foreach call instead of two Python-dispatched ops per leaf (a step's hook pays
        # this per micro-batch); the same norms, squared and summed as below.
        wide = torch.float32 if leaves[0].dtype in _LOW_PRECISION else None
        return sum_sq_norms(leaves, wide)
    # Foreach kernels have no vmap batching rule; per-leaf vector norms do.
    sq = [
        torch.linalg.vector_norm(
            x, dtype=torch.float32 if x.dtype in _LOW_PRECISION else None
        ).square()
        for x in leaves
    ]
    return torch.stack(sq).sum() if len(sq) > 1 else sq[0]


def _plain_leaves(leaves: list[Any]) -> bool:
    """Eager, unbatched tensors of one dtype and device: what ``torch._foreach_norm`` takes."""
    if torch.compiler.is_compiling():
        return False
    first = leaves[0]
    return all(
        type(x) is torch.Tensor
        and x.dtype == first.dtype
        and x.device == first.device
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        for x in leaves
    )


def _sum_wide(grad: PyTree) -> torch.Tensor:
    """Sum of all elements, half-precision leaves accumulated (and returned) in float32."""
    sums = [
        x.sum(dtype=torch.float32 if x.dtype in _LOW_PRECISION else None) for x in tree.leaves(grad)
    ]
    return torch.stack(sums).sum() if len(sums) > 1 else sums[0]


class NoiseScaleEstimate(NamedTuple):
    """Unbiased estimates from one step.

    Attributes:
        trace_sigma: ``tr(Σ)``, the total variance of a single example's gradient.
        grad_sq: ``|G|²``, the squared norm of the expected gradient (may be negative when the
            gradient is small compared with the noise; it is unbiased, not clamped).

    Example:
        >>> import torch, functrain as ft
        >>> est = ft.NoiseScaleEstimate(trace_sigma=torch.tensor(8.0), grad_sq=torch.tensor(2.0))
        >>> est.trace_sigma / est.grad_sq  # the instantaneous B_simple
        tensor(4.)
    """

    trace_sigma: torch.Tensor
    grad_sq: torch.Tensor


def _stack_sq_norms(values: Numbers) -> torch.Tensor:
    """``K`` squared norms as a tensor with last dimension ``K``."""
    if isinstance(values, torch.Tensor):
        out = values
    else:
        values = list(values)
        if not values:
            raise ValueError("sq_norms is empty")
        if all(isinstance(v, torch.Tensor) for v in values):
            out = torch.stack(values, dim=-1)
        else:  # Python numbers (tests, notebooks): a CPU tensor
            out = torch.tensor([float(v) for v in values])
    if out.dim() == 0:
        raise ValueError("sq_norms must hold K values (a list, or a tensor with last dim K)")
    return out if out.is_floating_point() else out.to(torch.get_default_dtype())


def _weighted_sums(
    sizes: Numbers, sq: torch.Tensor, power: int
) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | int]:
    """``(Σᵢ bᵢ^power · sqᵢ, Σᵢ bᵢ, #{i: bᵢ > 0})`` over the last dimension.

    A micro-batch of size 0 (a ``LossSum`` micro-batch without a counted token) holds no
    example: its mean gradient is ``0/0`` and its ``sqᵢ`` NaN, so it is left out (``0·NaN``
    would be NaN) rather than weighted by zero. Python-number sizes stay Python numbers:
    building a device tensor from host values would copy and synchronize on CUDA.
    """
    k = sq.shape[-1]
    if isinstance(sizes, torch.Tensor):
        b = sizes.to(device=sq.device, dtype=sq.dtype)
        if b.shape[-1:] != (k,):
            raise ValueError(f"sizes has shape {tuple(b.shape)}; its last dim must be K={k}")
        present = b > 0
        return torch.where(present, b**power * sq, 0.0).sum(-1), b.sum(-1), present.sum(-1)
    sizes = list(sizes)
    if len(sizes) != k:
        raise ValueError(f"got {len(sizes)} sizes for K={k} squared norms")
    weighted: Any = 0.0
    total: Any = 0
    count: Any = 0
    for i, b in enumerate(sizes):
        term = sq[..., i] * b**power
        present: Any = 1
        if isinstance(b, torch.Tensor):  # decided on the device, without a host read
            term = torch.where(b > 0, term, 0.0)
            present = (b > 0).to(torch.int64)
        elif b == 0:  # a Python 0: nothing to add
            continue
        elif b < 0:
            raise ValueError(f"sizes must be >= 0, got {sizes}")
        weighted, total, count = weighted + term, total + b, count + present
    if not isinstance(weighted, torch.Tensor):  # every size a Python 0
        weighted = torch.zeros_like(sq[..., 0])
    return weighted, total, count


def noise_scale_estimate(
    sq_norms: Numbers, sizes: Numbers, combined_sq_norm: torch.Tensor | float
) -> NoiseScaleEstimate:
    """Unbiased ``tr(Σ)`` and ``|G|²`` from ``K ≥ 2`` micro-batch mean gradients.

    ``tr(Σ) ≈ (Σᵢ bᵢ‖ĝᵢ‖² − B‖ĝ‖²)/(K − 1)`` and ``|G|² ≈ ‖ĝ‖² − tr(Σ)/B``, unbiased for any sizes
    (derivation in the module docstring).

    Args:
        sq_norms: ``‖ĝᵢ‖²`` of each micro-batch's *mean* gradient: a list of ``K`` 0-d tensors as
            they come, or a tensor whose last dimension is ``K`` (leading dimensions broadcast).
        sizes: ``bᵢ``, examples (or loss weights, e.g. tokens) per micro-batch: ``K`` numbers or
            tensors, or a tensor with last dimension ``K``. A micro-batch of size 0 (a
            ``LossSum`` micro-batch of padding only) holds no example and is left out, its
            ``‖ĝᵢ‖²`` (NaN: ``0/0``) included; ``K`` then counts the others. With fewer than
            two non-empty micro-batches the estimates are NaN.
        combined_sq_norm: ``‖ĝ‖²`` of the step gradient ``ĝ = Σᵢ bᵢĝᵢ / B``.

    Returns:
        A :class:`NoiseScaleEstimate` of tensors shaped like ``sq_norms`` without its last
        dimension, in at least float32: half-precision inputs are widened before the
        arithmetic (float64 inputs stay float64).
        ``grad_sq`` is not clamped and can be negative; equal ``ĝᵢ`` give ``trace_sigma`` 0.

    Raises:
        ValueError: ``sq_norms`` empty or 0-d, ``K < 2``, ``sizes`` not of length ``K``, or a
            negative Python size (tensor sizes are not read).

    Example:
        >>> import torch, functrain as ft
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> g = (2 * g1 + 2 * g2) / 4
        >>> est = ft.noise_scale_estimate([g1 @ g1, g2 @ g2], [2, 2], g @ g)
        >>> est.trace_sigma, est.grad_sq
        (tensor(2.), tensor(0.))
    """
    # Reduced in at least float32, like noise_scale_from_moments: tr(Σ) is a difference of
    # nearly equal numbers that bfloat16's 8-bit mantissa would round away.
    sq = widen(_stack_sq_norms(sq_norms))
    if isinstance(combined_sq_norm, torch.Tensor):
        combined_sq_norm = widen(combined_sq_norm)
    k = sq.shape[-1]
    if k < 2:
        raise ValueError(f"noise_scale_estimate needs K >= 2 micro-batches, got K={k}")
    weighted, total, present = _weighted_sums(sizes, sq, 1)
    # K counts the micro-batches that hold examples: an empty one adds nothing to either sum.
    trace_sigma = (weighted - total * combined_sq_norm) / (present - 1)
    if not isinstance(trace_sigma, torch.Tensor):
        trace_sigma = torch.as_tensor(trace_sigma, dtype=sq.dtype)
    return NoiseScaleEstimate(trace_sigma, combined_sq_norm - trace_sigma / total)


def noise_scale_from_moments(m: GradMoments) -> NoiseScaleEstimate:
    """``tr(Σ)`` and ``|G|²`` from per-sample gradient moments (each example a micro-batch of 1).

    ``tr(Σ) = Σ_p m2_p / (n − 1)`` (the summed unbiased variances) and
    ``|G|² = ‖mean‖² − tr(Σ)/n``: :func:`noise_scale_estimate` with ``K = n``, ``bᵢ = 1``.

    Half-precision moments are reduced in float32 and the estimates stay float32: ``|G|²`` is a
    difference of nearly equal numbers that bfloat16 would round away.

    Args:
        m: moments of ``n`` per-sample gradients (:func:`grad_moments`).

    Returns:
        A :class:`NoiseScaleEstimate` of 0-d tensors (float32 for half-precision moments, else
        the moments' dtype). Zero gradients give ``trace_sigma = grad_sq = 0``.

    Raises:
        ValueError: fewer than 2 examples.

    Example:
        >>> import torch, functrain as ft
        >>> m = ft.grad_moments({"w": torch.tensor([[1.0, 0.0], [0.0, 1.0]])})
        >>> ft.noise_scale_from_moments(m)
        NoiseScaleEstimate(trace_sigma=tensor(1.), grad_sq=tensor(0.))
    """
    if m.count < 2:
        raise ValueError(f"noise_scale_from_moments needs at least 2 examples, got {m.count}")
    trace_sigma = _sum_wide(m.m2) / (m.count - 1)
    return NoiseScaleEstimate(trace_sigma, _sq_norm_vmappable(m.mean) - trace_sigma / m.count)


def gradient_diversity(
    sq_norms: Numbers, combined_sq_norm: torch.Tensor | float, sizes: Numbers | None = None
) -> torch.Tensor:
    """Gradient diversity (Yin et al. 2018): ``Σᵢ‖gᵢ‖² / ‖Σᵢ gᵢ‖²``.

    Large when the gradients point in different directions (more parallelism pays off), ``1/K``
    at the minimum when they are all equal.

    Args:
        sq_norms: ``‖gᵢ‖²`` of ``K`` gradients (list of 0-d tensors or a tensor, last dim ``K``).
        combined_sq_norm: without ``sizes``, ``‖Σᵢ gᵢ‖²``. With ``sizes``, the ``sq_norms`` are of
            micro-batch *mean* gradients ``ĝᵢ`` and this is ``‖ĝ‖²`` of ``ĝ = Σ bᵢĝᵢ / B``; the
            diversity is then that of the micro-batch sum gradients ``bᵢĝᵢ``:
            ``Σ bᵢ²‖ĝᵢ‖² / (B²‖ĝ‖²)``.
        sizes: micro-batch sizes ``bᵢ``, or ``None``. Empty micro-batches (size 0) add nothing.

    Returns:
        A tensor shaped like ``sq_norms`` without its last dimension, in at least float32:
        half-precision inputs are widened before the arithmetic (float64 inputs stay float64).
        NaN when all gradients are zero (``0/0``).

    Example:
        >>> import torch, functrain as ft
        >>> ft.gradient_diversity([torch.tensor(1.0), torch.tensor(1.0)], torch.tensor(2.0))
        tensor(1.)
    """
    # Widened like noise_scale_estimate: K float16 squared norms of 300 sum past 65504, and
    # with sizes each is multiplied by bᵢ² and the denominator by B² before any division.
    sq = widen(_stack_sq_norms(sq_norms))
    if isinstance(combined_sq_norm, torch.Tensor):
        combined_sq_norm = widen(combined_sq_norm)
    if sizes is None:
        return sq.sum(-1) / combined_sq_norm
    weighted, total, _ = _weighted_sums(sizes, sq, 2)
    return weighted / (total * total * combined_sq_norm)


def gradient_diversity_from_moments(m: GradMoments) -> torch.Tensor:
    """Gradient diversity of the per-sample gradients: ``Σᵢ‖gᵢ‖² / ‖Σᵢ gᵢ‖²`` from moments.

    Half-precision moments are reduced in float32 (the result is float32).

    Args:
        m: moments of ``n`` per-sample gradients (:func:`grad_moments`).

    Returns:
        A 0-d tensor, ``(Σ m2 + n‖mean‖²) / (n²‖mean‖²)``: 1 for a single example, NaN for
        zero gradients or ``n = 0`` (``0/0``).

    Example:
        >>> import torch, functrain as ft
        >>> ft.gradient_diversity_from_moments(ft.grad_moments([torch.tensor([[1.0, 0.0], [0.0, 1.0]])]))
        tensor(1.)
    """
    mean_sq = _sq_norm_vmappable(m.mean)
    # Σᵢ‖gᵢ‖² = Σ m2 + n‖mean‖², summed wide (sum_of_squares() would round per element).
    return (_sum_wide(m.m2) + m.count * mean_sq) / (m.count**2 * mean_sq)
