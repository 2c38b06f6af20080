"""Global scalar statistics of parameter-free optimizers (Prodigy, D-Adaptation, DoG, DoWG,
Mechanic, COCOB): dots and norms over every leaf as 0-d tensors, their dtype, and the copies of
the initial point their states keep."""

from __future__ import annotations

from typing import Any

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils
from functrain.optim._adam_ops import Hyper


def _params_leaves(params: Any, name: str) -> list[torch.Tensor]:
    r"""The tensor leaves of ``params`` for an ``init`` (``nn.Parameter``\ s detached, as
    :func:`functrain.optim._utils.initial_copy`), refusing complex ones by path."""
    _refuse_complex(params, "params", name)
    return [
        x.detach() if isinstance(x, torch.nn.Parameter) else x
        for x in tree.leaves(params)
        if isinstance(x, torch.Tensor)
    ]


def _refuse_complex(values: Any, root: str, name: str) -> None:
    found = _utils.complex_leaf(values, root)
    if found is not None:
        raise TypeError(
            f"{name}: {found[0]} is {found[1]}; it needs real floating-point leaves (optax's "
            "formulas take real dot products and maxima)"
        )


def _state_dtype(leaves: list[torch.Tensor]) -> torch.dtype:
    """optax's ``tree.dtype(params, "lowest")`` for the 0-d statistics, widened to float32
    (a bfloat16 distance estimate would round every step's comparison)."""
    floats = [x.dtype for x in leaves if x.is_floating_point()]
    if not floats:
        return torch.float32
    lowest = min(floats, key=lambda d: torch.finfo(d).bits)
    return torch.promote_types(lowest, torch.float32)


def _scalar(value: Hyper, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        # Not detached: a tensor hyperparameter may be differentiated (optax's jax.grad).
        return value.to(dtype=dtype, device=device, copy=True)
    return torch.tensor(value, dtype=dtype, device=device)


def _on(value: Hyper, like: torch.Tensor) -> Hyper:
    """A tensor hyperparameter on ``like``'s device and dtype (numbers pass through)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return value


def _copy(params: Any) -> Any:
    """The initial point: a copy, so that the state never aliases the live parameters
    (:func:`functrain.optim._utils.initial_copy`: an ``nn.Parameter`` is copied detached)."""
    return tree.map(_utils.initial_copy, params)


def _moments_like(params: Any) -> Any:
    """Zeros for Prodigy's and D-Adaptation's per-element moments: float32 for float16 leaves.

    Those moments are scaled by the distance estimate, about ``1e-6 · g`` at the start, and
    ``(1e-6 · g)²`` is below float16's smallest subnormal: a float16 ``v`` stored 0 and the
    next step was ``m / (d · eps)``, millions of times too long.
    """

    def zeros(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x, dtype=torch.float32 if x.dtype == torch.float16 else None)

    return tree.map(zeros, params)


def _dot(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``Σ ⟨a_i, b_i⟩`` over the leaves, summed in (at least) ``dtype``.

    A pair of dtypes is promoted first: ``vdot`` refuses two (float32 gradients of float64
    parameters made :func:`~functrain.mechanize` fail).
    """
    dots = [torch.vdot(*_promoted(x.reshape(-1), y.reshape(-1))) for x, y in zip(a, b)]
    return _total(dots, dtype)


def _promoted(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype == y.dtype:
        return x, y
    wide = torch.promote_types(x.dtype, y.dtype)
    return x.to(wide), y.to(wide)


def _abs_sum(xs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``Σ |x|`` over every element of every leaf."""
    return _total([x.abs().sum() for x in xs], dtype)


def _sq_norm(xs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The squared global L2 norm, reduced in at least ``dtype``."""
    return tree.norm([x.to(torch.promote_types(x.dtype, dtype)) for x in xs], squared=True)


def _root(sq: torch.Tensor) -> torch.Tensor:
    """``√sq`` of a squared norm, with derivative 0 rather than NaN at ``sq = 0`` when it may
    be differentiated (``√``'s infinite slope times ``d(sq) = 0``): DoG's first distance from
    the initial point is exactly 0, as ``linalg.vector_norm``'s subgradient at 0."""
    return torch.sqrt(sq) if _foreach.may_write(sq) else _ops.safe_sqrt(sq)


def _total(values: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    wide = torch.promote_types(dtype, values[0].dtype)
    for v in values[1:]:
        wide = torch.promote_types(wide, v.dtype)
    return torch.stack([v.to(wide) for v in values]).sum()
