"""Optimizer aliases (SGD and Adam families): short chains of transforms with optax's defaults.

Every alias returns a :class:`~functrain.optim.GradientTransformation` whose updates already
include the minus sign of descent: ``params ← apply_updates(params, updates)``.
``learning_rate`` may be a number, a 0-d tensor (change it in place, no recompilation) or a
schedule of the step count.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.optim import _ops, _utils, accumulation, adaptive, additive, scaling
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, chain, identity

__all__ = [
    "adam",
    "adamax",
    "adamw",
    "amsgrad",
    "nadam",
    "nadamw",
    "noisy_sgd",
    "radam",
    "sgd",
    "sign_sgd",
]


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | torch.Tensor | None = None,
    nesterov: bool = False,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    Update rule: ``m ← momentum · m + g``; ``u = −lr · m`` (Nesterov: ``u = −lr · (g +
    momentum · m)``); without momentum ``u = −lr · g``.

    Matches ``torch.optim.SGD(lr, momentum, nesterov=...)`` with ``dampening=0``. Weight decay
    is a separate transform: ``chain(add_decayed_weights(wd), sgd(lr, ...))`` equals PyTorch's
    coupled ``weight_decay=wd``.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        momentum: momentum coefficient (``None``: no momentum).
        nesterov: use Nesterov momentum.
        accumulator_dtype: optional dtype in which the momentum buffer is stored.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.sgd(0.1, momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> u, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
        >>> ft.apply_updates(params, u)["w"]
        tensor([0.9000, 0.9000])
    """
    # An integer buffer would silently truncate the momentum to whole numbers.
    _ops.check_dtype("accumulator_dtype", accumulator_dtype)
    if momentum is not None:
        _ops.refuse_schedule("momentum", momentum)
        _utils.check_finite_number("momentum", momentum, minimum=0.0)  # as torch.optim.SGD
    return chain(
        accumulation.trace(momentum, nesterov, accumulator_dtype)
        if momentum is not None
        else identity(),
        scaling.scale_by_learning_rate(learning_rate),
    )


def noisy_sgd(
    learning_rate: ScalarOrSchedule,
    eta: float = 0.01,
    gamma: float = 0.55,
    key: int | torch.Tensor | None = None,
    *,
    seed: int | None = None,
) -> GradientTransformation:
    """SGD on gradients with annealed Gaussian noise (Neelakantan et al., 2015).

    Update rule: ``u = −lr · (g + σₜ · N(0, 1))`` with ``σₜ² = eta / tᵞ`` (``t`` counts from 1).
    The noise comes from the explicit key in the state (see :func:`add_noise`): reproducible,
    no global RNG. ``torch.optim`` has no equivalent.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        eta: base variance of the gradient noise.
        gamma: decay exponent of the noise variance.
        key: an int seed or a 0-d integer tensor key for the noise (default 0).
        seed: alternative spelling of an int seed (optax's deprecated argument).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.noisy_sgd(0.1, key=0)
        >>> params = {"w": torch.zeros(1000)}
        >>> u, _ = tx.update({"w": torch.zeros(1000)}, tx.init(params), params)
        >>> round(float(u["w"].std() / 0.01), 1)  # lr * sqrt(eta) at the first step
        1.0
    """
    return chain(
        additive.add_noise(eta, gamma, key, seed=seed),
        scaling.scale_by_learning_rate(learning_rate),
    )


def sign_sgd(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """SignSGD (Bernstein et al., 2018): ``u = −lr · sign(g)``.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.sign_sgd(0.1)
        >>> tx.update([torch.tensor([3.0, -0.2, 0.0])], tx.init(None))[0]
        [tensor([-0.1000,  0.1000, -0.0000])]
    """
    return chain(scaling.scale_by_sign(), scaling.scale_by_learning_rate(learning_rate))


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Adam (Kingma & Ba, 2014): :func:`scale_by_adam` followed by ``−learning_rate``.

    Update rule: ``u = −lr · m̂ / (√(v̂ + eps_root) + eps)`` with bias-corrected moments; see
    :func:`scale_by_adam` (``nesterov=True`` gives NAdam).

    Matches ``torch.optim.Adam`` (eps outside the square root, same bias correction).

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the second moment (the squared-gradient average), in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root (needed when differentiating through the update).
        mu_dtype: optional dtype in which the first moment is stored.
        nesterov: use Nesterov momentum (NAdam).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adam(1e-3)
        >>> params = {"w": torch.zeros(3)}
        >>> u, state = tx.update({"w": torch.ones(3)}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.0010, -0.0010, -0.0010])
    """
    return chain(
        adaptive.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        scaling.scale_by_learning_rate(learning_rate),
    )


def nadam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = True,
) -> GradientTransformation:
    """NAdam (Dozat, 2016): Adam with Nesterov momentum, ``adam(..., nesterov=True)``.

    Update rule: ``m̂ = b1·m/(1 − b1ᵗ⁺¹) + (1 − b1)·g/(1 − b1ᵗ)``, the rest as Adam.

    Differences from ``torch.optim.NAdam``: PyTorch warms the momentum up with
    ``μₜ = b1·(1 − ½·0.96^(t·momentum_decay))``; optax and functrain use a constant ``μₜ = b1``.
    The two coincide when ``momentum_decay`` is so large that ``0.96^(t·momentum_decay)`` is 0.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the second moment (the squared-gradient average), in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root (needed when differentiating through the update).
        mu_dtype: optional dtype in which the first moment is stored.
        nesterov: the Nesterov momentum that makes this NAdam (``False``: plain Adam), as
            optax's argument.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.nadam(1e-3)
        >>> params = {"w": torch.zeros(2)}
        >>> u, _ = tx.update({"w": torch.ones(2)}, tx.init(params), params)
        >>> u["w"]  # b1·0.1/(1 − b1²) + 1 = 1.47 times the Adam step
        tensor([-0.0015, -0.0015])
    """
    return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    Update rule: ``u = −lr · (adam(g) + weight_decay · p)``.

    Differences from ``torch.optim.AdamW``: the default ``weight_decay`` is optax's ``1e-4``
    (PyTorch's is ``1e-2``); the maths is otherwise the same (PyTorch decays ``p`` by
    ``1 − lr·wd`` first, which is the same update). ``mask`` (a pytree of booleans or a
    callable) limits decay to some parameters.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the second moment (the squared-gradient average), in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root (needed when differentiating through the update).
        mu_dtype: optional dtype in which the first moment is stored.
        weight_decay: decoupled weight decay coefficient (multiplied by the learning rate); a
            number, tensor or schedule.
        mask: pytree of booleans like the params, or a callable returning one: where weight
            decay applies.
        nesterov: use Nesterov momentum (NAdamW).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adamw(1e-3, weight_decay=0.01)
        >>> params = {"w": torch.ones(2)}
        >>> u, _ = tx.update({"w": torch.ones(2)}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.0010, -0.0010])
    """
    return chain(
        adaptive.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        additive.add_decayed_weights(weight_decay, mask),
        scaling.scale_by_learning_rate(learning_rate),
    )


def nadamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = True,
) -> GradientTransformation:
    """NAdamW: :func:`adamw` with Nesterov momentum (``adamw(..., nesterov=True)``).

    Matches ``torch.optim.NAdam(decoupled_weight_decay=True)`` under the condition given in
    :func:`nadam`.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the second moment (the squared-gradient average), in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root (needed when differentiating through the update).
        mu_dtype: optional dtype in which the first moment is stored.
        weight_decay: decoupled weight decay coefficient (multiplied by the learning rate); a
            number, tensor or schedule.
        mask: pytree of booleans like the params, or a callable returning one: where weight
            decay applies.
        nesterov: the Nesterov momentum that makes this NAdamW (``False``: plain AdamW).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.nadamw(1e-3, weight_decay=0.0)
        >>> params = {"w": torch.zeros(2)}
        >>> u, _ = tx.update({"w": -torch.ones(2)}, tx.init(params), params)
        >>> u["w"]
        tensor([0.0015, 0.0015])
    """
    return adamw(
        learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov=nesterov
    )


def radam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Rectified Adam (Liu et al., 2020); see :func:`scale_by_radam` for the rule.

    Differences from ``torch.optim.RAdam``: PyTorch's threshold is strict (``ρₜ > 5``, optax's
    ``ρₜ ≥ threshold``) and its ``eps`` sits before the bias correction; with ``eps=0`` the
    trajectories coincide (see :func:`scale_by_radam`).

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the second moment (the squared-gradient average), in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root (needed when differentiating through the update).
        threshold: rectify only when ``ρₜ ≥ threshold``.
        nesterov: use Nesterov momentum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.radam(0.1)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
        >>> u["w"]  # un-rectified while the variance estimate is intractable
        tensor([-0.2000])
    """
    return chain(
        adaptive.scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov=nesterov),
        scaling.scale_by_learning_rate(learning_rate),
    )


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
) -> GradientTransformation:
    """AMSGrad (Reddi et al., 2018): Adam dividing by the running maximum of ``v̂``.

    Differences from ``torch.optim.Adam(amsgrad=True)``: PyTorch takes the maximum of the
    uncorrected second moment; see :func:`scale_by_amsgrad`.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the second moment (the squared-gradient average), in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root (needed when differentiating through the update).
        mu_dtype: optional dtype in which the first moment is stored.
        bias_correction_mu: divide the first moment by ``1 − b1ᵗ``.
        bias_correction_nu: divide the second moment by ``1 − b2ᵗ`` before the maximum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.amsgrad(0.1)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.1000])
    """
    return chain(
        adaptive.scale_by_amsgrad(
            b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu
        ),
        scaling.scale_by_learning_rate(learning_rate),
    )


def adamax(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    """Adamax, Adam with the infinity norm; see :func:`scale_by_adamax`.

    Matches ``torch.optim.Adamax`` (same ``max(b2·ν, |g| + eps)`` and bias correction).

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the infinity-norm estimate, in ``[0, 1)``.
        eps: added to ``|g|`` before the maximum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adamax(0.1)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.1000])
    """
    return chain(
        adaptive.scale_by_adamax(b1, b2, eps), scaling.scale_by_learning_rate(learning_rate)
    )
