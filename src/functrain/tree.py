"""Pytree maths on `optree`.

Every function takes and returns pytrees (nested dicts, lists, tuples, NamedTuples and any
optree-registered node) whose leaves are tensors. ``None`` is an empty subtree, as in optax: a
``None`` leaf is skipped, which is how masked or frozen parts of a model travel through a chain.

Structural mistakes raise :class:`TreeMismatchError` naming the first differing path, for example
``updates['fc']['bias']: shape (3,) does not match params['fc']['bias'] shape (4,)``.

Example:
    >>> import torch, functrain as ft
    >>> a = {"w": torch.ones(2), "b": torch.zeros(1)}
    >>> ft.tree.norm(ft.tree.scale(2.0, a))
    tensor(2.8284)
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

__all__ = [
    "TreeMismatchError",
    "add",
    "add_scale",
    "allclose",
    "cast",
    "clip",
    "div",
    "flatten",
    "flatten_with_paths",
    "full_like",
    "leaves",
    "map",
    "map_with_path",
    "max",
    "mul",
    "norm",
    "ones_like",
    "path_str",
    "scale",
    "size",
    "structure",
    "sub",
    "sum",
    "unflatten",
    "vdot",
    "where",
    "zeros_like",
]

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

    Example:
        >>> import torch, functrain as ft
        >>> leaves, spec = ft.tree.flatten({"a": torch.ones(1), "b": None})
        >>> len(leaves)
        1
    """
    return optree.tree_flatten(tree)


def unflatten(treespec: optree.PyTreeSpec, leaves_: Sequence[Any]) -> PyTree:
    """Inverse of :func:`flatten`.

    Example:
        >>> import torch, functrain as ft
        >>> leaves, spec = ft.tree.flatten([torch.ones(1), torch.zeros(1)])
        >>> ft.tree.unflatten(spec, leaves[::-1])
        [tensor([0.]), tensor([1.])]
    """
    return optree.tree_unflatten(treespec, list(leaves_))


def flatten_with_paths(tree: PyTree) -> tuple[list[tuple[Any, ...]], list[Any], optree.PyTreeSpec]:
    """Returns ``(paths, leaves, treespec)``, each path a tuple of keys.

    Example:
        >>> import torch, functrain as ft
        >>> paths, leaves, _ = ft.tree.flatten_with_paths({"fc": {"w": torch.ones(1)}})
        >>> paths
        [('fc', 'w')]
    """
    return optree.tree_flatten_with_path(tree)


def leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` in a deterministic order.

    Example:
        >>> import torch, functrain as ft
        >>> len(ft.tree.leaves({"a": torch.ones(1), "b": (torch.ones(1), None)}))
        2
    """
    return optree.tree_leaves(tree)


def structure(tree: PyTree) -> optree.PyTreeSpec:
    """The treespec of ``tree``.

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

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.map(lambda a, b: a * b, {"x": torch.tensor(2.0)}, {"x": torch.tensor(3.0)})
        {'x': tensor(6.)}
    """
    tree_leaves, spec = optree.tree_flatten(tree)
    others = [flatten_up_to(spec, r, ("tree", f"rest[{i}]"), tree) for i, r in enumerate(rest)]
    return optree.tree_unflatten(spec, [fn(*xs) for xs in zip(tree_leaves, *others)])


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Like :func:`map`, with the leaf's path (a tuple of keys) as first argument.

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


def _binary(
    a: PyTree,
    b: PyTree,
    foreach: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]],
) -> PyTree:
    _check_same(a, b)
    a_leaves, spec = flatten(a)
    b_leaves = flatten(b)[0]
    if not a_leaves:
        return a
    return unflatten(spec, foreach(a_leaves, b_leaves))


def add(tree: PyTree, *others: PyTree) -> PyTree:
    """Leaf-wise sum of one or more trees.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.add([torch.ones(1)], [torch.ones(1)], [torch.ones(1)])
        [tensor([3.])]
    """
    out = tree
    for other in others:
        out = _binary(out, other, torch._foreach_add)
    return out


def sub(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``a - b``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.sub([torch.ones(1)], [torch.ones(1)])
        [tensor([0.])]
    """
    return _binary(a, b, torch._foreach_sub)


def mul(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``a * b``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.mul([torch.tensor([2.0])], [torch.tensor([3.0])])
        [tensor([6.])]
    """
    return _binary(a, b, torch._foreach_mul)


def div(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``a / b``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.div([torch.tensor([3.0])], [torch.tensor([2.0])])
        [tensor([1.5000])]
    """
    return _binary(a, b, torch._foreach_div)


def scale(scalar: float | torch.Tensor, tree: PyTree) -> PyTree:
    """Multiplies every leaf by ``scalar`` (a number or a 0-d tensor); optax's ``tree_scalar_mul``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.scale(0.5, {"w": torch.tensor([2.0, 4.0])})
        {'w': tensor([1., 2.])}
    """
    tree_leaves, spec = flatten(tree)
    if not tree_leaves:
        return tree
    if isinstance(scalar, torch.Tensor):
        return unflatten(spec, [leaf * _like(scalar, leaf) for leaf in tree_leaves])
    return unflatten(spec, torch._foreach_mul(tree_leaves, scalar))


def _like(scalar: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    # A float64 0-d scalar must not promote a float32 0-d leaf, but an integer leaf times a
    # fractional scalar must become floating point (as with a Python float), not truncate it.
    if leaf.is_floating_point() or leaf.is_complex():
        return scalar.to(leaf.dtype)
    return scalar


def add_scale(a: PyTree, scalar: float | torch.Tensor, b: PyTree) -> PyTree:
    """Returns ``a + scalar * b`` leaf-wise; optax's ``tree_add_scalar_mul``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.add_scale([torch.ones(1)], 2.0, [torch.ones(1)])
        [tensor([3.])]
    """
    _check_same(a, b)
    a_leaves, spec = flatten(a)
    b_leaves = flatten(b)[0]
    if not a_leaves:
        return a
    if isinstance(scalar, torch.Tensor):
        return unflatten(spec, [x + _like(scalar, y) * y for x, y in zip(a_leaves, b_leaves)])
    return unflatten(spec, torch._foreach_add(a_leaves, b_leaves, alpha=scalar))


def vdot(a: PyTree, b: PyTree) -> torch.Tensor:
    """Sum over leaves of the inner products ``<a_i, b_i>``, as a 0-d tensor.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.vdot([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 4.0])])
        tensor(11.)
    """
    _check_same(a, b)
    a_leaves, b_leaves = flatten(a)[0], flatten(b)[0]
    if not a_leaves:
        return torch.zeros(())
    dots = []
    for x, y in zip(a_leaves, b_leaves):
        dtype = torch.promote_types(x.dtype, y.dtype)  # torch.vdot wants equal dtypes
        dots.append(torch.vdot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)))
    return _sum_scalars(dots)


def _stack_promoted(values: list[torch.Tensor]) -> torch.Tensor:
    dtype = values[0].dtype
    for v in values[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    device = values[0].device
    return torch.stack([v.to(dtype=dtype, device=device) for v in values])


def _sum_scalars(values: list[torch.Tensor]) -> torch.Tensor:
    return _stack_promoted(values).sum()


def sum(tree: PyTree) -> torch.Tensor:
    """Sum of all elements of all leaves, as a 0-d tensor.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.sum({"a": torch.ones(3), "b": torch.ones(2)})
        tensor(5.)
    """
    tree_leaves = leaves(tree)
    if not tree_leaves:
        return torch.zeros(())
    return _sum_scalars([leaf.sum() for leaf in tree_leaves])


def max(tree: PyTree) -> torch.Tensor:
    """Largest element over all leaves, as a 0-d tensor.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.max({"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([3.0])})
        tensor(5.)
    """
    all_leaves = leaves(tree)
    # Shapes are static, so skipping empty leaves costs no device synchronization.
    tree_leaves = [leaf for leaf in all_leaves if leaf.numel()]
    if not tree_leaves:
        raise ValueError("tree.max of a tree without elements is undefined")
    dtype = _stack_promoted([x.new_zeros(()) for x in all_leaves]).dtype
    return _stack_promoted([leaf.max() for leaf in tree_leaves]).max().to(dtype)


def size(tree: PyTree) -> int:
    """Total number of elements over all leaves (a Python int: shapes are static).

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.size({"w": torch.ones(3, 4), "b": torch.ones(4)})
        16
    """
    return builtins.sum(leaf.numel() for leaf in leaves(tree))


def norm(tree: PyTree, ord: float | None = None, squared: bool = False) -> torch.Tensor:
    """Global norm over all leaves, as if they were concatenated into one vector.

    Args:
        tree: a pytree of tensors.
        ord: ``None`` or ``2`` (the L2 norm, default, as optax), ``1`` or ``float('inf')``.
        squared: return the squared norm (only for ``ord=2``).

    Returns:
        A 0-d tensor in the promoted dtype of the leaves, on the first leaf's device.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        tensor(5.)
        >>> ft.tree.norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, squared=True)
        tensor(25.)
    """
    ord = 2 if ord is None else ord
    if squared and ord != 2:
        raise ValueError(f"squared=True needs ord=2, got ord={ord!r}")
    if ord not in (1, 2, float("inf")):
        raise ValueError(f"ord must be 1, 2 or inf, got {ord!r}")
    all_leaves = leaves(tree)
    if not all_leaves:
        return torch.zeros(())
    bad = [x for x in all_leaves if not (x.is_floating_point() or x.is_complex())]
    if bad:
        paths, path_leaves, _ = flatten_with_paths(tree)
        path = next(p for p, x in zip(paths, path_leaves) if x is bad[0])
        where = path_str(path, "tree")
        raise TypeError(f"tree.norm needs floating-point leaves; {where} is {bad[0].dtype}")
    # The result dtype comes from every leaf; empty leaves add nothing to any of these norms
    # (and the inf-norm kernel rejects them). Shapes are static: skipping them does not sync.
    zero = _stack_promoted([x.new_zeros(()) for x in all_leaves]).sum()
    tree_leaves = [leaf for leaf in all_leaves if leaf.numel()]
    if not tree_leaves:
        return zero
    per_leaf = torch._foreach_norm(tree_leaves, ord)
    if ord == 2:
        total = _sum_scalars([zero, *(n.square() for n in per_leaf)])
        return total if squared else total.sqrt()
    if ord == 1:
        return _sum_scalars([zero, *per_leaf])
    return _stack_promoted([zero, *per_leaf]).max()


def zeros_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of zeros with the structure, shapes and devices of ``tree``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.zeros_like({"a": torch.ones(2)})
        {'a': tensor([0., 0.])}
    """
    return optree.tree_map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def ones_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of ones with the structure, shapes and devices of ``tree``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.ones_like({"a": torch.zeros(2)})
        {'a': tensor([1., 1.])}
    """
    return optree.tree_map(lambda x: torch.ones_like(x, dtype=dtype), tree)


def full_like(tree: PyTree, fill_value: float, dtype: torch.dtype | None = None) -> PyTree:
    """A tree filled with ``fill_value``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.full_like([torch.zeros(2)], 7.0)
        [tensor([7., 7.])]
    """
    return optree.tree_map(lambda x: torch.full_like(x, fill_value, dtype=dtype), tree)


def cast(tree: PyTree, dtype: torch.dtype | None) -> PyTree:
    """Casts floating-point leaves to ``dtype`` (``None`` leaves the tree as is).

    Integer and boolean leaves keep their dtype, as optax's ``tree_cast`` does for counters.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.cast({"a": torch.ones(1)}, torch.float64)["a"].dtype
        torch.float64
    """
    if dtype is None:
        return tree
    return optree.tree_map(
        lambda x: x.to(dtype) if x.is_floating_point() or x.is_complex() else x, tree
    )


def where(condition: torch.Tensor | PyTree, a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``torch.where``; ``condition`` is a single tensor or a tree like ``a``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.where(torch.tensor(False), [torch.ones(1)], [torch.zeros(1)])
        [tensor([0.])]
    """
    _check_same(a, b)
    if isinstance(condition, torch.Tensor):
        return map(lambda x, y: torch.where(condition, x, y), a, b)
    return map(lambda c, x, y: torch.where(c, x, y), condition, a, b)


def clip(tree: PyTree, min_value: float | None = None, max_value: float | None = None) -> PyTree:
    """Clamps every element to ``[min_value, max_value]``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.clip([torch.tensor([-2.0, 0.5, 2.0])], -1.0, 1.0)
        [tensor([-1.0000,  0.5000,  1.0000])]
    """
    if min_value is None and max_value is None:
        return tree
    return optree.tree_map(lambda x: torch.clamp(x, min_value, max_value), tree)


def allclose(
    a: PyTree, b: PyTree, rtol: float = 1e-5, atol: float = 1e-8, equal_nan: bool = False
) -> bool:
    """True when both trees have the same structure and every leaf pair is ``allclose``.

    ``equal_nan=True`` counts NaNs in the same places as equal, as ``torch.allclose`` does.

    This reads values on the host; use it in tests and checks, not inside a step.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.allclose([torch.ones(1)], [torch.ones(1) + 1e-9])
        True
    """
    a_leaves, spec_a = flatten(a)
    b_leaves, spec_b = flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(a_leaves, b_leaves):
        if x.shape != y.shape:
            return False
        dtype = torch.promote_types(x.dtype, y.dtype)  # torch.allclose wants equal dtypes
        close = torch.allclose(
            x.to(dtype), y.to(x.device, dtype), rtol=rtol, atol=atol, equal_nan=equal_nan
        )
        if not bool(close):
            return False
    return True
