"""The data-parallel step's own argument checks, run first at construction (internal).

:func:`check_arguments` refuses the options that only a data-parallel step has
(``sync_buffers``, ``bucket_cap_mb``) and the combinations it does not support
(``grad_stats`` or ``compile=`` with ``shard_optimizer=True``, ``compile=`` with
``grad_stats``), before the single-process :class:`~functrain.train.step.TrainStep` it wraps
checks the rest; kept apart so that :class:`~functrain.distributed._train_step.DataParallelTrainStep`'s
constructor reads as the building of its parts.
"""

from __future__ import annotations

from typing import Any

from functrain.train.grad_stats import GradStatsHook

__all__: list[str] = []  # internal


def check_arguments(
    *,
    sync_buffers: Any,
    bucket_cap_mb: Any,
    shard_optimizer: bool,
    grad_stats: GradStatsHook | None,
    compile: Any,
) -> None:
    """Raise ``ValueError`` for a bad data-parallel option, or an unsupported combination.

    Example:
        >>> check_arguments(sync_buffers="broadcast", bucket_cap_mb=25, shard_optimizer=False,
        ...                 grad_stats=None, compile=False)
        >>> check_arguments(sync_buffers="all", bucket_cap_mb=25, shard_optimizer=False,
        ...                 grad_stats=None, compile=False)
        Traceback (most recent call last):
        ...
        ValueError: sync_buffers must be 'broadcast' or 'none', got 'all'
    """
    if sync_buffers not in ("broadcast", "none"):
        raise ValueError(f"sync_buffers must be 'broadcast' or 'none', got {sync_buffers!r}")
    if (
        isinstance(bucket_cap_mb, bool)
        or not isinstance(bucket_cap_mb, (int, float))
        or bucket_cap_mb <= 0
    ):
        raise ValueError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
    if grad_stats is not None and shard_optimizer:
        # The hook's update needs the whole global gradient; a ZeRO-1 rank holds only its
        # pieces, and gathering the rest would cost a gradient-sized all-gather per step.
        raise ValueError(
            "grad_stats is not supported with shard_optimizer=True (the hook needs the "
            "whole combined gradient, which a ZeRO-1 rank does not hold): use "
            "shard_optimizer=False"
        )
    if compile is not False and (shard_optimizer or grad_stats is not None):
        # Both would need their own compiled regions around collectives (the sharded
        # update's all-gather, the hook's all-gathered stats); refused, not run eagerly.
        which = "shard_optimizer=True" if shard_optimizer else "grad_stats"
        raise ValueError(
            f"compile= is not supported with {which} in a data-parallel step: use "
            f"compile=False, or drop {which}"
        )
