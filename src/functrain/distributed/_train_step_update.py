"""The data-parallel step's optimizer state and its update, once the ranks are combined.

:class:`OptimizerStage` is a mixin of :class:`~functrain.distributed._train_step.DataParallelTrainStep`.
It holds the layout of this rank's optimizer state (:class:`~functrain.distributed.zero.Layout`
and :class:`~functrain.distributed.zero.StateMap` for ``shard_optimizer=True``, built once from
the first parameters), the check that a given optimizer state was made for this step, and the
eager optimizer stage that follows the collectives: the replicated
(:mod:`functrain.distributed._update`) or sharded (:mod:`functrain.distributed._sharded_update`)
update, the kept buffers and the new state with its metrics. Kept apart from ``__call__``, which
runs this rank's part of the step and the collectives up to the point every rank may raise.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain import tree
from functrain.distributed import process, zero
from functrain.distributed._combine import Combined
from functrain.distributed._sharded_update import sharded_update
from functrain.distributed._update import replicated_update
from functrain.optim.base import GradientTransformation
from functrain.train import _step_checks, rng
from functrain.train.optimizer_stage import in_place_writes_started, reset_in_place_writes
from functrain.train.state import TrainState

__all__: list[str] = []  # internal


class OptimizerStage:
    """The optimizer state's layout and check, and the eager update (internal mixin)."""

    _local: Any
    _opt_guard: Any
    tx: GradientTransformation
    group: process.Group
    bucket_cap_mb: float
    shard_optimizer: bool
    donate: bool
    _layout: zero.Layout | None
    _state_map: zero.StateMap | None

    def _layout_for(self, params: Any) -> zero.Layout:
        if self._layout is None:
            self._layout = zero.Layout(
                tree.leaves(params),
                process.rank(self.group),
                process.world_size(self.group),
                self.bucket_cap_mb,
            )
        return self._layout

    def _map_for(self, params: Any) -> zero.StateMap:
        if self._state_map is None:
            self._state_map = zero.StateMap(self.tx, params, self._layout_for(params))
        return self._state_map

    def _check_opt_state(self, params: Any, opt_state: Any) -> None:
        """This rank's opt state was made for this step (its ``tx``, its shards)."""
        if self.shard_optimizer:
            self._map_for(params).check(opt_state, "data-parallel train step")
        else:
            _step_checks._check_opt_state(self.tx, params, opt_state)

    def _eager_update(
        self,
        state: TrainState,
        combined: Combined,
        metrics: dict[str, torch.Tensor],
        *,
        params: Any,
        opt_state: Any,
        buffers: Any,
        key: torch.Tensor | None,
        step: torch.Tensor,
        extra: dict[str, Any],
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """The eager optimizer stage on the ranks' ``combined`` gradients: the new state and
        ``metrics`` completed (``params`` to ``extra`` are the fields of ``state``)."""
        reset_in_place_writes()
        try:
            if self.shard_optimizer:  # no grad_stats (refused at construction)
                out = sharded_update(
                    self, combined.grads, combined.spec, params, opt_state, extra, metrics
                )
            else:
                out = replicated_update(
                    self,
                    combined.grads,
                    combined.spec,
                    params,
                    opt_state,
                    extra,
                    metrics,
                    combined.grad_stats,
                )
        except BaseException as err:
            if self.donate and in_place_writes_started():
                _step_checks.consume_torn(state, err, "a data-parallel train step (donate=True)")
            raise
        new_buffers = self._local.faults.keep_if_skipped(out.ok, combined.buffers, buffers)
        if self.donate:
            # Consumed only once every collective succeeded: a failed step leaves it usable.
            state._consume("a data-parallel train step (donate=True)")
        new_key = None if key is None else rng.fold_in(key, 0)
        new_state = TrainState(step + 1, out.params, out.opt_state, new_buffers, new_key, out.extra)
        self._local._finish_metrics(
            metrics, out.params, out.opt_state, out.update_norm, new_state.step.device
        )
        self._opt_guard.issue(new_state)
        return new_state, metrics
