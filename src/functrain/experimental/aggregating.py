"""Aggregators, as ``optax.experimental.aggregating``: per-element gradients to one update.

An :class:`Aggregator` is a :class:`~functrain.GradientTransformation` whose ``update`` takes
*per-element* updates, each leaf of shape ``(*batch_shape, *param.shape)`` (what
:func:`functrain.per_sample_grads` returns, with ``batch_shape = (batch_size,)``), and returns
one update of the parameters' shape. :func:`process` joins a per-element preprocessor, an
aggregator and an ordinary optimizer; :func:`add_mean_variance_to_opt` makes any optimizer also
track the per-element mean and variance of the gradients (an EMA over steps, read with
:func:`get_unbiased_mean_and_variance_ema`); accumulation over micro-batches merges the batches'
means and sums of squared differences with Chan et al.'s pairwise formula, as optax does.

Nothing in an ``update`` reads a tensor value on the host: where optax branches with
``lax.cond`` (in :func:`process`, the postprocessor runs only when the accumulator is ready),
both branches are computed and ``torch.where`` keeps one, so a step compiles into one graph
(``torch.compile(fullgraph=True)``).

Differences from optax: :func:`process` runs the postprocessor at every micro-step of an
accumulating aggregator and discards its results until the accumulator is ready (no host
read); per-batch statistics of float16/bfloat16 leaves are computed in float32 and rounded once;
``PerElementMeanAndVarianceEMAState.ema_decay`` is float64 when a parameter is float64 (optax:
float32); bad arguments (a non-positive ``accumulation_steps`` in every function, an
``ema_decay`` outside ``[0, 1)``, a ``sample_size`` below 2, out-of-range or repeated axes,
updates whose shapes do not match the state) raise errors naming them.

Example:
    Per-sample gradients of a least-squares loss, averaged, then Adam: the same step as Adam on
    the batch gradient.

    >>> import torch, functrain as ft
    >>> from functrain.experimental import aggregating
    >>> params = {"w": torch.zeros(2)}
    >>> batch = {"x": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "y": torch.tensor([1.0, 2.0])}
    >>> loss_fn = lambda p, b: ((b["x"] @ p["w"] - b["y"]) ** 2).mean()
    >>> opt = aggregating.process(
    ...     ft.identity(), aggregating.average_per_element_updates(), ft.adam(0.1)
    ... )
    >>> state = opt.init(params)
    >>> grads = ft.per_sample_grads(loss_fn, params, batch)  # leaves of shape (2, 2)
    >>> updates, state = opt.update(grads, state, params)
    >>> updates["w"]  # Adam's first step: -0.1 * sign(mean gradient)
    tensor([0.1000, 0.1000])
"""

from __future__ import annotations

from functrain.experimental._aggregating_core import (
    AccumulateAvgUpdatesState,
    Aggregator,
    AggregatorUpdateFn,
    accumulate_avg_updates,
    average_incrementally_updates,
    average_per_element_updates,
    process,
)

# optax's type aliases of this module, for annotations (not in ``__all__``).
from functrain.experimental._aggregating_core import AggregatedUpdates as AggregatedUpdates
from functrain.experimental._aggregating_core import MaybeAxis as MaybeAxis
from functrain.experimental._aggregating_core import PerElementUpdates as PerElementUpdates
from functrain.experimental._aggregating_stats import (
    PerElementMeanAndSumSqDiffGradsState,
    PerElementMeanAndVarianceEMAState,
    add_mean_variance_to_opt,
    get_batch_size_from_per_elt_updates,
    get_per_element_mean_and_sum_sq_diff_grads,
    get_unbiased_mean_and_variance_ema,
    track_per_element_mean_and_variance_with_ema,
)

__all__ = [
    "AccumulateAvgUpdatesState",
    "Aggregator",
    "AggregatorUpdateFn",
    "PerElementMeanAndSumSqDiffGradsState",
    "PerElementMeanAndVarianceEMAState",
    "accumulate_avg_updates",
    "add_mean_variance_to_opt",
    "average_incrementally_updates",
    "average_per_element_updates",
    "get_batch_size_from_per_elt_updates",
    "get_per_element_mean_and_sum_sq_diff_grads",
    "get_unbiased_mean_and_variance_ema",
    "process",
    "track_per_element_mean_and_variance_with_ema",
]
