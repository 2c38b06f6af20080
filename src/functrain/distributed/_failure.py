"""A rank whose own part of a data-parallel step raises: every rank raises, none waits (internal).

Before its first collective each rank runs its own part of the step: the checks of the state it
was given, its batch's split, its loss and gradients (micro-batches, a ``grad_stats`` hook's
statistics, per-example clipping), eagerly or as the compiled gradient region. That part can
raise on one rank only: a bad token id or a rank-specific shape in that rank's batch, out of
memory, a compiler that fails on one host. Such a rank used to leave the others in the step's
collectives until the group's timeout (30 minutes by default), and, called again after catching
its error, to join a sequence of collectives out of step with theirs. Instead every rank raises,
and no rank's state changes:

* **First call** (until its checks passed on every rank): the failure rides in the first call's
  first exchange of small objects (:func:`~functrain.distributed._agree.agree_first_call`: the
  ``grad_stats`` or ``check_ranks`` description; one object all-gather of its own with neither),
  or, with ``compile=``, in the exchange after the first compiled gradient region
  (:mod:`._compiled`). This holds on every backend.
* **Later calls** exchange nothing more: a failing rank joins the step's collectives on zeros
  shaped as its first call's result (:class:`ZeroResult`: gradients, metrics, buffers and
  ``grad_stats`` statistics) with the flag :data:`_FAILED` in its slot of the counts'
  all-reduce, which every step already does and whose flags it already reads on the host with
  CPU tensors (gloo). Seeing the flag, every rank exchanges the errors (one object all-gather,
  on that failing call only) and raises. With device tensors (NCCL) the flags are not read (a
  host sync in every step): a later failure raises on its rank alone, at once, and the others
  wait in the gradient collectives until the group's timeout, then raise
  :class:`~functrain.distributed.DistributedStepError`.

The failing rank raises its own exception (its type and traceback, with a note naming the
failing ranks); the others raise :class:`~functrain.distributed.DistributedStepError` naming each
failing rank with its error's type and message. Every rank raises before its optimizer update, so
the state given to the step is untouched (not consumed with ``donate=True``) and the same call
can be made again on every rank. A healthy step pays nothing: no extra collective, no extra read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.distributed import process
from functrain.distributed._agree import (
    Check,
    agree_first_call,
    check_no_rank_failed,
    compare_grad_stats,
    compare_noise_keys,
    compare_ranks,
    describe_grad_stats,
    describe_noise_keys,
    describe_ranks,
)
from functrain.distributed._compiled import _FIRST_GRAD
from functrain.distributed._uneven import _REFUSED
from functrain.train import gradient
from functrain.train.faults import NonFiniteError
from functrain.train.state import TrainState

__all__: list[str] = []  # internal

# A rank's flag in the counts' all-reduce (beside _uneven's taken, empty and refused): its own
# part of the step raised on a call after the first.
_FAILED = 3.0
_EAGER_PART = (
    "the ranks' own part of the data-parallel step (the checks of the state, the batch's split, "
    "the loss and gradients)"
)
_COMPILED_PART = (
    "the ranks' own part of the data-parallel step (the checks of the state, the batch's split, "
    "the compiled gradient region: a recompilation, e.g. for a new batch shape)"
)


class _Meta(NamedTuple):
    """A tensor's shape, dtype and device: enough to make zeros like it."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class _Layout:
    """A pytree's structure, its tensor leaves as :class:`_Meta` (no tensor kept) and its other
    leaves (numbers) as they are."""

    def __init__(self, values: Any) -> None:
        leaves, self.spec = tree.flatten(values)
        self.leaves = [
            _Meta(x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in leaves
        ]

    def zeros(self) -> Any:
        leaves = [
            torch.zeros(x.shape, dtype=x.dtype, device=x.device) if isinstance(x, _Meta) else x
            for x in self.leaves
        ]
        return tree.unflatten(self.spec, leaves)


class ZeroResult:
    """A gradient stage result's layout (gradients, metrics, buffers, ``grad_stats``
    statistics) and the stage's loss-kind records: zeros like it let a rank whose own part of
    the step raised join the step's collectives (every one of them: the gradient all-reduce or
    reduce-scatter, the counts' all-reduce, the buffers' broadcast, the statistics' all-gather)."""

    def __init__(self, result: gradient.GradResult, metas: list[Any]) -> None:
        self.grads = _Layout(result.grads)
        self.metrics = _Layout(dict(result.metrics))
        self.buffers = _Layout(result.buffers)
        self.stats = None if result.stats is None else _Layout(result.stats)
        self.metas = list(metas)
        # Where the step's flags live: read on the host (every rank alike) only there.
        self.on_host = result.metrics["loss"].device.type == "cpu"

    def zeros(self, metas: list[Any]) -> gradient.GradResult:
        """Zeros like the result; ``metas`` (emptied by the failed call) refilled as it was."""
        metas[:] = self.metas  # the step reads the loss kind (mean or LossSum) from them
        stats = None if self.stats is None else self.stats.zeros()
        return gradient.GradResult(
            self.grads.zeros(), self.metrics.zeros(), self.buffers.zeros(), stats, True
        )


class RankPart(NamedTuple):
    """This rank's own part of a step: its micro-batch count, flag, the error its flag stands
    for (a refusal, a failure) and its gradient stage's result (zeros when it failed)."""

    k: int
    flag: float
    error: Exception | None
    result: gradient.GradResult


class RankFailures:
    """The data-parallel step's own part on this rank, its first call's checks and the handling
    of a rank-local failure (internal mixin)."""

    _local: Any
    _compiled_grad: Any
    _grad_stats: Any
    group: process.Group
    check_ranks: bool
    shard_optimizer: bool
    _checked: bool
    _joins_refused: Callable[[], bool]
    _agreed: Callable[..., Any]
    _rank_part: Callable[[TrainState, Any], RankPart]
    # The first call's result's layout (several ranks only): set once this rank's part ran.
    _grad_zeros: ZeroResult | None = None

    def _this_rank(self, state: TrainState, batch: Any) -> RankPart:
        """This rank's own part of the step (:meth:`_rank_part`). Where it raises on some ranks
        only, every rank raises (see this module): on the first call through the first call's
        exchange, on later calls after the collectives, which a failing rank joins on zeros
        (the :class:`RankPart` returned then is flagged ``_FAILED``)."""
        if self._compiled_grad is not None and self._grad_zeros is None:
            # compile=, first call: the ranks agree that the region compiled and ran everywhere
            part = self._agreed(lambda: self._rank_part(state, batch), _FIRST_GRAD)
            self._record_result(part.result)
            return part
        try:
            part = self._rank_part(state, batch)
        except NonFiniteError:
            raise  # decided on the replicated skip counters: every rank raises it at once
        except Exception as err:
            if not self._joins_refused():
                raise
            if not self._checked:
                self._check(err)  # raises err here, the others' exchange raises there
            return self._joined(err)
        self._record_result(part.result)
        return part

    def _check(
        self,
        error: Exception | None,
        params: Any = None,
        opt_state: Any = None,
        buffers: Any = None,
        local: dict | None = None,
        is_sum: bool = False,
        stats: Any = None,
    ) -> None:
        """First call: all ranks agree on the state and the metrics (small object exchanges),
        the first of which also tells them whether a rank's own part of the step raised
        (``error``, on that rank, which then has nothing else to describe): all raise then."""
        if not self._joins_refused():
            self._checked = True
            return
        checks = []
        if self._grad_stats is not None:
            # Even without check_ranks: ranks packing different layouts (another K) would send
            # all-gathers of different sizes, which fail obscurely or hang.
            checks.append(
                Check(
                    "the first step's grad_stats check",
                    lambda: describe_grad_stats(stats),
                    compare_grad_stats,
                )
            )
        if self.check_ranks:
            what = "the first step's check that all ranks agree"
            opt = None if self.shard_optimizer else opt_state  # shards differ between ranks
            names = sorted(local or ())
            checks.append(
                Check(
                    what, lambda: describe_ranks(params, opt, buffers, names, is_sum), compare_ranks
                )
            )
            # Not only DP-SGD: add_noise keys that differ part the ranks' parameters too (under
            # ZeRO-1 a 0-d parameter, which every rank updates whole with its own key).
            checks.append(Check(what, lambda: describe_noise_keys(opt_state), compare_noise_keys))
        agree_first_call(error, checks, self.group, self._part_what)
        self._checked = True

    @property
    def _part_what(self) -> str:
        """What raised, as the messages name it."""
        return _EAGER_PART if self._compiled_grad is None else _COMPILED_PART

    def _record_result(self, result: gradient.GradResult) -> None:
        """Keeps the first result's layout (once, several ranks only): a later failure joins
        the collectives on zeros like it."""
        if self._grad_zeros is None and self._joins_refused():
            self._grad_zeros = ZeroResult(result, self._local.grad_stage.metas)

    def _joined(self, error: Exception) -> RankPart:
        """A later call's part for a rank whose own part raised ``error``: zeros flagged
        :data:`_FAILED`, to take part in the step's collectives, after which every rank raises.

        Raises ``error`` itself, on this rank alone, where the flags will not be read on the
        host (device tensors) or the zeros cannot be made (out of memory).
        """
        template = self._grad_zeros
        zeros = None
        if template is not None and template.on_host:
            try:
                zeros = template.zeros(self._local.grad_stage.metas)
            except Exception:  # e.g. out of memory: the rank raises its own error alone
                zeros = None
        if zeros is None:
            raise error
        return RankPart(1, _FAILED, error, zeros)

    def _raise_for_failures(self, flags: list[float], mine: float, error: Exception | None) -> None:
        """Every rank raises when one flagged :data:`_FAILED` (a refusing rank its own error
        too): the errors are exchanged first, on this failing call only."""
        if any(f == _FAILED for f in flags):
            own = error if mine in (_FAILED, _REFUSED) else None
            check_no_rank_failed(own, self.group, self._part_what)
