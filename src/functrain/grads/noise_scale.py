r"""Gradient noise scale, gradient diversity and micro-batch agreement, from accumulation.

A step that accumulates ``K ≥ 2`` micro-batches already holds ``K`` gradient estimates. From
their squared norms alone (no stored gradients) we estimate, without bias and for unequal
micro-batch sizes, the squared norm of the true gradient ``|G|²`` and the trace of the
per-example gradient covariance ``tr(Σ)``, and from these the *simple noise scale*
``B_simple = tr(Σ) / |G|²`` of McCandlish et al. 2018 ("An empirical model of large-batch
training"): the batch size beyond which larger batches stop paying off.

``B_simple`` is the ratio of exponential moving averages of the two unbiased estimates (a ratio
of noisy estimates is biased, so the averages come first), kept in a :class:`NoiseScaleState`.
This module holds those averages and the ``make_train_step`` hook. The per-step estimates
(:func:`noise_scale_estimate`, :func:`gradient_diversity` and their ``_from_moments`` forms,
with the derivation) live in :mod:`functrain.grads._noise_estimates` and are re-exported here.
Nothing here reads a tensor on the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import tree

# Re-exported (``X as X``) so imports of the moved private helpers from here keep working.
from functrain.grads._noise_estimates import _LOW_PRECISION as _LOW_PRECISION
from functrain.grads._noise_estimates import (
    NoiseScaleEstimate,
    _sq_norm_vmappable,
    gradient_diversity,
    gradient_diversity_from_moments,
    noise_scale_estimate,
    noise_scale_from_moments,
)
from functrain.grads._noise_estimates import Numbers as Numbers
from functrain.grads._noise_estimates import _stack_sq_norms as _stack_sq_norms
from functrain.grads._noise_estimates import _sum_wide as _sum_wide
from functrain.grads._noise_estimates import _weighted_sums as _weighted_sums
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
    the combined gradient; in the eager autograd loop the norms are taken as backward produces
    each parameter's gradient, and no micro-batch gradient is kept (see
    :attr:`~functrain.GradStatsHook.per_micro_batch_sq_norm`). Under ``nonfinite="ignore"`` a step with a NaN or inf gradient
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
    one pass over it per micro-batch. In the eager autograd loop backward still sums the
    micro-batch gradients in place; each micro-batch's gradients are held until it ends (see
    :attr:`~functrain.GradStatsHook.accumulates_unit_gradients`). Micro-batches with a zero
    gradient (a ``LossSum`` one that counts no token) are left out of the pairs; with fewer
    than two left it is NaN.

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
        diversity = gradient_diversity(sq, combined, stats.sizes)
        # A combined gradient that overflowed (a float16 sum of finite micro-batch gradients)
        # made the ratio 0; the documented value of a step with a non-finite gradient is NaN.
        metrics[f"{prefix}gradient_diversity"] = torch.where(
            torch.isfinite(combined), diversity, torch.nan
        )
        if cosine:
            metrics[f"{prefix}mean_cosine"] = _mean_cosine_of_nonzero(stats.accumulated)
        return metrics, new_state

    if not cosine:
        return GradStatsHook(
            init=init,
            per_micro_batch=per_micro_batch,
            update=update,
            name=name,
            per_micro_batch_sq_norm=lambda sq_norm, size: {"sq_norm": sq_norm},
        )
    from functrain.grads import cosine as cos  # cosine imports this module

    return GradStatsHook(
        init=init,
        per_micro_batch=per_micro_batch,
        update=update,
        name=name,
        accumulator_init=cos.cosine_accumulator_init,
        # The step makes the accumulator afresh for every step and alone holds it.
        accumulate=lambda acc, grad, size: cos._add_in_place(acc, grad),
        per_micro_batch_sq_norm=lambda sq_norm, size: {"sq_norm": sq_norm},
        accumulates_unit_gradients=True,
    )


def _mean_cosine_of_nonzero(acc: Any) -> torch.Tensor:
    """The mean pairwise cosine over the ``n`` non-zero gradients of a ``CosineAccumulator``:
    ``(‖Σuᵢ‖² − n) / (n(n − 1))``, ``n`` a tensor (no host read); NaN for ``n < 2``."""
    n = acc.unit_sq_sum
    value = (tree.norm(acc.unit_sum, squared=True).to(n.dtype) - n) / (n * (n - 1))
    # With one unit gradient ‖u‖² is 1 only to rounding: the formula gives ±inf, not NaN.
    return torch.where(n >= 2, value, torch.nan)
