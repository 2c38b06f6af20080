"""The process group: starting it under ``torchrun``, who am I, rank 0, barriers and timeouts.

Everything here also works outside a distributed job (a plain ``python script.py``): there is
then one process, of rank 0, in a world of size 1, so the same script runs with and without
``torchrun``.

Example:
    >>> from functrain import distributed as dist
    >>> dist.rank(), dist.world_size(), dist.is_rank_zero()  # no process group here
    (0, 1, True)
"""

from __future__ import annotations

import datetime
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as tdist

from functrain.distributed.errors import DistributedStepError
from functrain.logging.rank_zero import is_rank_zero, rank_zero_only

__all__ = [
    "barrier",
    "default_device",
    "init",
    "is_distributed",
    "is_rank_zero",
    "local_rank",
    "rank",
    "rank_zero_only",
    "shutdown",
    "world_size",
]

Group = Any  # a torch.distributed ProcessGroup, or None for the default group


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialized.

    Returns:
        ``True`` once the default process group exists (e.g. after :func:`init` under
        ``torchrun``); ``False`` when ``torch.distributed`` is unavailable or not initialised.

    Example:
        >>> from functrain import distributed as dist
        >>> dist.is_distributed()
        False
    """
    return tdist.is_available() and tdist.is_initialized()


def rank(group: Group = None) -> int:
    """This process's rank in ``group`` (the default group when ``None``); 0 outside a job.

    Args:
        group: a process group, or ``None`` for the default one; ignored when
            ``torch.distributed`` is not initialised.

    Returns:
        ``torch.distributed.get_rank(group)``: a rank in ``[0, world_size(group))``, or -1
        when this process is not a member of ``group``; 0 when ``torch.distributed`` is not
        initialised.

    Example:
        >>> from functrain import distributed as dist
        >>> dist.rank()
        0
    """
    return tdist.get_rank(group) if is_distributed() else 0


def world_size(group: Group = None) -> int:
    """The number of processes in ``group``; 1 outside a distributed job.

    Args:
        group: a process group, or ``None`` for the default one; ignored when
            ``torch.distributed`` is not initialised.

    Returns:
        ``torch.distributed.get_world_size(group)`` (-1 when this process is not a member of
        ``group``); 1 when ``torch.distributed`` is not initialised.

    Example:
        >>> from functrain import distributed as dist
        >>> dist.world_size()
        1
    """
    return tdist.get_world_size(group) if is_distributed() else 1


def local_rank() -> int:
    """The rank on this machine (``LOCAL_RANK``, set by ``torchrun``); 0 when not set.

    Returns:
        The ``LOCAL_RANK`` environment variable as an ``int``, read at each call and
        independent of whether ``torch.distributed`` is initialised; 0 when it is not set.

    Raises:
        ValueError: ``LOCAL_RANK`` is set but is not an integer.

    Example:
        >>> from functrain import distributed as dist
        >>> dist.local_rank()
        0
    """
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU: where this rank computes.

    Returns:
        ``torch.device("cuda", local_rank() % torch.cuda.device_count())`` when CUDA is
        available (so ``cuda:0`` outside ``torchrun``), else ``torch.device("cpu")``; the
        same whether or not ``torch.distributed`` is initialised. Sets no current device.

    Raises:
        ValueError: ``LOCAL_RANK`` is set but is not an integer (only with CUDA available).

    Example:
        >>> import torch
        >>> from functrain import distributed as dist
        >>> dist.default_device() == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def _timedelta(timeout: float | datetime.timedelta) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def init(
    backend: str | None = None,
    *,
    timeout: float | datetime.timedelta = 300.0,
    device: torch.device | str | None = None,
) -> None:
    """Starts the default process group from the environment ``torchrun`` sets.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Does nothing when the
    group already exists, or when the variables are absent (a plain single-process run: the
    functions of this module then describe a world of one process).

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA); default: ``"nccl"`` when ``device`` is a
            CUDA device (or, with no ``device``, when CUDA is available), else ``"gloo"``.
        timeout: seconds (or a ``timedelta``) a collective waits for the other ranks before it
            fails. A rank that dies closes its connections, so the others fail at once; a rank
            that hangs makes the others fail after ``timeout``. Data-parallel steps turn both
            into a :class:`~functrain.distributed.DistributedStepError`.
        device: with NCCL, the CUDA device of this rank (default ``cuda:LOCAL_RANK``); it
            becomes the current CUDA device.

    Example:
        >>> from functrain import distributed as dist
        >>> dist.init(timeout=60)  # without torchrun: nothing to do
        >>> dist.is_distributed()
        False
    """
    delta = _timedelta(timeout)
    if is_distributed() or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return
    if device is not None:
        device = torch.device(device)
    if backend is None:
        on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        backend = "nccl" if on_cuda else "gloo"
    # torch.func.grad imports torch._dynamo on its first call. Imported after the group exists,
    # it keeps the group alive past destroy_process_group (torch 2.13): gloo's worker threads then
    # outlive the interpreter and, under load, abort the process as it exits.
    importlib.import_module("torch._dynamo")

    kwargs: dict[str, Any] = {"backend": backend, "timeout": delta}
    if backend == "nccl":
        device = device if device is not None else default_device()
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    tdist.init_process_group(**kwargs)


def shutdown() -> None:
    """Destroys the default process group, if there is one (call it at the end of a script).

    Example:
        >>> from functrain import distributed as dist
        >>> dist.shutdown()  # no group: nothing to do
    """
    if is_distributed():
        tdist.destroy_process_group()


def group_timeout(group: Group = None) -> float | None:
    """The timeout of ``group`` in seconds, when torch exposes it (internal, for messages)."""
    if not is_distributed():
        return None
    try:
        pg = group if group is not None else tdist.group.WORLD
        backend = pg._get_backend(torch.device("cpu"))  # type: ignore[union-attr]
        return backend.options._timeout.total_seconds()
    except Exception:
        try:
            pg = group if group is not None else tdist.group.WORLD
            return pg._get_backend(torch.device("cuda")).options._timeout.total_seconds()  # type: ignore[union-attr]
        except Exception:
            return None


def failure_message(what: str, err: BaseException, group: Group = None) -> str:
    """The message of a :class:`DistributedStepError` (internal)."""
    timeout = group_timeout(group)
    within = f"{timeout:g} s" if timeout is not None else "the process group's timeout"
    return (
        f"rank {rank(group)} of {world_size(group)}: {what} failed ({type(err).__name__}: "
        f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}). Another rank "
        f"probably crashed, exited, or stopped answering for longer than {within}, or the ranks "
        "are out of step (different numbers of steps). The train state given to this call was "
        "not modified; stop the job and resume from the last checkpoint."
    )


@contextmanager
def collective_errors(what: str, group: Group = None) -> Iterator[None]:
    """Turns a failed collective into a :class:`DistributedStepError` (internal)."""
    try:
        yield
    except DistributedStepError:
        raise
    except RuntimeError as err:  # DistBackendError and gloo/NCCL errors are RuntimeErrors
        raise DistributedStepError(failure_message(what, err, group)) from err


def barrier(timeout: float | datetime.timedelta | None = None, group: Group = None) -> None:
    """Waits until every rank reaches this point; fails clearly if one does not in time.

    With gloo this is ``torch.distributed.monitored_barrier(wait_all_ranks=True)``: rank 0
    reports which ranks did not arrive within ``timeout``. With NCCL, a plain barrier. Outside a
    job it returns at once.

    Args:
        timeout: seconds to wait (default: the process group's timeout).
        group: the process group (default: the default group).

    Raises:
        DistributedStepError: a rank did not arrive in time (or died).

    Example:
        >>> from functrain import distributed as dist
        >>> dist.barrier(timeout=5)  # one process: nothing to wait for
    """
    if not is_distributed():
        return
    with collective_errors("barrier", group):
        if tdist.get_backend(group) == "gloo":
            delta = None if timeout is None else _timedelta(timeout)
            tdist.monitored_barrier(group, timeout=delta, wait_all_ranks=True)
        else:
            tdist.barrier(group)
