"""The bias-only rule of grouped and depthwise convolutions (BitFit on a frozen depthwise CNN).

A ``convNd`` call with ``groups > 1`` whose weight is a constant (not a parameter, the same for
every example) and whose bias is a parameter runs as two steps: the convolution without its bias,
an ordinary torch call (its input gradient is then autograd's own grouped one), and
:class:`ConvBias`, which adds the bias on the physical batch and, in its backward pass, hands the
:class:`~functrain.grads._layer_kernels.Sink` the bias's gradient: each example's output gradient
summed over its positions, whatever the groups. A trained grouped weight has its own rule
(:mod:`functrain.grads._layer_grouped_conv`).
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.grads._layer_kernels import _batch_first, _Rule

__all__ = ["ConvBias"]

CONV_CALLS = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


class ConvBias(_Rule):
    """``y + bias`` along the channels of a convolution's output ``y: (B, [N,] C, *spatial)``
    (``spatial`` trailing dimensions, the vmap dimension in front); per-example ``Σ g``."""

    @staticmethod
    def forward(y, bias, spatial, tag, slot, sink, anchor):  # type: ignore[no-untyped-def]
        # A new tensor, not a view: an in-place activation may follow.
        return y + bias.view(-1, *([1] * spatial))

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        _y, _bias, spatial, _tag, slot, sink, _anchor = inputs
        ctx.spatial, ctx.slot, ctx.sink = spatial, slot, sink

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        channel = g.dim() - ctx.spatial - 1
        # Each example's output gradient summed over everything but the channels: (B, C).
        # (Summed by dimensions, not reshaped to (B, C, -1): an empty batch makes -1 ambiguous.)
        rest = [d for d in range(1, g.dim()) if d != channel]
        ctx.sink.put(ctx.slot, lambda: g.sum(rest), lambda: g.sum([0, *rest]))
        gy = g if ctx.needs_input_grad[0] else None
        return gy, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, y, bias, spatial, tag, slot, sink, anchor):  # type: ignore[no-untyped-def]
        y = _batch_first(info, y, in_dims[0])
        return ConvBias.apply(y, bias, spatial, tag, slot, sink, anchor), 0
