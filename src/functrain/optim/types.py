"""optax's typing aliases, for annotations in code ported from optax (``params: ft.Params``).

They describe, they do not check: every pytree of tensors is a ``Params``/``Updates``/
``OptState``, and any callable of the right form is a ``ConditionFn`` or a
``ShouldSkipUpdateFunction``. ``ft.Params``, ``ft.Updates``, ``ft.OptState``,
``ft.ScalarOrSchedule``, ``ft.MaskOrFn``, ``ft.TransformUpdateExtraArgsFn`` (optax's top level)
and ``ft.transforms.ConditionFn``, ``ft.transforms.ShouldSkipUpdateFunction`` (optax.transforms)
are these objects. Differences from optax: the pytree aliases are ``typing.Any`` (PyTorch has no
``ArrayTree`` union worth spelling), and ``TransformUpdateExtraArgsFn`` is
:class:`TransformUpdateFn`, since every functrain ``update`` takes ``**extra_args``.

Example:
    >>> import torch, functrain as ft
    >>> def loss(params: ft.Params, x: torch.Tensor) -> torch.Tensor:
    ...     return (params["w"] * x).sum()
    >>> loss({"w": torch.ones(2)}, torch.ones(2))
    tensor(2.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import OptState, Params, TransformUpdateFn, Updates
from functrain.optim.conditional import ConditionFn

__all__ = [
    "ConditionFn",
    "MaskOrFn",
    "OptState",
    "Params",
    "ScalarOrSchedule",
    "ShouldSkipUpdateFunction",
    "TransformUpdateExtraArgsFn",
    "Updates",
]

TransformUpdateExtraArgsFn = TransformUpdateFn
MaskOrFn = Any | Callable[[Params], Any] | None
# MultiSteps' ``should_skip_update_fn(updates, gradient_step, params) -> (skip, skip_state)``.
ShouldSkipUpdateFunction = Callable[[Updates, torch.Tensor, Params], tuple[torch.Tensor, Any]]
