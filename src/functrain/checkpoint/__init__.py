"""Checkpoints that load without executing code: ``save``, ``restore``, ``CheckpointManager``.

A checkpoint is a single safetensors file plus a JSON description of the pytree, written
atomically (temporary file, fsync, rename, directory fsync) and checksummed (SHA-256 of the
description and of every tensor). Pickles are never read.

Example:
    >>> import os, tempfile, torch
    >>> from functrain import checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
    >>> checkpoint.save(path, {"params": {"w": torch.ones(2)}, "step": 5})
    >>> checkpoint.restore(path, target={"params": {"w": torch.zeros(2)}, "step": 0})
    {'params': {'w': tensor([1., 1.])}, 'step': 5}
"""

from functrain.checkpoint import errors, io, manager
from functrain.checkpoint.errors import *  # noqa: F403
from functrain.checkpoint.io import *  # noqa: F403
from functrain.checkpoint.manager import *  # noqa: F403

__all__ = [*errors.__all__, *io.__all__, *manager.__all__]
