"""Per-sample and per-micro-batch gradients, gradient statistics and DP-SGD."""

from functrain.grads import clipping, noise_scale, per_sample, privacy, stats, streaming
from functrain.grads.clipping import *  # noqa: F403
from functrain.grads.noise_scale import *  # noqa: F403
from functrain.grads.per_sample import *  # noqa: F403
from functrain.grads.privacy import *  # noqa: F403
from functrain.grads.stats import *  # noqa: F403
from functrain.grads.streaming import *  # noqa: F403

__all__ = [
    *clipping.__all__,
    *noise_scale.__all__,
    *per_sample.__all__,
    *privacy.__all__,
    *stats.__all__,
    *streaming.__all__,
]
