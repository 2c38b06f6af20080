"""Batch-argument checks of :mod:`functrain.microbatching`: axes, ``num_real_microbatches``,
and the plan (reshaped leaves) of the batch arguments of one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from functrain import tree as _tree
from functrain.train.microbatch import _as_int


def _normalize_axis(x: torch.Tensor, axis: int, where: str) -> int:
    if not -x.dim() <= axis < x.dim():
        raise ValueError(
            f"{where} has shape {tuple(x.shape)}: it has no axis {axis} to microbatch over "
            "(in_axes)"
        )
    return axis % x.dim()


def _tensor_leaves(x: Any, root: str, what: str) -> tuple[list[str], list[torch.Tensor], Any]:
    """Path names, tensor leaves and treespec of ``x``; a non-tensor leaf raises a TypeError."""
    paths, leaves, spec = _tree.flatten_with_paths(x)
    names = [_tree.path_str(p, root) for p in paths]
    for name, leaf in zip(names, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{name} must be a tensor ({what}), got {type(leaf).__name__}")
    return names, leaves, spec


def _reshape_leaf(x: torch.Tensor, microbatch_size: int, axis: int, where: str) -> torch.Tensor:
    ax = _normalize_axis(x, axis, where)
    size = x.shape[ax]
    if size % microbatch_size:
        raise ValueError(
            f"{where} has shape {tuple(x.shape)}: its batch axis {axis} of size {size} must be "
            f"divisible by microbatch_size={microbatch_size}"
        )
    # Column-major split (row a + n*b goes to [a, b]) as a view: unflatten then swap.
    return x.unflatten(ax, (microbatch_size, size // microbatch_size)).transpose(ax, ax + 1)


def _check_num_real(num_real_microbatches: Any) -> int | torch.Tensor | None:
    if num_real_microbatches is None:
        return None
    if isinstance(num_real_microbatches, torch.Tensor):
        t = num_real_microbatches
        if t.dim() != 0 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(
                "num_real_microbatches must be an int or a 0-d integer tensor, got a tensor "
                f"of shape {tuple(t.shape)} and dtype {t.dtype}"
            )
        return t
    k = _as_int(num_real_microbatches)
    if k is None or k < 0:
        raise TypeError(
            "num_real_microbatches must be a non-negative int or a 0-d integer tensor, got "
            f"{num_real_microbatches!r}"
        )
    return k


def _plan(
    microbatch_size: int,
    argnums: Sequence[int],
    argnames: Sequence[str],
    in_axes: Sequence[int],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[list[tuple[int | str, list[torch.Tensor], list[int], Any]], int]:
    """Validates the batch arguments; returns their reshaped leaves and the batch size."""
    entries: list[tuple[int | str, Any, int, str]] = []
    for i, ax in zip(argnums, in_axes):
        if not -len(args) <= i < len(args):
            raise ValueError(
                f"argnums contains {i} but the function was called with {len(args)} "
                "positional arguments"
            )
        entries.append((i, args[i], ax, f"args[{i}]"))
    for name, ax in zip(argnames, in_axes[len(argnums) :]):
        if name not in kwargs:
            raise ValueError(
                f"argnames contains {name!r} but the function was called without that "
                f"keyword argument (got {sorted(kwargs)})"
            )
        entries.append((name, kwargs[name], ax, f"kwargs[{name!r}]"))
    first: tuple[str, int, tuple[int, ...], int] | None = None
    plan = []
    for key, value, ax, root in entries:
        if isinstance(value, dict) and not value:
            continue  # micro_vmap's kwargs without keywords (and dynamo cannot flatten {})
        names, leaves, spec = _tensor_leaves(value, root, "a batch argument leaf")
        axes = []
        for where, x in zip(names, leaves):
            a = _normalize_axis(x, ax, where)
            if first is None:
                first = (where, x.shape[a], tuple(x.shape), ax)
            elif x.shape[a] != first[1]:
                raise ValueError(
                    "batch arguments must have equal-size batch axes: "
                    f"{first[0]} has {first[1]} along axis {first[3]} (shape {first[2]}), "
                    f"{where} has {x.shape[a]} along axis {ax} (shape {tuple(x.shape)})"
                )
            axes.append(a)
        plan.append((key, leaves, axes, spec))
    if first is None:
        raise ValueError(
            f"no batch tensors: the arguments argnums={tuple(argnums)} and "
            f"argnames={tuple(argnames)} hold no tensor leaves"
        )
    where, size, shape, ax = first
    if size == 0:
        raise ValueError(f"{where} has shape {shape}: its batch axis {ax} is empty")
    if size % microbatch_size:
        raise ValueError(
            f"batch_size={size} must be divisible by microbatch_size={microbatch_size} "
            f"({where} has shape {shape}, batch axis {ax})"
        )
    plan = [
        (key, [_reshape_leaf(x, microbatch_size, a, "") for x, a in zip(leaves, axes)], axes, spec)
        for key, leaves, axes, spec in plan
    ]
    return plan, size
