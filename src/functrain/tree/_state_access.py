"""Reading and replacing entries of optimizer states by name: ``get``, ``set``, ``get_all_with_path``.

An entry is found by a dict key, a NamedTuple field name or a NamedTuple's class name, at any
depth (optax's ``tree_get`` and friends). Paths are tuples of optree keys (dict keys, sequence
indices, registered nodes' entry names), except that a NamedTuple field is a
:class:`NamedTupleKey`, so that a ``filtering`` callable can tell ``ScaleByAdamState.count`` from
``InjectHyperparamsState.count``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import optree

from functrain.tree._structure import PyTree

Path = tuple[Any, ...]
Filtering = Callable[[Path, Any], bool]


@dataclasses.dataclass(frozen=True)
class NamedTupleKey:
    """A path entry for the field ``name`` of a NamedTuple of class ``tuple_name``.

    The paths that :func:`get_all_with_path` returns, and that ``filtering`` receives in
    :func:`get` and :func:`set`, hold one of these for each NamedTuple field they pass through.

    Attributes:
        tuple_name: the NamedTuple's class name, e.g. ``"ScaleByAdamState"``.
        name: the field name, e.g. ``"count"``.

    Example:
        >>> import torch, functrain as ft
        >>> state = ft.adam(0.1).init({"w": torch.zeros(2)})
        >>> [str(p[-1]) for p, _ in ft.tree.get_all_with_path(state, "count")]
        ['ScaleByAdamState.count']
    """

    tuple_name: str
    name: str

    def __str__(self) -> str:
        return f"{self.tuple_name}.{self.name}"


def _is_named_tuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(type(node), "_fields")


def _has_keys(node: Any, keys: tuple[Any, ...]) -> bool:
    """Whether ``node`` is a NamedTuple or dict with one of ``keys`` as field, name or key."""
    if _is_named_tuple(node):
        return type(node).__name__ in keys or any(k in node._fields for k in keys)
    if isinstance(node, dict):
        return any(k in node for k in keys)
    return False


def _children(path: Path, node: Any) -> list[tuple[Path, Any]]:
    """The ``(path, child)`` pairs of a NamedTuple (fields in order) or dict (insertion order)."""
    if _is_named_tuple(node):
        name = type(node).__name__
        return [((*path, NamedTupleKey(name, f)), getattr(node, f)) for f in node._fields]
    return [((*path, k), v) for k, v in node.items()]


def _entry_name(entry: Any) -> Any:
    return entry.name if isinstance(entry, NamedTupleKey) else entry


def _with_children(node: Any, new: dict[Any, Any]) -> Any:
    """A copy of NamedTuple or dict ``node`` with its children replaced; ``node`` is unchanged."""
    if _is_named_tuple(node):
        return node._replace(**new)
    out = copy.copy(node)  # keeps the dict's type (OrderedDict, defaultdict's factory)
    out.update(new)
    return out


def _stop_at(keys: tuple[Any, ...]) -> Callable[[Any], bool]:
    return lambda node: _has_keys(node, keys)


def _leaves_with_named_paths(tree: PyTree, stop: Callable[[Any], bool]) -> list[tuple[Path, Any]]:
    """optree's leaves with paths, stopping at nodes where ``stop`` is true, and naming the
    fields of every NamedTuple passed through with a :class:`NamedTupleKey`."""
    paths, nodes, _ = optree.tree_flatten_with_path(
        tree, is_leaf=lambda x: stop(x) or _is_named_tuple(x)
    )
    out: list[tuple[Path, Any]] = []
    for path, node in zip(paths, nodes):
        if stop(node) or not _is_named_tuple(node):
            out.append((path, node))
            continue
        for child_path, child in _children(path, node):
            out += [((*child_path, *p), v) for p, v in _leaves_with_named_paths(child, stop)]
    return out


def _find(tree: PyTree, key: Any) -> list[tuple[Path, Any]]:
    # optax's order: first the entries of the outermost nodes holding ``key``, in tree order;
    # then, node by node, those nested inside them.
    stop = _stop_at((key,))
    holders = [(p, n) for p, n in _leaves_with_named_paths(tree, stop) if stop(n)]
    found = []
    for path, node in holders:
        if _is_named_tuple(node) and type(node).__name__ == key:
            found.append((path, node))
        elif _is_named_tuple(node):
            found.append(((*path, NamedTupleKey(type(node).__name__, key)), getattr(node, key)))
        else:
            found.append(((*path, key), node[key]))
    for path, node in holders:
        for child_path, child in _children(path, node):
            found += [((*child_path, *p), v) for p, v in _find(child, key)]
    return found


def _path_text(path: Path, root: str = "tree") -> str:
    """A path as Python access, NamedTuple fields as attributes: ``tree[0].count``."""
    out = root
    for entry in path:
        out += f".{entry.name}" if isinstance(entry, NamedTupleKey) else f"[{entry!r}]"
    return out


def get_all_with_path(
    tree: PyTree, key: Any, filtering: Filtering | None = None
) -> list[tuple[Path, Any]]:
    """Every entry of ``tree`` named ``key``, with its path (optax's ``tree_get_all_with_path``).

    An entry is named ``key`` when it is the value of a dict key or NamedTuple field ``key``,
    or a NamedTuple whose class name is ``key``; matches nested in a match are found too.
    Attributes of other registered nodes (:class:`~functrain.TrainState`'s ``opt_state``) are
    searched through but are not names themselves.

    Difference from optax: a path holds plain optree keys (the dict key itself, the sequence
    index as an ``int``) where optax's holds ``jax.tree_util`` key objects (``DictKey``,
    ``SequenceKey``), which PyTorch has no counterpart of; NamedTuple fields are
    :class:`NamedTupleKey` in both, so ``filtering`` functions that test for it port unchanged.

    Args:
        tree: the tree to search, e.g. an optimizer state or a ``TrainState``; not modified.
        key: the dict key, field name or NamedTuple class name to look for.
        filtering: keeps only the matches for which ``filtering(path, value)`` is true.

    Returns:
        A list of ``(path, value)`` pairs: each path a tuple of optree keys with a
        :class:`NamedTupleKey` for each NamedTuple field; the outermost matches first, in tree
        order, then those nested inside them (optax's order). Empty if nothing matches.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.inject_hyperparams(ft.adam)(learning_rate=0.1)
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> found = ft.tree.get_all_with_path(state, "count")
        >>> [str(path[-1]) for path, _ in found]
        ['InjectHyperparamsState.count', 'ScaleByAdamState.count']
        >>> found[1][0][:2]  # the path to the inner chain's first state
        (NamedTupleKey(tuple_name='InjectHyperparamsState', name='inner_state'), 0)
    """
    found = _find(tree, key)
    if filtering is not None:
        found = [(p, v) for p, v in found if filtering(p, v)]
    return found


def get(tree: PyTree, key: Any, default: Any = None, filtering: Filtering | None = None) -> Any:
    """The single entry of ``tree`` named ``key`` (optax's ``tree_get``).

    Matching is that of :func:`get_all_with_path`. Several matches are an error even if their
    values are equal (as in optax): ``filtering`` picks one, e.g. by the NamedTuple it sits in.

    Args:
        tree: the tree to search, e.g. an optimizer state or a ``TrainState``.
        key: the dict key, field name or NamedTuple class name to look for.
        default: returned when nothing matches.
        filtering: keeps only the matches for which ``filtering(path, value)`` is true.

    Returns:
        The matching value (the entry itself, not a copy), or ``default``.

    Raises:
        KeyError: if more than one entry matches; the message names ``key`` and their paths.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.inject_hyperparams(ft.adam)(learning_rate=0.1)
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> ft.tree.get(state, "learning_rate")
        tensor(0.1000)
        >>> adam_count = ft.tree.NamedTupleKey("ScaleByAdamState", "count")
        >>> ft.tree.get(state, "count", filtering=lambda path, _: path[-1] == adam_count)
        tensor(0, dtype=torch.int32)
    """
    found = get_all_with_path(tree, key, filtering)
    if len(found) > 1:
        where = ", ".join(_path_text(p) for p, _ in found)
        raise KeyError(
            f"tree.get: found {len(found)} entries named {key!r} ({where}); pass filtering "
            "to pick one, or use tree.get_all_with_path"
        )
    return found[0][1] if found else default


def set(tree: PyTree, filtering: Filtering | None = None, /, **kwargs: Any) -> PyTree:
    """A copy of ``tree`` with every entry named by a keyword replaced (optax's ``tree_set``).

    Matching is that of :func:`get_all_with_path`: every match of each keyword is replaced
    (and the new value is not searched further). Containers on the way to a match are rebuilt,
    everything else is shared with ``tree``, which is not modified. ``set`` replaces exactly what
    :func:`get_all_with_path` finds; optax's skips some matches nested in another match (with
    ``count=``, the inner Adam ``count`` of an ``inject_hyperparams`` state, while it replaces
    the outer one); ``filtering`` selects matches here.

    Args:
        tree: the tree to update, e.g. an optimizer state or a ``TrainState``.
        filtering: replaces only the matches for which ``filtering(path, value)`` is true
            (positional only, as in optax).
        **kwargs: the new value for each name; a value is used as given (for an injected
            hyperparameter, a 0-d tensor of the old one's dtype and device).

    Returns:
        A new tree of ``tree``'s structure (unless a new value is a differently shaped subtree).

    Raises:
        KeyError: if some keyword matches nothing (or nothing that passes ``filtering``); the
            message names it.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.inject_hyperparams(ft.sgd)(learning_rate=0.1)
        >>> params = {"w": torch.ones(2)}
        >>> state = ft.tree.set(tx.init(params), learning_rate=torch.tensor(0.5))
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> updates["w"]
        tensor([-0.5000, -0.5000])
    """
    for key in kwargs:
        if not get_all_with_path(tree, key, filtering):
            passing = " that passes filtering" if filtering is not None else ""
            raise KeyError(
                f"tree.set: no entry named {key!r}{passing} (a dict key, NamedTuple field or "
                "NamedTuple class name) in tree"
            )

    def accepts(path: Path, value: Any) -> bool:
        return filtering is None or bool(filtering(path, value))

    def replace(path: Path, node: Any) -> Any:
        # ``node`` is a NamedTuple or a dict: its own name and its children's are checked.
        if _is_named_tuple(node) and type(node).__name__ in kwargs and accepts(path, node):
            return kwargs[type(node).__name__]
        new, changed = {}, False
        for child_path, child in _children(path, node):
            name = _entry_name(child_path[-1])
            if name in kwargs and accepts(child_path, child):
                new[name] = kwargs[name]
                changed = True
            else:
                new[name] = rebuild(child_path, child)
                changed = changed or new[name] is not child
        # Containers without a match are shared, not copied.
        return _with_children(node, new) if changed else node

    def rebuild_train_state(path: Path, state: Any) -> Any:
        # Through ``replace``, not optree's unflatten: the copy then shares the original's
        # lease, so a donating step that consumes one consumes the other too, instead of
        # silently updating the tensors they share in place.
        children, _, entries, _ = optree.tree_flatten_one_level(state)
        changes = {}
        for entry, child in zip(entries, children):
            new_child = rebuild((*path, entry), child)
            if new_child is not child:
                changes[entry] = new_child
        return state.replace(**changes) if changes else state

    def rebuild(path: Path, subtree: Any) -> Any:
        # Imported here: functrain.train imports functrain.tree.
        from functrain.train.state import TrainState

        paths, nodes, spec = optree.tree_flatten_with_path(
            subtree,
            is_leaf=lambda x: _is_named_tuple(x) or isinstance(x, (dict, TrainState)),
        )
        out = [
            replace((*path, *p), n)
            if _is_named_tuple(n) or isinstance(n, dict)
            else rebuild_train_state((*path, *p), n)
            if isinstance(n, TrainState)
            else n
            for p, n in zip(paths, nodes)
        ]
        if all(a is b for a, b in zip(out, nodes)):
            return subtree
        return optree.tree_unflatten(spec, out)

    return rebuild((), tree)


def map_params(
    initable: Any,
    f: Callable[..., Any],
    state: Any,
    /,
    *rest: Any,
    transform_non_params: Callable[[Any], Any] | None = None,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """Applies ``f`` to every params-shaped subtree of an optimizer state.

    The same function as :func:`functrain.tree_map_params` (optax has both spellings,
    ``optax.tree.map_params`` and ``optax.tree_map_params``); see it for the details.

    Args:
        initable: the transform that made ``state``, or its ``init`` function.
        f: called on each leaf of each params-shaped subtree, with the matching leaves of
            ``rest``.
        state: the optimizer state to map over; not modified.
        *rest: trees with the params' structure, passed to ``f`` leaf by leaf.
        transform_non_params: called on every leaf of ``state`` outside the params-shaped parts.
        is_leaf: passed to the leaf-wise map over each params-shaped subtree.

    Returns:
        A new state of ``state``'s structure (unless ``f`` returns subtrees).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adam(0.1)
        >>> state = tx.init({"w": torch.ones(2)})
        >>> wide = ft.tree.map_params(tx, lambda t: t.to(torch.float64), state)
        >>> wide[0].mu["w"].dtype, wide[0].count.dtype
        (torch.float64, torch.int32)
    """
    # Imported here: functrain.optim imports functrain.tree.
    from functrain.optim.param_map import tree_map_params

    return tree_map_params(
        initable, f, state, *rest, transform_non_params=transform_non_params, is_leaf=is_leaf
    )
