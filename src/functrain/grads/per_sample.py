"""Per-sample gradients with ``torch.func``: one gradient per example, as a pytree.

``loss_fn(params, batch) -> scalar mean loss`` is the same function a train step uses. Each
example is given back its leading batch dimension (size 1) and differentiated on its own with
``torch.func.vmap(torch.func.grad(...))``, so any model ``vmap`` can batch works: tied
weights, custom layers, attention, functional code. Nothing hooks into modules. Where every
parameter belongs to a linear, convolution, layer-norm or embedding call, the default
``method="auto"`` takes a faster exact route instead: the same vmapped forward, then one
backward pass whose layer rules form the per-example gradients. PyTorch's fused recurrent
modules (``nn.LSTM``/``nn.GRU``/``nn.RNN`` and their cells), which ``vmap`` cannot batch, are
differentiated one example after another by autograd (``method="loop"``, which
``"auto"`` picks for them; ``method`` of :func:`per_sample_grads`).

Two extra inputs are explicit rather than hidden:

* **Buffers** (e.g. BatchNorm running statistics in eval mode) are passed as ``buffers=`` and
  reach ``loss_fn(params, batch, buffers=...)`` when its signature names ``buffers``, as in
  :func:`make_train_step`. Buffers are shared by every example and are not differentiated;
  updated buffers returned in a ``LossOutput`` are ignored. Batch statistics (a BatchNorm in train mode) couple the
  examples, so per-sample gradients of such a model are not defined: use eval mode.
* **Randomness** inside ``loss_fn`` (dropout) follows ``torch.func.vmap``'s ``randomness``:
  ``"error"`` (default: random ops raise), ``"different"`` (independent draws per example) or
  ``"same"`` (one draw shared by the examples of a chunk; each chunk draws anew). The
  ``"loop"`` method gives the same semantics on the default generators (CPU and the devices of
  ``params``, ``batch`` and ``buffers``): ``"different"``: the examples draw one after another,
  as a plain loop over them after the same seed would; ``"same"``: the generators are put back
  to their state at the chunk's start before each of its examples; ``"error"``: an example
  that moved a generator raises ``RuntimeError`` (the generators are put back first; a draw
  from a ``torch.Generator`` of ``loss_fn``'s own is not seen). The numbers are not those of
  ``vmap``'s draws in general (``vmap`` draws the chunk's numbers in one call: CPU dropout
  happens to match, ``randn`` does not).

``loss_fn`` may return what a train step accepts: a 0-d mean loss, ``ft.LossSum(total, count)``
(the per-example loss is then the example's own mean ``total / count``, so with unequal counts
the mean of per-sample gradients is not the token-weighted batch gradient; an example that
counts 0 units, padding only, has loss and gradient 0) or
``ft.LossOutput(loss, aux=...)``. A ``key`` argument is not supplied: randomness goes through
``randomness``.

``chunk_size`` bounds memory: examples are processed ``chunk_size`` at a time. The streaming
reductions in :mod:`functrain.grads.streaming` and :mod:`functrain.grads.privacy` consume
:func:`per_sample_chunks` and never hold more than one chunk of per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from functrain import _func_transforms, tree

# REDUCTION_METHODS, layer_chunks and reduce_by_layers moved to _layer_dispatch; they stay
# importable from here, as before the split.
from functrain.grads._layer_dispatch import (  # noqa: F401
    REDUCTION_METHODS,
    _slices,
    layer_chunks,
    layers_error,
    reduce_by_layers,
)
from functrain.grads._per_example import (
    AuxSplit,
    Generators,
    _check_options,
    batch_size_of,
    rng_devices,
)
from functrain.grads._routes import _chunk_runner

__all__ = [
    "PerSampleChunk",
    "per_sample_chunks",
    "per_sample_grads",
    "per_sample_value_and_grads",
]

PyTree = Any


class PerSampleChunk(NamedTuple):
    """One chunk of per-sample results: examples ``start:stop`` of the batch.

    Attributes:
        start: index of the chunk's first example in the batch.
        stop: one past the chunk's last example.
        grads: pytree like ``params``, each leaf with a leading dimension ``stop - start``.
        losses: the per-example losses, shape ``(stop - start,)``.
        aux: per-example auxiliary outputs (``has_aux=True``), else ``None``.

    Example:
        >>> import torch, functrain as ft
        >>> loss_fn = lambda p, x: (x * p).sum(-1).mean()
        >>> chunk = next(ft.per_sample_chunks(loss_fn, torch.ones(2), torch.ones(3, 2)))
        >>> chunk.start, chunk.stop, tuple(chunk.grads.shape), chunk.losses
        (0, 3, (3, 2), tensor([2., 2., 2.]))
    """

    start: int
    stop: int
    grads: PyTree
    losses: torch.Tensor
    aux: Any


def per_sample_chunks(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
    buffers: PyTree | None = None,
    randomness: str = "error",
    has_aux: bool = False,
    method: str = "auto",
) -> Iterator[PerSampleChunk]:
    """Yields per-sample gradients chunk by chunk; the building block of streaming reductions.

    Only one chunk (``chunk_size`` × parameters) is alive at a time if the caller drops each
    chunk before asking for the next.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar mean loss`` (called with ``buffers=`` when
            its signature names it; returning ``(loss, aux)`` when ``has_aux``).
        params: pytree of floating-point tensors to differentiate.
        batch: pytree of tensors sharing a leading batch dimension.
        chunk_size: examples per chunk (``None``: the whole batch in one chunk).
        buffers: non-differentiated state shared by all examples (eval-mode statistics).
        randomness: ``torch.func.vmap`` randomness mode: ``"error"``, ``"different"``, ``"same"``.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is batched per example.
        method: ``"auto"``, ``"vmap"``, ``"layers"`` or ``"loop"``, as in
            :func:`per_sample_grads`.

    Yields:
        A :class:`PerSampleChunk` per chunk: ``start``/``stop`` (the chunk's rows), ``grads``
        (per-sample gradients of its examples), ``losses`` and ``aux``.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2)}
        >>> batch = torch.arange(6.0).reshape(3, 2)
        >>> loss_fn = lambda p, x: (x @ p["w"]).mean()
        >>> [(c.start, c.stop) for c in ft.per_sample_chunks(loss_fn, params, batch, chunk_size=2)]
        [(0, 2), (2, 3)]
    """
    _check_options(chunk_size, randomness, loss_fn, params, method, REDUCTION_METHODS)
    yield from _chunks(loss_fn, params, batch, chunk_size, buffers, randomness, has_aux, method)


def _chunks(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    chunk_size: int | None,
    buffers: PyTree | None,
    randomness: str,
    has_aux: bool,
    route: str,
    stream: bool = False,
) -> Iterator[PerSampleChunk]:
    """:func:`per_sample_chunks` by ``route`` (see :func:`_chunk_runner`), options checked."""
    n = batch_size_of(batch)
    param_leaves, param_spec = tree.flatten(params)
    # ``torch.func.grad`` composes with autograd: leaves that require grad (``nn.Parameter``s
    # from ``named_parameters()``) gave results holding the whole chunk's graph, kept alive
    # as long as the results were. Per-sample gradients are values, not differentiable
    # outputs, except under an outer torch.func.grad/jvp, which asks for their derivative
    # (detached, it silently got zero).
    keep = _func_transforms.differentiating()
    param_leaves = [p if keep else p.detach() for p in param_leaves]
    batch_leaves, batch_spec = tree.flatten(batch)
    # The same for a batch that requires grad (the output of an upstream model): the results,
    # and a clipped sum accumulated over chunks, held every chunk's graph.
    batch_leaves = [x if keep else x.detach() for x in batch_leaves]
    aux_split = AuxSplit()
    generators = Generators(rng_devices(param_leaves, batch_leaves, buffers))
    run = _chunk_runner(
        loss_fn,
        params,
        batch_spec,
        buffers,
        randomness,
        has_aux,
        route,
        aux_split,
        generators,
        stream,
    )
    for start, _, chunk in _slices(batch_leaves, n, chunk_size):
        for first, last, (losses, extras), grads in run(param_leaves, chunk):
            aux = aux_split.join(extras) if has_aux else None
            grads = tree.unflatten(param_spec, grads)
            yield PerSampleChunk(start + first, start + last, grads, losses, aux)
            # Released before the next piece is computed: the caller holds what it still
            # needs, and these names would keep a second chunk of per-sample gradients alive.
            del losses, extras, grads, aux
        del chunk


def vmap_chunks(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    chunk_size: int | None,
    buffers: PyTree | None,
    randomness: str,
    method: str = "vmap",
) -> Iterator[PerSampleChunk]:
    """The reductions' route where they form per-sample gradients (internal): ``"vmap"``,
    ``"loop"``, or ``"auto"`` (``vmap``, or the loop for a recurrent model). The loop yields
    one example at a time, so a reduction never holds more than one of its gradients."""
    route = "vmap-auto" if method == "auto" else method
    return _chunks(
        loss_fn, params, batch, chunk_size, buffers, randomness, False, route, stream=True
    )


def _concat(chunks: list[Any]) -> Any:
    """The chunks' tensor leaves concatenated; other leaves (aux constants) from the first."""
    if len(chunks) == 1:
        return chunks[0]
    return tree.map(
        lambda *xs: torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0],
        chunks[0],
        *chunks[1:],
    )


def per_sample_value_and_grads(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
    buffers: PyTree | None = None,
    randomness: str = "error",
    has_aux: bool = False,
    method: str = "auto",
) -> tuple[Any, PyTree]:
    """Per-example losses and gradients: ``(losses, grads)``, or ``((losses, aux), grads)``.

    The convention of ``jax.value_and_grad``, vmapped over the examples.

    Args:
        loss_fn: as in :func:`per_sample_grads`.
        params: as in :func:`per_sample_grads`.
        batch: as in :func:`per_sample_grads`.
        chunk_size: as in :func:`per_sample_grads`.
        buffers: as in :func:`per_sample_grads`.
        randomness: as in :func:`per_sample_grads`.
        has_aux: as in :func:`per_sample_grads`.
        method: as in :func:`per_sample_grads`.

    Returns:
        ``(losses, grads)``: each example's loss ``(batch_size,)`` and the per-sample gradients
        (a pytree like ``params`` with a leading batch dimension); with ``has_aux``,
        ``((losses, aux), grads)``.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2)}
        >>> batch = {"x": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "y": torch.zeros(2)}
        >>> loss_fn = lambda p, b: ((b["x"] @ p["w"] - b["y"]) ** 2).mean()
        >>> losses, grads = ft.per_sample_value_and_grads(loss_fn, params, batch)
        >>> losses
        tensor([ 9., 49.])
        >>> grads["w"]
        tensor([[ 6., 12.],
                [42., 56.]])
    """
    chunks = list(
        per_sample_chunks(
            loss_fn,
            params,
            batch,
            chunk_size=chunk_size,
            buffers=buffers,
            randomness=randomness,
            has_aux=has_aux,
            method=method,
        )
    )
    grads = _concat([c.grads for c in chunks])
    losses = torch.cat([c.losses for c in chunks]) if len(chunks) > 1 else chunks[0].losses
    if not has_aux:
        return losses, grads
    return (losses, _concat([c.aux for c in chunks])), grads


def per_sample_grads(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
    buffers: PyTree | None = None,
    randomness: str = "error",
    has_aux: bool = False,
    method: str = "auto",
) -> PyTree:
    """The gradient of ``loss_fn`` at each example of ``batch``, stacked on a leading dimension.

    ``result[leaf][i] = ∇ loss_fn(params, batch[i:i+1])``: the loss of a batch of one. For a
    mean loss, the batch gradient is the mean of the per-sample gradients.

    Compared with Opacus or BackPACK there are no module hooks and no list of supported layers:
    tied weights, attention and arbitrary functional code work, at the price of holding
    ``chunk_size`` gradients at a time. To reduce them without storing the whole batch (norms,
    clipped sums, moments, Gram matrices), use :mod:`functrain.grads.streaming` or
    :func:`clipped_grad_sum`.

    Attention on CPU: ``vmap`` has no batching rule for the fused CPU attention kernel and
    falls back to a slow per-example loop with a warning; call the model under
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` inside ``loss_fn``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar mean loss``, the train step's loss (or a
            ``LossSum`` / ``LossOutput``). It gets ``buffers=`` when its signature names it.
            With ``has_aux``, it returns ``(loss, aux)`` or a ``LossOutput`` with ``aux``.
        params: pytree of floating-point tensors (any optree pytree), not on the meta device.
        batch: pytree of tensors sharing a leading batch dimension (a mismatch raises
            ``ValueError`` naming the leaf). An empty batch (size 0) gives empty results, and
            the reductions their value for no examples (a zero clipped sum, ``count`` 0).
        chunk_size: examples per ``vmap`` call, bounding the memory of intermediate activations
            (the output itself holds the whole batch). ``None``: one call. For ``"loop"``,
            the examples that share a draw under ``randomness="same"``.
        buffers: non-differentiated state shared by all examples, e.g. a model's eval-mode
            BatchNorm statistics from ``dict(model.named_buffers())``; passed as
            ``loss_fn(params, batch, buffers=buffers)``.
        randomness: ``"error"`` (random ops inside ``loss_fn`` raise), ``"different"``
            (independent draws per example) or ``"same"`` (one draw per chunk).
        has_aux: return ``(grads, aux)`` with per-example ``aux`` (from ``(loss, aux)`` or
            ``LossOutput.aux``): its tensor leaves get the leading batch dimension; its other
            leaves (``None``, numbers, strings), which cannot differ between examples, come
            back once, as returned.
        method: ``"vmap"`` differentiates each example with ``vmap(grad(...))``: any model
            ``vmap`` can batch (not ``nn.LSTM``/``nn.GRU``/``nn.RNN``, whose fused kernels
            have no batching rule: ``RuntimeError``). ``"loop"`` takes the gradient of
            each example's loss (the same loss as ``"vmap"``: buffers, ``LossSum`` and aux
            alike) one example after another, by autograd: any model autograd can differentiate,
            recurrent modules included, at the speed of a Python loop over the batch
            (``has_aux`` with an empty batch raises ``ValueError``: no example shows aux's
            structure; eager only: a graph break under ``torch.compile``, refused with
            ``fullgraph=True``).
            ``"layers"`` still runs each example's forward under ``vmap`` (so examples cannot
            interact), then takes one ordinary backward pass over the batch in which every
            linear, convolution (grouped and depthwise included), layer-norm and
            embedding call forms its parameters' per-example gradients from its input and
            output gradient, as Opacus'
            hooks do, but without hooks. It applies when every parameter is the weight or bias
            of such a call (tied uses add up; uses under ``torch.no_grad`` add nothing and are
            free) and raises ``ValueError`` naming the first parameter used otherwise (also
            inside ``loss_fn``'s own ``torch.func.grad``/``vjp``/``jvp`` or
            ``torch.autograd.grad``, e.g. a gradient penalty, which ``"vmap"`` handles); it is
            what lets :func:`clipped_grad_sum` and :func:`per_sample_grad_norms` work without
            forming per-sample gradients. ``"auto"`` (default): ``"layers"`` where it applies
            and the call is eager (not under ``torch.compile`` nor an outer ``torch.func``
            transform, where ``"layers"`` and ``"loop"`` raise ``ValueError``), else
            ``"vmap"``, or
            ``"loop"`` where ``loss_fn`` calls a fused recurrent kernel (seen before the
            kernel runs); when the rules or the kernel refuse a call the forward is rerun
            under the next route, so Python side effects of ``loss_fn`` can happen twice
            (random draws on the default generators are undone first: the numbers are those
            of the route that ran, for a recurrent model those of ``"loop"``). Same numbers
            to rounding either way; on CPU
            ``"layers"`` measured about 10% faster than ``"vmap"`` on an MLP and up to 20% on
            the Opacus MNIST CNN (small CNNs trade places with the allocator's state; see
            ``tools/bench.py``). An embedding with ``max_norm``, which renormalizes its
            weight in place during the forward, is refused (``ValueError``) by ``"layers"``
            and ``"auto"``, and by ``"vmap"`` unless every example looks up the same rows
            (``vmap`` then renormalizes ``params`` in place, as the module would).

    Returns:
        A pytree like ``params`` whose leaves have shape ``(batch_size, *param.shape)``; with
        ``has_aux``, ``(grads, aux)``. Values without an autograd graph (``params`` that
        require grad do not keep the chunks' graphs alive); under an outer
        ``torch.func.grad``/``jvp`` (a penalty on per-sample gradients) they are
        differentiated as ``vmap(grad(...))`` is. The same holds for the reductions
        (:func:`clipped_grad_sum`, :func:`per_sample_grad_norms`, :func:`per_sample_gram`...).

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2)}
        >>> batch = {"x": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "y": torch.zeros(2)}
        >>> loss_fn = lambda p, b: ((b["x"] @ p["w"] - b["y"]) ** 2).mean()
        >>> ft.per_sample_grads(loss_fn, params, batch)["w"]
        tensor([[ 6., 12.],
                [42., 56.]])
    """
    values, grads = per_sample_value_and_grads(
        loss_fn,
        params,
        batch,
        chunk_size=chunk_size,
        buffers=buffers,
        randomness=randomness,
        has_aux=has_aux,
        method=method,
    )
    return (grads, values[1]) if has_aux else grads
