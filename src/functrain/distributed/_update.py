"""The optimizer stage of a data-parallel step (internal), after the gradients were combined.

What both modes share: :class:`Updated`, the stage's result, and :func:`checked_grads`, the train
step's non-finite check (and loss unscaling) run on global values, so every rank takes the same
decision. Then the replicated mode (``shard_optimizer=False``), :func:`replicated_update`: every
rank holds the whole gradient and runs the train step's own optimizer stage (maybe fused, in
place). The sharded mode lives in :mod:`functrain.distributed._sharded_update`.

A ``grad_stats`` hook's ``update`` (:func:`grad_stats_update`) runs in the replicated mode on
every rank with the same inputs (all ranks' micro-batch stats, the global gradient), so its state
in ``state.extra`` stays replicated and its metrics are equal on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from functrain import tree
from functrain.train import fast
from functrain.train import faults as faults_lib
from functrain.train.grad_stats import MicroBatchStats
from functrain.train.train_step import _merge, _refuse_own_names

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


def grad_stats_update(
    step: DataParallelTrainStep,
    stats: MicroBatchStats | None,
    grads: Any,
    ok: torch.Tensor | None,
    extra: dict[str, Any],
    params: Any,
    metrics: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The hook's ``update`` on global values, as the train step runs it: its metrics join
    ``metrics``, its new state (kept on a skipped step) goes to the returned ``extra``."""
    hook = step._local.grad_stats
    if hook is None:
        return extra
    assert stats is not None
    hook_state = extra[hook.name] if hook.name in extra else hook.init(params)
    hook_metrics, new_hook_state = hook.update(stats, grads, hook_state)
    new_hook_state = step._local.faults.keep_if_skipped(ok, new_hook_state, hook_state)
    _merge(metrics, hook_metrics, "grad_stats")
    _refuse_own_names(metrics)  # grad_norm and the others are added later
    return {**extra, hook.name: new_hook_state}


def replicated_update(
    step: DataParallelTrainStep,
    grads: list[torch.Tensor],
    spec: Any,
    params: Any,
    opt_state: Any,
    extra: dict[str, Any],
    metrics: dict[str, torch.Tensor],
    stats: MicroBatchStats | None = None,
) -> Updated:
    """Every rank: the whole (identical) gradient, the whole optimizer state."""
    grads_tree, ok, new_extra = checked_grads(
        step, tree.unflatten(spec, grads), metrics, extra, params
    )
    new_extra = grad_stats_update(step, stats, grads_tree, ok, new_extra, params, metrics)
    stage = step._local.apply_optimizer  # the train step's stage (maybe fused, in place)
    # A DP-SGD step reports no grad_norm: the norm of the clipped sum before noise is not private.
    if step.norm_metrics and step.per_example_clip is None:
        metrics["grad_norm"] = tree.norm(grads_tree)
        if isinstance(stage, fast.FusedStage):  # a leading clip reuses the norm
            stage = stage.for_call(metrics["grad_norm"])
    applied = faults_lib.apply_guarded(
        stage,
        step.tx,
        grads_tree,
        opt_state,
        params,
        in_place=step.donate,
        ok=ok,
        value=metrics.get("loss"),  # the global mean loss: tx.update(..., value=)
    )
    update_norm = None
    if step.norm_metrics:
        if applied.updates is not None:
            update_norm = tree.norm(applied.updates)
        else:  # a fused stage reports the norm of the change instead of the updates
            update_norm = getattr(applied, "update_norm", None)
    return Updated(applied.params, applied.opt_state, new_extra, ok, update_norm)
