"""Margin losses: hinge, perceptron and sparsemax, binary and multiclass (optax's).

Element-wise (binary) or per-example (multiclass) losses, never averaged. Multiclass labels
are integer class indices (any integer dtype). As optax's, the hinge and perceptron losses give
a label outside ``[0, num_classes)`` an all-zero one-hot row (``jax.nn.one_hot``;
``torch.nn.functional.one_hot`` would raise, after a host read), and the sparsemax loss
indexes: a negative label counts from the end, then an out-of-range one is clamped.
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
    if scores.shape[-1] == 0:
        raise ValueError(f"{fn}: scores have no class (last axis of size 0)")
    c.broadcastable(labels, scores.shape[:-1], ("labels", "scores without its last axis"), fn)
    return scores, labels


def multiclass_hinge_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Multiclass hinge loss (Crammer–Singer): ``max_j (s_j + 1 - [j = y]) - s_y``.

    Difference from ``torch.nn.functional.multi_margin_loss``: that one averages the hinge of
    every wrong class over the ``num_classes`` classes (Weston–Watkins) and means over the
    batch; this takes the largest margin violation, per example.

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
    """The Euclidean projection of each last-axis vector onto the probability simplex.

    optax's ``projection_simplex``, with its arithmetic and its derivative.
    """
    n = z.shape[-1]
    zd = z.detach()  # (not no_grad: that would leave forward-mode AD on)
    z_sorted = torch.sort(zd, dim=-1, descending=True).values
    cumsum = z_sorted.cumsum(-1)
    k = torch.arange(1, n + 1, dtype=z.dtype, device=z.device)
    # optax's test, 1/k + z_(k) - cumsum_k / k > 0, holds at k = 1 whatever the magnitude
    # (the equivalent 1 + k z_(k) > cumsum_k rounds to False for scores ~1e30).
    count = (1 / k + (z_sorted - cumsum / k) > 0).sum(-1, keepdim=True).clamp_min(1)
    size = count.to(z.dtype)  # (an integer tensor would divide in the default dtype)
    # optax's order of operations: z - (cumsum - 1) / size would lose the 1 next to 1e30
    proba = torch.relu(1 / size + (zd - torch.gather(cumsum, -1, count - 1) / size))
    # optax's custom JVP, p' = s ⊙ (z' - ⟨s, z'⟩ / |s|) on the support s = {p > 0}, as the
    # derivative of a term worth 0 (autograd through the sort would also count the entries on
    # the support's edge, where p = 0).
    supp = proba > 0
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    # A node of its own: the two terms of the derivative (z' and its mean) are summed here
    # first, as optax's one-piece JVP does, before other paths add to z's gradient (summed
    # in another order, scores ~1e30 would swamp the loss's own ±1 terms).
    zc = z.clone()
    mean = torch.where(supp, zc, zero).sum(-1, keepdim=True) / supp.sum(-1, keepdim=True)
    centred = torch.where(supp, zc - mean, zero)
    return proba + (centred - centred.detach())


def multiclass_sparsemax_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Multiclass sparsemax loss (Martins & Astudillo 2016), per example.

    ``p = sparsemax(s)`` (the projection of ``s`` onto the simplex), then
    ``⟨p, s - s_y⟩ + (1 - ‖p‖²) / 2``: zero exactly when ``sparsemax(s)`` is the one-hot of
    the label. optax vmaps over a leading batch axis; this takes any leading shape. As optax's
    ``scores[label]``, a label in ``[-num_classes, 0)`` counts from the end and any other one
    out of range is clamped to ``[0, num_classes)``; ``-inf`` scores (masked classes) get
    probability 0 (a label at a ``-inf`` score gives ``inf``). The gradient is optax's (the
    projection's Jacobian on its support).

    Args:
        scores: the model's scores, ``[..., num_classes]`` (floating point).
        labels: integer class indices, broadcastable to ``scores.shape[:-1]`` (see above for
            labels out of range).

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
    n = s.shape[-1]
    # optax indexes scores[label]: a negative label counts from the end, then any label out
    # of range is clamped (jax's gather); read by a gather, so a -inf score elsewhere (a
    # masked class) is not multiplied by 0.
    labels = labels.to(torch.int64)
    index = torch.where(labels < 0, labels + n, labels).clamp(0, n - 1).expand(s.shape[:-1])
    label_score = torch.gather(s, -1, index.unsqueeze(-1))
    one_hot = c.one_hot(index, n, torch.bool)
    proba = _sparsemax(s)
    shifted = torch.where(one_hot, torch.zeros_like(s), s - label_score)
    shifted = torch.where(proba != 0, shifted, torch.zeros_like(s))
    out = (proba * shifted).sum(-1) + 0.5 * (1.0 - (proba * proba).sum(-1))
    return out.to(scores.dtype)
