"""``split_real_and_imaginary``: run a transform on complex leaves as pairs of real leaves.

optax's ``contrib`` wrapper: each complex parameter and update leaf becomes a pair of real
leaves (real part, imaginary part) before the inner transform sees it, and the inner's real
updates are merged back into complex ones. An optimizer then treats ``z = x + iy`` exactly as
the two real parameters ``x`` and ``y`` (Adam's second moment is per part, not ``|z|²``).

PyTorch's complex gradients are already the conjugate-free ``∂L/∂x + i ∂L/∂y`` that this
expects (JAX users conjugate ``jax.grad``'s output first; PyTorch users do nothing).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch

from functrain.optim.base import GradientTransformation, _check_transform, with_extra_args_support

__all__ = ["SplitRealAndImaginaryState", "split_real_and_imaginary"]


class _Parts(NamedTuple):
    """The real and imaginary parts of one complex leaf (a pytree node: two real leaves)."""

    real: Any
    imaginary: Any


def _split(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_complex():
        return _Parts(x.real, x.imag)  # views: the inner transform must not (and does not) write
    return x


def _merge(x: Any) -> Any:
    if isinstance(x, _Parts):
        if x.real is None or x.imaginary is None:  # a masked-out pair stays masked
            return None
        return torch.complex(x.real, x.imaginary)
    return x


def _map(fn: Any, tree: Any, is_leaf: Any = None) -> Any:
    # None subtrees (masked leaves) are not leaves: they stay None.
    return optree.tree_map(fn, tree, is_leaf=is_leaf, namespace="functrain")


class SplitRealAndImaginaryState(NamedTuple):
    """State of :func:`split_real_and_imaginary`: the inner transform's ``inner_state``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.split_real_and_imaginary(ft.scale_by_adam())
        >>> tx.init([torch.zeros(1, dtype=torch.complex64)]).inner_state.mu
        [_Parts(real=tensor([0.]), imaginary=tensor([0.]))]
    """

    inner_state: Any


def split_real_and_imaginary(inner: GradientTransformation) -> GradientTransformation:
    """Wraps ``inner`` so that it sees each complex leaf as two real leaves.

    Real leaves pass to ``inner`` as they are. The inner state holds the pairs (its moments
    for a complex leaf are a ``(real, imaginary)`` named tuple of real tensors).

    Args:
        inner: the transform to run on the real parts.

    Returns:
        A transform whose updates have the complex dtypes of the input updates.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.split_real_and_imaginary(ft.sign_sgd(0.1))
        >>> params = [torch.zeros(2, dtype=torch.complex64)]
        >>> g = [torch.tensor([3.0 - 0.5j, -1.0 + 2.0j])]
        >>> tx.update(g, tx.init(params), params)[0]
        [tensor([-0.1000+0.1000j,  0.1000-0.1000j])]
    """
    inner = with_extra_args_support(_check_transform(inner, "split_real_and_imaginary inner"))

    def init_fn(params: Any) -> SplitRealAndImaginaryState:
        return SplitRealAndImaginaryState(inner.init(_map(_split, params)))

    def update_fn(
        updates: Any, state: SplitRealAndImaginaryState, params: Any = None, **extra: Any
    ) -> tuple[Any, SplitRealAndImaginaryState]:
        split_params = None if params is None else _map(_split, params)
        out, inner_state = inner.update(
            _map(_split, updates), state.inner_state, split_params, **extra
        )
        out = _map(_merge, out, is_leaf=lambda x: isinstance(x, _Parts))
        return out, SplitRealAndImaginaryState(inner_state)

    return GradientTransformation(init_fn, update_fn)
