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

from functrain.tree._arith import add, add_scale, cast, clip, div, mul, scale, sub, where
from functrain.tree._leafwise import batch_shape, cast_like, conj, dtype, min, real
from functrain.tree._make import full_like, ones_like, zeros_like
from functrain.tree._moments import (
    bias_correction,
    update_infinity_moment,
    update_moment,
    update_moment_per_elem_norm,
)
from functrain.tree._random import random_like, split_key_like, unwrap_random_key_data
from functrain.tree._reduce import allclose, max, norm, size, sum, vdot
from functrain.tree._state_access import (
    NamedTupleKey,
    get,
    get_all_with_path,
    map_params,
    set,
)

# PyTree, check_shapes and flatten_up_to are not in ``__all__`` but are used across functrain.
from functrain.tree._structure import (  # noqa: F401
    PyTree,
    TreeMismatchError,
    check_shapes,
    flatten,
    flatten_up_to,
    flatten_with_paths,
    leaves,
    map,
    map_with_path,
    path_str,
    structure,
    unflatten,
)

__all__ = [
    "NamedTupleKey",
    "TreeMismatchError",
    "add",
    "add_scale",
    "allclose",
    "batch_shape",
    "bias_correction",
    "cast",
    "cast_like",
    "clip",
    "conj",
    "div",
    "dtype",
    "flatten",
    "flatten_with_paths",
    "full_like",
    "get",
    "get_all_with_path",
    "leaves",
    "map",
    "map_params",
    "map_with_path",
    "max",
    "min",
    "mul",
    "norm",
    "ones_like",
    "path_str",
    "random_like",
    "real",
    "scale",
    "set",
    "size",
    "split_key_like",
    "structure",
    "sub",
    "sum",
    "unflatten",
    "unwrap_random_key_data",
    "update_infinity_moment",
    "update_moment",
    "update_moment_per_elem_norm",
    "vdot",
    "where",
    "zeros_like",
]
