"""Activation checkpointing inside a train step: the recompute sees the call's parameters.

A :class:`~functrain.FunctionalModel` puts the step's tensors into its module only while a
call runs. ``torch.utils.checkpoint`` (``use_reentrant=False``, ``checkpoint_sequential``) runs
the checkpointed forward again during backward, after that call returned: the module then held
its own tensors, and the gradients of every step after the first were taken at stale
parameters, silently. The step records the model calls of a micro-batch's forward
(:func:`recorded_calls`); while that micro-batch's backward runs (:func:`recomputing`), the
first module forward of a recorded model (a recompute: backward runs no forward otherwise)
reinstalls the tensors that model's call used, until the backward ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

__all__: list[str] = []  # internal

_LOCAL = threading.local()
_AMBIGUOUS = object()  # a model called with two different sets of tensors in one forward


def note(model: Any, tensors: dict[str, Any]) -> None:
    """Records a model call (``FunctionalModel._swap_and_run``) while the step records."""
    calls = getattr(_LOCAL, "calls", None)
    if calls is not None:
        calls.append((model, tensors))


@contextlib.contextmanager
def recorded_calls() -> Iterator[list[tuple[Any, dict[str, Any]]]]:
    """Collects ``(model, tensors)`` of the model calls made in this thread meanwhile."""
    outer = getattr(_LOCAL, "calls", None)
    calls: list[tuple[Any, dict[str, Any]]] = []
    _LOCAL.calls = calls
    try:
        yield calls
    finally:
        _LOCAL.calls = outer


def _used(calls: list[tuple[Any, dict[str, Any]]]) -> dict[Any, Any]:
    """Each model's tensors, or ``_AMBIGUOUS`` when its calls used different ones."""
    used: dict[Any, Any] = {}
    for model, tensors in calls:
        seen = used.get(model)
        if seen is None:
            used[model] = tensors
        elif seen is not _AMBIGUOUS and (
            seen.keys() != tensors.keys() or any(seen[k] is not t for k, t in tensors.items())
        ):
            used[model] = _AMBIGUOUS
    return used


@contextlib.contextmanager
def recomputing(calls: list[tuple[Any, dict[str, Any]]]) -> Iterator[None]:
    """Around a backward pass: a forward of a recorded model's module (or submodule) first
    reinstalls that model's tensors; all are put back when the backward ends."""
    if not calls:
        yield
        return
    used = _used(calls)
    owners: dict[int, Any] = {}
    installed: dict[Any, contextlib.ExitStack] = {}

    def before_forward(module: torch.nn.Module, args: Any) -> None:
        if not owners:
            for model in used:
                for sub in model.module.modules():
                    owners.setdefault(id(sub), model)
        model = owners.get(id(module))
        if model is None or model in installed:
            return
        if used[model] is _AMBIGUOUS:
            raise RuntimeError(
                f"activation checkpointing recomputed a forward of {type(module).__name__} "
                "during backward, but this micro-batch called its ft.functionalize model with "
                "two different sets of parameters, and the recompute cannot tell which it "
                "needs: give each set its own model (ft.functionalize(copy.deepcopy(module)))"
            )
        installed[model] = model._install(used[model])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(before_forward)
    try:
        yield
    finally:
        handle.remove()
        for stack in reversed(installed.values()):
            stack.close()
