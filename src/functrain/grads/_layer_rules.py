"""Per-sample gradients from one batched backward pass, by layer rules (the ``"layers"`` method).

``vmap(grad(loss_fn))`` differentiates every example on its own. For the layers that hold most
parameters there is a cheaper exact route, the one Opacus and BackPACK take: the weight gradient
of ``y = x Wᵀ + b`` for one example is ``gᵀ x`` (``g = ∂loss/∂y`` of that example), and a
convolution's is the same product on the unfolded input. So the per-example *forward* still runs
under ``vmap`` (each example's loss is ``loss_fn`` on a batch of one, as in the ``"vmap"``
method, so the examples cannot interact), but the backward pass is one ordinary autograd pass on
the physical batch, and each linear / convolution / embedding / layer-norm call whose parameters
are leaves of ``params`` computes its per-example parameter gradients directly from its saved
input and its output gradient.

The rules are chosen by a ``TorchFunctionMode`` that watches every torch call during the
forward. A parameter leaf reaching any other call (an elementwise op, a view, a matmul, a grouped
convolution...) raises :class:`Unsupported` and the caller falls back to ``vmap(grad)``: the rules
are only ever used when they are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["Unsupported", "clipped_sum_by_layers", "per_sample_by_layers"]


class Unsupported(Exception):
    """A parameter is used by a call with no per-sample rule; use ``vmap(grad)`` instead.

    Attributes:
        index: the parameter's position among the flattened ``params`` leaves.
        call: the name of the torch call that used it.
    """

    def __init__(self, index: int, call: str) -> None:
        super().__init__(f"parameter leaf {index} is used by {call}, which has no per-sample rule")
        self.index, self.call = index, call


def _row_sq(x: torch.Tensor) -> torch.Tensor:
    """Each example's squared L2 norm of a per-example tensor ``(B, ...)``."""
    return x.reshape(x.shape[0], -1).square().sum(1)


class _Sink:
    """Where the rules' backward passes put parameter gradients, by parameter index.

    ``mode`` says what a backward pass computes:

    * ``"grads"``: per-example gradients ``(B, *param.shape)``; a tied parameter's uses add up;
    * ``"norms"``: each example's squared gradient norm per parameter, ``(B,)``, by a rule's
      cheaper route where it has one; a parameter used more than once (tied) still needs its
      per-example gradient, summed over its uses before the norm is taken;
    * ``"sum"``: the gradient summed over the examples, by the layers' ordinary kernels.
    """

    def __init__(self, n: int) -> None:
        self.mode = "grads"
        self.uses = [0] * n
        self.grads: list[torch.Tensor | None] = [None] * n
        self.sq: list[torch.Tensor | None] = [None] * n

    def put(
        self,
        index: int | None,
        per_example: Callable[[], torch.Tensor],
        summed: Callable[[], torch.Tensor],
        sq_norm: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        if index is None:
            return
        if self.mode == "sum":
            self._add(index, summed())
        elif self.mode == "grads" or self.uses[index] > 1:
            self._add(index, per_example())
        else:
            sq = sq_norm() if sq_norm is not None else _row_sq(per_example())
            old = self.sq[index]
            self.sq[index] = sq if old is None else old + sq

    def _add(self, index: int, grad: torch.Tensor) -> None:
        old = self.grads[index]
        self.grads[index] = grad if old is None else old + grad

    def squared_norms(self) -> list[torch.Tensor]:
        """``"norms"`` mode: each used parameter's per-example squared norms ``(B,)``."""
        out = [sq for sq in self.sq if sq is not None]
        return out + [_row_sq(g) for g in self.grads if g is not None]


def _batch_first(info: Any, x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The physical tensor with the vmap dimension in front (broadcast when unbatched)."""
    return x.movedim(dim, 0) if dim is not None else x.expand(info.batch_size, *x.shape)


def _linear_sq_norm(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``‖gᵢᵀxᵢ‖²`` for ``g: (B, T, out)``, ``x: (B, T, in)``, by the cheaper of two routes.

    With ``T`` rows per example the "ghost" identity ``‖gᵀx‖² = Σ (ggᵀ ⊙ xxᵀ)`` costs
    ``T²(in + out)`` per example against ``T·in·out`` for forming ``gᵀx`` (Li et al., 2021).
    """
    rows, t = g.shape[:2]
    if t == 1:
        return g.reshape(rows, -1).square().sum(1) * x.reshape(rows, -1).square().sum(1)
    if t * (g.shape[2] + x.shape[2]) < g.shape[2] * x.shape[2]:
        return (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))).sum((1, 2))
    return _row_sq(torch.bmm(g.transpose(1, 2), x))


class _Linear(torch.autograd.Function):
    """``F.linear`` on a physical batch ``x: (B, ..., in)``; per-example ``gᵀx`` and ``Σ g``."""

    @staticmethod
    def forward(x, weight, bias, tag, slots, sink, anchor):  # type: ignore[no-untyped-def]
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, weight, _bias, _tag, slots, sink, _anchor = inputs
        ctx.save_for_backward(x, weight)
        ctx.slots, ctx.sink = slots, sink

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        rows = g.shape[0]
        g3, x3 = g.reshape(rows, -1, g.shape[-1]), x.reshape(rows, -1, x.shape[-1])
        ctx.sink.put(
            ctx.slots[0],
            lambda: torch.bmm(g3.transpose(1, 2), x3),
            lambda: g3.flatten(0, 1).t() @ x3.flatten(0, 1),
            lambda: _linear_sq_norm(g3, x3),
        )
        ctx.sink.put(ctx.slots[1], lambda: g3.sum(1), lambda: g3.sum((0, 1)))
        gx = g @ weight if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, tag, slots, sink, anchor):  # type: ignore[no-untyped-def]
        x = _batch_first(info, x, in_dims[0])
        return _Linear.apply(x, weight, bias, tag, slots, sink, None), 0


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """``F.pad`` widths (last dimension first) of PyTorch's ``padding="same"``."""
    pads: list[int] = []
    for k, d in zip(reversed(kernel), reversed(dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


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
    """The input patch each output position saw, ``(B, N·positions, C·kernel)``.

    One strided copy (``as_strided`` then ``reshape``): cheaper on CPU than ``F.unfold``.
    """
    padded = padded.contiguous()
    rows, n, channels = padded.shape[:3]
    st = padded.stride()
    spatial = st[3:]
    view = padded.as_strided(
        (rows, n, *out_size, channels, *kernel),
        (
            st[0],
            st[1],
            *(s * sp for s, sp in zip(stride, spatial)),
            st[2],
            *(d * sp for d, sp in zip(dilation, spatial)),
        ),
    )
    return view.reshape(rows, n * math.prod(out_size), -1)


class _Conv(torch.autograd.Function):
    """``convNd`` (``groups=1``) on ``x: (B, N, C, *spatial)``, the vmap dimension in front.

    The per-example weight gradient ``Σ_{n, positions} g ⊗ patch`` is one batched matmul of the
    output gradient with the input's patches.
    """

    @staticmethod
    def forward(x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation):  # type: ignore[no-untyped-def]
        symmetric = _symmetric(pads)
        if symmetric is None:
            x, symmetric = F.pad(x, pads), [0] * len(stride)
        out = _CONV[weight.dim() - 2](x.flatten(0, 1), weight, bias, stride, symmetric, dilation)
        return out.unflatten(0, x.shape[:2])

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, weight, _bias, _tag, slots, sink, _anchor, stride, pads, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.slots, ctx.sink, ctx.conv = slots, sink, (stride, pads, dilation)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, pads, dilation = ctx.conv
        rows, n, out_channels = g.shape[:3]
        symmetric = _symmetric(pads)
        padded = F.pad(x, pads) if any(pads) else x
        # One kernel call for the input gradient and, in "sum" mode, the summed weight gradient.
        want_weight = ctx.sink.mode == "sum" and ctx.slots[0] is not None
        kernel_grads: list[Any] = [None, None, None]
        if ctx.needs_input_grad[0] or want_weight:
            source, padding = (
                (x, symmetric) if symmetric is not None else (padded, [0] * len(stride))
            )
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
                    1,
                    [ctx.needs_input_grad[0], want_weight, False],
                )
            )
        g_rows = g.movedim(2, 1).reshape(rows, out_channels, -1)
        ctx.sink.put(
            ctx.slots[0],
            lambda: torch.bmm(
                g_rows, _patches(padded, g.shape[3:], weight.shape[2:], stride, dilation)
            ).view(rows, *weight.shape),
            lambda: kernel_grads[1],
        )
        ctx.sink.put(ctx.slots[1], lambda: g_rows.sum(2), lambda: g_rows.sum((0, 2)))
        gx = None
        if ctx.needs_input_grad[0]:
            gx = kernel_grads[0].unflatten(0, (rows, n))
            if symmetric is None:
                gx = F.pad(gx, [-w for w in pads])  # the gradient of F.pad crops
        return gx, None, None, None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, tag, slots, sink, anchor, stride, pads, dilation):  # type: ignore[no-untyped-def]
        x = _batch_first(info, x, in_dims[0])
        unbatched = x.dim() == weight.dim()  # an example's input without its own N dimension
        if unbatched:
            x = x.unsqueeze(1)
        out = _Conv.apply(x, weight, bias, tag, slots, sink, None, stride, pads, dilation)
        return (out.squeeze(1) if unbatched else out), 0


class _LayerNorm(torch.autograd.Function):
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
        out, mean, rstd = _LayerNorm.apply(x, shape, weight, bias, eps, tag, slots, sink, None)
        return (out, mean, rstd), (0, 0, 0)


class _Embedding(torch.autograd.Function):
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
        rows_g = g.reshape(rows, flat.shape[1], -1)
        if ctx.padding_idx is not None:
            rows_g = rows_g * (flat != ctx.padding_idx).unsqueeze(-1).to(g.dtype)
        dim, row_shape = rows_g.shape[-1], g.shape[indices.dim() :]

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
            same = (flat.unsqueeze(2) == flat.unsqueeze(1)).to(g.dtype)
            return (same * torch.bmm(rows_g, rows_g.transpose(1, 2))).sum((1, 2))

        ctx.sink.put(ctx.slots[0], per_example, summed, sq_norm)
        return None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, indices, weight, padding_idx, tag, slots, sink, anchor):  # type: ignore[no-untyped-def]
        indices = _batch_first(info, indices, in_dims[0])
        return _Embedding.apply(indices, weight, padding_idx, tag, slots, sink, None), 0


_CONV: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_FUNCS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LAYER_NORM_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")
_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq")
# Reading a parameter's metadata is harmless; anything else that touches one needs a rule.
_METADATA = {
    torch.Tensor.shape.__get__,  # type: ignore[attr-defined]
    torch.Tensor.dtype.__get__,  # type: ignore[attr-defined]
    torch.Tensor.device.__get__,  # type: ignore[attr-defined]
    torch.Tensor.ndim.__get__,  # type: ignore[attr-defined]
    torch.Tensor.layout.__get__,  # type: ignore[attr-defined]
    torch.Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
    torch.Tensor.is_cuda.__get__,  # type: ignore[attr-defined]
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.is_floating_point,
    torch.Tensor.__len__,
}


class _Rules(TorchFunctionMode):
    def __init__(self, slots: dict[int, int], tag: torch.Tensor, sink: _Sink) -> None:
        super().__init__()
        self.slots, self.tag, self.sink = slots, tag, sink
        # An empty slice of a vmapped input, passed to every rule: vmap calls a Function's
        # ``vmap`` rule only when an input is batched, and a rule must see the batch even when
        # its own input is the same for every example (e.g. positions fed to an embedding).
        self.anchor: torch.Tensor | None = None

    def _slot(self, t: Any) -> int | None:
        """The parameter index of ``t`` (``None`` for no parameter); counts the use."""
        index = self.slots.get(id(t)) if isinstance(t, torch.Tensor) else None
        if index is not None:
            self.sink.uses[index] += 1
        return index

    def _is_param(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.slots

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _METADATA:
            return func(*args, **kwargs)
        if func in _LINEAR_FUNCS:
            out = self._linear(*args, **kwargs)
        elif func in _CONV_FUNCS:
            out = self._conv(_CONV_FUNCS[func], dict(zip(_CONV_ARGS, args), **kwargs))
        elif func is F.layer_norm:
            out = self._layer_norm(dict(zip(_LAYER_NORM_ARGS, args), **kwargs))
        elif func is F.embedding:
            out = self._embedding(dict(zip(_EMBEDDING_ARGS, args), **kwargs))
        else:
            out = None
        if out is not None:
            return out
        for value in (*args, *kwargs.values()):
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if self._is_param(v):
                    raise Unsupported(self.slots[id(v)], getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    def _owned(self, weight: Any, bias: Any, x: Any) -> bool:
        """The call's weight (and bias, if any) are parameters, and its input is not."""
        return (
            self._is_param(weight)
            and (bias is None or self._is_param(bias))
            and not self._is_param(x)
            and not weight.is_complex()
        )

    def _layer_norm(self, a: dict[str, Any]) -> Any:
        x, weight, bias = a["input"], a.get("weight"), a.get("bias")
        if self._is_param(x) or not (self._is_param(weight) or self._is_param(bias)):
            return None
        if any(t is not None and not self._is_param(t) for t in (weight, bias)):
            return None
        if any(t is not None and t.is_complex() for t in (weight, bias)):
            return None
        slots = (self._slot(weight), self._slot(bias))
        shape = list(a["normalized_shape"])
        eps = a.get("eps", 1e-5)
        return _LayerNorm.apply(
            x, shape, weight, bias, eps, self.tag, slots, self.sink, self.anchor
        )[0]

    def _embedding(self, a: dict[str, Any]) -> Any:
        indices, weight = a["input"], a["weight"]
        if not self._is_param(weight) or a.get("max_norm") is not None:
            return None  # max_norm renormalizes the weight in place
        if a.get("scale_grad_by_freq", False) or a.get("sparse", False) or weight.is_complex():
            return None
        padding_idx = a.get("padding_idx")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        slots = (self._slot(weight), None)
        return _Embedding.apply(
            indices, weight, padding_idx, self.tag, slots, self.sink, self.anchor
        )

    def _linear(self, x: Any, weight: Any, bias: Any = None) -> Any:
        if not self._owned(weight, bias, x):
            return None
        slots = (self._slot(weight), self._slot(bias))
        return _Linear.apply(x, weight, bias, self.tag, slots, self.sink, self.anchor)

    def _conv(self, dims: int, a: dict[str, Any]) -> Any:
        x, weight, bias = a["input"], a["weight"], a.get("bias")
        if not self._owned(weight, bias, x) or a.get("groups", 1) != 1:
            return None
        dilation = _tuple(a.get("dilation", 1), dims)
        padding = a.get("padding", 0)
        stride = _tuple(a.get("stride", 1), dims)
        if padding == "same":
            if any(s != 1 for s in stride):
                return None  # an error of the call itself: let the fallback raise it
            pads = _same_padding(weight.shape[2:], dilation)
        elif padding == "valid":
            pads = [0] * (2 * dims)
        else:
            pads = [w for p in reversed(_tuple(padding, dims)) for w in (p, p)]
        slots = (self._slot(weight), self._slot(bias))
        return _Conv.apply(
            x, weight, bias, self.tag, slots, self.sink, self.anchor, stride, pads, dilation
        )


def _forward(
    example_loss: Callable[[list[torch.Tensor], list[torch.Tensor]], Any],
    param_leaves: list[torch.Tensor],
    batch_leaves: list[torch.Tensor],
    randomness: str,
) -> tuple[Any, torch.Tensor, _Sink, list[torch.Tensor]]:
    """The vmapped forward under the rules: ``(outputs, tag, sink, detached param leaves)``."""
    leaves = [p.detach() for p in param_leaves]
    sink = _Sink(len(leaves))
    # Autograd needs something that requires grad: the rules' outputs do, through ``tag``.
    device = leaves[0].device if leaves else None
    tag = torch.zeros((), device=device, requires_grad=True)
    rules = _Rules({id(p): i for i, p in enumerate(leaves)}, tag, sink)

    def watched(batch_leaves: list[torch.Tensor]) -> Any:
        rules.anchor = batch_leaves[0].reshape(-1)[:0]
        with rules:
            return example_loss(leaves, batch_leaves)

    with torch.enable_grad():
        out = torch.func.vmap(watched, randomness=randomness)(batch_leaves)
    return out, tag, sink, leaves


def _backward(losses: torch.Tensor, tag: torch.Tensor, weights: Any = None, **kwargs: Any) -> None:
    if losses.requires_grad:  # else no parameter was used: every gradient is zero
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
        >>> from functrain.grads._layer_rules import per_sample_by_layers
        >>> w = torch.ones(1, 2)
        >>> loss = lambda p, ex: (torch.nn.functional.linear(ex[0], p[0]).sum(), ())
        >>> (losses, _), (gw,) = per_sample_by_layers(loss, [w], [torch.eye(2)], "error")
        >>> losses, gw
        (tensor([1., 1.]), tensor([[[1., 0.]],
        <BLANKLINE>
                [[0., 1.]]]))
    """
    (losses, extras), tag, sink, leaves = _forward(
        example_loss, param_leaves, batch_leaves, randomness
    )
    _backward(losses, tag)
    return (losses.detach(), extras), _filled(sink.grads, leaves, (losses.shape[0],))


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
        >>> from functrain.grads._layer_rules import clipped_sum_by_layers
        >>> w = torch.ones(1, 2)
        >>> loss = lambda p, ex: (torch.nn.functional.linear(ex[0], p[0]).sum(), ())
        >>> x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> unit = lambda sq: (1 / torch.stack(sq).sum(0).sqrt()).clamp(max=1)
        >>> losses, factors, (gw,) = clipped_sum_by_layers(loss, [w], [x], "error", unit)
        >>> factors, gw
        (tensor([0.2000, 1.0000]), tensor([[0.9000, 1.2000]]))
    """
    (losses, _extras), tag, sink, leaves = _forward(
        example_loss, param_leaves, batch_leaves, randomness
    )
    sink.mode = "norms"
    _backward(losses, tag, retain_graph=True)
    factors = clip_factors(sink.squared_norms()).detach()
    sink.mode, sink.grads = "sum", [None] * len(leaves)
    _backward(losses, tag, factors.to(losses.dtype))
    return losses.detach(), factors, _filled(sink.grads, leaves, ())
