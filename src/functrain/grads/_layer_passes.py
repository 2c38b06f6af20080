"""The passes of the ``"layers"`` method: per-sample gradients, norms, Gram matrices and
clipped sums from one forward under the layer rules (:mod:`functrain.grads._layer_rules`) and
one or two backward passes, each reading what the rules put in the
:class:`~functrain.grads._layer_grads.Sink`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from functrain import tree
from functrain.grads._layer_grads import Sink
from functrain.grads._layer_rules import forward_under_rules

__all__ = ["clipped_sum_by_layers", "gram_by_layers", "per_sample_by_layers", "sq_norms_by_layers"]


def _backward(losses: torch.Tensor, tag: torch.Tensor, weights: Any = None, **kwargs: Any) -> None:
    # Else no parameter was used, or there are no examples: every gradient is zero.
    if losses.requires_grad and losses.numel() > 0:
        grad_outputs = torch.ones_like(losses) if weights is None else weights
        torch.autograd.grad(losses, tag, grad_outputs, allow_unused=True, **kwargs)


def _filled(
    grads: list[torch.Tensor | None], leaves: list[torch.Tensor], rows: tuple[int, ...]
) -> list[torch.Tensor]:
    """Zeros, as ``torch.func.grad`` gives, for parameters the loss never used."""
    return [
        torch.zeros(*rows, *p.shape, dtype=p.dtype, device=p.device) if g is None else g
        for g, p in zip(grads, leaves)
    ]


def per_sample_by_layers(
    example_loss: Callable[[list[torch.Tensor], list[torch.Tensor]], Any],
    param_leaves: list[torch.Tensor],
    batch_leaves: list[torch.Tensor],
    randomness: str,
) -> tuple[Any, list[torch.Tensor]]:
    """``((losses, extras), per-example gradient leaves)``, or raises :class:`Unsupported`.

    ``example_loss(param_leaves, example_leaves) -> (loss, extras)`` is vmapped over the batch
    leaves' first dimension; ``loss`` is a 0-d tensor per example.

    Example:
        >>> import torch
        >>> from functrain.grads._layer_passes import per_sample_by_layers
        >>> w = torch.ones(1, 2)
        >>> loss = lambda p, ex: (torch.nn.functional.linear(ex[0], p[0]).sum(), ())
        >>> (losses, _), (gw,) = per_sample_by_layers(loss, [w], [torch.eye(2)], "error")
        >>> losses, gw
        (tensor([1., 1.]), tensor([[[1., 0.]],
        <BLANKLINE>
                [[0., 1.]]]))
    """
    (losses, extras), tag, sink, leaves = forward_under_rules(
        example_loss, param_leaves, batch_leaves, randomness
    )
    _backward(losses, tag)
    # ``vmap(grad)`` gives aux without autograd history: so does this method.
    extras = tree.map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, extras)
    return (losses.detach(), extras), _filled(sink.grads, leaves, (losses.shape[0],))


def _norms_pass(
    example_loss: Callable[[list[torch.Tensor], list[torch.Tensor]], Any],
    param_leaves: list[torch.Tensor],
    batch_leaves: list[torch.Tensor],
    randomness: str,
    keep_graph: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, Sink, list[torch.Tensor]]:
    """Forward and a backward pass in ``"norms"`` mode: ``(losses, squared norms, ...)``."""
    (losses, _extras), tag, sink, leaves = forward_under_rules(
        example_loss, param_leaves, batch_leaves, randomness
    )
    sink.mode = "norms"
    _backward(losses, tag, retain_graph=keep_graph)
    return losses, sink.squared_norms(losses.shape[0], losses.detach()), tag, sink, leaves


def sq_norms_by_layers(
    example_loss: Callable[[list[torch.Tensor], list[torch.Tensor]], Any],
    param_leaves: list[torch.Tensor],
    batch_leaves: list[torch.Tensor],
    randomness: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(losses, per-parameter per-example squared gradient norms)`` without the gradients.

    Example:
        >>> import torch
        >>> from functrain.grads._layer_passes import sq_norms_by_layers
        >>> loss = lambda p, ex: (torch.nn.functional.linear(ex[0], p[0]).sum(), ())
        >>> x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> sq_norms_by_layers(loss, [torch.ones(1, 2)], [x], "error")[1]
        [tensor([25.0000,  0.2500])]
    """
    losses, squares, *_ = _norms_pass(example_loss, param_leaves, batch_leaves, randomness, False)
    return losses.detach(), squares


def gram_by_layers(
    example_loss: Callable[[list[torch.Tensor], list[torch.Tensor]], Any],
    param_leaves: list[torch.Tensor],
    batch_leaves: list[torch.Tensor],
    randomness: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses, G)`` with ``Gᵢⱼ = ⟨gᵢ, gⱼ⟩`` from one backward pass, layer by layer.

    Example:
        >>> import torch
        >>> from functrain.grads._layer_passes import gram_by_layers
        >>> loss = lambda p, ex: (torch.nn.functional.linear(ex[0], p[0]).sum(), ())
        >>> x = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
        >>> gram_by_layers(loss, [torch.ones(1, 2)], [x], "error")[1]
        tensor([[1., 2.],
                [2., 5.]])
    """
    (losses, _extras), tag, sink, _leaves = forward_under_rules(
        example_loss, param_leaves, batch_leaves, randomness
    )
    sink.mode = "gram"
    _backward(losses, tag)
    detached = losses.detach()
    return detached, sink.gram_matrix(detached.shape[0], detached)


def clipped_sum_by_layers(
    example_loss: Callable[[list[torch.Tensor], list[torch.Tensor]], Any],
    param_leaves: list[torch.Tensor],
    batch_leaves: list[torch.Tensor],
    randomness: str,
    clip_factors: Callable[[list[torch.Tensor]], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(losses, factors, Σᵢ factorᵢ·gᵢ)`` without forming per-example gradients ("ghost").

    One forward and two backward passes over the same graph: the first gives each example's
    squared gradient norm per parameter, ``clip_factors(norms_sq) -> (B,)`` turns them into
    per-example weights, and the second is an ordinary backward pass of ``Σᵢ factorᵢ·lossᵢ``,
    which is the clipped sum. Raises :class:`Unsupported` like :func:`per_sample_by_layers`.

    Example:
        >>> import torch
        >>> from functrain.grads._layer_passes import clipped_sum_by_layers
        >>> w = torch.ones(1, 2)
        >>> loss = lambda p, ex: (torch.nn.functional.linear(ex[0], p[0]).sum(), ())
        >>> x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> unit = lambda sq: (1 / sum(sq).sqrt()).clamp(max=1)
        >>> losses, factors, (gw,) = clipped_sum_by_layers(loss, [w], [x], "error", unit)
        >>> factors, gw
        (tensor([0.2000, 1.0000]), tensor([[0.9000, 1.2000]]))
    """
    losses, squares, tag, sink, leaves = _norms_pass(
        example_loss, param_leaves, batch_leaves, randomness, True
    )
    factors = clip_factors(squares).detach()
    sink.mode, sink.grads = "sum", [None] * len(leaves)
    _backward(losses, tag, factors.to(losses.dtype))
    return losses.detach(), factors, _filled(sink.grads, leaves, ())
