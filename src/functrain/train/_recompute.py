"""Activation checkpointing inside a train step: the recompute sees the call's parameters.

A :class:`~functrain.FunctionalModel` puts the step's tensors into its module only while a
call runs. ``torch.utils.checkpoint`` (``use_reentrant=False``, ``checkpoint_sequential``) runs
the checkpointed forward again during backward, after that call returned: the module then held
its own tensors, and the gradients of every step after the first were taken at stale
parameters, silently. The step records the model calls of a micro-batch's forward made with
grad enabled (:func:`recorded_calls`; a call under ``no_grad``, such as a teacher's, builds no
graph and is never recomputed); while that micro-batch's backward runs (:func:`recomputing`),
each recorded module holds the tensors, and runs in the mode, of its call.

They are installed for the whole backward, not at the recompute's first module forward: a
checkpointed function may read a parameter without running any submodule
(``checkpoint(lambda t: t @ self.w, x)``). A module that two calls used with different
tensors or modes (one model called with two parameter sets, a model of a submodule of
another model, ``model.train()`` and ``model.eval()`` of one module) cannot hold both: nothing
is installed in it, and a forward of it during backward (a recompute) raises.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

__all__: list[str] = []

_LOCAL = threading.local()


def note(model: Any, tensors: dict[str, Any], params: Any, source: Any) -> None:
    """Records a model call (``FunctionalModel._swap_and_run``) while the step records.

    ``tensors`` are the ones swapped in; ``params`` and ``source`` (the buffers the call was
    given, before it copied them) tell two calls with the same inputs apart from others.
    """
    calls = getattr(_LOCAL, "calls", None)
    if calls is not None and torch.is_grad_enabled():
        calls.append((model, tensors, params, source))


@contextlib.contextmanager
def recorded_calls() -> Iterator[list[tuple[Any, ...]]]:
    """Collects the model calls made in this thread meanwhile (see :func:`note`)."""
    outer = getattr(_LOCAL, "calls", None)
    calls: list[tuple[Any, ...]] = []
    _LOCAL.calls = calls
    try:
        yield calls
    finally:
        _LOCAL.calls = outer


def _same(a: Any, b: Any) -> bool:
    return a is b or (a.keys() == b.keys() and all(a[k] is t for k, t in b.items()))


def _settings(calls: list[tuple[Any, ...]]) -> tuple[list[tuple[Any, Any]], list[Any]]:
    """``([(model, tensors)] to install, [modules that must not run a forward])``."""
    first: dict[int, tuple[Any, ...]] = {}  # id(module) -> its first call
    clashing: set[int] = set()
    for call in calls:
        model, _, params, source = call
        seen = first.setdefault(id(model.module), call)
        if seen is not call and not (
            seen[0].training == model.training and _same(seen[2], params) and _same(seen[3], source)
        ):
            clashing.add(id(model.module))
    roots = [(c[0], c[1]) for c in first.values()]
    if len(roots) > 1:  # a module inside another one's tree: which call does it recompute?
        owner: dict[int, int] = {}
        for model, _ in roots:
            for sub in model.module.modules():
                other = owner.setdefault(id(sub), id(model.module))
                if other != id(model.module):
                    clashing.update((other, id(model.module)))
    install = [r for r in roots if id(r[0].module) not in clashing]
    refused = [r[0].module for r in roots if id(r[0].module) in clashing]
    return install, refused


def _refuse(roots: list[Any]) -> torch.utils.hooks.RemovableHandle:
    """A forward pre-hook raising on a forward of ``roots`` (or a submodule) not run by a
    functional model's own call (which swaps its tensors in first)."""
    owned = {id(sub): root for root in roots for sub in root.modules()}
    own = {id(root): [t for _, t in root.named_parameters()] for root in roots}

    def before_forward(module: torch.nn.Module, args: Any) -> None:
        root = owned.get(id(module))
        if root is None:
            return
        held = [t for _, t in root.named_parameters()]
        if len(held) != len(own[id(root)]) or any(a is not b for a, b in zip(held, own[id(root)])):
            return  # a functional call is running (checkpoint around a model call)
        raise RuntimeError(
            f"activation checkpointing recomputed a forward of {type(module).__name__} "
            "during backward, but this micro-batch's ft.functionalize models called it with "
            "two different sets of parameters, buffers or modes (one model with two parameter "
            "sets, a model of a submodule of another model, model.train() and model.eval()), "
            "and the recompute cannot tell which it needs: give each its own module "
            "(ft.functionalize(copy.deepcopy(module)))"
        )

    return torch.nn.modules.module.register_module_forward_pre_hook(before_forward)


@contextlib.contextmanager
def recomputing(calls: list[tuple[Any, ...]]) -> Iterator[None]:
    """Around a backward pass: each recorded module holds its call's tensors (and mode)
    until the backward ends; a module two calls used differently refuses a recompute."""
    if not calls:
        yield
        return
    if len(calls) == 1 and calls[0][0].training is None and calls[0][0]._slots is not None:
        model, tensors = calls[0][0], calls[0][1]  # the usual case, without the ExitStacks
        saved: list[tuple[dict[str, Any], str, Any]] = []
        try:
            model._swap_in(tensors, saved)
            yield
        finally:
            model._swap_out(saved)
        return
    install, refused = _settings(calls)
    with contextlib.ExitStack() as stack:
        if refused:
            stack.callback(_refuse(refused).remove)
        for model, tensors in install:
            stack.enter_context(model._install(tensors))
        yield
