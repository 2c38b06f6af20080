"""How a chunk of examples gets its per-example gradients: the routes behind ``method``.

``"vmap"`` (``vmap(grad(...))``), ``"layers"`` (one vmapped forward, then layer rules in the
backward pass), ``"loop"`` (autograd, one example after another, for what ``vmap`` cannot batch:
PyTorch's fused recurrent kernels), and ``"auto"``, which starts with the layer rules (or
``vmap``) and moves to the next route for the rest of the batch when a call refuses. Each route
is a runner ``pieces(param_leaves, chunk_leaves)`` yielding ``(start, stop, values, grads)``
pieces of the chunk (internal; :mod:`functrain.grads.per_sample` uses them).
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from functrain import _func_transforms, tree
from functrain._messages import message
from functrain.grads._layer_dispatch import eager_only_error, layers_error
from functrain.grads._layer_passes import per_sample_by_layers
from functrain.grads._layer_rules import SAVED_TENSOR_HOOKS, Unsupported
from functrain.grads._per_example import (
    RECURRENT_NAMES,
    AuxSplit,
    Generators,
    Piece,
    RecurrentCall,
    RecurrentWatch,
    _example_loss,
    embedding_vmap_error,
    loop_grads,
    rng_devices,
    rnn_vmap_error,
    with_value,
)

__all__: list[str] = []  # internal

PyTree = Any

# torch.func's refusal of saved-tensor hooks (activation checkpointing) in the loss.
_FUNC_HOOKS_REFUSAL = "support saved tensor hooks"
# What the errors of a recurrent kernel under vmap advise.
_USE_LOOP = (
    "Use method='loop' (one gradient per example, one after another; method='auto' picks it "
    "for these modules and for activation checkpointing)."
)
# ... and under an outer torch.func transform, where the loop is refused too (it named the loop,
# whose refusal named vmap: each error sent the user to the other).
_NO_LOOP_UNDER_TRANSFORM = (
    "Under an outer torch.func transform (vmap over an ensemble, grad through the result) "
    "method='loop' cannot run either (it takes autograd passes of its own): call the "
    "per-sample function outside the transform, e.g. once per ensemble member."
)

# loss_fns whose forward ran under RecurrentWatch without a recurrent kernel: "auto" runs them
# unwatched from then on (the watch costs a Python call per torch call, 2-5% of a small CNN's
# per-sample pass on CPU). A recurrent kernel met later anyway still fails under vmap, and that
# failure sends the batch to the loop (a float32 nn.LSTM on CPU runs vmap's slow fallback
# instead: the same numbers, with torch's warning).
_WATCHED: weakref.WeakSet[Any] = weakref.WeakSet()
# The same for bound methods (``model.loss``), a new object at every attribute access, which
# _WATCHED would drop as soon as the call ends: their functions, by instance.
_WATCHED_METHODS: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def _watch(loss_fn: Any) -> bool:
    """Whether ``"auto"`` still runs ``loss_fn``'s ``vmap`` routes under the watch."""
    try:
        if isinstance(loss_fn, types.MethodType):
            return loss_fn.__func__ not in _WATCHED_METHODS.get(loss_fn.__self__, ())
        return loss_fn not in _WATCHED
    except TypeError:  # not weakly referable or not hashable: watched every time
        return True


def _watched(loss_fn: Any) -> None:
    """Records that ``loss_fn`` ran under the watch without a recurrent kernel."""
    with contextlib.suppress(TypeError):
        if isinstance(loss_fn, types.MethodType):
            owner = loss_fn.__self__
            if owner not in _WATCHED_METHODS:
                _WATCHED_METHODS[owner] = weakref.WeakSet()
            _WATCHED_METHODS[owner].add(loss_fn.__func__)
        else:
            _WATCHED.add(loss_fn)


def _with_live_value(example_loss: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`with_value` without its ``detach``: under an outer ``torch.func.grad``/``jvp``
    the per-example losses are results to differentiate (detached, they got a silent zero)."""

    def run(param_leaves: list[torch.Tensor], example_leaves: list[torch.Tensor]) -> Any:
        loss, extras = example_loss(param_leaves, example_leaves)
        return loss, (loss, extras)

    return run


def _vmap_grad(
    example_loss: Callable[..., Any],
    randomness: str,
    auto: Any = None,
    transformed: bool = False,
) -> Callable[[list[torch.Tensor], list[torch.Tensor]], tuple[Any, list[torch.Tensor]]]:
    """The ``"vmap"`` method: ``vmap(grad(example_loss))`` over the chunk's examples.

    ``auto``: the user's ``loss_fn`` under ``"auto"`` (else ``None``). A recurrent kernel then
    raises :class:`RecurrentCall` (the caller loops over the examples instead): seen by
    :class:`RecurrentWatch` before it runs (the first time), or by its failure under ``vmap``.
    ``transformed``: the call runs under an outer ``torch.func`` transform (the loop is no
    way out; a differentiating one gets differentiable losses).
    """
    value = _with_live_value if transformed and _func_transforms.differentiating() else with_value
    advice = _NO_LOOP_UNDER_TRANSFORM if transformed else _USE_LOOP
    vmapped = torch.func.vmap(
        torch.func.grad(value(example_loss), has_aux=True),
        in_dims=(None, 0),
        randomness=randomness,
    )

    def run(param_leaves: list[torch.Tensor], batch_leaves: list[torch.Tensor]) -> Any:
        if batch_leaves and batch_leaves[0].shape[0] == 0:
            return _empty_by_stand_in(attempt, param_leaves, batch_leaves)
        return attempt(param_leaves, batch_leaves)

    def attempt(param_leaves: list[torch.Tensor], batch_leaves: list[torch.Tensor]) -> Any:
        try:
            if auto is not None and _watch(auto):
                with RecurrentWatch():
                    grads, values = vmapped(param_leaves, batch_leaves)
                _watched(auto)
            else:
                grads, values = vmapped(param_leaves, batch_leaves)
        except (RuntimeError, UserWarning) as err:  # torch's warning, when raised as an error
            embedding = embedding_vmap_error(err, "per-sample gradients")
            if embedding is not None:
                raise embedding from err
            clear = rnn_vmap_error(err, "per-sample gradients", advice)
            if clear is not None:
                raise (RecurrentCall("a recurrent module") if auto is not None else clear) from err
            if _FUNC_HOOKS_REFUSAL in message(err):
                if auto is not None and not transformed:
                    raise RecurrentCall("saved-tensor hooks") from err  # the loop can
                raise ValueError(
                    "method='vmap': loss_fn runs under saved-tensor hooks (activation "
                    "checkpointing or offloading), which torch.func cannot differentiate. " + advice
                ) from err
            raise
        return values, grads

    return run


def _empty_by_stand_in(
    run: Callable[[list[torch.Tensor], list[torch.Tensor]], Any],
    param_leaves: list[torch.Tensor],
    batch_leaves: list[torch.Tensor],
) -> Any:
    """``run`` over an empty chunk: one example of zeros, of which nothing is kept.

    vmap over an empty dimension fails in some batching rules (a convolution's gave
    "Expected input batch_size (0) to match target batch_size (1)" in a cross-entropy after
    it); one stand-in example gives the outputs' shapes and dtypes, sliced to zero rows. Its
    random draws are undone: an empty batch draws nothing, as the loop's does.
    """
    generators = Generators(rng_devices(param_leaves, batch_leaves))
    before = generators.get()
    try:
        values, grads = run(param_leaves, [x.new_zeros((1, *x.shape[1:])) for x in batch_leaves])
    finally:
        generators.set(before)
    return tree.map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, values), [
        g[:0] for g in grads
    ]


def _rows(chunk: list[torch.Tensor]) -> int:
    return chunk[0].shape[0]


def _once(
    run: Callable[[list[torch.Tensor], list[torch.Tensor]], tuple[Any, list[torch.Tensor]]],
) -> Callable[[list[torch.Tensor], list[torch.Tensor]], Iterator[Piece]]:
    """A batched route (vmap, layers) as a runner of pieces: the chunk in one piece."""

    def pieces(param_leaves: list[torch.Tensor], chunk: list[torch.Tensor]) -> Iterator[Piece]:
        values, grads = run(param_leaves, chunk)
        yield 0, _rows(chunk), values, grads

    return pieces


def _auto(
    first: Callable[[list[torch.Tensor], list[torch.Tensor]], tuple[Any, list[torch.Tensor]]],
    vmap: Callable[[list[torch.Tensor], list[torch.Tensor]], tuple[Any, list[torch.Tensor]]],
    loop: Callable[[list[torch.Tensor], list[torch.Tensor]], Iterator[Piece]],
    params: PyTree,
    generators: Generators,
) -> Callable[[list[torch.Tensor], list[torch.Tensor]], Iterator[Piece]]:
    """``"auto"``: ``first`` (the layer rules or ``vmap``) until a call refuses, then ``vmap``
    (rules refused a call) or the loop (a fused recurrent kernel), for the rest of the batch.

    A refused attempt may have drawn random numbers before the refusal (dropout on the
    embeddings of an LSTM): the default generators are put back, so the next route draws what
    it draws when asked for by name (``"auto"`` on a recurrent model is ``"loop"``, bit for bit).
    """
    route: list[Any] = [first]

    def pieces(param_leaves: list[torch.Tensor], chunk: list[torch.Tensor]) -> Iterator[Piece]:
        while route[0] is not loop:
            before = generators.get()  # host copies of a few KiB: no device sync
            try:
                values, grads = route[0](param_leaves, chunk)
            except Unsupported as err:  # only the layer rules raise it
                if err.fatal:  # vmap cannot differentiate it either
                    raise layers_error(err, params) from None
                generators.set(before)
                # torch.func cannot differentiate saved-tensor hooks (activation
                # checkpointing) either: the loop's autograd passes can.
                to_loop = err.call in RECURRENT_NAMES or err.context == SAVED_TENSOR_HOOKS
                route[0] = loop if to_loop else vmap
            except RecurrentCall:
                generators.set(before)
                route[0] = loop
            else:
                yield 0, _rows(chunk), values, grads
                return
        yield from loop(param_leaves, chunk)

    return pieces


def _chunk_runner(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch_spec: Any,
    buffers: PyTree | None,
    randomness: str,
    has_aux: bool,
    route: str,
    aux_split: AuxSplit,
    generators: Generators,
    stream: bool,
) -> Callable[[list[torch.Tensor], list[torch.Tensor]], Iterator[Piece]]:
    """``pieces(param_leaves, chunk_leaves)`` over a chunk, by ``route``: a ``method`` or
    ``"vmap-auto"`` (``"auto"`` of a reduction that did not take the rules: ``vmap``, or the
    loop for a recurrent model). ``stream``: the loop yields its examples one by one."""
    example_loss = _example_loss(
        loss_fn, tree.structure(params), batch_spec, buffers, has_aux, aux_split
    )
    loop = loop_grads(example_loss, randomness, generators, stream, has_aux)
    compiling = torch.compiler.is_compiling()
    # Under an outer torch.func transform (vmap of an ensemble, grad through the gradients)
    # only vmap composes: the loop's autograd passes and the rules' autograd.Functions do not.
    transformed = torch._C._are_functorch_transforms_active()
    if transformed and route in ("loop", "layers"):
        raise ValueError(eager_only_error(f"method={route!r}"))
    if route == "loop":
        if compiling:
            # Traced, its autograd and pytree calls failed with errors that named neither
            # (``length mismatch``). Raised while tracing, this makes torch.compile run the
            # call eagerly (a graph break); fullgraph=True reports it.
            raise ValueError(
                "method='loop' runs eagerly only (one autograd pass per example, which "
                "torch.compile does not trace): keep the call out of a fullgraph region, e.g. "
                "torch.compiler.disable(ft.per_sample_grads)(..., method='loop')"
            )
        return loop
    if route == "vmap" or (route in ("auto", "vmap-auto") and (compiling or transformed)):
        return _once(_vmap_grad(example_loss, randomness, transformed=transformed))
    vmap = _vmap_grad(example_loss, randomness, auto=loss_fn)
    if route == "vmap-auto":
        return _auto(vmap, vmap, loop, params, generators)
    if compiling:
        raise ValueError("method='layers' runs eagerly only; use method='vmap' in torch.compile")

    def by_layers(param_leaves: list[torch.Tensor], batch_leaves: list[torch.Tensor]) -> Any:
        try:
            return per_sample_by_layers(example_loss, param_leaves, batch_leaves, randomness)
        except Unsupported as err:
            if route == "layers":
                raise layers_error(err, params) from None
            raise  # "auto" picks the next route
        except (RuntimeError, UserWarning) as err:
            # A recurrent kernel on buffers only (a frozen encoder) passes the rules, then fails
            # under their vmapped forward.
            clear = rnn_vmap_error(err, "per-sample gradients (method='layers')", _USE_LOOP)
            if clear is None:
                raise
            if route == "auto":
                raise RecurrentCall("a recurrent module") from err
            raise clear from err

    if route == "layers":
        return _once(by_layers)
    return _auto(by_layers, vmap, loop, params, generators)


def layers_attempt(
    method: str, params: PyTree, batch: PyTree, buffers: PyTree | None, run: Callable[[], Any]
) -> Callable[[], Any]:
    """``run`` (a reduction by the layer rules, for :func:`reduce_by_layers`) as the
    reductions' ``"auto"`` and ``"layers"`` should run it.

    A recurrent kernel on buffers only (a frozen encoder: the rules see no parameter in it)
    fails under the rules' vmapped forward. ``"auto"`` then moves on, as for a call without a
    rule (to ``vmap``, whose watch sends the batch to the loop), with the default generators
    put back (as :func:`_auto` does); ``"layers"`` raises an error that names the loop.
    """

    def attempt() -> Any:
        if method != "auto":
            try:
                return run()
            except (RuntimeError, UserWarning) as err:
                clear = rnn_vmap_error(err, "method='layers'", _USE_LOOP)
                if clear is None:
                    raise
                raise clear from err
        generators = Generators(rng_devices(params, batch, buffers))
        before = generators.get()
        try:
            return run()
        except Unsupported as err:
            if not err.fatal:  # vmap runs it next
                generators.set(before)
            raise
        except (RuntimeError, UserWarning) as err:
            if rnn_vmap_error(err, "", "") is None:
                raise
            generators.set(before)
            raise Unsupported(None, "a recurrent module") from err

    return attempt
