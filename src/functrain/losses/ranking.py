"""Ranking losses (optax's ``ranking_softmax_loss``): over the last axis, a list of items."""

from __future__ import annotations

from collections.abc import Callable

import torch

from functrain.losses import _common as c

__all__ = ["ranking_softmax_loss"]


def _reduce(
    loss: torch.Tensor,
    where: torch.Tensor | None,
    reduce_fn: Callable[..., torch.Tensor] | None,
) -> torch.Tensor:
    """optax's ``_safe_reduce``: a masked mean of no element is 0 (unless the input has NaN)."""
    if reduce_fn is None:
        return loss if where is None else torch.where(where, loss, torch.zeros_like(loss))
    if reduce_fn is torch.sum:
        return c.masked_sum(loss, tuple(range(loss.ndim)), where)
    if reduce_fn is torch.mean:
        if where is None:
            out = loss.mean()
        else:
            total = c.masked_sum(loss, tuple(range(loss.ndim)), where)
            out = total / where.sum().to(loss.dtype)
        input_valid = ~torch.isnan(loss).any()
        return torch.where(torch.isnan(out) & input_valid, torch.zeros_like(out), out)
    return reduce_fn(loss, where=where)


def ranking_softmax_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    where: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduce_fn: Callable[..., torch.Tensor] | None = torch.mean,
) -> torch.Tensor:
    r"""Ranking softmax loss: ``-Σ_i y_i log softmax(s)_i`` over each list, then reduced.

    Each list (the last axis) is scored like a softmax cross entropy with its relevance labels
    (optionally multiplied by ``weights``). Items where ``where`` is ``False`` are left out of
    the softmax and of the sum, and lists with no valid item are left out of the reduction; a
    mean over no list is 0 rather than NaN.

    ``reduce_fn`` is ``torch.mean`` (the default, in place of optax's ``jnp.mean``),
    ``torch.sum`` (optax's ``jnp.sum``), ``None`` (one loss per list, masked lists 0) or any
    callable, which is called as ``reduce_fn(losses, where=list_mask)`` (as optax calls it).
    The reductions are masked without a host read.

    Args:
        logits: the score of each item, ``[..., list_size]`` (floating point).
        labels: the relevance of each item, of the same shape.
        where: optional mask of the valid items, of the same shape.
        weights: optional weight of each item, of the same shape.
        reduce_fn: how the per-list losses are reduced (see above).

    Returns:
        The reduced loss (a 0-d tensor), or one loss per list with ``reduce_fn=None``.

    Example:
        >>> import torch, functrain as ft
        >>> scores = torch.tensor([2.0, 1.0, 3.0])
        >>> ft.losses.ranking_softmax_loss(scores, torch.tensor([1.0, 0.0, 0.0]))
        tensor(1.4076)
    """
    fn = "ranking_softmax_loss"
    logits = c.floating(logits, "logits", fn)
    labels = c.tensor(labels, "labels", fn)
    if logits.ndim == 0:
        raise ValueError(f"{fn}: logits must have a list axis (the last), got a 0-d tensor")
    c.broadcastable(labels, logits.shape, ("labels", "logits"), fn)
    where = c.mask(where, fn)
    if where is not None:
        c.broadcastable(where, logits.shape, ("where", "logits"), fn)
    if weights is not None:
        weights = c.tensor(weights, "weights", fn)
        c.broadcastable(weights, logits.shape, ("weights", "logits"), fn)
    if reduce_fn is not None and not callable(reduce_fn):
        raise TypeError(f"{fn}: reduce_fn must be callable or None, got {reduce_fn!r}")
    x = c.widen(logits)
    y = labels.to(x.dtype)
    if where is not None:
        y = torch.where(where, y, torch.zeros_like(y))
    if weights is not None:
        y = y * weights
    log_probs = c.log_softmax(x, (x.ndim - 1,), where)
    if where is not None:
        log_probs = torch.where(where, log_probs, torch.zeros_like(log_probs))
    loss = -c.masked_sum(y * log_probs, (x.ndim - 1,), where)
    lists = None if where is None else torch.broadcast_to(where, logits.shape).any(-1)
    return _reduce(loss, lists, reduce_fn).to(logits.dtype)
