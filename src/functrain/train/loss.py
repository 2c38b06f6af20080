"""What a loss function may take and return, and how micro-batch losses combine exactly.

A loss function is ``loss_fn(params, batch, **optional) -> result``.

**Optional inputs**, passed only when the function's signature names them:

* ``buffers``: the model buffers threaded through the step (``state.buffers``).
* ``key``: the micro-batch's random key (see :mod:`functrain.train.rng`), for explicit
  randomness with :func:`functrain.key_generator`. (Global-generator randomness such as
  ``nn.Dropout`` needs no argument: the step seeds the global generators from the same key.)

**Result**, one of:

* a 0-d tensor: the **mean** loss over the micro-batch's examples. Micro-batch ``i`` with
  ``nᵢ`` examples is weighted by ``nᵢ / N``, so the combined loss and gradient are those of the
  mean over all ``N`` examples, however unevenly the batch is split.
* :class:`LossSum` ``(total, count)``: the **sum** of per-unit losses and the number of units
  (e.g. non-padding tokens). The step adds the totals and the counts of all micro-batches and
  divides once: ``loss = Σ totalᵢ / Σ countᵢ``. This is the exact token-mean of the whole batch.
* :class:`LossOutput` ``(loss, aux=..., buffers=...)``: one of the two above plus auxiliary
  metrics and/or the model's updated buffers.

Why :class:`LossSum`: in 2024 several popular trainers (Hugging Face ``Trainer`` among them,
fixed in transformers 4.46) computed a token-mean cross-entropy per micro-batch and averaged
those means over gradient-accumulation steps. When micro-batches hold different numbers of
non-padding tokens, the average of means is not the mean over all tokens: tokens in short
micro-batches weigh more, and the result depends on the accumulation count. Returning the sum
and the count makes the step divide by the true total, so that bug cannot happen here.

Example:
    >>> import torch, functrain as ft
    >>> ft.LossSum(torch.tensor(6.0), torch.tensor(3)).total
    tensor(6.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import _func_transforms, tree

__all__ = ["LossOutput", "LossSum"]


class LossSum(NamedTuple):
    """A loss reported as a sum and a count; the step divides by the total count.

    Attributes:
        total: 0-d tensor, the sum of per-unit losses (e.g. per-token cross-entropy summed over
            non-padding tokens) of the micro-batch.
        count: the number of units, a Python number or a 0-d tensor (e.g. ``mask.sum()``).
            A micro-batch may count 0 (all padding): only the batch's total count divides,
            and a grad-stats hook sees such a micro-batch as a zero gradient of size 0.

    Example:
        >>> import torch, torch.nn.functional as F, functrain as ft
        >>> logits, targets = torch.zeros(5, 4), torch.tensor([1, 2, -100, 3, -100])
        >>> total = F.cross_entropy(logits, targets, reduction="sum")  # -100 is ignored
        >>> s = ft.LossSum(total, (targets != -100).sum())
        >>> round(float(s.total / s.count), 4)  # log(4)
        1.3863
    """

    total: torch.Tensor
    count: torch.Tensor | int | float


class LossOutput(NamedTuple):
    """A loss with auxiliary outputs.

    Attributes:
        loss: a 0-d mean loss or a :class:`LossSum`.
        aux: optional ``dict[str, tensor]`` of extra metrics. A 0-d tensor is read as a mean over
            the micro-batch's examples and combined with example weights; a :class:`LossSum`
            value is combined as ``Σ total / Σ count``. Integer values are cast to floats
            that hold them exactly (the loss's dtype, at least float32) and are still means:
            a count such as ``(pred == y).sum()`` would depend on the split, so report it as
            ``LossSum(correct, n)`` (a rate) or as a per-example mean. The combined values
            appear in the step's metrics under their keys.
        buffers: the model's updated buffers (e.g. from :meth:`FunctionalModel.apply`), threaded
            to the next micro-batch and into the new state; ``None`` leaves buffers unchanged.

    Example:
        >>> import torch, functrain as ft
        >>> out = ft.LossOutput(torch.tensor(0.5), aux={"acc": torch.tensor(1.0)})
        >>> out.buffers is None
        True
    """

    loss: torch.Tensor | LossSum
    aux: dict[str, torch.Tensor | LossSum] | None = None
    buffers: Any = None


class Parsed(NamedTuple):
    """A micro-batch result in normal form (internal)."""

    objective: torch.Tensor  # what is differentiated: the mean, or the LossSum total
    is_sum: bool
    count: torch.Tensor | None  # LossSum count, in the objective's _count_dtype
    aux_values: dict[str, torch.Tensor]  # 0-d means or LossSum totals
    aux_counts: dict[str, torch.Tensor]  # counts of LossSum aux values
    buffers: Any


def accepted_inputs(loss_fn: Callable[..., Any]) -> frozenset[str]:
    """The optional inputs (``buffers``, ``key``) the loss function's signature names."""
    try:
        names = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(n for n in ("buffers", "key") if n in names)


def _count_dtype(like: torch.Tensor) -> torch.dtype:
    """Counts as floats that hold them exactly: bfloat16 rounds 1001 tokens to 1000 (and sums of
    such counts drift further), which would scale the loss and gradient of a bfloat16 model."""
    return torch.promote_types(like.dtype, torch.float32)


def _as_count(count: Any, like: torch.Tensor, where: str) -> torch.Tensor:
    if isinstance(count, torch.Tensor):
        # A bool tensor (``mask.any()`` where ``mask.sum()`` was meant) is refused, as a
        # Python bool is: it would count 1 unit.
        if count.dtype == torch.bool or count.is_complex():
            raise TypeError(f"{where}.count must be a number or a 0-d tensor, got {count.dtype}")
        if count.dim() != 0:
            raise ValueError(f"{where}.count must be a 0-d tensor, got shape {tuple(count.shape)}")
        return count.to(_count_dtype(like))
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        raise TypeError(f"{where}.count must be a number or a 0-d tensor, got {count!r}")
    # torch.full fills on the device: no host-to-device copy, no synchronization.
    return torch.full((), count, dtype=_count_dtype(like), device=like.device)


def _check_scalar(
    value: Any, where: str, allowed: str = "a 0-d tensor, ft.LossSum or ft.LossOutput"
) -> torch.Tensor:
    # ``allowed`` names what may stand where ``value`` is: a LossSum's total or an aux value
    # cannot be a LossSum or a LossOutput itself, so the error must not suggest one.
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} must be {allowed}, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(
            f"{where} must be a 0-d (scalar) tensor, got shape {tuple(value.shape)}: reduce it "
            "to the micro-batch mean (e.g. .mean()) or return ft.LossSum(total=..., count=...)"
        )
    if not value.is_floating_point():
        raise TypeError(f"{where} must be a floating-point tensor, got {value.dtype}")
    return value


def _aux_scalar(value: Any, where: str, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex()):
        value = value.to(_count_dtype(like))  # counts such as (pred == y).sum(), exactly
    return _func_transforms.detach(_check_scalar(value, where, "a 0-d tensor or ft.LossSum"))


def parse(result: Any) -> Parsed:
    """Validates a loss function's result and brings it into :class:`Parsed` form."""
    aux: dict[str, Any] | None = None
    buffers = None
    loss = result
    if isinstance(result, LossOutput):
        loss, aux, buffers = result
    elif isinstance(result, tuple) and not isinstance(result, LossSum):
        raise TypeError(
            "loss_fn returned a plain tuple; return a 0-d tensor, ft.LossSum(total, count) or "
            "ft.LossOutput(loss, aux=..., buffers=...) so the step knows what each part means"
        )
    if isinstance(loss, LossSum):
        total = _check_scalar(loss.total, "loss_fn's LossSum.total", "a 0-d tensor")
        objective, is_sum, count = total, True, _as_count(loss.count, total, "LossSum")
    else:
        if isinstance(result, LossOutput):  # a LossOutput cannot hold another one
            objective = _check_scalar(loss, "LossOutput.loss", "a 0-d tensor or ft.LossSum")
        else:
            objective = _check_scalar(loss, "loss_fn's result")
        is_sum, count = False, None
    aux_values: dict[str, torch.Tensor] = {}
    aux_counts: dict[str, torch.Tensor] = {}
    if aux is not None:
        if not isinstance(aux, dict):
            raise TypeError(f"LossOutput.aux must be a dict, got {type(aux).__name__}")
        for name, value in aux.items():
            where = f"LossOutput.aux[{name!r}]"
            if not isinstance(name, str):  # metric names: loggers and the loop expect strings
                raise TypeError(f"LossOutput.aux keys must be strings, got {where}")
            if isinstance(value, LossSum):
                aux_values[name] = _aux_scalar(value.total, where + ".total", objective)
                aux_counts[name] = _func_transforms.detach(
                    _as_count(value.count, aux_values[name], where)
                )
            else:
                aux_values[name] = _aux_scalar(value, where, objective)
    if buffers is not None:
        buffers = tree.map(lambda b: b.detach(), buffers)
    return Parsed(objective, is_sum, count, aux_values, aux_counts, buffers)
