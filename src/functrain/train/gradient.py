"""The gradient stage of a train step: per-micro-batch gradients, combined exactly.

For micro-batches ``i = 1..K`` with ``nᵢ`` examples (``N`` in all):

* mean losses ``Lᵢ``: ``g = Σᵢ (nᵢ/N) ∇Lᵢ`` and ``L = Σᵢ (nᵢ/N) Lᵢ``;
* :class:`~functrain.LossSum` losses ``(Tᵢ, Cᵢ)``: ``g = Σᵢ ∇Tᵢ / Σᵢ Cᵢ`` and
  ``L = Σᵢ Tᵢ / Σᵢ Cᵢ``.

Both are the gradient and value of the full-batch loss, to float rounding, whatever the sizes.

``"loop"`` computes micro-batches one after another (memory of one micro-batch, buffers threaded
in order), with ``torch.func.grad`` or, for ``grad_backend="autograd"``, reverse mode on
step-local leaves (backward then accumulates in place, as a classic loop does). ``"vmap"``
stacks equal-size micro-batches and runs ``torch.func.vmap`` over them (``chunk_size``
micro-batches at a time), then reduces.

**Gradient-statistics hook.** :class:`GradStatsHook` sees every micro-batch's mean gradient
``ĝᵢ = ∇Lᵢ`` (or ``∇Tᵢ / Cᵢ``) and its size ``bᵢ`` (``nᵢ`` or ``Cᵢ``). Its ``per_micro_batch``
reduces each ``ĝᵢ`` to a few 0-d tensors (under ``"vmap"`` it gets views into a chunk's stacked
gradients); the stage stacks them into the ``(K,)`` tensors of :class:`MicroBatchStats`, and the
step calls the hook's ``update`` with those and the combined gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.train import loss as loss_lib
from functrain.train import microbatch, rng

__all__ = ["GradStatsHook", "MicroBatchStats"]

# The engine call behind torch.autograd.backward (private; the public function if it moves).
_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)


class MicroBatchStats(NamedTuple):
    """Per-micro-batch information of one step, each a ``(K,)`` tensor in micro-batch order.

    Attributes:
        sizes: ``bᵢ``: examples (mean losses) or ``LossSum`` counts of each micro-batch.
        losses: each micro-batch's mean loss ``Lᵢ`` (``Tᵢ / Cᵢ`` for ``LossSum``).
        values: the stacked outputs of :attr:`GradStatsHook.per_micro_batch`.

    Example:
        >>> import torch
        >>> from functrain import MicroBatchStats
        >>> stats = MicroBatchStats(torch.tensor([3.0, 2.0]), torch.tensor([0.5, 0.7]), {})
        >>> (stats.sizes * stats.losses).sum() / stats.sizes.sum()  # the full-batch loss
        tensor(0.5800)
    """

    sizes: torch.Tensor
    losses: torch.Tensor
    values: dict[str, torch.Tensor]


class GradStatsHook(NamedTuple):
    """Opt-in gradient statistics computed inside a train step (see ``make_train_step``).

    Attributes:
        init: ``init(params) -> hook_state``, the hook's persistent state, kept in
            ``state.extra[name]`` (initialised at the first step when absent).
        per_micro_batch: ``per_micro_batch(mean_grad, size) -> dict[str, 0-d tensor]`` for one
            micro-batch's mean gradient ``ĝᵢ`` (a params-like pytree of plain tensors, called
            once per micro-batch in both strategies) and size ``bᵢ`` (0-d tensor). It must not
            keep or modify ``ĝᵢ``: only its small outputs are stored.
        update: ``update(stats, grads, hook_state) -> (metrics, new_hook_state)`` with the
            :class:`MicroBatchStats` of the step and the combined gradient; ``metrics`` (a dict
            of 0-d tensors) joins the step's metrics.
        name: the key of the hook's state in ``state.extra``.

    Example:
        >>> import torch, functrain as ft
        >>> hook = ft.GradStatsHook(
        ...     init=lambda params: None,
        ...     per_micro_batch=lambda g, b: {"sq_norm": ft.tree.norm(g, squared=True)},
        ...     update=lambda stats, grads, s: ({"sq_max": stats.values["sq_norm"].max()}, s),
        ... )
        >>> step = ft.make_train_step(lambda p, b: (p["w"] * b).mean(), ft.sgd(0.1),
        ...                           micro_batches=2, grad_stats=hook)
        >>> state = ft.TrainState.create(params={"w": torch.ones(())}, tx=ft.sgd(0.1))
        >>> _, metrics = step(state, torch.tensor([1.0, 3.0]))
        >>> metrics["sq_max"]
        tensor(9.)
    """

    init: Callable[[Any], Any]
    per_micro_batch: Callable[[Any, torch.Tensor], dict[str, torch.Tensor]]
    update: Callable[[MicroBatchStats, Any, Any], tuple[dict[str, torch.Tensor], Any]]
    name: str = "grad_stats"


class GradResult(NamedTuple):
    """Output of the gradient stage (internal)."""

    grads: Any
    metrics: dict[str, torch.Tensor]  # loss, num_examples, num_tokens, aux
    buffers: Any
    stats: MicroBatchStats | None


class _Meta(NamedTuple):
    is_sum: bool
    aux_keys: tuple[str, ...]
    aux_sum_keys: tuple[str, ...]
    has_buffers: bool


def make_objective(
    loss_fn: Callable[..., Any], accepted: frozenset[str], metas: list[_Meta]
) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    """Wraps ``loss_fn`` as ``f(params, mb, buffers, key) -> (objective, payload)``.

    The payload holds tensors only (``vmap`` cannot return anything else); the static facts
    about the result (mean or sum, aux keys) go to ``metas``.
    """

    def objective(params: Any, mb: Any, buffers: Any, key: Any) -> tuple[torch.Tensor, dict]:
        kwargs = {}
        if "buffers" in accepted:
            kwargs["buffers"] = buffers
        if "key" in accepted:
            kwargs["key"] = key
        parsed = loss_lib.parse(loss_fn(params, mb, **kwargs))
        metas.append(
            _Meta(
                parsed.is_sum,
                tuple(parsed.aux_values),
                tuple(parsed.aux_counts),
                parsed.buffers is not None,
            )
        )
        payload: dict[str, Any] = {
            "value": parsed.objective.detach(),
            "aux": parsed.aux_values,
            "aux_counts": parsed.aux_counts,
        }
        if parsed.count is not None:
            payload["count"] = parsed.count.detach()
        if parsed.buffers is not None:
            payload["buffers"] = parsed.buffers
        return parsed.objective, payload

    return objective


class Combiner:
    """Exact combination of losses, counts and aux values over micro-batches (internal)."""

    def __init__(self, total_examples: int) -> None:
        self.total = total_examples
        self.meta: _Meta | None = None
        self.loss: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.aux: dict[str, torch.Tensor] = {}
        self.aux_counts: dict[str, torch.Tensor] = {}

    def add(
        self,
        meta: _Meta,
        size: int,
        payload: dict[str, Any],
        weighted: torch.Tensor | None = None,
    ) -> None:
        """Adds one micro-batch (0-d values) or a stack of equal-size ones (``(G,)`` values).

        ``weighted``: one micro-batch's loss already weighted as here (``value * size / total``
        for a mean, ``value`` for a sum), to save recomputing it.
        """
        if self.meta is None:
            self.meta = meta
        elif meta.is_sum != self.meta.is_sum:
            raise TypeError(
                "loss_fn returned a LossSum for some micro-batches and a mean for others; "
                "return the same kind for every micro-batch"
            )
        elif meta.aux_keys != self.meta.aux_keys or meta.aux_sum_keys != self.meta.aux_sum_keys:
            raise ValueError(
                f"loss_fn returned different aux keys for different micro-batches: "
                f"{sorted(self.meta.aux_keys)} vs {sorted(meta.aux_keys)}"
            )
        weight = size / self.total
        if weighted is None:
            value = payload["value"].sum()
            weighted = value if meta.is_sum else value * weight
        self.loss = _acc(self.loss, weighted)
        if meta.is_sum:
            self.count = _acc(self.count, payload["count"].sum())
        for name, v in payload["aux"].items():
            if name in payload["aux_counts"]:
                self.aux[name] = _acc(self.aux.get(name), v.sum())
                self.aux_counts[name] = _acc(
                    self.aux_counts.get(name), payload["aux_counts"][name].sum()
                )
            else:
                self.aux[name] = _acc(self.aux.get(name), v.sum() * weight)

    def metrics(self, device: torch.device) -> dict[str, torch.Tensor]:
        """``loss``, ``num_examples``, ``num_tokens`` (LossSum only) and the aux values."""
        assert self.meta is not None and self.loss is not None
        out = {
            "loss": self.loss / self.count if self.count is not None else self.loss,
            "num_examples": torch.full((), self.total, dtype=torch.int64, device=device),
        }
        if self.count is not None:
            out["num_tokens"] = self.count
        for name, v in self.aux.items():
            if name in out:
                raise ValueError(f"LossOutput.aux key {name!r} clashes with a built-in metric")
            out[name] = v / self.aux_counts[name] if name in self.aux_counts else v
        return out


class _GradSum:
    """Weighted sum of gradient leaf lists that never writes into the gradients it is given.

    Gradients from autograd may be expanded views or shared between leaves (``a + b`` hands the
    same tensor to both), so the first write goes to a fresh buffer; later ones are in place.
    """

    def __init__(self) -> None:
        self.acc: list[torch.Tensor] | None = None
        self.scale = 1.0
        self.owned = False

    def add(self, leaves: list[torch.Tensor], weight: float) -> None:
        if self.acc is None:
            self.acc, self.scale = leaves, weight
            return
        if not self.owned:
            self.owned = True
            if self.scale == 1.0:
                self.acc = list(torch._foreach_add(self.acc, leaves, alpha=weight))
                return
            self.acc = list(torch._foreach_mul(self.acc, self.scale))
        if leaves:
            torch._foreach_add_(self.acc, leaves, alpha=weight)

    def result(self, divisor: torch.Tensor | None) -> list[torch.Tensor]:
        assert self.acc is not None
        acc = self.acc
        if not acc:
            return acc
        if not self.owned and self.scale != 1.0:
            acc, self.owned = list(torch._foreach_mul(acc, self.scale)), True
        if divisor is None:
            return acc
        if self.owned:
            torch._foreach_div_(acc, divisor)
            return acc
        return list(torch._foreach_div(acc, divisor))


def _acc(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def _check_buffers(old: Any, new: Any) -> None:
    if old is not None and tree.structure(old) != tree.structure(new):
        tree.check_shapes(old, new, ("state.buffers", "buffers returned by loss_fn"))
        raise tree.TreeMismatchError(
            "buffers returned by loss_fn differ in structure from state.buffers: "
            f"{tree.structure(new)} vs {tree.structure(old)}"
        )


def _seeding(
    key: torch.Tensor | None, seed: bool, devices: Sequence[torch.device]
) -> contextlib.AbstractContextManager[None]:
    if key is None or not seed:
        return contextlib.nullcontext()
    return rng.seeded_rng(key, devices)


def _backward(
    objective: torch.Tensor, inputs: tuple[torch.Tensor, ...], plain_inputs: bool
) -> None:
    """``torch.autograd.backward(objective, inputs=inputs)`` for a scalar objective.

    A plain real 0-d tensor with plain tensor inputs (``plain_inputs``) takes the engine call
    directly: ``torch.autograd.backward``'s argument normalisation and checks are per-call
    Python that a small model's step notices (4 calls a step with K=4). Anything else (tensor
    subclasses and their ``__torch_function__``, functorch transforms, other shapes) goes
    through ``torch.autograd.backward`` and its checks and errors.
    """
    if (
        plain_inputs
        and _run_backward is not None
        and type(objective) is torch.Tensor
        and objective.dim() == 0
        and objective.requires_grad
        and objective.is_floating_point()
        and not torch._C._are_functorch_transforms_active()
    ):
        grad = torch.ones_like(objective, memory_format=torch.preserve_format)
        _run_backward(
            (objective,),
            (grad,),
            False,
            False,
            inputs,
            allow_unreachable=True,
            accumulate_grad=True,
        )
        return
    torch.autograd.backward(objective, inputs=inputs)


def _autograd_grad(objective: Callable[..., Any]) -> Callable[..., Any]:
    def grad_fn(params: Any, mb: Any, buffers: Any, key: Any) -> tuple[Any, dict]:
        leaves, spec = tree.flatten(params)
        leaves = [p.detach().requires_grad_() for p in leaves]
        with torch.enable_grad():
            obj, payload = objective(tree.unflatten(spec, leaves), mb, buffers, key)
            grads = torch.autograd.grad(obj, leaves, allow_unused=True, materialize_grads=True)
        return tree.unflatten(spec, list(grads)), payload

    return grad_fn


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
    ) -> None:
        self.accepted = loss_lib.accepted_inputs(loss_fn)
        self.metas: list[_Meta] = []
        self.objective = make_objective(loss_fn, self.accepted, self.metas)
        self.strategy = strategy
        self.chunk_size = chunk_size
        self.seed_rng = seed_rng
        self.per_micro_batch = per_micro_batch
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
        if self.backend == "autograd" and self.per_micro_batch is None:
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
        for i, (size, mb) in enumerate(zip(split.sizes, mbs)):
            mb_key = None if key is None else rng.fold_in(key, i + 1)
            self.metas.clear()
            with _seeding(mb_key, self.seed_rng, devices), torch.enable_grad():
                obj, payload = self.objective(tracked, mb, buffers, mb_key)
                meta = self.metas[-1]
                weight = 1.0 if meta.is_sum else size / split.total
                weighted = obj if weight == 1.0 else obj * weight
                _backward(weighted, inputs, plain)
            # The weighted objective is the combiner's weighted loss (same product, same bits);
            # unweighted, the combiner copies it (the loss metric never aliases loss_fn's tensor).
            combiner.add(
                meta, size, payload, weighted=None if obj is weighted else weighted.detach()
            )
            del obj, weighted
            if meta.has_buffers:
                _check_buffers(buffers, payload["buffers"])
                buffers = payload["buffers"]
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        del leaves, tracked, inputs
        if combiner.count is not None and grads:
            torch._foreach_div_(grads, combiner.count)
        device = combiner.loss.device  # type: ignore[union-attr]
        return GradResult(tree.unflatten(spec, grads), combiner.metrics(device), buffers, None)

    def _stats(
        self,
        split: microbatch.BatchSplit,
        losses: list[torch.Tensor],
        sizes: list[torch.Tensor] | None,
        values: list[dict[str, torch.Tensor]],
        device: torch.device,
    ) -> MicroBatchStats:
        loss_vec = torch.cat([v.reshape(-1) for v in losses])
        if sizes is None:
            size_vec = torch.tensor(split.sizes, dtype=loss_vec.dtype).to(device, non_blocking=True)
        else:
            size_vec = torch.cat([s.reshape(-1) for s in sizes])
        stacked = {k: torch.cat([v[k].reshape(-1) for v in values]) for k in values[0]}
        return MicroBatchStats(size_vec, loss_vec, stacked)

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
        for i, size in enumerate(split.sizes):
            mb = microbatch.micro_batch(batch, split, i)
            mb_key = None if key is None else rng.fold_in(key, i + 1)
            self.metas.clear()
            with _seeding(mb_key, self.seed_rng, devices):
                grads, payload = self.grad_fn(params, mb, buffers, mb_key)
            meta = self.metas[-1]
            combiner.add(meta, size, payload)
            if meta.has_buffers:
                _check_buffers(buffers, payload["buffers"])
                buffers = payload["buffers"]
            leaves, spec = tree.flatten(grads)
            if self.per_micro_batch is not None:
                value = payload["value"]
                if meta.is_sum:
                    b = payload["count"]
                    values.append(self.per_micro_batch(tree.scale(1 / b, grads), b))
                    losses.append(value / b)
                    sizes.append(b)
                else:
                    b = torch.full((), size, dtype=value.dtype, device=value.device)
                    values.append(self.per_micro_batch(grads, b))
                    losses.append(value)
            acc.add(leaves, 1.0 if meta.is_sum else size / split.total)
        assert spec is not None
        device = combiner.loss.device  # type: ignore[union-attr]
        stats = None
        if self.per_micro_batch is not None:
            stats = self._stats(
                split, losses, sizes if combiner.count is not None else None, values, device
            )
        return GradResult(
            tree.unflatten(spec, acc.result(combiner.count)),
            combiner.metrics(device),
            buffers,
            stats,
        )

    def _vmapped(self) -> Callable[..., Any]:
        inner = torch.func.grad(self.objective, has_aux=True)

        def one(params: Any, mb: Any, buffers: Any) -> tuple[Any, dict]:
            grads, payload = inner(params, mb, buffers, None)
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
                        grads, payload = self._vmapped()(params, stacked, buffers)
                except RuntimeError as err:
                    if "running_mean" in str(err) or "inplace arithmetic" in str(err):
                        raise RuntimeError(
                            "strategy='vmap': the model updates buffers in place (e.g. BatchNorm "
                            "running statistics in training mode), which cannot be reproduced "
                            "exactly across vmapped micro-batches. Use strategy='loop', or run "
                            "normalisation in eval mode / with track_running_stats=False. "
                            f"Original error: {err}"
                        ) from err
                    if "data-dependent control flow" in str(err):
                        raise RuntimeError(
                            "strategy='vmap': the model reads tensor values on the host (e.g. "
                            "`if mask.all():`, as Hugging Face attention masks do), which vmap "
                            "cannot batch. Use strategy='loop' (or remove the data-dependent "
                            f"branch). Original error: {err}"
                        ) from err
                    raise
                meta = self.metas[-1]
                combiner.add(meta, size, payload)
                leaves, spec = tree.flatten(grads)
                summed = [g.sum(0) for g in leaves]  # before the hook: it may not keep views
                acc.add(summed, 1.0 if meta.is_sum else size / split.total)
                if self.per_micro_batch is not None:
                    order.extend(chunk)
                    value = payload["value"]
                    if meta.is_sum:
                        losses.append(value / payload["count"])
                        sizes.append(payload["count"])
                    else:
                        losses.append(value)
                    for pos in range(len(chunk)):
                        # Views of the stacked gradients: one micro-batch at a time, no copy.
                        g = tree.unflatten(spec, [leaf[pos] for leaf in leaves])
                        if meta.is_sum:
                            b = payload["count"][pos]
                            g = tree.scale(1 / b, g)
                        else:
                            b = torch.full((), size, dtype=value.dtype, device=value.device)
                        values.append(self.per_micro_batch(g, b))
        assert spec is not None
        device = combiner.loss.device  # type: ignore[union-attr]
        stats = None
        if self.per_micro_batch is not None:
            stats = self._stats(
                split, losses, sizes if combiner.count is not None else None, values, device
            )
            if order != sorted(order):
                where = {j: pos for pos, j in enumerate(order)}
                perm = [where[j] for j in range(len(order))]
                stats = MicroBatchStats(
                    _permute(stats.sizes, perm) if combiner.count is not None else stats.sizes,
                    _permute(stats.losses, perm),
                    {k: _permute(v, perm) for k, v in stats.values.items()},
                )
        return GradResult(
            tree.unflatten(spec, acc.result(combiner.count)),
            combiner.metrics(device),
            buffers,
            stats,
        )


def _permute(vec: torch.Tensor, perm: list[int]) -> torch.Tensor:
    # Indexing with Python ints keeps everything on the device (no index tensor to upload).
    return torch.stack([vec[j] for j in perm])
