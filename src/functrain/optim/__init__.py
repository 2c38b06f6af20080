"""Optimizers as pure gradient transformations (optax-compatible names and numerics)."""

from functrain.optim import (
    accumulation,
    adaptive,
    additive,
    additive_moment,
    aliases,
    aliases_extra,
    async_centering,
    backtracking,
    base,
    belief,
    clipped_newton,
    clipping,
    coin_betting,
    complex_split,
    conditional,
    constraints,
    cover_sets,
    decorrelated,
    distance_adaptive,
    dual_averaging,
    factorized,
    flat_layout,
    gradient_difference,
    gradient_scaling,
    hessian_diagonal,
    hyperparams,
    layerwise_moments,
    linear_algebra,
    linesearch,
    loss_scale,
    low_rank_projection,
    mechanic,
    mixed_momenta,
    model_based,
    monitoring,
    multi_steps,
    newton_schulz,
    normalization,
    optimistic,
    orthogonalized,
    param_map,
    parameter_free,
    plateau,
    polyak,
    primal_averaging,
    quasi_newton,
    random_utils,
    resilient,
    rms,
    rms_ratio,
    scaling,
    schedules,
    sharpness,
    slow_weights,
    stateful_hyperparams,
    updates,
    wrappers,
    zoom,
)
from functrain.optim.accumulation import *  # noqa: F403
from functrain.optim.adaptive import *  # noqa: F403
from functrain.optim.additive import *  # noqa: F403
from functrain.optim.additive_moment import *  # noqa: F403
from functrain.optim.aliases import *  # noqa: F403
from functrain.optim.aliases_extra import *  # noqa: F403
from functrain.optim.async_centering import *  # noqa: F403
from functrain.optim.backtracking import *  # noqa: F403
from functrain.optim.base import *  # noqa: F403
from functrain.optim.belief import *  # noqa: F403
from functrain.optim.clipped_newton import *  # noqa: F403
from functrain.optim.clipping import *  # noqa: F403
from functrain.optim.coin_betting import *  # noqa: F403
from functrain.optim.complex_split import *  # noqa: F403
from functrain.optim.conditional import *  # noqa: F403
from functrain.optim.constraints import *  # noqa: F403
from functrain.optim.cover_sets import *  # noqa: F403
from functrain.optim.decorrelated import *  # noqa: F403
from functrain.optim.distance_adaptive import *  # noqa: F403
from functrain.optim.dual_averaging import *  # noqa: F403
from functrain.optim.factorized import *  # noqa: F403
from functrain.optim.flat_layout import *  # noqa: F403
from functrain.optim.gradient_difference import *  # noqa: F403
from functrain.optim.gradient_scaling import *  # noqa: F403
from functrain.optim.hessian_diagonal import *  # noqa: F403
from functrain.optim.hyperparams import *  # noqa: F403
from functrain.optim.layerwise_moments import *  # noqa: F403
from functrain.optim.linear_algebra import *  # noqa: F403
from functrain.optim.linesearch import *  # noqa: F403
from functrain.optim.loss_scale import *  # noqa: F403
from functrain.optim.low_rank_projection import *  # noqa: F403
from functrain.optim.mechanic import *  # noqa: F403
from functrain.optim.mixed_momenta import *  # noqa: F403
from functrain.optim.model_based import *  # noqa: F403
from functrain.optim.monitoring import *  # noqa: F403
from functrain.optim.multi_steps import *  # noqa: F403
from functrain.optim.newton_schulz import *  # noqa: F403
from functrain.optim.normalization import *  # noqa: F403
from functrain.optim.optimistic import *  # noqa: F403
from functrain.optim.orthogonalized import *  # noqa: F403
from functrain.optim.param_map import *  # noqa: F403
from functrain.optim.parameter_free import *  # noqa: F403
from functrain.optim.plateau import *  # noqa: F403
from functrain.optim.polyak import *  # noqa: F403
from functrain.optim.primal_averaging import *  # noqa: F403
from functrain.optim.quasi_newton import *  # noqa: F403
from functrain.optim.random_utils import *  # noqa: F403
from functrain.optim.resilient import *  # noqa: F403
from functrain.optim.rms import *  # noqa: F403
from functrain.optim.rms_ratio import *  # noqa: F403
from functrain.optim.scaling import *  # noqa: F403
from functrain.optim.schedules import *  # noqa: F403
from functrain.optim.sharpness import *  # noqa: F403
from functrain.optim.slow_weights import *  # noqa: F403
from functrain.optim.stateful_hyperparams import *  # noqa: F403
from functrain.optim.updates import *  # noqa: F403
from functrain.optim.wrappers import *  # noqa: F403
from functrain.optim.zoom import *  # noqa: F403

__all__ = [
    *accumulation.__all__,
    *adaptive.__all__,
    *additive.__all__,
    *additive_moment.__all__,
    *aliases.__all__,
    *aliases_extra.__all__,
    *async_centering.__all__,
    *backtracking.__all__,
    *base.__all__,
    *belief.__all__,
    *clipped_newton.__all__,
    *clipping.__all__,
    *coin_betting.__all__,
    *complex_split.__all__,
    *conditional.__all__,
    *constraints.__all__,
    *cover_sets.__all__,
    *decorrelated.__all__,
    *distance_adaptive.__all__,
    *dual_averaging.__all__,
    *factorized.__all__,
    *flat_layout.__all__,
    *gradient_difference.__all__,
    *hessian_diagonal.__all__,
    *hyperparams.__all__,
    *layerwise_moments.__all__,
    *linear_algebra.__all__,
    *linesearch.__all__,
    *loss_scale.__all__,
    *low_rank_projection.__all__,
    *mechanic.__all__,
    *mixed_momenta.__all__,
    *newton_schulz.__all__,
    *model_based.__all__,
    *monitoring.__all__,
    *multi_steps.__all__,
    *normalization.__all__,
    *optimistic.__all__,
    *orthogonalized.__all__,
    *param_map.__all__,
    *parameter_free.__all__,
    *plateau.__all__,
    *polyak.__all__,
    *primal_averaging.__all__,
    *quasi_newton.__all__,
    *random_utils.__all__,
    *resilient.__all__,
    *rms.__all__,
    *rms_ratio.__all__,
    *gradient_scaling.__all__,
    *scaling.__all__,
    *schedules.__all__,
    *sharpness.__all__,
    *slow_weights.__all__,
    *stateful_hyperparams.__all__,
    *updates.__all__,
    *wrappers.__all__,
    *zoom.__all__,
]
