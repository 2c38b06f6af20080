"""The gradient stage of a train step: per-micro-batch gradients, combined exactly.

:class:`GradStage` takes one explicit gradient pytree per micro-batch and combines them into the
gradient of the full-batch loss, whatever the micro-batch sizes (the weights are in
:mod:`functrain.train.combine`).

``"loop"`` computes micro-batches one after another (memory of one micro-batch, buffers threaded
in order), with ``torch.func.grad`` or, for ``grad_backend="autograd"``, reverse mode on
step-local leaves (backward then accumulates in place, as a classic loop does). ``"vmap"``
stacks equal-size micro-batches and runs ``torch.func.vmap`` over them (``chunk_size``
micro-batches at a time), then reduces.

With a :class:`~functrain.GradStatsHook` (:mod:`functrain.train.grad_stats`), the stage also
hands every micro-batch's mean gradient to the hook and returns the stacked
:class:`~functrain.MicroBatchStats`. A :class:`~functrain.LossSum` micro-batch whose count is
0 (all padding) has no mean: the hook gets a zero gradient with size 0, and its loss in the
stats is 0 (``Σ sizes·losses / Σ sizes`` stays the batch loss). The step's own gradient and
loss, ``Σ ∇Tᵢ / Σ Cᵢ`` and ``Σ Tᵢ / Σ Cᵢ``, are unaffected by such a micro-batch.

Its helpers (seeding, the backward call, size arithmetic) are in
:mod:`functrain.train._grad_helpers`, re-exported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from functrain import _foreach, _func_transforms, tree
from functrain._messages import message
from functrain.train import _recompute, microbatch, rng
from functrain.train import loss as loss_lib

# The stage's helpers live in _grad_helpers; re-exported (``X as X``) here.
from functrain.train._grad_helpers import _NO_SEEDING as _NO_SEEDING
from functrain.train._grad_helpers import _any_half as _any_half
from functrain.train._grad_helpers import _autograd_grad as _autograd_grad
from functrain.train._grad_helpers import _backward as _backward
from functrain.train._grad_helpers import _check_buffers as _check_buffers
from functrain.train._grad_helpers import _check_dense_grads as _check_dense_grads
from functrain.train._grad_helpers import _devices as _devices
from functrain.train._grad_helpers import _inverse_count as _inverse_count
from functrain.train._grad_helpers import _permute as _permute
from functrain.train._grad_helpers import _run_backward as _run_backward
from functrain.train._grad_helpers import _saved_tensor_hooks_error as _saved_tensor_hooks_error
from functrain.train._grad_helpers import _seeding as _seeding
from functrain.train._grad_helpers import _size_dtype as _size_dtype
from functrain.train._grad_helpers import _sparse_vmap_error as _sparse_vmap_error
from functrain.train._grad_helpers import _SqNormRecord as _SqNormRecord
from functrain.train.combine import Combiner, _GradSum, _Meta, make_objective
from functrain.train.grad_stats import GradStatsHook, MicroBatchStats

__all__ = ["GradStatsHook", "MicroBatchStats"]  # defined in grad_stats, re-exported here


class GradResult(NamedTuple):
    """Output of the gradient stage (internal)."""

    grads: Any
    metrics: dict[str, torch.Tensor]  # loss, num_examples, num_tokens, aux
    buffers: Any
    stats: MicroBatchStats | None
    # The gradients are tensors this call allocated and nobody else holds: the step may write
    # into them (unscale, clip) instead of copying them.
    owned: bool = False


class GradStage:
    """Computes the combined gradient of a batch (internal; one per train step)."""

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        *,
        strategy: str,
        chunk_size: int | None,
        seed_rng: bool,
        backend: str,
        per_micro_batch: Callable[[Any, torch.Tensor], dict[str, torch.Tensor]] | None,
        loss_scale: Callable[[], torch.Tensor] | None = None,
        accumulator: tuple[Callable[[Any], Any], Callable[[Any, Any, torch.Tensor], Any]]
        | None = None,
        per_micro_batch_sq_norm: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
        | None = None,
        accumulates_unit_gradients: bool = False,
    ) -> None:
        self.accepted = loss_lib.accepted_inputs(loss_fn)
        self.metas: list[_Meta] = []
        self.objective = make_objective(loss_fn, self.accepted, self.metas)
        self.strategy = strategy
        self.chunk_size = chunk_size
        self.seed_rng = seed_rng
        self.per_micro_batch = per_micro_batch
        # The hook's step-local accumulator: (init(params), add(acc, mean_grad, size)).
        self.accumulator = accumulator if per_micro_batch is not None else None
        # A hook that needs only ‖ĝᵢ‖² (and perhaps a running sum of unit gradients) runs in
        # the backward loop (see GradStatsHook).
        self.units_in_backward = self.accumulator is not None and accumulates_unit_gradients
        self.sq_norm_hook = (
            per_micro_batch_sq_norm
            if per_micro_batch is not None and (self.accumulator is None or self.units_in_backward)
            else None
        )
        # The current loss scale when ``loss_fn`` is scaled: the hook sees unscaled values.
        self.loss_scale = loss_scale
        self.backend = backend
        if strategy == "loop":
            self.grad_fn = (
                _autograd_grad(self.objective)
                if backend == "autograd"
                else torch.func.grad(self.objective, has_aux=True)
            )
        if strategy == "vmap" and "key" in self.accepted:
            raise ValueError(
                "strategy='vmap' cannot give each micro-batch its own key argument (torch has no "
                "batched generators); drop the loss_fn's `key` parameter and use global-generator "
                "randomness (nn.Dropout, torch.rand), which vmap(randomness='different') draws "
                "independently per micro-batch, or use strategy='loop'"
            )

    @property
    def accumulates_in_place(self) -> bool:
        """Whether backward sums the micro-batch gradients into step-local ``.grad`` tensors
        (:meth:`_loop_backward`): the eager autograd loop, without a hook or with one that
        needs only ``‖ĝᵢ‖²``."""
        return (
            self.strategy == "loop"
            and self.backend == "autograd"
            and (self.per_micro_batch is None or self.sq_norm_hook is not None)
        )

    def __call__(
        self,
        params: Any,
        batch: Any,
        split: microbatch.BatchSplit,
        buffers: Any,
        key: torch.Tensor | None,
        devices: Sequence[torch.device],
    ) -> GradResult:
        """Runs the chosen strategy."""
        if self.strategy == "vmap":
            return self._vmap(params, batch, split, buffers, key, devices)
        if self.accumulates_in_place:
            return self._loop_backward(params, batch, split, buffers, key, devices)
        return self._loop(params, batch, split, buffers, key, devices)

    def _loop_backward(
        self,
        params: Any,
        batch: Any,
        split: microbatch.BatchSplit,
        buffers: Any,
        key: torch.Tensor | None,
        devices: Sequence[torch.device],
    ) -> GradResult:
        """The ``"autograd"`` loop without a hook: backward accumulates into step-local leaves.

        Each micro-batch's weighted objective is back-propagated into the ``.grad`` of fresh
        leaves that alias the parameters, so autograd adds micro-batch gradients in place as it
        produces them (the memory and speed of a classic loop). The leaves live only inside this
        call; the returned gradients are plain tensors.
        """
        p_leaves, spec = tree.flatten(params)
        leaves = [p.detach().requires_grad_() for p in p_leaves]
        inputs = tuple(leaves)
        plain = all(type(x) is torch.Tensor for x in inputs)
        tracked = tree.unflatten(spec, leaves)
        combiner = Combiner(split.total)
        mbs = microbatch.micro_batches(batch, split)
        streams = self._streams(key, devices)
        record = None
        if self.sq_norm_hook is not None:
            units = self.accumulator[0](params) if self.units_in_backward else None  # type: ignore[index]
            record = _SqNormRecord(leaves, units, spec)
        try:
            with torch.enable_grad():
                for i, (size, mb) in enumerate(zip(split.sizes, mbs)):
                    mb_key, seeding = self._micro_batch_rng(streams, key, i, devices)
                    self.metas.clear()
                    weight = size / split.total
                    with seeding:
                        with _recompute.recorded_calls() as calls:
                            obj, payload = self.objective(tracked, mb, buffers, mb_key, weight)
                        meta = self.metas[-1]
                        if obj.requires_grad:
                            with _recompute.recomputing(calls):  # activation checkpointing
                                (_backward if record is None else record.backward)(
                                    obj, inputs, plain
                                )
                        # else: a loss that does not depend on the params (a constant, a
                        # detached value) has a zero gradient, as torch.func.grad gives;
                        # backward would raise.
                    # A weighted objective is the combiner's weighted loss (same product, same
                    # bits); unweighted, the combiner copies the value (the loss metric never
                    # aliases loss_fn's tensor).
                    weighted = not meta.is_sum and weight != 1.0
                    combiner.add(meta, size, payload, weighted=obj.detach() if weighted else None)
                    del obj
                    if record is not None:
                        record.micro_batch(self, meta, size, weight, payload)
                    if meta.has_buffers:
                        _check_buffers(buffers, payload["buffers"])
                        buffers = payload["buffers"]
        finally:
            if record is not None:
                record.remove()
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        del leaves, tracked, inputs
        if combiner.count is not None and grads:
            _foreach.div_(grads, combiner.count)
        device = combiner.loss.device  # type: ignore[union-attr]
        stats = None
        if record is not None:
            stats = self._stats(
                split, combiner, record.losses, record.sizes, record.values, record.accumulated
            )
        return GradResult(
            tree.unflatten(spec, grads), combiner.metrics(device), buffers, stats, owned=True
        )

    def _streams(
        self, key: torch.Tensor | None, devices: Sequence[torch.device]
    ) -> rng.MicroBatchStreams | None:
        """The step's micro-batch streams from one read of ``key`` (eager steps only; under a
        torch.func transform a member's own key is batched, and only tensor ops can fold it)."""
        if key is None or torch.compiler.is_compiling() or _func_transforms.active():
            return None
        return rng.MicroBatchStreams(key, self.seed_rng, devices)

    def _micro_batch_rng(
        self,
        streams: rng.MicroBatchStreams | None,
        key: torch.Tensor | None,
        i: int,
        devices: Sequence[torch.device],
    ) -> tuple[torch.Tensor | None, contextlib.AbstractContextManager[None]]:
        """Micro-batch ``i``'s key (``fold_in(key, i + 1)``, made only if ``loss_fn`` takes
        one) and the context that seeds the global generators with it."""
        if streams is not None:
            return (streams.key(i) if "key" in self.accepted else None), streams.seeding(i)
        mb_key = None if key is None else rng.fold_in(key, i + 1)
        return mb_key, _seeding(mb_key, self.seed_rng, devices)

    def _unscaled(self, value: torch.Tensor, grads: Any) -> tuple[torch.Tensor, Any]:
        """The loss value and gradients without the loss scale (``grads`` ``None``: the inverse
        scale instead, or ``None`` when there is no scale)."""
        if self.loss_scale is None:
            return value, grads
        inverse = 1 / self.loss_scale()
        if grads is None:
            return value * inverse, inverse
        return value * inverse, tree.scale(inverse, grads)

    def _stats(
        self,
        split: microbatch.BatchSplit,
        combiner: Combiner,
        losses: list[torch.Tensor],
        sizes: list[torch.Tensor],
        values: list[dict[str, torch.Tensor]],
        accumulated: Any,
    ) -> MicroBatchStats | None:
        """The hook's :class:`MicroBatchStats` (``None`` without a hook); ``sizes`` are the
        ``LossSum`` counts, ignored for mean losses (whose sizes are the split's)."""
        if self.per_micro_batch is None:
            return None
        loss_vec = torch.cat([v.reshape(-1) for v in losses])
        if combiner.count is None:
            size_vec = torch.tensor(split.sizes, dtype=_size_dtype(loss_vec))
            size_vec = size_vec.to(combiner.loss.device, non_blocking=True)  # type: ignore[union-attr]
        else:
            size_vec = torch.cat([s.reshape(-1) for s in sizes])
        stacked = {k: torch.cat([v[k].reshape(-1) for v in values]) for k in values[0]}
        return MicroBatchStats(size_vec, loss_vec, stacked, accumulated)

    def _loop(
        self,
        params: Any,
        batch: Any,
        split: microbatch.BatchSplit,
        buffers: Any,
        key: torch.Tensor | None,
        devices: Sequence[torch.device],
    ) -> GradResult:
        combiner = Combiner(split.total)
        acc = _GradSum()
        spec = None
        losses, sizes, values = [], [], []
        accumulated = None if self.accumulator is None else self.accumulator[0](params)
        streams = self._streams(key, devices)
        # With a hook, a mean loss is differentiated unweighted and weighted in the sum: the hook
        # needs the unweighted gradient, and unweighting a weighted one cost a parameter-sized
        # copy per micro-batch. Half-precision parameters keep the weight before
        # differentiation, where it keeps the backward pass's headroom.
        unweighted = self.per_micro_batch is not None and not _any_half(params)
        for i, size in enumerate(split.sizes):
            mb = microbatch.micro_batch(batch, split, i)
            mb_key, seeding = self._micro_batch_rng(streams, key, i, devices)
            self.metas.clear()
            weight = size / split.total  # applied to a mean loss before differentiation
            try:
                with seeding:
                    grads, payload = self.grad_fn(
                        params, mb, buffers, mb_key, None if unweighted else weight
                    )
            except RuntimeError as err:
                clear = _saved_tensor_hooks_error(err, f"grad_backend={self.backend!r}")
                if clear is not None:
                    raise clear from err
                raise
            meta = self.metas[-1]
            combiner.add(meta, size, payload)
            if meta.has_buffers:
                _check_buffers(buffers, payload["buffers"])
                buffers = payload["buffers"]
            leaves, spec = tree.flatten(grads)
            if self.per_micro_batch is not None:
                # The step's clear error for a sparse gradient, before the hook's norms fail.
                _check_dense_grads(grads)
                # The hook sees the micro-batch's own gradient, unweighted and unscaled; the
                # scale comes off first: a half-precision gradient divided by its weight while
                # still loss-scaled overflowed to inf.
                value, hook_grads = self._unscaled(payload["value"], grads)
                if not (meta.is_sum or unweighted):
                    hook_grads = tree.scale(1 / weight, hook_grads)
                if meta.is_sum:
                    b = payload["count"]
                    inverse = _inverse_count(b)
                    hook_grads = tree.scale(inverse, hook_grads)
                    losses.append(value * inverse)
                    sizes.append(b)
                else:
                    b = torch.full((), size, dtype=_size_dtype(value), device=value.device)
                    losses.append(value)
                values.append(self.per_micro_batch(hook_grads, b))
                if self.accumulator is not None:
                    accumulated = self.accumulator[1](accumulated, hook_grads, b)
                del hook_grads
            acc.add(leaves, weight if unweighted and not meta.is_sum else 1.0)
        assert spec is not None
        device = combiner.loss.device  # type: ignore[union-attr]
        stats = self._stats(split, combiner, losses, sizes, values, accumulated)
        summed = acc.result(combiner.count)
        return GradResult(
            tree.unflatten(spec, summed), combiner.metrics(device), buffers, stats, acc.owned
        )

    def _vmapped(self, weight: float) -> Callable[..., Any]:
        inner = torch.func.grad(self.objective, has_aux=True)

        def one(params: Any, mb: Any, buffers: Any) -> tuple[Any, dict]:
            grads, payload = inner(params, mb, buffers, None, weight)
            if self.metas[-1].has_buffers:
                raise ValueError(
                    "strategy='vmap' cannot reproduce the sequential buffer updates of the "
                    "'loop' strategy (BatchNorm running statistics change once per micro-batch, "
                    "one after another), and the loss returned updated buffers. Use "
                    "strategy='loop', or keep buffers fixed: run normalisation in eval mode "
                    "(model.eval()), use LayerNorm/GroupNorm, or BatchNorm with "
                    "track_running_stats=False, and return buffers=None"
                )
            return grads, payload

        return torch.func.vmap(one, in_dims=(None, 0, None), randomness="different")

    def _vmap(
        self,
        params: Any,
        batch: Any,
        split: microbatch.BatchSplit,
        buffers: Any,
        key: torch.Tensor | None,
        devices: Sequence[torch.device],
    ) -> GradResult:
        combiner = Combiner(split.total)
        acc = _GradSum()
        spec = None
        order: list[int] = []
        losses, sizes, values = [], [], []
        accumulated = None if self.accumulator is None else self.accumulator[0](params)
        chunk_index = 0
        for size, indices in microbatch.size_groups(split):
            step = self.chunk_size or len(indices)
            for lo in range(0, len(indices), step):
                chunk = indices[lo : lo + step]
                stacked = microbatch.stack(batch, split, chunk)
                chunk_key = None if key is None else rng.fold_in(key, chunk_index + 1)
                chunk_index += 1
                self.metas.clear()
                try:
                    with _seeding(chunk_key, self.seed_rng, devices):
                        grads, payload = self._vmapped(size / split.total)(params, stacked, buffers)
                except NotImplementedError as err:
                    clear = _sparse_vmap_error(err, "strategy='vmap'")
                    if clear is not None:
                        raise clear from err
                    raise
                except RuntimeError as err:
                    text = message(err)
                    if "running_mean" in text or "inplace arithmetic" in text:
                        raise RuntimeError(
                            "strategy='vmap': the model updates buffers in place (e.g. BatchNorm "
                            "running statistics in training mode), which cannot be reproduced "
                            "exactly across vmapped micro-batches. Use strategy='loop', or run "
                            "normalisation in eval mode / with track_running_stats=False. "
                            f"Original error: {err}"
                        ) from err
                    if "data-dependent control flow" in text:
                        raise RuntimeError(
                            "strategy='vmap': the model reads tensor values on the host (e.g. "
                            "`if mask.all():`, as Hugging Face attention masks do), which vmap "
                            "cannot batch. Use strategy='loop' (or remove the data-dependent "
                            f"branch). Original error: {err}"
                        ) from err
                    clear = _saved_tensor_hooks_error(err, "strategy='vmap'")
                    if clear is not None:
                        raise clear from err
                    # Imported here: functrain.grads imports functrain.train.
                    from functrain.grads._per_example import rnn_vmap_error

                    clear = rnn_vmap_error(err, "strategy='vmap'", "Use strategy='loop'.")
                    if clear is not None:
                        raise clear from err
                    raise
                meta = self.metas[-1]
                combiner.add(meta, size, payload)
                leaves, spec = tree.flatten(grads)
                summed = [g.sum(0) for g in leaves]  # before the hook: it may not keep views
                # Mean losses were weighted before differentiation; the sums are new tensors.
                acc.add(summed, 1.0, fresh=True)
                if self.per_micro_batch is not None:
                    order.extend(chunk)
                    value, inverse = self._unscaled(payload["value"], None)
                    if meta.is_sum:
                        inverses = _inverse_count(payload["count"])
                        losses.append(value * inverses)
                        sizes.append(payload["count"])
                    else:
                        losses.append(value)
                    for pos in range(len(chunk)):
                        # Views of the stacked gradients: one micro-batch at a time, no copy.
                        g = tree.unflatten(spec, [leaf[pos] for leaf in leaves])
                        if inverse is not None:  # first: scaled and unweighted, halves overflow
                            g = tree.scale(inverse, g)
                        if not meta.is_sum:  # unweighted, as the loop's hook sees it
                            g = tree.scale(split.total / size, g)
                        if meta.is_sum:
                            b = payload["count"][pos]
                            g = tree.scale(inverses[pos], g)
                        else:
                            b = torch.full((), size, dtype=_size_dtype(value), device=value.device)
                        values.append(self.per_micro_batch(g, b))
                        if self.accumulator is not None:
                            accumulated = self.accumulator[1](accumulated, g, b)
        assert spec is not None
        device = combiner.loss.device  # type: ignore[union-attr]
        stats = self._stats(split, combiner, losses, sizes, values, accumulated)
        if stats is not None and order != sorted(order):
            where = {j: pos for pos, j in enumerate(order)}
            perm = [where[j] for j in range(len(order))]
            stats = MicroBatchStats(
                _permute(stats.sizes, perm) if combiner.count is not None else stats.sizes,
                _permute(stats.losses, perm),
                {k: _permute(v, perm) for k, v in stats.values.items()},
                accumulated,
            )
        summed = acc.result(combiner.count)
        return GradResult(
            tree.unflatten(spec, summed), combiner.metrics(device), buffers, stats, acc.owned
        )
