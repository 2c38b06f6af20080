"""This rank's batch plan in the data-parallel step: its split, or a stand-in, and its flag.

:class:`BatchPlans` is a mixin of :class:`~functrain.distributed._train_step.DataParallelTrainStep`.
A rank whose batch is empty, or refused by the split, evaluates a stand-in batch of zeros
(:func:`~functrain.distributed._uneven._stand_in`) only to join every collective with tensors of
the right shapes, at zero weight; a flag per rank in the counts' all-reduce (:meth:`_flags`) then
tells every rank whether to raise (a refusal anywhere, or every batch empty) before anything is
written, instead of leaving the others in a collective until the group's timeout. Kept apart
from the step's ``__call__`` so that the split's rules (plain and DP-SGD) read in one place.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain import tree
from functrain.distributed import process
from functrain.distributed._failure import RankPart
from functrain.distributed._sums import COUNT
from functrain.distributed._uneven import (
    _EMPTY,
    _PER_MICRO_BATCH,
    _REFUSED,
    _TAKEN,
    _WEIGHTS,
    _is_empty,
    _stand_in,
)
from functrain.train import dp_stage, microbatch

__all__: list[str] = []  # internal


class BatchPlans:
    """How the data-parallel step takes this rank's batch (internal mixin)."""

    _local: Any
    _grad_stats: Any
    group: process.Group

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

    def _flags(self, flag: float, device: torch.device) -> torch.Tensor | None:
        """One slot per rank, this rank's set to ``flag`` (``None`` alone: nothing to tell)."""
        if not self._joins_refused():
            return None
        flags = torch.zeros(process.world_size(self.group), dtype=torch.float64)
        flags[process.rank(self.group)] = flag  # on the host: no device write
        return flags.to(device)

    def _weighed(self, part: RankPart) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """This rank's metrics and its metrics' counts (per name) to combine; a stand-in batch
        (or a failed rank's zeros) weighs nothing: zero ``num_examples``, ``num_tokens``, counts."""
        local = dict(part.result.metrics)
        k = part.k
        counts = {n[len(COUNT) :]: local.pop(n) * k for n in list(local) if n.startswith(COUNT)}
        if part.flag != _TAKEN:
            # The stand-in batch weighs nothing: zero counts make every sum this rank sends
            # zero (_sums.weighted, _combine's scale), and its buffers are not kept.
            local = {n: v.new_zeros(()) if n in _WEIGHTS else v for n, v in local.items()}
            counts = {n: c.new_zeros(()) for n, c in counts.items()}
        return local, counts
