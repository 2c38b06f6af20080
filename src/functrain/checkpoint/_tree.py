"""Pytree <-> JSON description, and restoring a description against a target tree.

A description is a nested JSON object, one per node::

    {"kind": "tensor", "name": "['params']['w']", "dtype": "float32", "shape": [3], "sha256": ...}
    {"kind": "none"} | {"kind": "bool"|"int"|"str", "value": ...} | {"kind": "float", "value": "0.1"}
    {"kind": "dict"|"list"|"tuple"|"deque"|"namedtuple"|"custom",
     "type": "QualName", "module": "module", "keys": [...], "children": [...]}

Floats are stored as ``repr`` strings so NaN, infinities and -0.0 round-trip exactly. Container
keys are stored as scalar nodes (dict keys may be ints), field names for NamedTuples, and the
optree path entries of custom nodes. Custom-node metadata (e.g. static fields that are not
pytree children) is not stored: restoring with a target takes it from the target.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Callable
from typing import Any

import optree
import torch

from functrain.checkpoint._file import dtype_from_name, dtype_name
from functrain.checkpoint.errors import CheckpointMismatchError, InvalidCheckpointError

__all__ = ["build", "encode", "restore_into"]

logger = logging.getLogger("functrain.checkpoint")

# Each tree level is two levels of JSON nesting, and json.loads fails with RecursionError near
# Python's recursion limit (1000 by default, less the caller's frames): a deeper tree would save
# a file that cannot be loaded. Real train states are a few levels deep.
MAX_DEPTH = 128

_SCALARS = ("bool", "int", "float", "str")
_CONTAINERS = ("dict", "list", "tuple", "deque", "namedtuple", "custom")
_DICT_TYPES = {
    dict: "dict",
    collections.OrderedDict: "OrderedDict",
    collections.defaultdict: "defaultdict",
}


def path_str(root: str, path: list[Any]) -> str:
    """``checkpoint['opt_state'][0]['mu']``."""
    return root + "".join(f"[{k!r}]" for k in path)


def _type_name(cls: type) -> str:
    # Only the qualified name is compared on restore: the module of a class differs between a
    # script (``__main__``) and the same class imported elsewhere.
    return cls.__qualname__


def _scalar_node(value: Any) -> dict[str, Any] | None:
    """The node of a Python scalar leaf, or ``None`` when ``value`` is not one."""
    if value is None:
        return {"kind": "none"}
    if isinstance(value, bool):
        return {"kind": "bool", "value": bool(value)}
    if isinstance(value, int):
        return {"kind": "int", "value": int(value)}
    if isinstance(value, float):
        return {"kind": "float", "value": repr(float(value))}
    if isinstance(value, str):
        return {"kind": "str", "value": str(value)}
    return None


def _scalar_value(node: Any, where: str) -> Any:
    kind = node.get("kind")
    if kind == "none":
        return None
    value = node.get("value")
    expected = {"bool": bool, "int": int, "str": str, "float": str}[kind]
    if type(value) is not expected:
        raise InvalidCheckpointError(f"{where}: malformed {kind} value {value!r}")
    if kind == "float":
        try:
            return float(value)
        except ValueError:
            raise InvalidCheckpointError(f"{where}: malformed float {value!r}") from None
    return value


def _container(obj: Any) -> tuple[str, list[Any], list[Any], Any] | None:
    """``(kind, keys, children, optree_one_level)`` of a pytree node, ``None`` for a leaf."""
    try:
        level = optree.tree_flatten_one_level(obj, none_is_leaf=False)
    except ValueError:
        return None
    cls = type(obj)
    if cls in _DICT_TYPES:
        keys = list(level.entries)
        return "dict", keys, list(level.children), level
    if optree.is_namedtuple_instance(obj):
        return "namedtuple", list(cls._fields), list(level.children), level
    if optree.is_structseq_instance(obj):
        return "namedtuple", list(optree.structseq_fields(obj)), list(level.children), level
    if cls in (list, tuple, collections.deque):
        kind = {list: "list", tuple: "tuple", collections.deque: "deque"}[cls]
        return kind, list(range(len(level.children))), list(level.children), level
    return "custom", list(level.entries), list(level.children), level


def encode(tree: Any, tensors: list[tuple[str, torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
    """Describes ``tree``; appends ``(name, tensor, leaf_node)`` for each tensor leaf."""
    names: set[str] = set()

    def visit(obj: Any, path: list[Any]) -> dict[str, Any]:
        if isinstance(obj, torch.Tensor):
            where = path_str("state", path)
            # Nested tensors may report the strided layout but have no single shape.
            if obj.layout != torch.strided or obj.is_quantized or obj.is_meta or obj.is_nested:
                kind = "nested, " if obj.is_nested else ""
                raise TypeError(
                    f"cannot checkpoint {where}: only dense tensors with data are supported "
                    f"(got {kind}layout={obj.layout}, device={obj.device})"
                )
            name = path_str("", path) or "<root>"
            while name in names:  # only when a custom node repeats an entry
                name += "#"
            names.add(name)
            node = {
                "kind": "tensor",
                "name": name,
                "dtype": dtype_name(obj.dtype),
                "shape": list(obj.shape),
            }
            tensors.append((name, obj, node))
            return node
        scalar = _scalar_node(obj)
        if scalar is not None:
            return scalar
        if len(path) >= MAX_DEPTH:
            raise TypeError(
                f"cannot checkpoint {path_str('state', path)}: the tree is nested deeper than "
                f"{MAX_DEPTH} levels (a cycle?), which the file's description could not be "
                "read back from"
            )
        found = _container(obj)
        if found is None:
            raise TypeError(
                f"cannot checkpoint {path_str('state', path)} of type {type(obj).__name__}: "
                "leaves must be tensors, None, bool, int, float or str"
            )
        kind, keys, children, _ = found
        if kind == "dict":  # optree sorts keys; keep insertion order for restores without target
            keys = list(obj)
            children = [obj[k] for k in keys]
        node: dict[str, Any] = {
            "kind": kind,
            "type": _type_name(type(obj)),
            "module": type(obj).__module__,
        }
        key_nodes = [_scalar_node(k) for k in keys]
        if kind == "dict" and any(k is None or k["kind"] == "none" for k in key_nodes):
            bad = next(k for k, n in zip(keys, key_nodes) if n is None or n["kind"] == "none")
            raise TypeError(
                f"cannot checkpoint {path_str('state', path)}: dict key {bad!r} is not a "
                "bool, int, float or str"
            )
        if any(k is None for k in key_nodes):  # custom entries that are not JSON scalars
            keys = list(range(len(children)))
            key_nodes = [_scalar_node(k) for k in keys]
        node["keys"] = key_nodes
        if kind == "deque":
            node["maxlen"] = obj.maxlen
        node["children"] = [visit(c, [*path, k]) for c, k in zip(children, keys)]
        return node

    return visit(tree, [])


def _check_node(node: Any, where: str) -> str:
    if not isinstance(node, dict) or node.get("kind") not in (
        "tensor",
        "none",
        *_SCALARS,
        *_CONTAINERS,
    ):
        raise InvalidCheckpointError(f"{where}: malformed tree description node")
    kind = node["kind"]
    if kind in _CONTAINERS:
        keys, children = node.get("keys"), node.get("children")
        if (
            not isinstance(keys, list)
            or not isinstance(children, list)
            or len(keys) != len(children)
        ):
            raise InvalidCheckpointError(f"{where}: malformed {kind} node")
    return kind


def _keys(node: dict[str, Any], where: str) -> list[Any]:
    keys = []
    for k in node["keys"]:
        if not isinstance(k, dict) or k.get("kind") not in ("none", *_SCALARS):
            raise InvalidCheckpointError(f"{where}: malformed key {k!r}")
        keys.append(_scalar_value(k, where))
    return keys


def _describe(node: dict[str, Any]) -> str:
    kind = node["kind"]
    if kind == "tensor":
        return _article(f"{node.get('dtype')} tensor of shape {tuple(node.get('shape', ()))}")
    if kind == "none":
        return "None"
    if kind in ("namedtuple", "custom"):
        return _article(str(node.get("type", kind)))
    return _article(kind)


def _article(name: str) -> str:
    return f"{'an' if name[:1].lower() in tuple('aeiou') else 'a'} {name}"


def _describe_target(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return _article(f"{dtype_name(obj.dtype)} tensor of shape {tuple(obj.shape)}")
    if obj is None:
        return "None"
    return _article(type(obj).__name__)


LoadFn = Callable[[dict[str, Any], str, torch.device | None], torch.Tensor]


def build(node: Any, load: LoadFn, device: torch.device | None) -> Any:
    """Rebuilds a tree from its description alone, with builtin containers.

    NamedTuples become dicts of their fields; custom nodes become dicts keyed by their path
    entries (lists when the entries are not all strings); defaultdicts become dicts.
    """

    def visit(node: Any, path: list[Any]) -> Any:
        where = path_str("checkpoint", path)
        kind = _check_node(node, where)
        if kind == "tensor":
            return load(node, where, device)
        if kind == "none" or kind in _SCALARS:
            return _scalar_value(node, where)
        keys = _keys(node, where)
        children = [visit(c, [*path, k]) for c, k in zip(node["children"], keys)]
        if kind == "list":
            return children
        if kind == "tuple":
            return tuple(children)
        if kind == "deque":
            maxlen = node.get("maxlen")
            # A deque drops entries beyond maxlen silently, and a negative one is a ValueError.
            if maxlen is not None and (type(maxlen) is not int or not 0 <= len(children) <= maxlen):
                raise InvalidCheckpointError(f"{where}: malformed deque maxlen {maxlen!r}")
            return collections.deque(children, maxlen=maxlen)
        if kind == "custom" and not all(isinstance(k, str) for k in keys):
            return children
        if node.get("type") == "OrderedDict" and node.get("module") == "collections":
            return collections.OrderedDict(zip(keys, children))
        return dict(zip(keys, children))

    return visit(node, [])


def _leaf_device(obj: torch.Tensor, device: torch.device | None) -> torch.device:
    """Where a restored leaf goes: ``device`` if given, else the target leaf's device.

    A target leaf on the ``meta`` device (e.g. from ``torch.device("meta")`` model
    construction) only describes a shape and dtype: its values come back on the CPU, because a
    meta tensor would hold none of the restored values.
    """
    dev = device if device is not None else obj.device
    return torch.device("cpu") if dev.type == "meta" else dev


def _has_meta_tensor(tree: Any) -> bool:
    return any(
        isinstance(leaf, torch.Tensor) and leaf.is_meta
        for leaf in optree.tree_leaves(tree, none_is_leaf=False)
    )


def _canonical(key: Any) -> str:
    return json.dumps(_scalar_node(key))


def restore_into(
    node: Any, target: Any, load: LoadFn, device: torch.device | None, strict: bool
) -> Any:
    """Rebuilds ``target``'s structure with the checkpoint's leaves, validating as it goes.

    Raises:
        CheckpointMismatchError: naming the first path whose structure, shape or dtype differs.
    """
    missing: list[str] = []
    unexpected: list[str] = []

    def mismatch(path: list[Any], what: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(f"{path_str('checkpoint', path)} {what}")

    def visit(node: Any, obj: Any, path: list[Any]) -> Any:
        where = path_str("checkpoint", path)
        kind = _check_node(node, where)
        if isinstance(obj, torch.Tensor):
            if kind != "tensor":
                raise mismatch(path, f"is {_describe(node)} but target has {_describe_target(obj)}")
            dtype = dtype_from_name(node.get("dtype"), where)
            shape = node.get("shape")
            if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
                raise InvalidCheckpointError(f"{where}: malformed shape {shape!r}")
            shape = tuple(shape)
            if shape != tuple(obj.shape):
                raise mismatch(path, f"has shape {shape} but target has {tuple(obj.shape)}")
            if dtype != obj.dtype:
                raise mismatch(
                    path,
                    f"has dtype {dtype_name(dtype)} but target has {dtype_name(obj.dtype)}",
                )
            t = load(node, where, _leaf_device(obj, device))
            if isinstance(obj, torch.nn.Parameter):
                return torch.nn.Parameter(t, requires_grad=obj.requires_grad)
            return t.requires_grad_(obj.requires_grad) if obj.requires_grad else t
        scalar = _scalar_node(obj)
        if scalar is not None:
            if kind != scalar["kind"]:
                raise mismatch(path, f"is {_describe(node)} but target has {_describe_target(obj)}")
            return _scalar_value(node, where)
        found = _container(obj)
        if found is None:
            raise TypeError(
                f"target{path_str('', path)} of type {type(obj).__name__} cannot be restored: "
                "leaves must be tensors, None, bool, int, float or str"
            )
        t_kind, t_keys, t_children, level = found
        if kind not in _CONTAINERS:
            raise mismatch(path, f"is {_describe(node)} but target has {_describe_target(obj)}")
        if strict and (
            kind != t_kind
            or (kind in ("namedtuple", "custom") and node.get("type") != _type_name(type(obj)))
        ):
            raise mismatch(path, f"is {_describe(node)} but target has {_describe_target(obj)}")
        keys = _keys(node, where)
        by_key = {_canonical(k): (k, c) for k, c in zip(keys, node["children"])}
        if t_kind == "custom" and any(_scalar_node(k) is None for k in t_keys):
            t_keys = list(range(len(t_children)))
        children = []
        for k, child in zip(t_keys, t_children):
            hit = by_key.pop(_canonical(k), None)
            if hit is None:
                if strict:
                    raise CheckpointMismatchError(
                        f"{path_str('target', [*path, k])} has no counterpart in the checkpoint"
                    )
                if _has_meta_tensor(child):
                    # Keeping the target's value would return a meta tensor with no values.
                    raise CheckpointMismatchError(
                        f"{path_str('target', [*path, k])} has no counterpart in the checkpoint "
                        "and holds meta tensors, which have no values to keep (non-strict "
                        "restore keeps missing entries' target values)"
                    )
                missing.append(path_str("target", [*path, k]))
                children.append(child)
            else:
                children.append(visit(hit[1], child, [*path, k]))
        for k, _ in by_key.values():
            if strict:
                raise mismatch([*path, k], "has no counterpart in target")
            unexpected.append(path_str("checkpoint", [*path, k]))
        return level.unflatten_func(level.metadata, children)

    out = visit(node, target, [])
    if missing or unexpected:
        logger.warning(
            "non-strict restore: %d target entries kept their values (%s); %d checkpoint "
            "entries ignored (%s)",
            len(missing),
            ", ".join(missing[:5]),
            len(unexpected),
            ", ".join(unexpected[:5]),
        )
    return out
