"""Margin losses: hinge, perceptron and sparsemax, binary and multiclass (optax's).

Element-wise (binary) or per-example (multiclass) losses, never averaged. Multiclass labels
are integer class indices; one outside ``[0, num_classes)`` has an all-zero one-hot row, as
``jax.nn.one_hot`` gives (``torch.nn.functional.one_hot`` would raise, after a host read).
"""

from __future__ import annotations

import torch

from functrain.losses import _common as c

__all__ = [
    "hinge_loss",
    "multiclass_hinge_loss",
    "multiclass_perceptron_loss",
    "multiclass_sparsemax_loss",
    "perceptron_loss",
    "sparsemax_loss",
]


def _relu(x: torch.Tensor) -> torch.Tensor:
    # jnp.maximum(0, x): at x == 0 the gradient is split, 1/2 (torch.relu's is 0).
    return torch.maximum(x, torch.zeros((), dtype=x.dtype, device=x.device))


def hinge_loss(predictor_outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Binary hinge loss, element-wise: ``max(0, 1 - f(x) · y)``.

    Difference from ``torch.nn.HingeEmbeddingLoss``: that one takes distances and a margin on
    the negative class; this is the SVM hinge on scores, with no reduction.

    Args:
        predictor_outputs: the decision function's outputs (scores).
        targets: targets in ``{-1, 1}``, broadcastable with ``predictor_outputs``.

    Returns:
        The loss of each element, of the broadcast shape.

    Example:
        >>> import torch, functrain as ft
        >>> ft.hinge_loss(torch.tensor([0.5, 2.0, -1.0]), torch.tensor([1.0, 1.0, 1.0]))
        tensor([0.5000, 0.0000, 2.0000])
    """
    fn = "hinge_loss"
    outputs = c.tensor(predictor_outputs, "predictor_outputs", fn)
    targets = c.tensor(targets, "targets", fn)
    c.broadcast_together(outputs, targets, ("predictor_outputs", "targets"), fn)
    return _relu(1 - outputs * targets)


def perceptron_loss(predictor_outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Binary perceptron loss, element-wise: ``max(0, -f(x) · y)``.

    Args:
        predictor_outputs: the model's scores.
        targets: targets in ``{-1, 1}``, of the same shape as ``predictor_outputs``.

    Returns:
        The loss of each element.

    Example:
        >>> import torch, functrain as ft
        >>> ft.losses.perceptron_loss(torch.tensor([0.5, -2.0]), torch.tensor([1.0, 1.0]))
        tensor([0., 2.])
    """
    fn = "perceptron_loss"
    outputs = c.tensor(predictor_outputs, "predictor_outputs", fn)
    targets = c.tensor(targets, "targets", fn)
    c.same_shape(outputs, targets, ("predictor_outputs", "targets"), fn)
    return _relu(-outputs * targets)


def sparsemax_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Binary sparsemax loss (Blondel et al. 2020), element-wise: ``sparse_plus(±logits)``.

    ``sparse_plus(z)`` is 0 for ``z ≤ -1``, ``(z + 1)² / 4`` for ``-1 < z < 1`` and ``z`` for
    ``z ≥ 1``, taken at ``-logits`` where the label is 1 and at ``logits`` where it is 0; the
    loss is zero exactly when the sparse sigmoid of the logits equals the label.

    Args:
        logits: the model's scores (floating point).
        labels: labels in ``{0, 1}`` (any non-zero value counts as 1), broadcastable with
            ``logits``.

    Returns:
        The loss of each element, of the broadcast shape.

    Example:
        >>> import torch, functrain as ft
        >>> ft.losses.sparsemax_loss(torch.tensor([0.5, 2.0]), torch.tensor([1, 0]))
        tensor([0.0625, 2.0000])
    """
    fn = "sparsemax_loss"
    logits = c.tensor(logits, "logits", fn)
    labels = c.tensor(labels, "labels", fn)
    c.broadcast_together(logits, labels, ("logits", "labels"), fn)
    z = torch.where(labels != 0, -logits, logits)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(z <= -1.0, zero, torch.where(z >= 1.0, z, (z + 1.0) ** 2 / 4))


def _scores_and_labels(
    scores: torch.Tensor, labels: torch.Tensor, fn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = c.tensor(scores, "scores", fn)
    labels = c.integer(labels, "labels", fn)
    if scores.ndim == 0:
        raise ValueError(f"{fn}: scores must have a class axis (the last), got a 0-d tensor")
    c.broadcastable(labels, scores.shape[:-1], ("labels", "scores without its last axis"), fn)
    return scores, labels


def multiclass_hinge_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Multiclass hinge loss (Crammer–Singer): ``max_j (s_j + 1 - [j = y]) - s_y``.

    Difference from ``torch.nn.functional.multi_margin_loss``: that one sums the hinge over
    every wrong class (Weston–Watkins) and means over the batch; this takes the largest
    margin violation, per example.

    Args:
        scores: the model's scores, ``[..., num_classes]``.
        labels: integer class indices, broadcastable to ``scores.shape[:-1]``.

    Returns:
        The loss of each example, of shape ``scores.shape[:-1]``.

    Example:
        >>> import torch, functrain as ft
        >>> scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
        >>> ft.losses.multiclass_hinge_loss(scores, torch.tensor([0, 1]))
        tensor([3., 0.])
    """
    fn = "multiclass_hinge_loss"
    scores, labels = _scores_and_labels(scores, labels, fn)
    dtype = scores.dtype if scores.dtype.is_floating_point else torch.get_default_dtype()
    one_hot = c.one_hot(labels, scores.shape[-1], dtype)
    return (scores + 1.0 - one_hot).amax(-1) - (scores * one_hot).sum(-1)


def multiclass_perceptron_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Multiclass perceptron loss (Collins 2002): ``max_j s_j - s_y``.

    Args:
        scores: the model's scores, ``[..., num_classes]``.
        labels: integer class indices, broadcastable to ``scores.shape[:-1]``.

    Returns:
        The loss of each example, of shape ``scores.shape[:-1]``.

    Example:
        >>> import torch, functrain as ft
        >>> scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
        >>> ft.losses.multiclass_perceptron_loss(scores, torch.tensor([0, 1]))
        tensor([2., 0.])
    """
    fn = "multiclass_perceptron_loss"
    scores, labels = _scores_and_labels(scores, labels, fn)
    dtype = scores.dtype if scores.dtype.is_floating_point else torch.get_default_dtype()
    one_hot = c.one_hot(labels, scores.shape[-1], dtype)
    return scores.amax(-1) - (scores * one_hot).sum(-1)


def _sparsemax(z: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of each last-axis vector onto the probability simplex."""
    n = z.shape[-1]
    z_sorted = torch.sort(z, dim=-1, descending=True).values
    cumsum = z_sorted.cumsum(-1)
    k = torch.arange(1, n + 1, dtype=z.dtype, device=z.device)
    support = (1 + k * z_sorted > cumsum).sum(-1, keepdim=True)  # >= 1: the largest is in it
    tau = (torch.gather(cumsum, -1, support - 1) - 1) / support.to(z.dtype)
    return torch.clamp_min(z - tau, 0)


def multiclass_sparsemax_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Multiclass sparsemax loss (Martins & Astudillo 2016), per example.

    ``p = sparsemax(s)`` (the projection of ``s`` onto the simplex), then
    ``⟨p, s - s_y⟩ + (1 - ‖p‖²) / 2``: zero exactly when ``sparsemax(s)`` is the one-hot of
    the label. optax vmaps over a leading batch axis; this takes any leading shape.

    Args:
        scores: the model's scores, ``[..., num_classes]`` (floating point).
        labels: integer class indices, broadcastable to ``scores.shape[:-1]``.

    Returns:
        The loss of each example, of shape ``scores.shape[:-1]``.

    Example:
        >>> import torch, functrain as ft
        >>> scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 3.0, 0.0]])
        >>> ft.losses.multiclass_sparsemax_loss(scores, torch.tensor([0, 1]))
        tensor([2., 0.])
    """
    fn = "multiclass_sparsemax_loss"
    scores, labels = _scores_and_labels(scores, labels, fn)
    scores = c.floating(scores, "scores", fn)
    s = c.widen(scores)
    one_hot = c.one_hot(labels, s.shape[-1], torch.bool)
    proba = _sparsemax(s)
    label_score = (s * one_hot).sum(-1, keepdim=True)
    shifted = torch.where(one_hot, torch.zeros_like(s), s - label_score)
    shifted = torch.where(proba != 0, shifted, torch.zeros_like(s))
    out = (proba * shifted).sum(-1) + 0.5 * (1.0 - (proba * proba).sum(-1))
    return out.to(scores.dtype)
