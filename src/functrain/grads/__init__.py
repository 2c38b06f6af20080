"""Per-sample and per-micro-batch gradients, gradient statistics, DP-SGD and its accounting."""

from functrain.grads import (
    accounting,
    clipping,
    cosine,
    noise_scale,
    per_sample,
    poisson,
    privacy,
    prv,
    stats,
    streaming,
)
from functrain.grads.accounting import *  # noqa: F403
from functrain.grads.clipping import *  # noqa: F403
from functrain.grads.cosine import *  # noqa: F403
from functrain.grads.noise_scale import *  # noqa: F403
from functrain.grads.per_sample import *  # noqa: F403
from functrain.grads.poisson import *  # noqa: F403
from functrain.grads.privacy import *  # noqa: F403
from functrain.grads.prv import *  # noqa: F403
from functrain.grads.stats import *  # noqa: F403
from functrain.grads.streaming import *  # noqa: F403

__all__ = [
    *accounting.__all__,
    *clipping.__all__,
    *cosine.__all__,
    *noise_scale.__all__,
    *per_sample.__all__,
    *poisson.__all__,
    *privacy.__all__,
    *prv.__all__,
    *stats.__all__,
    *streaming.__all__,
]
