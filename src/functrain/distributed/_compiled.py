"""``compile=`` for the data-parallel step: two compiled regions around the eager collectives.

:class:`CompiledRegions` is a mixin of :class:`~functrain.distributed._train_step.DataParallelTrainStep`.
This rank's gradient stage runs as one ``torch.compile(fullgraph=True)`` graph
(:meth:`CompiledRegions._grad_core`); the all-reduces stay eager; then the non-finite check,
the replicated optimizer update, the kept buffers and the metrics run as a second graph
(:meth:`CompiledRegions._update_core`). Both go through
:class:`functrain.train.compiled.CompiledCore` (its seeding rule, error translation and
``recompile_limit`` note).

A region that fails on one rank only (no compiler on one host, a rank-specific batch shape that
dynamo cannot trace, an out-of-memory error) would leave the other ranks in the step's
collectives until the group's timeout. So on the first call, which compiles both regions on
every rank, the ranks exchange one small object after each region
(:func:`~functrain.distributed._agree.check_no_rank_failed`; the first one covers this rank's
whole part of the step, its checks and split included): if a region raised anywhere, the
failing rank raises its own exception (with a note naming the failing ranks) and the others
:class:`~functrain.distributed.DistributedStepError` naming each failing rank with its error's
type and message. Later calls exchange nothing more: the gradient region recompiles on one rank
alone (a new batch shape there), which the others cannot know, so a rank whose gradient region
raises later joins the step's collectives on zeros with a flag, as an eager step's failing rank
does (:mod:`._failure`, where the flags need CPU tensors, gloo). The update region's inputs are
replicated, so it recompiles on every rank together (a change of the state's structure); a
later failure of it raises on its rank alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from functrain import tree
from functrain.distributed import process
from functrain.distributed._agree import check_no_rank_failed
from functrain.distributed._update import checked_grads
from functrain.train import compiled, fast, faults, microbatch, rng
from functrain.train.state import TrainState

__all__: list[str] = []  # internal

T = TypeVar("T")

_FIRST_GRAD = (
    "the ranks' own part of the first data-parallel step (the checks of the state, the batch's "
    "split, the first run of the compiled gradient region, its compilation included)"
)
_FIRST_UPDATE = "the first run of the compiled update region (its compilation included)"


class CompiledRegions:
    """The ``compile=`` methods of the data-parallel step (internal mixin)."""

    _compiled_grad: compiled.CompiledCore | None
    _compiled_update: compiled.CompiledCore | None
    _local: Any
    _opt_guard: Any
    tx: Any
    norm_metrics: bool
    donate: bool
    group: process.Group
    _joins_refused: Callable[[], bool]
    _lost: Callable[[Exception], None]  # an exchange failed: this rank is out of step
    # Set once the first call's update region ran on every rank.
    _update_agreed: bool = False

    def _build_regions(self, options: dict[str, Any] | None, seed_rng: bool) -> None:
        """The two compiled regions (``None`` without ``compile=``)."""
        self._compiled_grad = self._compiled_update = None
        if options is not None:
            metas = self._local.grad_stage.metas
            self._compiled_grad = compiled.CompiledCore(
                self._grad_core, options, seed_rng=seed_rng, metas=metas
            )
            self._compiled_update = compiled.CompiledCore(
                self._update_core, options, seed_rng=False, metas=[]
            )

    def _agreed(self, run: Callable[[], T], what: str) -> T:
        """``run()``, then (several ranks) every rank learns whether it raised anywhere: all
        raise together (:func:`~functrain.distributed._agree.check_no_rank_failed`)."""
        if not self._joins_refused():
            return run()
        try:
            out = run()
        except Exception as err:
            check_no_rank_failed(err, self.group, what, on_lost=self._lost)
            raise  # not reached: the check raises err
        check_no_rank_failed(None, self.group, what, on_lost=self._lost)
        return out

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
        update = self._compiled_update
        if self._update_agreed:
            out = update.run(args, key=None, devices=[])
        else:  # before the state is consumed: a rank whose region failed leaves it usable
            out = self._agreed(lambda: update.run(args, key=None, devices=[]), _FIRST_UPDATE)
            self._update_agreed = True
        new_params, new_opt, new_extra, new_buffers, metrics = out
        if self.donate:
            # Out of place: the state's memory was not written; consumed as the eager step's.
            state._consume("a data-parallel train step (donate=True)")
        new_key = None if key is None else rng.fold_in(key, 0)
        new_state = TrainState(step + 1, new_params, new_opt, new_buffers, new_key, new_extra)
        self._local.faults.after_compiled(new_extra)
        self._opt_guard.issue(new_state)
        return new_state, metrics
