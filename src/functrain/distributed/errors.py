"""Errors of data-parallel training: failed collectives, ranks out of step, unshardable optimizers."""

from __future__ import annotations

__all__ = ["DistributedStepError", "RankMismatchError", "ShardingError"]


class DistributedStepError(RuntimeError):
    """A collective of a data-parallel step failed: another rank died, hung or left the job,
    or refused its batch.

    Raised instead of hanging forever: a peer that exits closes its connections (the error comes
    at once) and a peer that stops answering makes the collective give up after the process
    group's timeout (``functrain.distributed.init(timeout=...)``). A peer that refuses its batch
    (with CPU tensors) joins the step's collectives with a flag, and the others raise this,
    naming it, at once. The train state given to the step is left untouched (not consumed, not
    half-updated); the job should stop and resume from its last checkpoint.

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
