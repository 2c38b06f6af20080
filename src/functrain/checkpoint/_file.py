"""The on-disk format: a safetensors file written atomically, read without executing code.

Layout (the safetensors format, readable by ``safetensors.safe_open``)::

    u64 little-endian N | N bytes of JSON header, space-padded | raw little-endian tensor bytes

The header maps tensor names to ``{"dtype", "shape", "data_offsets"}``; its ``__metadata__``
holds the functrain description of the tree (a JSON string) and that string's SHA-256. Each
tensor's SHA-256 lives in the description, so every byte that matters is checksummed.

The writer streams one tensor at a time (peak host memory: the largest tensor) into a temporary
file next to the destination, fsyncs it, renames it over the destination and fsyncs the
directory. The header is written first with placeholder digests of the same length and rewritten
once the data is on disk, so the header size never changes.

Reading parses JSON and copies bytes; nothing is unpickled or imported, so a hostile file cannot
run code. Pickles and ``torch.save`` archives are recognised and refused with a clear message.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import struct
import sys
from collections.abc import Callable
from typing import IO, Any

import torch

from functrain.checkpoint.errors import InvalidCheckpointError

__all__ = [
    "FORMAT_VERSION",
    "Reader",
    "dtype_from_name",
    "dtype_name",
    "fsync_directory",
    "host_bytes",
    "storage_layout",
    "write_atomic",
]

FORMAT_NAME = "functrain.checkpoint"
FORMAT_VERSION = 1
PLACEHOLDER_DIGEST = "0" * 64
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
TEMP_SUFFIX = ".tmp"

# Dtypes with a native safetensors code are stored under it so other tools read them as is;
# every other dtype (complex, exotic float8s, ...) is stored as raw bytes ("U8", 1-d).
_NATIVE_CODES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
for _name, _code in [
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
]:
    if hasattr(torch, _name):
        _NATIVE_CODES[getattr(torch, _name)] = _code

_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any, where: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; unknown names are a corrupt or foreign file."""
    dtype = _DTYPES_BY_NAME.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise InvalidCheckpointError(f"{where}: unknown tensor dtype {name!r}")
    return dtype


def storage_layout(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[str, list[int], int]:
    """The safetensors ``(code, shape, nbytes)`` under which a tensor is stored."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * dtype.itemsize
    code = _NATIVE_CODES.get(dtype)
    if code is None:
        return "U8", [nbytes], nbytes
    return code, list(shape), nbytes


def _byte_view(t: torch.Tensor) -> Any:
    """A zero-copy writable buffer over a contiguous CPU tensor's bytes (no numpy needed)."""
    return (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())


def host_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy (or view) of ``t``'s values, reinterpreted as flat uint8."""
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def fsync_directory(directory: str) -> None:
    """Makes a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """A unique hidden temporary name next to ``path``; readers never look at these names."""
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _header_bytes(entries: dict[str, Any], functrain_json: str) -> bytes:
    header = {
        "__metadata__": {
            "format": FORMAT_NAME,
            "functrain": functrain_json,
            "functrain_sha256": hashlib.sha256(functrain_json.encode()).hexdigest(),
        },
        **entries,
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def write_atomic(
    path: str,
    tensors: list[tuple[str, torch.Tensor, dict[str, Any]]],
    describe: Callable[[], str],
) -> None:
    """Writes ``tensors`` and the description to ``path`` atomically.

    Args:
        path: destination file; replaced atomically if it exists.
        tensors: ``(name, tensor, leaf_node)``; ``leaf_node["sha256"]`` is filled in here.
        describe: returns the functrain JSON description (called twice: with placeholder
            digests, then with the real ones).
    """
    if sys.byteorder != "little":
        raise NotImplementedError("functrain checkpoints are little-endian; big-endian hosts")
    entries: dict[str, Any] = {}
    offset = 0
    for name, t, _ in tensors:
        code, shape, nbytes = storage_layout(t.dtype, tuple(t.shape))
        entries[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    for _, _, node in tensors:
        node["sha256"] = PLACEHOLDER_DIGEST
    placeholder = _header_bytes(entries, describe())
    if len(placeholder) - 8 > MAX_HEADER_BYTES:
        # The reader (and safetensors itself) refuse such a header: fail before writing a file
        # that could never be loaded.
        raise ValueError(
            f"the checkpoint header (tree description and metadata) would take "
            f"{len(placeholder) - 8} bytes, over the {MAX_HEADER_BYTES}-byte limit of "
            "safetensors readers; store large data as tensors in the state, not in metadata"
        )

    directory = os.path.dirname(os.path.abspath(path))
    tmp = temp_name(os.path.join(directory, os.path.basename(path)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(placeholder)
            for _, t, node in tensors:
                data = host_bytes(t)
                digest = hashlib.sha256()
                if data.numel():
                    buf = _byte_view(data)
                    digest.update(buf)
                    f.write(buf)
                node["sha256"] = digest.hexdigest()
            final = _header_bytes(entries, describe())
            if len(final) != len(placeholder):  # pragma: no cover - digests are fixed-length
                raise RuntimeError("checkpoint header changed size while writing")
            f.seek(0)
            f.write(final)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def _refuse_foreign(path: str, head: bytes, reason: str) -> InvalidCheckpointError:
    if head.startswith(b"PK\x03\x04"):
        kind = "a zip archive, as written by torch.save"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        kind = "a Python pickle"
    else:
        return InvalidCheckpointError(
            f"{path} is not a complete functrain checkpoint (safetensors format): {reason}"
        )
    return InvalidCheckpointError(
        f"{path} is {kind}, not a functrain checkpoint. functrain never unpickles files, because "
        "unpickling can run arbitrary code; nothing in the file was executed. Convert trusted "
        "files with torch.load(..., weights_only=True) and functrain.checkpoint.save."
    )


class Reader:
    """Reads a checkpoint's header on open and tensors on demand; use as a context manager."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self._f: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self._parse_header()
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def _parse_header(self) -> None:
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise _refuse_foreign(self.path, head, f"file has only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise _refuse_foreign(
                self.path, head, f"header length {n} does not fit in a {size}-byte file"
            )
        if n > MAX_HEADER_BYTES:
            raise _refuse_foreign(
                self.path, head, f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit"
            )
        raw = self._f.read(n)
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError):
            raise _refuse_foreign(self.path, head, "header is not valid JSON") from None
        if not isinstance(header, dict):
            raise _refuse_foreign(self.path, head, "header is not a JSON object")
        meta = header.pop("__metadata__", {})
        self.data_start = 8 + n
        self.entries = self._check_entries(header, size - self.data_start)
        self.description: dict[str, Any] | None = None
        if not isinstance(meta, dict):
            raise InvalidCheckpointError(f"{self.path}: __metadata__ is not a JSON object")
        if "functrain" not in meta and meta.get("format") != FORMAT_NAME:
            # A plain safetensors file: tensors only. Other writers stamp their own "format"
            # (safetensors' save_model and Hugging Face write "pt"), which is not an error.
            return
        if meta.get("format") != FORMAT_NAME:
            raise InvalidCheckpointError(f"{self.path}: unknown format {meta.get('format')!r}")
        text = meta.get("functrain")
        digest = meta.get("functrain_sha256")
        if not isinstance(text, str) or hashlib.sha256(text.encode()).hexdigest() != digest:
            raise InvalidCheckpointError(f"{self.path}: header checksum mismatch (file corrupt)")
        try:
            description = json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidCheckpointError(f"{self.path}: tree description is not JSON") from None
        if not isinstance(description, dict) or "tree" not in description:
            raise InvalidCheckpointError(f"{self.path}: tree description has no 'tree'")
        version = description.get("version")
        # Version 1 is the first format; 0, negatives, bools and floats were never written.
        if type(version) is not int or version < 1:
            raise InvalidCheckpointError(
                f"{self.path}: malformed format version {version!r} (versions start at 1; "
                "the file is corrupt or was not written by functrain)"
            )
        if version > FORMAT_VERSION:
            raise InvalidCheckpointError(
                f"{self.path}: format version {version!r} is newer than this functrain "
                f"understands ({FORMAT_VERSION}); upgrade functrain"
            )
        self.description = description

    def _check_entries(self, header: dict[str, Any], data_len: int) -> dict[str, tuple]:
        """Validates that tensor byte ranges tile the data section exactly (no truncation)."""
        spans = []
        for name, entry in header.items():
            try:
                begin, end = entry["data_offsets"]
                code, shape = entry["dtype"], tuple(entry["shape"])
                ok = (
                    type(begin) is int
                    and type(end) is int
                    and 0 <= begin <= end
                    and isinstance(code, str)
                    and all(type(s) is int and s >= 0 for s in shape)
                )
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise InvalidCheckpointError(f"{self.path}: malformed entry for tensor {name!r}")
            spans.append((begin, end, name, code, shape))
        spans.sort()
        cursor = 0
        for begin, end, name, _, _ in spans:
            if begin != cursor:
                raise InvalidCheckpointError(
                    f"{self.path}: tensor {name!r} does not start where the previous one ends"
                )
            cursor = end
        if cursor != data_len:
            raise InvalidCheckpointError(
                f"{self.path}: data section has {data_len} bytes but the header describes "
                f"{cursor} (truncated or corrupt file)"
            )
        return {name: (begin, end, code, shape) for begin, end, name, code, shape in spans}

    def read(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], sha256: Any) -> Any:
        """Reads tensor ``name`` as a fresh CPU tensor, checking layout and checksum."""
        entry = self.entries.get(name)
        code, stored_shape, nbytes = storage_layout(dtype, shape)
        if entry is None or entry[2] != code or list(entry[3]) != stored_shape:
            raise InvalidCheckpointError(
                f"{self.path}: tensor {name!r} is missing or does not match its description"
            )
        begin, end = entry[0], entry[1]
        if end - begin != nbytes:
            raise InvalidCheckpointError(f"{self.path}: tensor {name!r} has the wrong byte size")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._f.seek(self.data_start + begin)
            view = _byte_view(buf)
            if self._f.readinto(view) != nbytes:  # type: ignore[attr-defined]
                raise InvalidCheckpointError(f"{self.path}: tensor {name!r} is truncated")
            if sha256 is not None and hashlib.sha256(view).hexdigest() != sha256:
                raise InvalidCheckpointError(
                    f"{self.path}: checksum mismatch in tensor {name!r} (file corrupt)"
                )
        return buf.view(dtype).reshape(shape)
