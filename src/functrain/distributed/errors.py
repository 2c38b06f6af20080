"""Errors of data-parallel training: failed collectives, ranks out of step, unshardable optimizers."""

from __future__ import annotations

__all__ = ["DistributedStepError", "RankMismatchError", "ShardingError"]


class DistributedStepError(RuntimeError):
    """A collective of a data-parallel step failed: another rank died, hung or left the job,
    refused its batch, or failed in a compiled region.

    Raised instead of hanging forever: a peer that exits closes its connections (the error comes
    at once) and a peer that stops answering makes the collective give up after the process
    group's timeout (``functrain.distributed.init(timeout=...)``). A peer that refuses its batch
    (with CPU tensors) joins the step's collectives with a flag, and the others raise this,
    naming it, at once. The train state given to the step is left untouched (not consumed, not
    half-updated); the job should stop and resume from its last checkpoint.

    With ``compile=``, a compiled region that raises on some ranks only (no compiler on one host,
    a batch shape dynamo cannot trace, out of memory) makes every rank raise at once: the failing
    ranks their own exception, unchanged but for a note naming the failing ranks, and the
    others this error, naming each failing rank with its exception's type and message (the
    first paragraph). On the first call this holds on every backend (the ranks exchange one
    small object after each region); on later calls, where one rank may recompile alone (a new
    batch shape), it needs CPU tensors (gloo): with device tensors a later failure raises on
    its rank alone and the others wait until the group's timeout.

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
