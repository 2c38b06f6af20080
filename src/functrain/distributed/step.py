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

With ``per_example_clip=C`` (DP-SGD) each rank sends its sum of clipped per-example gradients
unweighted and the ranks add them; ``tx`` (``dp_noisy_mean`` first) noises the global sum once,
identically on every rank, from the noise key of the replicated optimizer state.

This module holds the factory; the step object and its states live in
:mod:`functrain.distributed._train_step` (re-exported here), its stages beside it: the
collectives that combine the ranks' gradients in :mod:`functrain.distributed._combine`, the
replicated optimizer stage in :mod:`functrain.distributed._update` and the sharded (ZeRO-1)
one in :mod:`functrain.distributed._sharded_update`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from functrain.distributed import process
from functrain.distributed._train_step import DataParallelTrainStep
from functrain.optim.base import GradientTransformation
from functrain.optim.loss_scale import DynamicLossScale
from functrain.train.grad_stats import GradStatsHook

__all__ = ["DataParallelTrainStep", "make_data_parallel_train_step"]


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
    grad_backend: Literal["auto", "func", "autograd"] = "auto",
    norm_metrics: bool = True,
    nonfinite: Literal["skip", "ignore"] = "skip",
    max_consecutive_skips: int | None = None,
    loss_scale: DynamicLossScale | None = None,
    fused: bool = True,
    per_example_clip: float | torch.Tensor | None = None,
    grad_stats: GradStatsHook | None = None,
    compile: bool | Mapping[str, Any] = False,
) -> DataParallelTrainStep:
    """Builds a data-parallel ``step(state, batch) -> (new_state, metrics)`` over ``torch.distributed``.

    Each rank calls the step with its own ``batch`` (sizes and token counts may differ between
    ranks; a rank's batch may be empty, leading size 0, and then contributes nothing; a
    non-empty one needs at least ``micro_batches`` examples). With CPU tensors (gloo) a rank
    that refuses its batch still joins the collectives with zeros and a flag, and then every
    rank raises: the refusing rank its own error, the others
    :class:`~functrain.distributed.DistributedStepError`; when every rank's batch is empty,
    ``ValueError`` on every rank (the state untouched either way). On a GPU the flags are not
    read (a host sync per step): a refusal raises on its rank alone and an all-empty step is
    skipped as non-finite (see the data-parallel guide). The ranks combine gradient *sums* and *counts*, so the
    result is the step :func:`functrain.make_train_step` would take on the concatenation of all
    ranks' batches (to float rounding), and the metrics are those of that global batch on
    every rank.
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
            and values (checksums), the kind of loss, the metric names and the optimizer
            state's noise keys and counters (its 0-d integer leaves: ``add_noise``,
            ``dp_noisy_mean``) (host-side collectives), raising
            :class:`~functrain.distributed.RankMismatchError` otherwise.
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
        per_example_clip: ``C`` for DP-SGD across ranks (as Opacus' ``DPDDP``): each rank
            forms ``Σᵢ clip(gᵢ, C)`` over its own batch as :func:`functrain.make_train_step`
            with ``per_example_clip`` does (same option checks; ``micro_batches`` a count; an
            empty batch gives a zero sum), the ranks *add* their sums (one all-reduce, not a
            weighted mean), and ``tx``, which begins with :func:`~functrain.dp_noisy_mean`,
            runs on every rank on the same global sum from the same replicated noise key: the
            noise is drawn once, identically, and every rank's new parameters are equal. Its
            ``expected_batch_size`` is the *global* expected batch size (e.g.
            ``sample_rate × dataset size`` with each rank Poisson-sampling its shard).
            Metrics: ``loss`` (mean over the realized global batch), ``num_examples``,
            ``clipped_fraction`` (global), ``skipped``, ``update_norm``, ``param_norm``; no
            ``grad_norm``. With ``shard_optimizer=True`` the sums are reduce-scattered and
            each rank draws exactly its pieces' part of the whole tree's noise (the result
            equals the replicated step's). On the first call, ``check_ranks`` also checks
            that the ranks' noise keys agree.
        grad_stats: a :class:`~functrain.GradStatsHook` (e.g. :func:`~functrain.noise_scale_hook`)
            seeing the micro-batches of *all* ranks: each rank runs ``per_micro_batch`` on its
            own ``K`` micro-batches, one small all-gather (a float64 vector of ``K`` sizes,
            losses and values per rank, started with the gradient collectives) hands every
            rank the stats of all ``world × K`` micro-batches in rank order, and every rank
            runs ``update`` on them and the global gradient: the hook's state in
            ``state.extra`` stays replicated and its metrics are equal on every rank. They are
            those of :func:`functrain.make_train_step` with ``micro_batches`` the ranks'
            micro-batch sizes in rank order. A hook with an accumulator
            (``noise_scale_hook(cosine=True)``) has it summed over the ranks: one more
            all-reduce, of the accumulator's size (for the cosine, one parameter-sized
            float32-or-wider buffer). The ranks must split their batches into the same number
            ``K`` of micro-batches (checked on the first call, even without ``check_ranks``:
            :class:`~functrain.distributed.RankMismatchError`). Not with
            ``shard_optimizer=True`` (the hook needs the whole global gradient) or
            ``per_example_clip`` (``ValueError``).
        compile: as for :func:`functrain.make_train_step` (``True`` or a dict of
            ``torch.compile`` arguments; the same checks and errors), with the collectives
            kept eager: this rank's gradient stage runs as one ``torch.compile(fullgraph=True)``
            graph, the all-reduces run eagerly, and the non-finite check, the optimizer update
            and the metrics run as a second graph. Each compiles once per batch shape (a
            schedule, the step count, a loss scale are tensors); a rank's empty or refused
            batch, evaluated on a stand-in, compiles its gradient graph once more. Seeding,
            error messages and ``recompile_limit`` are those of ``make_train_step``'s compiled
            step; the compiled update is out of place (no fused in-place kernels). Not with
            ``shard_optimizer=True``, ``grad_stats`` or ``per_example_clip`` (``ValueError``
            naming the combination, at construction). A region that fails to compile or run
            on some ranks only raises as any rank-local failure does (see Faults below).

    Returns:
        A :class:`DataParallelTrainStep`. Metrics are global (with ``per_example_clip``, see
        there): ``loss``, ``num_examples``,
        ``num_tokens`` (``LossSum``), aux values, ``grad_norm`` (of the global gradient, before
        clipping), ``update_norm``, ``param_norm``, ``lr`` when exposed and the
        ``grad_stats`` hook's metrics.

    Randomness: rank ``r`` computes micro-batch ``i`` with the key
    ``fold_in(rank_key(state.key, r), i + 1)``: different on every rank, the same on every
    run. The next state's key is ``fold_in(state.key, 0)`` on every rank.

    Faults: a rank that dies makes the others' collectives fail at once, a rank that hangs
    makes them fail after the process group's timeout
    (:func:`functrain.distributed.init`); either way the step raises
    :class:`~functrain.distributed.DistributedStepError` and leaves the given state untouched.
    A rank whose own part of the step raises while its process lives on (anything before the
    step's first collective: its loss on its batch, e.g. a bad token id, on any micro-batch; a
    rank-specific shape; a ``grad_stats`` hook; per-example clipping; out of memory; the checks
    of the state it was given) does not leave the others waiting: every rank raises, the
    failing one its own exception (same type, a note naming the failing ranks), the others
    :class:`~functrain.distributed.DistributedStepError` naming it and its error, and no rank's
    state changes, so the ranks can all call the step again. On the first call the failure
    travels in the first call's exchange of small objects (the ``check_ranks`` or
    ``grad_stats`` check; one small object all-gather of its own without either), on every
    backend. On later calls the failing rank joins the step's collectives on zeros with a flag
    in the counts' all-reduce the step does anyway, and the errors are exchanged on that call
    only (a healthy step pays nothing); this needs CPU tensors (gloo), whose flags the step
    reads on the host: with device tensors (NCCL) a later failure raises on its rank alone and
    the others wait until the group's timeout, then raise ``DistributedStepError``.

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
        per_example_clip=per_example_clip,
        grad_stats=grad_stats,
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
        compile=compile,
    )
