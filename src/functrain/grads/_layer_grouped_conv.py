"""The rule of grouped and depthwise convolutions with a trained weight (``groups > 1``).

A ``convNd`` call with ``groups = G > 1`` whose weight ``(C_out, C_in/G, *kernel)`` is a
parameter (MobileNet / ConvNeXt depthwise layers under full fine-tuning) runs as
:class:`GroupedConv` on the physical batch ``x: (B, N, C_in, *spatial)`` (the vmap dimension in
front, ``N`` an example's own batch). Example ``b``'s weight gradient for group ``j`` is the
groups=1 formula within the group: ``Σ_{n, positions} g[b, n, j-th C_out/G outputs] ⊗
patch[b, n, j-th C_in/G inputs]``. The input gradient is the grouped one (``aten``'s own
convolution backward with ``groups=G``), and so is the summed weight gradient of ``"sum"``
mode. Two routes form the per-example weight gradients (:func:`_route`):

* ``"stacked"``: one convolution backward with ``groups = B·G`` over the examples stacked as
  channels (group ``b·G + j`` is group ``j`` of example ``b``), ``N`` as its batch; already in
  the weight's element order;
* ``"depthwise"`` (one input channel per group): one multiply-and-sum per kernel offset on the
  channels-last input and output gradient, no patches.

A trained bias's per-example gradient is the output gradient summed over ``N`` and the
positions, as for ``groups=1``. A constant weight with a trained bias is the bias-only rule's
(:mod:`functrain.grads._layer_rule_bias`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from functrain.grads._layer_grads import _CONV, _symmetric, conv_backward_start, conv_input_grad
from functrain.grads._layer_kernels import (
    _batch_first,
    _row_gram,
    _row_sq,
    _Rule,
    stacked_weight_grads,
)

__all__ = ["GroupedConv", "grouped_refusal"]


def grouped_refusal(weight: torch.Tensor, bias: Any, groups: Any) -> str | None:
    """Why :class:`GroupedConv` cannot take a call (the refusal's context), or ``None``.

    torch's own convolution refuses these arguments too (a bias of another shape or dtype, a
    weight whose outputs the groups do not divide); refusing here lets ``"auto"`` fall back to
    ``vmap`` and raise torch's error rather than one from inside the rule.
    """
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        return f"with groups={groups!r}"
    if weight.dim() < 3 or weight.shape[0] % groups:
        return f"with groups={groups} and a weight of shape {tuple(weight.shape)}"
    if isinstance(bias, torch.Tensor) and (
        tuple(bias.shape) != tuple(weight.shape[:1]) or bias.dtype != weight.dtype
    ):
        return (
            f"with a bias of shape {tuple(bias.shape)} and dtype {bias.dtype} for a weight "
            f"of shape {tuple(weight.shape)} and dtype {weight.dtype}"
        )
    return None


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """``(B, N, C, *spatial)`` -> ``(B, N, *spatial, C)``, contiguous (a copy unless C is 1)."""
    return t.movedim(2, -1).contiguous()


def _offset_view(
    padded: torch.Tensor,
    offset: Sequence[int],
    out_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """The channels-last input each output position meets at one kernel offset:
    ``(B, N, *out_size, C)``, a strided view of ``padded: (B, N, *spatial, C)``."""
    st = padded.stride()
    spatial = st[2:-1]
    start = sum(k * d * s for k, d, s in zip(offset, dilation, spatial))
    return padded.as_strided(
        (*padded.shape[:2], *out_size, padded.shape[-1]),
        (st[0], st[1], *(s * sp for s, sp in zip(stride, spatial)), st[-1]),
        padded.storage_offset() + start,
    )


def _depthwise_grads(
    g: torch.Tensor,
    padded: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """``(B, C_in, mult, K)`` (any order: norms and Gram entries) for one input channel per
    group: ``Σ_{n, p} g[b, n, c·mult + m, p] · x[b, n, c, stride·p + dilation·k]``, one
    multiply-and-sum per kernel offset ``k`` over the channels-last input and output gradient
    (channels the innermost, contiguous run: vectorised reductions over the positions)."""
    rows, n = g.shape[:2]
    channels = padded.shape[2]
    mult = g.shape[2] // channels
    out_size, kernel = g.shape[3:], weight.shape[2:]
    x_cl = _channels_last(padded)
    # (B, N, *out, C, mult): the output channel c·mult + m is input channel c's m-th.
    g_cl = _channels_last(g).view(rows, n, *out_size, channels, mult)
    over = list(range(1, 2 + len(out_size)))  # N and the positions
    parts = []
    for offset in _offsets(kernel):
        x_k = _offset_view(x_cl, offset, out_size, stride, dilation).unsqueeze(-1)
        parts.append((g_cl * x_k).sum(over))
    return torch.stack(parts, -1)


def _offsets(kernel: Sequence[int]) -> list[tuple[int, ...]]:
    """Every kernel offset, first dimension slowest (the weight's element order)."""
    return list(itertools.product(*(range(k) for k in kernel)))


# Which route forms the per-example weight gradients. Measured on the CPU (one thread of two
# shared cores, batch 64, weight gradients alone, medians of 9 interleaved runs; the machine was
# shared, so single numbers moved by up to 2x): in float32 oneDNN's grouped kernel ("stacked")
# took 0.3-0.5x the time of the per-offset products ("depthwise") for undilated depthwise 3x3
# layers of 32-256 channels at 4x4-16x16 (e.g. 1.05 against 3.6 ms for 64 channels at 16x16,
# stride 2; 8.6 against 27 ms for 16 -> 32 channels at 32x32) and 1-d kernels of 3 taps, about
# the same for dilated 3x3 and 7-tap 1-d kernels, and 1.3-3.4x for 5x5, 7x7 (ConvNeXt, 96
# channels at 8x8: 14.9 against 8.7 ms), 15-31-tap 1-d and 3-d kernels. In float64 (no
# oneDNN kernels) the per-offset products took 0.2-0.6x for most depthwise layers, but 1.6-5x
# with two outputs per input channel. For grouped layers with several input channels per group,
# "stacked" beat the patches with a batched matmul per group (B·G small matmuls over a copy of
# K patches) 1.3-6x in both dtypes (e.g. 1.5 against 8.6 ms, 64 -> 64 channels, 8 groups, 3x3
# at 8x8), about equal for 1x1 kernels: no patches route. Off the CPU (not measured): "stacked",
# one kernel call.
DEPTHWISE_FAST_KERNEL = 9  # oneDNN's float32 depthwise kernel wins up to 3x3 (or 9 taps)


def _route(x: torch.Tensor, weight: torch.Tensor, dilation: Sequence[int]) -> str:
    """``"stacked"`` or ``"depthwise"``: which per-example route to take (see above)."""
    if weight.shape[1] != 1 or x.device.type != "cpu":
        return "stacked"
    if x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        onednn = (
            torch.backends.mkldnn.enabled
            and weight.dim() <= 4
            and math.prod(weight.shape[2:]) <= DEPTHWISE_FAST_KERNEL
            and all(d == 1 for d in dilation)
        )
        return "stacked" if onednn else "depthwise"
    mult = weight.shape[0] // x.shape[2]
    return "depthwise" if mult == 1 else "stacked"


class GroupedConv(_Rule):
    """``convNd`` with ``groups > 1`` on ``x: (B, N, C_in, *spatial)``, the vmap dimension in
    front; per-example weight gradients by the route :func:`_route` picks, ``Σ g`` for a bias."""

    @staticmethod
    def forward(x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation, groups):  # type: ignore[no-untyped-def]
        symmetric = _symmetric(pads)
        if symmetric is None:
            x, symmetric = F.pad(x, pads), [0] * len(stride)
        # (B·N, out, *spatial), unflattened by on_batch: a view returned by a Function can't be
        # modified in place (an in-place activation may follow).
        conv = _CONV[weight.dim() - 2]
        return conv(x.flatten(0, 1), weight, bias, stride, symmetric, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, weight, _bias, _tag, slots, sink, _anchor, stride, pads, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.slots, ctx.sink, ctx.conv = slots, sink, (stride, pads, dilation, groups)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, pads, dilation, groups = ctx.conv
        # The grouped input gradient and, in "sum" mode, the summed weight gradient: one call.
        g, symmetric, source, padding, kernel_grads = conv_backward_start(
            ctx, g, x, weight, stride, pads, dilation, groups
        )
        rows, n, out_channels = g.shape[:3]
        route = _route(x, weight, dilation)

        def padded() -> torch.Tensor:
            return F.pad(x, pads) if any(pads) else x

        def any_order() -> torch.Tensor:
            # Norms and Gram entries do not depend on the elements' order: no reordering.
            if route == "depthwise":
                return _depthwise_grads(g, padded(), weight, stride, dilation)
            return stacked_weight_grads(g, source, weight, stride, padding, dilation, groups)

        def per_example() -> torch.Tensor:
            grads = any_order()
            if route == "depthwise":  # (B, C_in, mult, K) -> (B, C_out, 1, *kernel)
                return grads.reshape(rows, out_channels, 1, *weight.shape[2:])
            return grads

        ctx.sink.put(
            ctx.slots[0],
            per_example,
            lambda: kernel_grads[1],
            lambda: _row_sq(any_order()),
            lambda: _row_gram(any_order()),
        )
        g_rows = g.movedim(2, 1).reshape(rows, out_channels, -1)
        ctx.sink.put(ctx.slots[1], lambda: g_rows.sum(2), lambda: g_rows.sum((0, 2)))
        gx = conv_input_grad(ctx, kernel_grads, (rows, n), symmetric, pads)
        return gx, None, None, None, None, None, None, None, None, None, None

    @staticmethod
    def vmap(  # type: ignore[no-untyped-def]
        info, in_dims, x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation, groups
    ):
        x = _batch_first(info, x, in_dims[0])
        out = GroupedConv.on_batch(
            x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation, groups
        )
        return out, 0

    @staticmethod
    def on_batch(x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation, groups):  # type: ignore[no-untyped-def]
        """The call on a physical batch ``x`` (vmap dimension first)."""
        unbatched = x.dim() == weight.dim()  # an example's input without its own N dimension
        if unbatched:
            x = x.unsqueeze(1)
        out = GroupedConv.apply(
            x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation, groups
        )
        out = out.unflatten(0, x.shape[:2])
        return out.squeeze(1) if unbatched else out
