"""Sophia: clipped, diagonally preconditioned Newton steps, as in optax.contrib 0.2.8 (its
default Hessian-diagonal estimator, Hutchinson's, is in :mod:`functrain.optim.hessian_diagonal`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils, additive, scaling
from functrain.optim._adam_ops import Hyper, _bias, _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, _accepts_extra, _call_update, chain
from functrain.optim.conditional import _select
from functrain.optim.hessian_diagonal import _HUTCHINSON, hutchinson_estimator_diag_hessian

__all__ = ["SophiaState", "scale_by_sophia", "sophia"]


class SophiaState(NamedTuple):
    """State of :func:`scale_by_sophia`: the int32 step ``count``, the momentum ``mu``, the
    moving average ``nu`` of the Hessian diagonal and the estimator's state.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_sophia().init([torch.zeros(1)]).nu
        [tensor([0.])]
    """

    count: torch.Tensor
    mu: Any
    nu: Any
    hessian_fn_state: Any


def _check_interval(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex:
            raise ValueError(f"{name} must be a positive int or a 0-d integer tensor")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def scale_by_sophia(
    b1: Hyper = 0.965,
    b2: Hyper = 0.99,
    eps: Hyper = 1e-8,
    gamma: Hyper = 0.01,
    clip_threshold: Hyper | None = 1.0,
    update_interval: int | torch.Tensor = 10,
    hessian_diagonal_fn: GradientTransformation | None = _HUTCHINSON,
    mu_dtype: torch.dtype | None = None,
    verbose: bool = False,
    print_win_rate_every_n_steps: int = 0,
    *,
    refresh_on_host: bool = False,
) -> GradientTransformation:
    """Rescales updates by Sophia (Liu et al., 2023): momentum over a clipped Hessian diagonal.

    Update rule (``t`` the step after increment, ``h`` the Hessian-diagonal estimate)::

        mu ← b1 · mu + (1 − b1) · g
        u = clip(mu / (1 − b1ᵗ) / max(gamma · nu, eps), −clip_threshold, clip_threshold)
        nu ← b2 · nu + (1 − b2) · h      (only when (t − 1) mod update_interval = 0)

    ``u`` uses the ``nu`` from before this step; ``nu`` starts at zero, so the first update is
    ``±clip_threshold`` in the gradient's sign. ``h`` is ``hessian_diagonal_fn``'s output: its
    ``update(grads, state, params, **extra)`` receives every keyword given to this ``update``
    (the default, :func:`hutchinson_estimator_diag_hessian`, needs ``obj_fn=``).

    Two ways to refresh, with the same numbers (bit for bit) and the same state, the
    estimator's key included:

    * ``refresh_on_host=False`` (the default): no host reads. The estimate is computed at
      every step and ``torch.where`` keeps it (and the estimator's new state) on the refresh
      steps only, as optax's ``lax.cond`` under ``vmap``. The cost is one estimate (about two
      gradients for Hutchinson's) per step, not per ``update_interval`` steps: on a 2-core
      CPU, a step of Sophia-H (gradient and update) on a 64-256-10 MLP takes about 3.4 ms
      against 0.8 ms for AdamW's.
    * ``refresh_on_host=True``: eager ``update`` reads the refresh condition on the host (one
      scalar read per step: a device synchronisation on CUDA, free on CPU) and calls
      ``hessian_diagonal_fn`` (so ``obj_fn``) on refresh steps only; the other steps cost
      about as much as AdamW's (0.9 ms above, 1.2 ms on average over refresh steps and
      others with ``update_interval=10``). Recommended for eager training wherever a sync
      per step is acceptable. Under ``torch.compile`` (``torch.compiler.is_compiling()``)
      and under ``torch.func`` transforms it falls back to the default path, so it adds no
      graph break.

    float16 and bfloat16 leaves are computed in float32 and rounded once, as in
    :func:`scale_by_adam`; ``mu`` keeps ``mu_dtype``, ``nu`` the parameters' dtypes, and the
    updates keep their own dtype (optax promotes them to a wider ``mu_dtype``). Complex leaves
    are refused. ``torch.optim`` has no Sophia; optax 0.2.8 defines ``scale_by_sophia`` in
    ``optax.contrib._sophia`` without exporting it.

    Args:
        b1: decay of the momentum, in ``[0, 1)``.
        b2: decay of the Hessian-diagonal average, in ``[0, 1]``; per refresh, so the
            effective decay per step is about ``1 − (1 − b2) / update_interval``.
        eps: floor of the denominator.
        gamma: scale of the Hessian diagonal in the denominator.
        clip_threshold: bound on each element of the update; ``None`` for no clipping.
        update_interval: refresh ``nu`` every this many steps (the first step included).
        hessian_diagonal_fn: a transform returning the Hessian diagonal (a tree like the
            updates); the default (or ``None``) is :func:`hutchinson_estimator_diag_hessian` with
            seed 0, as optax's.
        mu_dtype: optional dtype in which the momentum is stored.
        verbose: print the win rate (the fraction of unclipped elements) every
            ``print_win_rate_every_n_steps`` steps. This reads the device (a host sync) and
            cannot be traced: a diagnostic for eager runs only.
        print_win_rate_every_n_steps: how often ``verbose`` prints; 0 prints never.
        refresh_on_host: read the refresh condition on the host and estimate the Hessian
            diagonal on refresh steps only (eager mode; see above). Keyword-only: a
            functrain extension.

    Example:
        >>> import torch, functrain as ft
        >>> exact = ft.stateless(lambda u, p: {"w": torch.tensor([2.0, 200.0])})  # diag(H)
        >>> tx = ft.scale_by_sophia(b1=0.0, b2=0.0, hessian_diagonal_fn=exact)
        >>> params, g = {"w": torch.ones(2)}, {"w": torch.tensor([0.01, 0.01])}
        >>> state = tx.init(params)
        >>> u, state = tx.update(g, state, params)  # nu was 0: clipped
        >>> u["w"]
        tensor([1., 1.])
        >>> tx.update(g, state, params)[0]["w"]  # g / (gamma * diag(H))
        tensor([0.5000, 0.0050])
    """
    _ops.check_decay("b1", b1)
    _ops.check_decay("b2", b2, allow_one=True)
    for name, value in (("eps", eps), ("gamma", gamma)):
        _ops.refuse_schedule(name, value)
        _ops.check_scalar_tensor(name, value)
        _utils.check_finite_number(name, value, minimum=0.0)
    if clip_threshold is not None:
        _ops.refuse_schedule("clip_threshold", clip_threshold)
        _ops.check_scalar_tensor("clip_threshold", clip_threshold)
        _utils.check_finite_number("clip_threshold", clip_threshold, minimum=0.0)
    _check_interval("update_interval", update_interval)
    _ops.check_dtype("mu_dtype", mu_dtype)
    if isinstance(print_win_rate_every_n_steps, bool) or not isinstance(
        print_win_rate_every_n_steps, int
    ):
        raise TypeError(
            f"print_win_rate_every_n_steps must be an int, got {print_win_rate_every_n_steps!r}"
        )
    if print_win_rate_every_n_steps < 0:
        raise ValueError(
            f"print_win_rate_every_n_steps must be >= 0, got {print_win_rate_every_n_steps}"
        )
    if hessian_diagonal_fn is None:
        hessian_diagonal_fn = hutchinson_estimator_diag_hessian()
    if not (hasattr(hessian_diagonal_fn, "init") and hasattr(hessian_diagonal_fn, "update")):
        raise TypeError(
            "hessian_diagonal_fn must be a GradientTransformation, got "
            f"{type(hessian_diagonal_fn).__name__}"
        )
    if not isinstance(refresh_on_host, bool):
        raise TypeError(f"refresh_on_host must be a bool, got {refresh_on_host!r}")
    hess = hessian_diagonal_fn
    hess_extra = _accepts_extra(hess.update)

    def init_fn(params: Any) -> SophiaState:
        return SophiaState(
            count=_utils.zero_count(params),
            mu=_ops.state_zeros(params, mu_dtype, "mu_dtype"),
            nu=tree.zeros_like(params),
            hessian_fn_state=hess.init(params),
        )

    def update_fn(
        updates: Any, state: SophiaState, params: Any = None, **extra: Any
    ) -> tuple[Any, SophiaState]:
        if params is None:
            raise ValueError("scale_by_sophia needs params: call update(updates, state, params)")
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu, "state.nu": state.nu})
        if any(x.is_complex() for x in g):
            path, dtype = _utils.complex_leaf(updates, "updates")
            raise TypeError(f"scale_by_sophia: {path} is {dtype}; complex is not supported")
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, state._replace(count=count)
        mu_old, nu_old = s["state.mu"], s["state.nu"]
        g, given = _operands(g, mu_old, nu_old), g
        mu = _ops.moment(g, mu_old, b1)
        mu_hat = _ops.div(mu, _bias(b1, count, _ops.scalar_dtype(g)))
        den = _ops.mul(_ops.cast_like(nu_old, g), gamma)
        if isinstance(eps, torch.Tensor):
            den = [torch.clamp_min(d, _ops.on_device(eps, d).to(d.dtype)) for d in den]
        elif _foreach._transforms_active():  # the foreach kernel has no vmap batching rule
            den = [torch.clamp_min(d, eps) for d in den]
        else:
            torch._foreach_clamp_min_(den, eps)  # fresh tensors; NaN stays NaN, as jnp.maximum
        out = list(_foreach.div(mu_hat, den))
        if clip_threshold is not None:
            c = _ops.on_device(clip_threshold, out[0])
            if verbose and print_win_rate_every_n_steps > 0:
                _print_win_rate(out, c, count, print_win_rate_every_n_steps)
            out = [torch.clamp(u, -c, c) for u in out]

        # By default the estimate at every step, kept on refresh steps only (no host read).
        refresh = state.count % _ops.on_device(update_interval, state.count) == 0
        if refresh_on_host and not _traced() and not bool(refresh):
            # Opt-in host read (eager only): what the torch.where below keeps on a step
            # that is not a refresh is exactly the old nu and estimator state.
            new_state = SophiaState(
                count=count,
                mu=tree.unflatten(spec, _ops.cast_like(mu, mu_old)),
                nu=tree.unflatten(spec, nu_old),
                hessian_fn_state=state.hessian_fn_state,
            )
            return tree.unflatten(spec, _ops.cast_like(out, given)), new_state
        diag, hess_state = _call_update(
            hess, hess_extra, updates, state.hessian_fn_state, params, extra
        )
        h = _utils.flat(updates, {"hessian diagonal": diag})[2]["hessian diagonal"]
        nu_new = _ops.moment(_ops.cast_like(h, g), _ops.cast_like(nu_old, g), b2)
        nu = [torch.where(refresh, n.to(o.dtype), o) for n, o in zip(nu_new, nu_old)]
        new_state = SophiaState(
            count=count,
            mu=tree.unflatten(spec, _ops.cast_like(mu, mu_old)),
            nu=tree.unflatten(spec, nu),
            hessian_fn_state=_select(refresh, hess_state, state.hessian_fn_state),
        )
        return tree.unflatten(spec, _ops.cast_like(out, given)), new_state

    return GradientTransformation(init_fn, update_fn)


def _traced() -> bool:
    """Whether values cannot be read on the host: under ``torch.compile`` or ``torch.func``."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _print_win_rate(out: list[torch.Tensor], c: Any, count: torch.Tensor, every: int) -> None:
    """Prints the fraction of update elements below the clip threshold (reads the device)."""
    if int(count) % every:
        return
    kept = sum(int((u.abs() < c).sum()) for u in out)
    total = sum(u.numel() for u in out)
    print(f"Sophia optimizer win rate: {kept / max(total, 1)}")


def sophia(
    learning_rate: ScalarOrSchedule,
    b1: Hyper = 0.965,
    b2: Hyper = 0.99,
    eps: Hyper = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    weight_decay_mask: Any | Callable[[Any], Any] | None = None,
    gamma: Hyper = 0.01,
    clip_threshold: Hyper | None = 1.0,
    update_interval: int | torch.Tensor = 10,
    hessian_diagonal_fn: GradientTransformation | None = _HUTCHINSON,
    mu_dtype: torch.dtype | None = None,
    verbose: bool = False,
    print_win_rate_every_n_steps: int = 0,
    *,
    refresh_on_host: bool = False,
) -> GradientTransformation:
    """Sophia (Liu et al., 2023): clipped steps preconditioned by a Hessian-diagonal average.

    ``u = −lr · (scale_by_sophia(g) + weight_decay · p)``: :func:`scale_by_sophia`, then
    decoupled weight decay (masked by ``weight_decay_mask``), then the learning rate.

    The default estimator (Hutchinson's, "Sophia-H") needs the objective at every update:
    ``tx.update(grads, state, params, obj_fn=lambda p: loss_fn(p, batch))``, where
    ``obj_fn(params)`` returns the scalar loss of the current batch. Every keyword given to
    ``update`` reaches ``hessian_diagonal_fn``. :func:`functrain.train.make_train_step`
    passes only ``value=`` (the loss value), so use Sophia-H from a pure loop (below), or give
    a ``hessian_diagonal_fn`` that needs no objective (e.g. ``ft.stateless(lambda g, p:
    ft.tree.map(torch.square, g))``, a Gauss-Newton-like diagonal from the gradient). The
    estimator must average across devices itself when data is sharded. ``torch.optim`` has no
    Sophia.

    Args:
        learning_rate: the step size: a number, a 0-d tensor or a schedule of the step count.
        b1: decay of the momentum, in ``[0, 1)``.
        b2: decay of the Hessian-diagonal average per refresh, in ``[0, 1]``.
        eps: floor of the denominator.
        weight_decay: decoupled weight decay (multiplied by the learning rate).
        weight_decay_mask: pytree of booleans like the params (or a callable returning one):
            where weight decay applies.
        gamma: scale of the Hessian diagonal in the denominator.
        clip_threshold: bound on each element of the preconditioned step; ``None``: no clip.
        update_interval: refresh the Hessian-diagonal average every this many steps.
        hessian_diagonal_fn: the estimator transform (default: Hutchinson's, seed 0).
        mu_dtype: optional dtype in which the momentum is stored.
        verbose: print the win rate (eager only; reads the device).
        print_win_rate_every_n_steps: how often ``verbose`` prints; 0 prints never.
        refresh_on_host: estimate the Hessian diagonal on refresh steps only, reading the
            step count on the host: far cheaper in eager training, at one host sync per step
            on CUDA (see :func:`scale_by_sophia`).

    Example:
        >>> import torch, functrain as ft
        >>> a = torch.tensor([1.0, 10.0])
        >>> loss = lambda p: (a * p["w"] ** 2).sum()
        >>> params = {"w": torch.tensor([1.0, 1.0])}
        >>> tx = ft.sophia(0.5, b1=0.5, b2=0.5, gamma=1.0, update_interval=1, weight_decay=0.0)
        >>> state = tx.init(params)
        >>> for _ in range(20):
        ...     grads = torch.func.grad(loss)(params)
        ...     u, state = tx.update(grads, state, params, obj_fn=loss)
        ...     params = ft.apply_updates(params, u)
        >>> bool(loss(params) < 1e-3)
        True
    """
    return chain(
        scale_by_sophia(
            b1=b1,
            b2=b2,
            eps=eps,
            gamma=gamma,
            clip_threshold=clip_threshold,
            update_interval=update_interval,
            hessian_diagonal_fn=hessian_diagonal_fn,
            mu_dtype=mu_dtype,
            verbose=verbose,
            print_win_rate_every_n_steps=print_win_rate_every_n_steps,
            refresh_on_host=refresh_on_host,
        ),
        additive.add_decayed_weights(weight_decay, weight_decay_mask),
        scaling.scale_by_learning_rate(learning_rate),
    )
