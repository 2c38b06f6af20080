"""Plans of :mod:`functrain.optim.fused`: an optimizer's spec tree and state as flat primitive ops.

:func:`plan` walks the specs (``functrain.optim._fused_specs``) together with the optimizer state
into a list of :class:`Op` on subsets of the parameter leaves of a :class:`Context`, plus a
function that rebuilds the state tree; nothing is evaluated or written while planning. Everything
here is re-exported by :mod:`functrain.optim.fused`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from operator import attrgetter
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _ops
from functrain.optim._fused_specs import (
    AddDecayedWeights,
    Chain,
    Identity,
    Injected,
    Masked,
    NamedChain,
    Partition,
    ScaleByAdam,
    ScaleBySchedule,
    Spec,
    Trace,
    spec_of,
)
from functrain.optim._utils import safe_increment

_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")


@dataclasses.dataclass(eq=False)
class Op:
    """One primitive of a plan: its spec and state, the leaves it sees, its new state."""

    spec: Spec
    state: Any
    idx: list[int]
    new_state: Any = None
    leaves: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)  # of state
    # The leaves of the innermost ``partition`` group the op belongs to (one list object per
    # group, shared by its ops), or None outside any partition.
    group: list[int] | None = None


class Plan(NamedTuple):
    """A recognised optimizer: primitives in update order, and the state rebuilder."""

    ops: list[Op]
    build: Callable[[], Any]


class Context:
    """The leaves one in-place update works on (shared by planning and the engines)."""

    def __init__(self, grads: Any, params: Any, found_inf: torch.Tensor | None) -> None:
        self.params_tree = params
        self.grads_tree = grads
        p, g = _ops.plain_leaves(params), _ops.plain_leaves(grads)
        self._spec: Any = None
        if p is not None and g is not None and _ops.same_container(params, grads):
            self.p, self.g = p, g
            self.same_structure = True
        else:
            self.p, self._spec = tree.flatten(params)
            self.g, grads_spec = tree.flatten(grads)
            self.same_structure = grads_spec == self._spec
        self.n = len(self.p)
        self.found_inf = found_inf
        self._shapes: list[torch.Size] | None = None

    @property
    def spec(self) -> Any:
        """The params' treespec (built on first use: the common plans never need it)."""
        if self._spec is None:
            self._spec = tree.structure(self.params_tree)
        return self._spec

    @property
    def shapes(self) -> list[torch.Size]:
        """The parameters' shapes (computed once: several state trees are checked against them)."""
        if self._shapes is None:
            self._shapes = list(map(_SHAPE, self.p))
        return self._shapes


_MASK_CACHE: dict[tuple[Any, ...], tuple[Any, list[int]]] = {}


def _mask_subset(mask: Any, current: Any, idx: list[int], ctx: Context) -> tuple[Any, list[int]]:
    """The masked tree (as ``masked`` builds it from ``current``) and its leaf positions."""
    from functrain.optim._masking import make_mask

    key: tuple[Any, ...] = (id(mask), ctx.spec, tuple(idx))
    if callable(mask):
        # A mask function reads the leaves (``x.ndim > 1`` is typical): one tree structure
        # with other shapes or dtypes may select other leaves.
        key += (tuple(ctx.shapes), tuple(map(_DTYPE, ctx.g)))
    hit = _MASK_CACHE.get(key)
    if hit is not None and hit[0] is mask:  # holding ``mask`` keeps its id from being reused
        positions = hit[1]
    else:
        built = make_mask(mask(_updates_view(current, idx, ctx)) if callable(mask) else mask)
        positions = _positions(built, current, idx, ctx)
        _remember(key, (mask, positions))
    return _subtree(positions, ctx), positions


def _positions(built: Any, current: Any, idx: list[int], ctx: Context) -> list[int]:
    """The leaf positions among ``idx`` that the :class:`Mask` ``built`` keeps of ``current``."""
    from functrain.optim._masking import apply_mask

    ids = {id(x) for x in tree.leaves(apply_mask(built, current, "params"))}
    return [i for i in idx if id(ctx.p[i]) in ids]


def _subtree(positions: list[int], ctx: Context) -> Any:
    """The params tree with ``None`` outside ``positions`` (what a masked member sees)."""
    chosen = set(positions)
    return tree.unflatten(ctx.spec, [p if i in chosen else None for i, p in enumerate(ctx.p)])


def _remember(key: tuple[Any, ...], value: tuple[Any, Any]) -> None:
    if len(_MASK_CACHE) > 256:
        _MASK_CACHE.clear()
    _MASK_CACHE[key] = value


def _partition_positions(
    spec: Partition, current: Any, idx: list[int], ctx: Context
) -> dict[Any, list[int]] | None:
    """Each label's leaf positions among ``idx``, as ``partition``'s update masks them (cached
    like masks); ``None`` where the pure path would raise (an unknown label), so it names it."""
    from functrain.optim._masking import label_masks

    labels = spec.labels
    key: tuple[Any, ...] = ("partition", id(spec), ctx.spec, tuple(idx))
    if callable(labels):
        key += (tuple(ctx.shapes), tuple(map(_DTYPE, ctx.g)))
    hit = _MASK_CACHE.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    try:
        masks = label_masks(
            labels(_updates_view(current, idx, ctx)) if callable(labels) else labels,
            spec.transforms,
        )
        by_label = {g: _positions(masks[g], current, idx, ctx) for g in spec.transforms}
    except (TypeError, ValueError):
        return None
    _remember(key, (spec, by_label))
    return by_label


def _updates_view(current: Any, idx: list[int], ctx: Context) -> Any:
    """What the pure ``masked`` passes its mask function: the updates (optax calls
    ``mask(updates)``), with the gradients' dtypes, where ``current`` holds the parameters.

    Every primitive keeps the updates' dtypes, so the gradients stand for the updates at any
    point of a chain; a mask that reads dtypes (float32 leaves only) must see bfloat16
    gradients of float32 parameters as the pure path does.
    """
    if current is ctx.params_tree:
        return ctx.grads_tree
    chosen = set(idx)
    return tree.unflatten(ctx.spec, [g if i in chosen else None for i, g in enumerate(ctx.g)])


def _state_leaves(sub: Any, idx: list[int], ctx: Context) -> list[torch.Tensor] | None:
    leaves = _ops.plain_leaves(sub)  # when not None: all plain tensors
    if leaves is None:
        leaves = tree.leaves(sub)
        # Per type, not per leaf: the leaves are a handful of types (this runs every step).
        if not all(issubclass(kind, torch.Tensor) for kind in set(map(type, leaves))):
            return None
    if len(leaves) != len(idx):
        return None
    shapes = ctx.shapes
    want = shapes if len(idx) == ctx.n else [shapes[i] for i in idx]
    if list(map(_SHAPE, leaves)) != want:
        return None
    return leaves


_STATE_FIELDS: dict[type, tuple[str, ...]] = {
    ScaleByAdam: ("count", "mu", "nu"),
    Trace: ("trace",),
    ScaleBySchedule: ("count",),
}


def _collect(
    tx: Any, state: Any, current: Any, idx: list[int], ctx: Context, ops: list[Op]
) -> Callable[[], Any] | None:
    """Appends ``tx``'s primitives to ``ops``; returns its state rebuilder (None: unknown)."""
    spec = spec_of(tx)
    if spec is None:
        return None
    if isinstance(spec, Identity):
        return lambda: state
    if isinstance(spec, Chain):
        if not isinstance(state, tuple) or len(state) != len(spec.members):
            return None
        parts = [_collect(m, s, current, idx, ctx, ops) for m, s in zip(spec.members, state)]
        if any(b is None for b in parts):
            return None
        return lambda: tuple(b() for b in parts)  # type: ignore[misc]
    if isinstance(spec, NamedChain):
        if not isinstance(state, dict) or any(n not in state for n, _ in spec.members):
            return None
        named = [(n, _collect(m, state[n], current, idx, ctx, ops)) for n, m in spec.members]
        if any(b is None for _, b in named):
            return None
        return lambda: {n: b() for n, b in named}  # type: ignore[misc]
    if isinstance(spec, Masked):
        if getattr(state, "_fields", None) != ("inner_state",):
            return None
        sub_tree, sub = _mask_subset(spec.mask, current, idx, ctx)
        inner = _collect(spec.inner, state.inner_state, sub_tree, sub, ctx, ops)
        if inner is None:
            return None
        return lambda: state._replace(inner_state=inner())
    if isinstance(spec, Partition):
        return _collect_partition(spec, state, current, idx, ctx, ops)
    if isinstance(spec, Injected):
        if getattr(state, "_fields", None) != ("count", "hyperparams", "inner_state"):
            return None
        # What the pure update sees here: under masked or partition, only its own leaves
        # (the hyperparameters' dtype is the promoted dtype of those).
        hparams, inner_tx = spec.prepare(_updates_view(current, idx, ctx), state, current)
        inner = _collect(inner_tx, state.inner_state, current, idx, ctx, ops)
        if inner is None:
            return None
        return lambda: state._replace(
            count=safe_increment(state.count), hyperparams=hparams, inner_state=inner()
        )
    fields = _STATE_FIELDS.get(type(spec))
    if isinstance(spec, AddDecayedWeights) and callable(spec.weight_decay):
        fields = ("count",)
    if fields is not None and getattr(state, "_fields", None) != fields:
        return None
    op = Op(spec, state, list(idx))
    for name in ("mu", "nu", "trace"):
        if name in (fields or ()):
            leaves = _state_leaves(getattr(state, name), idx, ctx)
            if leaves is None:
                return None
            op.leaves[name] = leaves
    ops.append(op)
    return lambda: op.new_state


def _collect_partition(
    spec: Partition, state: Any, current: Any, idx: list[int], ctx: Context, ops: list[Op]
) -> Callable[[], Any] | None:
    """``partition``: each label's transform as a masked member over its leaves, its ops
    tagged with the group's leaves (the kernel engine runs them group by group)."""
    inner_states = getattr(state, "inner_states", None)
    if getattr(state, "_fields", None) != ("inner_states",) or not isinstance(inner_states, dict):
        return None
    if any(
        getattr(inner_states.get(g), "_fields", None) != ("inner_state",) for g in spec.transforms
    ):
        return None
    by_label = _partition_positions(spec, current, idx, ctx)
    if by_label is None:
        return None
    builders = []
    for g, member in spec.transforms.items():
        positions = by_label[g]
        start = len(ops)
        inner = _collect(
            member, inner_states[g].inner_state, _subtree(positions, ctx), positions, ctx, ops
        )
        if inner is None:
            return None
        for op in ops[start:]:
            if op.group is None:  # ops of a nested partition keep their own, smaller group
                op.group = positions
        builders.append((g, inner_states[g], inner))
    return lambda: state._replace(
        inner_states={g: old._replace(inner_state=b()) for g, old, b in builders}
    )


def plan(tx: Any, opt_state: Any, ctx: Context) -> Plan | None:
    """The flat plan of ``tx`` over ``ctx``'s leaves, or ``None`` if something is unknown."""
    ops: list[Op] = []
    build = _collect(tx, opt_state, ctx.params_tree, list(range(ctx.n)), ctx, ops)
    return None if build is None else Plan(ops, build)
