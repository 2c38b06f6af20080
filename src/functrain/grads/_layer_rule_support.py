"""The layer rules' shared pieces: the :class:`Unsupported` refusal, the tables of the torch
calls :class:`~functrain.grads._layer_rules._Rules` watches, argument helpers and the probes of
the states in which no rule may run (autocast, saved-tensor hooks).

:mod:`functrain.grads._layer_rules` re-exports the public names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["INNER_TRANSFORM", "MAX_NORM", "SAVED_TENSOR_HOOKS", "Unsupported"]


class Unsupported(Exception):
    """A parameter is used by a call with no per-sample rule; use ``vmap(grad)`` instead.

    Attributes:
        index: the parameter's position among the flattened ``params`` leaves, or ``None``
            when the refusal concerns ``loss_fn`` itself (it calls ``torch.autograd.grad``).
        call: the name of the torch call that used it.
        context: why no rule could run even if ``call`` has one (for example
            ``"under torch.autocast"`` or ``"with padding='same' and a stride other than
            1"``), or ``None``.
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
