"""Self-supervised and metric-learning losses (optax's ``ntxent``, ``triplet_margin_loss``)."""

from __future__ import annotations

import math

import torch

from functrain.losses import _common as c
from functrain.losses._common import Scalar

__all__ = ["ntxent", "triplet_margin_loss"]


def ntxent(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: Scalar = 0.07
) -> torch.Tensor:
    r"""NT-Xent, the normalized temperature-scaled cross entropy of SimCLR (Chen et al. 2020).

    With ``s_ij`` the cosine similarity of embeddings ``i`` and ``j`` over ``temperature``,
    each positive pair ``(i, j)`` (same label, ``i ≠ j``) contributes
    ``-log(exp(s_ij) / (exp(s_ij) + Σ_{k: label_k ≠ label_i} exp(s_ik)))``; the result is
    the mean over all positive pairs (NaN if there is none). Computed max-shifted, in
    float32 for float16/bfloat16 embeddings; the ``[batch, batch]`` similarities are one
    matmul (memory ``batch²``, not ``batch² · features``), kept in float32 under
    ``torch.autocast`` (a backward that runs under autocast, as a compiled step's does,
    takes autocast's dtype for it, as for any matmul).

    Args:
        embeddings: a batch of embeddings, ``[batch, features]`` (floating point).
        labels: ``[batch]`` group labels: embeddings with equal labels are positive pairs.
        temperature: the temperature of the similarities.

    Returns:
        The mean loss over the positive pairs, a 0-d tensor.

    Example:
        >>> import torch, functrain as ft
        >>> emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, -0.6]])
        >>> ft.ntxent(emb, torch.tensor([0, 0, 1, 1]))
        tensor(11.4565)
    """
    fn = "ntxent"
    embeddings = c.floating(embeddings, "embeddings", fn)
    labels = c.tensor(labels, "labels", fn)
    c.rank(embeddings, 2, "embeddings", fn)
    if labels.ndim == 0 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{fn}: labels and embeddings must have the same leading dimension, got labels "
            f"shape {tuple(labels.shape)} and embeddings shape {tuple(embeddings.shape)}"
        )
    eps = torch.finfo(embeddings.dtype).eps
    e = c.widen(embeddings)
    # torch.maximum, not clamp_min: a tie gets half the gradient, as optax's jnp.clip.
    floor = torch.full((), eps, dtype=e.dtype, device=e.device)
    norm2 = torch.maximum((e * e).sum(-1, keepdim=True), floor)
    unit = e / torch.sqrt(norm2)
    xcs = c.matmul(unit, unit.T) / temperature
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
    matches = same & ~eye
    neg_inf = torch.full((), -math.inf, dtype=xcs.dtype, device=xcs.device)
    xcs_diffs = torch.where(~same, xcs, neg_inf)
    xcs_matches = torch.where(matches, xcs, neg_inf)
    peak = torch.cat((xcs_diffs, xcs_matches), -1).amax(1, keepdim=True).detach()
    shift_diffs = xcs_diffs - peak
    shift_matches = xcs_matches - peak
    denom = torch.exp(shift_diffs).sum(1, keepdim=True) + torch.exp(shift_matches)
    log_softmax = shift_matches - torch.log(denom)
    picked = torch.where(matches, log_softmax, torch.zeros_like(log_softmax))
    return (-picked.sum() / matches.sum()).to(embeddings.dtype)


def triplet_margin_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    axis: int = -1,
    norm_degree: Scalar = 2,
    margin: Scalar = 1.0,
    eps: Scalar = 1e-6,
) -> torch.Tensor:
    r"""Triplet margin loss (Balntas et al. 2016), per triplet: ``max(d(a, p) - d(a, n) + m, 0)``.

    As optax's, ``d(x, y) = (Σ (x - y)^q + eps)^(1/q)`` with ``q = norm_degree`` along
    ``axis``: the differences are raised to ``q`` as they are (no absolute value), so use an
    even ``q`` (the default 2 is the Euclidean distance).

    Difference from ``torch.nn.functional.triplet_margin_loss``: that one means over the batch,
    takes ``|x - y + eps|`` (eps inside the norm, any ``p``) and has a ``swap`` option.

    Args:
        anchors: anchor embeddings, ``[batch, features]`` (floating point).
        positives: embeddings similar to the anchors, of the same shape.
        negatives: embeddings dissimilar to the anchors, of the same shape.
        axis: the feature axis.
        norm_degree: the degree ``q`` of the distance.
        margin: the margin by which a positive must be closer than a negative.
        eps: added inside the root, for a finite gradient at zero distance.

    Returns:
        The loss of each triplet: the shape without ``axis``.

    Example:
        >>> import torch, functrain as ft
        >>> anchors = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        >>> positives = torch.tensor([[0.1, 0.1], [1.1, 1.1]])
        >>> negatives = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> ft.losses.triplet_margin_loss(anchors, positives, negatives)
        tensor([0.1414, 0.1414])
    """
    fn = "triplet_margin_loss"
    a = c.floating(anchors, "anchors", fn)
    p = c.floating(positives, "positives", fn)
    n = c.floating(negatives, "negatives", fn)
    c.broadcast_together(a, p, ("anchors", "positives"), fn)
    c.broadcast_together(a, n, ("anchors", "negatives"), fn)
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{fn}: axis must be an int, got {axis!r}")
    for x, name in ((a - p, "positives"), (a - n, "negatives")):
        c.dims(axis, x.ndim, fn, f"axis (of anchors - {name})")
    out_dtype = c.result_dtype(a, p, n)
    a, p, n = (x.to(c.compute_dtype(out_dtype)) for x in (a, p, n))
    positive = torch.pow(torch.pow(a - p, norm_degree).sum(axis) + eps, 1 / norm_degree)
    negative = torch.pow(torch.pow(a - n, norm_degree).sum(axis) + eps, 1 / norm_degree)
    loss = positive - negative + margin
    return torch.maximum(loss, torch.zeros((), dtype=loss.dtype, device=loss.device)).to(out_dtype)
