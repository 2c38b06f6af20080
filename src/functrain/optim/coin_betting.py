"""COCOB-Backprop (Orabona & Tommasi, 2017): per-coordinate coin betting, no learning rate.

optax.contrib's ``scale_by_cocob`` and ``cocob``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain._precision import widen_all
from functrain.optim import _ops, _utils, additive, scaling
from functrain.optim._global_stats import _copy, _refuse_complex
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, chain

__all__ = ["COCOBState", "cocob", "scale_by_cocob"]


class COCOBState(NamedTuple):
    """State of :func:`scale_by_cocob`, per leaf: the initial parameters, the negated sum of
    gradients, the largest absolute gradient so far (from ``eps``), the sum of absolute
    gradients and the reward.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_cocob(eps=0.5).init([torch.zeros(2)]).scale
        [tensor([0.5000, 0.5000])]
    """

    init_particles: Any
    cumulative_gradients: Any
    scale: Any
    subgradients: Any
    reward: Any


def scale_by_cocob(alpha: Any = 100.0, eps: Any = 1e-8) -> GradientTransformation:
    """Replaces the updates by COCOB-Backprop's step (Algorithm 2 of Orabona & Tommasi, 2017).

    Per element, with ``x₀`` the initial parameters and ``L`` starting at ``eps``::

        L ← max(L, |g|)     G ← G + |g|     R ← max(R − g · (x − x₀), 0)     C ← C − g
        u = x₀ + C / (L · max(G + L, alpha · L)) · (L + R) − x

    The update moves the parameters to the new bet (descent is built in: do not chain a
    negative learning rate; :func:`cocob` scales the gradients instead). ``update`` needs
    ``params``. ``torch.optim`` has no COCOB.

    Differences from optax: float16/bfloat16 leaves are computed in float32 and rounded once
    (the state keeps the leaves' dtype, and ``L`` is read as at least ``eps``: float16 rounds
    the default ``1e-8`` to 0, where optax bets ``0 / 0 = NaN`` on a zero gradient); complex
    leaves are refused.

    Args:
        alpha: bounds the fraction of the wealth bet early on, ``> 0``.
        eps: the initial ``L``, ``> 0`` (it keeps the first division finite).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_cocob(alpha=1.0)
        >>> params = [torch.tensor([0.0, 0.0])]
        >>> tx.update([torch.tensor([2.0, -1.0])], tx.init(params), params)[0]
        [tensor([-0.5000,  0.5000])]
    """
    for name, value in (("alpha", alpha), ("eps", eps)):
        _ops.refuse_schedule(name, value)
        _utils.check_finite_number(name, value)
        _ops.check_scalar_tensor(name, value)
        if _utils.is_real_number(value) and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")

    def init_fn(params: Any) -> COCOBState:
        _refuse_complex(params, "params", "scale_by_cocob")
        zeros = tree.zeros_like(params)
        return COCOBState(
            init_particles=_copy(params),
            cumulative_gradients=zeros,
            scale=tree.map(lambda x: torch.ones_like(x) * _ops.scalar(eps, x), params),
            subgradients=tree.zeros_like(params),
            reward=tree.zeros_like(params),
        )

    def update_fn(
        updates: Any, state: COCOBState, params: Any = None, **extra: Any
    ) -> tuple[Any, COCOBState]:
        del extra
        if params is None:
            raise ValueError(scaling._NO_PARAMS.format(name="scale_by_cocob"))
        _refuse_complex(updates, "updates", "scale_by_cocob")
        names = ("params", *(f"state.{f}" for f in COCOBState._fields))
        constants = ("params", "state.init_particles")  # functions of the params only
        given, spec, s = _utils.flat(updates, dict(zip(names, (params, *state))), constants)
        if not given:
            return updates, state
        g = widen_all(given)
        x, x0, cum, big, total, reward = (_ops.cast_like(widen_all(s[n]), g) for n in names)
        # L starts at eps and only grows, so flooring it at eps changes nothing, except where
        # the state's dtype rounded eps down: float16 holds 1e-8 as 0, and a zero gradient
        # then bet 0 / 0 = NaN.
        big = [
            torch.maximum(torch.maximum(b, _ops.scalar(eps, b)), a)
            for b, a in zip(big, _foreach.abs(g))
        ]
        total = list(_foreach.add(total, _foreach.abs(g)))
        reward = _foreach.sub(reward, _foreach.mul(g, _foreach.sub(x, x0)))
        reward = [torch.clamp(r, min=0.0) for r in reward]  # NaN stays NaN, as jnp.maximum
        cum = list(_foreach.sub(cum, g))
        # C / (L · max(G + L, alpha · L)) · (L + R), in optax's order of operations.
        bet = _foreach.maximum(_foreach.add(total, big), _ops.mul(big, alpha))
        frac = _foreach.div(cum, _foreach.mul(big, bet))
        out = _foreach.sub(_foreach.add(x0, _foreach.mul(frac, _foreach.add(big, reward))), x)
        state_like = [s[f"state.{f}"] for f in COCOBState._fields[1:]]
        new = COCOBState(
            _utils.retree(state.init_particles, spec, s["state.init_particles"]),
            *(
                tree.unflatten(spec, _ops.cast_like(t, like))
                for t, like in zip((cum, big, total, reward), state_like)
            ),
        )
        return tree.unflatten(spec, _ops.cast_like(list(out), given)), new

    return GradientTransformation(init_fn, update_fn)


def cocob(
    learning_rate: ScalarOrSchedule = 1.0,
    alpha: Any = 100.0,
    eps: Any = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    """COCOB-Backprop, optax.contrib's alias: weight decay, a gradient scale, the bet.

    ``chain(add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate,
    flip_sign=False), scale_by_cocob(alpha, eps))``: the learning rate multiplies the
    gradients COCOB reads (no sign flip: COCOB's update already descends), for example to
    inject a schedule. The update rule is in :func:`scale_by_cocob`.

    Args:
        learning_rate: multiplies the gradients (1 by default): a number, a 0-d tensor or a
            schedule.
        alpha: bounds the fraction of the wealth bet early on, ``> 0``.
        eps: the initial ``L``, ``> 0``.
        weight_decay: L2 penalty added to the gradients.
        mask: where weight decay applies (a pytree of booleans or a callable).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.cocob(alpha=1.0)
        >>> params = [torch.tensor([0.0, 0.0])]
        >>> tx.update([torch.tensor([2.0, -1.0])], tx.init(params), params)[0]
        [tensor([-0.5000,  0.5000])]
    """
    return chain(
        additive.add_decayed_weights(weight_decay, mask),
        scaling.scale_by_learning_rate(learning_rate, flip_sign=False),
        scale_by_cocob(alpha, eps),
    )
