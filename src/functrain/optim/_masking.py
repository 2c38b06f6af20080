"""Masks for ``masked`` and ``partition``: static boolean (or label) trees applied to pytrees.

A mask is a pytree of booleans that is a prefix of the tree it masks. Applying it replaces each
masked-out subtree with ``None``. Under ``torch.func.vmap`` the states of ``masked`` and
``partition`` carry :class:`MaskedNode` there instead (see :func:`vmappable`). Masks are walked
with plain Python over dicts, lists and tuples (optree only for other registered nodes and for
eager error messages), because ``torch.compile`` cannot flatten trees of Python constants with
optree; this keeps the wrappers traceable with ``fullgraph=True``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import optree
import torch

from functrain import tree
from functrain.optim.base import GradientTransformation, _call_update

__all__ = [
    "Mask",
    "MaskedNode",
    "apply_mask",
    "label_masks",
    "make_mask",
    "masked_update",
    "vmappable",
]


def _is_numpy_bool(value: Any) -> bool:
    # NumPy 2 renamed the scalar type ``numpy.bool_`` to ``numpy.bool``; match both without
    # importing NumPy.
    kind = type(value)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool")


def _as_bool(path: tuple[Any, ...], value: Any, name: str) -> bool:
    if isinstance(value, bool) or _is_numpy_bool(value):
        return bool(value)
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() == 0:
        if value.device.type != "cpu":
            raise TypeError(
                f"{tree.path_str(path, name)} is a {value.device} tensor; a mask must be static "
                "(Python booleans) so that applying it never reads device memory"
            )
        return bool(value)
    raise TypeError(
        f"{tree.path_str(path, name)} must be a bool (True: "
        f"{'freeze' if name == 'freeze_mask' else 'transform'} this subtree), got "
        f"{type(value).__name__}"
        + (f" of dtype {value.dtype}" if isinstance(value, torch.Tensor) else "")
    )


class Mask(NamedTuple):
    """A validated mask: a flag per mask path, and the mask tree for eager error messages."""

    flags: dict[tuple[Any, ...], Any]  # mask path -> flag (a prefix of the masked tree's paths)
    tree: Any  # the mask (or label) tree itself, for eager structure checks
    label: str = "mask"  # what to call it in error messages


class MaskedNode(NamedTuple):
    """A masked-out subtree of a state made under ``torch.func.vmap`` (optax's ``MaskedNode``).

    Eager states of :func:`~functrain.masked` and :func:`~functrain.partition` keep ``None``
    there (the structure checkpoints hold). ``torch.utils._pytree``, which ``vmap`` flattens
    with, takes ``None`` for a leaf and refuses it as an input or output; an empty NamedTuple is
    a node with no children to it as to optree. ``update`` takes either form.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.masked(ft.adam(1e-2), {"w": True, "b": False})
        >>> members = {"w": torch.ones(4, 2), "b": torch.zeros(4)}  # an ensemble of 4
        >>> torch.func.vmap(tx.init)(members).inner_state[0].mu["b"]
        MaskedNode()
        >>> print(tx.init({"w": torch.ones(2), "b": torch.zeros(())}).inner_state[0].mu["b"])
        None
    """


def _vmap_active() -> bool:
    """Whether a ``torch.func.vmap`` is running (states must then hold no ``None``)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    if torch.compiler.is_compiling():
        return True  # the interpreter stack is not traceable; a grad alone is rare here
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(i.key() == torch._C._functorch.TransformType.Vmap for i in stack)


def _swap(node: Any, to_nodes: bool) -> tuple[Any, bool]:
    """``(node, changed)``: its ``None`` subtrees made ``MaskedNode()`` (``to_nodes``), or its
    ``MaskedNode`` ones made ``None``; ``changed`` says whether there were any.

    Descends the containers ``torch.utils._pytree`` knows (dicts, lists, tuples, NamedTuples),
    as ``vmap`` does; plain Python so that ``torch.compile`` traces it. Unchanged containers are
    returned as they are, so an eager state goes through untouched. The flag, not ``is``, says
    what changed: Dynamo cannot trace ``is`` between tuples.
    """
    if to_nodes and node is None:
        return MaskedNode(), True
    if isinstance(node, MaskedNode):
        return (None, True) if not to_nodes else (node, False)
    # Leaves that cannot change are skipped inline, without a call: this runs on every eager
    # update of a masked state, over every state leaf (a masked Adam's None moments included).
    skip = torch.Tensor if to_nodes else (torch.Tensor, type(None))
    if isinstance(node, dict):
        changed = {}
        for k, v in node.items():
            if not isinstance(v, skip):
                swapped, hit = _swap(v, to_nodes)
                if hit:
                    changed[k] = swapped
        if not changed:
            return node, False
        items = {k: changed.get(k, v) for k, v in node.items()}
        if isinstance(node, collections.defaultdict):
            return type(node)(node.default_factory, items), True
        return (items if type(node) is dict else type(node)(items)), True
    if isinstance(node, (list, tuple)):
        pairs = [(v, False) if isinstance(v, skip) else _swap(v, to_nodes) for v in node]
        if not any(hit for _, hit in pairs):
            return node, False
        children = [v for v, _ in pairs]
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*children), True
        return type(node)(children), True
    return node, False


def vmappable(state: Any) -> Any:
    """``state`` with ``None`` subtrees as :class:`MaskedNode` under ``vmap``, else as it is."""
    if not _vmap_active():
        return state
    return _swap(state, True)[0]


def _walk(node: Any, path: tuple[Any, ...], out: dict[tuple[Any, ...], Any]) -> None:
    # Plain Python rather than optree: torch.compile cannot flatten trees of Python constants.
    if node is None:
        return
    if isinstance(node, dict):
        for key, child in node.items():
            _walk(child, (*path, key), out)
    elif isinstance(node, (list, tuple)):
        for i, child in enumerate(node):
            _walk(child, (*path, i), out)
    elif isinstance(node, (str, bool, int, float, torch.Tensor)) or optree.tree_is_leaf(node):
        out[path] = node
    else:  # another registered pytree node
        children, _, entries, _ = optree.tree_flatten_one_level(node)
        for key, child in zip(entries, children):
            _walk(child, (*path, key), out)


def _tree_paths(tree_: Any) -> dict[tuple[Any, ...], Any]:
    out: dict[tuple[Any, ...], Any] = {}
    _walk(tree_, (), out)
    return out


def make_mask(mask_tree: Any, name: str = "mask") -> Mask:
    """Validates a tree of booleans (TypeError naming the path otherwise) into a :class:`Mask`."""
    flags = {p: _as_bool(p, v, name) for p, v in _tree_paths(mask_tree).items()}
    return Mask(flags, mask_tree, name)


def _prefix_mismatch(
    mask_tree: Any, other: Any, name: str, label: str, path: tuple[Any, ...] = ()
) -> str | None:
    """Describes the first place where ``mask_tree`` is not a prefix of ``other``."""
    if optree.tree_is_leaf(mask_tree):
        return None
    where = tree.path_str(path, label)
    if optree.tree_is_leaf(other) or type(other) is not type(mask_tree):
        return (
            f"{where} is a {type(mask_tree).__name__} but {tree.path_str(path, name)} is a "
            f"{type(other).__name__}"
        )
    m_children, _, m_entries, _ = optree.tree_flatten_one_level(mask_tree)
    o_children, _, o_entries, _ = optree.tree_flatten_one_level(other)
    for e in m_entries:
        if e not in o_entries:
            return f"{tree.path_str((*path, e), label)} has no counterpart in {name}"
    for e in o_entries:
        if e not in m_entries:
            return f"{tree.path_str((*path, e), name)} is not covered by {label}"
    lookup = dict(zip(o_entries, o_children))
    for e, child in zip(m_entries, m_children):
        found = _prefix_mismatch(child, lookup[e], name, label, (*path, e))
        if found:
            return found
    return None


def _check_prefix(mask: Mask, tree_: Any, name: str) -> None:
    """Raises a path-named TreeMismatchError if the mask is not a prefix of ``tree_``."""
    if torch.compiler.is_compiling():
        return  # structures are static: checked by the eager calls (init, first update)
    mask_spec = optree.tree_structure(mask.tree)
    try:
        tree.flatten_up_to(mask_spec, tree_, (mask.label, name), mask.tree)
    except tree.TreeMismatchError as err:
        try:
            message = _prefix_mismatch(mask.tree, tree_, name, mask.label)
        except (AttributeError, TypeError, ValueError):  # optree without flatten_one_level
            message = None
        if message is None:
            raise
        raise tree.TreeMismatchError(f"{mask.label} is not a prefix of {name}: {message}") from err


def _map_mask(
    flags: dict[tuple[Any, ...], Any],
    fn: Callable[..., Any],
    name: str,
    path: tuple[Any, ...],
    first: Any,
    *rest: Any,
) -> Any:
    """Rebuilds ``first`` with ``fn(flag, subtree, *rest_subtrees)`` at each mask path.

    Walks containers in plain Python (torch.compile traces this, unlike optree on trees of
    constants), so a masked-out subtree becomes a single ``None``, as optax's ``MaskedNode``.
    """
    if path in flags:
        return fn(flags[path], first, *rest)
    if first is None:
        return None
    kind = type(first)
    if (kind is list or kind is dict) and len(flags) == len(first):
        # The common case, a flat list or dict of leaves with a flag each: no walk.
        keys = list(first) if kind is dict else range(len(first))
        found = [flags.get((*path, k)) for k in keys]  # flags are bools: None means absent
        if None not in found:
            values = [first[k] for k in keys] if kind is dict else first
            if len(rest) == 1:  # merging the inner updates back: the other common call
                other = [rest[0][k] for k in keys]
                out = [fn(f, v, o) for f, v, o in zip(found, values, other)]
            elif rest:
                others = [[r[k] for k in keys] for r in rest]
                out = [fn(f, v, *o) for f, v, *o in zip(found, values, *others)]
            else:
                out = [fn(f, v) for f, v in zip(found, values)]
            return dict(zip(keys, out)) if kind is dict else out

    def child(key: Any, value: Any) -> Any:
        # The leaf cases inline: this runs for every leaf of every masked update.
        sub = (*path, key)
        if sub in flags:
            return fn(flags[sub], value, *(r[key] for r in rest))
        if value is None:
            return None
        return _map_mask(flags, fn, name, sub, value, *(r[key] for r in rest))

    if isinstance(first, dict):
        items = {k: child(k, v) for k, v in first.items()}
        if type(first) is dict:
            return items
        if isinstance(first, collections.defaultdict):
            return type(first)(first.default_factory, items)
        return type(first)(items)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(child(i, v) for i, v in enumerate(first)))
    if isinstance(first, (list, tuple)):
        return type(first)(child(i, v) for i, v in enumerate(first))
    if isinstance(first, torch.Tensor) or optree.tree_is_leaf(first):
        raise tree.TreeMismatchError(f"{tree.path_str(path, name)} is not covered by the mask")
    children, metadata, entries, unflatten = optree.tree_flatten_one_level(first)
    others = [optree.tree_flatten_one_level(r).children for r in rest]
    new_children = [
        _map_mask(flags, fn, name, (*path, e), c, *(o[i] for o in others))
        for i, (e, c) in enumerate(zip(entries, children))
    ]
    return unflatten(metadata, new_children)


def _keep_or_none(flag: bool, subtree: Any) -> Any:
    return subtree if flag else None


def apply_mask(mask: Mask, tree_: Any, name: str) -> Any:
    """``tree_`` with the subtrees whose mask flag is False replaced by ``None``.

    A tree masked out as a whole becomes ``()``, an empty container (optax's ``MaskedNode``),
    not ``None``: as ``params``, ``None`` means "not given", and transforms that need the
    params (``add_decayed_weights``, ``adaptive_grad_clip``, ...) would refuse it.
    """
    _check_prefix(mask, tree_, name)
    out = _map_mask(mask.flags, _keep_or_none, name, (), tree_)
    return () if out is None and tree_ is not None else out


def _merge(flag: bool, old: Any, new: Any) -> Any:
    return new if flag else old


def masked_update(
    inner: GradientTransformation,
    passes_extra: bool,
    mask: Mask,
    mask_compatible_extra_args: bool,
    updates: Any,
    inner_state: Any,
    params: Any,
    extra: dict[str, Any],
) -> tuple[Any, Any]:
    """Runs ``inner`` on the unmasked part of ``updates``; masked-out updates pass through.

    ``inner`` always sees ``None`` for masked-out state; a state that holds :class:`MaskedNode`
    (made under ``vmap``) keeps it, and one made eagerly gets it only under ``vmap``.
    """
    eager_state, had_nodes = _swap(inner_state, False)
    masked_updates = apply_mask(mask, updates, "updates")
    masked_params = None if params is None else apply_mask(mask, params, "params")
    if mask_compatible_extra_args:
        spec = tree.structure(updates)
        extra = {
            k: apply_mask(mask, v, k) if tree.structure(v) == spec else v for k, v in extra.items()
        }
    new_masked, new_state = _call_update(
        inner, passes_extra, masked_updates, eager_state, masked_params, extra
    )
    if not torch.compiler.is_compiling():
        tree.check_shapes(masked_updates, new_masked, ("updates", "inner updates"))
    # A state made under vmap keeps its MaskedNodes; an eager one gets them only under vmap.
    new_state = _swap(new_state, True)[0] if had_nodes else vmappable(new_state)
    return _map_mask(mask.flags, _merge, "updates", (), updates, new_masked), new_state


def label_masks(labels: Any, groups: Mapping[Hashable, Any]) -> dict[Hashable, Mask]:
    """One mask per group from a tree of labels; an unknown label is a ValueError naming it."""
    by_path = _tree_paths(labels)
    for path, label in by_path.items():
        try:
            known = label in groups
        except TypeError:
            known = False
        if not known:
            raise ValueError(
                f"{tree.path_str(path, 'param_labels')} has label {label!r}, which has no "
                f"transform; transforms are given for {sorted(map(repr, groups))}"
            )
    return {
        g: Mask({p: label == g for p, label in by_path.items()}, labels, "param_labels")
        for g in groups
    }
