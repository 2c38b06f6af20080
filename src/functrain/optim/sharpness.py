"""Sharpness-aware minimization (optax.contrib's ``sam``, ``SAMState``, ``normalize``)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _utils
from functrain.optim.base import (
    EmptyState,
    GradientTransformation,
    _accepts_extra,
    _call_update,
    _check_transform,
    apply_updates,
)

__all__ = ["NormalizeState", "SAMState", "normalize", "sam"]

NormalizeState = EmptyState


def normalize() -> GradientTransformation:
    """Divides the gradients by their global L2 norm: ``g / ‖g‖`` (optax.contrib's).

    The adversarial direction of :func:`sam`. As in optax there is no epsilon: an all-zero
    gradient gives NaN updates (0 / 0). PyTorch SAM implementations usually add ``1e-12`` to
    the norm; chain ``ft.clip_by_global_norm`` or use ``ft.normalize_by_update_norm`` (which
    scales by ``1 / (‖u‖ + eps)`` ) where a zero gradient can occur.

    Example:
        >>> import torch, functrain as ft
        >>> ft.normalize().update([torch.tensor([3.0, 4.0])], ft.NormalizeState())[0]
        [tensor([0.6000, 0.8000])]
    """

    def init_fn(params: Any) -> EmptyState:
        del params
        return NormalizeState()

    def update_fn(updates: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        del params
        norm = tree.norm(updates)
        return tree.map(lambda g: g / norm.to(g.dtype), updates), state

    return GradientTransformation(init_fn, update_fn)


class SAMState(NamedTuple):
    """State of :func:`sam`.

    Attributes:
        steps_since_sync: int32 number of adversarial steps since the last outer update.
        opt_state: the outer optimizer's state.
        adv_state: the adversarial optimizer's state.
        cache: the true (outer) parameters while the adversarial steps move away from them;
            ``None`` in opaque mode.
    """

    steps_since_sync: torch.Tensor
    opt_state: Any
    adv_state: Any
    cache: Any


def _select(condition: torch.Tensor, if_true: Any, if_false: Any) -> Any:
    """Leaf-wise ``torch.where(condition, a, b)``; non-tensor leaves are taken from ``if_true``.

    optax picks with ``c·a + (1 − c)·b``: the same numbers for finite values, but a NaN or inf in
    the discarded branch would leak into the kept one.
    """
    return tree.map(
        lambda a, b: torch.where(condition, a, b) if isinstance(a, torch.Tensor) else a,
        if_true,
        if_false,
    )


def sam(
    optimizer: GradientTransformation,
    adv_optimizer: GradientTransformation,
    sync_period: int = 2,
    reset_state: bool = True,
    opaque_mode: bool = False,
    batch_axis_name: str | None = None,
) -> GradientTransformation:
    """Sharpness-aware minimization (Foret et al., 2021), optax.contrib's ``sam``.

    SAM takes the gradient at adversarially perturbed weights. Out of every ``sync_period``
    calls, the first ``sync_period − 1`` are adversarial steps run by ``adv_optimizer``, moving
    the weights *up* the loss (its update is negated), and the last is the outer step: the
    outer ``optimizer`` sees the gradient taken at the perturbed weights and updates the true
    weights, which are restored from ``state.cache``. With ``cache`` the true weights and ``p``
    the current ones::

        adversarial call:  update = −adv_update(g)
        outer call:        update = cache − p + opt_update(g; params=cache)

    The drop-in SAM of the paper is ``sam(ft.sgd(lr), ft.chain(ft.normalize(), ft.sgd(rho)))``
    with ``sync_period=2``: one ascent step ``p + rho·g/‖g‖``, then the descent step from the
    true weights with the gradient taken there. In :func:`functrain.make_train_step` each call
    is one step (transparent mode), so a SAM step costs two train steps, of which only every
    second one moves the true weights: evaluate after an outer step (``steps_since_sync`` is
    0), when the params are the true weights (between, ``cache`` holds them).

    ``opaque_mode=True`` runs the adversarial steps inside one ``update`` call instead; it then
    needs ``update(..., grad_fn=grad_fn)`` with ``grad_fn(params, i)`` returning the gradients at
    ``params`` (for adversarial step ``i``), as in optax; the train step does not pass one, so
    use it in a loop of your own.

    Differences from optax: the branches are chosen with ``torch.where`` (a NaN in the
    discarded one does not leak); with ``sync_period=1`` every call is an outer step from the
    current params, i.e. ``optimizer`` itself (optax's outer step starts from the params of
    the previous call, a stale cache); keyword arguments given to ``update`` (the train step's
    ``value=``) reach the inner optimizers whose ``update`` accepts them; ``batch_axis_name``
    (a ``jax.lax.pmean`` axis) is accepted for compatibility and must be ``None``: average the
    gradients across processes in ``grad_fn``. ``torch.optim`` has no SAM; the widely used
    PyTorch implementation (``davda54/sam``) adds ``1e-12`` to the gradient norm.

    Args:
        optimizer: the outer optimizer.
        adv_optimizer: the adversarial optimizer (its update is negated: ascent).
        sync_period: calls per SAM step (``int >= 1``): ``sync_period − 1`` adversarial steps
            and one outer step.
        reset_state: re-initialise ``adv_optimizer``'s state after each outer step.
        opaque_mode: run the adversarial steps inside ``update`` through ``grad_fn``.
        batch_axis_name: must be ``None`` (JAX's ``pmap`` axis has no PyTorch counterpart).

    Example:
        >>> import torch, functrain as ft
        >>> loss = lambda p: (p["w"] ** 2).sum()
        >>> tx = ft.sam(ft.sgd(0.1), ft.chain(ft.normalize(), ft.sgd(0.05)))
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> for _ in range(2):  # an ascent step, then the outer step
        ...     grads = torch.func.grad(loss)(params)
        ...     updates, state = tx.update(grads, state, params)
        ...     params = ft.apply_updates(params, updates)
        >>> params["w"]  # 1 − 0.1·2·(1 + 0.05/√5), −2 − 0.1·2·(−2 − 0.1/√5)
        tensor([ 0.7955, -1.5911])
    """
    _check_transform(optimizer, "optimizer")
    _check_transform(adv_optimizer, "adv_optimizer")
    if isinstance(sync_period, bool) or not isinstance(sync_period, numbers.Integral):
        raise TypeError(f"sync_period must be an int, got {sync_period!r}")
    if sync_period < 1:
        raise ValueError(f"sync_period must be >= 1, got {sync_period!r}")
    if batch_axis_name is not None:
        raise ValueError(
            "batch_axis_name is a jax.lax.pmean axis; it has no PyTorch counterpart: average the "
            "gradients across processes in grad_fn and pass batch_axis_name=None"
        )
    opt_extra = _accepts_extra(optimizer.update)
    adv_extra = _accepts_extra(adv_optimizer.update)

    def init_fn(params: Any) -> SAMState:
        return SAMState(
            steps_since_sync=_utils.zero_count(params),
            opt_state=optimizer.init(params),
            adv_state=adv_optimizer.init(params),
            # A copy: a compiled update guards on inputs that alias each other (it would
            # recompile at every call), and a donating step reuses the old params' memory.
            # Of constants unless differentiated: no graph to nn.Parameters in the state.
            cache=None if opaque_mode else tree.map(_utils.initial_copy, params),
        )

    def negate(updates: Any) -> Any:
        return tree.map(torch.neg, updates)

    def transparent_update(
        updates: Any, state: SAMState, params: Any = None, **extra: Any
    ) -> tuple[Any, SAMState]:
        extra.pop("grad_fn", None)
        if params is None:
            raise ValueError("sam's update needs params (the current, possibly perturbed, ones)")
        # ``cache − params + update`` would broadcast a wrong shape or fail deep in torch.
        tree.check_shapes(updates, params, ("updates", "params"))
        tree.check_shapes(params, state.cache, ("params", "state.cache"))
        # The params (and the cache, a copy of them) are constants unless the update is
        # differentiated: nn.Parameters in a torch-style loop leave no graph in the cache or
        # in the outer update's cache − params. The inner optimizers see the same params.
        params = _utils.constant_tree(params, updates)
        steps = state.steps_since_sync
        first, last = steps == 0, steps == sync_period - 1
        adv_updates, adv_state = _call_update(
            adv_optimizer, adv_extra, updates, state.adv_state, params, extra
        )
        adv_updates = negate(adv_updates)
        # The true weights: the current params on the first call of a period. With
        # sync_period=1 that call is also the outer one, which optax runs from the cache of the
        # previous call (stale: every step restarted from the params before the last update).
        cache = _select(first, params, state.cache)
        opt_updates, opt_state = _call_update(
            optimizer, opt_extra, updates, state.opt_state, cache, extra
        )
        opt_updates = tree.map(lambda c, p, u: c - p + u, cache, params, opt_updates)
        new_updates = _select(last, opt_updates, adv_updates)
        if reset_state:
            adv_state = _select(last, adv_optimizer.init(params), adv_state)
        else:
            adv_state = _select(last, state.adv_state, adv_state)
        opt_state = _select(last, opt_state, state.opt_state)
        steps = torch.remainder(_utils.safe_increment(steps), sync_period).to(steps.dtype)
        return new_updates, SAMState(steps, opt_state, adv_state, cache)

    def opaque_update(
        updates: Any,
        state: SAMState,
        params: Any = None,
        *,
        grad_fn: Callable[[Any, int], Any] | None = None,
        **extra: Any,
    ) -> tuple[Any, SAMState]:
        if grad_fn is None:
            raise ValueError("sam(opaque_mode=True) needs update(..., grad_fn=grad_fn)")
        if params is not None:
            tree.check_shapes(updates, params, ("updates", "params"))
        adv_params, adv_updates, adv_state = params, updates, state.adv_state
        for i in range(sync_period - 1):
            adv_updates, adv_state = _call_update(
                adv_optimizer, adv_extra, adv_updates, adv_state, adv_params, extra
            )
            adv_params = apply_updates(adv_params, negate(adv_updates))
            adv_updates = grad_fn(adv_params, i)
        if reset_state:
            adv_state = adv_optimizer.init(params)
        new_updates, opt_state = _call_update(
            optimizer, opt_extra, adv_updates, state.opt_state, params, extra
        )
        zero = torch.zeros_like(state.steps_since_sync)
        return new_updates, SAMState(zero, opt_state, adv_state, None)

    return GradientTransformation(init_fn, opaque_update if opaque_mode else transparent_update)
