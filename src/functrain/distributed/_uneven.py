"""Empty and refused rank batches in the data-parallel step (internal).

A rank whose batch is empty, or refused by the split, evaluates a stand-in batch of zeros
(:func:`_stand_in`) only to join every collective with tensors of the right shapes, at zero
weight; its flag (:data:`_TAKEN`, :data:`_EMPTY`, :data:`_REFUSED`) rides in the counts'
all-reduce, and :func:`_raise_for_flags` makes every rank raise together. Used by
:mod:`functrain.distributed._train_step`.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain import tree
from functrain.distributed.errors import DistributedStepError

_TAKEN, _EMPTY, _REFUSED = 0.0, 1.0, 2.0  # a rank's batch state, summed over the ranks' slots
_WEIGHTS = ("num_examples", "num_tokens")  # the metrics that weigh a rank's sums
# Zero examples per stand-in micro-batch: two, as batch norm in training mode refuses one value
# per channel (a stand-in that cannot be evaluated would leave the other ranks waiting).
_PER_MICRO_BATCH = 2


def _on_host(params: Any) -> bool:
    """Whether the step's tensors (so the flags all-reduced with its counts) are CPU tensors."""
    leaves = tree.leaves(params)
    return not leaves or leaves[0].device.type == "cpu"


def _is_empty(batch: Any) -> bool:
    """Whether every leaf of ``batch`` is a tensor of leading size 0."""
    leaves = tree.leaves(batch)
    return bool(leaves) and all(
        isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 0 for x in leaves
    )


def _stand_in(batch: Any, micro_batches: Any) -> Any:
    """``K`` micro-batches of :data:`_PER_MICRO_BATCH` zero examples each, shaped like
    ``batch``'s leaves past the first dimension, or ``None`` when ``batch`` has no such leaves
    or ``K`` is not a count or sizes."""
    leaves = tree.leaves(batch)
    if not leaves or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in leaves):
        return None
    if isinstance(micro_batches, int) and not isinstance(micro_batches, bool):
        k = micro_batches
    else:
        try:
            k = len(micro_batches)
        except TypeError:
            return None
    if k < 1:
        return None
    return tree.map(lambda x: x.new_zeros((k * _PER_MICRO_BATCH, *x.shape[1:])), batch)


def _raise_for_flags(flags: list[float], mine: float, refusal: Exception | None) -> None:
    """Raises on every rank when one refused its batch (this rank: its own error), or when
    every rank's batch was empty; the step has then written nothing."""
    refused = [r for r, f in enumerate(flags) if f == _REFUSED]
    if refused:
        if mine == _REFUSED and refusal is not None:
            raise refusal
        raise DistributedStepError(
            f"rank(s) {refused} refused their batch (their own error says why); no rank took "
            "this step and the state given to it is untouched"
        )
    if all(f == _EMPTY for f in flags):
        raise ValueError(
            "the batch is empty (leading size 0) on every rank; a step needs at least one "
            "example (the state given to the step is untouched)"
        )
