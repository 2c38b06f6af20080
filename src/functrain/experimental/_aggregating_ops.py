"""Private maths of :mod:`functrain.experimental.aggregating`: axes, batch statistics, merges.

Everything here reads shapes only (static metadata), never tensor values, so none of it
synchronises with the device or breaks a compiled graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from functrain import tree
from functrain._precision import widen

PerEltAxis = int | Sequence[int]


def check_axis(per_elt_axis: Any, name: str = "per_elt_axis") -> int | tuple[int, ...]:
    """``per_elt_axis`` as an int or a tuple of ints, or a ``TypeError`` naming ``name``.

    An int stays an int (optax tells the two apart: an int axis is one batch axis); a
    sequence becomes a tuple.
    """
    if isinstance(per_elt_axis, int) and not isinstance(per_elt_axis, bool):
        return per_elt_axis
    if isinstance(per_elt_axis, Sequence) and not isinstance(per_elt_axis, str):
        axes = tuple(per_elt_axis)
        if all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
            return axes
    raise TypeError(f"{name} must be an int or a sequence of ints, got {per_elt_axis!r}")


def dims(per_elt_axis: int | tuple[int, ...], x: Any, where: str) -> tuple[int, ...]:
    """The batch axes of the leaf ``x`` (at ``where``), non-negative, checked against its rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} must be a tensor, got {type(x).__name__}")
    axes = (per_elt_axis,) if isinstance(per_elt_axis, int) else per_elt_axis
    out = []
    for a in axes:
        if not -x.dim() <= a < x.dim():
            raise ValueError(
                f"{where}: per_elt_axis {a} is out of range for a tensor of shape {tuple(x.shape)}"
            )
        out.append(a % x.dim())
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: per_elt_axis {per_elt_axis!r} repeats an axis")
    return tuple(out)


def batch_size(per_elt_updates: Any, per_elt_axis: int | tuple[int, ...]) -> int:
    """The number of elements along ``per_elt_axis``, the same for every leaf (static)."""
    paths, leaves, _ = tree.flatten_with_paths(per_elt_updates)
    sizes = []
    for path, x in zip(paths, leaves):
        d = dims(per_elt_axis, x, tree.path_str(path, "per_elt_updates"))
        sizes.append(math.prod([x.shape[i] for i in d]))  # a list: dynamo cannot trace genexprs
    if not sizes:
        raise ValueError("per_elt_updates has no tensor leaves: there is no batch size to read")
    if len(set(sizes)) > 1:
        where = ", ".join(
            f"{tree.path_str(p, 'per_elt_updates')}: {s}" for p, s in zip(paths, sizes)
        )
        raise ValueError(f"Per-element updates must have the same batch size. Got: {where}")
    return sizes[0]


def _mean_keep(x: torch.Tensor, d: tuple[int, ...]) -> torch.Tensor:
    # torch reads an empty ``dim`` as "every axis"; optax's ``axis=()`` reduces nothing.
    return x.mean(dim=d, keepdim=True) if d else x


def _squeeze(x: torch.Tensor, d: tuple[int, ...]) -> torch.Tensor:
    return x.squeeze(d) if d else x


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of ``x``'s statistics: its own, or for integers and bools the default float
    dtype (jnp.mean promotes them to float; torch's mean refuses them)."""
    return x.dtype if x.is_floating_point() or x.is_complex() else torch.get_default_dtype()


def _work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype its statistics are computed in (half precision in float32)."""
    return widen(x.to(_out_dtype(x)))


def mean(per_elt_updates: Any, per_elt_axis: int | tuple[int, ...]) -> Any:
    """The mean of every leaf over its batch axes (half precision averaged in float32;
    integers and bools in the default float dtype, as ``jnp.mean``)."""

    def one(path: Any, x: Any) -> torch.Tensor:
        d = dims(per_elt_axis, x, tree.path_str(path, "per_elt_updates"))
        return _squeeze(_mean_keep(_work(x), d), d).to(_out_dtype(x))

    return tree.map_with_path(one, per_elt_updates)


def mean_and_sum_sq_diff(per_elt_updates: Any, per_elt_axis: int | tuple[int, ...]) -> Any:
    """Per leaf, ``(mean, sum of squared differences to the mean)`` over the batch axes.

    Two passes (the mean first, then the squared deviations from it), as optax: exact where
    ``E[x²] − E[x]²`` cancels catastrophically. Half precision is computed in float32 and
    rounded once; integers and bools in the default float dtype. Returns two trees with the
    leaves' shapes without the batch axes.
    """
    paths, leaves, spec = tree.flatten_with_paths(per_elt_updates)
    means, ssds = [], []
    for path, x in zip(paths, leaves):
        d = dims(per_elt_axis, x, tree.path_str(path, "per_elt_updates"))
        xw = _work(x)
        m = _mean_keep(xw, d)
        diff = xw - m
        ssd = (diff * diff).sum(dim=d) if d else diff * diff
        means.append(_squeeze(m, d).to(_out_dtype(x)))
        ssds.append(ssd.to(_out_dtype(x)))
    return tree.unflatten(spec, means), tree.unflatten(spec, ssds)


def merge(
    mean_a: torch.Tensor,
    ssd_a: torch.Tensor,
    mean_b: torch.Tensor,
    ssd_b: torch.Tensor,
    micro_step: torch.Tensor,
    new_micro_step: torch.Tensor,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan et al.'s pairwise merge of ``micro_step`` equal batches with one more, as optax.

    With ``n_a = micro_step·size`` and ``n_b = size`` elements, ``δ = mean_b − mean_a``:
    ``mean = mean_a + δ/(micro_step+1)`` and
    ``ssd = ssd_a + ssd_b + δ²·n_a·n_b/(n_a+n_b)``, where ``n_a·n_b/(n_a+n_b)`` is
    ``micro_step·size/(micro_step+1)``. Half precision is merged in float32 and rounded once.
    """
    dtype = mean_a.dtype
    ma, sa, mb, sb = widen(mean_a), widen(ssd_a), widen(mean_b), widen(ssd_b)
    real = ma.real.dtype
    k = new_micro_step.to(real)
    delta = mb - ma
    new_mean = ma + delta / k
    size_factor = micro_step.to(real) * size / k
    new_ssd = sa + sb + delta * delta * size_factor
    return new_mean.to(dtype), new_ssd.to(dtype)


def select(cond: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where the 0-d bool ``cond`` holds, else ``old``, leaf by leaf in ``old``'s dtypes.

    A leaf that is not a tensor cannot depend on the data and is kept from ``old``.
    """

    def pick(o: Any, n: Any) -> Any:
        if not isinstance(o, torch.Tensor):
            return o
        return torch.where(cond, n, o).to(o.dtype)

    return tree.map(pick, old, new)


def select_or_zeros(cond: torch.Tensor, new: Any) -> Any:
    """``new`` where ``cond`` holds, else zeros like it (``None`` leaves stay ``None``)."""
    return tree.map(lambda n: torch.where(cond, n, torch.zeros_like(n)), new)
