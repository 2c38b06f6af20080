"""Optimistic gradient descent and the Fromage optimizer (optax's ``scale_by_optimistic_gradient``, ``optimistic_gradient_descent``, ``optimistic_adam``, ``fromage``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _ops, _utils, adaptive, additive, scaling
from functrain.optim._adam_ops import Hyper
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, chain

__all__ = [
    "ScaleByOptimisticGradientState",
    "fromage",
    "optimistic_adam",
    "optimistic_adam_v2",
    "optimistic_gradient_descent",
    "scale_by_optimistic_gradient",
]


class ScaleByOptimisticGradientState(NamedTuple):
    """State of :func:`scale_by_optimistic_gradient`: the boolean ``is_initial_step`` and the
    ``previous_gradient`` (the last input update, in the parameters' dtype).

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_optimistic_gradient().init([torch.zeros(1)]).is_initial_step
        tensor(True)
    """

    is_initial_step: torch.Tensor
    previous_gradient: Any


def _check_number(name: str, value: Any) -> None:
    if callable(value) and not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a number or a 0-d tensor, not a schedule (as optax)")
    _utils.check_finite_number(name, value)
    _ops.check_scalar_tensor(name, value)


def scale_by_optimistic_gradient(alpha: Hyper = 1.0, beta: Hyper = 1.0) -> GradientTransformation:
    """Rescales updates to generalised optimistic gradients (Mokhtari et al., 2019).

    Update rule, with ``g₀`` taken as ``g₁`` at the first step (optax issue 1082)::

        u ← (alpha + beta) · gₜ − beta · gₜ₋₁

    ``torch.optim`` has no equivalent.

    Args:
        alpha: coefficient of the current gradient.
        beta: coefficient of the negative momentum (the previous gradient).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_optimistic_gradient()
        >>> state = tx.init([torch.zeros(1)])
        >>> u, state = tx.update([torch.tensor([1.0])], state)  # 2·1 − 1·1
        >>> tx.update([torch.tensor([3.0])], state)[0]  # 2·3 − 1·1
        [tensor([5.])]
    """
    _check_number("alpha", alpha)
    _check_number("beta", beta)

    def init_fn(params: Any) -> ScaleByOptimisticGradientState:
        return ScaleByOptimisticGradientState(
            is_initial_step=torch.ones((), dtype=torch.bool, device=_utils.default_device(params)),
            previous_gradient=tree.zeros_like(params),
        )

    def update_fn(
        updates: Any, state: ScaleByOptimisticGradientState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByOptimisticGradientState]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.previous_gradient": state.previous_gradient})
        done = torch.zeros_like(state.is_initial_step)
        if not g:
            return updates, ScaleByOptimisticGradientState(done, state.previous_gradient)
        old = s["state.previous_gradient"]
        prev = [torch.where(state.is_initial_step, x, p.to(x.dtype)) for x, p in zip(g, old)]
        a, b = _ops.on_device(alpha, g[0]), _ops.on_device(beta, g[0])
        out = _ops.cast_like(_ops.add_scaled(_ops.mul(g, a + b), -b, prev), g)
        # A copy: the state must not alias the caller's gradient buffers.
        kept = tree.unflatten(spec, [x.to(p.dtype, copy=True) for x, p in zip(g, old)])
        return tree.unflatten(spec, out), ScaleByOptimisticGradientState(done, kept)

    return GradientTransformation(init_fn, update_fn)


def optimistic_gradient_descent(
    learning_rate: ScalarOrSchedule, alpha: Hyper = 1.0, beta: Hyper = 1.0
) -> GradientTransformation:
    """Optimistic gradient descent: ``w ← w − lr · ((alpha + beta) · gₜ − beta · gₜ₋₁)``.

    An approximation of extra-gradient methods with last-iterate convergence in min-max games
    (Mokhtari et al., 2019); see :func:`scale_by_optimistic_gradient`. ``alpha`` and ``beta``
    are numbers or 0-d tensors (optax's signature admits schedules, but its transform fails on
    them). ``torch.optim`` has no equivalent.

    Args:
        learning_rate: the step size: a number, a 0-d tensor or a schedule of the step count.
        alpha: coefficient of the current gradient.
        beta: coefficient of the negative momentum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.optimistic_gradient_descent(0.1)
        >>> params = [torch.ones(1)]
        >>> u, _ = tx.update([torch.ones(1)], tx.init(params), params)
        >>> ft.apply_updates(params, u)
        [tensor([0.9000])]
    """
    return chain(
        scale_by_optimistic_gradient(alpha=alpha, beta=beta),
        scaling.scale_by_learning_rate(learning_rate),
    )


def optimistic_adam(
    learning_rate: Hyper,
    optimism: Hyper | None = None,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = True,
) -> GradientTransformation:
    """Optimistic Adam (Daskalakis et al., 2017): Adam's direction ``r`` made optimistic.

    Update rule, with ``r`` the (by default Nesterov) Adam direction of :func:`scale_by_adam`::

        u ← −(learning_rate + optimism) · rₜ + optimism · rₜ₋₁   (r₀ = r₁)

    ``optimism`` defaults to ``learning_rate``. As optax's (deprecated there in favour of
    ``optimistic_adam_v2``, which functrain does not have) it takes no learning-rate schedule;
    unlike optax it emits no DeprecationWarning. ``torch.optim`` has no equivalent.

    Args:
        learning_rate: the step size (a number or a 0-d tensor).
        optimism: the weight of the optimistic correction (``None``: ``learning_rate``).
        b1: Adam's first-moment decay.
        b2: Adam's second-moment decay.
        eps: Adam's epsilon outside the square root.
        eps_root: Adam's epsilon inside the square root.
        mu_dtype: optional dtype in which Adam's first moment is stored.
        nesterov: use Nesterov's (NAdam) first moment.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.optimistic_adam(0.1, nesterov=False)
        >>> params = [torch.zeros(1)]
        >>> u, _ = tx.update([torch.ones(1)], tx.init(params), params)
        >>> u  # r₁ = 1: −(0.1 + 0.1)·1 + 0.1·1 at the first step
        [tensor([-0.1000])]
    """
    if callable(learning_rate) and not isinstance(learning_rate, torch.Tensor):
        raise ValueError(
            "optimistic_adam takes no learning-rate schedule (as optax's optimistic_adam)"
        )
    if optimism is None:
        optimism = learning_rate
    return chain(
        adaptive.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        scale_by_optimistic_gradient(alpha=learning_rate, beta=optimism),
        scaling.scale_by_learning_rate(1.0),  # flips the sign
    )


def optimistic_adam_v2(
    learning_rate: ScalarOrSchedule,
    *,
    alpha: Hyper = 1.0,
    beta: Hyper = 1.0,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 0.0,
    mu_dtype: torch.dtype | None = None,
    nesterov: bool = True,
) -> GradientTransformation:
    """Optimistic Adam with optax's reworked interface: the optimism parameters ``alpha`` and
    ``beta`` apart from the learning rate, which may be a schedule.

    Update rule, with Adam's bias-corrected direction ``r``::

        u = −lr · (alpha · rₜ + beta · (rₜ − rₜ₋₁))

    that is ``chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
    scale_by_optimistic_gradient(alpha, beta), scale_by_learning_rate(learning_rate))``, as
    optax's ``optimistic_adam_v2``. ``torch.optim`` has no equivalent.

    Args:
        learning_rate: the step size: a number, a 0-d tensor or a schedule.
        alpha: the weight of the current direction.
        beta: the weight of the change of direction (the optimism).
        b1: Adam's first-moment decay.
        b2: Adam's second-moment decay.
        eps: Adam's epsilon outside the square root.
        eps_root: Adam's epsilon inside the square root.
        mu_dtype: optional dtype in which Adam's first moment is stored.
        nesterov: use Nesterov's (NAdam) first moment.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.optimistic_adam_v2(0.1, alpha=1.0, beta=1.0, nesterov=False)
        >>> params = [torch.zeros(1)]
        >>> u, _ = tx.update([torch.ones(1)], tx.init(params), params)
        >>> u  # r₁ = 1, and no change of direction at the first step: −0.1 · 1
        [tensor([-0.1000])]
    """
    return chain(
        adaptive.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        scale_by_optimistic_gradient(alpha=alpha, beta=beta),
        scaling.scale_by_learning_rate(learning_rate),
    )


def fromage(learning_rate: ScalarOrSchedule, min_norm: Hyper = 1e-6) -> GradientTransformation:
    """Fromage (Bernstein et al., 2020): Frobenius-matched descent under deep relative trust.

    Update rule, per leaf, with ``m = 1 / √(1 + lr²)``::

        u ← −lr · m · (‖p‖ / ‖g‖) · g + (m − 1) · p       (norms clipped below at min_norm)

    that is :func:`scale_by_trust_ratio` (``min_norm``), the learning rate ``lr · m`` and
    :func:`add_decayed_weights` (``m − 1``), as optax. ``torch.optim`` has no equivalent.

    Args:
        learning_rate: a number, a 0-d tensor or a schedule of the step count.
        min_norm: lower bound of the gradient and parameter norms in the trust ratio.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.fromage(0.5)
        >>> params = [torch.tensor([3.0, 4.0])]
        >>> u, _ = tx.update([torch.tensor([0.6, 0.8])], tx.init(params), params)
        >>> ft.apply_updates(params, u)  # (p − 0.5·p) / √1.25
        [tensor([1.3416, 1.7889])]
    """
    if not callable(learning_rate) or isinstance(learning_rate, torch.Tensor):
        _utils.check_finite_number("learning_rate", learning_rate)
        _ops.check_scalar_tensor("learning_rate", learning_rate)
        mult = _mult(learning_rate)
        return chain(
            scaling.scale_by_trust_ratio(min_norm),
            scaling.scale_by_learning_rate(learning_rate * mult),
            additive.add_decayed_weights(mult - 1),
        )

    def mult_lr(count: Any) -> Any:
        return _mult(learning_rate(count))

    return chain(
        scaling.scale_by_trust_ratio(min_norm),
        scaling.scale_by_learning_rate(lambda c: mult_lr(c) * learning_rate(c)),
        additive.add_decayed_weights(lambda c: mult_lr(c) - 1),
    )


def _mult(lr: Any) -> Any:
    """``1 / √(1 + lr²)`` for a number or a tensor."""
    if isinstance(lr, torch.Tensor):
        return 1 / (1 + lr * lr).sqrt()
    return 1 / (1 + lr**2) ** 0.5
