"""Sums and counts of a data-parallel step (internal): what the ranks add up, and the metrics.

Rank ``r`` contributes ``wᵣ`` (its examples ``Nᵣ``, or its ``LossSum`` count ``Cᵣ``) and
``wᵣ·gᵣ``, ``wᵣ·lossᵣ``; an aux metric contributes ``Nᵣ·vᵣ`` (a mean over examples) or
``cᵣ·vᵣ`` and ``cᵣ`` (a ``LossSum``, with its own count ``cᵣ``). One float64 vector per step holds
the scalars, so one small all-reduce gives every global metric.

The train step's gradient stage reports ``LossSum`` aux values as ratios without their counts,
so :func:`with_aux_counts` adds, for each, an aux ``LossSum(countᵢ, 1)`` whose combined value
``Σ countᵢ / K`` gives the count back (times the number ``K`` of micro-batches).

A rank with a zero weight (a ``LossSum`` batch of padding only) has a local mean of ``0 / 0``:
NaN loss, NaN gradient. Its true contribution to the sums is zero, so :func:`weighted` gives zero
there, as a single process on the concatenated batch would (it never divides by that rank's 0).

A DP-SGD step (``per_example_clip``) reports ``loss`` and ``clipped_fraction`` as means over
the realized global batch, example-weighted; when every rank's batch is empty (Poisson
sampling) they are ``0``, as the single-process DP step reports (it divides by ``max(N, 1)``).

A ``grad_stats`` hook's per-micro-batch stats are not summed but gathered: :func:`pack_stats`
puts this rank's in one float64 vector, and :func:`unpack_stats` reads the all-gathered vectors
back as the stats of all ``world × K`` micro-batches, in rank order.

With more than one rank the vector ends with one slot per rank, this rank's own set to its
batch's state (``0`` taken, ``1`` empty, ``2`` refused, ``3`` its own part of the step raised):
the same all-reduce tells every rank which ranks had an empty batch, refused theirs or failed,
so that all of them raise together (see :mod:`functrain.distributed._train_step` and
:mod:`functrain.distributed._failure`) instead of some waiting for a rank that left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from functrain.train import loss as loss_lib
from functrain.train.grad_stats import MicroBatchStats

COUNT = "__functrain_dp_count__/"  # aux entries carrying LossSum aux counts


def _add_aux_counts(result: Any) -> Any:
    if not isinstance(result, loss_lib.LossOutput) or not isinstance(result.aux, dict):
        return result
    extra = {}
    for name, value in result.aux.items():
        if isinstance(value, loss_lib.LossSum) and isinstance(value.total, torch.Tensor):
            count = value.count
            if not isinstance(count, torch.Tensor):
                # At least float32, which holds counts exactly (bfloat16 rounds 1001 to 1000).
                dtype = torch.promote_types(value.total.dtype, torch.float32)
                count = torch.full((), count, dtype=dtype, device=value.total.device)
            # Combined as Σ countᵢ / Σ 1 = Σ countᵢ / K: the step multiplies K back.
            extra[COUNT + name] = loss_lib.LossSum(count.detach(), 1)
    return result._replace(aux={**result.aux, **extra}) if extra else result


def with_aux_counts(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``loss_fn`` also reporting each LossSum aux metric's count (same optional inputs)."""
    accepted = loss_lib.accepted_inputs(loss_fn)
    if accepted == {"buffers", "key"}:

        def both(params: Any, batch: Any, buffers: Any = None, key: Any = None) -> Any:
            return _add_aux_counts(loss_fn(params, batch, buffers=buffers, key=key))

        return both
    if "buffers" in accepted:

        def with_buffers(params: Any, batch: Any, buffers: Any = None) -> Any:
            return _add_aux_counts(loss_fn(params, batch, buffers=buffers))

        return with_buffers
    if "key" in accepted:

        def with_key(params: Any, batch: Any, key: Any = None) -> Any:
            return _add_aux_counts(loss_fn(params, batch, key=key))

        return with_key

    def plain(params: Any, batch: Any) -> Any:
        return _add_aux_counts(loss_fn(params, batch))

    return plain


def weighted(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``value · weight``, zero where ``weight`` is zero (even for a NaN ``value = 0 / 0``)."""
    return (value * weight).masked_fill_(weight == 0, 0)


def div_(leaves: list[torch.Tensor], divisor: torch.Tensor) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for leaf in leaves:
        if leaf.numel():
            by_dtype.setdefault(leaf.dtype, []).append(leaf)
    for dtype, group in by_dtype.items():
        torch._foreach_div_(group, divisor.to(dtype))


class Stats:
    """The step's local sums and counts in one float64 vector, and the global metrics."""

    def __init__(
        self,
        local: dict[str, torch.Tensor],
        counts: dict[str, torch.Tensor],
        is_sum: bool,
        *,
        empty_is_zero: bool = False,
        flags: torch.Tensor | None = None,
    ) -> None:
        self.is_sum = is_sum
        self.empty_is_zero = empty_is_zero  # a DP step: means over no examples are 0, not NaN
        self.loss_dtype = local["loss"].dtype
        # The train step keeps counts in at least float32 (``num_tokens`` of a bfloat16 loss
        # is exact up to 2**24); rounding it to the loss dtype gave 1000 for 1001 tokens.
        self.count_dtype = local["num_tokens"].dtype if is_sum else self.loss_dtype
        examples = local["num_examples"].to(torch.float64)
        weight = local["num_tokens"].to(torch.float64) if is_sum else examples
        entries = [weight, weighted(local["loss"].to(torch.float64), weight), examples]
        self.aux: list[tuple[str, torch.dtype, bool]] = []
        for name, value in local.items():
            if name in ("loss", "num_examples", "num_tokens"):
                continue
            v = value.to(torch.float64)
            if name in counts:
                c = counts[name].to(torch.float64)
                entries += [weighted(v, c), c]
            else:
                entries.append(weighted(v, examples))
            self.aux.append((name, value.dtype, name in counts))
        self.weight = weight
        self.vector = torch.stack(entries)
        if flags is not None:  # last: the metrics read the vector from its start
            self.vector = torch.cat([self.vector, flags.to(self.vector)])

    def metrics(self, reduced: torch.Tensor) -> dict[str, torch.Tensor]:
        total, examples = reduced[0], reduced[2]
        out = {"num_examples": examples.round().to(torch.int64)}
        if self.empty_is_zero:  # the sums are then 0 too: 0 / 1
            total, examples = total.clamp_min(1), examples.clamp_min(1)
        out["loss"] = (reduced[1] / total).to(self.loss_dtype)
        if self.is_sum:
            out["num_tokens"] = total.to(self.count_dtype)
        j = 3
        for name, dtype, is_sum in self.aux:
            if is_sum:
                out[name] = (reduced[j] / reduced[j + 1]).to(dtype)
                j += 2
            else:
                out[name] = (reduced[j] / examples).to(dtype)
                j += 1
        return out


def pack_stats(stats: MicroBatchStats) -> tuple[torch.Tensor, list[int]]:
    """A ``grad_stats`` hook's local stats as one float64 vector and its rows' lengths.

    The rows are ``sizes``, ``losses`` and each ``values`` entry (``K`` entries each for 0-d
    ``per_micro_batch`` outputs), one after another; float64 holds every float32 and bfloat16
    value, and every count below 2**53, exactly.
    """
    rows = [stats.sizes, stats.losses, *stats.values.values()]
    device = stats.losses.device
    flat = [row.reshape(-1).to(device=device, dtype=torch.float64) for row in rows]
    return torch.cat(flat), [row.numel() for row in flat]


def unpack_stats(
    gathered: torch.Tensor, lengths: list[int], stats: MicroBatchStats, accumulated: Any
) -> MicroBatchStats:
    """All ranks' stats from the all-gather of :func:`pack_stats`' vectors: each row holds the
    ranks' entries in rank order (``world × K``), in the local row's dtype and device."""
    world = gathered.numel() // sum(lengths)
    per_rank = gathered.view(world, sum(lengths))
    rows = [stats.sizes, stats.losses, *stats.values.values()]
    out, start = [], 0
    for row, n in zip(rows, lengths):
        joined = per_rank[:, start : start + n].reshape(-1)
        out.append(joined.to(device=row.device, dtype=row.dtype))
        start += n
    values = dict(zip(stats.values, out[2:]))
    return MicroBatchStats(out[0], out[1], values, accumulated)
