"""The gradient-transformation core: ``GradientTransformation``, ``chain`` and friends.

A transform is a pair of pure functions. ``init(params)`` builds its state (a NamedTuple of
tensors); ``update(updates, state, params=None, **extra)`` returns ``(new_updates, new_state)``
and never mutates its arguments. Chains thread the state of each member.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, fused

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "GradientTransformationExtraArgs",
    "TransformInitFn",
    "TransformUpdateFn",
    "apply_updates",
    "chain",
    "identity",
    "init_empty_state",
    "named_chain",
    "set_to_zero",
    "stateless",
    "stateless_with_tree_map",
    "with_extra_args_support",
]

PyTree = Any
Params = Any
Updates = Any
OptState = Any


class TransformInitFn(Protocol):
    """The type of ``GradientTransformation.init``: ``init(params) -> state``.

    Example:
        >>> import torch, functrain as ft
        >>> init: ft.TransformInitFn = ft.adam(1e-3).init
        >>> init({"w": torch.zeros(2)})[0].count
        tensor(0, dtype=torch.int32)
    """

    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    """The type of ``GradientTransformation.update``.

    ``update(updates, state, params=None, **extra) -> (updates, new_state)``; it never
    mutates its inputs.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale(-0.5)
        >>> update: ft.TransformUpdateFn = tx.update
        >>> update({"w": torch.ones(2)}, tx.init({"w": torch.ones(2)}))[0]
        {'w': tensor([-0.5000, -0.5000])}
    """

    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure gradient transformation: ``init`` and ``update``, as in optax.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.chain(ft.clip_by_global_norm(1.0), ft.scale(-0.1))
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([3.0, 4.0])}, state, params)
        >>> updates["w"]
        tensor([-0.0600, -0.0800])
    """

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transform.

    Example:
        >>> import functrain as ft
        >>> ft.EmptyState()
        EmptyState()
    """


# optax's subclass for transforms whose ``update`` takes ``**extra_args``. Every functrain
# transform does (``chain`` passes keyword arguments to the members that accept them), so it
# is the same class here: ``GradientTransformationExtraArgs(init, update)`` builds one.
GradientTransformationExtraArgs = GradientTransformation


def init_empty_state(params: Params) -> EmptyState:
    """The ``init`` of a stateless transform: ignores ``params``, returns :class:`EmptyState`.

    Args:
        params: the parameters (unused).

    Returns:
        ``EmptyState()``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.GradientTransformation(ft.init_empty_state, lambda u, s, p=None: (u, s))
        >>> tx.init({"w": torch.ones(2)})
        EmptyState()
    """
    del params
    return EmptyState()


def identity() -> GradientTransformation:
    """Passes updates through unchanged.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.identity()
        >>> tx.update([torch.ones(1)], tx.init(None))[0]
        [tensor([1.])]
    """

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmptyState]:
        del params, extra
        return updates, state

    return fused.register(GradientTransformation(init_fn, update_fn), fused.Identity())


def set_to_zero() -> GradientTransformation:
    """Replaces every update with zeros (used by :func:`freeze` and ``partition``).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.set_to_zero()
        >>> tx.update([torch.ones(2)], tx.init(None))[0]
        [tensor([0., 0.])]
    """

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmptyState]:
        del params, extra
        return tree.zeros_like(updates), state

    return fused.register(GradientTransformation(init_fn, update_fn), fused.SetToZero())


def stateless(f: Callable[[Updates, Params | None], Updates]) -> GradientTransformation:
    """Builds a stateless transform from ``f(updates, params) -> updates``.

    Args:
        f: maps ``(updates, params)`` to new updates; ``params`` is ``None`` when ``update``
            is called without them.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.stateless(lambda u, p: ft.tree.scale(2.0, u))
        >>> tx.update([torch.ones(1)], tx.init(None))[0]
        [tensor([2.])]
    """

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmptyState]:
        del extra
        return f(updates, params), state

    return GradientTransformation(init_fn, update_fn)


def stateless_with_tree_map(
    f: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> GradientTransformation:
    """Builds a stateless transform from a per-leaf ``f(update, param) -> update``.

    :func:`stateless` with the tree map done for you: ``f`` gets each update leaf and the
    matching parameter leaf, or ``None`` when ``update`` is called without params. ``None``
    leaves of masked updates stay ``None``.

    Args:
        f: maps one update tensor and its parameter (or ``None``) to the new update tensor.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.stateless_with_tree_map(lambda u, p: u + 0.5 * p)
        >>> params = {"w": torch.ones(2)}
        >>> tx.update({"w": torch.zeros(2)}, tx.init(params), params)[0]
        {'w': tensor([0.5000, 0.5000])}
    """
    if not callable(f):
        raise TypeError(f"stateless_with_tree_map: f must be callable, got {type(f).__name__}")

    def update_fn(
        updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmptyState]:
        del state, extra
        if params is None:
            return tree.map(lambda u: f(u, None), updates), EmptyState()
        return tree.map(f, updates, params), EmptyState()

    return GradientTransformation(init_empty_state, update_fn)


def with_extra_args_support(tx: GradientTransformation) -> GradientTransformationExtraArgs:
    """Makes ``tx.update`` accept (and ignore) keyword arguments, as optax's function.

    functrain's own transforms already take ``**extra``, and :func:`chain` passes keyword
    arguments only to the members that accept them; this is for a hand-written transform
    whose ``update(updates, state, params=None)`` has no ``**kwargs``, called directly. A
    transform that accepts them is returned unchanged.

    Args:
        tx: the transform to adapt.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.GradientTransformation(ft.init_empty_state, lambda u, s, p=None: (u, s))
        >>> tx = ft.with_extra_args_support(tx)
        >>> tx.update([torch.ones(1)], tx.init(None), None, loss=torch.tensor(0.5))[0]
        [tensor([1.])]
    """
    tx = _check_transform(tx, "with_extra_args_support argument")
    if _accepts_extra(tx.update):
        return tx
    inner = tx.update

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del extra
        return inner(updates, state, params)

    return GradientTransformation(tx.init, update_fn)


def _accepts_extra(update_fn: Callable[..., Any]) -> bool:
    # Read the code flags first: torch.compile cannot trace inspect.signature, and chains are
    # rebuilt inside compiled updates (inject_hyperparams).
    code = getattr(getattr(update_fn, "__func__", update_fn), "__code__", None)
    if code is not None:
        return bool(code.co_flags & inspect.CO_VARKEYWORDS)
    try:
        sig = inspect.signature(update_fn)
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _call_update(
    tx: GradientTransformation,
    passes_extra: bool,
    updates: Updates,
    state: OptState,
    params: Params | None,
    extra: dict[str, Any],
) -> tuple[Updates, OptState]:
    if passes_extra:
        return tx.update(updates, state, params, **extra)
    return tx.update(updates, state, params)


def _check_transform(tx: Any, where: str) -> GradientTransformation:
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(
            f"{where} must be a GradientTransformation (init, update), got {type(tx).__name__}"
        )
    return tx


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies transforms one after another; the state is a tuple of their states.

    Keyword arguments given to ``update`` (``**extra``) reach every member whose ``update``
    accepts ``**kwargs``.

    Args:
        *transforms: the transforms, applied in the order given.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.chain(ft.scale(2.0), ft.scale(-0.5))
        >>> tx.update([torch.ones(1)], tx.init(None))[0]
        [tensor([-1.])]
    """
    txs = tuple(_check_transform(t, f"chain argument {i}") for i, t in enumerate(transforms))
    extras = tuple(_accepts_extra(t.update) for t in txs)

    def init_fn(params: Params) -> tuple[OptState, ...]:
        return tuple(t.init(params) for t in txs)

    def update_fn(
        updates: Updates, state: tuple[OptState, ...], params: Params | None = None, **extra: Any
    ) -> tuple[Updates, tuple[OptState, ...]]:
        if not isinstance(state, tuple) or len(state) != len(txs):
            got = f"tuple of {len(state)}" if isinstance(state, tuple) else type(state).__name__
            raise ValueError(
                f"chain of {len(txs)} transforms got a state that is a {got}; "
                "was it made by this chain's init?"
            )
        if params is not None and 2 <= len(txs) <= 4 and not torch.compiler.is_compiling():
            # A recognised AdamW runs as one fused kernel pass on fresh tensors (same numbers
            # to rounding, a fraction of the memory traffic); anything else returns None.
            # Compiled code keeps the members' ops, for the compiler to fuse.
            from functrain.optim import _pure_fused

            done = _pure_fused.update(me, updates, state, params)
            if done is not None:
                return done
        new_states = []
        for t, passes, s in zip(txs, extras, state):
            updates, s = _call_update(t, passes, updates, s, params, extra)
            new_states.append(s)
        return updates, tuple(new_states)

    me = fused.register(GradientTransformation(init_fn, update_fn), fused.Chain(txs))
    return me


def named_chain(*transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, but the state is a dict keyed by the given names.

    Args:
        *transforms: ``(name, transform)`` pairs, applied in the order given; names are unique.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.named_chain(("clip", ft.clip(1.0)), ("lr", ft.scale(-0.1)))
        >>> sorted(tx.init({"w": torch.ones(1)}))
        ['clip', 'lr']
    """
    names = [name for name, _ in transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain names must be unique, got {names}")
    txs = [(n, _check_transform(t, f"named_chain[{n!r}]")) for n, t in transforms]
    extras = {n: _accepts_extra(t.update) for n, t in txs}

    def init_fn(params: Params) -> dict[str, OptState]:
        return {n: t.init(params) for n, t in txs}

    def update_fn(
        updates: Updates, state: dict[str, OptState], params: Params | None = None, **extra: Any
    ) -> tuple[Updates, dict[str, OptState]]:
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"named_chain state has no entry for {missing}")
        new_state = {}
        for n, t in txs:
            updates, new_state[n] = _call_update(t, extras[n], updates, state[n], params, extra)
        return updates, new_state

    return fused.register(GradientTransformation(init_fn, update_fn), fused.NamedChain(tuple(txs)))


def apply_updates(params: Params, updates: Updates) -> Params:
    """Returns ``params + updates``, each result cast back to its parameter's dtype.

    ``None`` updates leave the matching parameter unchanged. Nothing is mutated.

    Args:
        params: the parameter pytree.
        updates: a pytree of the same structure (``None`` subtrees allowed), as returned by
            ``tx.update``.

    Returns:
        A new pytree of parameters with the structure and dtypes of ``params``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})
        {'w': tensor([1.5000, 0.0000])}
    """
    fast = _apply_plain(params, updates)
    if fast is not None:
        return fast
    p_paths, p_leaves, spec = tree.flatten_with_paths(params)
    u_leaves = tree.flatten_up_to(spec, updates, ("params", "updates"), params)
    for path, p, u in zip(p_paths, p_leaves, u_leaves):
        if u is not None and not isinstance(u, torch.Tensor):
            raise tree.TreeMismatchError(
                f"{tree.path_str(path, 'updates')} is a {type(u).__name__} where "
                f"{tree.path_str(path, 'params')} is a tensor"
            )
        if u is not None and p.shape != u.shape:
            raise tree.TreeMismatchError(
                f"{tree.path_str(path, 'updates')}: shape {tuple(u.shape)} does not match "
                f"{tree.path_str(path, 'params')} shape {tuple(p.shape)}"
            )
    pairs = [(i, p, u) for i, (p, u) in enumerate(zip(p_leaves, u_leaves)) if u is not None]
    out = list(p_leaves)
    if pairs:
        sums = _foreach.add([p for _, p, _ in pairs], [u for _, _, u in pairs])
        for (i, p, _), s in zip(pairs, sums):
            out[i] = s if s.dtype == p.dtype else s.to(p.dtype)
    return tree.unflatten(spec, out)


def _apply_plain(params: Params, updates: Updates) -> Params | None:
    """``apply_updates`` for plain containers of tensors of matching shapes, else ``None``.

    The common case, without optree's per-leaf cost; anything unusual (``None`` updates,
    nested trees, mismatches and their error messages) takes the general path.
    """
    p_leaves = _ops.plain_leaves(params)
    if p_leaves is None or not p_leaves:
        return None
    u_leaves = _ops.plain_leaves(updates)
    if u_leaves is None or not _ops.same_container(params, updates):
        return None
    if [p.shape for p in p_leaves] != [u.shape for u in u_leaves]:
        return None
    sums = _foreach.add(p_leaves, u_leaves)
    out = [s if s.dtype == p.dtype else s.to(p.dtype) for p, s in zip(p_leaves, sums)]
    return _ops.plain_rebuild(params, out)
