"""Global Distance-over-Gradients step sizes: DoG and DoWG (optax.contrib's ``dog``, ``dowg``).

The step size is the largest distance travelled from the initial point over a root of summed
squared gradient norms, each a 0-d tensor over the whole tree (no host reads).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from functrain import _foreach, tree
from functrain._precision import widen_all
from functrain.optim import _ops, _utils, additive, scaling
from functrain.optim._global_stats import (
    _copy,
    _on,
    _params_leaves,
    _refuse_complex,
    _root,
    _scalar,
    _sq_norm,
    _state_dtype,
)
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, chain, identity

__all__ = ["DoGState", "DoWGState", "dog", "dowg", "scale_by_dog", "scale_by_dowg"]

InitStep = tuple[Literal["distance", "learning_rate", "heuristic"], Any]
_INIT_STEPS = ("distance", "learning_rate", "heuristic")


class DoGState(NamedTuple):
    """State of :func:`scale_by_dog`: whether the next step is the first (0-d bool), the initial
    parameters, the largest distance from them so far and the sum of squared gradient norms
    (both 0-d).

    Example:
        >>> import torch, functrain as ft
        >>> s = ft.scale_by_dog(("distance", 0.5)).init([torch.zeros(2)])
        >>> s.is_init_step, s.max_dist
        (tensor(True), tensor(0.5000))
    """

    is_init_step: torch.Tensor
    init_params: Any
    max_dist: torch.Tensor
    sum_sq_norm_grads: torch.Tensor


class DoWGState(NamedTuple):
    """State of :func:`scale_by_dowg`: the initial parameters, the distance-weighted sum of
    squared gradient norms and the largest squared distance so far (both 0-d).

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_dowg().init([torch.zeros(2)]).estim_sq_dist
        tensor(1.0000e-04)
    """

    init_params: Any
    weighted_sq_norm_grads: torch.Tensor
    estim_sq_dist: torch.Tensor


def _flat_real(updates: Any, params: Any, init_params: Any, name: str) -> tuple:
    """Leaves of updates, params and initial params (widened from half precision)."""
    if params is None:
        raise ValueError(scaling._NO_PARAMS.format(name=name))
    _refuse_complex(updates, "updates", name)
    # The initial point is a function of the params only: a constant unless differentiated.
    constants = ("params", "state.init_params")
    g, spec, s = _utils.flat(
        updates, {"params": params, "state.init_params": init_params}, constants
    )
    x0 = _utils.retree(init_params, spec, s["state.init_params"])
    return g, spec, widen_all(s["params"]), widen_all(s["state.init_params"]), x0


def _scaled(g: list[torch.Tensor], lr: torch.Tensor) -> list[torch.Tensor]:
    """``lr · g``, each leaf computed in at least float32 and returned in its own dtype."""
    return _ops.cast_like(_ops.mul(widen_all(g), lr), g)


def scale_by_dog(init_step: InitStep, eps: Any = 1e-8) -> GradientTransformation:
    """Scales updates by the Distance over Gradients step size (DoG; Ivgi et al., 2023).

    Update rule, with ``x₀`` the initial parameters and norms over the whole tree::

        r ← max(r, ‖x − x₀‖)        G ← G + ‖g‖²
        u = r / √(G + eps) · g

    ``init_step`` is ``(kind, value)``: ``"distance"`` starts ``r`` at ``value``;
    ``"heuristic"`` at ``value · (1 + ‖x₀‖)`` (so ``init`` needs the real parameters);
    ``"learning_rate"`` starts ``r`` at 0 and makes the first step size ``value``. ``update``
    needs ``params``; chain a negative learning rate for descent (see :func:`dog`).

    Differences from :func:`scale_by_distance_over_gradients` (optax main's): that one is
    layer-wise (LDoG: one ``r``, ``G`` per leaf, with ``reps_rel``, ``param_dtype`` and a
    ``global_scale`` sign), this one (optax.contrib's) takes one global step size and offers
    the three ``init_step`` rules. ``torch.optim`` has no DoG.

    Differences from optax: the 0-d statistics are kept in the parameters' lowest float dtype
    widened to at least float32, and half-precision leaves are reduced in float32; complex
    leaves are refused. As in optax, a float32 sum of squared gradient norms overflows once a
    gradient's norm passes about 1e19 (a diverged run): the step size is then 0 for good. A
    float64 sum would cost a second, float64, reduction of the gradients at every step.

    Args:
        init_step: ``("distance" | "heuristic" | "learning_rate", value)``, value ``≥ 0``.
        eps: added to ``G`` under the root, ``≥ 0``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_dog(("distance", 0.5), eps=0.0)
        >>> params = [torch.tensor([3.0, 4.0])]
        >>> tx.update([torch.tensor([0.0, 2.0])], tx.init(params), params)[0]
        [tensor([0.0000, 0.5000])]
    """
    kind, value = _check_init_step(init_step)
    _check_eps(eps)

    def init_fn(params: Any) -> DoGState:
        leaves = _params_leaves(params, "scale_by_dog")
        sd = _state_dtype(leaves)
        device = _utils.default_device(params)
        if kind == "distance":
            r = _scalar(value, sd, device)
        elif kind == "heuristic":
            norm = _root(_sq_norm(widen_all(leaves), sd)) if leaves else torch.zeros(())
            r = (_on(value, norm) * (1 + norm)).to(dtype=sd, device=device)
        else:
            r = torch.zeros((), dtype=sd, device=device)
        return DoGState(
            is_init_step=torch.ones((), dtype=torch.bool, device=device),
            init_params=_copy(params),
            max_dist=r,
            sum_sq_norm_grads=torch.zeros((), dtype=sd, device=device),
        )

    def update_fn(
        updates: Any, state: DoGState, params: Any = None, **extra: Any
    ) -> tuple[Any, DoGState]:
        del extra
        g, spec, x, x0, init = _flat_real(updates, params, state.init_params, "scale_by_dog")
        if not g:
            return updates, state._replace(is_init_step=torch.zeros_like(state.is_init_step))
        sd = state.max_dist.dtype
        dist = _root(_sq_norm(list(_foreach.sub(x0, x)), sd))
        max_dist = torch.maximum(state.max_dist, dist).to(sd)
        sum_sq = (state.sum_sq_norm_grads + _sq_norm(widen_all(g), sd)).to(sd)
        lr = max_dist / torch.sqrt(sum_sq + _on(eps, sum_sq))
        if kind == "learning_rate":
            lr = torch.where(state.is_init_step, _on(value, lr), lr)
        new = DoGState(torch.zeros_like(state.is_init_step), init, max_dist, sum_sq)
        return tree.unflatten(spec, _scaled(g, lr)), new

    return GradientTransformation(init_fn, update_fn)


def dog(
    learning_rate: ScalarOrSchedule = 1.0,
    init_step: InitStep = ("heuristic", 1e-6),
    eps: Any = 1e-8,
    weight_decay: ScalarOrSchedule | None = None,
    mask: Any = None,
) -> GradientTransformation:
    """DoG, optax.contrib's alias: optional weight decay, :func:`scale_by_dog`, learning rate.

    ``chain(add_decayed_weights(weight_decay, mask) if weight_decay is not None else
    identity(), scale_by_dog(init_step, eps), scale_by_learning_rate(learning_rate))``; the
    update rule is in :func:`scale_by_dog`. The authors recommend averaging the iterates
    (e.g. :func:`functrain.ema` of the parameters). ``torch.optim`` has no DoG.

    Args:
        learning_rate: multiplies DoG's step size (1 by default): a number, a 0-d tensor or a
            schedule.
        init_step: the first step's rule (see :func:`scale_by_dog`); the paper suggests
            ``("heuristic", 1e-4)`` for models with batch normalization.
        eps: added to the summed squared gradient norms, ``≥ 0``.
        weight_decay: optional weight decay added to the gradients before DoG.
        mask: where weight decay applies (a pytree of booleans or a callable).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.dog(init_step=("learning_rate", 0.1))
        >>> params = [torch.tensor([1.0, 2.0])]
        >>> tx.update([torch.tensor([1.0, -1.0])], tx.init(params), params)[0]
        [tensor([-0.1000,  0.1000])]
    """
    return chain(
        additive.add_decayed_weights(weight_decay, mask)
        if weight_decay is not None
        else identity(),
        scale_by_dog(init_step, eps),
        scaling.scale_by_learning_rate(learning_rate),
    )


def scale_by_dowg(init_estim_sq_dist: Any = None, eps: Any = 1e-4) -> GradientTransformation:
    """Scales updates by the Distance over Weighted Gradients step size (DoWG; Khaled et al.,
    2023).

    Update rule, with ``x₀`` the initial parameters and norms over the whole tree::

        r² ← max(r², ‖x − x₀‖²)       V ← V + r² · ‖g‖²
        u = r² / (√V + eps) · g

    ``r²`` starts at ``init_estim_sq_dist`` (``eps`` when ``None``). ``update`` needs
    ``params``. ``torch.optim`` has no DoWG. Differences from optax: as :func:`scale_by_dog`.

    Args:
        init_estim_sq_dist: the initial squared-distance estimate, ``≥ 0``, or ``None``.
        eps: added to ``√V``, ``≥ 0``; the default initial estimate.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_dowg(init_estim_sq_dist=4.0, eps=0.0)
        >>> params = [torch.tensor([1.0])]
        >>> tx.update([torch.tensor([3.0])], tx.init(params), params)[0]
        [tensor([2.])]
    """
    _check_eps(eps)
    if init_estim_sq_dist is not None:
        _check_nonnegative("init_estim_sq_dist", init_estim_sq_dist)

    def init_fn(params: Any) -> DoWGState:
        sd = _state_dtype(_params_leaves(params, "scale_by_dowg"))
        device = _utils.default_device(params)
        start = eps if init_estim_sq_dist is None else init_estim_sq_dist
        return DoWGState(
            init_params=_copy(params),
            weighted_sq_norm_grads=torch.zeros((), dtype=sd, device=device),
            estim_sq_dist=_scalar(start, sd, device),
        )

    def update_fn(
        updates: Any, state: DoWGState, params: Any = None, **extra: Any
    ) -> tuple[Any, DoWGState]:
        del extra
        g, spec, x, x0, init = _flat_real(updates, params, state.init_params, "scale_by_dowg")
        if not g:
            return updates, state
        sd = state.estim_sq_dist.dtype
        estim = torch.maximum(state.estim_sq_dist, _sq_norm(list(_foreach.sub(x0, x)), sd))
        estim = estim.to(sd)
        weighted = (estim * _sq_norm(widen_all(g), sd) + state.weighted_sq_norm_grads).to(sd)
        lr = estim / (torch.sqrt(weighted) + _on(eps, weighted))
        new = DoWGState(init, weighted, estim)
        return tree.unflatten(spec, _scaled(g, lr)), new

    return GradientTransformation(init_fn, update_fn)


def dowg(
    learning_rate: ScalarOrSchedule = 1.0,
    init_estim_sq_dist: Any = None,
    eps: Any = 1e-4,
    weight_decay: ScalarOrSchedule | None = None,
    mask: Any = None,
) -> GradientTransformation:
    """DoWG, optax.contrib's alias: optional weight decay, :func:`scale_by_dowg`, learning rate.

    ``chain(add_decayed_weights(weight_decay, mask) if weight_decay is not None else
    identity(), scale_by_dowg(init_estim_sq_dist, eps), scale_by_learning_rate(learning_rate))``.
    ``torch.optim`` has no DoWG.

    Args:
        learning_rate: multiplies DoWG's step size (1 by default): a number, a 0-d tensor or a
            schedule.
        init_estim_sq_dist: the initial squared-distance estimate (``eps`` when ``None``).
        eps: added to the root of the weighted sum, ``≥ 0``.
        weight_decay: optional weight decay added to the gradients before DoWG.
        mask: where weight decay applies (a pytree of booleans or a callable).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.dowg(init_estim_sq_dist=4.0, eps=0.0)
        >>> params = [torch.tensor([1.0])]
        >>> tx.update([torch.tensor([3.0])], tx.init(params), params)[0]
        [tensor([-2.])]
    """
    return chain(
        additive.add_decayed_weights(weight_decay, mask)
        if weight_decay is not None
        else identity(),
        scale_by_dowg(init_estim_sq_dist, eps),
        scaling.scale_by_learning_rate(learning_rate),
    )


def _check_init_step(init_step: Any) -> tuple[str, Any]:
    if not isinstance(init_step, (tuple, list)) or len(init_step) != 2:
        raise TypeError(f"init_step must be a pair (kind, value), got {init_step!r}")
    kind, value = init_step
    if kind not in _INIT_STEPS:
        raise ValueError(f"init_step kind must be one of {_INIT_STEPS}, got {kind!r}")
    _check_nonnegative("init_step value", value)
    return kind, value


def _check_eps(eps: Any) -> None:
    _check_nonnegative("eps", eps)


def _check_nonnegative(name: str, value: Any) -> None:
    _ops.refuse_schedule(name, value)
    _utils.check_finite_number(name, value, minimum=0.0)
    _ops.check_scalar_tensor(name, value)
