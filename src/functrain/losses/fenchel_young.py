"""Fenchel–Young losses (optax's ``make_fenchel_young_loss``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from functrain.losses import _common as c

__all__ = ["make_fenchel_young_loss"]


def make_fenchel_young_loss(
    max_fun: Callable[..., torch.Tensor],
) -> Callable[..., torch.Tensor]:
    r"""Builds the Fenchel–Young loss of a max function (Blondel et al. 2020).

    The loss is ``fy(scores, targets) = max_fun(scores) - ⟨targets, scores⟩`` over the last
    axis; leading axes are batch axes. ``max_fun`` is called on one ``[n]`` vector at a time
    (through ``torch.func.vmap``, so it must be vmap-compatible) and returns a scalar; with
    ``max_fun`` the log-sum-exp, ``fy`` is the softmax cross entropy. Extra arguments of the
    loss are passed on to ``max_fun`` unchanged (optax passes keyword arguments so and does
    not accept extra positional ones).

    Args:
        max_fun: a convex "max" of a vector, e.g. ``lambda s: torch.logsumexp(s, 0)``.

    Returns:
        ``fenchel_young_loss(scores, targets, *args, **kwargs)``, giving one loss per
        example (``scores.shape[:-1]`` broadcast with ``targets.shape[:-1]``).

    Example:
        >>> import torch, functrain as ft
        >>> fy = ft.losses.make_fenchel_young_loss(lambda s: torch.logsumexp(s, 0))
        >>> scores = torch.tensor([[1.2, -0.8, -0.5]])
        >>> fy(scores, torch.tensor([[1.0, 0.0, 0.0]]))
        tensor([0.2761])
    """
    if not callable(max_fun):
        raise TypeError(f"make_fenchel_young_loss: max_fun must be callable, got {max_fun!r}")

    def fenchel_young_loss(
        scores: torch.Tensor, targets: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        fn = "fenchel_young_loss"
        scores = c.tensor(scores, "scores", fn)
        targets = c.tensor(targets, "targets", fn)
        if scores.ndim == 0 or targets.ndim == 0:
            raise ValueError(f"{fn}: scores and targets need a last axis (they are vectors)")
        c.broadcast_together(scores, targets, ("scores", "targets"), fn)

        def one(s: torch.Tensor) -> torch.Tensor:
            return max_fun(s, *args, **kwargs)

        flat = scores.reshape(-1, scores.shape[-1])
        max_value = torch.func.vmap(one)(flat).reshape(scores.shape[:-1])
        return max_value - (targets * scores).sum(-1)

    return fenchel_young_loss
