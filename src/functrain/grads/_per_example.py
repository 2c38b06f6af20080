"""Per-example plumbing of :mod:`functrain.grads.per_sample` and the layer-rule reductions.

The batch size check, the option checks and ``loss_fn`` wrapped as the loss of one example.
"""

from __future__ import annotations

import inspect
import numbers
import os
from collections.abc import Callable
from typing import Any

import torch

from functrain import tree

PyTree = Any
_RANDOMNESS = ("error", "different", "same")
_METHODS = ("vmap", "layers")
# PyTorch's recurrent modules (nn.LSTM, nn.GRU, nn.RNN and their cells) live in this file; their
# fused kernels have no vmap batching rule and fail with a shape error that names no module.
_RNN_FILE = os.path.join("torch", "nn", "modules", "rnn.py")
_VMAP_FAILURES = ("doesn't match the broadcast shape", "Batching rule not implemented")


def rnn_vmap_error(err: RuntimeError, where: str, advice: str) -> RuntimeError | None:
    """A clear error for a recurrent module run under ``torch.func.vmap``, else ``None``.

    Args:
        err: the error ``vmap`` raised.
        where: the caller's name for the vmapped computation (starts the message).
        advice: what to use instead, appended to the message.

    Returns:
        A ``RuntimeError`` naming the cause (raise it ``from err``), or ``None`` when ``err``
        did not come from a recurrent module's kernel under ``vmap``.
    """
    if not any(text in str(err) for text in _VMAP_FAILURES):
        return None
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(_RNN_FILE):
            return RuntimeError(
                f"{where}: the model runs a recurrent module (nn.LSTM, nn.GRU, nn.RNN or a cell) "
                "under torch.func.vmap, which PyTorch cannot differentiate per example (its "
                f"kernels have no vmap batching rule). {advice} Original error: {err}"
            )
        tb = tb.tb_next
    return None


def embedding_vmap_error(err: Exception, where: str) -> ValueError | None:
    """A clear error for an embedding ``vmap(grad)`` cannot differentiate per example, else
    ``None``.

    ``max_norm`` renormalizes the weight in place during the forward (``embedding_renorm_``
    has no batching rule; torch warns, then fails naming only tensor sizes), and
    ``sparse=True`` makes a sparse gradient, which ``vmap`` cannot stack (torch's error names
    ``aten::view`` on a sparse backend). ``err`` may be torch's warning raised as an error.

    Args:
        err: what ``vmap`` raised.
        where: the caller's name for the vmapped computation (starts the message).

    Returns:
        A ``ValueError`` naming the layer and the way out (raise it ``from err``), or ``None``.
    """
    text = str(err)
    if "embedding_renorm_" in text:
        return ValueError(
            f"{where}: the model calls an embedding with max_norm (nn.Embedding(max_norm=...) "
            "or F.embedding(..., max_norm=...)), which renormalizes the weight in place during "
            "the forward: torch.func.vmap cannot do that per example, and per-sample gradients "
            "must not change params. Drop max_norm and renormalize the weight outside loss_fn "
            f"(e.g. after each update). Original error: {text}"
        )
    if ("Sparse" in text and "backend" in text) or "rule for aten::_sparse_coo" in text:
        return ValueError(
            f"{where}: the model makes a sparse gradient (an embedding with sparse=True?), "
            "which torch.func.vmap cannot form per example. Use sparse=False, or "
            "method='layers', whose embedding rule forms dense per-example gradients. "
            f"Original error: {text}"
        )
    return None


def batch_size_of(batch: PyTree, name: str = "batch") -> int:
    """The common leading dimension of every tensor leaf of ``batch``; raises if they differ."""
    paths, leaves, _ = tree.flatten_with_paths(batch)
    size = None
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            raise ValueError(
                f"{tree.path_str(path, name)} must be a tensor with a leading batch dimension, "
                f"got {type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else 'a 0-d tensor'}"
            )
        if size is None:
            size = leaf.shape[0]
        elif leaf.shape[0] != size:
            raise ValueError(
                f"{tree.path_str(path, name)} has leading dimension {leaf.shape[0]}, but earlier "
                f"leaves of {name} have {size}: every leaf must share the batch dimension"
            )
    if size is None:
        raise ValueError(f"{name} has no tensor leaves")
    return size


def _check_options(
    chunk_size: int | None,
    randomness: str,
    loss_fn: Any = len,
    params: PyTree = None,
    method: str = "vmap",
    methods: tuple[str, ...] = _METHODS,
) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    paths, leaves, _ = tree.flatten_with_paths(params)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor) or not (
            leaf.is_floating_point() or leaf.is_complex()
        ):
            got = leaf.dtype if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise TypeError(
                f"{tree.path_str(path, 'params')} must be a floating-point tensor, got {got}"
            )
        if leaf.is_meta:
            raise ValueError(
                f"{tree.path_str(path, 'params')} is on the meta device (shapes only, no values): "
                "per-sample gradients need materialized parameters"
            )
    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, numbers.Integral)
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if randomness not in _RANDOMNESS:
        raise ValueError(f"randomness must be one of {_RANDOMNESS}, got {randomness!r}")
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")


def _accepts_buffers(loss_fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False
    return "buffers" in params  # as the train step decides (functrain.train.loss)


def _split_result(out: Any, has_aux: bool) -> tuple[Any, Any]:
    """``(loss, aux)`` from a plain loss, ``(loss, aux)`` tuple, LossOutput or LossSum."""
    # Imported here: functrain.train imports functrain.grads.
    from functrain.train.loss import LossOutput, LossSum

    aux = None
    if isinstance(out, LossOutput):
        out, aux = out.loss, out.aux
    elif has_aux:
        if not (isinstance(out, tuple) and len(out) == 2) or isinstance(out, LossSum):
            raise ValueError("with has_aux=True, loss_fn must return (loss, aux) or ft.LossOutput")
        out, aux = out
    if isinstance(out, LossSum):
        out = _example_mean(out.total, out.count)
    return out, aux


def _example_mean(total: Any, count: Any) -> Any:
    """``total / count``: the example's own mean, the loss of a batch of one.

    As in the train step, the count is held in at least float32 (bfloat16 rounds 257 tokens to
    256, which scaled the loss and gradient), and an example that counts no unit (all padding)
    has loss and gradient 0, as the train step's hooks see such a micro-batch, rather than the
    NaN of ``0 / 0``, which poisoned every sum over the batch (a DP clipped sum included).
    """
    if not isinstance(total, torch.Tensor) or not total.is_floating_point():
        return total  # refused, with its type, by the caller's scalar-loss check
    dtype = torch.promote_types(total.dtype, torch.float32)
    if isinstance(count, torch.Tensor):
        count = count.detach().to(dtype)  # a count is not differentiated
    else:
        count = torch.full((), count, dtype=dtype, device=total.device)
    # ``where`` on the reciprocal, not on the quotient: the gradient of ``total / 0`` in the
    # branch not taken would still be NaN.
    inverse = torch.where(count != 0, count.reciprocal(), torch.zeros_like(count))
    return (total.to(dtype) * inverse).to(total.dtype)


class AuxSplit:
    """Splits ``aux`` into the tensors that travel through ``vmap`` and the rest.

    ``vmap`` only passes tensors out. A leaf that is not a tensor (``None`` is an empty
    subtree; numbers, strings) cannot depend on the example, since the examples are traced
    together, so it is kept from the trace and put back as returned, unbatched.
    """

    def __init__(self) -> None:
        self.spec: Any = None
        self.static: dict[int, Any] = {}

    def split(self, aux: Any) -> tuple[torch.Tensor, ...]:
        """The tensor leaves of ``aux``; remembers its structure and its other leaves."""
        leaves, self.spec = tree.flatten(aux)
        self.static = {i: x for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor)}
        return tuple(x for x in leaves if isinstance(x, torch.Tensor))

    def join(self, tensors: Any) -> Any:
        """``aux`` again, from the (batched) tensor leaves :meth:`split` gave."""
        batched = iter(tensors)
        count = self.spec.num_leaves
        leaves = [self.static[i] if i in self.static else next(batched) for i in range(count)]
        return tree.unflatten(self.spec, leaves)


def _example_loss(
    loss_fn: Callable[..., Any],
    param_spec: Any,
    batch_spec: Any,
    buffers: PyTree | None,
    has_aux: bool,
    aux_split: AuxSplit | None = None,
) -> Callable[[list[torch.Tensor], list[torch.Tensor]], tuple[torch.Tensor, tuple[Any, ...]]]:
    """``(param_leaves, example_leaves) -> (0-d loss, extras)`` for one example.

    ``extras`` is ``()`` without ``has_aux``; with it, the tensor leaves of ``aux`` split by
    ``aux_split`` (``(aux,)`` when no ``aux_split`` is given).
    """
    pass_buffers = _accepts_buffers(loss_fn)
    if buffers is not None and not pass_buffers:
        raise TypeError("buffers were given but loss_fn has no `buffers` keyword argument")
    # Buffers are not differentiated: one that requires grad (frozen weights passed as buffers)
    # made the per-sample gradients hold the graph of their chunk.
    buffers = tree.map(lambda b: b.detach() if isinstance(b, torch.Tensor) else b, buffers)

    # Work on flat leaf lists so that any optree pytree (not only torch's) passes through vmap.
    def one_example(param_leaves: list[torch.Tensor], example_leaves: list[torch.Tensor]) -> Any:
        params = tree.unflatten(param_spec, param_leaves)
        example = tree.unflatten(batch_spec, [x.unsqueeze(0) for x in example_leaves])
        out = (
            loss_fn(params, example, buffers=buffers) if pass_buffers else loss_fn(params, example)
        )
        loss, aux = _split_result(out, has_aux)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                "loss_fn must return a scalar mean loss (or ft.LossSum / ft.LossOutput)"
                + (" as the first element of (loss, aux)" if has_aux else "")
                + f", got {shape}"
            )
        if not has_aux:
            return loss.reshape(()), ()
        return loss.reshape(()), (aux_split.split(aux) if aux_split is not None else (aux,))

    return one_example
