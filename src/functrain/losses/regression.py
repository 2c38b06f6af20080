"""Regression losses (optax's): element-wise errors and per-example cosine similarities.

None of them averages: ``squared_error(a, b).mean()`` is the mean squared error that
``torch.nn.functional.mse_loss`` returns by default.
"""

from __future__ import annotations

import math

import torch

from functrain.losses import _common as c
from functrain.losses._common import Axis, Scalar

__all__ = [
    "cosine_distance",
    "cosine_similarity",
    "huber_loss",
    "l2_loss",
    "log_cosh",
    "squared_error",
]


def _errors(
    predictions: torch.Tensor, targets: torch.Tensor | None, fn: str, same: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``predictions - targets`` (or ``predictions``), and the checked predictions."""
    predictions = c.floating(predictions, "predictions", fn)
    if targets is None:
        return predictions, predictions
    targets = c.tensor(targets, "targets", fn)
    if same:  # optax avoids broadcasting in "-" here
        c.same_shape(predictions, targets, ("predictions", "targets"), fn)
    else:
        c.broadcast_together(predictions, targets, ("predictions", "targets"), fn)
    return predictions - targets, predictions


def squared_error(predictions: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    r"""Element-wise squared error ``(predictions - targets)²``.

    Difference from ``torch.nn.functional.mse_loss``: no mean (``mse_loss`` is
    ``squared_error(a, b).mean()``), and ``targets`` must have the predictions' shape (no
    broadcasting, as optax); ``None`` stands for zeros.

    Args:
        predictions: predictions, any shape (floating point).
        targets: targets of the same shape, or ``None`` for zeros.

    Returns:
        The squared error of each element, of the predictions' shape.

    Example:
        >>> import torch, functrain as ft
        >>> ft.squared_error(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))
        tensor([1., 4.])
    """
    errors, _ = _errors(predictions, targets, "squared_error", same=True)
    return errors**2


def l2_loss(predictions: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    r"""Element-wise L2 loss ``0.5 · (predictions - targets)²`` (half :func:`squared_error`).

    The ``0.5`` is Bishop's convention ("Pattern Recognition and Machine Learning"), so the
    gradient is the error itself. ``torch.nn.functional.mse_loss`` has no ``0.5`` and means.

    Args:
        predictions: predictions, any shape (floating point).
        targets: targets of the same shape, or ``None`` for zeros.

    Returns:
        Half the squared error of each element, of the predictions' shape.

    Example:
        >>> import torch, functrain as ft
        >>> ft.l2_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))
        tensor([0.5000, 2.0000])
    """
    errors, _ = _errors(predictions, targets, "l2_loss", same=True)
    return 0.5 * errors**2


def huber_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    delta: Scalar = 1.0,
) -> torch.Tensor:
    r"""Element-wise Huber loss: ``0.5 e²`` for ``|e| ≤ δ``, ``0.5 δ² + δ (|e| - δ)`` beyond.

    Quadratic near zero and linear away from it; its gradient is the error clipped to
    ``[-δ, δ]``. Computed as optax's, ``q = min(|e|, δ)``, ``0.5 q² + δ (|e| - q)``.

    Difference from ``torch.nn.functional.huber_loss``: the same values (with ``delta``), but no
    mean; ``targets`` broadcasts and may be ``None`` (zeros). ``smooth_l1_loss`` is this
    divided by ``δ`` (its ``beta``).

    Args:
        predictions: predictions, any shape (floating point).
        targets: targets broadcastable with ``predictions``, or ``None`` for zeros.
        delta: where the loss turns from quadratic to linear.

    Returns:
        The Huber loss of each element, of the broadcast shape.

    Example:
        >>> import torch, functrain as ft
        >>> ft.huber_loss(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0]))
        tensor([0.1250, 2.5000])
    """
    errors, _ = _errors(predictions, targets, "huber_loss", same=False)
    abs_errors = errors.abs()
    bound = torch.as_tensor(delta, dtype=errors.dtype, device=errors.device)
    quadratic = torch.minimum(abs_errors, bound)
    # |e| - min(|e|, δ) rather than max(|e| - δ, 0): the gradient is not doubled at |e| = δ.
    linear = abs_errors - quadratic
    return 0.5 * quadratic**2 + delta * linear


def log_cosh(predictions: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    r"""Element-wise log-cosh loss ``log(cosh(predictions - targets))``.

    About ``e² / 2`` for small errors and ``|e| - log 2`` for large ones: a twice
    differentiable Huber. Computed as ``logaddexp(e, -e) - log 2``, finite for any finite
    ``e`` (``cosh`` itself overflows beyond ``|e| ≈ 89`` in float32); float16/bfloat16 in
    float32. PyTorch has no built-in equivalent.

    Args:
        predictions: predictions, any shape (floating point).
        targets: targets broadcastable with ``predictions``, or ``None`` for zeros.

    Returns:
        The log-cosh loss of each element, of the broadcast shape.

    Example:
        >>> import torch, functrain as ft
        >>> ft.log_cosh(torch.tensor([0.0, 1.0, 100.0]))
        tensor([ 0.0000,  0.4338, 99.3069])
    """
    errors, predictions = _errors(predictions, targets, "log_cosh", same=False)
    e = c.widen(errors)
    return (torch.logaddexp(e, -e) - math.log(2.0)).to(errors.dtype)


def cosine_similarity(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    epsilon: Scalar = 0.0,
    axis: Axis = -1,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Cosine similarity ``⟨a, b⟩ / (‖a‖ ‖b‖)`` along ``axis``, per example.

    Each squared norm is clipped from below at ``epsilon`` before its square root, as optax's:
    with the default ``epsilon=0`` a zero vector gives NaN.

    Difference from ``torch.nn.functional.cosine_similarity``: ``axis`` defaults to the last
    dimension (torch's ``dim=1``), and ``epsilon`` bounds each squared norm (torch's ``eps``,
    default ``1e-8``, bounds each norm); ``where`` masks elements out.

    Args:
        predictions: predicted vectors, ``[..., dim]`` (floating point).
        targets: target vectors, broadcastable with ``predictions`` (floating point).
        epsilon: lower bound of each squared norm.
        axis: the axis or axes of the vectors (``None``: all).
        where: optional mask of the elements to include.

    Returns:
        The cosine similarity of each pair: the broadcast shape without ``axis``.

    Example:
        >>> import torch, functrain as ft
        >>> a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> ft.cosine_similarity(a, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        tensor([ 1.0000, -0.7071])
    """
    return _cosine(predictions, targets, epsilon, axis, where, "cosine_similarity")


def _cosine(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    epsilon: Scalar,
    axis: Axis,
    where: torch.Tensor | None,
    fn: str,
) -> torch.Tensor:
    a = c.floating(predictions, "predictions", fn)
    b = c.floating(targets, "targets", fn)
    shape = c.broadcast_together(a, b, ("predictions", "targets"), fn)
    where = c.mask(where, fn)
    if where is not None:
        c.broadcastable(where, shape, ("where", "predictions"), fn)
    d = c.dims(axis, len(shape), fn)
    out_dtype = c.result_dtype(a, b)
    a, b = a.to(c.compute_dtype(out_dtype)), b.to(c.compute_dtype(out_dtype))
    if a.ndim < len(shape):  # keepdims sums below need the full rank
        a = a.reshape((1,) * (len(shape) - a.ndim) + tuple(a.shape))
    if b.ndim < len(shape):
        b = b.reshape((1,) * (len(shape) - b.ndim) + tuple(b.shape))
    a_norm2 = c.masked_sum(a * a, d, where, keepdim=True)
    b_norm2 = c.masked_sum(b * b, d, where, keepdim=True)
    # jnp.clip is jnp.maximum: a squared norm equal to epsilon gets half its gradient, as
    # optax's (torch.clamp_min would pass all of it).
    eps = torch.as_tensor(epsilon, dtype=a.dtype, device=a.device)
    a_unit = a / torch.sqrt(torch.maximum(a_norm2, eps))
    b_unit = b / torch.sqrt(torch.maximum(b_norm2, eps))
    return c.masked_sum(a_unit * b_unit, d, where).to(out_dtype)


def cosine_distance(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    epsilon: Scalar = 0.0,
    axis: Axis = -1,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Cosine distance ``1 - cosine_similarity(predictions, targets)``, per example.

    See :func:`cosine_similarity` for ``epsilon``, ``axis`` and ``where``.
    ``torch.nn.CosineEmbeddingLoss`` with target 1 computes this (up to its own ``1e-12``
    in the norms), then means.

    Args:
        predictions: predicted vectors, ``[..., dim]`` (floating point).
        targets: target vectors, broadcastable with ``predictions`` (floating point).
        epsilon: lower bound of each squared norm.
        axis: the axis or axes of the vectors (``None``: all).
        where: optional mask of the elements to include.

    Returns:
        The cosine distance of each pair: the broadcast shape without ``axis``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.cosine_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
        tensor(1.)
    """
    return 1.0 - _cosine(predictions, targets, epsilon, axis, where, "cosine_distance")
