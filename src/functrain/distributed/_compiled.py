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
(:func:`~functrain.distributed._agree.check_no_rank_failed`): if a region raised anywhere, the
failing rank raises its own exception (with a note naming the failing ranks) and the others
:class:`~functrain.distributed.DistributedStepError` naming each failing rank with its error's
type and message. Later calls exchange nothing more: the gradient region recompiles on one rank
alone (a new batch shape there), which the others cannot know, so a rank whose gradient region
raises later joins the step's collectives with zeros shaped as the first call's result and the
flag :data:`_FAILED` in the counts' all-reduce; every rank then exchanges the errors and raises
as on the first call (an object all-gather on that failing call only). This needs the flags on
the host (CPU tensors, gloo): with device tensors (NCCL) the flags are not read, and a later
failure raises on its rank alone while the others wait until the group's timeout. The update
region's inputs are replicated, so it recompiles on every rank together (a change of the state's
structure); a later failure of it raises on its rank alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from functrain import tree
from functrain.distributed import process
from functrain.distributed._agree import check_no_rank_failed
from functrain.distributed._uneven import _REFUSED, _on_host
from functrain.distributed._update import checked_grads
from functrain.train import compiled, fast, faults, gradient, microbatch, rng
from functrain.train.state import TrainState

__all__: list[str] = []  # internal

T = TypeVar("T")

# A rank's flag in the counts' all-reduce (beside _uneven's taken, empty and refused): its
# compiled gradient region raised on a call after the first.
_FAILED = 3.0
_FIRST_GRAD = "the first run of the compiled gradient region (its compilation included)"
_FIRST_UPDATE = "the first run of the compiled update region (its compilation included)"
_LATER_GRAD = "this step's compiled gradient region (a recompilation, e.g. for a new batch shape)"


class _ZeroResult:
    """A gradient stage result's structure, shapes, dtypes and devices (no tensor kept) and the
    stage's loss-kind records: zeros like it let a rank whose gradient region failed join the
    step's collectives."""

    def __init__(self, result: gradient.GradResult, metas: list[Any]) -> None:
        leaves, self.spec = tree.flatten(result.grads)
        self.grads = [(x.shape, x.dtype, x.device) for x in leaves]
        self.metrics = {n: (v.shape, v.dtype, v.device) for n, v in result.metrics.items()}
        self.metas = list(metas)

    def zeros(self, buffers: Any, metas: list[Any]) -> gradient.GradResult:
        """Zeros like the result; ``metas`` (emptied by the failed call) refilled as it was."""
        metas[:] = self.metas  # the step reads the loss kind (mean or LossSum) from them
        grads = [torch.zeros(s, dtype=d, device=v) for s, d, v in self.grads]
        metrics = {n: torch.zeros(s, dtype=d, device=v) for n, (s, d, v) in self.metrics.items()}
        return gradient.GradResult(tree.unflatten(self.spec, grads), metrics, buffers, None, True)


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
    # Set once the first call's regions ran on every rank (the result's shapes, a flag).
    _grad_zeros: _ZeroResult | None = None
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
            check_no_rank_failed(err, self.group, what)
            raise  # not reached: the check raises err
        check_no_rank_failed(None, self.group, what)
        return out

    def _compiled_rank_stage(self, run: Callable[[], T]) -> T:
        """This rank's stage (``run``, ending with its gradient result) through the compiled
        gradient region: agreed with the other ranks on the first call only (``run()`` as it is
        without ``compile=``)."""
        if self._compiled_grad is None or self._grad_zeros is not None:
            return run()
        out = self._agreed(run, _FIRST_GRAD)
        self._grad_zeros = _ZeroResult(out[-1], self._local.grad_stage.metas)  # type: ignore[index]
        return out

    def _join_failed(self, params: Any, buffers: Any) -> gradient.GradResult | None:
        """After the first call, zeros shaped as the gradient region's result, for a rank
        whose region raised to join the step's collectives with a flag (read on the host),
        or ``None`` when it cannot (no compile=, first call, alone, device tensors)."""
        if self._grad_zeros is None or not (self._joins_refused() and _on_host(params)):
            return None
        try:
            return self._grad_zeros.zeros(buffers, self._local.grad_stage.metas)
        except Exception:  # e.g. out of memory: the rank raises its own error alone
            return None

    def _raise_for_failures(self, flags: list[float], mine: float, error: Exception | None) -> None:
        """Every rank raises when one flagged :data:`_FAILED` (a refusing rank its own error
        too): the errors are exchanged first, on this failing call only."""
        if any(f == _FAILED for f in flags):
            own = error if mine in (_FAILED, _REFUSED) else None
            check_no_rank_failed(own, self.group, _LATER_GRAD)

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
