"""``save`` and ``restore`` of any pytree of tensors, in a format that loads without running code.

A checkpoint is one safetensors file. Its header holds a JSON description of the tree (node
kinds, keys, leaf dtypes and shapes, Python scalar leaves, a format version) and SHA-256 digests
of the description and of every tensor. Writes are atomic: a crash or ``kill -9`` at any moment
leaves either the previous file or the new one, never a half-written file under the final name,
and a file damaged later fails its checksums instead of loading wrong numbers.

Compared with ``torch.save``/``torch.load``: no pickle is involved at any point, so loading an
untrusted file cannot execute code, and restoring into a target validates every path.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from functrain.checkpoint import _file, _tree

__all__ = ["read_metadata", "restore", "save"]

PathLike = str | os.PathLike

# A tree description nests two JSON levels per tree level (see _tree.MAX_DEPTH); metadata may
# nest as deep as a maximal tree's description, which is known to load.
MAX_METADATA_DEPTH = 2 * _tree.MAX_DEPTH


def save(path: PathLike, state: Any, *, metadata: dict[str, Any] | None = None) -> None:
    """Saves a pytree of tensors to ``path`` atomically.

    Leaves may be tensors of any dtype and device (stored as they are: bfloat16, int, bool,
    complex, ...), ``None``, or Python ``bool``/``int``/``float``/``str``. Containers may be
    dicts, lists, tuples, NamedTuples, deques and any optree-registered node. The file is
    written to a temporary name in the same directory, flushed and fsynced, renamed over
    ``path``, and the directory is fsynced; parent directories are created.

    Each tensor leaf is stored as its own values (views, transposes, expanded and conjugated
    tensors are materialised), so tensors that share storage, such as tied parameters or views
    of one buffer, are stored once per leaf and restored as independent tensors: re-tie them
    after :func:`restore` if the model needs the sharing.

    Args:
        path: destination file, conventionally ``*.safetensors``.
        state: the pytree to save (not modified).
        metadata: JSON-serializable extra information, returned by :func:`read_metadata`.

    Raises:
        TypeError: a leaf or dict key of an unsupported type (the message names its path), or
            ``metadata`` that JSON cannot encode, that has a non-string dict key (JSON would
            read it back as a string) or that is nested more than 256 levels deep.
        ValueError: the header (tree description and metadata) would exceed the 100 MiB that
            safetensors readers accept; nothing is written.

    Example:
        >>> import os, tempfile, torch
        >>> from functrain import checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
        >>> checkpoint.save(path, {"w": torch.ones(2), "step": 3}, metadata={"note": "hi"})
        >>> checkpoint.restore(path)
        {'w': tensor([1., 1.]), 'step': 3}
    """
    path = os.fspath(path)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    _check_metadata_depth(metadata)
    try:
        meta_json = json.dumps(metadata)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata must be JSON-serializable: {err}") from None
    tensors: list[tuple[str, torch.Tensor, dict[str, Any]]] = []
    tree = _tree.encode(state, tensors)

    def describe() -> str:
        # Hand-assembled so the user metadata is encoded (and validated) only once.
        tree_json = json.dumps(tree, separators=(",", ":"))
        torch_json = json.dumps(torch.__version__)
        return (
            f'{{"version":{_file.FORMAT_VERSION},"torch":{torch_json},'
            f'"metadata":{meta_json},"tree":{tree_json}}}'
        )

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _file.write_atomic(path, tensors, describe)


def _check_metadata_depth(metadata: Any) -> None:
    """Refuses metadata nested deeper than :data:`MAX_METADATA_DEPTH` JSON levels.

    ``json.loads`` shares Python's recursion limit with its caller's frames: metadata nested a
    few hundred levels saved fine and then made the whole checkpoint unreadable ("tree
    description is not JSON") from a deep enough call stack, and a deeper one made
    ``json.dumps`` raise a bare ``RecursionError``. The walk is iterative, so it cannot recurse
    itself, and a cyclic container stops at the limit. It also refuses non-string dict keys.
    """
    stack = [(metadata, 0)]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, dict):
            # JSON turns keys into strings: {1: x} would read back as {"1": x}, and {1: x,
            # "1": y} as {"1": y}. Refuse instead of returning different metadata.
            bad = next((k for k in obj if not isinstance(k, str)), None)
            if bad is not None:
                raise TypeError(
                    f"metadata keys must be strings (JSON would turn {bad!r} into a string), "
                    f"got {bad!r} of type {type(bad).__name__}"
                )
            children: Any = obj.values()
        elif isinstance(obj, (list, tuple)):
            children = obj
        else:
            continue
        if depth >= MAX_METADATA_DEPTH:
            raise TypeError(
                f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels (a cycle?): the "
                "checkpoint could not be read back; flatten it"
            )
        stack.extend((child, depth + 1) for child in children)


def _loader(reader: _file.Reader, verify: bool) -> _tree.LoadFn:
    def load(node: dict[str, Any], where: str, device: torch.device | None) -> torch.Tensor:
        dtype = _file.dtype_from_name(node.get("dtype"), where)
        shape = node.get("shape")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise _file.InvalidCheckpointError(f"{where}: malformed shape {shape!r}")
        digest = node.get("sha256") if verify else None
        t = reader.read(str(node.get("name")), dtype, tuple(shape), digest)
        return t if device is None or device.type == "cpu" else t.to(device)

    return load


def restore(
    path: PathLike,
    target: Any = None,
    *,
    device: str | torch.device | None = None,
    strict: bool = True,
    verify: bool = True,
) -> Any:
    """Loads a checkpoint written by :func:`save`; never unpickles or imports anything.

    With ``target`` (typically a freshly initialised state), the result has the target's node
    types (NamedTuples, ``TrainState``, ...) and custom-node metadata, and each tensor is placed
    on the target leaf's device, except that a target leaf on the ``meta`` device (a state built
    under ``torch.device("meta")``) gives only the expected shape and dtype: its restored values
    are placed on the CPU, or on ``device`` when given. Restore never returns meta tensors,
    which hold no values. Structure, shapes and dtypes are validated first-difference
    first, e.g. ``checkpoint['opt_state'][0]['mu']['fc.weight'] has shape (3, 4) but target has
    (4, 4)``.

    Without ``target`` the tree is rebuilt from the file with builtin containers only:
    NamedTuples and custom nodes (e.g. ``TrainState``) come back as dicts of their fields (as
    lists when their keys are not strings), defaultdicts as dicts, and tensors on the CPU.
    A plain safetensors file without functrain metadata comes back as ``{name: tensor}``.

    Args:
        path: the checkpoint file.
        target: a pytree with the expected structure; its leaf values are not used.
        device: put every tensor there instead (e.g. ``"cpu"`` to load a GPU run on a laptop).
            ``"meta"`` is refused: it would drop every value.
        strict: if True (default), every container must have the target's kind, keys and
            class name (``__qualname__``; the module is not compared, so a class saved from a
            script's ``__main__`` loads into the same class imported from a package), and
            scalar leaves the target's Python type. If False, target entries missing from the
            checkpoint keep the target's value (an error when that value holds meta tensors),
            checkpoint entries absent from the target are
            ignored (both are logged), and containers are matched by key whatever their
            class; shapes and dtypes are still checked.
        verify: check the SHA-256 of every tensor read (reading costs one hash pass).

    Returns:
        A new pytree; tensors read from the file are newly allocated and keep their saved
        dtypes (``target`` is not modified). With ``target``: the target's structure holding
        the checkpoint's values (with ``strict=False``, the target's own entries, not copies,
        where the checkpoint lacks them). Without: the builtin-container tree described
        above, or ``{name: tensor}`` for a plain safetensors file.

    Raises:
        FileNotFoundError: no file at ``path``.
        InvalidCheckpointError: a truncated, corrupted or foreign file, including pickles and
            ``torch.save`` archives (refused without being unpickled).
        CheckpointMismatchError: the checkpoint does not fit ``target``; names the path.
        ValueError: ``device`` is not a device, or is the ``meta`` device.

    Example:
        >>> import os, tempfile, torch
        >>> from functrain import checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
        >>> checkpoint.save(path, {"w": torch.arange(3.0), "count": torch.tensor(7)})
        >>> target = {"w": torch.zeros(3), "count": torch.tensor(0)}
        >>> checkpoint.restore(path, target)
        {'w': tensor([0., 1., 2.]), 'count': tensor(7)}
    """
    path = os.fspath(path)
    dev = _device(device)
    with _file.Reader(path) as reader:
        load = _loader(reader, verify)
        if reader.description is None:
            if target is not None:
                raise _file.InvalidCheckpointError(
                    f"{path} is a plain safetensors file without a functrain tree description; "
                    "restore it without target to get {name: tensor}"
                )
            return {
                name: _read_plain(reader, name, entry, dev)
                for name, entry in reader.entries.items()
            }
        node = reader.description["tree"]
        if target is None:
            return _tree.build(node, load, dev or torch.device("cpu"))
        return _tree.restore_into(node, target, load, dev, strict)


def _device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            "device must be None, a torch.device or a device string such as 'cpu' or "
            f"'cuda:0', got {device!r}"
        ) from None
    if dev.type == "meta":
        # Meta tensors carry no values: restoring onto them would silently drop the checkpoint.
        raise ValueError(
            "device='meta' would restore tensors without values; pass a real device (a meta "
            "target leaf already means 'shape and dtype only, values on the CPU')"
        )
    return dev


_CODE_TO_DTYPE = {code: dtype for dtype, code in _file._NATIVE_CODES.items()}


def _read_plain(
    reader: _file.Reader, name: str, entry: tuple, device: torch.device | None
) -> torch.Tensor:
    dtype = _CODE_TO_DTYPE.get(entry[2])
    if dtype is None:
        raise _file.InvalidCheckpointError(f"{reader.path}: unsupported dtype code {entry[2]!r}")
    t = reader.read(name, dtype, tuple(entry[3]), None)
    return t if device is None else t.to(device)


def read_metadata(path: PathLike) -> dict[str, Any]:
    """Returns the ``metadata`` passed to :func:`save`, reading only the file header.

    The header checksum and the file's size are verified; tensor data is not read.

    Args:
        path: the checkpoint file.

    Returns:
        The metadata dict as JSON decoded it (strings, numbers, bools, ``None``, lists and
        dicts; tuples come back as lists), or ``{}`` when the file was saved without metadata
        or is a plain safetensors file.

    Raises:
        FileNotFoundError: no file at ``path``.
        InvalidCheckpointError: a truncated, corrupted or foreign file.

    Example:
        >>> import os, tempfile, torch
        >>> from functrain import checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
        >>> checkpoint.save(path, [torch.ones(1)], metadata={"step": 10})
        >>> checkpoint.read_metadata(path)
        {'step': 10}
    """
    with _file.Reader(os.fspath(path)) as reader:
        if reader.description is None:
            return {}
        meta = reader.description.get("metadata")
        return meta if isinstance(meta, dict) else {}
