"""Helpers of :mod:`functrain.train.module`: what a ``FunctionalModel`` reads off its module.

Structure found once at build time (running-stat norm layers, lazy parameters, parametrizations,
tied names), the ``parametrize.cached()`` cleanup around each call, the note that names
mismatched devices/dtypes after a failed forward, and the version-counter check for buffers
written in place. Re-exported by :mod:`functrain.train.module`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize


def _norm_modules(module: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


def _check_materialized(module: nn.Module) -> None:
    """Raises a clear error for a lazy module (``nn.LazyLinear``) not yet run once.

    An uninitialized parameter has no shape or values, so there is nothing to put in ``params``;
    torch's own error would blame ``detach``.
    """
    lazy = [
        name
        for named in (module.named_parameters, module.named_buffers)
        for name, t in named()
        if nn.parameter.is_lazy(t)
    ]
    if lazy:
        raise ValueError(
            f"ft.functionalize: {lazy[:5]}{' ...' if len(lazy) > 5 else ''} are uninitialized "
            "(a lazy module such as nn.LazyLinear): run the module once on an example batch, "
            "module(example), to materialize them, then call ft.functionalize(module)"
        )


def _parametrized(module: nn.Module) -> tuple[tuple[int, str], ...]:
    """The ``parametrize.cached()`` keys ``(id(owner), tensor_name)`` of every parametrization."""
    return tuple(
        (id(m), name)
        for m in module.modules()
        if parametrize.is_parametrized(m)
        for name in m.parametrizations  # type: ignore[union-attr]
    )


def _drop_cached(keys: tuple[tuple[int, str], ...]) -> None:
    """Forgets ``parametrize.cached()``'s values for ``keys``.

    The cache is keyed by module and name, not by the tensors swapped in, so without this a
    second call inside ``with parametrize.cached():`` would silently reuse the first call's
    weights (and a value made under ``torch.func.grad`` would outlive that transform).
    """
    cache = getattr(parametrize, "_cache", None)
    if keys and cache and getattr(parametrize, "_cache_enabled", 0):
        for key in keys:
            cache.pop(key, None)


def _aliases(module: nn.Module) -> tuple[tuple[str, str], ...]:
    """``(alias, first_name)`` for each extra name of a tied parameter or buffer."""
    out = []
    for named in (module.named_parameters, module.named_buffers):
        first: dict[int, str] = {}
        for name, t in named(remove_duplicate=False):
            if id(t) in first:
                out.append((name, first[id(t)]))
            else:
                first[id(t)] = name
    return tuple(out)


def _add_placement_note(err: Exception, tensors: dict[str, torch.Tensor]) -> None:
    """Names the tensors behind a failed forward's device or dtype complaint, which torch doesn't.

    Only runs after the forward raised, so it costs nothing on the normal path.
    """
    if torch.compiler.is_compiling():
        return
    meta = [k for k, t in tensors.items() if t.is_meta]
    if meta:
        err.add_note(
            f"functrain: {meta[:5]}{' ...' if len(meta) > 5 else ''} are on the meta device "
            "(a module built under torch.device('meta') has no values): pass real tensors, "
            "e.g. from module.to_empty(device=...) and an initialization"
        )
    kinds: dict[tuple[torch.device, torch.dtype], str] = {}
    for k, t in tensors.items():
        if t.is_floating_point():  # integer counters (num_batches_tracked) are expected
            kinds.setdefault((t.device, t.dtype), k)
    if len(kinds) > 1:
        listed = ", ".join(
            f"{k!r}: {d}/{str(dt).removeprefix('torch.')}" for (d, dt), k in kinds.items()
        )
        err.add_note(
            f"functrain: the floating-point params and buffers mix devices/dtypes: {listed}"
        )


@contextlib.contextmanager
def _no_function_modes() -> Iterator[None]:
    """Our own bookkeeping reads (shapes, version counters) outside any ``__torch_function__``
    mode, so that a mode watching the forward (the per-sample layer rules) does not count them
    as uses of the parameters."""
    if torch._C._is_torch_function_mode_enabled() and not torch.compiler.is_compiling():
        with torch._C.DisableTorchFunction():
            yield
    else:
        yield


def _written(buffers: dict[str, torch.Tensor]) -> list[str]:
    """The buffers whose version counter moved (written in place), in name order."""
    if not buffers:
        return []
    with _no_function_modes():
        return sorted(k for k, b in buffers.items() if b._version)
