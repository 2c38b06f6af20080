"""Further optimizer aliases: RMSProp, Adagrad, Adafactor, Lion, LAMB and LARS (optax defaults).

Like those in :mod:`functrain.optim.aliases`, every alias includes the minus sign of descent and
accepts a number, a 0-d tensor or a schedule as ``learning_rate``.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.optim import (
    _ops,
    _utils,
    accumulation,
    adaptive,
    additive,
    clipping,
    factorized,
    rms,
    scaling,
)
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, chain, identity

__all__ = [
    "adafactor",
    "adagrad",
    "adamaxw",
    "lamb",
    "lars",
    "lion",
    "rmsprop",
]


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> GradientTransformation:
    """RMSProp (Tieleman & Hinton, 2012), optionally centred (Graves, 2013) and with momentum.

    Update rule: ``s = g / √(ν + eps)`` (:func:`scale_by_rms`; centred: :func:`scale_by_stddev`),
    then ``u = −lr · s``, then momentum ``m ← momentum · m + u`` (:func:`trace`) if given.

    Differences from ``torch.optim.RMSprop``: optax's default ``eps_in_sqrt=True`` puts ``eps``
    inside the root; ``rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=False, centered=...,
    momentum=...)`` reproduces ``RMSprop(lr, alpha, eps, centered=..., momentum=...)``
    (momentum is applied after the learning rate, which is the same for a constant rate).

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        decay: the moving-average coefficient (PyTorch's ``alpha``).
        eps: numerical-stability term; see ``eps_in_sqrt``.
        initial_scale: initial value of the second moment (PyTorch uses 0, TF1 uses 1).
        eps_in_sqrt: ``eps`` inside the square root (optax default) or outside (``False``,
            PyTorch).
        centered: normalise by the variance (centred RMSProp) instead of the second moment.
        momentum: momentum coefficient applied after the learning rate (``None``: none).
        nesterov: use Nesterov momentum.
        bias_correction: divide the moment estimates by ``1 − decayᵗ``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.rmsprop(0.1, decay=0.75, eps=0.0)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.2000])
    """
    scaler = rms.scale_by_stddev if centered else rms.scale_by_rms
    if momentum is not None:  # named here: trace's own error would say "decay", rmsprop's too
        _utils.check_finite_number("momentum", momentum, minimum=0.0)
    return chain(
        scaler(decay, eps, initial_scale, eps_in_sqrt, bias_correction),
        scaling.scale_by_learning_rate(learning_rate),
        accumulation.trace(momentum, nesterov) if momentum is not None else identity(),
    )


def adagrad(
    learning_rate: ScalarOrSchedule, initial_accumulator_value: float = 0.1, eps: float = 1e-7
) -> GradientTransformation:
    """Adagrad (Duchi et al., 2011): ``u = −lr · g / √(Σ g² + eps)``; see :func:`scale_by_rss`.

    Differences from ``torch.optim.Adagrad``: optax's defaults start the sum at 0.1 and put
    ``eps`` inside the root (PyTorch: 0 and outside); ``adagrad(lr, v, eps=0)`` equals
    ``Adagrad(lr, initial_accumulator_value=v, eps=0)``. PyTorch's ``lr_decay`` is a schedule
    here.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        initial_accumulator_value: initial value of the sum of squares.
        eps: added inside the square root (PyTorch adds it outside).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.1000])
    """
    return chain(
        rms.scale_by_rss(initial_accumulator_value, eps),
        scaling.scale_by_learning_rate(learning_rate),
    )


def adafactor(
    learning_rate: ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    dtype_momentum: torch.dtype = torch.float32,
    weight_decay_rate: float | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: Any = None,
) -> GradientTransformation:
    """Adafactor (Shazeer & Stern, 2018), composed exactly as optax does.

    Chain: :func:`scale_by_factored_rms` → :func:`clip_by_block_rms` (``clipping_threshold``) →
    ``× learning_rate`` → :func:`scale_by_param_block_rms` (``multiply_by_parameter_scale``) →
    :func:`ema` without debiasing (``momentum``) → :func:`add_decayed_weights`
    (``weight_decay_rate``) → ``× −1``. Any optional step is skipped when its argument is
    ``None``/``False``.

    Differences from ``torch.optim.Adafactor``: a different algorithm variant (PyTorch factors
    the last two dimensions, uses relative step sizes and two epsilons); not comparable.

    Args:
        learning_rate: the step size (``None``: no scaling): a number, a 0-d tensor (read at
            every update) or a schedule of the step count.
        min_dim_size_to_factor: factor a leaf's statistics only if its two largest dimensions
            are this big.
        decay_rate: exponent of the second-moment decay schedule ``1 − (t + 1)^(−decay_rate)``.
        decay_offset: subtracted from the step count (for fine-tuning restarts).
        multiply_by_parameter_scale: scale updates by the RMS of each parameter (relative step
            size).
        clipping_threshold: clip each leaf's update RMS to this value (``None``: no clipping).
        momentum: coefficient of an (un-debiased) moving average of the updates (``None``:
            none).
        dtype_momentum: dtype of the momentum buffer.
        weight_decay_rate: decoupled weight decay coefficient (``None``: none).
        eps: added to the squared gradient.
        factored: use factored second-moment estimates for large matrices.
        weight_decay_mask: pytree of booleans or callable: where weight decay applies (``True``:
            everywhere).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adafactor(0.1, multiply_by_parameter_scale=False)
        >>> params = {"w": torch.zeros(2)}
        >>> u, _ = tx.update({"w": torch.tensor([2.0, -2.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.1000,  0.1000])
    """
    # Checked here so that the errors name adafactor's arguments, not the inner transforms'.
    if clipping_threshold is not None:
        _utils.check_finite_number("clipping_threshold", clipping_threshold, minimum=0.0)
    if momentum is not None:
        _ops.check_decay("momentum", momentum, allow_one=True)
    _ops.check_dtype("dtype_momentum", dtype_momentum)
    txs = [
        factorized.scale_by_factored_rms(
            factored, decay_rate, decay_offset, min_dim_size_to_factor, eps
        )
    ]
    if clipping_threshold is not None:
        txs.append(clipping.clip_by_block_rms(clipping_threshold))
    if learning_rate is not None:
        txs.append(scaling.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        txs.append(scaling.scale_by_param_block_rms())
    if momentum is not None:
        txs.append(accumulation.ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
    if weight_decay_rate is not None:
        txs.append(additive.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
    txs.append(scaling.scale(-1))
    return chain(*txs)


def lion(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 1e-3,
    mask: Any = None,
) -> GradientTransformation:
    """Lion (Chen et al., 2023): ``u = −lr · (sign(b1·m + (1 − b1)·g) + weight_decay · p)``.

    See :func:`scale_by_lion`. ``torch.optim`` has no Lion. Use a learning rate 3–10× smaller
    and a weight decay 3–10× larger than for AdamW.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: interpolation weight of the momentum in the sign, in ``[0, 1]``.
        b2: decay of the momentum, in ``[0, 1]``.
        mu_dtype: optional dtype in which the first moment is stored.
        weight_decay: decoupled weight decay coefficient (multiplied by the learning rate); a
            number, tensor or schedule.
        mask: pytree of booleans like the params, or a callable returning one: where weight
            decay applies.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.lion(0.1, weight_decay=0.0)
        >>> params = {"w": torch.zeros(2)}
        >>> u, _ = tx.update({"w": torch.tensor([5.0, -0.01])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.1000,  0.1000])
    """
    return chain(
        adaptive.scale_by_lion(b1, b2, mu_dtype),
        additive.add_decayed_weights(weight_decay, mask),
        scaling.scale_by_learning_rate(learning_rate),
    )


def adamaxw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
) -> GradientTransformation:
    """Adamax with decoupled weight decay: :func:`scale_by_adamax`, ``+ weight_decay·p``, ``−lr``.

    Update rule: ``u = −lr · (m̂ / max(b2·ν, |g| + eps) + weight_decay · p)``; see
    :func:`adamax`. The decay is decoupled as in AdamW (scaled by the learning rate, not
    by the adaptive denominator). ``torch.optim.Adamax(weight_decay=...)`` adds the decay to
    the gradient instead (coupled, L2); with ``weight_decay=0`` the two are the same.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the infinity-norm estimate, in ``[0, 1)``.
        eps: added to ``|g|`` before the maximum.
        weight_decay: decoupled weight decay coefficient (multiplied by the learning rate); a
            number, tensor or schedule.
        mask: pytree of booleans like the params, or a callable returning one: where weight
            decay applies.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adamaxw(0.1, weight_decay=0.5)
        >>> params = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
        >>> u["w"]  # −0.1 · (1 + 0.5 · 1)
        tensor([-0.1500])
    """
    return chain(
        adaptive.scale_by_adamax(b1, b2, eps),
        additive.add_decayed_weights(weight_decay, mask),
        scaling.scale_by_learning_rate(learning_rate),
    )


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    """LAMB (You et al., 2020): Adam plus weight decay, rescaled per leaf by a trust ratio.

    Update rule: ``a = adam(g) + weight_decay · p``; ``u = −lr · (‖p‖ / ‖a‖) · a`` per leaf
    (:func:`scale_by_trust_ratio`). ``torch.optim`` has no LAMB.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the second moment (the squared-gradient average), in ``[0, 1)``.
        eps: added to the Adam denominator outside the square root.
        eps_root: added inside the square root (needed when differentiating through the update).
        weight_decay: weight decay coefficient (added before the trust ratio).
        mask: pytree of booleans like the params, or a callable returning one: where weight
            decay applies.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.lamb(0.1)
        >>> params = {"w": torch.tensor([3.0, 4.0])}
        >>> u, _ = tx.update({"w": torch.tensor([1.0, -1.0])}, tx.init(params), params)
        >>> u["w"]  # the Adam direction, scaled to lr * ‖p‖
        tensor([-0.3536,  0.3536])
    """
    return chain(
        adaptive.scale_by_adam(b1, b2, eps, eps_root),
        additive.add_decayed_weights(weight_decay, mask),
        scaling.scale_by_trust_ratio(),
        scaling.scale_by_learning_rate(learning_rate),
    )


def lars(
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = True,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    trust_ratio_mask: Any = True,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> GradientTransformation:
    """LARS (You et al., 2017): SGD with momentum on layer-wise trust-ratio-scaled updates.

    Update rule: ``a = g + weight_decay · p``; ``a ← trust_coefficient · ‖p‖ / (‖a‖ + eps) · a``
    per leaf; ``m ← momentum · m − lr · a``; ``u = m``. The masks (pytrees of booleans or
    callables; ``True`` means everywhere) select where decay and trust ratios apply.
    ``torch.optim`` has no LARS.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        weight_decay: weight decay coefficient (added to the gradient before the trust ratio).
        weight_decay_mask: pytree of booleans or callable: where weight decay applies (``True``:
            everywhere).
        trust_coefficient: multiplier of the trust ratio.
        eps: added to the update norm in the trust-ratio denominator.
        trust_ratio_mask: pytree of booleans or callable: where the trust ratio applies
            (``True``: everywhere).
        momentum: momentum coefficient.
        nesterov: use Nesterov momentum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.lars(0.1, trust_coefficient=1.0)
        >>> params = {"w": torch.tensor([3.0, 4.0])}
        >>> u, _ = tx.update({"w": torch.tensor([0.6, 0.8])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.3000, -0.4000])
    """
    _utils.check_finite_number("momentum", momentum, minimum=0.0)
    return chain(
        additive.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        additive._apply_mask(
            scaling.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps),
            trust_ratio_mask,
        ),
        scaling.scale_by_learning_rate(learning_rate),
        accumulation.trace(momentum, nesterov),
    )
