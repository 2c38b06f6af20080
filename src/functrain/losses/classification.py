"""Cross-entropy losses: softmax (probability or integer labels), sigmoid, focal and poly.

As optax's, they return one loss per example (or per element), never a mean: average them
yourself (``.mean()``), or use :class:`functrain.LossSum` for a token-mean over micro-batches.
``torch.nn.functional.cross_entropy`` means over the batch by default (``reduction="mean"``);
``softmax_cross_entropy_with_integer_labels(logits, labels)`` is its ``reduction="none"``.
"""

from __future__ import annotations

import math

import torch

from functrain.losses import _common as c
from functrain.losses._common import Axis, Scalar

__all__ = [
    "poly_loss_cross_entropy",
    "safe_softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]


def _float_labels(labels: torch.Tensor, logits: torch.Tensor, fn: str) -> torch.Tensor:
    labels = c.tensor(labels, "labels", fn)
    c.broadcast_together(labels, logits, ("labels", "logits"), fn)
    return labels


def sigmoid_binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Element-wise sigmoid cross entropy: ``-y log σ(x) - (1 - y) log(1 - σ(x))``.

    For binary or multi-label classification: each element is an independent binary
    prediction. ``log(1 - σ(x))`` is computed as ``log σ(-x)``, which stays finite for large
    ``|x|``; float16/bfloat16 logits are computed in float32 and the result cast back.

    Difference from ``torch.nn.functional.binary_cross_entropy_with_logits``: no reduction
    (that function means by default; this is its ``reduction="none"``), and no ``weight`` or
    ``pos_weight`` (multiply the result instead).

    Args:
        logits: unnormalised log-odds, any shape (floating point).
        labels: binary labels in ``{0, 1}`` or target probabilities, broadcastable with
            ``logits``; cast to the logits' dtype.

    Returns:
        The cross entropy of each element, of the broadcast shape, in the logits' dtype.

    Example:
        >>> import torch, functrain as ft
        >>> ft.sigmoid_binary_cross_entropy(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
        tensor([0.6931, 2.1269])
    """
    fn = "sigmoid_binary_cross_entropy"
    logits = c.floating(logits, "logits", fn)
    labels = _float_labels(labels, logits, fn)
    x = c.widen(logits)
    y = labels.to(x.dtype)
    out = -y * torch.nn.functional.logsigmoid(x) - (1.0 - y) * torch.nn.functional.logsigmoid(-x)
    return out.to(logits.dtype)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: Scalar | None = None,
    gamma: Scalar = 2.0,
) -> torch.Tensor:
    r"""Sigmoid focal loss (Lin et al. 2017): ``-α_t (1 - p_t)^γ log p_t``, element-wise.

    ``p = σ(logits)``, ``p_t = p`` where the label is 1 and ``1 - p`` where it is 0 (soft
    labels interpolate), ``α_t = α y + (1 - α)(1 - y)``. As optax (>= 0.2.5), ``(1 - p_t)^γ``
    is computed in log space, ``exp(γ · logsumexp([log p, log(1-p)], b=[1-y, y]))``, so it is
    accurate for extreme logits and ``γ < 2``; float16/bfloat16 are computed in float32.

    Difference from ``torchvision.ops.sigmoid_focal_loss``: ``alpha`` defaults to ``None`` (no
    weighting; torchvision's is 0.25) and there is no ``reduction`` (element-wise losses).

    Args:
        logits: unnormalised log-odds, any shape (floating point).
        labels: binary labels ``{0, 1}`` or soft labels in ``[0, 1]``, broadcastable with
            ``logits``.
        alpha: weight of the positive class in ``(0, 1)``; ``None`` weighs both classes 1.
        gamma: exponent of the modulating factor ``(1 - p_t)``.

    Returns:
        The focal loss of each element, of the broadcast shape, in the logits' dtype.

    Example:
        >>> import torch, functrain as ft
        >>> ft.sigmoid_focal_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]))
        tensor([0.1733, 0.0018])
    """
    fn = "sigmoid_focal_loss"
    logits = c.floating(logits, "logits", fn)
    labels = _float_labels(labels, logits, fn)
    x = c.widen(logits)
    y = labels.to(x.dtype)
    log_p = torch.nn.functional.logsigmoid(x)
    log_q = torch.nn.functional.logsigmoid(-x)
    ce = -y * log_p - (1.0 - y) * log_q
    # logsumexp([log_p, log_q], b=[1 - y, y]) as jax computes it: a term with b == 0 is left out
    # (so y = 0 gives exactly log_p, however small), the peak of the rest is subtracted.
    neg_inf = torch.full((), -math.inf, dtype=x.dtype, device=x.device)
    a1 = torch.where(1.0 - y != 0, log_p, neg_inf)
    a2 = torch.where(y != 0, log_q, neg_inf)
    peak = torch.maximum(a1, a2).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = (1.0 - y) * torch.exp(a1 - peak) + y * torch.exp(a2 - peak)
    log_one_minus_pt = torch.log(total.abs()) + peak
    log_one_minus_pt = torch.where(total < 0, torch.full_like(total, math.nan), log_one_minus_pt)
    loss = ce * torch.exp(gamma * log_one_minus_pt)
    if alpha is not None:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return loss.to(logits.dtype)


def softmax_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    axis: Axis = -1,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Softmax cross entropy with probability labels: ``-Σ_j y_j log softmax(x)_j``.

    The log-softmax is computed stably (max-shifted log-sum-exp; float16/bfloat16 in float32).
    A ``-inf`` logit where the label is 0 gives NaN (``0 · -inf``), as optax's; use
    :func:`safe_softmax_cross_entropy` for masked-out classes written as ``-inf`` logits.

    Difference from ``torch.nn.functional.cross_entropy(logits, probs)``: that means over the
    batch by default (``reduction="mean"``) and takes the class axis at 1; this returns one
    loss per example and takes it at ``axis`` (default the last). No ``label_smoothing``
    argument: see :func:`smooth_labels`.

    Args:
        logits: unnormalised log-probabilities, ``[..., num_classes]`` (floating point).
        labels: target distributions (e.g. one-hot), broadcastable with ``logits``.
        axis: the class axis or axes (``None``: all).
        where: optional mask of the classes to include, of the logits' shape or of the batch
            shape (then expanded at ``axis``); masked classes are left out of the softmax and
            of the sum.

    Returns:
        The cross entropy of each example: ``logits``' shape without ``axis``.

    Example:
        >>> import torch, functrain as ft
        >>> logits = torch.tensor([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
        >>> labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> ft.softmax_cross_entropy(logits, labels)
        tensor([0.2761, 2.9518])
    """
    fn = "softmax_cross_entropy"
    logits = c.floating(logits, "logits", fn)
    labels = c.tensor(labels, "labels", fn)
    d = c.dims(axis, logits.ndim, fn)
    c.broadcastable(labels, logits.shape, ("labels", "logits"), fn)
    where = c.mask(where, fn)
    if where is not None:
        given = where.shape
        where = c.expand_where(where, axis, logits.ndim)
        c.broadcastable(where, logits.shape, ("where", "logits"), fn, given)
    out_dtype = c.result_dtype(logits, labels)
    x = logits.to(c.compute_dtype(out_dtype))
    log_probs = c.log_softmax(x, d, where)
    if where is not None:
        # Masked entries (-inf) never reach the product: labels' gradient stays finite there.
        log_probs = torch.where(where, log_probs, torch.zeros_like(log_probs))
    return (-c.masked_sum(labels.to(x.dtype) * log_probs, d, where)).to(out_dtype)


def safe_softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Softmax cross entropy over the last axis, with ``0 · log 0 = 0``.

    As :func:`softmax_cross_entropy`, but a class whose label is 0 contributes 0 even when its
    logit is ``-inf`` (where ``softmax_cross_entropy`` gives NaN), so classes can be masked out
    by ``-inf`` logits. The gradient with respect to the logits is finite there too.

    Args:
        logits: unnormalised log-probabilities, ``[..., num_classes]`` (floating point).
        labels: target distributions, broadcastable to ``[..., num_classes]``.

    Returns:
        The cross entropy of each example, of shape ``[...]``.

    Example:
        >>> import torch, functrain as ft
        >>> logits = torch.tensor([[0.0, 0.0, -float("inf")]])
        >>> ft.safe_softmax_cross_entropy(logits, torch.tensor([[1.0, 0.0, 0.0]]))
        tensor([0.6931])
    """
    fn = "safe_softmax_cross_entropy"
    logits = c.floating(logits, "logits", fn)
    labels = c.tensor(labels, "labels", fn)
    if logits.ndim == 0:
        raise ValueError(f"{fn}: logits must have a class axis (the last), got a 0-d tensor")
    c.broadcastable(labels, logits.shape, ("labels", "logits"), fn)
    out_dtype = c.result_dtype(logits, labels)
    x = logits.to(c.compute_dtype(out_dtype))
    y = labels.to(x.dtype)
    log_probs = torch.log_softmax(x, -1)
    # 0 · -inf is taken as 0; a finite log-probability keeps its value, so the gradient with
    # respect to a zero label is still log softmax(x) there.
    dropped = (y == 0) & torch.isneginf(log_probs)
    log_probs = torch.where(dropped, torch.zeros_like(log_probs), log_probs)
    return (-(y * log_probs).sum(-1)).to(out_dtype)


def _move_class_axes(
    logits: torch.Tensor, where: torch.Tensor | None, axis: Axis, fn: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (and a mask of their shape) with the class axes flattened into one last axis."""
    if isinstance(axis, bool) or not isinstance(axis, int | tuple):
        raise ValueError(
            f"{fn}: axis must be of type 'int' or 'tuple[int, ...]', got {type(axis).__name__}"
        )
    c.dims(axis, logits.ndim, fn)  # validates
    # optax keeps the order the axes were given in: a flat label indexes that order.
    d = tuple(a % logits.ndim for a in ((axis,) if isinstance(axis, int) else axis))
    batch = tuple(i for i in range(logits.ndim) if i not in d)
    # The class size spelled out, not -1: an empty batch has no size to infer it from.
    shape = (*[logits.shape[i] for i in batch], math.prod([logits.shape[i] for i in d]))
    logits = logits.permute(batch + d).reshape(shape)
    if where is not None:
        where = where.permute(batch + d).reshape(shape)
    return logits, where


def softmax_cross_entropy_with_integer_labels(
    logits: torch.Tensor,
    labels: torch.Tensor,
    axis: int | tuple[int, ...] = -1,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Softmax cross entropy with integer labels: ``logsumexp(x) - x[label]``.

    Stable (max-shifted log-sum-exp; float16/bfloat16 computed in float32) and without
    building the full log-softmax. A label in ``[-num_classes, 0)`` counts from the end, as
    numpy indexing; any other out-of-range label gives NaN (optax's gather fill), checked
    without a host read. With a tuple ``axis``, ``num_classes`` is the product of those
    dimensions and a label is a flat index into them, in the order given.

    Differences from ``torch.nn.functional.cross_entropy(logits, labels)``: no reduction (that
    one means by default: this is ``reduction="none"``), the class axis is ``axis`` (default
    the last; torch's is 1), there is no ``ignore_index`` (use ``where`` or a mask on the
    result), no ``weight`` and no ``label_smoothing``.

    Args:
        logits: unnormalised log-probabilities, ``[..., num_classes]`` (floating point).
        labels: integer class indices, broadcastable to ``logits``' shape without ``axis``.
        axis: the class axis, or a tuple of axes flattened into one.
        where: optional mask of the classes to include (of the logits' shape, or of the batch
            shape: then a whole example is included or not); an example with no included
            class has loss 0.

    Returns:
        The cross entropy of each example: ``logits``' shape without ``axis``.

    Example:
        >>> import torch, functrain as ft
        >>> logits = torch.tensor([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
        >>> ft.softmax_cross_entropy_with_integer_labels(logits, torch.tensor([0, 1]))
        tensor([0.2761, 2.9518])
        >>> torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]), reduction="none")
        tensor([0.2761, 2.9518])
    """
    fn = "softmax_cross_entropy_with_integer_labels"
    logits = c.floating(logits, "logits", fn)
    labels = c.integer(labels, "labels", fn)
    where = c.mask(where, fn)
    if where is not None and isinstance(axis, int | tuple) and not isinstance(axis, bool):
        c.dims(axis, logits.ndim, fn)
        given = where.shape
        where = c.expand_where(where, axis, logits.ndim)
        c.broadcastable(where, logits.shape, ("where", "logits"), fn, given)
        where = where.expand(logits.shape)
    flat, where = _move_class_axes(logits, where, axis, fn)
    batch_shape = flat.shape[:-1]
    c.broadcastable(labels, batch_shape, ("labels", "the batch shape (logits without axis)"), fn)
    num_classes = flat.shape[-1]
    if num_classes == 0:
        raise ValueError(f"{fn}: logits have no class (axis {axis!r} has size 0)")
    x = c.widen(flat)
    # int64 first: gather takes no narrower index, and `label + num_classes` must not wrap
    # (an int8 label -1 of 200 classes).
    labels = labels.to(torch.int64)
    index = torch.where(labels < 0, labels + num_classes, labels)
    valid = (index >= 0) & (index < num_classes)
    index = index.clamp(0, num_classes - 1).expand(batch_shape)
    label_logits = torch.gather(x, -1, index.unsqueeze(-1)).squeeze(-1)
    # An out-of-range label reads NaN, as jax's gather fills (the log-normalizer still has its
    # gradient there, as in optax).
    nan = torch.full((), math.nan, dtype=x.dtype, device=x.device)
    out = c.logsumexp(x, (x.ndim - 1,), where) - torch.where(valid, label_logits, nan)
    if where is not None:
        out = torch.where(where.any(-1), out, torch.zeros_like(out))
    return out.to(logits.dtype)


def poly_loss_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: Scalar = 2.0,
    axis: Axis = -1,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Poly-1 loss (Leng et al. 2022): ``CE + ε · Σ_j y_j (1 - softmax(x)_j)``.

    The cross entropy plus ``ε`` times the first polynomial term ``1 - p_t`` of its Taylor
    expansion (``ε = 2`` for ImageNet classification, ``-1`` for detection, per the paper).
    ``where`` is passed to the softmax and the sums as given, and to the cross-entropy term,
    which expands a ``where`` of lower rank at ``axis`` (as optax's): give it the logits' rank.

    Args:
        logits: unnormalised log-probabilities, ``[..., num_classes]`` (floating point).
        labels: target distributions (floating point), broadcastable with ``logits``.
        epsilon: the coefficient of the first polynomial term.
        axis: the class axis or axes (``None``: all).
        where: optional mask of the classes to include, broadcastable with ``logits``.

    Returns:
        The poly loss of each example: ``logits``' shape without ``axis``.

    Example:
        >>> import torch, functrain as ft
        >>> logits = torch.tensor([[1.0, 2.0, 3.0]])
        >>> ft.losses.poly_loss_cross_entropy(logits, torch.tensor([[0.0, 0.0, 1.0]]))
        tensor([1.0771])
    """
    fn = "poly_loss_cross_entropy"
    logits = c.floating(logits, "logits", fn)
    labels = c.floating(labels, "labels", fn)
    c.broadcastable(labels, logits.shape, ("labels", "logits"), fn)
    mask = c.mask(where, fn)
    d = c.dims(axis, logits.ndim, fn)
    if mask is not None:
        c.broadcastable(mask, logits.shape, ("where", "logits"), fn)
        # The cross-entropy term expands a where of lower rank at axis (optax's does too):
        # checked here, so that the error names this function.
        expanded = c.expand_where(mask, axis, logits.ndim)
        c.broadcastable(expanded, logits.shape, ("where expanded at axis", "logits"), fn)
    out_dtype = c.result_dtype(logits, labels)
    x = logits.to(c.compute_dtype(out_dtype))
    y = labels.to(x.dtype)
    p = torch.exp(c.log_softmax(x, d, mask))
    one_minus_pt = c.masked_sum(y * (1 - p), d, mask)
    ce = softmax_cross_entropy(x, y, axis=axis, where=where)
    return (ce + epsilon * one_minus_pt).to(out_dtype)
