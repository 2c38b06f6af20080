"""``make_train_step(..., compile=True)``: the step's tensor work under ``torch.compile``.

A train step is Python bookkeeping around a pure tensor computation. The bookkeeping stays
eager: argument and state checks, :class:`~functrain.ConsumedStateError` and donation, the
``max_consecutive_skips`` read, the batch split and the seeding of the global random
generators. The computation (micro-batch gradients, the non-finite check, the optimizer update,
the new state's tensors and the metrics) runs as one ``torch.compile(fullgraph=True)`` graph.

It compiles once per batch shape: learning rates, schedules, step counts, loss scales and skip
counters are tensors, so nothing the step reads as a Python value changes between steps. The
``state.extra`` entries a step keeps (skip counters, loss scale, ``grad_stats`` states) are
created before the first compiled call, so the first step's state has the structure of the
later ones.

Randomness: an eager step seeds the global generators once per micro-batch (stream ``i + 1``
of the state's key); seeding is a host operation that cannot be traced, so a compiled step
seeds them once, from stream ``1``, before the graph runs and restores them afterwards. A
compiled step is as reproducible as an eager one and its micro-batches draw different numbers
(one stream continues through them); with one micro-batch it seeds exactly as eager does.

The fused in-place optimizer kernels are eager-only (:class:`functrain.train.fast.FusedStage`
takes the pure ``tx.update`` path while compiling): inductor fuses that path's ``foreach``
arithmetic itself, and with ``donate=True`` the new parameters are written back into the
consumed state's memory.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch

from functrain.train import faults, gradient, rng

__all__: list[str] = []  # internal: used by make_train_step


def compile_options(
    compile: bool | Mapping[str, Any], *, grad_backend: str
) -> dict[str, Any] | None:
    """The ``torch.compile`` keyword arguments for ``compile=`` (``None``: run eagerly).

    Raises a clear error for a malformed value or an option that cannot be compiled.
    """
    if isinstance(compile, bool):
        if not compile:
            return None
        options: dict[str, Any] = {}
    elif isinstance(compile, Mapping):
        options = dict(compile)
        bad = [k for k in options if not isinstance(k, str)]
        if bad:
            raise TypeError(f"compile: keys must be torch.compile argument names, got {bad!r}")
    else:
        raise TypeError(
            "compile must be a bool or a dict of torch.compile keyword arguments (e.g. "
            f"{{'mode': 'max-autotune'}}), got {type(compile).__name__}"
        )
    if options.get("fullgraph", True) is not True:
        raise ValueError(
            "compile: the step compiles with fullgraph=True (a graph break would run part of "
            "the step eagerly, at a cost, without saying so); drop the fullgraph entry"
        )
    if (
        "dynamic" in options
        and options["dynamic"] is not None
        and not isinstance(options["dynamic"], bool)
    ):
        raise TypeError(f"compile: dynamic must be a bool or None, got {options['dynamic']!r}")
    if grad_backend == "autograd":
        raise ValueError(
            "grad_backend='autograd' cannot be compiled with fullgraph=True (torch.compile "
            "breaks the graph at torch.autograd.grad / .backward()); use grad_backend='func' "
            "(the default) with compile="
        )
    options["fullgraph"] = True
    # Static shapes unless asked otherwise: dynamo's automatic dynamic shapes would otherwise
    # make later steps (sharing its shape profile by code location) symbolic, which some
    # functorch rules (dropout under grad) cannot handle; a new batch shape recompiles instead.
    options.setdefault("dynamic", False)
    return options


class LossScaleSlot:
    """Hands the loss scale to a compiled step's loss (dynamo cannot trace ``ContextVar.get``).

    The eager step passes the scale through a context variable (safe across threads); the
    compiled core sets :attr:`scale` at its start, inside the traced code, and clears it at
    its end.
    """

    def __init__(self) -> None:
        self.scale: torch.Tensor | None = None

    def wrap(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        """``loss_fn`` with its result multiplied by :attr:`scale`."""

        @functools.wraps(loss_fn)  # keeps the signature: the step passes buffers=/key= by it
        def scaled_loss(params: Any, batch: Any, **kwargs: Any) -> Any:
            return faults.scale_result(loss_fn(params, batch, **kwargs), self.scale)

        return scaled_loss


def _own_code(method: Any) -> Any:
    """``method`` running a private copy of its code object.

    Dynamo keeps compiled graphs per code object (at most ``recompile_limit`` of them, 8 by
    default): every train step would otherwise share ``TrainStep._core``'s entries, and a
    program with nine compiled steps (or a test suite) would hit the limit.
    """
    func = method.__func__
    copy = types.FunctionType(
        func.__code__.replace(),
        func.__globals__,
        func.__name__,
        func.__defaults__,
        func.__closure__,
    )
    copy.__qualname__ = func.__qualname__
    return types.MethodType(copy, method.__self__)


class CompiledCore:
    """Runs a train step's ``_core`` compiled, with the untraceable seeding done outside.

    Args:
        core: ``core(params, opt_state, buffers, key, step, extra, batch, split, devices)``.
        options: keyword arguments for ``torch.compile`` (``fullgraph=True`` among them).
        seed_rng: seed the global generators from the state's key around the graph.
        metas: the gradient stage's per-call record of loss kinds (emptied before each call
            so that the compiled code always sees it empty and does not recompile).
    """

    def __init__(
        self,
        core: Callable[..., Any],
        options: dict[str, Any],
        *,
        seed_rng: bool,
        metas: list[Any],
    ) -> None:
        self.fn = torch.compile(_own_code(core), **options)
        self.seed_rng = seed_rng
        self.metas = metas

    def __call__(
        self,
        extra: dict[str, Any],
        params: Any,
        opt_state: Any,
        buffers: Any,
        key: torch.Tensor | None,
        step: torch.Tensor,
        batch: Any,
        split: Any,
        devices: list[torch.device],
    ) -> Any:
        """The core's output for these inputs."""
        self.metas.clear()
        mb_key = None if key is None else rng.fold_in(key, 1)
        with gradient._seeding(mb_key, self.seed_rng, devices):
            return self.fn(params, opt_state, buffers, key, step, extra, batch, split, devices)
