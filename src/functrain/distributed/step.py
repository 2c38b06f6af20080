"""``make_data_parallel_train_step``: the pure train step, with one collective on the gradient.

Every rank runs the gradient stage of :func:`functrain.make_train_step` on its own batch
(micro-batching, buffers, random streams: the same code), then the ranks combine **sums and
counts**, never means: rank ``r`` holding ``Nᵣ`` examples (or ``Cᵣ`` tokens of a
:class:`~functrain.LossSum` loss) contributes ``wᵣ·gᵣ`` with ``wᵣ = Nᵣ`` (or ``Cᵣ``), and the
global gradient is ``g = Σᵣ wᵣ gᵣ / Σᵣ wᵣ``: the gradient of the loss of the concatenated batch,
whatever the ranks' batch sizes and token counts. Loss, counts and aux metrics are reduced the
same way, in one small extra all-reduce.

Two modes:

* ``shard_optimizer=False``: the gradient pytree is all-reduced in flat buckets; every rank
  runs the optimizer on the whole gradient and keeps the whole optimizer state.
* ``shard_optimizer=True`` (ZeRO stage 1, :mod:`functrain.distributed.zero`): the gradient is
  reduce-scattered, every rank updates only its pieces of the parameters and keeps only their
  optimizer state (about ``1 / world_size`` of it), and the new parameters are all-gathered.
  Supported optimizers: :func:`~functrain.distributed.check_shardable`.

A failed collective raises :class:`~functrain.distributed.DistributedStepError` and leaves the
given state untouched: parameters are only written (in place, with ``donate=True``) after the
last collective of the step succeeded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch

from functrain import tree
from functrain.distributed import collectives, process, zero
from functrain.distributed._agree import check_ranks_agree
from functrain.distributed._sums import COUNT, Stats, div_, with_aux_counts
from functrain.distributed.data import rank_key
from functrain.distributed.shardable import check_shardable
from functrain.optim.base import GradientTransformation, apply_updates, identity
from functrain.optim.loss_scale import DynamicLossScale, all_finite
from functrain.train import _step_checks, gradient, microbatch, rng
from functrain.train import faults as faults_lib
from functrain.train import step as step_lib
from functrain.train.state import TrainState

__all__ = ["DataParallelTrainStep", "make_data_parallel_train_step"]


class DataParallelTrainStep:
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
        # The single-process step validates the arguments and owns the gradient stage.
        self._local = step_lib.TrainStep(with_aux_counts(loss_fn), tx, grad_stats=None, **local)
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
        self._layout: zero.Layout | None = None
        self._state_map: zero.StateMap | None = None

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

        Args:
            params: the initial parameters (with ``broadcast``, only rank 0's values count).
            buffers: model buffers, or ``None``.
            seed: seed of the random key (same on every rank); see ``TrainState.create``.
            key: an explicit random key instead of ``seed``.
            extra: initial add-on states.
            broadcast: copy rank 0's parameters and buffers to every rank (a collective), so
                that all ranks start identical whatever their own initialisation.

        Example:
            >>> import torch, functrain as ft
            >>> from functrain import distributed as dist
            >>> step = dist.make_data_parallel_train_step(lambda p, b: (p["w"] * b).mean(), ft.adam(0.1), shard_optimizer=True)
            >>> state = step.init_state({"w": torch.zeros(4)})
            >>> state.opt_state[0].mu["w"].shape  # one rank: the whole parameter
            torch.Size([4])
        """
        if broadcast and process.world_size(self.group) > 1:
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
        pieces = [p.clone() for p in self._layout_for(state.params).pieces(leaves)]
        return state.replace(opt_state=self.tx.init(tree.unflatten(spec, pieces)))

    def shard_state(self, state: TrainState) -> TrainState:
        """This rank's state from a state holding the whole optimizer state (e.g. restored).

        With ``shard_optimizer=False`` the state is returned as it is.

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
        return state.replace(opt_state=self._map_for(state.params).shard(state.opt_state))

    def full_state(self, state: TrainState) -> TrainState:
        """The state with the whole optimizer state, gathered from all ranks (for checkpoints).

        A collective: every rank must call it; every rank gets the whole state and rank 0
        typically saves it. With ``shard_optimizer=False`` the state is returned as it is.

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
        return state.replace(
            opt_state=self._map_for(state.params).gather(state.opt_state, self.group)
        )

    # -- the step -------------------------------------------------------------------------

    def _check(self, params: Any, opt_state: Any, buffers: Any, local: dict, is_sum: bool) -> None:
        """First call: this rank's state fits the step, and all ranks agree (one collective)."""
        if self.shard_optimizer:
            self._map_for(params).check(opt_state, "data-parallel train step")
        else:  # the train step's own check that the state was made for this tx, if it has one
            check_opt_state = getattr(step_lib, "_check_opt_state", None)
            if check_opt_state is not None:
                check_opt_state(self.tx, params, opt_state)
        if self.check_ranks:
            opt = None if self.shard_optimizer else opt_state  # shards differ between ranks
            check_ranks_agree(params, opt, buffers, sorted(local), is_sum, self.group)
        self._checked = True

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
        """
        _step_checks._check_state(state, "data-parallel train step")
        params, opt_state, buffers, key = state.params, state.opt_state, state.buffers, state.key
        step, extra = state.step, state.extra
        local_step, group = self._local, self.group
        local_step._guard.check(params)
        faults = local_step.faults
        token = faults.begin(extra, params)  # may raise NonFiniteError; sets the loss scale
        try:
            split = microbatch.split_batch(batch, local_step.micro_batches)
            devices = gradient._devices(params)
            local_key = None if key is None else rank_key(key, process.rank(group))
            result = local_step.grad_stage(params, batch, split, buffers, local_key, devices)
        finally:
            faults.end(token)
        is_sum = local_step.grad_stage.metas[-1].is_sum
        local = dict(result.metrics)
        k = split.num_micro_batches
        counts = {n[len(COUNT) :]: local.pop(n) * k for n in list(local) if n.startswith(COUNT)}
        if not self._checked:
            self._check(params, opt_state, buffers, local, is_sum)
        stats = Stats(local, counts, is_sum)
        leaves, spec = tree.flatten(result.grads)
        weight = stats.weight

        def scale(flat: torch.Tensor) -> None:
            flat.mul_(weight.to(flat.dtype))

        # Sums go out; every collective of this stage is started before the first wait.
        if self.shard_optimizer:
            layout = self._layout_for(params)
            pending = zero.start_reduce_scatter(layout, leaves, group, prepare=scale)
        else:
            pending = collectives.start_all_reduce(
                leaves,
                group=group,
                bucket_cap_mb=self.bucket_cap_mb,
                what="all-reduce of the gradients",
                prepare=scale,
            )
        pending_stats = collectives.start_all_reduce(
            [stats.vector], group=group, what="all-reduce of the step's counts and metrics"
        )
        new_buffers = result.buffers
        buffer_leaves, buffer_spec = tree.flatten(new_buffers)
        pending_buffers = None
        if self.sync_buffers == "broadcast" and buffer_leaves and process.world_size(group) > 1:
            pending_buffers = collectives.start_broadcast(
                buffer_leaves,
                src=zero._global(0, group),
                group=group,
                bucket_cap_mb=self.bucket_cap_mb,
                what="broadcast of the buffers",
            )
        reduced = pending_stats.wait()[0]
        grads = pending.wait()
        if pending_buffers is not None:
            new_buffers = tree.unflatten(buffer_spec, pending_buffers.wait())
        div_(grads, reduced[0])
        metrics = stats.metrics(reduced)
        update = self._sharded_update if self.shard_optimizer else self._replicated_update
        out = update(grads, spec, params, opt_state, extra, metrics)
        new_buffers = faults.keep_if_skipped(out.ok, new_buffers, buffers)
        if self.donate:
            # Consumed only once every collective succeeded: a failed step leaves it usable.
            state._consume("a data-parallel train step (donate=True)")
        new_key = None if key is None else rng.fold_in(key, 0)
        new_state = TrainState(step + 1, out.params, out.opt_state, new_buffers, new_key, out.extra)
        self._local._finish_metrics(
            metrics, out.params, out.opt_state, out.update_norm, new_state.step.device
        )
        return new_state, metrics

    def _checked_grads(
        self, grads: Any, metrics: dict[str, torch.Tensor], extra: dict[str, Any], params: Any
    ) -> tuple[Any, torch.Tensor | None, dict[str, Any]]:
        """The train step's non-finite check (and loss unscaling) on global values."""
        check = self._local.faults.check(metrics, grads, extra, params)
        step_lib._merge(metrics, check.metrics, "the non-finite check")
        new_extra = {**extra, **check.extra} if check.extra else extra
        return check.grads, check.ok, new_extra

    def _replicated_update(
        self,
        grads: list[torch.Tensor],
        spec: Any,
        params: Any,
        opt_state: Any,
        extra: dict[str, Any],
        metrics: dict[str, torch.Tensor],
    ) -> _Updated:
        """Every rank: the whole (identical) gradient, the whole optimizer state."""
        grads_tree, ok, new_extra = self._checked_grads(
            tree.unflatten(spec, grads), metrics, extra, params
        )
        stage = self._local.apply_optimizer  # the train step's stage (maybe fused, in place)
        if self.norm_metrics:
            metrics["grad_norm"] = tree.norm(grads_tree)
            with_grad_norm = getattr(stage, "with_grad_norm", None)
            if with_grad_norm is not None:  # a leading clip reuses the norm
                stage = with_grad_norm(metrics["grad_norm"])
        applied = faults_lib.apply_guarded(
            stage, self.tx, grads_tree, opt_state, params, in_place=self.donate, ok=ok
        )
        update_norm = None
        if self.norm_metrics:
            if applied.updates is not None:
                update_norm = tree.norm(applied.updates)
            else:  # a fused stage reports the norm of the change instead of the updates
                update_norm = getattr(applied, "update_norm", None)
        return _Updated(applied.params, applied.opt_state, new_extra, ok, update_norm)

    def _sharded_update(
        self,
        grads: list[torch.Tensor],
        spec: Any,
        params: Any,
        opt_state: Any,
        extra: dict[str, Any],
        metrics: dict[str, torch.Tensor],
    ) -> _Updated:
        """ZeRO-1: the optimizer on this rank's pieces, then all-gather of the parameters."""
        assert self._layout is not None and self.report is not None
        layout, group = self._layout, self.group
        faults = self._local.faults
        clip = self.report.leading_clip
        need_norm = self.norm_metrics or clip is not None
        local_sq = tree.norm(grads, squared=True)  # pieces partition every parameter
        # One all-reduce of [squared norm, non-finite pieces]; with loss scaling the norm is
        # taken after unscaling, in a second one.
        early_norm = need_norm and faults.loss_scale is None
        entries = []
        if early_norm:
            entries.append(local_sq.to(torch.float64))
        if faults.active:
            entries.append((~all_finite(grads)).to(torch.float64).to(local_sq.device))
        reduced = None
        if entries:
            reduced = collectives.start_all_reduce(
                [torch.stack(entries)], group=group, what="all-reduce of the gradient norm"
            ).wait()[0]
        ok, new_extra = None, extra
        if faults.active:
            assert reduced is not None
            # A non-finite piece anywhere must skip the step on every rank: the check also
            # sees a NaN standing for the other ranks' pieces.
            poison = torch.where(reduced[-1] > 0, float("nan"), 0.0).to(local_sq.dtype)
            checked, ok, new_extra = self._checked_grads([*grads, poison], metrics, extra, params)
            grads = list(checked[:-1])
        if need_norm:
            if early_norm:
                sq = reduced[0]  # type: ignore[index]
            else:
                sq = collectives.start_all_reduce(
                    [tree.norm(grads, squared=True).to(torch.float64)],
                    group=group,
                    what="all-reduce of the gradient norm",
                ).wait()[0]
            grad_norm = sq.sqrt().to(local_sq.dtype)
            if self.norm_metrics:
                metrics["grad_norm"] = grad_norm
            if clip is not None:
                # The chain's leading clip_by_global_norm, with the global norm; the clip in
                # the chain then sees pieces of norm at most max_norm and leaves them as they are.
                bound = (
                    clip.to(grad_norm)
                    if isinstance(clip, torch.Tensor)
                    else torch.full_like(grad_norm, float(clip))  # filled on the device
                )
                one = torch.ones_like(grad_norm)
                factor = torch.where(grad_norm < bound, one, bound / grad_norm)
                grads = [g * factor.to(g.dtype) for g in grads]
        tx = self.tx if ok is None else faults_lib.skip_unless(self.tx, ok)
        p_leaves = tree.leaves(params)
        param_pieces = tree.unflatten(spec, layout.pieces(p_leaves))
        with torch.no_grad():
            updates, new_opt_state = tx.update(tree.unflatten(spec, grads), opt_state, param_pieces)
            new_pieces = apply_updates(param_pieces, updates)
        pending_sq = None
        if self.norm_metrics:
            pending_sq = collectives.start_all_reduce(
                [tree.norm(updates, squared=True)],
                group=group,
                what="all-reduce of the update norm",
            )
        outs = p_leaves if self.donate and _writable(p_leaves, new_opt_state) else None
        pending = zero.start_all_gather(layout, tree.leaves(new_pieces), group, outs)
        update_norm = None if pending_sq is None else pending_sq.wait()[0].sqrt()
        # Last: only when this collective succeeded are the parameters (maybe in place) written.
        new_params = tree.unflatten(spec, pending.wait())
        return _Updated(new_params, new_opt_state, new_extra, ok, update_norm)


class _Updated(NamedTuple):
    params: Any
    opt_state: Any
    extra: dict[str, Any]
    ok: torch.Tensor | None  # the non-finite check's verdict (None: not checked)
    update_norm: torch.Tensor | None  # norm of the whole update


def _writable(p_leaves: list[torch.Tensor], opt_state: Any) -> bool:
    """Whether the parameters' memory may be overwritten: not shared between leaves or kept
    by the optimizer state."""
    ids = [id(p) for p in p_leaves]
    if len(set(ids)) != len(ids):
        return False
    storages = {p.untyped_storage().data_ptr() for p in p_leaves if p.numel()}
    return not any(
        isinstance(x, torch.Tensor) and x.numel() and x.untyped_storage().data_ptr() in storages
        for x in tree.leaves(opt_state)
    )


def make_data_parallel_train_step(
    loss_fn: Callable[..., Any],
    tx: GradientTransformation,
    *,
    shard_optimizer: bool = False,
    group: process.Group = None,
    bucket_cap_mb: float = 25.0,
    sync_buffers: Literal["broadcast", "none"] = "broadcast",
    check_ranks: bool = True,
    micro_batches: int | Sequence[int] = 1,
    strategy: Literal["loop", "vmap"] = "loop",
    chunk_size: int | None = None,
    donate: bool = True,
    seed_rng: bool = True,
    grad_backend: Literal["func", "autograd"] = "func",
    norm_metrics: bool = True,
    nonfinite: Literal["skip", "ignore"] = "skip",
    max_consecutive_skips: int | None = None,
    loss_scale: DynamicLossScale | None = None,
    fused: bool = True,
) -> DataParallelTrainStep:
    """Builds a data-parallel ``step(state, batch) -> (new_state, metrics)`` over ``torch.distributed``.

    Each rank calls the step with its own ``batch`` (any size; sizes and token counts may
    differ between ranks). The ranks combine gradient *sums* and *counts*, so the result is the
    step :func:`functrain.make_train_step` would take on the concatenation of all ranks'
    batches (to float rounding), and the metrics are those of that global batch on every rank.
    Outside a distributed job (world size 1) it is an ordinary train step.

    Args:
        loss_fn: the loss, in any form :func:`functrain.make_train_step` accepts (mean,
            :class:`~functrain.LossSum`, :class:`~functrain.LossOutput`, ``buffers=``, ``key=``).
        tx: the optimizer.
        shard_optimizer: ZeRO stage 1: each rank keeps and updates only its pieces of the
            optimizer state (about ``1 / world_size`` of it). Build the state with
            :meth:`DataParallelTrainStep.init_state` (or convert one with ``shard_state``) and
            gather it with ``full_state`` to save it. Raises
            :class:`~functrain.distributed.ShardingError` for optimizers that would give
            different numbers (:func:`~functrain.distributed.check_shardable`).
        group: the process group (default: the default group).
        bucket_cap_mb: the largest flat bucket of one collective, in megabytes.
        sync_buffers: ``"broadcast"``: after each step every rank takes rank 0's model buffers
            (as ``DistributedDataParallel`` does for BatchNorm statistics); ``"none"``: each rank
            keeps its own.
        check_ranks: on the first call, check that all ranks agree on parameter shapes, dtypes
            and values (checksums), the kind of loss and the metric names (one host-side
            collective), raising :class:`~functrain.distributed.RankMismatchError` otherwise.
        micro_batches: as for :func:`functrain.make_train_step`, for this rank's batch.
        strategy: as for :func:`functrain.make_train_step`.
        chunk_size: as for :func:`functrain.make_train_step`.
        donate: as for :func:`functrain.make_train_step`; the state is consumed only after every
            collective of the step succeeded.
        seed_rng: as for :func:`functrain.make_train_step` (with this rank's keys).
        grad_backend: as for :func:`functrain.make_train_step`.
        norm_metrics: as for :func:`functrain.make_train_step` (norms of the global gradient
            and update).
        nonfinite: as for :func:`functrain.make_train_step`, decided on the *global* loss and
            gradient, so every rank skips the same steps.
        max_consecutive_skips: as for :func:`functrain.make_train_step`.
        loss_scale: as for :func:`functrain.make_train_step`.
        fused: as for :func:`functrain.make_train_step` (fused in-place kernels), with
            ``shard_optimizer=False``; the sharded optimizer runs ``tx.update`` on the pieces.

    Returns:
        A :class:`DataParallelTrainStep`. Metrics are global: ``loss``, ``num_examples``,
        ``num_tokens`` (``LossSum``), aux values, ``grad_norm`` (of the global gradient, before
        clipping), ``update_norm``, ``param_norm`` and ``lr`` when exposed.

    Randomness: rank ``r`` computes micro-batch ``i`` with the key
    ``fold_in(rank_key(state.key, r), i + 1)``: different on every rank, the same on every
    run. The next state's key is ``fold_in(state.key, 0)`` on every rank.

    Faults: a rank that dies makes the others' collectives fail at once, a rank that hangs
    makes them fail after the process group's timeout
    (:func:`functrain.distributed.init`); either way the step raises
    :class:`~functrain.distributed.DistributedStepError` and leaves the given state untouched.

    Differences from ``DistributedDataParallel``: no module wrapper and no autograd hooks; the
    gradients are reduced once per step after all micro-batches (no ``no_sync`` needed), as
    sums with their counts rather than as means (DDP averages per-rank means, which is wrong
    for unequal batch sizes or token counts); there is no overlap of communication with the
    backward pass.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain import distributed as dist
        >>> def loss_fn(params, batch):
        ...     return ((batch["x"] @ params["w"] - batch["y"]) ** 2).mean()
        >>> tx = ft.adamw(1e-2)
        >>> step = dist.make_data_parallel_train_step(loss_fn, tx, shard_optimizer=True)
        >>> state = step.init_state({"w": torch.zeros(3)})
        >>> batch = dist.shard_batch({"x": torch.randn(8, 3), "y": torch.randn(8)})
        >>> state, metrics = step(state, batch)
        >>> int(state.step), int(metrics["num_examples"])
        (1, 8)
    """
    return DataParallelTrainStep(
        loss_fn,
        tx,
        shard_optimizer=shard_optimizer,
        group=group,
        bucket_cap_mb=bucket_cap_mb,
        sync_buffers=sync_buffers,
        check_ranks=check_ranks,
        micro_batches=micro_batches,
        strategy=strategy,
        chunk_size=chunk_size,
        donate=donate,
        seed_rng=seed_rng,
        grad_backend=grad_backend,
        norm_metrics=norm_metrics,
        nonfinite=nonfinite,
        max_consecutive_skips=max_consecutive_skips,
        loss_scale=loss_scale,
        fused=fused,
    )
