"""Exact combination of micro-batch results into full-batch ones.

For micro-batches ``i = 1..K`` with ``nᵢ`` examples (``N`` in all):

* mean losses ``Lᵢ``: ``g = Σᵢ (nᵢ/N) ∇Lᵢ`` and ``L = Σᵢ (nᵢ/N) Lᵢ``;
* :class:`~functrain.LossSum` losses ``(Tᵢ, Cᵢ)``: ``g = Σᵢ ∇Tᵢ / Σᵢ Cᵢ`` and
  ``L = Σᵢ Tᵢ / Σᵢ Cᵢ``.

Both are the gradient and value of the full-batch loss, to float rounding, whatever the sizes.

:func:`make_objective` wraps a ``loss_fn`` so that each micro-batch yields a differentiable
objective and a tensor-only payload (value, counts, aux, buffers); :class:`Combiner` adds up the
payloads' losses, counts and aux values, and :class:`_GradSum` the weighted gradients. The
gradient stage (:mod:`functrain.train.gradient`) and the eval step use them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import _foreach, _func_transforms
from functrain._precision import accumulation_dtype
from functrain.train import loss as loss_lib

__all__: list[str] = []  # internal: used by the gradient stage and make_eval_step


# The metrics every step reports itself; aux keys may not reuse them.
_BUILT_IN = ("loss", "num_examples", "num_tokens")


class _Meta(NamedTuple):
    is_sum: bool
    aux_keys: tuple[str, ...]
    aux_sum_keys: tuple[str, ...]
    has_buffers: bool


def make_objective(
    loss_fn: Callable[..., Any], accepted: frozenset[str], metas: list[_Meta]
) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    """Wraps ``loss_fn`` as ``f(params, mb, buffers, key, weight=None) -> (objective, payload)``.

    With ``weight`` (other than 1), a mean loss's objective is multiplied by it before it is
    differentiated, as the classic ``loss / K`` (a ``LossSum`` is not); the payload's ``value``
    is always the unweighted loss. The payload holds tensors only (``vmap`` cannot return
    anything else); the static facts about the result (mean or sum, aux keys) go to ``metas``.
    """

    def objective(
        params: Any, mb: Any, buffers: Any, key: Any, weight: float | None = None
    ) -> tuple[torch.Tensor, dict]:
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
        objective = parsed.objective
        if weight is not None and weight != 1.0 and not parsed.is_sum:
            # A mean loss weighted before differentiation (as the classic ``loss / K``): the
            # gradient of a scaled float16 loss keeps the headroom of the weighted sum.
            objective = objective * weight
        payload: dict[str, Any] = {
            "value": _func_transforms.detach(parsed.objective),
            "aux": parsed.aux_values,
            "aux_counts": parsed.aux_counts,
        }
        if parsed.count is not None:
            payload["count"] = _func_transforms.detach(parsed.count)
        if parsed.buffers is not None:
            payload["buffers"] = parsed.buffers
        return objective, payload

    return objective


class Combiner:
    """Exact combination of losses, counts and aux values over micro-batches (internal)."""

    def __init__(self, total_examples: int) -> None:
        self.total = total_examples
        self.meta: _Meta | None = None
        # Sums are kept in at least float32 and rounded to the dtype loss_fn gave once, in
        # ``metrics``: bfloat16 running sums lose increments (256 + 1 == 256), which made the
        # loss metric of a bfloat16 loss depend on the number of micro-batches.
        self.loss: torch.Tensor | None = None
        self.loss_dtype: torch.dtype | None = None
        self.count: torch.Tensor | None = None
        self.aux: dict[str, torch.Tensor] = {}
        self.aux_dtypes: dict[str, torch.dtype] = {}
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
        for a mean, ``value`` for a sum), to save recomputing it; used only when it is in the
        accumulation dtype (at least float32).
        """
        if self.meta is None:
            self.meta = meta
        elif meta.is_sum != self.meta.is_sum:
            raise TypeError(
                "loss_fn returned a LossSum for some micro-batches and a mean for others; "
                "return the same kind for every micro-batch"
            )
        elif set(meta.aux_keys) != set(self.meta.aux_keys) or set(meta.aux_sum_keys) != set(
            self.meta.aux_sum_keys
        ):
            # Sets: values are combined by name, so the same keys in another insertion order
            # (a dict built from a set, or in a data-dependent order) are the same aux.
            raise ValueError(
                f"loss_fn returned different aux for different micro-batches: keys "
                f"{sorted(self.meta.aux_keys)} (LossSum: {sorted(self.meta.aux_sum_keys)}) vs "
                f"{sorted(meta.aux_keys)} (LossSum: {sorted(meta.aux_sum_keys)}); return the "
                "same keys, each always a LossSum or always a mean"
            )
        weight = size / self.total
        value = payload["value"]
        self.loss_dtype = value.dtype
        wide = accumulation_dtype(value.dtype)
        if weighted is None or weighted.dtype != wide:
            total = value.to(wide).sum()
            weighted = total if meta.is_sum else total * weight
        self.loss = _acc(self.loss, weighted)
        if meta.is_sum:
            self.count = _acc(self.count, payload["count"].sum())
        for name, v in payload["aux"].items():
            self.aux_dtypes[name] = v.dtype
            v = v.to(accumulation_dtype(v.dtype)).sum()
            if name in payload["aux_counts"]:
                self.aux[name] = _acc(self.aux.get(name), v)
                self.aux_counts[name] = _acc(
                    self.aux_counts.get(name), payload["aux_counts"][name].sum()
                )
            else:
                self.aux[name] = _acc(self.aux.get(name), v * weight)

    def metrics(self, device: torch.device) -> dict[str, torch.Tensor]:
        """``loss``, ``num_examples``, ``num_tokens`` (LossSum only) and the aux values."""
        assert self.meta is not None and self.loss is not None
        assert self.loss_dtype is not None
        out = {
            # Counts and sums are at least float32; the loss keeps the dtype loss_fn gave it,
            # rounded to it once.
            "loss": _ratio(self.loss, self.count, self.loss_dtype),
            "num_examples": torch.full((), self.total, dtype=torch.int64, device=device),
        }
        if self.count is not None:
            out["num_tokens"] = self.count
        for name, v in self.aux.items():
            # ``num_tokens`` is reserved for mean losses too: the loop (and any caller combining
            # eval batches) reads it as the loss's token weight, so an aux of that name would
            # silently reweight the loss across batches.
            if name in _BUILT_IN:
                raise ValueError(
                    f"LossOutput.aux key {name!r} clashes with a built-in metric "
                    f"({', '.join(_BUILT_IN)}); rename it"
                )
            out[name] = _ratio(v, self.aux_counts.get(name), self.aux_dtypes[name])
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

    def add(self, leaves: list[torch.Tensor], weight: float, fresh: bool = False) -> None:
        """Adds ``weight × leaves``; ``fresh``: the leaves are new tensors nobody else holds
        (the sums of a vmap chunk), so the first ones, unweighted, may become the accumulator
        as they are."""
        if self.acc is None:
            self.acc, self.scale, self.owned = leaves, weight, fresh and weight == 1.0
            return
        if not self.owned:
            self.owned = True
            if self.scale == 1.0:
                self.acc = list(_foreach.add(self.acc, leaves, alpha=weight))
                return
            self.acc = list(_foreach.mul(self.acc, self.scale))
            self.scale = 1.0
        if leaves:
            _foreach.add_(self.acc, leaves, alpha=weight)

    def result(self, divisor: torch.Tensor | None) -> list[torch.Tensor]:
        """The weighted sum (divided by ``divisor``); afterwards :attr:`owned` says whether it
        is made of tensors this sum allocated (a step may then write into them)."""
        assert self.acc is not None
        acc = self.acc
        if not acc:
            return acc
        if self.scale != 1.0:  # one weighted add, not yet copied (an owned sum has scale 1)
            acc, self.owned, self.scale = list(_foreach.mul(acc, self.scale)), True, 1.0
        if divisor is None:
            return acc
        if self.owned:
            _foreach.div_(acc, divisor)
            return acc
        acc, self.owned = list(_foreach.div(acc, divisor)), True
        return acc


def _ratio(total: torch.Tensor, count: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``total / count`` (``total`` without a count) in ``dtype``, rounded to it once."""
    out = total if count is None else total / count
    return out if out.dtype == dtype else out.to(dtype)


def _acc(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value
