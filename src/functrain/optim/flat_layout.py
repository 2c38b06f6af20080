"""Running a transform on one flat vector (optax's ``flatten``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from functrain import _foreach, tree
from functrain.optim.base import (
    GradientTransformation,
    _accepts_extra,
    _call_update,
    _check_transform,
)
from functrain.optim.param_map import is_params_placeholder

__all__ = ["flatten"]


def _concat(leaves: list[torch.Tensor], like: torch.Tensor | None) -> torch.Tensor:
    """The leaves as one vector (``torch.cat`` promotes mixed dtypes, as ``jnp.concatenate``);
    an empty float32 vector when there are none."""
    if not leaves:
        device = like.device if like is not None else None
        return torch.zeros(0, device=device)
    return torch.cat([x.reshape(-1) for x in leaves])


def flatten(inner: GradientTransformation) -> GradientTransformation:
    """Runs ``inner`` on every leaf concatenated into one vector (optax's ``flatten``).

    ``init`` and ``update`` see a single 1-D tensor instead of the tree: fewer, larger
    operations for a model of many small tensors, at the cost of one copy in and one out per
    step. The updates are split back into the tree's shapes, each in its leaf's dtype (optax
    keeps the concatenation's promoted dtype). ``None`` leaves (masked entries) are skipped.
    Keyword arguments given to ``update`` reach ``inner`` if it accepts them.

    Global quantities are unchanged by the layout (a global norm, a global clip), per-tensor
    ones are not: ``flatten(ft.lamb(...))`` computes one trust ratio for the whole model.

    :func:`~functrain.tree_map_params` sees ``inner``'s flat moments as params-shaped: ``f``
    gets each flat vector (so a cast works; trees in ``rest`` do not match it).

    Args:
        inner: the transform to run on the flat vector.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.flatten(ft.sgd(0.5))
        >>> params = {"w": torch.ones(2, 2), "b": torch.zeros(3)}
        >>> updates, _ = tx.update({"w": torch.ones(2, 2), "b": torch.ones(3)}, tx.init(params))
        >>> updates["w"], updates["b"].shape
        (tensor([[-0.5000, -0.5000],
                [-0.5000, -0.5000]]), torch.Size([3]))
    """
    _check_transform(inner, "inner")
    passes_extra = _accepts_extra(inner.update)

    def init_fn(params: Any) -> Any:
        if is_params_placeholder(params):
            # tree_map_params: the flat vector stands for the params, so the placeholder goes
            # to inner as it is, and inner's moments are found as params-shaped. Flattening the
            # childless placeholder would give an empty tensor, and the moments would silently
            # be taken for non-params.
            return inner.init(params)
        leaves = tree.leaves(params)
        return inner.init(_concat(leaves, None))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        leaves, spec = tree.flatten(updates)
        if params is not None:
            p_leaves = tree.leaves(params)
            if [x.shape for x in p_leaves] != [x.shape for x in leaves]:
                # The flat vector cannot tell a transposed leaf (same size) from the right one,
                # nor which leaf is missing: compare the trees, naming the path.
                tree.check_shapes(updates, params, ("updates", "params"))
        flat_params = None
        if params is not None:
            # The flat copy is a plain tensor: nn.Parameters (constants to a torch-style loop)
            # would make it look like params being differentiated.
            flat_params = _concat(_foreach.constants(leaves, tree.leaves(params)), None)
        flat = _concat(leaves, flat_params)
        flat_updates, state = _call_update(inner, passes_extra, flat, state, flat_params, extra)
        sizes = [math.prod(x.shape) for x in leaves]
        pieces = flat_updates.split(sizes) if leaves else []
        out = [p.reshape(x.shape).to(x.dtype) for p, x in zip(pieces, leaves)]
        return tree.unflatten(spec, out), state

    return GradientTransformation(init_fn, update_fn)
