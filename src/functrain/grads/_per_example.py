"""Per-example plumbing of :mod:`functrain.grads.per_sample` and the layer-rule reductions.

The batch size check, the option checks, ``loss_fn`` wrapped as the loss of one example, and the
``"loop"`` method: one autograd pass per example, for models ``vmap`` cannot batch (PyTorch's
fused recurrent kernels), with the ``randomness`` modes of ``vmap`` reproduced on the default
generators.
"""

from __future__ import annotations

import inspect
import numbers
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from functrain import tree
from functrain._messages import message

PyTree = Any
_RANDOMNESS = ("error", "different", "same")
_METHODS = ("vmap", "layers")
# PyTorch's recurrent modules (nn.LSTM, nn.GRU, nn.RNN and their cells) live in the first file,
# sequence packing in the second; their kernels have no vmap batching rule and fail with a shape
# error that names no module.
_RNN_FILES = (
    os.path.join("torch", "nn", "modules", "rnn.py"),
    os.path.join("torch", "nn", "utils", "rnn.py"),
)
_VMAP_FAILURES = (
    "doesn't match the broadcast shape",
    "Batching rule not implemented",
    # vmap's slow fallback: its warning (a float32 nn.LSTM on CPU) raised as an error, and the
    # stacking of packed sequences of different lengths
    "not yet implemented the batching rule",
    "stack expects each tensor to be equal size",
)


def rnn_vmap_error(err: Exception, where: str, advice: str) -> RuntimeError | None:
    """A clear error for a recurrent module run under ``torch.func.vmap``, else ``None``.

    Args:
        err: the error ``vmap`` raised (or its fallback's warning, raised as an error).
        where: the caller's name for the vmapped computation (starts the message).
        advice: what to use instead, appended to the message.

    Returns:
        A ``RuntimeError`` naming the cause (raise it ``from err``), or ``None`` when ``err``
        did not come from a recurrent module's kernel under ``vmap``.
    """
    if not any(text in message(err) for text in _VMAP_FAILURES):
        return None
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(_RNN_FILES):
            return RuntimeError(
                f"{where}: the model runs a recurrent module (nn.LSTM, nn.GRU, nn.RNN or a cell) "
                "or packs sequences (torch.nn.utils.rnn) under torch.func.vmap, which PyTorch "
                "cannot differentiate per example (its kernels have no vmap batching rule). "
                f"{advice} Original error: {err}"
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
    text = message(err)
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


def for_autograd(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached, or copied if it is an inference tensor (made under
    ``torch.inference_mode``), which autograd cannot save for backward. Call it with inference
    mode off, or the copy is an inference tensor again."""
    return x.clone() if torch.is_inference(x) else x.detach()


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
    with torch.inference_mode(False):  # what the loop needs of them (see for_autograd)
        buffers = tree.map(lambda b: for_autograd(b) if isinstance(b, torch.Tensor) else b, buffers)

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


# --- method="loop" ------------------------------------------------------------------------------

# PyTorch's fused recurrent kernels (what nn.RNN / nn.LSTM / nn.GRU and their cells call): no
# layer rule and no vmap batching rule, so "auto" differentiates them example by example.
RECURRENT_NAMES = frozenset(
    f"{kind}{cell}" for kind in ("rnn_tanh", "rnn_relu", "lstm", "gru") for cell in ("", "_cell")
)
# What RecurrentWatch stops: the kernels, and sequence packing (data-dependent shapes).
_PACKING = ("_pack_padded_sequence", "_pad_packed_sequence")
_RECURRENT_CALLS = frozenset(
    getattr(torch, name) for name in (*RECURRENT_NAMES, *_PACKING) if hasattr(torch, name)
)

# ``(start, stop, (losses, extras), grad_leaves)``: rows ``start:stop`` of a chunk, batched.
Piece = tuple[int, int, Any, list[torch.Tensor]]


class RecurrentCall(Exception):
    """``loss_fn`` called a fused recurrent kernel under :class:`RecurrentWatch`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"loss_fn calls {name}, a fused recurrent kernel")
        self.name = name


class RecurrentWatch(TorchFunctionMode):
    """Raises :class:`RecurrentCall` before a fused recurrent kernel runs.

    ``"auto"`` runs its ``vmap`` routes under it: on CPU a float32 ``nn.LSTM`` would otherwise
    run under ``vmap``'s slow fallback with a warning (an error under ``-W error``) and a float64
    one fail with a shape error, and the kernel is the model's, whatever its dtype or device.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in _RECURRENT_CALLS:
            raise RecurrentCall(func.__name__)
        return func(*args, **(kwargs or {}))


def rng_devices(*trees: PyTree) -> list[torch.device]:
    """The accelerators holding a tensor leaf of ``trees``: their generators serve ``loss_fn``."""
    found: list[torch.device] = []
    for t in trees:
        for x in tree.leaves(t):
            if (
                isinstance(x, torch.Tensor)
                and x.device.type not in ("cpu", "meta")
                and x.device not in found
            ):
                found.append(x.device)
    return found


class Generators:
    """Get, set and compare the states of the default CPU generator and of ``devices``'."""

    def __init__(self, devices: list[torch.device]) -> None:
        self.devices = []
        for device in devices:
            module = getattr(torch, device.type, None)
            if hasattr(module, "get_rng_state") and hasattr(module, "set_rng_state"):
                self.devices.append((device, module))

    def get(self) -> list[torch.Tensor]:
        """The states (host tensors: no device sync)."""
        return [torch.get_rng_state()] + [m.get_rng_state(d) for d, m in self.devices]

    def set(self, states: list[torch.Tensor]) -> None:
        """Puts the generators back to ``states`` (from :meth:`get`)."""
        torch.set_rng_state(states[0])
        for (device, module), state in zip(self.devices, states[1:]):
            module.set_rng_state(state, device)

    def moved(self, states: list[torch.Tensor]) -> bool:
        """Whether a generator drew numbers since ``states`` were taken."""
        return not all(torch.equal(a, b) for a, b in zip(states, self.get()))


def with_value(example_loss: Callable[..., Any]) -> Callable[..., Any]:
    """``example_loss`` for ``torch.func.grad(..., has_aux=True)``: the loss also as aux."""

    def run(param_leaves: list[torch.Tensor], example_leaves: list[torch.Tensor]) -> Any:
        loss, extras = example_loss(param_leaves, example_leaves)
        # torch.func only passes tensors through as aux, so ``aux`` is wrapped only when present.
        return loss, (loss.detach(), extras)

    return run


def _drew_error() -> RuntimeError:
    return RuntimeError(
        "per-sample gradients (method='loop'): loss_fn drew random numbers (dropout or another "
        "random op) with randomness='error'. Pass randomness='different' (independent draws per "
        "example) or 'same' (one draw shared by the examples of a chunk), or turn the "
        "randomness off (model.eval())."
    )


@torch.compiler.disable
def _example_grad(
    example_loss: Callable[..., Any], leaves: list[torch.Tensor], example: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor, tuple[Any, ...]]:
    """One example's ``(grads, loss, extras)`` by ``torch.autograd.grad``.

    Plain autograd rather than ``torch.func.grad``: the same function is differentiated, but
    under ``torch.func.grad`` PyTorch's fused RNN backward (``MkldnnRnnLayerBackward0``) runs
    decomposed, op by op: 8× slower for a float32 ``nn.LSTM`` on CPU, 2× for float64.
    Eager under ``torch.compile`` (under a microsecond a call otherwise): the loop runs there
    as a graph break (see ``_routes``), and torch.compile would otherwise compile ``loss_fn``
    anew for the example, a graph per call, then fail on ``torch.autograd.grad``.
    """
    # The caller may be under no_grad (torch.func.grad ignores it too) or inference_mode, under
    # which autograd recorded nothing and every gradient came out as zeros.
    from functrain.train import _recompute  # functrain.train imports functrain.grads

    with torch.inference_mode(False), torch.enable_grad():
        with _recompute.recorded_calls() as calls:
            loss, extras = example_loss(leaves, example)
        if leaves and loss.requires_grad:
            with _recompute.recomputing(calls):  # activation checkpointing inside a module
                grads = list(
                    torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
                )
        else:  # no parameter reaches the loss
            grads = [torch.zeros_like(p) for p in leaves]
    # Detached: an aux output that depends on params would hold the example's graph.
    extras = tuple(e.detach() if isinstance(e, torch.Tensor) else e for e in extras)
    return grads, loss.detach(), extras


def loop_grads(
    example_loss: Callable[..., Any],
    randomness: str,
    generators: Generators,
    stream: bool,
    has_aux: bool,
) -> Callable[[list[torch.Tensor], list[torch.Tensor]], Iterator[Piece]]:
    """The ``"loop"`` method: the gradient of ``example_loss``, one example at a time.

    ``vmap``'s randomness modes on the default generators: ``"different"`` lets the examples
    draw one after another (a naive per-example loop after the same seed draws the same
    numbers); ``"same"`` puts the generators back to their state at the chunk's start before
    each of its examples, so all draw what the first drew and the generators end one draw
    further, as after ``vmap``'s single draw; ``"error"`` raises ``RuntimeError`` when an example
    moved a generator (put back first).

    Returns:
        ``pieces(param_leaves, chunk_leaves)`` yielding the chunk stacked as one piece, or one
        piece per example when ``stream`` (a reduction then holds one gradient at a time).
    """

    def pieces(param_leaves: list[torch.Tensor], chunk: list[torch.Tensor]) -> Iterator[Piece]:
        k = chunk[0].shape[0]
        with torch.inference_mode(False):
            # Aliases of the (detached) parameters that autograd differentiates; never written.
            leaves = [for_autograd(p).requires_grad_() for p in param_leaves]
            chunk = [for_autograd(x) for x in chunk]
        start = generators.get() if randomness == "same" and k > 1 else None
        losses: torch.Tensor | None = None
        extras: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for i in range(k):
            if start is not None and i:
                generators.set(start)
            before = generators.get() if randomness == "error" else None
            g, loss, extra = _example_grad(example_loss, leaves, [x[i] for x in chunk])
            if before is not None and generators.moved(before):
                generators.set(before)
                raise _drew_error()
            if stream:
                yield i, i + 1, (loss[None], tuple(e[None] for e in extra)), [x[None] for x in g]
                continue
            if losses is None:  # the chunk's results, filled in place: no second copy at the end
                losses = loss.new_empty((k,))
                extras = [e.new_empty((k, *e.shape)) for e in extra]
                grads = [x.new_empty((k, *x.shape)) for x in g]
            losses[i] = loss
            for out, x in zip([*extras, *grads], [*extra, *g]):
                out[i].copy_(x)
            del g, loss, extra  # before the next example's gradient exists
        if k == 0:  # no example to run: empty results in the parameters' dtypes
            if has_aux:
                raise ValueError(
                    "per-sample gradients (method='loop') of an empty batch with has_aux=True: "
                    "with no example to run, the structure of aux is unknown"
                )
            dtype = param_leaves[0].dtype if param_leaves else torch.get_default_dtype()
            device = param_leaves[0].device if param_leaves else chunk[0].device
            losses = torch.empty((0,), dtype=dtype, device=device)
            grads = [p.new_empty((0, *p.shape)) for p in param_leaves]
        if losses is not None:
            yield 0, k, (losses, tuple(extras)), grads

    return pieces
