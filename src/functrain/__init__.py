"""functrain: pure-function training for PyTorch, in the style of JAX and optax.

The public API: optimizer transforms and schedules (optax names), ``ft.tree`` pytree maths,
``TrainState`` and ``make_train_step``, per-sample gradients and DP-SGD. Submodules
``ft.logging``, ``ft.checkpoint``, ``ft.distributed``, ``ft.projections`` and ``ft.testing``
hold the rest; ``ft.contrib`` spells optax.contrib's names (also at the top level).

Example:
    >>> import torch, functrain as ft
    >>> params = {"w": torch.zeros(3)}
    >>> tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-2))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": torch.ones(3)}, state, params)
    >>> ft.apply_updates(params, updates)["w"]
    tensor([-0.0100, -0.0100, -0.0100])
"""

from functrain import (
    checkpoint,
    contrib,
    distributed,
    grads,
    logging,
    optim,
    projections,
    testing,
    train,
    tree,
)
from functrain.grads import *  # noqa: F403
from functrain.optim import *  # noqa: F403
from functrain.train import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [
    "tree",
    *optim.__all__,
    *train.__all__,
    *grads.__all__,
]
