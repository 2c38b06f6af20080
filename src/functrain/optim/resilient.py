"""Rprop: per-element step sizes grown or shrunk by the sign agreement of successive gradients (optax's ``scale_by_rprop``, ``rprop``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils, scaling
from functrain.optim._adam_ops import Hyper, _operands
from functrain.optim.base import GradientTransformation, chain

__all__ = ["ScaleByRpropState", "rprop", "scale_by_rprop"]


class ScaleByRpropState(NamedTuple):
    """State of :func:`scale_by_rprop`: per-element ``step_sizes`` and the last ``prev_updates``.

    ``prev_updates`` holds ``step_size · sign(g)`` of the previous step (0 where the sign
    flipped), as optax; only its sign is read by the next step.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_rprop(0.1).init([torch.zeros(2)]).step_sizes
        [tensor([0.1000, 0.1000])]
    """

    step_sizes: Any
    prev_updates: Any


def _check(
    learning_rate: Any, eta_minus: Any, eta_plus: Any, min_step_size: Any, max_step_size: Any
) -> None:
    for name, value in (
        ("learning_rate", learning_rate),
        ("eta_minus", eta_minus),
        ("eta_plus", eta_plus),
        ("min_step_size", min_step_size),
        ("max_step_size", max_step_size),
    ):
        if callable(value) and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a number or a 0-d tensor (optax takes no schedule)")
        _utils.check_finite_number(name, value, minimum=0.0)
        _ops.check_scalar_tensor(name, value)
    both = _utils.is_real_number(min_step_size) and _utils.is_real_number(max_step_size)
    if both and min_step_size > max_step_size:
        raise ValueError(
            f"min_step_size={min_step_size!r} must not exceed max_step_size={max_step_size!r}"
        )


def _reject_complex(values: Any, name: str, root: str) -> None:
    """Raises ValueError naming the first complex leaf of ``values`` (optax refuses them too)."""
    found = _utils.complex_leaf(values, root)
    if found is not None:
        raise ValueError(
            f"{name} does not support complex leaves (optax neither): {found[0]} is {found[1]}"
        )


def scale_by_rprop(
    learning_rate: Hyper,
    eta_minus: Hyper = 0.5,
    eta_plus: Hyper = 1.2,
    min_step_size: Hyper = 1e-6,
    max_step_size: Hyper = 50.0,
) -> GradientTransformation:
    """Rescales updates by Rprop (Riedmiller and Braun, 1993; the "Rprop−" variant of Igel 2003).

    Update rule, per element, with ``s = g · prev`` (``prev`` the last output)::

        step ← step                                          where s = 0
        step ← clip(step · (eta_plus if s > 0 else eta_minus), min_step_size, max_step_size)
                                                             elsewhere
        u ← 0 where s < 0, else step · sign(g)
        prev ← u

    The output is the *ascent* direction; :func:`rprop` negates it.

    Difference from optax 0.2.8: optax's ``update`` returns the *previous* step's ``prev``
    (a one-step-stale update, zeros at the first step; optax pull request 1725). This returns
    the current one, as the algorithm and ``torch.optim.Rprop``; the state is the same.

    Differences from ``torch.optim.Rprop``: PyTorch clips the step size at every step, also
    where ``s = 0`` (so a ``learning_rate`` outside ``[min_step_size, max_step_size]`` is
    clipped at the first step; here, as in optax, it is kept until the first sign test). With
    the learning rate inside the bounds the two trajectories coincide. Complex leaves are
    refused (PyTorch treats them as pairs of reals).

    float16 and bfloat16 leaves are computed in float32 and rounded once; the state keeps the
    parameters' dtypes.

    Args:
        learning_rate: the initial step size of every element (a number or a 0-d tensor).
        eta_minus: factor applied to the step size where the gradient changes sign.
        eta_plus: factor applied to the step size where the gradient keeps its sign.
        min_step_size: lower bound of the step sizes.
        max_step_size: upper bound of the step sizes.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_rprop(0.1)
        >>> state = tx.init([torch.zeros(2)])
        >>> u, state = tx.update([torch.tensor([1.0, -2.0])], state)
        >>> u, state = tx.update([torch.tensor([3.0, 2.0])], state)
        >>> u
        [tensor([0.1200, 0.0000])]
    """
    _check(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size)

    def init_fn(params: Any) -> ScaleByRpropState:
        _reject_complex(params, "scale_by_rprop", "params")
        zeros = tree.zeros_like(params)
        steps = tree.map(lambda z: z + _ops.scalar(learning_rate, z), zeros)
        return ScaleByRpropState(step_sizes=steps, prev_updates=zeros)

    def update_fn(
        updates: Any, state: ScaleByRpropState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByRpropState]:
        del params, extra
        g, spec, s = _utils.flat(
            updates,
            {"state.step_sizes": state.step_sizes, "state.prev_updates": state.prev_updates},
        )
        if not g:
            return updates, state
        if any(x.is_complex() for x in g):
            _reject_complex(updates, "scale_by_rprop", "updates")
        old_steps, prev = s["state.step_sizes"], s["state.prev_updates"]
        g32 = _operands(g, old_steps, prev)
        prev32, steps32 = _ops.cast_like(prev, g32), _ops.cast_like(old_steps, g32)
        agree = list(_foreach.mul(g32, prev32))  # only its sign is used
        steps, out = [], []
        for a, x, st in zip(agree, g32, steps32):
            # Numbers stay Python scalars (no host-to-device copy); 0-d tensors are moved.
            up, down = st * _ops.on_device(eta_plus, x), st * _ops.on_device(eta_minus, x)
            grown = torch.clamp_min(torch.where(a > 0, up, down), _ops.on_device(min_step_size, x))
            grown = torch.clamp_max(grown, _ops.on_device(max_step_size, x)).to(x.dtype)
            new_step = torch.where(a == 0, st, grown)
            steps.append(new_step)
            out.append(torch.where(a < 0, torch.zeros_like(x), new_step * torch.sign(x)))
        out = _ops.cast_like(out, g)
        kept = _ops.cast_like(out, prev)
        new_state = ScaleByRpropState(
            step_sizes=tree.unflatten(spec, _ops.cast_like(steps, old_steps)),
            prev_updates=tree.unflatten(spec, kept),
        )
        # prev_updates is the update itself: return a copy (see _ops.unshared).
        return tree.unflatten(spec, _ops.unshared(out, kept)), new_state

    return GradientTransformation(init_fn, update_fn)


def rprop(
    learning_rate: Hyper,
    eta_minus: Hyper = 0.5,
    eta_plus: Hyper = 1.2,
    min_step_size: Hyper = 1e-6,
    max_step_size: Hyper = 50.0,
) -> GradientTransformation:
    """The Rprop optimizer: :func:`scale_by_rprop` followed by a sign flip (descent).

    Each element moves by its own step size against the sign of its gradient; the step size
    grows by ``eta_plus`` while the sign holds and shrinks by ``eta_minus`` when it flips (and
    that step is skipped). See :func:`scale_by_rprop` for the rule and the differences from
    ``torch.optim.Rprop`` (same trajectory when ``learning_rate`` lies within the step-size
    bounds).

    Args:
        learning_rate: the initial step size (a number or a 0-d tensor; no schedule, as optax).
        eta_minus: factor applied to the step size where the gradient changes sign.
        eta_plus: factor applied to the step size where the gradient keeps its sign.
        min_step_size: lower bound of the step sizes.
        max_step_size: upper bound of the step sizes.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.rprop(0.1)
        >>> params = [torch.ones(2)]
        >>> u, _ = tx.update([torch.tensor([2.0, -0.5])], tx.init(params), params)
        >>> ft.apply_updates(params, u)
        [tensor([0.9000, 1.1000])]
    """
    return chain(
        scale_by_rprop(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size),
        scaling.scale(-1.0),
    )
