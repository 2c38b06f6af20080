"""Optimizers as pure gradient transformations (optax-compatible names and numerics)."""

from functrain.optim import (
    accumulation,
    adadelta,
    adan,
    adaptive,
    additive,
    ademamix,
    aliases,
    aliases_extra,
    base,
    belief,
    clipping,
    conditional,
    constraints,
    factorized,
    hyperparams,
    lookahead,
    loss_scale,
    multi_steps,
    novograd,
    optimistic,
    orthogonalized,
    plateau,
    polyak,
    primal_averaging,
    rms,
    rprop,
    scaling,
    schedules,
    sm3,
    updates,
    wrappers,
    yogi,
)
from functrain.optim.accumulation import *  # noqa: F403
from functrain.optim.adadelta import *  # noqa: F403
from functrain.optim.adan import *  # noqa: F403
from functrain.optim.adaptive import *  # noqa: F403
from functrain.optim.additive import *  # noqa: F403
from functrain.optim.ademamix import *  # noqa: F403
from functrain.optim.aliases import *  # noqa: F403
from functrain.optim.aliases_extra import *  # noqa: F403
from functrain.optim.base import *  # noqa: F403
from functrain.optim.belief import *  # noqa: F403
from functrain.optim.clipping import *  # noqa: F403
from functrain.optim.conditional import *  # noqa: F403
from functrain.optim.constraints import *  # noqa: F403
from functrain.optim.factorized import *  # noqa: F403
from functrain.optim.hyperparams import *  # noqa: F403
from functrain.optim.lookahead import *  # noqa: F403
from functrain.optim.loss_scale import *  # noqa: F403
from functrain.optim.multi_steps import *  # noqa: F403
from functrain.optim.novograd import *  # noqa: F403
from functrain.optim.optimistic import *  # noqa: F403
from functrain.optim.orthogonalized import *  # noqa: F403
from functrain.optim.plateau import *  # noqa: F403
from functrain.optim.polyak import *  # noqa: F403
from functrain.optim.primal_averaging import *  # noqa: F403
from functrain.optim.rms import *  # noqa: F403
from functrain.optim.rprop import *  # noqa: F403
from functrain.optim.scaling import *  # noqa: F403
from functrain.optim.schedules import *  # noqa: F403
from functrain.optim.sm3 import *  # noqa: F403
from functrain.optim.updates import *  # noqa: F403
from functrain.optim.wrappers import *  # noqa: F403
from functrain.optim.yogi import *  # noqa: F403

__all__ = [
    *accumulation.__all__,
    *adadelta.__all__,
    *adan.__all__,
    *adaptive.__all__,
    *additive.__all__,
    *ademamix.__all__,
    *aliases.__all__,
    *aliases_extra.__all__,
    *base.__all__,
    *belief.__all__,
    *clipping.__all__,
    *conditional.__all__,
    *constraints.__all__,
    *factorized.__all__,
    *hyperparams.__all__,
    *lookahead.__all__,
    *loss_scale.__all__,
    *multi_steps.__all__,
    *novograd.__all__,
    *optimistic.__all__,
    *orthogonalized.__all__,
    *plateau.__all__,
    *polyak.__all__,
    *primal_averaging.__all__,
    *rms.__all__,
    *rprop.__all__,
    *scaling.__all__,
    *schedules.__all__,
    *sm3.__all__,
    *updates.__all__,
    *wrappers.__all__,
    *yogi.__all__,
]
