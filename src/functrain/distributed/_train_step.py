"""The :class:`DataParallelTrainStep` object: a data-parallel train step and its states.

Holds the step's construction and checks, its state methods (``init_state``, ``shard_state``,
``full_state``, ``prepare``) and ``__call__``, which runs this rank's gradient stage, combines
the ranks (:mod:`functrain.distributed._combine`) and updates (:mod:`functrain.distributed._update`
or :mod:`functrain.distributed._sharded_update`). Built by, documented with and re-exported from
:func:`functrain.distributed.step.make_data_parallel_train_step`.

A rank whose batch is empty, or refused by the split, evaluates a stand-in batch of zeros only
to join every collective with tensors of the right shapes, at zero weight; a flag per rank in
the counts' all-reduce then tells every rank whether to raise (a refusal anywhere, or every
batch empty) before anything is written, instead of leaving the others in a collective until
the group's timeout. A rank whose own part of the step raises (its loss on its batch, out of
memory) makes every rank raise the same way (:mod:`functrain.distributed._failure`).
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
from functrain.distributed._sharded_update import sharded_update
from functrain.distributed._sums import COUNT, with_aux_counts
from functrain.distributed._uneven import (
    _EMPTY,
    _PER_MICRO_BATCH,
    _REFUSED,
    _TAKEN,
    _WEIGHTS,
    _is_empty,
    _on_host,
    _raise_for_flags,
    _stand_in,
)
from functrain.distributed._update import replicated_update
from functrain.distributed.data import rank_key
from functrain.distributed.shardable import check_shardable
from functrain.optim.base import GradientTransformation, identity
from functrain.train import _step_checks, compiled, dp_stage, gradient, microbatch, rng
from functrain.train import step as step_lib
from functrain.train.grad_stats import GradStatsHook
from functrain.train.optimizer_stage import in_place_writes_started, reset_in_place_writes
from functrain.train.state import TrainState


class DataParallelTrainStep(CompiledRegions, RankFailures):
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
        if sync_buffers not in ("broadcast", "none"):
            raise ValueError(f"sync_buffers must be 'broadcast' or 'none', got {sync_buffers!r}")
        if (
            isinstance(bucket_cap_mb, bool)
            or not isinstance(bucket_cap_mb, (int, float))
            or bucket_cap_mb <= 0
        ):
            raise ValueError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
        if grad_stats is not None and shard_optimizer:
            # The hook's update needs the whole global gradient; a ZeRO-1 rank holds only its
            # pieces, and gathering the rest would cost a gradient-sized all-gather per step.
            raise ValueError(
                "grad_stats is not supported with shard_optimizer=True (the hook needs the "
                "whole combined gradient, which a ZeRO-1 rank does not hold): use "
                "shard_optimizer=False"
            )
        compile = local.get("compile", False)
        if compile is not False and (shard_optimizer or grad_stats is not None):
            # Both would need their own compiled regions around collectives (the sharded
            # update's all-gather, the hook's all-gathered stats); refused, not run eagerly.
            which = "shard_optimizer=True" if shard_optimizer else "grad_stats"
            raise ValueError(
                f"compile= is not supported with {which} in a data-parallel step: use "
                f"compile=False, or drop {which}"
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

    def _joins_refused(self) -> bool:
        """Whether a refused or empty batch still joins the step's collectives (several ranks)."""
        return process.is_distributed() and process.world_size(self.group) > 1

    def _plan(
        self, batch: Any, host_flags: bool
    ) -> tuple[microbatch.BatchSplit, Any, float, Exception | None]:
        """This rank's split, the batch to evaluate, its flag and the refusal (if any).

        An empty batch, or one the split refuses, is replaced by a stand-in of ``K``
        micro-batches of two zero examples (the same leaf shapes past the first): its gradient
        stage gives tensors of the right shapes for every collective, which the step then
        zeroes. Alone (world size 1), or when no stand-in can be built (non-tensor or 0-d
        leaves), the refusal is raised here; so is any refusal (an empty batch with
        ``grad_stats`` included) when the flags live on a device (``host_flags`` false):
        reading them there would be a host sync in every step.
        """
        k = self._local.micro_batches
        try:
            return microbatch.split_batch(batch, k), batch, _TAKEN, None
        except (ValueError, TypeError) as caught:
            if not self._joins_refused():
                raise
            stand_in = _stand_in(batch, k)
            if stand_in is None:
                raise
            flag, err = _REFUSED, caught
            if isinstance(k, int) and _is_empty(batch):
                if self._grad_stats is None:
                    flag = _EMPTY
                else:
                    # A hook's per-micro-batch statistics have no meaning for K micro-batches
                    # of no examples (noise_scale_hook's variance estimate would count them).
                    err = ValueError(
                        "the batch is empty (leading size 0) on this rank, which a step with "
                        "grad_stats refuses (its per-micro-batch statistics need examples in "
                        "every micro-batch): give every rank at least micro_batches examples"
                    )
            if not host_flags and flag == _REFUSED:
                raise err from None  # the flags will not be read: refused before the collectives
            k_in = len(tree.leaves(stand_in)[0]) // _PER_MICRO_BATCH
            return microbatch.split_batch(stand_in, k_in), stand_in, flag, err

    def _plan_dp(
        self, batch: Any, host_flags: bool
    ) -> tuple[microbatch.BatchSplit, Any, float, Exception | None]:
        """:meth:`_plan` for a DP-SGD step, whose split takes small and empty batches
        (Poisson sampling: fewer micro-batches, or none); a batch it refuses (ragged leaves)
        joins the collectives on a stand-in with the refusal flag, as in :meth:`_plan`."""
        k = self._local.micro_batches
        try:
            return dp_stage.split(batch, k), batch, _TAKEN, None  # type: ignore[arg-type]
        except (ValueError, TypeError) as caught:
            if not (host_flags and self._joins_refused()):
                raise
            stand_in = _stand_in(batch, k)
            if stand_in is None:
                raise
            return dp_stage.split(stand_in, k), stand_in, _REFUSED, caught  # type: ignore[arg-type]

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

    def _flags(self, flag: float, device: torch.device) -> torch.Tensor | None:
        """One slot per rank, this rank's set to ``flag`` (``None`` alone: nothing to tell)."""
        if not self._joins_refused():
            return None
        flags = torch.zeros(process.world_size(self.group), dtype=torch.float64)
        flags[process.rank(self.group)] = flag  # on the host: no device write
        return flags.to(device)

    def _check_opt_state(self, params: Any, opt_state: Any) -> None:
        """This rank's opt state was made for this step (its ``tx``, its shards)."""
        if self.shard_optimizer:
            self._map_for(params).check(opt_state, "data-parallel train step")
        else:
            _step_checks._check_opt_state(self.tx, params, opt_state)

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
        local_step = self._local
        # A DP step's clipped sums are example-weighted: no LossSum (its stage has no metas).
        is_sum = self.per_example_clip is None and local_step.grad_stage.metas[-1].is_sum
        local = dict(result.metrics)
        k = part.k
        counts = {n[len(COUNT) :]: local.pop(n) * k for n in list(local) if n.startswith(COUNT)}
        if flag != _TAKEN:
            # The stand-in batch weighs nothing: zero counts make every sum this rank sends
            # zero (_sums.weighted, _combine's scale), and its buffers are not kept.
            local = {n: v.new_zeros(()) if n in _WEIGHTS else v for n, v in local.items()}
            counts = {n: c.new_zeros(()) for n, c in counts.items()}
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
        new_buffers = local_step.faults.keep_if_skipped(out.ok, combined.buffers, buffers)
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
