"""``scale_gradient``: identity on the forward pass, gradient times ``scale`` on the backward pass.

As ``optax.scale_gradient``. Useful to slow down (``0 < scale < 1``), stop (``0``) or reverse
(``< 0``, a gradient reversal layer) the gradient flowing into part of a model, e.g. a target
network or a domain classifier.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from functrain import tree as _tree

__all__ = ["scale_gradient"]


def _check_scale(scale: Any) -> None:
    if isinstance(scale, torch.Tensor):
        if scale.dtype == torch.bool or scale.is_complex():
            raise TypeError(f"scale_gradient: scale must be real, got a {scale.dtype} tensor")
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(
            f"scale_gradient: scale must be a real number or tensor, got {type(scale).__name__}"
        )


def _scaled(x: torch.Tensor, scale: float | torch.Tensor, where: str) -> torch.Tensor:
    """``x`` itself in value, ``scale`` times the incoming gradient on the way back.

    Built from ``detach`` instead of a ``torch.autograd.Function``: torch.compile drops the
    custom backward of an autograd.Function under ``torch.func.grad`` (pytorch/pytorch#193279)
    and silently returns the unscaled gradient. ``x − x.detach()`` is exactly 0 in value with
    derivative 1, so ``x.detach() − scale · (x.detach() − x)`` equals ``x`` and has derivative
    ``scale`` in every autograd mode. Non-finite elements, where
    ``x − x`` is NaN, pass through unchanged with a zero gradient.
    """
    if isinstance(scale, torch.Tensor):
        real = x.real.dtype if x.is_complex() else x.dtype
        try:
            fits = torch.broadcast_shapes(scale.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"scale_gradient: scale of shape {tuple(scale.shape)} does not broadcast to "
                f"inputs{where} of shape {tuple(x.shape)}"
            )
        scale = scale.detach().to(device=x.device, dtype=real)  # no gradient, as optax's
    frozen = x.detach()
    zero = torch.where(torch.isfinite(frozen), frozen - x, torch.zeros_like(frozen))
    # ``± 0 + 0.0`` is ``+0.0`` and ``v − (+0.0)`` is exactly ``v`` for every ``v``, -0.0 included.
    return frozen - (scale * zero + 0.0)


def scale_gradient(inputs: Any, scale: float | torch.Tensor) -> Any:
    """Returns ``inputs`` unchanged, but scales the gradient flowing back through it by ``scale``.

    Forward: ``y = x``. Backward: ``∂L/∂x = scale · ∂L/∂y``, leaf by leaf on a pytree. It works
    under ``Tensor.backward``/``torch.autograd.grad``, ``torch.func.grad``/``vjp``/``vmap``
    and ``torch.compile(fullgraph=True)`` (it reads no value back to the host).

    As optax, a Python ``scale`` of ``1`` returns ``inputs`` itself and a Python ``0`` returns
    the leaves detached (``stop_gradient``). Floating and complex tensor leaves are scaled;
    other leaves (integer tensors, Python numbers) have no gradient and pass through as they are.

    Differences from optax: a tensor ``scale`` is never special-cased (optax compares it with 1
    and 0 on the host): a tensor 0 gives ``0 · g`` (NaN where ``g`` is infinite, where
    ``stop_gradient`` gives 0). A leaf's infinite or NaN elements get a zero gradient (optax:
    ``scale · g``). A scaled leaf is a new tensor equal to the input, not the input object.

    Args:
        inputs: a pytree of tensors.
        scale: a real Python number or a real tensor broadcastable to every leaf (usually 0-d);
            it receives no gradient.

    Returns:
        A pytree of the same structure and values as ``inputs``.

    Raises:
        TypeError: ``scale`` is not a real number or real tensor.
        ValueError: a tensor ``scale`` does not broadcast to a leaf (the message names the
            leaf's path).

    Example:
        >>> import torch
        >>> from functrain.optim.gradient_scaling import scale_gradient
        >>> x = torch.tensor([1.0, -2.0])
        >>> torch.func.grad(lambda x: (scale_gradient(x, 0.5) ** 2).sum())(x)
        tensor([ 1., -2.])
    """
    _check_scale(scale)
    if not isinstance(scale, torch.Tensor):
        if scale == 1:
            return inputs
        if scale == 0:
            return _tree.map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, inputs)
        scale = float(scale)
    paths, leaves, spec = _tree.flatten_with_paths(inputs)
    out = [
        _scaled(leaf, scale, _tree.path_str(path))
        if isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex())
        else leaf
        for path, leaf in zip(paths, leaves)
    ]
    return _tree.unflatten(spec, out)
