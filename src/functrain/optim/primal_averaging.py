"""Schedule-free learning (Defazio et al., 2024): the wrapper and its SGD and AdamW aliases.

A primal-averaging method: gradients are taken at an interpolation of the iterate and its
running average, which is where a model is evaluated.

optax's ``optax.contrib.schedule_free``, ``schedule_free_sgd``, ``schedule_free_adamw`` and
``schedule_free_eval_params``, with the same arguments, defaults, state and numerics.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils, additive, aliases, rms, scaling
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, chain
from functrain.optim.schedules import warmup_constant_schedule

__all__ = [
    "ScheduleFreeState",
    "schedule_free",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_sgd",
]

Hyper = float | torch.Tensor


class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free`.

    Fields: the interpolation weight ``b1``, the running sum ``weight_sum`` of the averaging
    weights, the int32 ``step_count`` (starting at 1, as optax's), the largest learning rate
    seen so far ``max_lr``, the wrapped optimizer's state and the base iterate ``z``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.schedule_free_sgd(0.1).init([torch.ones(2)]).z
        [tensor([1., 1.])]
    """

    b1: torch.Tensor
    weight_sum: torch.Tensor
    step_count: torch.Tensor
    max_lr: torch.Tensor
    base_optimizer_state: Any
    z: Any


def _lowest_float(params: Any) -> torch.dtype:
    """The narrowest real floating dtype among the leaves (optax's ``tree.dtype(.., "lowest")``):
    the dtype of the scalars in the state. float32 when there is none."""
    found = [
        _ops.real_dtype(x.dtype)
        for x in tree.leaves(params)
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())
    ]
    if not found:
        return torch.float32
    return min(found, key=lambda d: (torch.finfo(d).bits, torch.finfo(d).eps))


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    # float16/bfloat16 interpolations are done in float32 and rounded once: (y − (1 − b1)·z)/b1
    # divides by b1 and would amplify bfloat16's rounding of y by ten at b1 = 0.1.
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _interpolate(y: torch.Tensor, z: torch.Tensor, b1: Hyper) -> torch.Tensor:
    """x = (y − (1 − b1)·z) / b1: the average recovered from the gradient point and ``z``."""
    return (y - (1.0 - b1) * z) / b1


def schedule_free_eval_params(state: Any, params: Any) -> Any:
    """The averaged iterate ``x`` of :func:`schedule_free`: the parameters to evaluate at.

    Training moves the parameters along ``y = b1·x + (1 − b1)·z``, the point where gradients
    are taken; test and validation losses should be computed at
    ``x = (y − (1 − b1)·z) / b1``. Each leaf keeps the dtype of its parameter.

    Args:
        state: a :class:`ScheduleFreeState` (the state of :func:`schedule_free` or one of its
            aliases).
        params: the current (training) parameters ``y``.

    Returns:
        A pytree like ``params``.

    Raises:
        ValueError: when ``state`` is no :class:`ScheduleFreeState`.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.schedule_free_sgd(0.5, b1=0.5)
        >>> params = [torch.tensor([2.0])]
        >>> state = tx.init(params)
        >>> updates, state = tx.update([torch.tensor([1.0])], state, params)
        >>> params = ft.apply_updates(params, updates)  # z = 1.5; the first average is x = z
        >>> ft.schedule_free_eval_params(state, params)
        [tensor([1.5000])]
    """
    b1, z = getattr(state, "b1", None), getattr(state, "z", None)
    if b1 is None or z is None:
        # A whole chain's or wrapper's state (ft.chain(clip, schedule_free_adamw(..)),
        # inject_hyperparams, MultiSteps) is the usual mistake: say where the state lies.
        found = _find_schedule_free(state, "state")
        where = f"; it holds one at {' and '.join(found)}: pass that" if found else ""
        raise ValueError(
            "schedule_free_eval_params needs a ScheduleFreeState (the state of "
            f"ft.schedule_free or its aliases), got {type(state).__name__}{where}"
        )

    def one(y: torch.Tensor, zi: torch.Tensor) -> torch.Tensor:
        wide = _compute_dtype(y.dtype, zi.dtype, b1.dtype)
        return _interpolate(y.to(wide), zi.to(wide), b1.to(wide)).to(y.dtype)

    return tree.map(one, params, z)


def _find_schedule_free(state: Any, path: str) -> list[str]:
    """Where the :class:`ScheduleFreeState` nodes inside ``state`` lie, as Python expressions
    from ``path`` (``state[1]``, ``state.inner_state``)."""
    if isinstance(state, ScheduleFreeState):
        return [path]
    if isinstance(state, dict):
        items: Any = ((f"{path}[{k!r}]", v) for k, v in state.items())
    elif isinstance(state, tuple) and hasattr(state, "_fields"):
        items = ((f"{path}.{k}", v) for k, v in zip(state._fields, state))
    elif isinstance(state, (tuple, list)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(state))
    else:
        return []
    return [p for where, v in items for p in _find_schedule_free(v, where)]


def _check_b1(b1: Any) -> None:
    _ops.check_scalar_tensor("b1", b1)
    _utils.check_finite_number("b1", b1)
    if _utils.is_real_number(b1) and not 0 < b1 <= 1:
        # x = (y − (1 − b1)·z) / b1 divides by b1.
        raise ValueError(f"b1 must be in (0, 1], got {b1!r}")


def schedule_free(
    base_optimizer: GradientTransformation,
    learning_rate: ScalarOrSchedule,
    b1: Hyper = 0.9,
    weight_lr_power: Hyper = 2.0,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Makes ``base_optimizer`` schedule-free: its momentum is replaced by interpolation and
    averaging (Defazio et al., `The Road Less Scheduled <https://arxiv.org/abs/2405.15682>`_).

    Three sequences: ``z`` follows the base optimizer's steps, ``x`` is a weighted average of
    the ``z`` (the point to evaluate at, see :func:`schedule_free_eval_params`) and the
    parameters ``y`` interpolate between them (the point where gradients are taken)::

        lr_t = learning_rate(t) (t = step_count, from 1); max_lr ← max(max_lr, lr_t)
        w = max_lr ** weight_lr_power; weight_sum ← weight_sum + w; c = w / weight_sum
        z ← z + base_update(g)            (base_optimizer's update, learning rate included)
        x ← (1 − c) · x + c · z           with x = (y − (1 − b1) · z_old) / b1
        y ← b1 · x + (1 − b1) · z         (returned as the update y_new − y)

    ``c`` is 0 while ``weight_sum`` is 0 (a warmup from 0) and NaN when ``w`` is. The base
    optimizer should have no momentum of its own (``sgd`` without momentum, Adam with
    ``b1=0``). Only ``z`` is stored, as ``x`` is recovered from ``y`` and ``z``.

    Differences from facebookresearch's ``schedulefree`` package: none in the rule itself
    (``AdamWScheduleFree`` with ``warmup_steps=0`` agrees to rounding); its ``r`` (a
    polynomial factor in the averaging weights) does not exist here, and see
    :func:`schedule_free_adamw` for its warmup.
    float16/bfloat16 leaves are interpolated in float32 and rounded once.

    Args:
        base_optimizer: the transformation whose updates move ``z``.
        learning_rate: the learning rate (a number, 0-d tensor or schedule of the step count,
            with warmup but no decay) that sets the averaging weights. It should be the one
            given to ``base_optimizer``.
        b1: interpolation weight of ``x`` in ``y``, in ``(0, 1]``.
        weight_lr_power: power of the largest learning rate so far in the averaging weights;
            a larger power down-weights the warmup steps.
        state_dtype: optional dtype in which ``z`` is stored.

    Returns:
        A :class:`GradientTransformation` whose ``update`` needs ``params``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.schedule_free(ft.sgd(0.5), learning_rate=0.5)
        >>> params = [torch.tensor([2.0])]
        >>> updates, state = tx.update([torch.tensor([1.0])], tx.init(params), params)
        >>> updates  # z = 1.5, x = z at the first step, y = x
        [tensor([-0.5000])]
    """
    if not isinstance(base_optimizer, GradientTransformation):
        raise TypeError(
            f"base_optimizer must be a GradientTransformation, got {type(base_optimizer).__name__}"
        )
    _utils.check_finite_number("learning_rate", learning_rate)
    _ops.check_scalar_tensor("learning_rate", learning_rate)
    _check_b1(b1)
    _ops.check_scalar_tensor("weight_lr_power", weight_lr_power)
    _utils.check_finite_number("weight_lr_power", weight_lr_power, minimum=0.0)
    if callable(weight_lr_power):
        raise TypeError("weight_lr_power must be a number or a 0-d tensor, not a schedule")
    _ops.check_dtype("state_dtype", state_dtype)

    def init_fn(params: Any) -> ScheduleFreeState:
        dtype = _lowest_float(params)
        device = _utils.default_device(params)
        # A copy: z must not alias the parameters, which a caller may update in place; of
        # constants unless differentiated (no graph to nn.Parameters in a torch-style loop).
        z = tree.map(
            lambda p: p.to(dtype=state_dtype or p.dtype, copy=True),
            _utils.constant_tree(params),
        )
        return ScheduleFreeState(
            b1=torch.as_tensor(b1, dtype=dtype, device=device),
            weight_sum=torch.zeros((), dtype=dtype, device=device),
            step_count=torch.ones((), dtype=torch.int32, device=device),
            max_lr=torch.zeros((), dtype=dtype, device=device),
            base_optimizer_state=base_optimizer.init(params),
            z=z,
        )

    def update_fn(
        updates: Any, state: ScheduleFreeState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScheduleFreeState]:
        if params is None:
            raise ValueError("schedule_free needs params: call update(updates, state, params)")
        lr = _utils.resolve(learning_rate, state.step_count)
        if isinstance(lr, torch.Tensor):
            max_lr = torch.maximum(state.max_lr, lr.to(state.max_lr))
        else:  # a Python number stays a scalar argument: no host-to-device copy
            max_lr = torch.clamp_min(state.max_lr, lr)
        weight = max_lr**weight_lr_power
        weight_sum = state.weight_sum + weight
        # 0/0 (no weight yet, during a warmup from 0) is 0; a NaN weight or sum stays NaN.
        ratio = torch.nan_to_num(weight / weight_sum, nan=0.0)
        c = torch.where(weight.isnan() | weight_sum.isnan(), weight + weight_sum, ratio)

        # Compare updates with params first: the base optimizer may read neither (sgd), and
        # the check below would name params "updates" (the root name of _utils.flat).
        g = _utils.flat(updates, {"params": params})[0]
        base_updates, base_state = base_optimizer.update(
            updates, state.base_optimizer_state, params, **extra
        )
        y, spec, s = _utils.flat(params, {"state.z": state.z, "updates": base_updates}, ())
        # The params are constants unless the update is differentiated: nn.Parameters in a
        # torch-style loop leave no graph in z or the updates.
        y = _foreach.constants(g, y)
        new_z, out = [], []
        for yi, zi, ui in zip(y, s["state.z"], s["updates"]):
            wide = _compute_dtype(yi.dtype, zi.dtype, ui.dtype)
            y64, z_old, c_w = yi.to(wide), zi.to(wide), c.to(wide)
            z_new = (z_old + ui.to(wide)).to(zi.dtype)
            x = (1.0 - c_w) * _interpolate(y64, z_old, b1) + c_w * z_new.to(wide)
            y_new = b1 * x + (1.0 - b1) * z_new.to(wide)
            new_z.append(z_new)
            out.append((y_new - y64).to(yi.dtype))
        return tree.unflatten(spec, out), ScheduleFreeState(
            b1=state.b1,
            weight_sum=weight_sum,
            step_count=_utils.safe_increment(state.step_count),
            max_lr=max_lr,
            base_optimizer_state=base_state,
            z=tree.unflatten(spec, new_z),
        )

    return GradientTransformation(init_fn, update_fn)


def _warmup(learning_rate: Hyper, warmup_steps: int | None) -> ScalarOrSchedule:
    if warmup_steps is None:
        return learning_rate
    if (
        isinstance(warmup_steps, bool)
        or not isinstance(warmup_steps, numbers.Integral)
        or warmup_steps < 1
    ):
        raise ValueError(f"warmup_steps must be a positive integer or None, got {warmup_steps!r}")
    if callable(learning_rate):
        raise ValueError(
            "warmup_steps needs a number learning_rate (the warmup's peak); with a schedule, "
            "put the warmup in it (e.g. ft.warmup_constant_schedule) and leave warmup_steps=None"
        )
    return warmup_constant_schedule(0.0, learning_rate, int(warmup_steps))


def schedule_free_sgd(
    learning_rate: Hyper = 1.0,
    warmup_steps: int | None = None,
    b1: Hyper = 0.9,
    weight_decay: Hyper | None = None,
    weight_lr_power: Hyper = 2.0,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Schedule-free SGD: :func:`schedule_free` around plain :func:`sgd`.

    ``z ← z − lr_t · (g + weight_decay · y)``, with a linear warmup of ``lr_t`` from 0 over
    ``warmup_steps`` (then constant) when given; see :func:`schedule_free` for ``x`` and ``y``.
    Evaluate at :func:`schedule_free_eval_params`.

    Differences from facebookresearch's ``SGDScheduleFree``: its warmup is one step ahead
    (see :func:`schedule_free_adamw`).

    Args:
        learning_rate: the SGD learning rate (a number or a 0-d tensor).
        warmup_steps: length of the linear warmup, a positive integer, or ``None``.
        b1: interpolation weight of ``x`` in ``y``, in ``(0, 1]``.
        weight_decay: optional coefficient of the weight decay added to the gradient.
        weight_lr_power: power of the learning rate in the averaging weights.
        state_dtype: optional dtype in which ``z`` is stored.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.schedule_free_sgd(0.1, warmup_steps=2)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = tx.init(params)
        >>> for _ in range(40):
        ...     updates, state = tx.update({"w": params["w"]}, state, params)  # grad of |w|²/2
        ...     params = ft.apply_updates(params, updates)
        >>> bool(ft.schedule_free_eval_params(state, params)["w"].abs().max() < 0.05)
        True
    """
    learning_rate = _warmup(learning_rate, warmup_steps)
    optimizer = aliases.sgd(learning_rate)
    if weight_decay is not None:
        optimizer = chain(additive.add_decayed_weights(weight_decay), optimizer)
    return schedule_free(optimizer, learning_rate, b1, weight_lr_power, state_dtype)


def schedule_free_adamw(
    learning_rate: Hyper = 0.0025,
    warmup_steps: int | None = None,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    weight_lr_power: Hyper = 2.0,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Schedule-free AdamW: :func:`schedule_free` around Adam without momentum.

    ``z ← z − lr_t · (g / (√ν̂ + eps) + weight_decay · y)`` with ``ν̂`` the bias-corrected
    moving average of ``g²`` (decay ``b2``), as ``scale_by_rms(b2, eps, eps_in_sqrt=False,
    bias_correction=True)``; ``b1`` is the interpolation weight of :func:`schedule_free`.
    Evaluate at :func:`schedule_free_eval_params`.

    Differences from facebookresearch's ``AdamWScheduleFree`` (PyTorch): during the warmup
    its ``z`` step at step ``t`` (from 1) uses ``lr·t/warmup_steps``; here, as in optax, the
    ``z`` step uses ``lr·(t − 1)/warmup_steps`` (the first step is 0) while the averaging
    weight uses ``lr·t/warmup_steps``. Without warmup the two agree to rounding.

    Args:
        learning_rate: the AdamW learning rate (a number or a 0-d tensor).
        warmup_steps: length of the linear warmup, a positive integer, or ``None``.
        b1: interpolation weight of ``x`` in ``y``, in ``(0, 1]``.
        b2: decay of the moving average of squared gradients, in ``[0, 1)``.
        eps: added to the root of the second moment.
        weight_decay: coefficient of the decoupled weight decay (multiplied by the learning
            rate).
        weight_lr_power: power of the learning rate in the averaging weights.
        state_dtype: optional dtype in which ``z`` is stored.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.schedule_free_adamw(0.1)
        >>> params = [torch.tensor([1.0])]
        >>> updates, state = tx.update([torch.tensor([4.0])], tx.init(params), params)
        >>> updates  # z = 1 − 0.1·sign(g); x = z at the first step
        [tensor([-0.1000])]
    """
    _ops.check_decay("b2", b2)
    _utils.check_finite_number("eps", eps, minimum=0.0)
    _utils.check_finite_number("weight_decay", weight_decay)
    learning_rate = _warmup(learning_rate, warmup_steps)
    optimizer = chain(
        rms.scale_by_rms(b2, eps, eps_in_sqrt=False, bias_correction=True),
        additive.add_decayed_weights(weight_decay),
        scaling.scale_by_learning_rate(learning_rate),
    )
    return schedule_free(optimizer, learning_rate, b1, weight_lr_power, state_dtype)
