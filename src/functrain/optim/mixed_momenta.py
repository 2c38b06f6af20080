"""AdEMAMix: Adam with a mixture of a fast and a slow momentum (optax.contrib's ``scale_by_ademamix``, ``ademamix`` and their simplified variants)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils
from functrain.optim._adam_ops import Hyper, _bias, _check, _denominator, _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.additive import add_decayed_weights
from functrain.optim.base import GradientTransformation, chain
from functrain.optim.scaling import scale_by_learning_rate

__all__ = [
    "ScaleByAdemamixState",
    "ScaleBySimplifiedAdEMAMixState",
    "ademamix",
    "scale_by_ademamix",
    "scale_by_simplified_ademamix",
    "simplified_ademamix",
]


class ScaleByAdemamixState(NamedTuple):
    """State of :func:`scale_by_ademamix`: the int32 step counts ``count`` (of the fast moment
    and the second moment) and ``count_m2`` (of the slow moment, which ``b3`` and ``alpha``
    schedules read), the fast and slow momenta ``m1``, ``m2`` and the second moment ``nu``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_ademamix().init([torch.zeros(1)]).m2
        [tensor([0.])]
    """

    count: torch.Tensor
    count_m2: torch.Tensor
    m1: Any
    m2: Any
    nu: Any


def scale_by_ademamix(
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 6.0,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 0.0,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rescales updates by AdEMAMix (Pagliardini et al., 2024): Adam whose numerator adds a
    slow, uncorrected momentum to the fast one.

    Update rule, at step ``t`` (from 1)::

        m1 ← b1 · m1 + (1 − b1) · g
        m2 ← b3 · m2 + (1 − b3) · g          (no bias correction: it fills slowly)
        nu ← b2 · nu + (1 − b2) · |g|²
        u  = (m1 / (1 − b1ᵗ) + alpha · m2) / (√(nu / (1 − b2ᵗ) + eps_root) + eps)

    ``b3`` and ``alpha`` may be schedules of ``count_m2`` (the paper warms both up).
    float16 and bfloat16 leaves are computed in float32 and rounded once, as in
    :func:`scale_by_adam`. As in optax, ``mu_dtype`` is the dtype of all three moments.
    ``torch.optim`` has no AdEMAMix.

    Args:
        b1: decay of the fast momentum, in ``[0, 1)``.
        b2: decay of the second moment, in ``[0, 1)``.
        b3: decay of the slow momentum, in ``[0, 1]``: a number, 0-d tensor or schedule.
        alpha: weight of the slow momentum: a number, 0-d tensor or schedule.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root.
        mu_dtype: optional dtype in which the moments are stored.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_ademamix(alpha=1.0)
        >>> params = [torch.zeros(2)]
        >>> tx.update([torch.tensor([2.0, -2.0])], tx.init(params))[0]
        [tensor([ 1.0001, -1.0001])]
    """
    _check(b1, b2, eps, eps_root, mu_dtype)
    _ops.check_decay("b3", b3, allow_one=True, allow_schedule=True)
    _utils.check_finite_number("alpha", alpha)
    _ops.check_scalar_tensor("alpha", alpha)

    def init_fn(params: Any) -> ScaleByAdemamixState:
        return ScaleByAdemamixState(
            count=_utils.zero_count(params),
            count_m2=_utils.zero_count(params),
            m1=_ops.state_zeros(params, mu_dtype, "mu_dtype"),
            m2=_ops.state_zeros(params, mu_dtype, "mu_dtype"),
            nu=_ops.state_zeros(params, mu_dtype, "mu_dtype"),
        )

    def update_fn(
        updates: Any, state: ScaleByAdemamixState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdemamixState]:
        del params, extra
        g, spec, s = _utils.flat(
            updates, {"state.m1": state.m1, "state.m2": state.m2, "state.nu": state.nu}
        )
        c_b3 = _utils.resolve(b3, state.count_m2)
        c_alpha = _utils.resolve(alpha, state.count_m2)
        count = _utils.safe_increment(state.count)
        count_m2 = _utils.safe_increment(state.count_m2)
        if not g:
            return updates, ScaleByAdemamixState(count, count_m2, state.m1, state.m2, state.nu)
        m1_s, m2_s, nu_s = s["state.m1"], s["state.m2"], s["state.nu"]
        x = _operands(g, m1_s, m2_s, nu_s)
        m1 = _ops.moment(x, m1_s, b1)
        m2 = _ops.moment(x, m2_s, c_b3)
        nu = _ops.moment_sq(x, nu_s, b2)
        dtype = _ops.scalar_dtype(x)
        num = _ops.add_scaled(_ops.div(m1, _bias(b1, count, dtype)), c_alpha, m2)
        denom = _denominator(_ops.div(nu, _bias(b2, count, dtype)), eps, eps_root)
        out = _ops.cast_like(list(_foreach.div(num, denom)), g)
        new = ScaleByAdemamixState(
            count,
            count_m2,
            tree.unflatten(spec, _ops.cast_like(m1, m1_s)),
            tree.unflatten(spec, _ops.cast_like(m2, m2_s)),
            tree.unflatten(spec, _ops.cast_like(nu, nu_s)),
        )
        return tree.unflatten(spec, out), new

    return GradientTransformation(init_fn, update_fn)


def ademamix(
    learning_rate: ScalarOrSchedule,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 0.0,
    mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    """AdEMAMix (Pagliardini et al., 2024): AdamW with a mixture of a fast and a slow momentum.

    Update rule: ``u = −lr · (scale_by_ademamix(g) + weight_decay · p)`` (see
    :func:`scale_by_ademamix`). Note the defaults, as optax's: ``alpha=5.0`` here but ``6.0``
    in :func:`scale_by_ademamix`, and no weight decay. ``torch.optim`` has no AdEMAMix.

    Args:
        learning_rate: the step size: a number, a 0-d tensor or a schedule of the step count.
        b1: decay of the fast momentum, in ``[0, 1)``.
        b2: decay of the second moment, in ``[0, 1)``.
        b3: decay of the slow momentum: a number, 0-d tensor or schedule.
        alpha: weight of the slow momentum: a number, 0-d tensor or schedule.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root.
        mu_dtype: optional dtype in which the moments are stored.
        weight_decay: decoupled weight decay (multiplied by the learning rate).
        mask: pytree of booleans like the params, or a callable returning one: where weight
            decay applies.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.ademamix(0.1)
        >>> params = [torch.ones(2)]
        >>> tx.update([torch.ones(2)], tx.init(params), params)[0]
        [tensor([-0.1000, -0.1000])]
    """
    return chain(
        scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


class ScaleBySimplifiedAdEMAMixState(NamedTuple):
    """State of :func:`scale_by_simplified_ademamix`: the int32 step count ``t``, the
    accumulated (undamped) momentum ``m`` and the second moment ``n``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_simplified_ademamix().init([torch.zeros(1)]).n
        [tensor([0.])]
    """

    t: torch.Tensor
    m: Any
    n: Any


def scale_by_simplified_ademamix(
    b1: Hyper = 0.99,
    b2: Hyper = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 0.0,
) -> GradientTransformation:
    """Rescales updates by simplified AdEMAMix (Morwani et al., 2025): one slow momentum that
    sums the gradients without the ``(1 − b1)`` damping, plus ``alpha`` times the gradient.

    Update rule, with ``t`` the step count after increment::

        m ← b1 · m + g                 (no (1 − b1) factor, no bias correction)
        n ← b2 · n + (1 − b2) · g²
        u = (m + alpha · g) / (√(n / (1 − b2ᵗ) + eps_root) + eps)

    ``alpha`` may be a schedule of ``t`` before the increment. float16 and bfloat16 leaves are
    computed in float32 and rounded once, as in :func:`scale_by_adam`. Complex leaves raise a
    TypeError naming the leaf (optax squares them as ``g·g``, not ``|g|²``, which gives no
    usable second moment). ``torch.optim`` has no AdEMAMix.

    Args:
        b1: decay of the accumulated momentum, in ``[0, 1]``.
        b2: decay of the second moment, in ``[0, 1)``.
        alpha: weight of the current gradient: a number, 0-d tensor or schedule.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_simplified_ademamix(alpha=1.0)
        >>> params = [torch.zeros(2)]
        >>> tx.update([torch.tensor([2.0, -2.0])], tx.init(params))[0]  # (g + g) / |g|
        [tensor([ 2., -2.])]
    """
    _ops.check_decay("b1", b1, allow_one=True)
    _check(0.0, b2, eps, eps_root)
    _utils.check_finite_number("alpha", alpha)
    _ops.check_scalar_tensor("alpha", alpha)

    def init_fn(params: Any) -> ScaleBySimplifiedAdEMAMixState:
        return ScaleBySimplifiedAdEMAMixState(
            t=_utils.zero_count(params), m=tree.zeros_like(params), n=tree.zeros_like(params)
        )

    def update_fn(
        updates: Any, state: ScaleBySimplifiedAdEMAMixState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleBySimplifiedAdEMAMixState]:
        del params, extra
        if found := _utils.complex_leaf(updates, "updates"):
            raise TypeError(
                f"scale_by_simplified_ademamix takes real leaves; {found[0]} is {found[1]}"
            )
        g, spec, s = _utils.flat(updates, {"state.m": state.m, "state.n": state.n})
        c_alpha = _utils.resolve(alpha, state.t)
        t = _utils.safe_increment(state.t)
        if not g:
            return updates, ScaleBySimplifiedAdEMAMixState(t, state.m, state.n)
        m_s, n_s = s["state.m"], s["state.n"]
        x = _operands(g, m_s, n_s)
        m = _ops.add_scaled(x, b1, _ops.cast_like(m_s, x))
        n = _ops.moment_sq(x, n_s, b2)
        denom = _denominator(_ops.div(n, _bias(b2, t, _ops.scalar_dtype(x))), eps, eps_root)
        num = _ops.add_scaled(m, c_alpha, x)
        out = _ops.cast_like(list(_foreach.div(num, denom)), g)
        new = ScaleBySimplifiedAdEMAMixState(
            t,
            tree.unflatten(spec, _ops.cast_like(m, m_s)),
            tree.unflatten(spec, _ops.cast_like(n, n_s)),
        )
        return tree.unflatten(spec, out), new

    return GradientTransformation(init_fn, update_fn)


def simplified_ademamix(
    learning_rate: ScalarOrSchedule,
    b1: Hyper = 0.99,
    b2: Hyper = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    """Simplified AdEMAMix (Morwani et al., 2025): :func:`scale_by_simplified_ademamix`,
    decoupled weight decay, then ``−learning_rate``.

    Update rule: ``u = −lr · ((m + alpha·g) / (√n̂ + eps) + weight_decay · p)`` with ``m`` the
    undamped sum ``b1·m + g``. Because ``m`` is not damped by ``1 − b1`` it grows to about
    ``1/(1 − b1)`` times the gradient: scale the learning rate down accordingly (the defaults,
    as optax's, are ``b1=0.99``, ``b2=0.95``, ``alpha=0``). ``torch.optim`` has no AdEMAMix.

    Args:
        learning_rate: the step size: a number, a 0-d tensor or a schedule of the step count.
        b1: decay of the accumulated momentum, in ``[0, 1]``.
        b2: decay of the second moment, in ``[0, 1)``.
        alpha: weight of the current gradient: a number, 0-d tensor or schedule.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root.
        weight_decay: decoupled weight decay (multiplied by the learning rate).
        mask: pytree of booleans like the params, or a callable returning one: where weight
            decay applies.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.simplified_ademamix(0.1)
        >>> params = [torch.ones(2)]
        >>> tx.update([torch.ones(2)], tx.init(params), params)[0]
        [tensor([-0.1000, -0.1000])]
    """
    return chain(
        scale_by_simplified_ademamix(b1, b2, alpha, eps, eps_root),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
