"""The optimizer stage of a train step: ``(grads, opt_state, params) -> Applied``.

:func:`apply_optimizer` runs ``tx.update`` then ``apply_updates``; with a donated state it writes
the new parameters into the old parameters' memory (:func:`_add_in_place`). It is one separable
function so that a fused in-place path (:class:`functrain.train.fast.FusedStage`) can replace
it and fall back to it. :func:`find_learning_rate` (and its cached form,
:class:`LearningRateLookup`) reads the learning rate an optimizer state exposes, for the step's
``lr`` metric.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, NamedTuple

import optree
import torch

from functrain import _foreach, _func_transforms, tree
from functrain.optim.base import (
    GradientTransformation,
    _accepts_extra,
    _call_update,
    apply_updates,
)
from functrain.train import faults

__all__ = ["find_learning_rate"]

_WRITES = threading.local()


def mark_in_place_write() -> None:
    """Records that the running (eager) step began writing into its donated input's memory.

    From then on an exception can leave that input half-updated, so the step consumes it
    rather than hand it back as usable (see ``TrainStep.__call__``). Compiled code records
    nothing: a Python side effect there would be replayed only after the graph ran.
    """
    if not torch.compiler.is_compiling():
        _WRITES.started = True


def reset_in_place_writes() -> None:
    """Forgets the mark (at the start of a step)."""
    _WRITES.started = False


def in_place_writes_started() -> bool:
    """Whether :func:`mark_in_place_write` ran since the last reset (in this thread)."""
    return getattr(_WRITES, "started", False)


class Applied(NamedTuple):
    """Result of the optimizer stage: new params, new opt state, the updates (or ``None``)."""

    params: Any
    opt_state: Any
    updates: Any
    update_norm: Any = None  # ‖new params − params‖ from a fused path that has no ``updates``


def find_learning_rate(opt_state: Any) -> torch.Tensor | None:
    """The learning rate an optimizer state exposes, or ``None``.

    Looks for the first node with a ``hyperparams`` dict holding ``"learning_rate"`` (the state
    of :func:`functrain.inject_hyperparams`, found duck-typed anywhere in ``opt_state``).

    Args:
        opt_state: an optimizer state pytree (e.g. ``state.opt_state``); not modified.

    Returns:
        The first such node's ``hyperparams["learning_rate"]`` in pytree leaf order, as stored
        (the same object, not a copy: a 0-d tensor for ``inject_hyperparams``), or ``None``
        when no node holds one.

    Example:
        >>> import functrain as ft
        >>> ft.find_learning_rate((ft.EmptyState(),)) is None
        True
    """
    nodes = optree.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(getattr(x, "hyperparams", None), dict)
    )
    for node in nodes:
        hyperparams = getattr(node, "hyperparams", None)
        if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
            return hyperparams["learning_rate"]
    return None


def _add_in_place(params: Any, updates: Any, keep: set[int]) -> Any:
    """``apply_updates`` writing into the params' memory (except leaves whose id is in ``keep``)."""
    paths, p_leaves, spec = tree.flatten_with_paths(params)
    u_leaves = tree.flatten_up_to(spec, updates, ("params", "updates"), params)
    same, same_u, out = [], [], list(p_leaves)
    for i, (path, p, u) in enumerate(zip(paths, p_leaves, u_leaves)):
        if u is None:
            continue
        if p.shape != u.shape:
            raise tree.TreeMismatchError(
                f"{tree.path_str(path, 'updates')}: shape {tuple(u.shape)} does not match "
                f"{tree.path_str(path, 'params')} shape {tuple(p.shape)}"
            )
        if id(p) in keep or p.dtype != u.dtype:
            # Aliased elsewhere (so its memory is not ours to reuse) or mixed precision:
            # out of place, with apply_updates' rounding.
            s = p + u
            out[i] = s if s.dtype == p.dtype else s.to(p.dtype)
        else:
            same.append(p)
            same_u.append(u)
    if same:
        mark_in_place_write()
        _foreach.add_(same, same_u)
    return tree.unflatten(spec, out)


def apply_optimizer(
    tx: GradientTransformation,
    grads: Any,
    opt_state: Any,
    params: Any,
    *,
    in_place: bool,
    found_inf: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
) -> Applied:
    """The optimizer stage: ``tx.update`` then ``apply_updates``.

    With ``in_place=True`` (a donated state) the new parameters reuse the old parameters' memory,
    except leaves that are referenced twice in ``params`` or kept by the new optimizer state
    (those are updated out of place). This is the function a fused fast path replaces.

    ``found_inf`` (0-d bool tensor, from the step's non-finite check): where true, the
    parameters and the optimizer state come out bit-for-bit unchanged, with no host read (see
    :func:`functrain.train.faults.apply_guarded`; a fused path may pass it to its kernels and
    fall back to this generic skip otherwise).

    ``value`` (the step's loss) is passed as ``tx.update(..., value=value)`` when ``tx.update``
    takes extra keyword arguments (chains do; :func:`functrain.reduce_on_plateau` reads it).
    """
    if found_inf is not None:
        tx = faults.skip_unless(tx, ~found_inf)
    extra = {} if value is None else {"value": value}
    # Under torch.func.grad/jvp through the step (meta-learning) the update is part of the
    # derivative; torch.func respects an inner no_grad, which made it a constant.
    tracked = _func_transforms.differentiating()
    with contextlib.nullcontext() if tracked else torch.no_grad():
        updates, new_opt_state = _call_update(
            tx, bool(extra) and _accepts_extra(tx.update), grads, opt_state, params, extra
        )
        if not in_place:
            return Applied(apply_updates(params, updates), new_opt_state, updates)
        p_leaves = tree.leaves(params)
        ids = [id(p) for p in p_leaves]
        keep = {i for i in ids if ids.count(i) > 1} if len(set(ids)) != len(ids) else set()
        keep |= {id(x) for x in tree.leaves(new_opt_state)} & set(ids)
        return Applied(_add_in_place(params, updates, keep), new_opt_state, updates)


apply_optimizer.supports_found_inf = True  # type: ignore[attr-defined]
apply_optimizer.accepts_value = True  # type: ignore[attr-defined]


def find_plateau_scale(opt_state: Any) -> torch.Tensor | None:
    """The scale of the first :func:`functrain.reduce_on_plateau` state in ``opt_state``, or
    ``None`` (the factor its updates are multiplied by, 1 until the first reduction)."""
    from functrain.optim.plateau import ReduceLROnPlateauState  # optim imports this package

    nodes = optree.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ReduceLROnPlateauState))
    for node in nodes:
        if isinstance(node, ReduceLROnPlateauState):
            return node.scale
    return None


class LearningRateLookup:
    """:func:`find_learning_rate` and :func:`find_plateau_scale`, remembering the
    optimizer-state structures that have neither.

    The search calls a Python predicate on every node; a structure whose leaves are all
    plain tensors has no ``hyperparams`` or plateau node if it had none before (node types
    and dict keys are part of the structure), so later steps skip the search (one per step).
    """

    def __init__(self) -> None:
        self._no_lr: set[Any] = set()

    def __call__(self, opt_state: Any) -> Any:
        """The learning rate of ``opt_state`` or ``None``, as :func:`find_learning_rate`."""
        return self.lookup(opt_state)[0]

    def lookup(self, opt_state: Any) -> tuple[Any, Any]:
        """``(learning rate, plateau scale)`` of ``opt_state``, each ``None`` when absent."""
        if torch.compiler.is_compiling():  # traced once: nothing to save
            return find_learning_rate(opt_state), find_plateau_scale(opt_state)
        leaves, spec = optree.tree_flatten(opt_state)
        if spec in self._no_lr:
            return None, None
        lr, scale = find_learning_rate(opt_state), find_plateau_scale(opt_state)
        if lr is None and scale is None and all(type(x) is torch.Tensor for x in leaves):
            self._no_lr.add(spec)
        return lr, scale
