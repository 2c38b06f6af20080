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
  shaped as its earlier results (:class:`ZeroResult`: gradients, metrics, buffers and
  ``grad_stats`` statistics; the metrics' part follows their names, should aux metrics appear
  later, but cannot know names that first appear on the failing call itself) with the flag
  :data:`_FAILED` in its slot of the counts' all-reduce, which every step already does and
  whose flags it already reads on the host with CPU tensors (gloo). Seeing the flag, every rank
  exchanges the errors (one object all-gather, on that failing call only) and raises. With
  device tensors (NCCL) the flags are not read (a host sync in every step): a later failure
  raises on its rank alone, at once, and the others wait in the gradient collectives until the
  group's timeout, then raise :class:`~functrain.distributed.DistributedStepError`.

The failing rank raises its own exception (its type and traceback, with a note naming the
failing ranks); the others raise :class:`~functrain.distributed.DistributedStepError` naming each
failing rank with its error's type and message. Every rank raises before its optimizer update, so
the state given to the step is untouched (not consumed with ``donate=True``) and the same call
can be made again on every rank. A healthy step pays nothing: no extra collective, no extra read.
``NonFiniteError`` (``max_consecutive_skips``) is decided on the replicated skip counters, so
every rank raises it alike; it is joined as any failure all the same (on device tensors it is
raised at once), so that a rank whose own checks raised something else first does not wait.

**A rank that leaves a call alone is out of step.** A ``KeyboardInterrupt`` (a signal
mid-step), ``SystemExit`` or other ``BaseException`` that is not an ``Exception`` propagates on
its rank at once, wherever it comes from: the others may be waiting in the step's collectives
(until the peer exits, which closes its connections, or the group's timeout). So may they after
a failure this rank could not tell them of (device tensors, above) or a collective that failed.
A new call from that rank would pair its collectives with the others' pending ones, silently
mixing batches of different calls: instead, every later call on that rank (and its
``full_state`` gather, its ``init_state`` broadcast) raises
:class:`~functrain.distributed.DistributedStepError` at once, before any collective
(:meth:`RankFailures._refuse_out_of_step`). The state given to the interrupted call is not
written before the update (with ``donate=True``, an update torn by the interrupt is refused as
consumed). The job should stop on every rank and resume from its last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.distributed import process
from functrain.distributed._agree import (
    Check,
    _describe,
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
from functrain.distributed.errors import DistributedStepError
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
        self.buffers = _Layout(result.buffers)
        self.stats = None if result.stats is None else _Layout(result.stats)
        self.refresh_metrics(result, metas)
        # Where the step's flags live: read on the host (every rank alike) only there.
        self.on_host = result.metrics["loss"].device.type == "cpu"

    def refresh_metrics(self, result: gradient.GradResult, metas: list[Any]) -> None:
        """The metrics' layout and the loss-kind records of ``result`` (their names and kinds
        size the counts' all-reduce)."""
        self.metric_names = tuple(result.metrics)
        self.metrics = _Layout(dict(result.metrics))
        self.metas = list(metas)

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
    # Why this rank is out of step with the others (see _mark_out_of_step), or None.
    _out_of_step: str | None = None

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
        except Exception as err:
            # NonFiniteError too: decided on the replicated skip counters, it is raised on every
            # rank alike, unless this rank's own checks raised something else first (a state
            # made for another optimizer): joined as any failure, every rank raises its own.
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
        agree_first_call(error, checks, self.group, self._part_what, self._lost)
        self._checked = True

    @property
    def _part_what(self) -> str:
        """What raised, as the messages name it."""
        return _EAGER_PART if self._compiled_grad is None else _COMPILED_PART

    def _record_result(self, result: gradient.GradResult) -> None:
        """Keeps the result's layout (several ranks only): a later failure joins the
        collectives on zeros like it. Made on the first call; its metrics' part is made again
        when their names change (aux metrics that appear later: the counts' all-reduce would
        otherwise differ in size between a failing rank and the others)."""
        if not self._joins_refused():
            return
        template = self._grad_zeros
        if template is None:
            self._grad_zeros = ZeroResult(result, self._local.grad_stage.metas)
        elif template.metric_names != tuple(result.metrics):  # a few string comparisons
            template.refresh_metrics(result, self._local.grad_stage.metas)

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
            if not isinstance(error, NonFiniteError):  # that one: every rank raises it alike
                self._mark_out_of_step(
                    error, "its own part of the step raised, which the others could not be told"
                )
            raise error
        return RankPart(1, _FAILED, error, zeros)

    def _mark_out_of_step(self, error: BaseException, how: str) -> None:
        """Records that a call left this rank out of step with the others (it raised alone,
        while they may wait in, or be about to enter, that call's collectives): every later
        call (and ``full_state``, ``init_state``'s broadcast) is refused on this rank."""
        if self._out_of_step is None and self._joins_refused():
            self._out_of_step = f"{how}: {_describe(error)}"

    def _lost(self, error: Exception) -> None:
        """An exchange of the step failed (a collective error): this rank is out of step."""
        self._mark_out_of_step(error, "a collective of the step failed")

    def _refuse_out_of_step(self, what: str) -> None:
        """Raises :class:`~functrain.distributed.DistributedStepError` (before any collective)
        if an earlier call left this rank out of step (:meth:`_mark_out_of_step`)."""
        if self._out_of_step is None:
            return
        raise DistributedStepError(
            f"{what} is refused on rank {process.rank(self.group)}: an earlier call of this "
            f"data-parallel step ended on this rank alone ({self._out_of_step}) while the "
            "other ranks may still wait in, or be about to enter, that call's collectives. A "
            "new collective from this rank would pair with theirs out of step (the ranks would "
            "silently combine the batches of different calls, or leave parameters that "
            "differ). Stop the job on every rank and resume from the last checkpoint"
        )

    def _raise_for_failures(self, flags: list[float], mine: float, error: Exception | None) -> None:
        """Every rank raises when one flagged :data:`_FAILED` (a refusing rank its own error
        too): the errors are exchanged first, on this failing call only."""
        if any(f == _FAILED for f in flags):
            own = error if mine in (_FAILED, _REFUSED) else None
            check_no_rank_failed(own, self.group, self._part_what, on_lost=self._lost)
