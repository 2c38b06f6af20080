"""Kullback–Leibler divergences (optax's): per example, summed over ``axis``, never averaged.

``torch.nn.functional.kl_div(input, target)`` takes the same arguments (log-predictions
first) but reduces with ``reduction="mean"`` by default, which averages over *every element*
(not per example); ``kl_div(..., reduction="none").sum(-1)`` is :func:`kl_divergence`.
"""

from __future__ import annotations

import torch

from functrain.losses import _common as c
from functrain.losses._common import Axis

__all__ = [
    "convex_kl_divergence",
    "generalized_kl_divergence",
    "kl_divergence",
    "kl_divergence_with_log_targets",
]


def _checked(
    log_predictions: torch.Tensor,
    targets: torch.Tensor,
    axis: Axis,
    where: torch.Tensor | None,
    fn: str,
    target_name: str = "targets",
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], torch.Tensor | None]:
    log_predictions = c.floating(log_predictions, "log_predictions", fn)
    targets = c.floating(targets, target_name, fn)
    shape = c.broadcast_together(log_predictions, targets, ("log_predictions", target_name), fn)
    where = c.mask(where, fn)
    if where is not None:
        c.broadcastable(where, shape, ("where", "log_predictions"), fn)
    return log_predictions, targets, c.dims(axis, len(shape), fn), where


def _kl(lp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # t (log t - lp) with 0 log 0 = 0; log of a safe value keeps the gradient at t = 0 finite.
    log_t = torch.log(torch.where(t == 0, torch.ones_like(t), t))
    return t * (log_t - lp)


def kl_divergence(
    log_predictions: torch.Tensor,
    targets: torch.Tensor,
    axis: Axis = -1,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""KL divergence of the predictions from the targets: ``Σ t (log t - log p)``.

    ``0 · log 0`` is taken as 0. float16/bfloat16 inputs are computed in float32.

    Difference from ``torch.nn.functional.kl_div``: same argument order and element-wise
    formula, but summed over ``axis`` per example, where ``kl_div`` means over all elements by
    default (``reduction="batchmean"`` divides the total by the batch size).

    Args:
        log_predictions: log-probabilities of the predicted distribution, ``[..., dim]``.
        targets: probabilities of the target distribution (non-negative).
        axis: the axis or axes of the distribution (``None``: all).
        where: optional mask of the elements to include.

    Returns:
        The divergence of each example: the broadcast shape without ``axis``.

    Example:
        >>> import torch, functrain as ft
        >>> log_p = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
        >>> ft.kl_divergence(log_p, torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
        tensor([0.0000, 0.5108])
    """
    fn = "kl_divergence"
    lp, t, d, where = _checked(log_predictions, targets, axis, where, fn)
    out_dtype = c.result_dtype(lp, t)
    dtype = c.compute_dtype(out_dtype)
    return c.masked_sum(_kl(lp.to(dtype), t.to(dtype)), d, where).to(out_dtype)


def kl_divergence_with_log_targets(
    log_predictions: torch.Tensor,
    log_targets: torch.Tensor,
    axis: Axis = -1,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""KL divergence with the targets in log space: ``Σ exp(log t) (log t - log p)``.

    Difference from ``torch.nn.functional.kl_div(..., log_target=True)``: summed over ``axis``
    per example instead of averaged over every element.

    Args:
        log_predictions: log-probabilities of the predicted distribution, ``[..., dim]``.
        log_targets: log-probabilities of the target distribution.
        axis: the axis or axes of the distribution (``None``: all).
        where: optional mask of the elements to include.

    Returns:
        The divergence of each example: the broadcast shape without ``axis``.

    Example:
        >>> import torch, functrain as ft
        >>> log_p = torch.log(torch.tensor([0.9, 0.1]))
        >>> ft.losses.kl_divergence_with_log_targets(log_p, torch.log(torch.tensor([0.5, 0.5])))
        tensor(0.5108)
    """
    fn = "kl_divergence_with_log_targets"
    lp, lt, d, where = _checked(log_predictions, log_targets, axis, where, fn, "log_targets")
    out_dtype = c.result_dtype(lp, lt)
    lp, lt = lp.to(c.compute_dtype(out_dtype)), lt.to(c.compute_dtype(out_dtype))
    return c.masked_sum(torch.exp(lt) * (lt - lp), d, where).to(out_dtype)


def generalized_kl_divergence(
    log_predictions: torch.Tensor,
    targets: torch.Tensor,
    axis: Axis = -1,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Generalized KL divergence, for unnormalised measures: ``Σ t (log t - log p) + p - t``.

    The Bregman divergence of ``x log x - x``; it equals :func:`kl_divergence` when both
    ``p = exp(log_predictions)`` and ``t`` sum to 1.

    Args:
        log_predictions: logs of the predicted (unnormalised) measure, ``[..., dim]``.
        targets: the target measure (non-negative).
        axis: the axis or axes of the measure (``None``: all).
        where: optional mask of the elements to include.

    Returns:
        The divergence of each example: the broadcast shape without ``axis``.

    Example:
        >>> import torch, functrain as ft
        >>> log_p = torch.log(torch.tensor([1.0, 2.0]))
        >>> ft.generalized_kl_divergence(log_p, torch.tensor([1.0, 1.0]))
        tensor(0.3069)
    """
    fn = "generalized_kl_divergence"
    lp, t, d, where = _checked(log_predictions, targets, axis, where, fn)
    out_dtype = c.result_dtype(lp, t)
    lp, t = lp.to(c.compute_dtype(out_dtype)), t.to(c.compute_dtype(out_dtype))
    return c.masked_sum(_kl(lp, t) + (torch.exp(lp) - t), d, where).to(out_dtype)


def convex_kl_divergence(
    log_predictions: torch.Tensor,
    targets: torch.Tensor,
    axis: Axis = -1,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The former name of :func:`generalized_kl_divergence` (deprecated in optax 0.2.4).

    Computes exactly what :func:`generalized_kl_divergence` does. optax warns on every call;
    functrain does not (a warning inside a compiled step is a graph break).

    Args:
        log_predictions: logs of the predicted (unnormalised) measure, ``[..., dim]``.
        targets: the target measure (non-negative).
        axis: the axis or axes of the measure (``None``: all).
        where: optional mask of the elements to include.

    Returns:
        The divergence of each example: the broadcast shape without ``axis``.

    Example:
        >>> import torch, functrain as ft
        >>> log_p = torch.log(torch.tensor([1.0, 2.0]))
        >>> ft.convex_kl_divergence(log_p, torch.tensor([1.0, 1.0]))
        tensor(0.3069)
    """
    return generalized_kl_divergence(log_predictions, targets, axis=axis, where=where)
