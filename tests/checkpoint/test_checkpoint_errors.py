"""Every way a checkpoint file or a restore call can be wrong has a message that names it."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch

from functrain import checkpoint


def _split(path: str) -> tuple[dict[str, Any], bytes]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        return header, f.read()


def _write(path: str, header: Any, data: bytes, *, raw: bytes | None = None) -> None:
    body = raw if raw is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + data)


def _write_bytes(path: str, raw: bytes) -> None:
    with open(path, "wb") as f:
        f.write(raw)


def _edit_description(edit: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
    """Edits the functrain description and re-signs it, as a careless tool would."""

    def apply(header: dict[str, Any], data: bytes, path: str) -> None:
        meta = header["__metadata__"]
        description = json.loads(meta["functrain"])
        edit(description)
        meta["functrain"] = json.dumps(description)
        meta["functrain_sha256"] = hashlib.sha256(meta["functrain"].encode()).hexdigest()
        _write(path, header, data)

    return apply


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(description: dict[str, Any]) -> None:
        description[key] = value

    return edit


def _tensor_node(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(description: dict[str, Any]) -> None:
        description["tree"]["children"][0].update(changes)

    return edit


def _meta(**changes: Any) -> Callable[..., None]:
    def apply(header: dict[str, Any], data: bytes, path: str) -> None:
        header["__metadata__"].update(changes)
        _write(path, header, data)

    return apply


def _entry(**changes: Any) -> Callable[..., None]:
    def apply(header: dict[str, Any], data: bytes, path: str) -> None:
        header["['w']"].update(changes)
        _write(path, header, data)

    return apply


def _tamper(header: dict[str, Any], data: bytes, path: str) -> None:
    meta = header["__metadata__"]
    meta["functrain"] = meta["functrain"].replace('"float32"', '"float64"')
    _write(path, header, data)


CASES = {
    "three bytes": (
        lambda h, d, p: _write_bytes(p, b"abc"),
        "is not a complete functrain checkpoint (safetensors format): file has only 3 bytes",
    ),
    "header too long": (
        lambda h, d, p: _write_bytes(p, struct.pack("<Q", 10**6) + b"{}"),
        "header length 1000000 does not fit in a 10-byte file",
    ),
    "header not json": (
        lambda h, d, p: _write(p, None, d, raw=b"{not json"),
        "header is not valid JSON",
    ),
    "header a list": (lambda h, d, p: _write(p, [1, 2], d), "header is not a JSON object"),
    "metadata a list": (_meta(), None),  # placeholder, replaced below
    "other format": (_meta(format="somebody.else"), "unknown format 'somebody.else'"),
    "tampered description": (_tamper, "header checksum mismatch (file corrupt)"),
    "newer version": (
        _edit_description(_set("version", 99)),
        "format version 99 is newer than this functrain understands (1); upgrade functrain",
    ),
    "no tree": (_edit_description(lambda d: d.pop("tree")), "tree description has no 'tree'"),
    "bad node": (
        _edit_description(_set("tree", {"kind": "lambda"})),
        "checkpoint: malformed tree description node",
    ),
    "bad dtype": (
        _edit_description(_tensor_node(dtype="float128")),
        "checkpoint['w']: unknown tensor dtype 'float128'",
    ),
    "bad shape": (
        _edit_description(_tensor_node(shape=[-1])),
        "checkpoint['w']: malformed shape [-1]",
    ),
    "shape disagrees with data": (
        _edit_description(_tensor_node(shape=[2, 2])),
        "tensor \"['w']\" is missing or does not match its description",
    ),
    "malformed entry": (_entry(data_offsets="all"), "malformed entry for tensor \"['w']\""),
    "gap before tensor": (
        _entry(data_offsets=[4, 16]),
        "tensor \"['w']\" does not start where the previous one ends",
    ),
    "extra bytes": (
        lambda h, d, p: _write(p, h, d + b"\0" * 8),
        "data section has 20 bytes but the header describes 12 (truncated or corrupt file)",
    ),
    "flipped data byte": (
        lambda h, d, p: _write(p, h, bytes([d[0] ^ 1]) + d[1:]),
        "checksum mismatch in tensor \"['w']\" (file corrupt)",
    ),
}
CASES["metadata a list"] = (
    lambda h, d, p: _write(p, {**h, "__metadata__": [1]}, d),
    "__metadata__ is not a JSON object",
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_damaged_or_foreign_file_is_named(tmp_path: Any, case: str) -> None:
    path = str(tmp_path / "state.safetensors")
    checkpoint.save(path, {"w": torch.arange(3.0)})
    header, data = _split(path)
    damage, message = CASES[case]
    damage(header, data, path)
    targets = [None, {"w": torch.zeros(3)}]
    if case == "shape disagrees with data":  # a target of the described shape gets that far
        targets[1] = {"w": torch.zeros(2, 2)}
    for target in targets:
        with pytest.raises(checkpoint.InvalidCheckpointError) as err:
            checkpoint.restore(path, target=target)
        assert message in str(err.value)
        assert path in str(err.value) or str(err.value).startswith("checkpoint")


def test_a_target_leaf_of_an_unsupported_type_is_named(tmp_path: Any) -> None:
    path = str(tmp_path / "state.safetensors")
    checkpoint.save(path, {"opt": [torch.ones(1), 2]})
    with pytest.raises(TypeError, match=r"target\['opt'\]\[1\] of type object cannot be restored"):
        checkpoint.restore(path, target={"opt": [torch.zeros(1), object()]})


def test_a_bad_device_argument_is_named(tmp_path: Any) -> None:
    path = str(tmp_path / "state.safetensors")
    checkpoint.save(path, {"w": torch.ones(1)})
    with pytest.raises(ValueError, match=r"device must be .* got 'gpu'"):
        checkpoint.restore(path, device="gpu")
    with pytest.raises(ValueError, match=r"device must be .* got 3\.5"):
        checkpoint.restore(path, device=3.5)


def test_a_directory_in_place_of_the_file_is_named(tmp_path: Any) -> None:
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        checkpoint.restore(tmp_path)
    assert os.listdir(tmp_path) == []
