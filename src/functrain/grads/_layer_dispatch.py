"""Dispatch of the reductions that can run on the layer rules instead of ``vmap``.

``clipped_grad_sum``, ``per_sample_grad_norms`` and ``per_sample_gram`` take ``method="auto"``,
``"vmap"`` or ``"layers"``: this module decides when the layer rules pay (:func:`ghost_pays`),
runs them (:func:`reduce_by_layers`, :func:`layer_chunks`) and words their errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.grads._layer_rules import MAX_NORM, SAVED_TENSOR_HOOKS, Unsupported
from functrain.grads._per_example import RECURRENT_NAMES, _example_loss, batch_size_of

PyTree = Any

# ``method="auto"`` of the reductions that can skip per-sample gradients (clipped sums, norms)
# takes the layer rules when a chunk of per-sample gradients would reach this size.
GHOST_BYTES = 64 * 2**20


def ghost_pays(params: PyTree, batch: PyTree, chunk_size: int | None) -> bool:
    """Whether ``method="auto"`` should try the layer rules (eager, large per-sample gradients)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False  # the rules are eager only, outside torch.func transforms
    rows = batch_size_of(batch) if chunk_size is None else chunk_size
    return rows * sum(p.numel() * p.element_size() for p in tree.leaves(params)) >= GHOST_BYTES


def _slices(
    batch_leaves: list[torch.Tensor], n: int, chunk_size: int | None
) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """``(start, stop, leaves[start:stop])`` chunk by chunk (the leaves themselves for one).

    An empty batch is one empty chunk, so that every reduction gives its value for no
    examples (empty per-sample results, a zero clipped sum) rather than nothing.
    """
    if n == 0:
        yield 0, 0, batch_leaves
        return
    step = n if chunk_size is None else chunk_size
    for start in range(0, n, step):
        stop = min(start + step, n)
        yield (
            start,
            stop,
            (batch_leaves if (start, stop) == (0, n) else [x[start:stop] for x in batch_leaves]),
        )


class LayerChunks(NamedTuple):
    """What a ``method="layers"`` reduction iterates on (see :func:`layer_chunks`)."""

    example_loss: Callable[..., Any]
    param_leaves: list[torch.Tensor]
    param_spec: Any
    chunks: Iterator[tuple[int, int, list[torch.Tensor]]]


def layer_chunks(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    chunk_size: int | None,
    buffers: PyTree | None,
) -> LayerChunks:
    """The per-example loss, the parameter leaves and the batch chunks of a reduction that
    runs the layer rules (``clipped_grad_sum``, ``per_sample_grad_norms``)."""
    if torch.compiler.is_compiling():
        raise ValueError("method='layers' runs eagerly only; use method='vmap' in torch.compile")
    if torch._C._are_functorch_transforms_active():
        raise ValueError(eager_only_error("method='layers'"))
    param_leaves, param_spec = tree.flatten(params)
    batch_leaves, batch_spec = tree.flatten(batch)
    example_loss = _example_loss(loss_fn, param_spec, batch_spec, buffers, has_aux=False)
    chunks = _slices(batch_leaves, batch_size_of(batch), chunk_size)
    return LayerChunks(example_loss, param_leaves, param_spec, chunks)


REDUCTION_METHODS = ("auto", "vmap", "layers", "loop")


def reduce_by_layers(
    method: str,
    params: PyTree,
    batch: PyTree,
    chunk_size: int | None,
    run: Callable[[], Any],
) -> Any:
    """``run()`` (a reduction by the layer rules) where ``method`` asks for it, else ``None``.

    ``"layers"`` always runs it and turns :class:`Unsupported` into :func:`layers_error`;
    ``"auto"`` runs it when :func:`ghost_pays` and returns ``None`` (use vmap) if it can't,
    unless vmap cannot either (``Unsupported.fatal``).
    """
    if method == "layers" or (method == "auto" and ghost_pays(params, batch, chunk_size)):
        try:
            return run()
        except Unsupported as err:
            if method == "layers" or err.fatal:
                raise layers_error(err, params) from None
    return None


def layers_error(err: Unsupported, params: PyTree) -> ValueError:
    """The error of ``method="layers"`` when a parameter has no per-layer rule."""
    if err.index is None:
        return ValueError(
            f"method='layers': loss_fn calls {err.call}, whose backward pass would run the "
            "layer rules inside the forward (they feed the per-example gradients); use "
            "method='vmap' (torch.func.grad composes with it)"
        )
    path = tree.path_str(tree.flatten_with_paths(params)[0][err.index], "params")
    if err.context == MAX_NORM:
        return ValueError(
            f"method='layers': {path} is used by {err.call} {err.context}, which per-sample "
            "gradients cannot do per example and must not do to params (method='vmap' fails "
            "on it, or changes params where every example looks up the same rows); drop "
            "max_norm and renormalize the weight outside loss_fn (e.g. after each update)"
        )
    if err.call in RECURRENT_NAMES:
        # No vmap batching rule either, so "use method='vmap'" would send the user to another
        # error; the loop differentiates one example at a time.
        return ValueError(
            f"method='layers': {path} is used by {err.call}, a fused recurrent kernel "
            "(nn.RNN, nn.LSTM, nn.GRU or a cell) with no per-layer rule, which method='vmap' "
            "cannot differentiate per example either (no vmap batching rule); use "
            "method='loop' (one example's gradient after another), which method='auto' picks for it"
        )
    if err.context == SAVED_TENSOR_HOOKS:
        # torch.func's grad refuses these hooks too, so method="vmap" is no way out.
        return ValueError(
            f"method='layers': {path} is used by {err.call} {err.context}, whose backward "
            "recomputes or reloads tensors outside the per-layer rules, and method='vmap' "
            "cannot differentiate them either; use method='loop' (one autograd pass per "
            "example), which method='auto' picks for them"
        )
    where = f" {err.context}" if err.context else ""
    return ValueError(
        f"method='layers': {path} is used by {err.call}{where}, which has no per-layer rule "
        "(rules: linear, conv1d/2d/3d (grouped and depthwise included), layer_norm, embedding); "
        "use method='vmap'"
    )


def eager_only_error(what: str) -> str:
    """The refusal of a route that cannot run under an outer ``torch.func`` transform."""
    return (
        f"{what} cannot run under a torch.func transform (e.g. torch.func.vmap over an "
        "ensemble's parameters, or torch.func.grad through the result): it takes autograd "
        "passes of its own, which the transform cannot see through. Use method='vmap' (or "
        "'auto', which takes it there)"
    )
