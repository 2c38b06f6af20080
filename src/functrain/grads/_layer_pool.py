"""Max pooling of the ``"layers"`` method's physical batch in channels-last layout, on the CPU.

Pooling holds no parameters, but in small CNNs it is the forward's most expensive call: CPU max
pooling of contiguous (NCHW) feature maps runs 1.5-3x slower than of channels-last ones once
there are 8 or more channels (64x16x14x14, kernel 2, stride 1: 1.8 ms forward and backward
against 0.8 ms, both copies included). With fewer channels the copies do not pay. Both layouts
take the first maximum of each window, so values and the gradient's routing are the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

__all__ = ["MIN_CHANNELS", "pool_channels_last"]

MIN_CHANNELS = 8


class _ChannelsLastMaxPool(torch.autograd.Function):
    """``max_pool2d`` on ``(B, C, H, W)`` computed channels last, input and output gradients
    contiguous: the convolutions around it (and their per-sample rules) read contiguous maps."""

    @staticmethod
    def forward(ctx: Any, images: torch.Tensor, options: tuple[Any, ...]) -> torch.Tensor:  # type: ignore[override]
        x = images.contiguous(memory_format=torch.channels_last)
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, *options)
        ctx.save_for_backward(x, indices)
        ctx.options = options
        return out.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        x, indices = ctx.saved_tensors
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            g.contiguous(memory_format=torch.channels_last), x, *ctx.options, indices
        )
        return gx.contiguous(), None


def pool_channels_last(p: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
    """``F.max_pool2d(p, **call)`` of a physical batch ``(B, [N,] C, H, W)``, channels last.

    ``call`` holds ``F.max_pool2d``'s or ``torch.max_pool2d``'s arguments other than the input
    (``return_indices`` false).
    """
    kernel = _pair(call["kernel_size"])
    stride = call.get("stride")
    options = (
        list(kernel),
        list(_pair(stride)) if stride is not None and stride != [] else [],
        list(_pair(call.get("padding", 0))),
        list(_pair(call.get("dilation", 1))),
        bool(call.get("ceil_mode", False)),
    )
    images = p.flatten(0, p.dim() - 4)  # (B·N, C, H, W)
    return _ChannelsLastMaxPool.apply(images, options).unflatten(0, p.shape[:-3])
