"""``ft.tree_utils``: the names of ``optax.tree_utils`` (0.2.8), so that ported optax code that
writes ``optax.tree_utils.tree_add(...)`` only changes its import.

``tree_utils.tree_<name>`` is ``ft.tree.<name>`` (the same object: ``ft.tree_utils.tree_add
is ft.tree.add``), as optax's ``tree_utils.tree_<name>`` is its ``optax.tree.<name>``;
``NamedTupleKey`` is ``ft.tree.NamedTupleKey``. They are documented in :mod:`functrain.tree`,
and take optax's keyword names (``tree_x``, ``tree_y``, ...).

Random trees (optax's ``tree_split_key_like``, ``tree_random_like`` and
``tree_unwrap_random_key_data``, here ``ft.tree.split_key_like`` and so on) work on functrain
keys: a key is a 0-d ``int64`` CPU tensor (:func:`functrain.random_key`,
:func:`functrain.split_key`) or a Python integer seed, which stands for
``ft.random_key(seed)``. A *sampler* is a callable ``sampler(key, shape, dtype)`` returning a
tensor of that shape and dtype (optax's ``jax.random.normal`` convention); one that also takes
a ``device`` keyword is asked to draw on the leaf's device.

Example:
    >>> import torch
    >>> import functrain.tree_utils as tu
    >>> a, b = {"w": torch.ones(2)}, {"w": torch.full((2,), 2.0)}
    >>> tu.tree_add(a, b)
    {'w': tensor([3., 3.])}
    >>> tu.tree_vdot(tree_x=a, tree_y=b)
    tensor(4.)
    >>> import functrain as ft
    >>> noise = tu.tree_random_like(ft.random_key(0), {"w": torch.zeros(2, 3)})
    >>> noise["w"].shape
    torch.Size([2, 3])
"""

from functrain.tree import NamedTupleKey
from functrain.tree import add as tree_add
from functrain.tree import add_scale as tree_add_scale
from functrain.tree import allclose as tree_allclose
from functrain.tree import batch_shape as tree_batch_shape
from functrain.tree import bias_correction as tree_bias_correction
from functrain.tree import cast as tree_cast
from functrain.tree import cast_like as tree_cast_like
from functrain.tree import clip as tree_clip
from functrain.tree import conj as tree_conj
from functrain.tree import div as tree_div
from functrain.tree import dtype as tree_dtype
from functrain.tree import full_like as tree_full_like
from functrain.tree import get as tree_get
from functrain.tree import get_all_with_path as tree_get_all_with_path
from functrain.tree import map_params as tree_map_params
from functrain.tree import max as tree_max
from functrain.tree import min as tree_min
from functrain.tree import mul as tree_mul
from functrain.tree import norm as tree_norm
from functrain.tree import ones_like as tree_ones_like
from functrain.tree import random_like as tree_random_like
from functrain.tree import real as tree_real
from functrain.tree import scale as tree_scale
from functrain.tree import set as tree_set
from functrain.tree import size as tree_size
from functrain.tree import split_key_like as tree_split_key_like
from functrain.tree import sub as tree_sub
from functrain.tree import sum as tree_sum
from functrain.tree import unwrap_random_key_data as tree_unwrap_random_key_data
from functrain.tree import update_infinity_moment as tree_update_infinity_moment
from functrain.tree import update_moment as tree_update_moment
from functrain.tree import update_moment_per_elem_norm as tree_update_moment_per_elem_norm
from functrain.tree import vdot as tree_vdot
from functrain.tree import where as tree_where
from functrain.tree import zeros_like as tree_zeros_like

__all__ = [
    "NamedTupleKey",
    "tree_add",
    "tree_add_scale",
    "tree_allclose",
    "tree_batch_shape",
    "tree_bias_correction",
    "tree_cast",
    "tree_cast_like",
    "tree_clip",
    "tree_conj",
    "tree_div",
    "tree_dtype",
    "tree_full_like",
    "tree_get",
    "tree_get_all_with_path",
    "tree_map_params",
    "tree_max",
    "tree_min",
    "tree_mul",
    "tree_norm",
    "tree_ones_like",
    "tree_random_like",
    "tree_real",
    "tree_scale",
    "tree_set",
    "tree_size",
    "tree_split_key_like",
    "tree_sub",
    "tree_sum",
    "tree_unwrap_random_key_data",
    "tree_update_infinity_moment",
    "tree_update_moment",
    "tree_update_moment_per_elem_norm",
    "tree_vdot",
    "tree_where",
    "tree_zeros_like",
]
