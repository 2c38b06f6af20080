"""``compile=`` for the data-parallel step: two compiled regions around the eager collectives.

:class:`CompiledRegions` is a mixin of :class:`~functrain.distributed._train_step.DataParallelTrainStep`.
This rank's gradient stage runs as one ``torch.compile(fullgraph=True)`` graph
(:meth:`CompiledRegions._grad_core`); the all-reduces stay eager; then the non-finite check,
the replicated optimizer update, the kept buffers and the metrics run as a second graph
(:meth:`CompiledRegions._update_core`). Both go through
:class:`functrain.train.compiled.CompiledCore` (its seeding rule, error translation and
``recompile_limit`` note).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from functrain import tree
from functrain.distributed._update import checked_grads
from functrain.train import fast, faults, microbatch, rng
from functrain.train.state import TrainState

if TYPE_CHECKING:
    from functrain.train import compiled

__all__: list[str] = []  # internal


class CompiledRegions:
    """The ``compile=`` methods of the data-parallel step (internal mixin)."""

    _compiled_update: compiled.CompiledCore | None
    _local: Any
    _opt_guard: Any
    tx: Any
    norm_metrics: bool
    donate: bool

    def _grad_core(
        self,
        params: Any,
        buffers: Any,
        extra: dict[str, Any],
        batch: Any,
        split: microbatch.BatchSplit,
        key: torch.Tensor | None,
        devices: list[torch.device],
    ) -> Any:
        """This rank's gradient stage, compiled with ``compile=`` (as ``TrainStep._core``)."""
        slot = self._local._scale_slot  # dynamo cannot read the eager step's context variable
        if slot is not None:
            slot.scale = extra[faults.LOSS_SCALE_KEY].scale
        result = self._local.grad_stage(params, batch, split, buffers, key, devices)
        if slot is not None:
            slot.scale = None
        return result

    def _update_core(
        self,
        params: Any,
        opt_state: Any,
        grads: Any,
        extra: dict[str, Any],
        metrics: dict[str, torch.Tensor],
        new_buffers: Any,
        buffers: Any,
        step: torch.Tensor,
    ) -> tuple[Any, ...]:
        """After the collectives, compiled: the replicated update on the global gradient
        (:func:`~functrain.distributed._update.replicated_update`'s work, out of place as
        ``TrainStep._core``'s compiled update), the kept buffers and the metrics."""
        metrics = {name: value.reshape(()) for name, value in metrics.items()}  # see below
        grads, ok, new_extra = checked_grads(self, grads, metrics, extra, params)
        stage = self._local.apply_optimizer
        if self.norm_metrics:  # no per_example_clip: refused with compile= by the TrainStep
            metrics["grad_norm"] = tree.norm(grads)
            if isinstance(stage, fast.FusedStage):  # pure tx.update while compiling
                stage = stage.for_call(metrics["grad_norm"])
        applied = faults.apply_guarded(
            stage,
            self.tx,
            grads,
            opt_state,
            params,
            in_place=False,
            ok=ok,
            value=metrics.get("loss"),
        )
        update_norm = None
        if self.norm_metrics and applied.updates is not None:
            update_norm = tree.norm(applied.updates)
        kept = self._local.faults.keep_if_skipped(ok, new_buffers, buffers)
        self._local._finish_metrics(
            metrics, applied.params, applied.opt_state, update_norm, step.device
        )
        return applied.params, applied.opt_state, new_extra, kept, metrics

    def _finish_compiled(
        self, state: TrainState, combined: Any, metrics: dict[str, torch.Tensor], buffers: Any
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """The rest of a ``compile=`` step: the compiled update, then the new state."""
        assert self._compiled_update is not None
        params, opt_state, step, key = state.params, state.opt_state, state.step, state.key
        extra = self._local._full_extra(state.extra, params)
        grads = tree.unflatten(combined.spec, combined.grads)
        # 0-d metric inputs go in as 1-element tensors: dynamo would otherwise guard on the
        # NaN-ness of the reduced loss's value (one recompile at the first non-finite step).
        packed = {name: value.reshape(1) for name, value in metrics.items()}
        args = (params, opt_state, grads, extra, packed, combined.buffers, buffers, step)
        new_params, new_opt, new_extra, new_buffers, metrics = self._compiled_update.run(
            args, key=None, devices=[]
        )
        if self.donate:
            # Out of place: the state's memory was not written; consumed as the eager step's.
            state._consume("a data-parallel train step (donate=True)")
        new_key = None if key is None else rng.fold_in(key, 0)
        new_state = TrainState(step + 1, new_params, new_opt, new_buffers, new_key, new_extra)
        self._local.faults.after_compiled(new_extra)
        self._opt_guard.issue(new_state)
        return new_state, metrics
