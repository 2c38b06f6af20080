"""The per-layer gradient formulas of the ``"layers"`` method, as autograd Functions.

Each Function runs one layer call on the *physical* batch (the ``vmap`` dimension in front, see
each ``vmap`` rule) and, in its backward pass, hands its parameters' gradients to a
:class:`Sink`: per example, as per-example squared norms, or summed over the examples.
:mod:`functrain.grads._layer_rules` decides which calls use them.

The :class:`Sink`, the shared kernels and the ``_Rule`` base are in
:mod:`functrain.grads._layer_kernels` (re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from functrain._precision import widen

# The Sink and shared kernels live in _layer_kernels; re-exported (``X as X``) here.
from functrain.grads._layer_kernels import _C_APPLY as _C_APPLY
from functrain.grads._layer_kernels import Sink as Sink
from functrain.grads._layer_kernels import _batch_first as _batch_first
from functrain.grads._layer_kernels import _linear_gram as _linear_gram
from functrain.grads._layer_kernels import _linear_sq_norm as _linear_sq_norm
from functrain.grads._layer_kernels import _outer_sum as _outer_sum
from functrain.grads._layer_kernels import _row_gram as _row_gram
from functrain.grads._layer_kernels import _row_sq as _row_sq
from functrain.grads._layer_kernels import _Rule as _Rule
from functrain.grads._layer_kernels import stacked_weight_grads

__all__ = ["Conv", "Embedding", "LayerNorm", "Linear", "Sink"]


class Linear(_Rule):
    """``F.linear`` on a physical batch ``x: (B, ..., in)``; per-example ``gᵀx`` and ``Σ g``."""

    @staticmethod
    def forward(x, weight, bias, tag, slots, sink, anchor):  # type: ignore[no-untyped-def]
        # Rows flattened, unflattened by ``on_batch``: ``F.linear`` of a 3-d input returns a
        # view, and a view returned by a Function can't be modified in place (an in-place
        # ReLU after a sequence model's linear layer raised).
        return F.linear(x.flatten(0, -2), weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, weight, _bias, _tag, slots, sink, _anchor = inputs
        ctx.save_for_backward(x, weight)
        ctx.slots, ctx.sink = slots, sink

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        g = g.view(*x.shape[:-1], g.shape[-1])
        rows = x.shape[0]
        g3, x3 = g.reshape(rows, -1, g.shape[-1]), x.reshape(rows, -1, x.shape[-1])
        ctx.sink.put(
            ctx.slots[0],
            lambda: _outer_sum(g3, x3),
            lambda: g3.flatten(0, 1).t() @ x3.flatten(0, 1),
            lambda: _linear_sq_norm(g3, x3),
            lambda: _linear_gram(g3, x3),
        )
        ctx.sink.put(ctx.slots[1], lambda: g3.sum(1), lambda: g3.sum((0, 1)))
        gx = g @ weight if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, tag, slots, sink, anchor):  # type: ignore[no-untyped-def]
        x = _batch_first(info, x, in_dims[0])
        return Linear.on_batch(x, weight, bias, tag, slots, sink, anchor), 0

    @staticmethod
    def on_batch(x, weight, bias, tag, slots, sink, anchor):  # type: ignore[no-untyped-def]
        """The call on a physical batch ``x`` (vmap dimension first)."""
        out = Linear.apply(x, weight, bias, tag, slots, sink, anchor)
        return out.view(*x.shape[:-1], out.shape[-1])


def _symmetric(pads: Sequence[int]) -> list[int] | None:
    """The per-dimension padding (first dimension first) when ``F.pad`` widths are symmetric."""
    left, right = pads[0::2], pads[1::2]
    return list(reversed(left)) if list(left) == list(right) else None


def _patches(
    padded: torch.Tensor,
    out_size: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """The input patch each output position saw, ``(B, N·positions, kernel·C)``, channels last.

    One strided copy (``as_strided`` then ``reshape``): cheaper on CPU than ``F.unfold``. The
    channels are the innermost, contiguous run of each patch (the input is made channels-last
    first): copying runs of ``C`` elements is 2-10x faster than runs of a kernel row (e.g.
    0.96 -> 0.41 ms for the weight gradients of a 16 -> 32 channel 3x3 convolution at batch 64).
    """
    # (B, N, C, *spatial) -> (B, N, *spatial, C): a copy unless C is 1.
    padded = padded.movedim(2, -1).contiguous()
    rows, n, channels = padded.shape[0], padded.shape[1], padded.shape[-1]
    st = padded.stride()
    spatial = st[2:-1]
    # A single channel gets no dimension of its own: a trailing size-1 dimension with a large
    # stride kept the copy from merging dimensions (one element per inner loop, 18x slower).
    channel = ((channels,), (st[-1],)) if channels > 1 else ((), ())
    view = padded.as_strided(
        (rows, n, *out_size, *kernel, *channel[0]),
        (
            st[0],
            st[1],
            *(s * sp for s, sp in zip(stride, spatial)),
            *(d * sp for d, sp in zip(dilation, spatial)),
            *channel[1],
        ),
    )
    return view.reshape(rows, n * math.prod(out_size), -1)


# From this many input channels on, one grouped convolution formed the per-example weight
# gradients faster than the patches and a batched matmul on the CPU (float32, one thread): 0.4-0.8x
# the time for 8-128 channels in 1-, 2- and 3-d (e.g. 0.57 against 1.15 ms for the Opacus MNIST
# CNN's 16 -> 32 channel 4x4 layer at batch 64, 0.37x for a dilated 16 -> 16 3x3 layer), about
# equal at 256 channels, slower at 3-6 channels (1.2-2.2x). In float64 (no oneDNN kernels) it took
# 0.4-1.0x the time for 13 of 16 layers, 1.2-1.6x for a 3-d and a 32 -> 64 channel one.
GROUPED_MIN_CHANNELS = 8
# One input channel and a 1-d kernel of this many taps or more, with fewer than
# LONG_ROWS_MAX_OUT output channels: each patch is one contiguous run of the signal, cheap to
# copy, and the patches with one batched matmul beat both grouped convolutions. Per-example
# weight gradients alone (CPU time, one thread, float32, batch 32): the M5 audio CNN's first
# layer (1 -> 32, kernel 80, stride 4, 8000 samples) took 4.8 ms by the patches, 6.1 by the
# transposed and 8.4 by the grouped route; 1 -> 32 with kernels of 16-64 (stride 4) 1.19-1.38x
# and 1 -> 48, 64, 96 1.05-1.19x the patches' time by the transposed route, 1.1-2.4x by the
# grouped one (float64: 1.39x for the M5 layer); from 128 output channels the transposed route
# won (0.78-0.94x for kernels of 16-80), as it did for kernels under 16 taps (0.36-0.91x, e.g.
# wav2vec 2.0's 1 -> 512, kernel 10, stride 5 at 0.36x). 2-d kernels with long rows (3 x 40)
# kept the grouped routes (the patches 2.5x slower).
LONG_ROWS_MIN_TAPS = 16
LONG_ROWS_MAX_OUT = 128


def _long_rows(weight: torch.Tensor) -> bool:
    """A one-channel 1-d convolution whose patches are cheap (see :data:`LONG_ROWS_MIN_TAPS`)."""
    return (
        weight.dim() == 3
        and weight.shape[2] >= LONG_ROWS_MIN_TAPS
        and weight.shape[0] < LONG_ROWS_MAX_OUT
    )


def _grouped_pays(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether to form per-example weight gradients by one grouped convolution (CPU floats).

    With :data:`GROUPED_MIN_CHANNELS` or more input channels (and a kernel of more than one
    element: a 1x1 kernel's patches are the input itself), see there. With one input channel,
    only where there are over 4x more output positions than output channels (and not
    :func:`_long_rows`): there the patches of :func:`_patches` are runs of one kernel row, many
    times the size of the gradients they give, and writing them (fresh memory, page faults
    included) cost more than the grouped kernel: the Opacus MNIST CNN's first layer (1 -> 16
    channels, 8x8 kernel, 196 positions) took 6.4-7.0 ms instead of 6.8-7.9 ms for per-sample
    gradients at batch 64.
    """
    if g.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    in_channels = weight.shape[1]
    if in_channels >= GROUPED_MIN_CHANNELS:
        if x.dtype == torch.float32 and (in_channels % 8 or weight.shape[0] % 8):
            # oneDNN's grouped float32 kernel is slow off multiples of 8 channels: the weight
            # gradients alone took 1.25-1.63x the patches' time for 9-36 -> 16 channels and
            # 1.14-1.27x for 16 -> 10-30 (multiples of 8: 0.38-0.72x); float64 has no such
            # penalty.
            return False
        return math.prod(weight.shape[2:]) > 1
    return in_channels == 1 and math.prod(g.shape[3:]) > 4 * g.shape[2] and not _long_rows(weight)


def _grouped_weight_grads(
    g: torch.Tensor,
    source: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """``(B, out, in, *kernel)``: example ``b``'s weight gradient is that of group ``b`` of a
    convolution with ``groups=B`` over the examples' inputs stacked as channels
    (:func:`~functrain.grads._layer_kernels.stacked_weight_grads` with ``groups=1``)."""
    return stacked_weight_grads(g, source, weight, stride, padding, dilation, 1)


def _transposed_pays(x: torch.Tensor, weight: torch.Tensor, dilation: Sequence[int]) -> bool:
    """Whether to form a one-channel convolution's per-example weight gradients by one grouped
    *forward* convolution (:func:`_transposed_weight_grads`): CPU float32 (oneDNN's kernels;
    in float64 it was 1.0-2.0x slower than the other routes), 1- and 2-d, undilated.

    With cold caches, as in a backward pass, it took 0.43-0.96x the time of the patches and
    0.70-1.11x that of :func:`_grouped_weight_grads` over 1- and 2-d layers of 6-128 output
    channels (e.g. 1.05 against 1.40 ms for the Opacus MNIST CNN's first layer, 0.23 against
    0.27 ms for the 8x8-digits CNN's); dilated and 3-d layers ran 1.1-1.4x slower than grouped.
    Not for :func:`_long_rows` (long 1-d kernels with few output channels: the patches).
    """
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.shape[1] == 1
        and weight.dim() <= 4
        and all(d == 1 for d in dilation)
        and not _long_rows(weight)
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def _transposed_weight_grads(
    g: torch.Tensor,
    source: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
) -> torch.Tensor:
    """``(B, out, 1, *kernel)`` for a one-channel, undilated convolution and ``N = 1``.

    Example ``b``'s weight gradient ``Σ_p g[b, o, p] · x[b, stride·p + k]`` is a correlation
    of its input with its output gradient dilated by the stride: group ``b`` of a convolution
    with ``groups=B`` over the examples' inputs stacked as channels, whose kernels are the
    output gradients. Its output spans at least the kernel (``stride - 1`` more positions at
    most, cropped).
    """
    rows, out_channels = g.shape[0], g.shape[2]
    kernel = weight.shape[2:]
    grads = _CONV[len(kernel)](
        source.reshape(1, rows, *source.shape[3:]),
        g.reshape(rows * out_channels, 1, *g.shape[3:]),
        None,
        1,
        list(padding),
        list(stride),
        rows,
    )
    grads = grads[(..., *(slice(0, k) for k in kernel))]
    return grads.reshape(rows, out_channels, 1, *kernel).contiguous()


def conv_backward_start(
    ctx: Any,
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    pads: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[torch.Tensor, list[int] | None, torch.Tensor, list[int], list[Any]]:
    """What the convolution rules' backward passes (:class:`Conv`, ``GroupedConv``) start with.

    Returns ``g`` as ``(B, N, out, *spatial)``; the symmetric padding (``None`` if asymmetric);
    the input as the kernels take it with its padding (the kernels pad symmetrically
    themselves, so only asymmetric padding pays ``F.pad``'s copy); and one aten call's input
    gradient and, in ``"sum"`` mode, summed weight gradient (``[gx, gw, None]``, ``None`` where
    not asked for).
    """
    g = g.unflatten(0, x.shape[:2])
    symmetric = _symmetric(pads)
    source, padding = (
        (x, symmetric) if symmetric is not None else (F.pad(x, pads), [0] * len(stride))
    )
    want_weight = ctx.sink.mode == "sum" and ctx.slots[0] is not None
    kernel_grads: list[Any] = [None, None, None]
    if ctx.needs_input_grad[0] or want_weight:
        kernel_grads = list(
            torch.ops.aten.convolution_backward(
                g.flatten(0, 1),
                source.flatten(0, 1),
                weight,
                None,
                list(stride),
                padding,
                list(dilation),
                False,
                [0] * len(stride),
                groups,
                [ctx.needs_input_grad[0], want_weight, False],
            )
        )
    return g, symmetric, source, padding, kernel_grads


def conv_input_grad(
    ctx: Any,
    kernel_grads: list[Any],
    rows_n: Sequence[int],
    symmetric: list[int] | None,
    pads: Sequence[int],
) -> torch.Tensor | None:
    """The input gradient ``(B, N, C, *spatial)`` from :func:`conv_backward_start`'s call, or
    ``None`` when the input needs none; cropped where ``F.pad`` padded asymmetrically."""
    if not ctx.needs_input_grad[0]:
        return None
    gx = kernel_grads[0].unflatten(0, tuple(rows_n))
    if symmetric is None:
        gx = F.pad(gx, [-w for w in pads])  # the gradient of F.pad crops
    return gx


class Conv(_Rule):
    """``convNd`` (``groups=1``) on ``x: (B, N, C, *spatial)``, the vmap dimension in front.

    The per-example weight gradient ``Σ_{n, positions} g ⊗ patch`` is one batched matmul of the
    output gradient with the input's patches, or, on the CPU with ``N = 1`` where it measured
    faster, one grouped convolution over the examples: :func:`_transposed_weight_grads` (one
    input channel) or :func:`_grouped_weight_grads` (see :func:`_grouped_pays`).
    """

    @staticmethod
    def forward(x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation):  # type: ignore[no-untyped-def]
        symmetric = _symmetric(pads)
        if symmetric is None:
            x, symmetric = F.pad(x, pads), [0] * len(stride)
        # (B·N, out, *spatial), not unflattened here: a view returned by a Function can't be
        # modified in place (``nn.ReLU(inplace=True)`` after a convolution raised).
        return _CONV[weight.dim() - 2](x.flatten(0, 1), weight, bias, stride, symmetric, dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, weight, _bias, _tag, slots, sink, _anchor, stride, pads, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.slots, ctx.sink, ctx.conv = slots, sink, (stride, pads, dilation)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, pads, dilation = ctx.conv
        g, symmetric, source, padding, kernel_grads = conv_backward_start(
            ctx, g, x, weight, stride, pads, dilation, 1
        )
        rows, n, out_channels = g.shape[:3]
        g_rows = g.movedim(2, 1).reshape(rows, out_channels, -1)
        kernel = weight.shape[2:]

        transposed = n == 1 and _transposed_pays(x, weight, dilation)
        grouped = n == 1 and not transposed and _grouped_pays(g, x, weight)

        def channels_last() -> torch.Tensor:
            # (B, out, *kernel·in): each example's weight gradient with the input channels last.
            padded = F.pad(x, pads) if any(pads) and symmetric is not None else source
            return torch.bmm(g_rows, _patches(padded, g.shape[3:], kernel, stride, dilation))

        def per_example() -> torch.Tensor:
            if transposed:
                return _transposed_weight_grads(g, source, weight, stride, padding)
            if grouped:
                return _grouped_weight_grads(g, source, weight, stride, padding, dilation)
            grads = channels_last().view(rows, out_channels, *kernel, weight.shape[1])
            return grads.movedim(-1, 2).contiguous()

        # Norms and Gram matrices do not depend on the order of the elements: no reordering.
        any_order = per_example if grouped or transposed else channels_last
        ctx.sink.put(
            ctx.slots[0],
            per_example,
            lambda: kernel_grads[1],
            lambda: _row_sq(any_order()),
            lambda: _row_gram(any_order()),
        )
        ctx.sink.put(ctx.slots[1], lambda: g_rows.sum(2), lambda: g_rows.sum((0, 2)))
        gx = conv_input_grad(ctx, kernel_grads, g.shape[:2], symmetric, pads)
        return gx, None, None, None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation):  # type: ignore[no-untyped-def]
        x = _batch_first(info, x, in_dims[0])
        return Conv.on_batch(x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation), 0

    @staticmethod
    def on_batch(x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation):  # type: ignore[no-untyped-def]
        """The call on a physical batch ``x`` (vmap dimension first)."""
        unbatched = x.dim() == weight.dim()  # an example's input without its own N dimension
        if unbatched:
            x = x.unsqueeze(1)
        out = Conv.apply(x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation)
        out = out.unflatten(0, x.shape[:2])
        return out.squeeze(1) if unbatched else out


class LayerNorm(_Rule):
    """``F.layer_norm`` on ``x: (B, ..., *normalized_shape)``; per-example ``Σ g·x̂`` and ``Σ g``."""

    @staticmethod
    def forward(x, shape, weight, bias, eps, tag, slots, sink, anchor):  # type: ignore[no-untyped-def]
        return torch.native_layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, shape, weight, bias, _eps, _tag, slots, sink, _anchor = inputs
        _out, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape, ctx.slots, ctx.sink = shape, slots, sink
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, _g_mean: Any, _g_rstd: Any) -> Any:  # type: ignore[override]
        x, weight, bias, mean, rstd = ctx.saved_tensors
        rows = g.shape[0]
        if ctx.slots[0] is not None:
            scaled = (g * ((x - mean) * rstd)).reshape(rows, -1, *ctx.shape)
            ctx.sink.put(ctx.slots[0], lambda: scaled.sum(1), lambda: scaled.sum((0, 1)))
        per_row = g.reshape(rows, -1, *ctx.shape)
        ctx.sink.put(ctx.slots[1], lambda: per_row.sum(1), lambda: per_row.sum((0, 1)))
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.native_layer_norm_backward(
                g, x, ctx.shape, mean, rstd, weight, bias, [True, False, False]
            )[0]
        return gx, None, None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, shape, weight, bias, eps, tag, slots, sink, anchor):  # type: ignore[no-untyped-def]
        x = _batch_first(info, x, in_dims[0])
        out, mean, rstd = LayerNorm.apply(x, shape, weight, bias, eps, tag, slots, sink, anchor)
        return (out, mean, rstd), (0, 0, 0)


class Embedding(_Rule):
    """``F.embedding`` of indices ``(B, ...)``: per-example rows scattered into ``(B, V, D)``."""

    @staticmethod
    def forward(indices, weight, padding_idx, tag, slots, sink, anchor):  # type: ignore[no-untyped-def]
        return F.embedding(indices, weight, padding_idx)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        indices, weight, padding_idx, _tag, slots, sink, _anchor = inputs
        ctx.save_for_backward(indices)
        ctx.num, ctx.padding_idx, ctx.slots, ctx.sink = weight.shape[0], padding_idx, slots, sink

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        rows, num = g.shape[0], ctx.num
        flat = indices.reshape(rows, -1)
        row_shape = g.shape[indices.dim() :]
        dim = math.prod(row_shape)
        # ``dim`` spelled out, not -1: with no indices per example (an empty sequence) the
        # gradient has no elements and -1 would be ambiguous.
        rows_g = g.reshape(rows, flat.shape[1], dim)
        if ctx.padding_idx is not None:
            rows_g = rows_g * (flat != ctx.padding_idx).unsqueeze(-1).to(g.dtype)

        def per_example() -> torch.Tensor:
            offsets = torch.arange(rows, device=flat.device).unsqueeze(1) * num
            out = g.new_zeros(rows * num, dim)
            out.index_add_(0, (flat + offsets).reshape(-1), rows_g.reshape(-1, dim))
            return out.view(rows, num, *row_shape)

        def summed() -> torch.Tensor:
            out = g.new_zeros(num, dim).index_add_(0, flat.reshape(-1), rows_g.reshape(-1, dim))
            return out.view(num, *row_shape)

        def sq_norm() -> torch.Tensor:
            # ‖Σ_t onehot(i_t) g_tᵀ‖² = Σ_{t,t'} [i_t = i_t'] g_t·g_t': the ghost identity again.
            wide = widen(rows_g)
            same = (flat.unsqueeze(2) == flat.unsqueeze(1)).to(wide.dtype)
            return (same * torch.bmm(wide, wide.transpose(1, 2))).sum((1, 2))

        def gram() -> torch.Tensor:
            if flat.shape[1] ** 2 > num:  # per-example gradients are the smaller route
                return _row_gram(per_example())
            wide = widen(rows_g)
            same = (flat[:, None, :, None] == flat[None, :, None, :]).to(wide.dtype)
            return (same * torch.einsum("btd,cud->bctu", wide, wide)).sum((2, 3))

        ctx.sink.put(ctx.slots[0], per_example, summed, sq_norm, gram)
        return None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, indices, weight, padding_idx, tag, slots, sink, anchor):  # type: ignore[no-untyped-def]
        indices = _batch_first(info, indices, in_dims[0])
        return Embedding.apply(indices, weight, padding_idx, tag, slots, sink, anchor), 0


_CONV: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
