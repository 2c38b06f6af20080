"""Per-sample gradients and norms from one batched backward pass (the ``"layers"`` method).

``vmap(grad(loss_fn))`` differentiates every example on its own. The layers that hold the
parameters offer another exact route, the one Opacus and BackPACK take: the weight gradient of
``y = x Wᵀ + b`` for one example is ``gᵀ x`` (``g = ∂loss/∂y`` of that example), and a
convolution's is the same product on its input patches. So each example's *forward* still runs
under ``vmap`` (its loss is ``loss_fn`` on a batch of one, as in the ``"vmap"`` method, so
examples cannot interact), but the backward pass is one ordinary autograd pass over the physical
batch in which each linear / convolution / embedding / layer-norm call on parameters forms their
per-example gradients (or only their norms: ghost clipping) from its saved input and output
gradient (:mod:`functrain.grads._layer_grads`).

A ``TorchFunctionMode`` watches every torch call of the forward and routes those calls to the
rules. A parameter reaching any other call (an elementwise op, a view, a matmul, a grouped
convolution...) raises :class:`Unsupported`: the rules are only used where they are exact.
Two parameter-free calls are routed too, for speed only: CPU max pooling
(:mod:`functrain.grads._layer_pool`) and cross-entropy of class indices
(:mod:`functrain.grads._layer_loss`) run once on the physical batch. The passes that run a
forward under the rules and read what the backward leaves in the
:class:`~functrain.grads._layer_grads.Sink` are in :mod:`functrain.grads._layer_passes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch._C import _functorch
from torch.overrides import TorchFunctionMode

try:  # torch.func internals, for the fast path of _Rules._on_batch; without them: autograd.Function
    # The C functions under ``torch._functorch.pyfunctorch``'s
    # ``retrieve_current_functorch_interpreter`` and ``temporarily_pop_interpreter_stack``
    # (a Python wrapper object and a generator context manager a call, for each rule call).
    _peek_interpreter = _functorch.peek_interpreter_stack
    _pop_layer = _functorch.pop_dynamic_layer_stack
    _push_layer = _functorch.push_dynamic_layer_stack
    _VMAP = _functorch.TransformType.Vmap
    _ADD_BATCH_DIM = _functorch._add_batch_dim
    _FAST = True
    _interpreter_stack = _functorch.get_interpreter_stack
except AttributeError:  # pragma: no cover - older or newer torch
    _FAST = False

from functrain.grads import _layer_pool
from functrain.grads._layer_grads import Conv, Embedding, LayerNorm, Linear, Sink
from functrain.grads._layer_loss import (
    CROSS_ENTROPY_ARGS,
    cross_entropy_options,
    cross_entropy_rows,
)

__all__ = ["MAX_NORM", "SAVED_TENSOR_HOOKS", "Unsupported", "forward_under_rules"]


class Unsupported(Exception):
    """A parameter is used by a call with no per-sample rule; use ``vmap(grad)`` instead.

    Attributes:
        index: the parameter's position among the flattened ``params`` leaves, or ``None``
            when the refusal concerns ``loss_fn`` itself (it calls ``torch.autograd.grad``).
        call: the name of the torch call that used it.
        context: why no rule could run even if ``call`` has one (for example
            ``"under torch.autocast"`` or ``"with groups=2"``), or ``None``.
        fatal: ``vmap(grad)`` cannot differentiate the call per example either (``"auto"``
            raises instead of falling back).
    """

    def __init__(
        self, index: int | None, call: str, context: str | None = None, fatal: bool = False
    ) -> None:
        where = f" {context}" if context else ""
        what = "loss_fn" if index is None else f"parameter leaf {index}"
        super().__init__(f"{what} is used by {call}{where} with no per-sample rule")
        self.index, self.call, self.context, self.fatal = index, call, context, fatal


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    # PyTorch expands a one-element list (``stride=(2,)`` of a conv2d) to every dimension.
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return value * n if len(value) == 1 else value


def _same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """``F.pad`` widths (last dimension first) of PyTorch's ``padding="same"``."""
    pads: list[int] = []
    for k, d in zip(reversed(kernel), reversed(dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


_CONV_FUNCS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}
_LINEAR_ARGS = ("input", "weight", "bias")
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LAYER_NORM_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")
_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq")
_POOL_ARGS = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "ceil_mode",
    "return_indices",
)
_MAX_POOLS = (F.max_pool2d, torch.max_pool2d)
_RULE_FUNCS = {*_LINEAR_FUNCS, *_CONV_FUNCS, F.layer_norm, F.embedding}
# Every call :meth:`_Rules._route` may take over (the others run as written).
_ROUTED = {*_RULE_FUNCS, *_MAX_POOLS, F.cross_entropy}
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


def _autocast_on() -> bool:
    """Whether ``torch.autocast`` is active for any device type a rule could meet."""
    try:
        return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))
    except TypeError:  # pragma: no cover - torch < 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _saved_tensor_hooks_on() -> bool:
    """Whether saved-tensor hooks (``torch.utils.checkpoint``, CPU offloading) are active.

    Their unpack hooks recompute or reload tensors in the backward, outside the ``vmap`` over
    examples the rules' saved tensors belong to.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


SAVED_TENSOR_HOOKS = "under saved-tensor hooks (torch.utils.checkpoint or saved_tensors_hooks)"
# F.embedding(max_norm=...) renormalizes rows of the weight in place during the forward (under
# no_grad): neither method can do that per example (vmap fails on the in-place kernel), and the
# parameters given to a per-sample function must not change.
MAX_NORM = "with max_norm (it renormalizes the weight in place during the forward)"
# Differentiation inside the forward: its backward pass would run the rules' backward (which
# feed the per-example gradients) before the loss is known, or fail in torch.func's plumbing.
_AUTOGRAD_CALLS = {
    torch.autograd.grad: "torch.autograd.grad",
    torch.autograd.backward: "torch.autograd.backward",
    torch.Tensor.backward: "Tensor.backward",
}
INNER_TRANSFORM = "inside a torch.func.grad, vjp or jvp of loss_fn's own (e.g. a gradient penalty)"


def _blocker() -> str | None:
    """Why no rule may run now (a suffix for :class:`Unsupported`), or ``None``."""
    if _autocast_on():
        return "under torch.autocast"
    if _saved_tensor_hooks_on():
        return SAVED_TENSOR_HOOKS
    return None


class _Rules(TorchFunctionMode):
    """Routes the forward's layer calls on parameters to the rules; refuses any other use."""

    def __init__(self, slots: dict[int, int], tag: torch.Tensor, sink: Sink) -> None:
        super().__init__()
        self.slots, self.tag, self.sink = slots, tag, sink
        # An empty slice of a vmapped input, passed to every rule: vmap calls a Function's
        # ``vmap`` rule only when an input is batched, and a rule must see the batch even when
        # its own input is the same for every example (e.g. positions fed to an embedding).
        self.anchor: torch.Tensor | None = None
        self.level: int | None = None  # the vmap level of the examples, and its size
        self.batch_size = 0
        # Why the last layer call on parameters got no rule (e.g. ``"with groups=2"``): the
        # refusal's context, since "linear has no per-layer rule" alone would contradict the
        # list of rules in the error.
        self.why: str | None = None

    def enter_examples(self, batch_leaves: list[torch.Tensor]) -> None:
        """Called inside the vmap over examples, with its batched inputs."""
        first = batch_leaves[0]
        self.anchor = first.reshape(first.numel())[:0]  # not reshape(-1): the batch may be empty
        self.level = None
        if _FAST and _functorch.is_batchedtensor(self.anchor):
            self.level = _functorch.maybe_get_level(self.anchor)
            physical = _functorch.get_unwrapped(self.anchor)
            self.batch_size = physical.shape[_functorch.maybe_get_bdim(self.anchor)]

    def _on_batch(self, x: Any, run: Callable[[torch.Tensor], Any]) -> Any:
        """``run(physical x)`` below the vmap over examples, its result batched again; or
        ``None`` when ``x`` is not simply batched (or constant) at that level, e.g. inside a
        transform of ``loss_fn``'s own. Calling an autograd.Function's ``vmap`` rule does the
        same through ``torch.func``'s generic machinery at about 0.4 ms a call."""
        return self._below_examples((x,), run)

    def _below_examples(self, inputs: tuple[Any, ...], run: Callable[..., Any]) -> Any:
        """:meth:`_on_batch` of several inputs: ``run(*physical inputs)``, or ``None``."""
        level = self.level
        if level is None:
            return None
        current = _peek_interpreter()
        if current is None or current.level() != level or current.key() != _VMAP:
            return None
        physical = [self._physical(t, level) for t in inputs]
        if any(p is None for p in physical):
            return None
        saved = _pop_layer()
        try:
            out = run(*physical)
        finally:
            _push_layer(saved)
        return _ADD_BATCH_DIM(out, 0, level)

    def _physical(self, x: Any, level: int) -> torch.Tensor | None:
        """``x`` with the examples in front, or ``None`` when it is not simply batched."""
        if not isinstance(x, torch.Tensor):
            return None
        if _functorch.is_batchedtensor(x):
            inner = _functorch.get_unwrapped(x)
            if _functorch.maybe_get_level(x) != level or _functorch.is_functorch_wrapped_tensor(
                inner
            ):
                return None
            return inner.movedim(_functorch.maybe_get_bdim(x), 0)
        if _functorch.is_functorch_wrapped_tensor(x):
            return None
        return x.expand(self.batch_size, *x.shape)  # the same for every example

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
        if func in _METADATA or not torch.is_grad_enabled():
            # Under no_grad a use adds nothing to any gradient (as in torch.func.grad).
            return func(*args, **kwargs)
        if func in _AUTOGRAD_CALLS and not self._inner_transform():
            # (Under loss_fn's own torch.func.grad this is that transform's call: the rules
            # refuse to run inside it instead.)
            raise Unsupported(None, _AUTOGRAD_CALLS[func], "inside loss_fn")
        self._refuse_wrapped(func, (*args, *kwargs.values()))
        self.why = None
        if func in _ROUTED:
            # Under autocast the call casts its inputs below the rule, whose backward would then
            # meet a gradient in the compute dtype and saved tensors in the original one.
            blocker = _blocker()
            out = None if blocker else self._route(func, args, kwargs)
            if out is not None:
                return out
        elif isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            # ``torch.ops.aten.linear`` would otherwise read "linear has no per-layer rule".
            self.why = "through torch.ops (the rules watch torch.nn.functional's calls)"
        for value in (*args, *kwargs.values()):
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if self._is_param(v):
                    name = getattr(func, "__name__", str(func))
                    raise Unsupported(self.slots[id(v)], name, _blocker() or self.why)
        return func(*args, **kwargs)

    def _inner_transform(self) -> bool:
        """Whether a ``torch.func`` transform other than ``vmap`` runs above the examples' vmap.

        ``loss_fn``'s own ``torch.func.grad`` / ``vjp`` / ``jvp`` (a gradient penalty) would
        run a rule's backward inside the forward, or need a forward-mode rule: none exists.
        """
        if not _FAST or self.level is None:
            return False
        stack = _interpreter_stack() or []
        return any(i.level() > self.level and i.key() != _VMAP for i in stack)

    def _route(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The rule's output for a layer call on parameters, or ``None``."""
        if func in _RULE_FUNCS and self._inner_transform():
            self.why = INNER_TRANSFORM
            return None
        if func in _LINEAR_FUNCS:
            return self._linear(dict(zip(_LINEAR_ARGS, args), **kwargs))
        if func in _CONV_FUNCS:
            return self._conv(_CONV_FUNCS[func], dict(zip(_CONV_ARGS, args), **kwargs))
        if func is F.layer_norm:
            return self._layer_norm(dict(zip(_LAYER_NORM_ARGS, args), **kwargs))
        if func is F.embedding:
            return self._embedding(dict(zip(_EMBEDDING_ARGS, args), **kwargs))
        if func in _MAX_POOLS:
            return self._max_pool(dict(zip(_POOL_ARGS, args), **kwargs))
        if func is F.cross_entropy:
            return self._cross_entropy(dict(zip(CROSS_ENTROPY_ARGS, args), **kwargs))
        return None

    def _refuse_wrapped(self, func: Any, values: Sequence[Any]) -> None:
        """Raises when a parameter arrives wrapped by a ``torch.func`` transform of ``loss_fn``.

        ``vmap`` / ``grad`` / ``jacrev`` over a parameter inside ``loss_fn`` hand the ops a new
        tensor object that wraps the parameter: unrecognized, it would count as a constant and
        its gradient would silently be lost.
        """
        for value in values:
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if not isinstance(v, torch.Tensor) or id(v) in self.slots:
                    continue
                while _functorch.is_batchedtensor(v) or _functorch.is_gradtrackingtensor(v):
                    v = _functorch.get_unwrapped(v)
                    if id(v) in self.slots:
                        name = getattr(func, "__name__", str(func))
                        raise Unsupported(self.slots[id(v)], name, "under a torch.func transform")

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

    def _max_pool(self, a: dict[str, Any]) -> Any:
        """2-d max pooling of the physical batch channels last on the CPU (see
        :mod:`functrain.grads._layer_pool`), or ``None``."""
        x = a.pop("input")
        if (
            a.pop("return_indices", False)
            or not isinstance(x, torch.Tensor)
            or x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.float64)
            or x.dim() not in (3, 4)
            or x.shape[-3] < _layer_pool.MIN_CHANNELS
            or x.numel() == 0
            or self.batch_size == 0
            or self._is_param(x)
        ):
            return None
        return self._on_batch(x, lambda p: _layer_pool.pool_channels_last(p, a))

    def _cross_entropy(self, a: dict[str, Any]) -> Any:
        """``F.cross_entropy`` of the physical batch in one call (see
        :mod:`functrain.grads._layer_loss`), or ``None``."""
        options = cross_entropy_options(a)
        if (
            options is None
            or self.batch_size == 0
            or self._is_param(a["input"])
            or self._is_param(a["target"])
        ):
            return None
        return self._below_examples(
            (a["input"], a["target"]), lambda x, t: cross_entropy_rows(x, t, *options)
        )

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
        if a.get("groups", 1) != 1:
            self.why = f"with groups={a['groups']}"
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


def forward_under_rules(
    example_loss: Callable[[list[torch.Tensor], list[torch.Tensor]], Any],
    param_leaves: list[torch.Tensor],
    batch_leaves: list[torch.Tensor],
    randomness: str,
) -> tuple[Any, torch.Tensor, Sink, list[torch.Tensor]]:
    """The vmapped forward under the rules: ``(outputs, tag, sink, detached param leaves)``.

    A backward pass from the outputs into ``tag`` runs the rules, which put what
    ``sink.mode`` asks for into ``sink``.
    """
    leaves = [p.detach() for p in param_leaves]
    sink = Sink(len(leaves))
    # Autograd needs something that requires grad: the rules' outputs do, through ``tag``.
    device = leaves[0].device if leaves else None
    tag = torch.zeros((), device=device, requires_grad=True)
    rules = _Rules({id(p): i for i, p in enumerate(leaves)}, tag, sink)

    def watched(batch_leaves: list[torch.Tensor]) -> Any:
        rules.enter_examples(batch_leaves)
        with rules:
            return example_loss(leaves, batch_leaves)

    with torch.enable_grad():
        out = torch.func.vmap(watched, randomness=randomness)(batch_leaves)
    return out, tag, sink, leaves
