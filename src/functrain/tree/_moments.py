"""Moving averages of gradient moments and their bias correction, leaf-wise (optax's).

``update_moment``, ``update_moment_per_elem_norm``, ``update_infinity_moment`` and
``bias_correction``: the building blocks of Adam-like transforms. ``decay``, ``eps`` and
``count`` may be Python numbers or 0-d tensors; a 0-d tensor acts like a Python number of its
kind (a float64 ``decay`` does not make a float32 moment float64, not even a 0-d one).
"""

from __future__ import annotations

import optree
import torch

from functrain.tree._structure import PyTree
from functrain.tree._structure import map as tree_map

Scalar = float | torch.Tensor

_REAL_OF = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return _REAL_OF.get(dtype, dtype)


def _in(result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``result`` in ``dtype``, the dtype of the leaves it was computed from.

    Torch promotes a 0-d leaf by a 0-d float64 hyperparameter (a dimensioned one it does not);
    casting back makes a tensor ``decay`` act like a Python number for every leaf.
    """
    if not (dtype.is_floating_point or dtype.is_complex) or result.dtype == dtype:
        return result
    return result.to(dtype)


def update_moment(updates: PyTree, moments: PyTree, decay: Scalar, order: float) -> PyTree:
    """The exponential moving average of the ``order``-th power of the updates.

    ``(1 - decay) * g**order + decay * m`` leaf-wise; for complex ``g`` the power is the
    complex one (see :func:`update_moment_per_elem_norm` for ``|g|**order``).

    Args:
        updates: a pytree of tensors ``g``; ``None`` subtrees stay ``None`` (masked out).
        moments: the previous moments ``m``, with ``updates``' structure and leaf shapes.
        decay: the averaging weight of the old moment, a Python number or 0-d tensor.
        order: the power of the updates, e.g. 1 for Adam's ``mu``, 2 for its ``nu``.

    Returns:
        A new pytree of ``updates``' structure; each leaf in the dtype promoted from ``g`` and
        ``m``.

    Raises:
        TreeMismatchError: if ``moments`` does not have ``updates``' structure, naming the path.

    Example:
        >>> import torch, functrain as ft
        >>> g, m = {"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])}
        >>> ft.tree.update_moment(g, m, 0.9, 2)  # 0.1 * 4 + 0.9 * 1
        {'w': tensor([1.3000])}
    """

    def one(g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return _in((1 - decay) * g**order + decay * m, torch.promote_types(g.dtype, m.dtype))

    return tree_map(one, updates, moments)


def _abs_pow(g: torch.Tensor, order: float) -> torch.Tensor:
    """``g**order`` for real ``g``, ``|g|**order`` for complex ``g`` (via ``|g|²``)."""
    if not g.is_complex():
        return g**order
    half = order / 2
    # An integer power is exact (and torch.square for 2): |g|² ** 1.0 would go through pow.
    return (g.real.square() + g.imag.square()) ** (int(half) if float(half).is_integer() else half)


def update_moment_per_elem_norm(
    updates: PyTree, moments: PyTree, decay: Scalar, order: float
) -> PyTree:
    """The exponential moving average of the ``order``-th power of each element's modulus.

    ``(1 - decay) * |g|**order + decay * m`` leaf-wise; for real ``g`` the power is ``g**order``
    (the sign kept for odd orders, as in optax), for complex ``g`` it is
    ``(re(g)² + im(g)²) ** (order / 2)``, a real number.

    Args:
        updates: a pytree of tensors ``g``; ``None`` subtrees stay ``None`` (masked out).
        moments: the previous moments ``m`` (real), with ``updates``' structure.
        decay: the averaging weight of the old moment, a Python number or 0-d tensor.
        order: the power, e.g. 2 for Adam's ``nu`` of complex parameters.

    Returns:
        A new pytree of ``updates``' structure; each leaf in the dtype promoted from the real
        dtype of ``g`` and that of ``m``.

    Raises:
        TreeMismatchError: if ``moments`` does not have ``updates``' structure, naming the path.

    Example:
        >>> import torch, functrain as ft
        >>> g = {"w": torch.tensor([3.0 + 4.0j])}
        >>> ft.tree.update_moment_per_elem_norm(g, {"w": torch.zeros(1)}, 0.5, 2)  # 0.5 * 25
        {'w': tensor([12.5000])}
    """

    def one(g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(_real_dtype(g.dtype), m.dtype)
        return _in((1 - decay) * _abs_pow(g, order) + decay * m, dtype)

    return tree_map(one, updates, moments)


def update_infinity_moment(updates: PyTree, moments: PyTree, decay: Scalar, eps: Scalar) -> PyTree:
    """The exponentially weighted infinity norm of the updates (Adamax's ``nu``).

    ``max(|g| + eps, decay * m)`` leaf-wise; NaN in either propagates, as in ``jnp.maximum``.

    Args:
        updates: a pytree of tensors ``g``; ``None`` subtrees stay ``None`` (masked out).
        moments: the previous moments ``m``, with ``updates``' structure and leaf shapes.
        decay: the weight of the old moment, a Python number or 0-d tensor.
        eps: added to ``|g|``, a Python number or 0-d tensor.

    Returns:
        A new pytree of ``updates``' structure; each leaf in the dtype promoted from the real
        dtype of ``g`` and that of ``m``.

    Raises:
        TreeMismatchError: if ``moments`` does not have ``updates``' structure, naming the path.

    Example:
        >>> import torch, functrain as ft
        >>> g, m = [torch.tensor([-1.0, 0.5])], [torch.tensor([2.0, 0.0])]
        >>> ft.tree.update_infinity_moment(g, m, 0.9, 0.0)
        [tensor([1.8000, 0.5000])]
    """

    def one(g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(_real_dtype(g.dtype), m.dtype)
        return _in(torch.maximum(g.abs() + eps, decay * m), dtype)

    return tree_map(one, updates, moments)


def _power_dtype(dtype: torch.dtype, decay: Scalar, count: int | torch.Tensor) -> torch.dtype:
    """Where ``decay ** count`` is computed: at least float32 (in bfloat16, 0.999**10 rounds
    to 1 and the correction divides by zero, as optax notes), at least the moment's real
    precision (a float64 moment gets a float64 correction), and a tensor decay's or a
    floating count's precision."""
    out = torch.promote_types(_real_dtype(dtype), torch.float32)
    if not out.is_floating_point:  # integer moments: optax's float32 default
        out = torch.float32
    for x in (decay, count):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out = torch.promote_types(out, x.dtype)
    return out


def bias_correction(moment: PyTree, decay: Scalar, count: int | torch.Tensor) -> PyTree:
    """Divides every leaf by ``1 - decay**count``, Adam's bias correction (optax's).

    ``decay**count`` is computed in at least float32 and at least the leaf's precision, then
    ``1 - decay**count`` is rounded to the leaf's dtype and the division done there, so a
    bfloat16 moment stays bfloat16. ``count = 0`` divides by zero (``inf`` or NaN), as in optax.

    Args:
        moment: a pytree of floating-point tensors; ``None`` subtrees stay ``None``.
        decay: the moment's decay rate, a Python number or 0-d tensor.
        count: the number of updates averaged, a Python int or 0-d tensor (an int32 step
            count); no host synchronization.

    Returns:
        A new pytree of ``moment``'s structure and leaf dtypes.

    Example:
        >>> import torch, functrain as ft
        >>> count = torch.tensor(2, dtype=torch.int32)
        >>> ft.tree.bias_correction({"mu": torch.tensor([0.19])}, 0.9, count)  # 0.19 / 0.19
        {'mu': tensor([1.])}
    """
    cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def one(t: torch.Tensor) -> torch.Tensor:
        key = (t.dtype, t.device)
        if key not in cache:
            dtype = _power_dtype(t.dtype, decay, count)
            if isinstance(decay, torch.Tensor):
                d = decay.to(device=t.device, dtype=dtype)
            else:
                d = torch.tensor(decay, dtype=dtype, device=t.device)
            c = count.to(t.device) if isinstance(count, torch.Tensor) else count
            cache[key] = (1 - d**c).to(t.dtype)
        return t / cache[key]

    return optree.tree_map(one, moment)
