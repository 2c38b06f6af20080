"""Lookahead: fast and slow weights (optax's ``lookahead``, ``LookaheadParams``, ``LookaheadState``)."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils
from functrain.optim._adam_ops import Hyper
from functrain.optim.base import (
    GradientTransformation,
    _accepts_extra,
    _call_update,
    _check_transform,
)

__all__ = ["LookaheadParams", "LookaheadState", "lookahead"]


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`: the fast optimizer's state and the int32 number of fast steps
    taken since the last synchronisation.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.lookahead(ft.sgd(0.1), sync_period=2, slow_step_size=0.5)
        >>> tx.init(ft.LookaheadParams.init_synced([torch.zeros(1)])).steps_since_sync
        tensor(0, dtype=torch.int32)
    """

    fast_state: Any
    steps_since_sync: torch.Tensor


class LookaheadParams(NamedTuple):
    """The fast and slow parameters of :func:`lookahead`.

    Compute gradients with ``fast``; evaluate (test, infer) with ``slow``. A ``NamedTuple`` is a
    pytree node of optree and ``torch.utils._pytree`` as it is, so ``ft.tree``,
    ``ft.apply_updates``, ``torch.func`` and checkpoints see its two subtrees as they see any
    other container.

    Example:
        >>> import torch, functrain as ft
        >>> p = ft.LookaheadParams.init_synced({"w": torch.ones(2)})
        >>> ft.tree.leaves(p)
        [tensor([1., 1.]), tensor([1., 1.])]
    """

    fast: Any
    slow: Any

    @classmethod
    def init_synced(cls, params: Any) -> LookaheadParams:
        """``fast`` is ``params``; ``slow`` a clone of it.

        A clone, not the same objects (as optax's): a compiled step guards on inputs that
        alias each other, so shared leaves would recompile it after the first update. The
        clone of an ``nn.Parameter`` is detached (a module's weights are constants to a
        torch-style loop, as :func:`~functrain.lookahead`'s update treats them); a plain
        tensor's keeps its graph.
        """
        return cls(fast=params, slow=tree.map(_utils.initial_copy, params))


def lookahead(
    fast_optimizer: GradientTransformation,
    sync_period: int,
    slow_step_size: Hyper,
    reset_state: bool = False,
) -> GradientTransformation:
    """Lookahead (Zhang et al., 2019): ``k`` fast steps forward, one step back towards them.

    The parameters are a :class:`LookaheadParams` ``(fast, slow)``. Each update runs the fast
    optimizer on the gradients (taken at ``fast``) and, every ``sync_period``-th step, also moves
    the slow weights towards the fast ones and resets the fast ones onto them. With ``u`` the fast
    optimizer's update and ``s = 1`` on a synchronising step (else 0)::

        d = fast + u − slow
        slow update = slow_step_size · s · d
        fast update = u − s · (1 − slow_step_size) · d

    so after ``ft.apply_updates`` a synchronising step leaves ``fast = slow =
    slow + slow_step_size · (fast + u − slow)``. Apply the updates unchanged (no transform after
    this one), or fast and slow fall out of step. ``reset_state=True`` also re-initialises the
    fast optimizer's state at each synchronisation (chosen with ``torch.where``, so a NaN in
    the discarded state does not leak, where optax's ``(1 − s)·state + s·init`` would keep it).

    ``update`` takes the gradients with respect to ``fast`` or, for use in
    :func:`functrain.make_train_step` (whose loss gets the whole params pytree: write it on
    ``params.fast``), a :class:`LookaheadParams` of gradients, of which only ``.fast`` is used
    (an extension of optax, which takes the former only). ``torch.optim`` has no Lookahead.
    Wrap the fast optimizer, not ``lookahead`` itself, in :func:`~functrain.masked` or
    :func:`~functrain.partition`: ``lookahead(masked(opt, mask), ...)``.

    Differences from optax: ``masked(lookahead(...), mask)`` with a mask that leaves
    parameters out is refused at ``init`` (ValueError): the masked-out leaves would get their
    updates unchanged, the gradients of ``fast`` and of ``slow``, so their fast and slow
    weights would drift apart (optax runs it). In :func:`~functrain.partition` a lookahead
    group is refused beside a group that neither holds a lookahead nor is ``set_to_zero()``
    (whose fast weights would move and slow weights would not); lookaheads in every group,
    and :func:`~functrain.selective_transform` (frozen leaves: zero updates for both) work.

    Args:
        fast_optimizer: the inner transform, run on the fast weights at every step.
        sync_period: number of fast steps between synchronisations, an ``int >= 1``.
        slow_step_size: the slow weights' step towards the fast ones, in ``[0, 1]``
            (a number or a 0-d tensor).
        reset_state: re-initialise the fast optimizer's state at each synchronisation.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.lookahead(ft.sgd(0.5), sync_period=2, slow_step_size=0.5)
        >>> params = ft.LookaheadParams.init_synced([torch.tensor([1.0])])
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     u, state = tx.update([torch.tensor([1.0])], state, params)
        ...     params = ft.apply_updates(params, u)
        >>> params
        LookaheadParams(fast=[tensor([0.5000])], slow=[tensor([0.5000])])
    """
    _check_transform(fast_optimizer, "fast_optimizer")
    if isinstance(sync_period, bool) or not isinstance(sync_period, numbers.Integral):
        raise TypeError(f"sync_period must be an int, got {sync_period!r}")
    if sync_period < 1:
        raise ValueError(f"sync_period must be >= 1, got {sync_period!r}")
    _ops.check_decay("slow_step_size", slow_step_size, allow_one=True)
    if callable(slow_step_size):
        raise TypeError("slow_step_size must be a number or a 0-d tensor, not a schedule")
    passes_extra = _accepts_extra(fast_optimizer.update)

    def init_fn(params: Any) -> LookaheadState:
        # As optax: plain (fast) parameters are accepted too.
        fast = params.fast if isinstance(params, LookaheadParams) else params
        return LookaheadState(
            fast_state=fast_optimizer.init(fast), steps_since_sync=_utils.zero_count(fast)
        )

    def update_fn(
        updates: Any, state: LookaheadState, params: Any = None, **extra: Any
    ) -> tuple[LookaheadParams, LookaheadState]:
        if not isinstance(params, LookaheadParams):
            raise ValueError(
                "lookahead's update needs params=LookaheadParams(fast, slow), got "
                f"{type(params).__name__}"
            )
        if isinstance(updates, LookaheadParams):
            updates = updates.fast
        u_tree, fast_state = _call_update(
            fast_optimizer, passes_extra, updates, state.fast_state, params.fast, extra
        )
        steps = state.steps_since_sync
        sync = steps == sync_period - 1
        # Fast and slow weights are constants unless the update is differentiated
        # (nn.Parameters in a torch-style loop: no graph in the updates).
        u, spec, s = _utils.flat(
            u_tree,
            {"params.fast": params.fast, "params.slow": params.slow},
            ("params.fast", "params.slow"),
        )
        if u:
            fast, slow = s["params.fast"], s["params.slow"]
            wide = [torch.promote_types(x.dtype, torch.float32) for x in u]
            # The difference in at least float32: in bfloat16, fast + u − slow loses the step.
            diff = [f.to(w) + x.to(w) - sl.to(w) for f, x, sl, w in zip(fast, u, slow, wide)]
            on = sync.to(_ops.scalar_dtype(u))
            slow_u = _ops.cast_like(_ops.mul(diff, on * slow_step_size), u)
            back = _ops.mul(diff, on * (1 - _ops.on_device(slow_step_size, on)))
            fast_u = _ops.cast_like(list(_foreach.sub([x.to(w) for x, w in zip(u, wide)], back)), u)
            u_tree = tree.unflatten(spec, fast_u)
            slow_tree = tree.unflatten(spec, slow_u)
        else:
            slow_tree = u_tree
        if reset_state:
            fresh = fast_optimizer.init(params.fast)
            fast_state = tree.map(
                lambda cur, new: (
                    torch.where(sync, new, cur) if isinstance(cur, torch.Tensor) else cur
                ),
                fast_state,
                fresh,
            )
        steps = torch.remainder(_utils.safe_increment(steps), sync_period).to(steps.dtype)
        return LookaheadParams(fast=u_tree, slow=slow_tree), LookaheadState(fast_state, steps)

    return GradientTransformation(init_fn, update_fn)


# ---- Refusing a lookahead inside masked/partition (called by functrain.optim.wrappers) ----

_PAIR_HINT = (
    "; lookahead's params are a (fast, slow) pair: to mask its fast optimizer, write "
    "lookahead(masked(opt, mask), ...), or give a mask (labels) of the whole pair"
)


def _holds_lookahead(state: Any) -> bool:
    """Whether ``state`` (an inner transform's state) contains a :class:`LookaheadState`."""
    if isinstance(state, LookaheadState):
        return True
    if isinstance(state, (list, tuple)):
        return any(_holds_lookahead(x) for x in state if not isinstance(x, torch.Tensor))
    if isinstance(state, dict):
        return any(_holds_lookahead(x) for x in state.values() if not isinstance(x, torch.Tensor))
    return False


def _refuse_masked(inner_state: Any, masked_out: str | None) -> None:
    """``masked(inner, mask)``: a lookahead inside is refused if the mask leaves a leaf out.

    The masked-out leaves get their updates unchanged: ``fast`` moves by its gradient and
    ``slow`` by its own (zero when the loss is written on ``params.fast``), so the two fall
    out of step, and evaluating ``slow`` gives those leaves' initial values.
    """
    if masked_out is not None and _holds_lookahead(inner_state):
        raise ValueError(
            f"masked: the inner transform contains a lookahead but the mask leaves "
            f"{masked_out} out; masked-out leaves get their updates unchanged (the gradients "
            "of fast and of slow), so their fast and slow weights would drift apart. Mask the "
            "fast optimizer instead: lookahead(masked(opt, mask), sync_period, slow_step_size)"
        )


def _refuse_partitioned(
    states: dict[Any, Any], parts: dict[Any, Any], zeroes: dict[Any, bool]
) -> None:
    """``partition``: a lookahead group is refused beside a group that moves ``fast`` alone.

    Args:
        states: each label's inner state.
        parts: each label's params (masked: only its own leaves).
        zeroes: whether each label's transform is ``set_to_zero()`` (frozen leaves).
    """
    with_lookahead = [g for g, st in states.items() if _holds_lookahead(st)]
    if not with_lookahead:
        return
    for g in states:
        if zeroes[g] or g in with_lookahead:
            continue
        paths, leaves, _ = tree.flatten_with_paths(parts[g])
        owned = next((p for p, x in zip(paths, leaves) if isinstance(x, torch.Tensor)), None)
        if owned is not None:
            raise ValueError(
                f"partition: transforms[{with_lookahead[0]!r}] contains a lookahead but "
                f"transforms[{g!r}] (which updates {tree.path_str(owned, 'params')}) does "
                "not; lookahead keeps the fast and slow weights of its own leaves in step "
                "only, so those leaves' slow weights would not follow their fast ones. Give "
                "every group a lookahead, freeze the others with set_to_zero() "
                "(ft.selective_transform), or put the partition inside: "
                "lookahead(partition(...), sync_period, slow_step_size)"
            )
