r"""Gradient noise scale, gradient diversity and micro-batch agreement, from accumulation.

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

``B_simple`` is the ratio of exponential moving averages of the two unbiased estimates (a ratio
of noisy estimates is biased, so the averages come first), kept in a :class:`NoiseScaleState`.
Nothing here reads a tensor on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain._precision import HALF as _LOW_PRECISION
from functrain.grads.stats import GradMoments
from functrain.optim import _utils

__all__ = [
    "NoiseScaleEstimate",
    "NoiseScaleState",
    "gradient_diversity",
    "gradient_diversity_from_moments",
    "noise_scale_estimate",
    "noise_scale_from_moments",
    "noise_scale_hook",
    "noise_scale_init",
    "noise_scale_metrics",
    "noise_scale_update",
    "simple_noise_scale",
]

PyTree = Any
Numbers = Sequence[float | int | torch.Tensor] | torch.Tensor


def _sq_norm_vmappable(grad: PyTree) -> torch.Tensor:
    # Foreach kernels have no vmap batching rule; per-leaf vector norms do. Half-precision
    # leaves are reduced in float32: tr(Σ) is a difference of nearly equal squared norms, and
    # bfloat16's 8-bit mantissa would leave percent-level errors in it.
    sq = [
        torch.linalg.vector_norm(
            x, dtype=torch.float32 if x.dtype in _LOW_PRECISION else None
        ).square()
        for x in tree.leaves(grad)
    ]
    return torch.stack(sq).sum() if len(sq) > 1 else sq[0]


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
        dimension, in the dtype the arithmetic promotes to (not widened: pass float32 norms).
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
    sq = _stack_sq_norms(sq_norms)
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
        A tensor shaped like ``sq_norms`` without its last dimension, in the promoted dtype of
        the inputs. NaN when all gradients are zero (``0/0``).

    Example:
        >>> import torch, functrain as ft
        >>> ft.gradient_diversity([torch.tensor(1.0), torch.tensor(1.0)], torch.tensor(2.0))
        tensor(1.)
    """
    sq = _stack_sq_norms(sq_norms)
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


class NoiseScaleState(NamedTuple):
    """Moving averages behind ``B_simple``.

    Attributes:
        count: number of estimates folded in (int32; non-finite ones are left out).
        trace_sigma: exponential moving average of ``tr(Σ)`` estimates (zero-initialised, not
            bias-corrected).
        grad_sq: exponential moving average of ``|G|²`` estimates (same).

    Example:
        >>> import functrain as ft
        >>> ft.noise_scale_init().trace_sigma
        tensor(0.)
    """

    count: torch.Tensor
    trace_sigma: torch.Tensor
    grad_sq: torch.Tensor


def noise_scale_init(
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> NoiseScaleState:
    """A fresh :class:`NoiseScaleState` (zeros) on ``device``.

    Args:
        device: device of the state; ``None`` for PyTorch's default device.
        dtype: dtype of the two moving averages (``count`` is always int32).

    Returns:
        A :class:`NoiseScaleState` of 0-d zero tensors.

    Example:
        >>> import functrain as ft
        >>> ft.noise_scale_init().count
        tensor(0, dtype=torch.int32)
    """
    zero = torch.zeros((), dtype=dtype, device=device)
    return NoiseScaleState(torch.zeros((), dtype=torch.int32, device=device), zero, zero.clone())


def _check_decay(decay: Any) -> None:
    """Refuses a decay outside ``[0, 1)`` or not one number, before it turns averages NaN.

    ``decay = 1`` never moves the averages off zero (``B_simple = 0/0``, bias correction
    ``0/0``); outside ``[0, 1)`` the average is not one. A tensor's value is not read (that
    would be a host sync in a step); only its shape is checked.
    """
    if isinstance(decay, torch.Tensor):
        if decay.dim() != 0 or not decay.is_floating_point():
            raise ValueError(
                f"decay must be a 0-d floating tensor, got shape {tuple(decay.shape)} "
                f"and dtype {decay.dtype}"
            )
    elif isinstance(decay, bool) or not isinstance(decay, int | float):
        raise TypeError(f"decay must be a float in [0, 1) or a 0-d tensor, got {decay!r}")
    elif not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")


def noise_scale_update(
    state: NoiseScaleState, estimate: NoiseScaleEstimate, decay: float | torch.Tensor = 0.99
) -> NoiseScaleState:
    """Folds one step's estimates into the moving averages: ``ema ← decay·ema + (1−decay)·x``.

    A step whose estimates are not both finite (a NaN or inf gradient, e.g. under
    ``make_train_step(..., nonfinite="ignore")``) is left out: the averages and ``count`` stay
    as they were, so one bad step does not turn the averages NaN for good. The choice is made
    on the device (``torch.where``), without a host read.

    Args:
        state: the current averages (not modified).
        estimate: this step's estimates (0-d), cast to the state's dtype.
        decay: moving-average decay, a float in ``[0, 1)`` or a 0-d floating tensor.

    Returns:
        A new :class:`NoiseScaleState` (``count`` saturates rather than wrapping).

    Raises:
        TypeError: ``decay`` is not a number or tensor (or is a bool).
        ValueError: a Python ``decay`` outside ``[0, 1)``, or a tensor one that is not 0-d
            floating.

    Example:
        >>> import torch, functrain as ft
        >>> est = ft.NoiseScaleEstimate(torch.tensor(8.0), torch.tensor(2.0))
        >>> state = ft.noise_scale_update(ft.noise_scale_init(), est, decay=0.9)
        >>> ft.simple_noise_scale(state)
        tensor(4.)
    """
    _check_decay(decay)
    dtype, device = state.trace_sigma.dtype, state.trace_sigma.device
    s = torch.as_tensor(estimate.trace_sigma).to(dtype)
    g = torch.as_tensor(estimate.grad_sq).to(dtype)
    weight = (1 - decay).to(device, dtype) if isinstance(decay, torch.Tensor) else 1 - decay
    finite = torch.isfinite(s) & torch.isfinite(g)
    return NoiseScaleState(
        # The count is the bias correction's exponent: it counts only the folded estimates.
        torch.where(finite, _utils.safe_increment(state.count), state.count),
        torch.where(finite, torch.lerp(state.trace_sigma, s, weight), state.trace_sigma),
        torch.where(finite, torch.lerp(state.grad_sq, g, weight), state.grad_sq),
    )


def simple_noise_scale(state: NoiseScaleState) -> torch.Tensor:
    """``B_simple = EMA[tr(Σ)] / EMA[|G|²]`` (McCandlish et al. 2018).

    Both averages share the bias-correction factor ``1 − decayᵗ``, so it cancels in the ratio.
    Before the first update the ratio is NaN (``0/0``), and so it stays while every gradient is
    exactly zero; while ``EMA[|G|²] ≤ 0`` (noise dominates) it is negative or infinite: read it
    once the averages have settled. Equal micro-batch gradients (no noise) give 0.

    Args:
        state: the moving averages.

    Returns:
        A 0-d tensor in the state's dtype.

    Example:
        >>> import torch, functrain as ft
        >>> state = ft.NoiseScaleState(torch.tensor(3), torch.tensor(6.0), torch.tensor(2.0))
        >>> ft.simple_noise_scale(state)
        tensor(3.)
    """
    return state.trace_sigma / state.grad_sq


def noise_scale_metrics(
    state: NoiseScaleState,
    estimate: NoiseScaleEstimate,
    decay: float | torch.Tensor = 0.99,
    prefix: str = "noise_scale/",
) -> tuple[NoiseScaleState, dict[str, torch.Tensor]]:
    """Updates the state and returns metrics for a train step (all tensors, no host reads).

    Metrics: ``{prefix}b_simple`` (ratio of averages), ``{prefix}trace_sigma`` and
    ``{prefix}grad_sq`` (bias-corrected moving averages). All three are NaN until a finite
    estimate has been folded in (``count = 0``: the correction ``1 − decay⁰`` is 0).

    Args:
        state: the current averages (not modified).
        estimate: this step's estimates (:func:`noise_scale_estimate`).
        decay: moving-average decay, as in :func:`noise_scale_update` (same errors).
        prefix: metric-name prefix.

    Returns:
        ``(new_state, metrics)``: the updated :class:`NoiseScaleState` and a dict of the three
        metrics above, 0-d tensors in the state's dtype.

    Example:
        >>> import torch, functrain as ft
        >>> est = ft.noise_scale_estimate([torch.tensor(2.0), torch.tensor(1.0)], [1, 1], 1.0)
        >>> state, metrics = ft.noise_scale_metrics(ft.noise_scale_init(), est)
        >>> sorted(metrics)
        ['noise_scale/b_simple', 'noise_scale/grad_sq', 'noise_scale/trace_sigma']
    """
    new = noise_scale_update(state, estimate, decay)
    count = new.count.to(new.trace_sigma.dtype)
    if isinstance(decay, torch.Tensor):
        correction = 1 - torch.pow(decay.to(count), count)
    else:  # a Python base: torch.pow(Number, Tensor) needs no host-to-device copy
        correction = 1 - torch.pow(decay, count)
    metrics = {
        f"{prefix}b_simple": simple_noise_scale(new),
        f"{prefix}trace_sigma": new.trace_sigma / correction,
        f"{prefix}grad_sq": new.grad_sq / correction,
    }
    return new, metrics


def noise_scale_hook(
    decay: float | torch.Tensor = 0.99,
    prefix: str = "noise_scale/",
    name: str = "noise_scale",
    cosine: bool = False,
) -> Any:
    """A ``GradStatsHook`` for ``make_train_step``: noise scale and diversity from accumulation.

    With ``micro_batches=K ≥ 2`` the step hands each micro-batch's mean gradient ``ĝᵢ`` to the
    hook, which keeps only ``‖ĝᵢ‖²``; at the end of the step it computes the unbiased ``tr(Σ)``
    and ``|G|²`` (:func:`noise_scale_estimate`, unequal sizes allowed), updates a
    :class:`NoiseScaleState` kept in ``state.extra[name]`` and reports, with no host sync:
    ``{prefix}b_simple``, ``{prefix}trace_sigma``, ``{prefix}grad_sq`` (bias-corrected moving
    averages, see :func:`noise_scale_metrics`) and ``{prefix}gradient_diversity`` (this step's,
    of the micro-batch sum gradients). The cost is one squared norm per micro-batch and one of
    the combined gradient. Under ``nonfinite="ignore"`` a step with a NaN or inf gradient
    leaves the averages as they were (:func:`noise_scale_update`); its diversity is NaN. A
    ``LossSum`` micro-batch that counts no token is left out of the step's estimates (with
    fewer than two others left they are NaN, and the averages are kept as they were).

    With a ``LossSum`` loss the sizes ``bᵢ`` are the micro-batches' counts (e.g. tokens), so
    ``tr(Σ)`` is per counted unit and ``b_simple`` is in those units (tokens, not sequences).
    The estimator takes ``Cov(ĝᵢ) = Σ/bᵢ``: with sequences of equal token counts ``L`` that
    holds with ``Σ = L·Σ_seq``, and ``b_simple`` is ``L`` times the noise scale in sequences;
    with very unequal lengths it is an approximation.

    With ``cosine=True`` it also reports ``{prefix}mean_cosine``, this step's mean pairwise
    cosine between the micro-batch gradients (near 1: they agree, the gradient is mostly
    signal; near 0: mostly noise), from a running sum of unit gradients (see
    :mod:`functrain.grads.cosine`): one parameter-sized float32-or-wider buffer for the step and
    one pass over it per micro-batch. Micro-batches with a zero gradient (a ``LossSum`` one
    that counts no token) are left out of the pairs; with fewer than two left it is NaN.

    Args:
        decay: moving-average decay for ``B_simple``, in ``[0, 1)``.
        prefix: metric-name prefix.
        name: key of the state in ``state.extra``.
        cosine: also report the mean pairwise cosine between micro-batch gradients.

    Returns:
        A ``GradStatsHook`` for ``make_train_step(grad_stats=...)``; its state is a
        :class:`NoiseScaleState` in at least float32, on the parameters' device.

    Raises:
        TypeError: ``decay`` is not a number or 0-d tensor (checked here, not in the step).
        ValueError: ``decay`` outside ``[0, 1)``; from the step, ``micro_batches`` below 2.

    Example:
        >>> import torch, functrain as ft
        >>> step = ft.make_train_step(lambda p, b: ((p["w"] - b) ** 2).mean(), ft.sgd(0.1),
        ...                           micro_batches=2, grad_stats=ft.noise_scale_hook())
        >>> state = ft.TrainState.create(params={"w": torch.zeros(())}, tx=ft.sgd(0.1))
        >>> _, metrics = step(state, torch.tensor([1.0, 3.0, 2.0, 4.0]))
        >>> # ĝ₁ = -4, ĝ₂ = -6, ĝ = -5: tr(Σ) = 2·16 + 2·36 − 4·25 = 4, |G|² = 25 − 4/4 = 24
        >>> [round(float(metrics[f"noise_scale/{k}"]), 4) for k in ("trace_sigma", "b_simple")]
        [4.0, 0.1667]
    """
    from functrain.train.gradient import GradStatsHook  # functrain.train may import grads

    _check_decay(decay)

    def init(params: PyTree) -> NoiseScaleState:
        # At least float32: a bfloat16 moving average with decay 0.99 drops most increments.
        dtype = torch.promote_types(_utils.float_dtype(tree.leaves(params)), torch.float32)
        return noise_scale_init(_utils.default_device(params), dtype)

    def per_micro_batch(grad: PyTree, size: torch.Tensor) -> dict[str, torch.Tensor]:
        del size
        return {"sq_norm": _sq_norm_vmappable(grad)}

    def update(
        stats: Any, grads: PyTree, state: NoiseScaleState
    ) -> tuple[dict[str, torch.Tensor], NoiseScaleState]:
        sq = stats.values["sq_norm"]
        if sq.shape[-1] < 2:
            raise ValueError(
                "noise_scale_hook needs make_train_step(..., micro_batches=K) with K >= 2"
            )
        combined = _sq_norm_vmappable(grads).to(sq.dtype)
        estimate = noise_scale_estimate(sq, stats.sizes, combined)
        new_state, metrics = noise_scale_metrics(state, estimate, decay, prefix)
        metrics[f"{prefix}gradient_diversity"] = gradient_diversity(sq, combined, stats.sizes)
        if cosine:
            metrics[f"{prefix}mean_cosine"] = _mean_cosine_of_nonzero(stats.accumulated)
        return metrics, new_state

    if not cosine:
        return GradStatsHook(init=init, per_micro_batch=per_micro_batch, update=update, name=name)
    from functrain.grads import cosine as cos  # cosine imports this module

    return GradStatsHook(
        init=init,
        per_micro_batch=per_micro_batch,
        update=update,
        name=name,
        accumulator_init=cos.cosine_accumulator_init,
        accumulate=lambda acc, grad, size: cos.cosine_accumulator_add(acc, grad),
    )


def _mean_cosine_of_nonzero(acc: Any) -> torch.Tensor:
    """The mean pairwise cosine over the ``n`` non-zero gradients of a ``CosineAccumulator``:
    ``(‖Σuᵢ‖² − n) / (n(n − 1))``, ``n`` a tensor (no host read); NaN for ``n < 2``."""
    n = acc.unit_sq_sum
    value = (tree.norm(acc.unit_sum, squared=True).to(n.dtype) - n) / (n * (n - 1))
    # With one unit gradient ‖u‖² is 1 only to rounding: the formula gives ±inf, not NaN.
    return torch.where(n >= 2, value, torch.nan)
