"""Structure of pytrees: flattening, paths, leaf-wise ``map`` and path-named mismatch errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

PyTree = Any


class TreeMismatchError(ValueError):
    """Two pytrees that must line up do not: the message names the path and what differs.

    Example:
        >>> import torch, functrain as ft
        >>> try:
        ...     ft.tree.add({"a": torch.ones(2)}, {"b": torch.ones(2)})
        ... except ft.tree.TreeMismatchError as err:
        ...     print("mismatch")
        mismatch
    """


def path_str(path: Sequence[Any], root: str = "") -> str:
    """Formats an optree path as Python indexing, e.g. ``params['fc'][0]``.

    Args:
        path: the keys from the root, as in :func:`flatten_with_paths`; each is ``repr``'d.
        root: the name the string starts with.

    Returns:
        ``root`` followed by one ``[key!r]`` per key; ``"<root>"`` if both are empty.

    Example:
        >>> from functrain.tree import path_str
        >>> path_str(("fc", 0, "weight"), root="params")
        "params['fc'][0]['weight']"
    """
    out = root
    for key in path:
        out += f"[{key!r}]"
    return out or "<root>"


def flatten(tree: PyTree) -> tuple[list[Any], optree.PyTreeSpec]:
    """Returns ``(leaves, treespec)``; ``None`` subtrees have no leaves.

    Dict keys are visited in sorted order; anything that is not an optree container is a leaf.

    Args:
        tree: a pytree.

    Returns:
        A list of the leaves in a deterministic order, and the treespec that
        :func:`unflatten` rebuilds the tree from (``None`` nodes included).

    Example:
        >>> import torch, functrain as ft
        >>> leaves, spec = ft.tree.flatten({"a": torch.ones(1), "b": None})
        >>> len(leaves)
        1
    """
    return optree.tree_flatten(tree)


def unflatten(treespec: optree.PyTreeSpec, leaves_: Sequence[Any]) -> PyTree:
    """Inverse of :func:`flatten`.

    Args:
        treespec: a treespec from :func:`flatten` or :func:`structure`.
        leaves_: one leaf per leaf of ``treespec``, in :func:`flatten`'s order; not modified.

    Returns:
        A new pytree of ``treespec``'s structure holding ``leaves_``.

    Raises:
        ValueError: if ``len(leaves_)`` is not ``treespec.num_leaves``.

    Example:
        >>> import torch, functrain as ft
        >>> leaves, spec = ft.tree.flatten([torch.ones(1), torch.zeros(1)])
        >>> ft.tree.unflatten(spec, leaves[::-1])
        [tensor([0.]), tensor([1.])]
    """
    return optree.tree_unflatten(treespec, list(leaves_))


def flatten_with_paths(tree: PyTree) -> tuple[list[tuple[Any, ...]], list[Any], optree.PyTreeSpec]:
    """Returns ``(paths, leaves, treespec)``, each path a tuple of keys.

    Args:
        tree: a pytree; ``None`` subtrees have no leaves and so no paths.

    Returns:
        The list of paths (dict keys, sequence indices; ``()`` for a bare leaf), the list of
        leaves in the same order as :func:`flatten`'s, and the treespec.

    Example:
        >>> import torch, functrain as ft
        >>> paths, leaves, _ = ft.tree.flatten_with_paths({"fc": {"w": torch.ones(1)}})
        >>> paths
        [('fc', 'w')]
    """
    return optree.tree_flatten_with_path(tree)


def leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` in a deterministic order.

    Args:
        tree: a pytree; ``None`` subtrees have no leaves.

    Returns:
        A list of the leaves, in :func:`flatten`'s order (dict keys sorted).

    Example:
        >>> import torch, functrain as ft
        >>> len(ft.tree.leaves({"a": torch.ones(1), "b": (torch.ones(1), None)}))
        2
    """
    return optree.tree_leaves(tree)


def structure(tree: PyTree) -> optree.PyTreeSpec:
    """The treespec of ``tree``.

    Args:
        tree: a pytree.

    Returns:
        Its ``optree.PyTreeSpec`` (containers, keys and ``None`` placements; no leaf values).

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.structure({"a": torch.ones(1)}).num_leaves
        1
    """
    return optree.tree_structure(tree)


def _mismatch_message(reference: PyTree, other: PyTree, names: tuple[str, str]) -> str:
    ref_paths, _, _ = flatten_with_paths(reference)
    other_paths, _, _ = flatten_with_paths(other)
    ref_set, other_set = set(ref_paths), set(other_paths)
    for p in ref_paths:
        if p not in other_set:
            return f"{path_str(p, names[0])} has no counterpart in {names[1]}"
    for p in other_paths:
        if p not in ref_set:
            return f"{path_str(p, names[1])} has no counterpart in {names[0]}"
    return (
        f"{names[0]} and {names[1]} have the same paths but different node types: "
        f"{structure(reference)} vs {structure(other)}"
    )


def flatten_up_to(
    reference_spec: optree.PyTreeSpec,
    tree: PyTree,
    names: tuple[str, str] = ("reference", "tree"),
    reference: PyTree | None = None,
) -> list[Any]:
    """Flattens ``tree`` up to ``reference_spec``; a mismatch raises a path-named error.

    A ``None`` in ``tree`` where the reference has a leaf comes back as a ``None`` leaf (a
    masked-out update), as in optax.
    """
    try:
        return reference_spec.flatten_up_to(tree)
    except ValueError:
        ref = (
            reference
            if reference is not None
            else optree.tree_unflatten(reference_spec, [0] * reference_spec.num_leaves)
        )
        raise TreeMismatchError(
            "tree structures differ: " + _mismatch_message(ref, tree, names)
        ) from None


def check_shapes(
    reference: PyTree,
    other: PyTree,
    names: tuple[str, str] = ("updates", "params"),
) -> None:
    """Raises :class:`TreeMismatchError` naming the first path whose structure or shape differs.

    Shapes are static metadata, so this check does not synchronize with the device.
    """
    paths, ref_leaves, spec = flatten_with_paths(reference)
    other_leaves = flatten_up_to(spec, other, names, reference)
    for p, a, b in zip(paths, ref_leaves, other_leaves):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            raise TreeMismatchError(
                f"{path_str(p, names[0])}: shape {tuple(a.shape)} does not match "
                f"{path_str(p, names[1])} shape {tuple(b.shape)}"
            )


def map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Applies ``fn`` leaf-wise over trees of the same structure.

    Unlike ``optree.tree_map``, a structure mismatch names the offending path.

    ``tree`` sets the structure: ``None`` subtrees of ``tree`` stay ``None`` (``fn`` is not
    called), and where ``tree`` has a leaf, each tree in ``rest`` supplies whatever it holds
    there (a subtree, or ``None`` for a masked-out entry).

    Args:
        fn: called with one leaf of ``tree`` and the matching entries of ``rest``.
        tree: the pytree whose structure the result takes.
        *rest: pytrees with ``tree``'s structure (or a deeper one below its leaves).

    Returns:
        A new pytree with ``tree``'s structure holding ``fn``'s results.

    Raises:
        TreeMismatchError: if a tree in ``rest`` does not contain ``tree``'s structure; the
            message names the path (e.g. ``rest[0]['b'] has no counterpart in tree``).

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.map(lambda a, b: a * b, {"x": torch.tensor(2.0)}, {"x": torch.tensor(3.0)})
        {'x': tensor(6.)}
    """
    if not rest:
        # One tree cannot mismatch; and torch.compile traces optree.tree_map where it fails
        # on tree_unflatten of Python constants (masks: ``lambda x: x.ndim > 1``).
        return optree.tree_map(fn, tree)
    tree_leaves, spec = optree.tree_flatten(tree)
    others = [flatten_up_to(spec, r, ("tree", f"rest[{i}]"), tree) for i, r in enumerate(rest)]
    return optree.tree_unflatten(spec, [fn(*xs) for xs in zip(tree_leaves, *others)])


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Like :func:`map`, with the leaf's path (a tuple of keys) as first argument.

    Args:
        fn: called with the path, one leaf of ``tree`` and the matching entries of ``rest``.
        tree: the pytree whose structure the result takes; ``None`` subtrees stay ``None``.
        *rest: pytrees with ``tree``'s structure (or a deeper one below its leaves).

    Returns:
        A new pytree with ``tree``'s structure holding ``fn``'s results.

    Raises:
        TreeMismatchError: if a tree in ``rest`` does not contain ``tree``'s structure; the
            message names the path (e.g. ``rest[0]['b'] has no counterpart in tree``).

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.map_with_path(lambda p, x: p, {"a": torch.ones(1)})
        {'a': ('a',)}
    """
    paths, tree_leaves, spec = flatten_with_paths(tree)
    others = [flatten_up_to(spec, r, ("tree", f"rest[{i}]"), tree) for i, r in enumerate(rest)]
    return optree.tree_unflatten(spec, [fn(p, *xs) for p, *xs in zip(paths, tree_leaves, *others)])


def _check_same(a: PyTree, b: PyTree, names: tuple[str, str] = ("a", "b")) -> None:
    """Like :func:`check_shapes`, and ``b`` may not hold ``None`` where ``a`` has a leaf."""
    check_shapes(a, b, names)
    spec = structure(a)
    if spec == structure(b):
        return
    paths, _, _ = flatten_with_paths(a)
    for p, leaf in zip(paths, spec.flatten_up_to(b)):
        if leaf is None:
            raise TreeMismatchError(
                f"tree structures differ: {path_str(p, names[1])} is None but "
                f"{path_str(p, names[0])} is a leaf"
            )
