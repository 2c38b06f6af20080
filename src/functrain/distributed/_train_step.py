"""The :class:`DataParallelTrainStep` object: a data-parallel train step and its states.

Holds the step's construction (its own checks: :mod:`._train_step_args`), its state methods
(``init_state``, ``shard_state``, ``full_state``, ``prepare``) and ``__call__``, which runs this
rank's gradient stage, combines the ranks (:mod:`functrain.distributed._combine`) and updates
(:mod:`._train_step_update`). Built by, documented with and re-exported from
:func:`functrain.distributed.step.make_data_parallel_train_step`.

A rank whose batch is empty, or refused by the split, joins every collective on a stand-in
batch at zero weight, with a flag that makes every rank raise together where it must
(:mod:`._train_step_plan`). A rank whose own part of the step raises (its loss on its batch, out
of memory) makes every rank raise the same way (:mod:`functrain.distributed._failure`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch

from functrain import tree
from functrain.distributed import collectives, process, zero
from functrain.distributed._agree import check_layouts_agree
from functrain.distributed._combine import combine
from functrain.distributed._compiled import CompiledRegions
from functrain.distributed._failure import _FAILED, RankFailures, RankPart
from functrain.distributed._sums import with_aux_counts
from functrain.distributed._train_step_args import check_arguments
from functrain.distributed._train_step_plan import BatchPlans
from functrain.distributed._train_step_update import OptimizerStage

# _on_host and _raise_for_flags are looked up here at call time (tests replace them here).
from functrain.distributed._uneven import _TAKEN, _on_host, _raise_for_flags
from functrain.distributed.data import rank_key
from functrain.distributed.shardable import check_shardable
from functrain.optim.base import GradientTransformation, identity
from functrain.train import _step_checks, compiled, gradient
from functrain.train import step as step_lib
from functrain.train.grad_stats import GradStatsHook
from functrain.train.state import TrainState


class DataParallelTrainStep(CompiledRegions, RankFailures, BatchPlans, OptimizerStage):
    """A data-parallel train step; see :func:`make_data_parallel_train_step`.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain import distributed as dist
        >>> step = dist.make_data_parallel_train_step(lambda p, b: (p["w"] * b).mean(), ft.sgd(0.1))
        >>> isinstance(step, dist.DataParallelTrainStep)
        True
    """

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        tx: GradientTransformation,
        *,
        shard_optimizer: bool,
        group: process.Group,
        bucket_cap_mb: float,
        sync_buffers: Literal["broadcast", "none"],
        check_ranks: bool,
        per_example_clip: float | torch.Tensor | None = None,
        grad_stats: GradStatsHook | None = None,
        **local: Any,
    ) -> None:
        compile = local.get("compile", False)
        check_arguments(
            sync_buffers=sync_buffers,
            bucket_cap_mb=bucket_cap_mb,
            shard_optimizer=shard_optimizer,
            grad_stats=grad_stats,
            compile=compile,
        )
        # per_example_clip with shard_optimizer=True: the ranks' clipped sums are
        # reduce-scattered unweighted (_combine), and the sharded update tells dp_noisy_mean
        # where each piece sits (shard_index), so each piece gets its slice of the whole
        # parameter's noise, drawn from the noise key every rank holds.
        # The single-process step validates the arguments (per_example_clip's own checks
        # included) and owns the gradient stage. A DP step ignores aux metrics: no counts.
        wrapped = loss_fn if per_example_clip is not None else with_aux_counts(loss_fn)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self._local = step_lib.TrainStep(
                wrapped, tx, grad_stats=grad_stats, per_example_clip=per_example_clip, **local
            )
        for w in caught:  # attributed to the caller of make_data_parallel_train_step
            warnings.warn(w.message, w.category, stacklevel=3)
        self.per_example_clip = per_example_clip
        self._grad_stats = grad_stats
        self.loss_fn = loss_fn
        self.tx = tx
        self.shard_optimizer = bool(shard_optimizer)
        self.report = check_shardable(tx) if self.shard_optimizer else None
        self.group = group
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.sync_buffers = sync_buffers
        self.check_ranks = check_ranks
        self.donate = self._local.donate
        self.norm_metrics = self._local.norm_metrics
        self._checked = False
        self._opt_guard = _step_checks.OptStateGuard(self._check_opt_state)
        self._layout: zero.Layout | None = None
        self._state_map: zero.StateMap | None = None
        # compile=: the rank-local tensor work runs as two compiled regions around the eager
        # collectives (the TrainStep above validated the options and, compiling, seeds and
        # scales the loss the compiled way: no seeding in its grad stage, a LossScaleSlot).
        options = compiled.compile_options(compile, grad_backend=self._local.grad_backend)
        self._build_regions(options, local["seed_rng"])

    # -- states ---------------------------------------------------------------------------

    def init_state(
        self,
        params: Any,
        *,
        buffers: Any = None,
        seed: int | None = 0,
        key: torch.Tensor | None = None,
        extra: dict[str, Any] | None = None,
        broadcast: bool = True,
    ) -> TrainState:
        """A fresh state for this step: rank 0's parameters and buffers, this rank's optimizer state.

        With ``shard_optimizer=True`` the shard's identity goes to ``state.extra["zero_shard"]``
        (see :meth:`shard_state`).

        Args:
            params: the initial parameters (with ``broadcast``, only rank 0's values count).
            buffers: model buffers, or ``None``.
            seed: seed of the random key (same on every rank); see ``TrainState.create``.
            key: an explicit random key instead of ``seed``.
            extra: initial add-on states.
            broadcast: copy rank 0's parameters and buffers to every rank (a collective), so
                that all ranks start identical whatever their own initialisation. With
                ``check_ranks``, the ranks first check that their parameters and buffers have
                the same structure, shapes and dtypes.

        Raises:
            RankMismatchError: with ``broadcast`` and ``check_ranks``, ranks disagree on the
                structure, shapes or dtypes of the parameters or buffers (on every rank).
            DistributedStepError: with ``broadcast``, an earlier call of this step ended on
                this rank alone (see ``__call__``): refused before the broadcast.

        Example:
            >>> import torch, functrain as ft
            >>> from functrain import distributed as dist
            >>> step = dist.make_data_parallel_train_step(lambda p, b: (p["w"] * b).mean(), ft.adam(0.1), shard_optimizer=True)
            >>> state = step.init_state({"w": torch.zeros(4)})
            >>> state.opt_state[0].mu["w"].shape  # one rank: the whole parameter
            torch.Size([4])
        """
        if broadcast and process.world_size(self.group) > 1:
            self._refuse_out_of_step("init_state's broadcast")
            if self.check_ranks:  # before the broadcast, which cannot tell
                check_layouts_agree(params, buffers, self.group)
            src = zero._global(0, self.group)
            params = collectives.broadcast_tree(params, src=src, group=self.group)
            if buffers is not None:
                buffers = collectives.broadcast_tree(buffers, src=src, group=self.group)
        if not self.shard_optimizer:
            return TrainState.create(
                params=params, tx=self.tx, buffers=buffers, seed=seed, key=key, extra=extra
            )
        state = TrainState.create(
            params=params, tx=identity(), buffers=buffers, seed=seed, key=key, extra=extra
        )
        leaves, spec = tree.flatten(state.params)
        layout = self._layout_for(state.params)
        pieces = [p.clone() for p in layout.pieces(leaves)]
        return state.replace(
            opt_state=self.tx.init(tree.unflatten(spec, pieces)),
            extra={**state.extra, zero.SHARD_KEY: layout.identity()},
        )

    def shard_state(self, state: TrainState) -> TrainState:
        """This rank's state from a state holding the whole optimizer state (e.g. restored).

        The shard's identity (this rank, the world size and a fingerprint of the cut) goes to
        ``state.extra["zero_shard"]`` (plain ints and a string, saved with a checkpoint), so
        the step and ``full_state`` refuse it on another rank or world size. With
        ``shard_optimizer=False`` the state is returned as it is.

        Example:
            >>> import torch, functrain as ft
            >>> from functrain import distributed as dist
            >>> tx = ft.adam(0.1)
            >>> step = dist.make_data_parallel_train_step(lambda p, b: (p["w"] * b).mean(), tx, shard_optimizer=True)
            >>> whole = ft.TrainState.create(params={"w": torch.zeros(4)}, tx=tx)
            >>> step.shard_state(whole).opt_state[0].nu["w"].shape
            torch.Size([4])
        """
        if not self.shard_optimizer:
            return state
        state_map = self._map_for(state.params)
        return state.replace(
            opt_state=state_map.shard(state.opt_state),
            extra={**state.extra, zero.SHARD_KEY: state_map.layout.identity()},
        )

    def full_state(self, state: TrainState) -> TrainState:
        """The state with the whole optimizer state, gathered from all ranks (for checkpoints).

        A collective: every rank must call it; every rank gets the whole state and rank 0
        typically saves it. The result names no shard (``state.extra["zero_shard"]`` is
        dropped): it resumes on any world size through ``shard_state``. With
        ``shard_optimizer=False`` the state is returned as it is.

        Raises:
            RankMismatchError: ``state`` holds another rank's shard (or one of another world
                size), refused before the collective.
            DistributedStepError: an earlier call of this step ended on this rank alone (see
                ``__call__``): refused before the collective.

        Example:
            >>> import torch, functrain as ft
            >>> from functrain import distributed as dist
            >>> step = dist.make_data_parallel_train_step(lambda p, b: (p["w"] * b).mean(), ft.adam(0.1), shard_optimizer=True)
            >>> state = step.init_state({"w": torch.zeros(4)})
            >>> step.full_state(state).opt_state[0].mu["w"]
            tensor([0., 0., 0., 0.])
        """
        if not self.shard_optimizer:
            return state
        self._refuse_out_of_step("full_state's gather")
        state_map = self._map_for(state.params)
        # Gathering another rank's shard would assemble wrong rows: refused before the collective.
        state_map.layout.check_identity(state.extra, "gathering the optimizer state")
        return state.replace(
            opt_state=state_map.gather(state.opt_state, self.group),
            # The whole state is every rank's: it names no shard, and resumes on any world size.
            extra={k: v for k, v in state.extra.items() if k != zero.SHARD_KEY},
        )

    # -- the step -------------------------------------------------------------------------

    def _rank_part(self, state: TrainState, batch: Any) -> RankPart:
        """The checks of this rank's ``state``, its batch's split and its gradient stage:
        everything before the step's first collective."""
        _step_checks._check_state(state, "data-parallel train step")
        params, opt_state, buffers, key = state.params, state.opt_state, state.buffers, state.key
        extra = state.extra
        p_leaves = self._local._guard.check(params)
        self._opt_guard.check(state, params, opt_state)
        if self.shard_optimizer:
            # Every call (the guard caches by structure, which another rank's shard shares);
            # a few Python comparisons: no tensor read, no collective.
            self._layout_for(params).check_identity(extra, "data-parallel train step")
        if self.donate:
            _step_checks._check_no_overlap(p_leaves, params, "data-parallel train step")
        faults = self._local.faults
        token = faults.begin(extra, params)  # may raise NonFiniteError; sets the loss scale
        try:
            plan = self._plan_dp if self.per_example_clip is not None else self._plan
            split, batch, flag, refusal = plan(batch, _on_host(params))
            devices = gradient._devices(params)
            local_key = None if key is None else rank_key(key, process.rank(self.group))
            try:
                if self._compiled_grad is None:
                    result = self._local.grad_stage(
                        params, batch, split, buffers, local_key, devices
                    )
                else:
                    # The entries the step keeps exist from the first call: one compilation.
                    extra = self._local._full_extra(extra, params)
                    args = (params, buffers, extra, batch, split, local_key, devices)
                    result = self._compiled_grad.run(args, key=local_key, devices=devices)
            except Exception:
                if refusal is None:
                    raise
                raise refusal from None  # the stand-in batch failed too: the refusal says why
        finally:
            faults.end(token)
        return RankPart(split.num_micro_batches, flag, refusal, result)

    def prepare(self, state: TrainState) -> TrainState:
        """``state`` with the ``state.extra`` entries this step keeps (skip counters, loss scale).

        As :meth:`functrain.TrainStep.prepare`: use it to build checkpoint-restore targets.

        Example:
            >>> import torch, functrain as ft
            >>> from functrain import distributed as dist
            >>> step = dist.make_data_parallel_train_step(
            ...     lambda p, b: (p["w"] * b).mean(), ft.sgd(0.1), max_consecutive_skips=3)
            >>> sorted(step.prepare(step.init_state({"w": torch.ones(2)})).extra)
            ['nonfinite']
        """
        return self._local.prepare(state)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """One data-parallel training step on this rank's ``batch``.

        Returns the new state and the global metrics (identical on every rank).

        Raises:
            DistributedStepError: a collective failed, or another rank refused its batch or
                raised in its own part of the step (its loss, its checks); that rank raises its
                own error (see :mod:`functrain.distributed._failure`). Every rank raises
                together and no rank's state changes. Also raised at once, before any
                collective, once an earlier call ended on this rank alone (a
                ``KeyboardInterrupt`` or other ``BaseException`` mid-step, a failed collective,
                a failure the others could not be told of): a new call would pair its
                collectives with the others' out of step.
        """
        self._refuse_out_of_step("this call")
        try:
            return self._call(state, batch)
        except BaseException as err:
            if not isinstance(err, Exception):
                # KeyboardInterrupt (a signal mid-step), SystemExit, GeneratorExit: propagated
                # at once, unlike an Exception (which every rank raises together); the other
                # ranks may be in the step's collectives, so this rank takes no further part.
                self._mark_out_of_step(err, "interrupted in the middle of the step")
            raise

    def _call(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """:meth:`__call__`'s work."""
        part = self._this_rank(state, batch)
        result, flag = part.result, part.flag
        # A DP step's clipped sums are example-weighted: no LossSum (its stage has no metas).
        is_sum = self.per_example_clip is None and self._local.grad_stage.metas[-1].is_sum
        local, counts = self._weighed(part)
        params = opt_state = buffers = key = step = extra = None
        if flag != _FAILED:  # a failing rank (zeros) never reads its state: it may be the fault
            params, opt_state, buffers = state.params, state.opt_state, state.buffers
            key, step, extra = state.key, state.step, state.extra
            if flag != _TAKEN:
                result = result._replace(buffers=buffers)
            if not self._checked:
                self._check(None, params, opt_state, buffers, local, is_sum, result.stats)
        flags = self._flags(flag, result.metrics["loss"].device)
        try:
            combined = combine(self, params, result, local, counts, is_sum, flags)
        except Exception as err:  # a failed collective, or this rank failing in their midst
            self._mark_out_of_step(err, "raised in the step's collectives")
            raise
        if combined.flags is not None and combined.flags.device.type == "cpu":
            # One read of the summed flags, on the host (gloo's CPU tensors: no device sync):
            # all ranks raise together. On a device backend the flags are not read (it would
            # be a host sync in every step): a refusal other than an empty batch was raised
            # before the collectives (_plan), and an all-empty step has the 0/0 gradient that
            # nonfinite="skip" skips.
            host_flags = combined.flags.tolist()
            self._raise_for_failures(host_flags, flag, part.error)  # a rank's own part raised
            _raise_for_flags(host_flags, flag, part.error)
        if part.error is not None and flag == _FAILED:  # not reached: joined on CPU, flags read
            raise part.error
        metrics = combined.metrics
        if self._compiled_update is not None:  # replicated, no grad_stats (construction)
            return self._finish_compiled(state, combined, metrics, buffers)
        return self._eager_update(
            state,
            combined,
            metrics,
            params=params,
            opt_state=opt_state,
            buffers=buffers,
            key=key,
            step=step,
            extra=extra,
        )
