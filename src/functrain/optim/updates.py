"""Averaged copies of parameters: optax's ``incremental_update`` and ``periodic_update``.

An exponential moving average of the parameters (Polyak averaging, timm's ``ModelEmaV2``,
``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``) or a periodically
refreshed target network is a pytree kept beside the training state and updated after each
step by one of these pure functions.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain import tree

__all__ = ["incremental_update", "periodic_update"]

PyTree = Any
_NAMES = ("new_tensors", "old_tensors")


def _paired_leaves(
    new_tensors: PyTree, old_tensors: PyTree, same_dtype: bool
) -> tuple[list[Any], list[Any], Any]:
    """``(new_leaves, old_leaves, spec)``; a structure, shape (or dtype) mismatch names its path.

    Shapes and dtypes are metadata: the checks read nothing from the device.
    """
    paths, new_leaves, spec = tree.flatten_with_paths(new_tensors)
    old_leaves = tree.flatten_up_to(spec, old_tensors, _NAMES, new_tensors)
    for path, new, old in zip(paths, new_leaves, old_leaves):
        where = f"{tree.path_str(path, _NAMES[1])} vs {tree.path_str(path, _NAMES[0])}"
        if old is None:
            raise tree.TreeMismatchError(f"tree structures differ: {where}: None vs a leaf")
        if not (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor)):
            continue
        if new.shape != old.shape:
            raise tree.TreeMismatchError(
                f"{where}: shape {tuple(old.shape)} does not match {tuple(new.shape)}"
            )
        if same_dtype and new.dtype != old.dtype:
            raise tree.TreeMismatchError(f"{where}: dtype {old.dtype} does not match {new.dtype}")
    return new_leaves, old_leaves, spec


def incremental_update(
    new_tensors: PyTree, old_tensors: PyTree, step_size: float | torch.Tensor
) -> PyTree:
    """Polyak averaging: returns ``step_size * new + (1 - step_size) * old`` leaf by leaf.

    The formula and argument order are optax's. To track an EMA with decay ``d`` (the
    ``decay`` of ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d))`` or timm's
    ``ModelEmaV2``), start from a *copy* of the parameters and call
    ``ema = incremental_update(params, ema, 1 - d)`` after every step. Differences from
    ``AveragedModel``: there is no hidden first call that copies the parameters (initialise
    the average yourself: clone it, since a donating train step updates ``params`` in place),
    buffers are averaged only if you pass them, and the arithmetic is optax's
    ``w * new + (1 - w) * old`` rather than ``torch.lerp``'s ``old + w * (new - old)``, so
    the two agree to rounding, not bit for bit.

    Dtypes follow torch's promotion, as optax's follow JAX's: a Python ``float`` or 0-d tensor
    ``step_size`` keeps float leaves' dtypes, and integer or bool leaves become floating point
    (optax does the same; average only the floating leaves if you want them kept). A pair of
    leaves of different dtypes (a float32 average of bfloat16 parameters) is computed in the
    wider dtype, whereas optax rounds ``step_size * new`` to ``new``'s dtype first. Pure:
    nothing is mutated, and a tensor ``step_size`` is never read on the host.

    Args:
        new_tensors: the latest values (e.g. ``state.params``), a pytree of tensors.
        old_tensors: the moving average, with the structure and leaf shapes of
            ``new_tensors``.
        step_size: the weight of the new values, ``1 - decay``; a number or a 0-d tensor.

    Returns:
        A new pytree with ``new_tensors``'s structure: the updated average.

    Raises:
        TreeMismatchError: if the trees differ in structure or a leaf's shape; the message
            names the path.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> ema = {"w": torch.tensor([0.0, 0.0])}
        >>> ft.incremental_update(params, ema, step_size=0.25)
        {'w': tensor([0.2500, 0.5000])}
    """
    new_leaves, old_leaves, spec = _paired_leaves(new_tensors, old_tensors, same_dtype=False)
    keep = 1.0 - step_size
    out = [step_size * new + keep * old for new, old in map(_widened, new_leaves, old_leaves)]
    return tree.unflatten(spec, out)


def _widened(new: Any, old: Any) -> tuple[Any, Any]:
    """Both tensors in their promoted dtype (the result's), before any arithmetic.

    ``step_size * new`` would otherwise be rounded to ``new``'s dtype first: an average kept in
    float32 beside bfloat16 parameters would lose the increment's low bits at every step.
    """
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.dtype != old.dtype:
        wide = torch.promote_types(new.dtype, old.dtype)
        return new.to(wide), old.to(wide)
    return new, old


def periodic_update(
    new_tensors: PyTree, old_tensors: PyTree, steps: int | torch.Tensor, update_period: int
) -> PyTree:
    """A target network: ``new_tensors`` when ``steps % update_period == 0``, else ``old_tensors``.

    As optax's ``periodic_update`` (DQN's target network, BYOL). With a tensor ``steps`` (e.g.
    ``state.step``) the choice is a leaf-wise ``torch.where`` on the device, so there is no
    host sync and the function traces under ``torch.compile(fullgraph=True)`` and ``vmap``;
    with a Python ``int`` it is made on the host: ``old_tensors`` itself, or a copy of
    ``new_tensors`` (never its tensors, so a donating step's in-place update of the parameters
    leaves the target alone). Nothing is mutated.

    Args:
        new_tensors: the latest values (e.g. ``state.params``), a pytree of tensors.
        old_tensors: the slow copy, with the structure, leaf shapes and dtypes of
            ``new_tensors`` (as the two branches of optax's ``lax.cond`` must have).
        steps: the number of updates of the online network, an ``int`` or an integer tensor.
        update_period: refresh the copy every this many steps (at least 1).

    Returns:
        A pytree with ``new_tensors``'s structure holding the new or the old values.

    Raises:
        ValueError: if ``update_period`` is not a positive ``int``.
        TreeMismatchError: if the trees differ in structure, a leaf's shape or dtype; the
            message names the path.

    Example:
        >>> import torch, functrain as ft
        >>> online, target = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
        >>> ft.periodic_update(online, target, steps=torch.tensor(3), update_period=2)
        {'w': tensor([0., 0.])}
        >>> ft.periodic_update(online, target, steps=torch.tensor(4), update_period=2)
        {'w': tensor([1., 1.])}
    """
    if isinstance(update_period, bool) or not isinstance(update_period, int) or update_period < 1:
        raise ValueError(f"update_period must be a positive int, got {update_period!r}")
    new_leaves, old_leaves, spec = _paired_leaves(new_tensors, old_tensors, same_dtype=True)
    if not isinstance(steps, torch.Tensor):
        if steps % update_period != 0:
            return old_tensors
        # A copy, not ``new_tensors`` itself: the target would otherwise share the parameters'
        # memory, which a donating train step then updates in place (the target would follow
        # the online network). optax may return its branch, as JAX arrays are immutable.
        return tree.unflatten(
            spec, [x.clone() if isinstance(x, torch.Tensor) else x for x in new_leaves]
        )
    take_new = torch.remainder(steps, update_period) == 0
    out = [torch.where(take_new, new, old) for new, old in zip(new_leaves, old_leaves)]
    return tree.unflatten(spec, out)
