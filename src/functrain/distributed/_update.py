"""The optimizer stage of a data-parallel step (internal), after the gradients were combined.

What both modes share: :class:`Updated`, the stage's result, and :func:`checked_grads`, the train
step's non-finite check (and loss unscaling) run on global values, so every rank takes the same
decision. Then the replicated mode (``shard_optimizer=False``), :func:`replicated_update`: every
rank holds the whole gradient and runs the train step's own optimizer stage (maybe fused, in
place). The sharded mode lives in :mod:`functrain.distributed._sharded_update`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from functrain import tree
from functrain.train import faults as faults_lib
from functrain.train.train_step import _merge

if TYPE_CHECKING:
    from functrain.distributed.step import DataParallelTrainStep


class Updated(NamedTuple):
    """What the optimizer stage gives the step."""

    params: Any
    opt_state: Any
    extra: dict[str, Any]
    ok: torch.Tensor | None  # the non-finite check's verdict (None: not checked)
    update_norm: torch.Tensor | None  # norm of the whole update


def checked_grads(
    step: DataParallelTrainStep,
    grads: Any,
    metrics: dict[str, torch.Tensor],
    extra: dict[str, Any],
    params: Any,
) -> tuple[Any, torch.Tensor | None, dict[str, Any]]:
    """The train step's non-finite check (and loss unscaling) on global values."""
    check = step._local.faults.check(metrics, grads, extra, params)
    _merge(metrics, check.metrics, "the non-finite check")
    new_extra = {**extra, **check.extra} if check.extra else extra
    return check.grads, check.ok, new_extra


def replicated_update(
    step: DataParallelTrainStep,
    grads: list[torch.Tensor],
    spec: Any,
    params: Any,
    opt_state: Any,
    extra: dict[str, Any],
    metrics: dict[str, torch.Tensor],
) -> Updated:
    """Every rank: the whole (identical) gradient, the whole optimizer state."""
    grads_tree, ok, new_extra = checked_grads(
        step, tree.unflatten(spec, grads), metrics, extra, params
    )
    stage = step._local.apply_optimizer  # the train step's stage (maybe fused, in place)
    # A DP-SGD step reports no grad_norm: the norm of the clipped sum before noise is not private.
    if step.norm_metrics and step.per_example_clip is None:
        metrics["grad_norm"] = tree.norm(grads_tree)
        with_grad_norm = getattr(stage, "with_grad_norm", None)
        if with_grad_norm is not None:  # a leading clip reuses the norm
            stage = with_grad_norm(metrics["grad_norm"])
    applied = faults_lib.apply_guarded(
        stage, step.tx, grads_tree, opt_state, params, in_place=step.donate, ok=ok
    )
    update_norm = None
    if step.norm_metrics:
        if applied.updates is not None:
            update_norm = tree.norm(applied.updates)
        else:  # a fused stage reports the norm of the change instead of the updates
            update_norm = getattr(applied, "update_norm", None)
    return Updated(applied.params, applied.opt_state, new_extra, ok, update_norm)
