"""Errors of data-parallel training: failed collectives, ranks out of step, unshardable optimizers."""

from __future__ import annotations

__all__ = ["DistributedStepError", "RankMismatchError", "ShardingError"]


class DistributedStepError(RuntimeError):
    """A collective of a data-parallel step failed: another rank died, hung or left the job,
    refused its batch, or raised in its own part of the step.

    Raised instead of hanging forever: a peer that exits closes its connections (the error comes
    at once) and a peer that stops answering makes the collective give up after the process
    group's timeout (``functrain.distributed.init(timeout=...)``). A peer that refuses its batch
    (with CPU tensors) joins the step's collectives with a flag, and the others raise this,
    naming it, at once. The train state given to the step is left untouched (not consumed, not
    half-updated); the job should stop and resume from its last checkpoint.

    A rank whose own part of the step raises while its process stays alive (its loss on its
    batch, e.g. a bad token id or a rank-specific shape; a ``grad_stats`` hook; out of memory;
    the checks of the state it was given; with ``compile=``, a compiled region that fails on one
    host or for one batch shape) makes every rank raise at once: the failing ranks their own
    exception, unchanged but for a note naming the failing ranks, and the others this error,
    naming each failing rank with its exception's type and message (the first paragraph). No
    rank's state changes, so every rank can call the step again (e.g. with the next batch). On
    the first call this holds on every backend (the failure travels in the first call's
    exchange of small objects); on later calls it needs CPU tensors (gloo), whose flags the
    step reads on the host anyway: with device tensors (NCCL) a later failure raises on its rank
    alone and the others wait in the step's collectives until the group's timeout, then raise
    this.

    A rank that leaves a call alone (a ``KeyboardInterrupt`` mid-step, which propagates at once;
    a failure it could not tell the others of; a failed collective) raises this from every later
    call of that step, and from its ``full_state`` and ``init_state``, before any collective: the
    others may still wait in that call's collectives, and a new collective would pair with
    theirs out of step.

    Example:
        >>> from functrain.distributed import DistributedStepError
        >>> issubclass(DistributedStepError, RuntimeError)
        True
    """


class RankMismatchError(ValueError):
    """Ranks disagree about something that must be identical: parameter shapes, dtypes or values,
    the kind of loss (mean or ``LossSum``), aux metric names, or the optimizer state layout.

    Example:
        >>> from functrain.distributed import RankMismatchError
        >>> issubclass(RankMismatchError, ValueError)
        True
    """


class ShardingError(ValueError):
    """An optimizer cannot run on a sharded (ZeRO-1) optimizer state with the same numbers.

    See :func:`functrain.distributed.check_shardable` for what is supported.

    Example:
        >>> from functrain.distributed import ShardingError
        >>> issubclass(ShardingError, ValueError)
        True
    """
