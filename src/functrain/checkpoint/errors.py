"""Exceptions raised by :mod:`functrain.checkpoint`."""

from __future__ import annotations

from functrain.tree import TreeMismatchError

__all__ = ["CheckpointError", "CheckpointMismatchError", "InvalidCheckpointError"]


class CheckpointError(Exception):
    """Base class of every checkpoint error.

    Example:
        >>> from functrain import checkpoint
        >>> issubclass(checkpoint.InvalidCheckpointError, checkpoint.CheckpointError)
        True
    """


class InvalidCheckpointError(CheckpointError, ValueError):
    """The file is not a complete, intact functrain checkpoint.

    Raised for truncated or corrupted files (checksum mismatch), foreign formats, and pickles or
    ``torch.save`` archives, which are refused without being unpickled.

    Example:
        >>> from functrain import checkpoint
        >>> issubclass(checkpoint.InvalidCheckpointError, ValueError)
        True
    """


class CheckpointMismatchError(CheckpointError, TreeMismatchError):
    """The checkpoint does not fit the restore target; the message names the differing path.

    Example:
        >>> import tempfile, os, torch
        >>> from functrain import checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
        >>> checkpoint.save(path, {"w": torch.zeros(3, 4)})
        >>> try:
        ...     checkpoint.restore(path, target={"w": torch.zeros(4, 4)})
        ... except checkpoint.CheckpointMismatchError as err:
        ...     print(err)
        checkpoint['w'] has shape (3, 4) but target has (4, 4)
    """
