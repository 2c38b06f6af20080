"""Optimizers as pure gradient transformations (optax-compatible names and numerics)."""

from functrain.optim import (
    adaptive,
    aliases,
    base,
    clipping,
    hyperparams,
    multi_steps,
    scaling,
    schedules,
    wrappers,
)
from functrain.optim.adaptive import *  # noqa: F403
from functrain.optim.aliases import *  # noqa: F403
from functrain.optim.base import *  # noqa: F403
from functrain.optim.clipping import *  # noqa: F403
from functrain.optim.hyperparams import *  # noqa: F403
from functrain.optim.multi_steps import *  # noqa: F403
from functrain.optim.scaling import *  # noqa: F403
from functrain.optim.schedules import *  # noqa: F403
from functrain.optim.wrappers import *  # noqa: F403

__all__ = [
    *adaptive.__all__,
    *aliases.__all__,
    *base.__all__,
    *clipping.__all__,
    *hyperparams.__all__,
    *multi_steps.__all__,
    *scaling.__all__,
    *schedules.__all__,
    *wrappers.__all__,
]
