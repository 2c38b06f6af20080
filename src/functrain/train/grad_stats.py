"""Per-micro-batch gradient statistics: the :class:`GradStatsHook` protocol and its inputs.

:class:`GradStatsHook` sees every micro-batch's mean gradient ``ĝᵢ = ∇Lᵢ`` (or ``∇Tᵢ / Cᵢ``)
and its size ``bᵢ`` (``nᵢ`` or ``Cᵢ``). Its ``per_micro_batch`` reduces each ``ĝᵢ`` to a few 0-d
tensors (under ``"vmap"`` it gets views into a chunk's stacked gradients); the gradient stage
(:mod:`functrain.train.gradient`) stacks them into the ``(K,)`` tensors of
:class:`MicroBatchStats`, and the step calls the hook's ``update`` with those and the combined
gradient. A hook that needs more than scalars per micro-batch (e.g. a running sum of unit
gradients for their mean pairwise cosine) declares a step-local accumulator
(``accumulator_init``, ``accumulate``); its final value reaches ``update`` as
:attr:`MicroBatchStats.accumulated`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = ["GradStatsHook", "MicroBatchStats"]


class MicroBatchStats(NamedTuple):
    """Per-micro-batch information of one step, each a ``(K,)`` tensor in micro-batch order.

    Attributes:
        sizes: ``bᵢ``: examples (mean losses) or ``LossSum`` counts of each micro-batch.
        losses: each micro-batch's mean loss ``Lᵢ`` (``Tᵢ / Cᵢ`` for ``LossSum``).
        values: the stacked outputs of :attr:`GradStatsHook.per_micro_batch`.
        accumulated: the step's accumulator after every micro-batch (see
            :attr:`GradStatsHook.accumulate`), or ``None``.

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
    accumulated: Any = None


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
            of 0-d tensors) joins the step's metrics. It must not keep ``grads`` or views of
            them in either output: a donating step may then write into them (unscale, clip).
        name: the key of the hook's state in ``state.extra``.
        accumulator_init: ``accumulator_init(params) -> acc``, a step-local accumulator made at
            the start of every step (``None``: no accumulator).
        accumulate: ``accumulate(acc, mean_grad, size) -> acc``, called once per micro-batch
            with what ``per_micro_batch`` gets (in the ``"vmap"`` strategy the micro-batches
            may arrive grouped by size, not in order); it must not keep ``mean_grad`` itself.
        per_micro_batch_sq_norm: for a hook whose ``per_micro_batch`` depends on ``ĝᵢ`` only
            through ``‖ĝᵢ‖²``: ``per_micro_batch_sq_norm(sq_norm, size)`` giving the same
            dict. The eager ``"loop"`` step with the ``"autograd"`` backend then calls it
            instead (for a hook without an accumulator), forming ``‖ĝᵢ‖²`` parameter by
            parameter as backward produces the gradients, which are summed in place as
            without a hook: no micro-batch gradient is kept (the memory of a step without the
            hook) and the update is the same, bit for bit. Other steps call
            ``per_micro_batch``.
        accumulates_unit_gradients: ``True`` for a hook whose accumulator is a
            :class:`~functrain.CosineAccumulator` (``accumulator_init`` is
            :func:`~functrain.cosine_accumulator_init` and ``accumulate`` adds ``ĝᵢ/‖ĝᵢ‖`` as
            :func:`~functrain.cosine_accumulator_add` does) and that has
            ``per_micro_batch_sq_norm``. The eager autograd loop then forms the accumulator
            itself (the same sums to rounding) while backward still sums the micro-batch
            gradients in place: one micro-batch's gradients are held until it ends, as
            ``torch.autograd.grad`` per micro-batch would hold them, without its
            parameter-sized sum and copies. Other steps call ``accumulate``.

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
    accumulator_init: Callable[[Any], Any] | None = None
    accumulate: Callable[[Any, Any, torch.Tensor], Any] | None = None
    per_micro_batch_sq_norm: (
        Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None
    ) = None
    accumulates_unit_gradients: bool = False
