"""``ft.transforms``: the names of ``optax.transforms`` (0.2.8), so that ported optax code that
writes ``optax.transforms.masked(...)`` only changes its import.

Every name here is the same object as the top-level ``functrain`` one
(``ft.transforms.masked is ft.masked``), documented on the Optimizers page; nothing here is
new.

Typing aliases: ``ConditionFn`` and ``ShouldSkipUpdateFunction`` (annotations only, for the
callables :func:`conditionally_transform` / :func:`conditionally_mask` and :class:`MultiSteps`'s
``should_skip_update_fn``, e.g. :func:`skip_not_finite`, take) are attributes of this module
but not in ``__all__``: they are typing objects, not functrain's.

Example:
    >>> import torch
    >>> import functrain.transforms
    >>> tx = functrain.transforms.masked(functrain.transforms.clip(0.5), {"w": True, "b": False})
    >>> params = {"w": torch.zeros(2), "b": torch.zeros(1)}
    >>> updates, _ = tx.update({"w": torch.ones(2), "b": torch.ones(1)}, tx.init(params))
    >>> updates
    {'w': tensor([0.5000, 0.5000]), 'b': tensor([1.])}
"""

from functrain.grads import (
    per_example_global_norm_clip,
    per_example_layer_norm_clip,
)
from functrain.optim import (
    AddNoiseState,
    ApplyIfFiniteState,
    ConditionallyMaskState,
    ConditionallyTransformState,
    EmaState,
    MaskedNode,
    MaskedState,
    MonitorState,
    MultiSteps,
    MultiStepsState,
    NonNegativeParamsState,
    PartitionState,
    SnapshotState,
    TraceState,
    ZeroNansState,
    adaptive_grad_clip,
    add_decayed_weights,
    add_noise,
    apply_if_finite,
    chain,
    clip,
    clip_by_block_rms,
    clip_by_global_norm,
    conditionally_mask,
    conditionally_transform,
    ema,
    flatten,
    freeze,
    keep_params_nonnegative,
    masked,
    measure_with_ema,
    monitor,
    named_chain,
    partition,
    selective_transform,
    skip_large_updates,
    skip_not_finite,
    snapshot,
    trace,
    unitwise_clip,
    unitwise_norm,
    zero_nans,
)
from functrain.optim.types import ConditionFn, ShouldSkipUpdateFunction  # noqa: F401

__all__ = [
    "AddNoiseState",
    "ApplyIfFiniteState",
    "ConditionallyMaskState",
    "ConditionallyTransformState",
    "EmaState",
    "MaskedNode",
    "MaskedState",
    "MonitorState",
    "MultiSteps",
    "MultiStepsState",
    "NonNegativeParamsState",
    "PartitionState",
    "SnapshotState",
    "TraceState",
    "ZeroNansState",
    "adaptive_grad_clip",
    "add_decayed_weights",
    "add_noise",
    "apply_if_finite",
    "chain",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "conditionally_mask",
    "conditionally_transform",
    "ema",
    "flatten",
    "freeze",
    "keep_params_nonnegative",
    "masked",
    "measure_with_ema",
    "monitor",
    "named_chain",
    "partition",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
    "selective_transform",
    "skip_large_updates",
    "skip_not_finite",
    "snapshot",
    "trace",
    "unitwise_clip",
    "unitwise_norm",
    "zero_nans",
]
