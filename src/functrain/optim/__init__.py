"""Optimizers as pure gradient transformations (optax-compatible names and numerics)."""

from functrain.optim import (
    accumulation,
    adaptive,
    additive,
    aliases,
    aliases_extra,
    base,
    clipping,
    factorized,
    hyperparams,
    loss_scale,
    multi_steps,
    orthogonalized,
    plateau,
    primal_averaging,
    rms,
    scaling,
    schedules,
    updates,
    wrappers,
)
from functrain.optim.accumulation import *  # noqa: F403
from functrain.optim.adaptive import *  # noqa: F403
from functrain.optim.additive import *  # noqa: F403
from functrain.optim.aliases import *  # noqa: F403
from functrain.optim.aliases_extra import *  # noqa: F403
from functrain.optim.base import *  # noqa: F403
from functrain.optim.clipping import *  # noqa: F403
from functrain.optim.factorized import *  # noqa: F403
from functrain.optim.hyperparams import *  # noqa: F403
from functrain.optim.loss_scale import *  # noqa: F403
from functrain.optim.multi_steps import *  # noqa: F403
from functrain.optim.orthogonalized import *  # noqa: F403
from functrain.optim.plateau import *  # noqa: F403
from functrain.optim.primal_averaging import *  # noqa: F403
from functrain.optim.rms import *  # noqa: F403
from functrain.optim.scaling import *  # noqa: F403
from functrain.optim.schedules import *  # noqa: F403
from functrain.optim.updates import *  # noqa: F403
from functrain.optim.wrappers import *  # noqa: F403

__all__ = [
    *accumulation.__all__,
    *adaptive.__all__,
    *additive.__all__,
    *aliases.__all__,
    *aliases_extra.__all__,
    *base.__all__,
    *clipping.__all__,
    *factorized.__all__,
    *hyperparams.__all__,
    *loss_scale.__all__,
    *multi_steps.__all__,
    *orthogonalized.__all__,
    *plateau.__all__,
    *primal_averaging.__all__,
    *rms.__all__,
    *scaling.__all__,
    *schedules.__all__,
    *updates.__all__,
    *wrappers.__all__,
]
