"""Segmentation losses (optax's Dice losses): soft Dice, Tversky and generalized Dice."""

from __future__ import annotations

from typing import Any

import torch

from functrain.losses import _common as c
from functrain.losses._common import Scalar

__all__ = ["binary_dice_loss", "dice_loss", "multiclass_generalized_dice_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _axes(axis: Any, ndim: int, fn: str) -> tuple[int, ...]:
    if axis is None:  # every spatial axis: all but the first (batch) and last (classes)
        return tuple(range(1, ndim - 1))
    if isinstance(axis, list):
        axis = tuple(axis)
    return c.dims(axis, ndim, fn)


def _dice(
    predictions: Any,
    targets: Any,
    class_weights: Any,
    smooth: Scalar,
    alpha: Scalar,
    beta: Scalar,
    apply_softmax: bool,
    reduction: str,
    ignore_background: bool,
    axis: Any,
    fn: str,
) -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    predictions = c.floating(predictions, "predictions", fn)
    targets = c.tensor(targets, "targets", fn)
    if predictions.ndim == targets.ndim - 1:
        predictions = predictions.unsqueeze(-1)
    if targets.ndim == predictions.ndim - 1:
        targets = targets.unsqueeze(-1)
    c.same_shape(predictions, targets, ("predictions", "targets"), fn)
    if predictions.ndim == 0:
        raise ValueError(f"{fn}: predictions must have at least one axis")
    if class_weights is not None:
        class_weights = c.tensor(class_weights, "class_weights", fn)
        c.rank(class_weights, 1, "class_weights", fn)
    d = _axes(axis, predictions.ndim, fn)
    x = c.widen(predictions)
    t = targets.to(x.dtype)
    probs = x
    if apply_softmax:
        probs = torch.sigmoid(x) if x.shape[-1] == 1 else torch.softmax(x, -1)
    intersection = c.masked_sum(probs * t, d, None)
    pred_sum = c.masked_sum(probs, d, None)
    target_sum = c.masked_sum(t, d, None)
    numerator = intersection + smooth
    denominator = (
        intersection
        + alpha * (pred_sum - intersection)
        + beta * (target_sum - intersection)
        + smooth
    )
    loss = 1.0 - numerator / denominator
    if class_weights is not None:
        loss = loss * class_weights
    if ignore_background and probs.shape[-1] > 1:
        loss = loss[..., 1:]
    if reduction == "mean":
        loss = loss.mean(-1)
    elif reduction == "sum":
        loss = loss.sum(-1)
    return loss.to(predictions.dtype)


def dice_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    smooth: Scalar = 1.0,
    alpha: Scalar = 0.5,
    beta: Scalar = 0.5,
    apply_softmax: bool = True,
    reduction: str = "mean",
    ignore_background: bool = False,
    axis: int | tuple[int, ...] | None = None,
) -> torch.Tensor:
    r"""Soft Dice loss (Milletari et al. 2016), or Tversky with ``alpha ≠ beta``, per class.

    For class ``c``, with ``I`` the sum over ``axis`` of ``p · t``, ``P = Σ p``, ``T = Σ t``:
    ``1 - (I + smooth) / (I + α (P - I) + β (T - I) + smooth)``. The class losses are then
    weighted by ``class_weights`` and reduced over the class axis (the last).

    ``predictions`` are logits, turned into probabilities by a softmax over the classes (a
    sigmoid for a single channel) unless ``apply_softmax=False``. Difference from optax: with
    ``apply_softmax=False`` optax checks (on the host) that the predictions sum to 1; this
    does not check, so that it never reads the device.

    Args:
        predictions: logits (or probabilities), ``[batch, ..., num_classes]``; a binary
            ``[batch, ...]`` gets a class axis of size 1.
        targets: one-hot (or binary) targets of the same shape.
        class_weights: optional ``[num_classes]`` weights of the class losses.
        smooth: added to numerator and denominator (stability; the loss of empty classes).
        alpha: weight of false positives ``P - I``.
        beta: weight of false negatives ``T - I``.
        apply_softmax: whether ``predictions`` are logits.
        reduction: ``"mean"`` or ``"sum"`` over the classes, or ``"none"``.
        ignore_background: leave class 0 out (when there are several classes).
        axis: the axes summed over; ``None`` means all but the first and the last.

    Returns:
        The loss of each example (``"mean"``/``"sum"``), or of each example and class
        (``"none"``).

    Example:
        >>> import torch, functrain as ft
        >>> logits = torch.tensor([[1.0, -1.0], [0.5, 0.5]])
        >>> targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> ft.losses.dice_loss(logits[..., None], targets[..., None])
        tensor([0.1345, 0.2356])
    """
    return _dice(
        predictions, targets, class_weights, smooth, alpha, beta, apply_softmax, reduction,
        ignore_background, axis, "dice_loss",
    )  # fmt: skip


def multiclass_generalized_dice_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    smooth: Scalar = 1.0,
    apply_softmax: bool = True,
    ignore_background: bool = False,
) -> torch.Tensor:
    r"""Generalized Dice loss (Sudre et al. 2017): Dice with inverse squared class frequencies.

    Each class is weighted by ``1 / (f_c² + 1e-7)``, ``f_c`` its frequency in ``targets`` over
    every axis but the last, the weights normalised to sum to ``num_classes``; the weighted
    per-example, per-class :func:`dice_loss` values are then averaged.

    Args:
        predictions: logits (or probabilities), ``[batch, ..., num_classes]``.
        targets: one-hot targets of the same shape.
        smooth: the Dice smoothing term.
        apply_softmax: whether ``predictions`` are logits.
        ignore_background: leave class 0 out.

    Returns:
        The mean loss, a 0-d tensor.

    Example:
        >>> import torch, functrain as ft
        >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
        >>> targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> ft.losses.multiclass_generalized_dice_loss(logits, targets)
        tensor(0.0596)
    """
    fn = "multiclass_generalized_dice_loss"
    predictions = c.floating(predictions, "predictions", fn)
    targets = c.tensor(targets, "targets", fn)
    c.same_shape(predictions, targets, ("predictions", "targets"), fn)
    if targets.ndim == 0:
        raise ValueError(f"{fn}: predictions must have a class axis (the last)")
    t = targets.to(c.compute_dtype(predictions.dtype))
    frequencies = c.masked_sum(t, tuple(range(t.ndim - 1)), None)
    weights = 1.0 / (frequencies**2 + 1e-7)
    weights = weights / weights.sum() * weights.shape[0]
    loss = _dice(
        predictions, targets, weights, smooth, 0.5, 0.5, apply_softmax, "none",
        ignore_background, None, fn,
    )  # fmt: skip
    return loss.mean()


def binary_dice_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    smooth: Scalar = 1.0,
    apply_sigmoid: bool = True,
) -> torch.Tensor:
    r"""Binary soft Dice loss: :func:`dice_loss` of one channel, averaged over it.

    Predictions ``[batch, ...]`` (or ``[batch, ..., 1]``) are given a channel axis, turned
    into probabilities by a sigmoid (unless ``apply_sigmoid=False``), and their Dice loss is
    summed over every axis but the first.

    Args:
        predictions: logits (or probabilities), ``[batch, ...]`` or ``[batch, ..., 1]``.
        targets: binary targets of the same shape.
        smooth: the Dice smoothing term.
        apply_sigmoid: whether ``predictions`` are logits.

    Returns:
        The loss of each example, ``[batch]``.

    Example:
        >>> import torch, functrain as ft
        >>> logits = torch.tensor([[3.0, -3.0], [-3.0, 3.0]])
        >>> ft.losses.binary_dice_loss(logits, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        tensor([0.0237, 0.4763])
    """
    fn = "binary_dice_loss"
    predictions = c.floating(predictions, "predictions", fn)
    targets = c.tensor(targets, "targets", fn)
    if predictions.ndim == targets.ndim and predictions.ndim and predictions.shape[-1] != 1:
        predictions = predictions.unsqueeze(-1)
        targets = targets.unsqueeze(-1)
    return _dice(
        predictions, targets, None, smooth, 0.5, 0.5, apply_sigmoid, "mean", False, None, fn
    )
