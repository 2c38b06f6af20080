"""The per-call halves of the layer rules: which linear, convolution, layer-norm and embedding
calls a rule may take over, and the rule's call on the physical batch.

:class:`_LayerCalls` is a base of :class:`~functrain.grads._layer_rules._Rules`, which owns the
``TorchFunctionMode`` dispatch and the plumbing below the vmap over examples (``_on_batch``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._C import _functorch

from functrain.grads._layer_grads import Conv, Embedding, LayerNorm, Linear, Sink
from functrain.grads._layer_grouped_conv import GroupedConv, grouped_refusal
from functrain.grads._layer_rule_bias import CONV_CALLS, ConvBias
from functrain.grads._layer_rule_support import MAX_NORM, Unsupported, _same_padding, _tuple


class _LayerCalls:
    """The argument checks and rule calls of the layer calls on parameters.

    Each method takes the call's arguments by name and returns the rule's output, or ``None``
    (after setting :attr:`why`, the refusal's context) when no rule applies.
    """

    slots: dict[int, int]
    tag: torch.Tensor
    sink: Sink
    anchor: torch.Tensor | None
    why: str | None

    def _on_batch(self, x: Any, run: Callable[[torch.Tensor], Any]) -> Any:
        raise NotImplementedError  # pragma: no cover - _Rules's

    def _slot(self, t: Any) -> int | None:
        """The parameter index of ``t`` (``None`` for no parameter); counts the use."""
        index = self.slots.get(id(t)) if isinstance(t, torch.Tensor) else None
        if index is not None:
            self.sink.uses[index] += 1
        return index

    def _is_param(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.slots

    def _constant(self, t: Any) -> bool:
        """``t`` is a tensor that is not a parameter and that no parameter reaches.

        Every call on a parameter either runs a rule, whose output is batched over the examples,
        or is refused; so a tensor not wrapped by ``torch.func`` (not batched, grad-tracking or
        functionalized) is the same for every example and does not depend on the parameters: a
        frozen weight closed over or passed as a buffer, or one computed under ``no_grad``.
        """
        return (
            isinstance(t, torch.Tensor)
            and not self._is_param(t)
            and not (_functorch.is_batchedtensor(t) or _functorch.is_functorch_wrapped_tensor(t))
        )

    def _owned(self, weight: Any, bias: Any, x: Any) -> bool:
        """The call's weight or bias is a parameter, the other a parameter, a constant (see
        :meth:`_constant`; bias-only fine-tuning) or absent, and its input is not a parameter.

        Otherwise sets :attr:`why`: the refusal then says which argument has no rule.
        """
        weight_param, bias_param = self._is_param(weight), self._is_param(bias)
        if not (weight_param or bias_param):
            # No parameter (or only the input): the call runs as written, or is refused.
            self.why = "with a weight that is not a parameter"
        elif not (weight_param or self._constant(weight)):
            # One computed from parameters or per example needs a gradient no rule forms.
            self.why = "with a weight that is not a parameter and not constant"
        elif bias is not None and not (bias_param or self._constant(bias)):
            self.why = "with a bias that is not a parameter and not constant"
        elif self._is_param(x):
            self.why = "with a parameter as its input"
        elif (weight if weight_param else bias).is_complex():
            self.why = "with complex parameters"
        else:
            return True
        return False

    def _layer_norm(self, a: dict[str, Any]) -> Any:
        x, weight, bias = a["input"], a.get("weight"), a.get("bias")
        if self._is_param(x) or not (self._is_param(weight) or self._is_param(bias)):
            self.why = "with a parameter as its input" if self._is_param(x) else None
            return None
        if any(
            t is not None and not (self._is_param(t) or self._constant(t)) for t in (weight, bias)
        ):
            self.why = "with a weight or bias that is not a parameter and not constant"
            return None
        if any(t is not None and t.is_complex() for t in (weight, bias)):
            self.why = "with complex parameters"
            return None
        slots = (self._slot(weight), self._slot(bias))
        shape = list(a["normalized_shape"])
        eps = a.get("eps", 1e-5)
        out = self._on_batch(
            x,
            lambda p: LayerNorm.apply(
                p, shape, weight, bias, eps, self.tag, slots, self.sink, None
            )[0],
        )
        if out is not None:
            return out
        return LayerNorm.apply(
            x, shape, weight, bias, eps, self.tag, slots, self.sink, self.anchor
        )[0]

    def _embedding(self, a: dict[str, Any]) -> Any:
        indices, weight = a["input"], a["weight"]
        if not self._is_param(weight):
            self.why = "with a weight that is not a parameter"
            return None
        if a.get("max_norm") is not None:
            raise Unsupported(self.slots[id(weight)], "embedding", MAX_NORM, fatal=True)
        # ``sparse=True`` only sets the layout of the summed gradient: the rule's gradients,
        # per example or summed, are dense, as the per-sample results always are.
        if a.get("scale_grad_by_freq", False):
            self.why = "with scale_grad_by_freq=True"
            return None
        if weight.is_complex():
            self.why = "with complex parameters"
            return None
        padding_idx = a.get("padding_idx")
        if padding_idx is not None:
            # F.embedding checks this only after dispatching to the mode: check it here.
            if not -weight.shape[0] <= padding_idx < weight.shape[0]:
                raise ValueError(
                    f"padding_idx {padding_idx} is out of range for {weight.shape[0]} embeddings"
                )
            if padding_idx < 0:
                padding_idx += weight.shape[0]
        slots = (self._slot(weight), None)
        out = self._on_batch(
            indices,
            lambda p: Embedding.apply(p, weight, padding_idx, self.tag, slots, self.sink, None),
        )
        if out is not None:
            return out
        return Embedding.apply(
            indices, weight, padding_idx, self.tag, slots, self.sink, self.anchor
        )

    def _linear(self, a: dict[str, Any]) -> Any:
        x, weight, bias = a["input"], a["weight"], a.get("bias")
        if not self._owned(weight, bias, x):
            return None
        if weight.dim() != 2:
            self.why = f"with a {weight.dim()}-d weight"
            return None
        if self._is_param(bias) and tuple(bias.shape) != tuple(weight.shape[:1]):
            # A broadcast bias (shape (1,) or ()) sums its gradient over the outputs: no rule.
            raise Unsupported(self.slots[id(bias)], "linear", "as a broadcast bias")
        slots = (self._slot(weight), self._slot(bias))
        out = self._on_batch(
            x, lambda p: Linear.on_batch(p, weight, bias, self.tag, slots, self.sink, None)
        )
        if out is not None:
            return out
        return Linear.apply(x, weight, bias, self.tag, slots, self.sink, self.anchor)

    def _conv(self, dims: int, a: dict[str, Any]) -> Any:
        x, weight, bias = a["input"], a["weight"], a.get("bias")
        if not self._owned(weight, bias, x):
            return None
        groups = a.get("groups", 1)
        if groups != 1:
            if not self._is_param(weight):  # a constant weight (see _owned): bias-only
                return self._grouped_conv_bias(dims, a)
            self.why = grouped_refusal(weight, bias, groups)
            if self.why is not None:
                return None
        dilation = _tuple(a.get("dilation", 1), dims)
        padding = a.get("padding", 0)
        stride = _tuple(a.get("stride", 1), dims)
        if padding == "same":
            if any(s != 1 for s in stride):
                # torch refuses the call too: method="auto" falls back and raises its error.
                self.why = "with padding='same' and a stride other than 1"
                return None
            pads = _same_padding(weight.shape[2:], dilation)
        elif padding == "valid":
            pads = [0] * (2 * dims)
        else:
            pads = [w for p in reversed(_tuple(padding, dims)) for w in (p, p)]
        slots = (self._slot(weight), self._slot(bias))
        if groups != 1:  # a trained grouped or depthwise weight
            return self._grouped_conv(x, weight, bias, slots, (stride, pads, dilation, groups))
        out = self._on_batch(
            x,
            lambda p: Conv.on_batch(
                p, weight, bias, self.tag, slots, self.sink, None, stride, pads, dilation
            ),
        )
        if out is not None:
            return out
        return Conv.apply(
            x, weight, bias, self.tag, slots, self.sink, self.anchor, stride, pads, dilation
        )

    def _grouped_conv(
        self, x: Any, weight: Any, bias: Any, slots: tuple[Any, Any], conv: tuple[Any, ...]
    ) -> Any:
        """A grouped convolution of parameter weight (:mod:`functrain.grads._layer_grouped_conv`);
        ``conv`` is ``(stride, pads, dilation, groups)``."""
        out = self._on_batch(
            x,
            lambda p: GroupedConv.on_batch(
                p, weight, bias, self.tag, slots, self.sink, None, *conv
            ),
        )
        if out is not None:
            return out
        return GroupedConv.apply(x, weight, bias, self.tag, slots, self.sink, self.anchor, *conv)

    def _grouped_conv_bias(self, dims: int, a: dict[str, Any]) -> Any:
        """A grouped convolution of constant weight and parameter bias (see
        :mod:`functrain.grads._layer_rule_bias`), or ``None``."""
        weight, bias = a["weight"], a["bias"]
        if tuple(bias.shape) != tuple(weight.shape[:1]) or bias.dtype != weight.dtype:
            # torch's convolution refuses such a bias; ConvBias's broadcast add would not.
            self.why = (
                f"with a bias of shape {tuple(bias.shape)} and dtype {bias.dtype} for a weight "
                f"of shape {tuple(weight.shape)} and dtype {weight.dtype}"
            )
            return None
        # The convolution itself as written, groups and padding included (this mode is off
        # inside its own __torch_function__): autograd forms its grouped input gradient.
        y = CONV_CALLS[dims](
            a["input"],
            weight,
            None,
            a.get("stride", 1),
            a.get("padding", 0),
            a.get("dilation", 1),
            a["groups"],
        )
        slot = self._slot(bias)
        out = self._on_batch(
            y, lambda p: ConvBias.apply(p, bias, dims, self.tag, slot, self.sink, None)
        )
        if out is not None:
            return out
        return ConvBias.apply(y, bias, dims, self.tag, slot, self.sink, self.anchor)
