"""Whether mask and label functions give a sharded optimizer state's pieces their parameters' values.

Holds :func:`check_masks_agree`, which the sharded step runs once (on shapes only) so that a
``masked`` or ``partition`` wrapper never transforms a piece differently than its whole
parameter. Re-exported by :mod:`functrain.distributed.shardable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from functrain import tree
from functrain.distributed._shardable_walk import mask_functions
from functrain.distributed.errors import ShardingError
from functrain.optim.base import GradientTransformation


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, torch.Tensor) else f"a tensor {tuple(value.shape)}"


def _same(a: Any, b: Any) -> bool | None:
    """Whether two mask or label leaves are equal (``None``: cannot tell, e.g. meta tensors)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return None
    try:
        return bool(a == b)
    except Exception:
        return None


def check_masks_agree(tx: GradientTransformation, params: Any, layout: Any) -> None:
    """Raises :class:`ShardingError` if a mask or label function of ``tx`` gives a piece of some
    rank another value than its whole parameter (internal).

    Evaluated on meta tensors (no memory) for every rank's pieces, so every rank reaches the
    same verdict without a collective. ``layout`` is a :class:`functrain.distributed.zero.Layout`.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain.distributed import zero
        >>> from functrain.distributed.shardable import check_masks_agree
        >>> params = {"w": torch.zeros(4, 3)}
        >>> tx = ft.masked(ft.trace(0.9), lambda p: {"w": p["w"].shape[0] == 4})
        >>> layout = zero.Layout(ft.tree.leaves(params), 0, 2, 25.0)
        >>> try:
        ...     check_masks_agree(tx, params, layout)
        ... except ft.distributed.ShardingError as err:
        ...     print(str(err).splitlines()[1])
          masked: params['w'] is True on the whole parameter (4, 3), False on rank 0's piece (2, 3)
    """
    functions = mask_functions(tx)
    if not functions or layout.world_size == 1:
        return
    leaves, spec = tree.flatten(params)
    paths = tree.flatten_with_paths(params)[0]

    def on(shapes: Sequence[torch.Size], fn: Any) -> Any:
        metas = [torch.empty(s, dtype=x.dtype, device="meta") for x, s in zip(leaves, shapes)]
        return fn(tree.unflatten(spec, metas))

    problems = []
    for where, fn in functions:
        try:
            whole = tree.flatten_with_paths(on([x.shape for x in leaves], fn))
        except Exception:  # a mask of values, not shapes: nothing to compare on meta tensors
            continue
        for r in range(layout.world_size):
            shapes = [s.local_shape(r) for s in layout.shards]
            try:
                piece = tree.flatten_with_paths(on(shapes, fn))
            except Exception as err:
                problems.append(
                    f"{where}: the function fails on rank {r}'s pieces ({type(err).__name__}: "
                    f"{err})"
                )
                break
            if piece[2] != whole[2]:
                problems.append(f"{where}: its result has another structure on rank {r}'s pieces")
                break
            bad = next(
                (
                    (p, a, b)
                    for p, a, b in zip(whole[0], whole[1], piece[1])
                    if _same(a, b) is False
                ),
                None,
            )
            if bad is not None:
                path, a, b = bad
                # The leaf of the same path in the parameters, for its shapes (a prefix mask
                # names a subtree: then no shape).
                i = next((k for k, q in enumerate(paths) if q == path), None)
                shapes_note = (
                    ("", "")
                    if i is None
                    else (f" {tuple(leaves[i].shape)}", f" {tuple(shapes[i])}")
                )
                problems.append(
                    f"{where}: {tree.path_str(path, 'params')} is {_describe(a)} on the whole "
                    f"parameter{shapes_note[0]}, {_describe(b)} on rank {r}'s piece"
                    f"{shapes_note[1]}"
                )
                break
    if problems:
        raise ShardingError(
            "a mask or label function gives the pieces of a sharded optimizer state "
            "(shard_optimizer=True) other values than the whole parameters, so the pieces "
            "would be transformed differently:\n"
            + "\n".join(f"  {p}" for p in problems)
            + "\nMake it depend on p.ndim or on names, not on exact shapes, or use "
            "shard_optimizer=False."
        )
