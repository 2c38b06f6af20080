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
rules. A parameter reaching any other call (an elementwise op, a view, a matmul...) raises
:class:`Unsupported`: the rules are only used where they are exact. Grouped and depthwise
convolutions have their own rules: :mod:`functrain.grads._layer_grouped_conv` (a trained
weight) and :mod:`functrain.grads._layer_rule_bias` (a constant weight, a trained bias).
Two parameter-free calls are routed too, for speed only: CPU max pooling
(:mod:`functrain.grads._layer_pool`) and cross-entropy of class indices
(:mod:`functrain.grads._layer_loss`) run once on the physical batch. The passes that run a
forward under the rules and read what the backward leaves in the
:class:`~functrain.grads._layer_grads.Sink` are in :mod:`functrain.grads._layer_passes`.

This module holds the mode's dispatch and the plumbing below the vmap over examples; the
per-call argument checks and rule calls are in :mod:`functrain.grads._layer_rule_calls`, the
refusal, the call tables and the autocast / saved-tensor-hook probes in
:mod:`functrain.grads._layer_rule_support`.
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
from functrain.grads._layer_grads import Sink
from functrain.grads._layer_loss import (
    CROSS_ENTROPY_ARGS,
    cross_entropy_options,
    cross_entropy_rows,
)
from functrain.grads._layer_rule_calls import _LayerCalls
from functrain.grads._layer_rule_support import (
    _AUTOGRAD_CALLS,
    _CONV_ARGS,
    _CONV_FUNCS,
    _EMBEDDING_ARGS,
    _LAYER_NORM_ARGS,
    _LINEAR_ARGS,
    _LINEAR_FUNCS,
    _MAX_POOLS,
    _METADATA,
    _POOL_ARGS,
    _ROUTED,
    _RULE_FUNCS,
    _blocker,
)

# Re-exported (``X as X``): other modules import them from here.
from functrain.grads._layer_rule_support import INNER_TRANSFORM as INNER_TRANSFORM
from functrain.grads._layer_rule_support import MAX_NORM as MAX_NORM
from functrain.grads._layer_rule_support import SAVED_TENSOR_HOOKS as SAVED_TENSOR_HOOKS
from functrain.grads._layer_rule_support import Unsupported as Unsupported

__all__ = ["MAX_NORM", "SAVED_TENSOR_HOOKS", "Unsupported", "forward_under_rules"]


class _Rules(_LayerCalls, TorchFunctionMode):
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
