"""Optimizer aliases: short chains of primitive transforms with optax's names and defaults."""

from __future__ import annotations

from typing import Any

import torch

from functrain.optim import adaptive, scaling
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, chain, identity

__all__ = [
    "adam",
    "adamw",
    "sgd",
]


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    Update rule: ``t ← momentum · t + g``; ``p ← p − lr · t`` (Nesterov: ``p ← p − lr · (g +
    momentum · t)``).

    Matches ``torch.optim.SGD(lr, momentum, nesterov=...)`` with ``dampening=0``. Weight decay
    is a separate transform here: ``chain(add_decayed_weights(wd), sgd(lr))`` equals PyTorch's
    coupled ``weight_decay=wd``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.sgd(0.1, momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> u, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
        >>> ft.apply_updates(params, u)["w"]
        tensor([0.9000, 0.9000])
    """
    return chain(
        scaling.trace(momentum, nesterov, accumulator_dtype)
        if momentum is not None
        else identity(),
        scaling.scale_by_learning_rate(learning_rate),
    )


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Adam: :func:`scale_by_adam` followed by the learning rate.

    Matches ``torch.optim.Adam`` (eps outside the square root, same bias correction).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adam(1e-3)
        >>> params = {"w": torch.zeros(3)}
        >>> u, state = tx.update({"w": torch.ones(3)}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.0010, -0.0010, -0.0010])
    """
    return chain(
        adaptive.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        scaling.scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    Update rule: ``p ← p − lr · (adam(g) + weight_decay · p)``.

    Differences from ``torch.optim.AdamW``: the default ``weight_decay`` is optax's ``1e-4``
    (PyTorch's is ``1e-2``); the maths is otherwise the same, and so are the trajectories.
    ``mask`` (a pytree of booleans or a callable) limits decay to some parameters.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adamw(1e-3, weight_decay=0.01)
        >>> params = {"w": torch.ones(2)}
        >>> u, _ = tx.update({"w": torch.ones(2)}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.0010, -0.0010])
    """
    return chain(
        adaptive.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        scaling.add_decayed_weights(weight_decay, mask),
        scaling.scale_by_learning_rate(learning_rate),
    )
