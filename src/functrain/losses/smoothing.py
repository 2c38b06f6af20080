"""Label smoothing (optax's ``smooth_labels``)."""

from __future__ import annotations

import torch

from functrain.losses import _common as c
from functrain.losses._common import Axis, Scalar

__all__ = ["smooth_labels"]


def smooth_labels(
    labels: torch.Tensor,
    alpha: Scalar,
    *,
    axis: Axis = -1,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Label smoothing (Müller et al. 2019): ``(1 - α) · labels + α / num_classes``.

    ``num_classes`` is the size of ``axis`` (the product of the sizes for a tuple, every
    element for ``None``) or, with ``where``, the number of included classes of each example.
    Smoothed one-hot labels still sum to 1 over the classes.

    Difference from ``torch.nn.functional.cross_entropy(..., label_smoothing=α)``: the same
    smoothed targets, made explicit, so any loss can use them (feed the result to
    :func:`softmax_cross_entropy`).

    Args:
        labels: one-hot (or probability) labels, floating point.
        alpha: the smoothing factor, in ``[0, 1]``.
        axis: the class axis or axes (``None``: all).
        where: optional mask of the classes that count, broadcastable with ``labels``.

    Returns:
        The smoothed labels, of ``labels``' shape.

    Example:
        >>> import torch, functrain as ft
        >>> ft.smooth_labels(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), 0.2)
        tensor([[0.0500, 0.8500, 0.0500, 0.0500]])
    """
    fn = "smooth_labels"
    labels = c.floating(labels, "labels", fn)
    d = c.dims(axis, labels.ndim, fn)
    where = c.mask(where, fn)
    if where is None:
        size = 1
        for i in d:
            size *= labels.shape[i]
        num_classes: float | torch.Tensor = float(size)
    else:
        c.broadcast_together(where, labels, ("where", "labels"), fn)
        full = torch.broadcast_to(where, torch.broadcast_shapes(where.shape, labels.shape))
        num_classes = c.masked_sum(torch.ones_like(full, dtype=labels.dtype), d, full, True)
    return (1.0 - alpha) * labels + alpha / num_classes
