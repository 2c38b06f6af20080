"""Counting ``torch.compile`` compilations and traces (recompilation checks in tests)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

__all__ = ["CompileCount", "assert_max_compiles", "assert_max_traces", "count_compiles"]

F = TypeVar("F", bound=Callable[..., Any])

# The artifact logger torch._dynamo.guards writes "Recompiling function ... triggered by ..." to.
_RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"


class _ListHandler(logging.Handler):
    """Appends the messages of ``level`` or above that start with ``prefix`` to ``sink``."""

    def __init__(self, sink: list[str], level: int = logging.DEBUG, prefix: str = "") -> None:
        super().__init__(level)
        self.sink = sink
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.prefix):
            self.sink.append(message)


@contextlib.contextmanager
def _recompile_reasons() -> Iterator[list[str]]:
    """Collects dynamo's recompilation reasons while active (best effort: private API)."""
    reasons: list[str] = []
    try:
        log_state = torch._logging._internal.log_state
    except AttributeError:  # pragma: no cover - torch internals moved
        yield reasons
        return
    logger = logging.getLogger(_RECOMPILES_LOGGER)
    was_enabled = log_state.is_artifact_enabled("recompiles")
    old_level, old_propagate = logger.level, logger.propagate
    handler = _ListHandler(reasons)
    if not was_enabled:
        # Capture quietly: the user did not ask for these messages on stderr.
        log_state.enable_artifact("recompiles")
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    logger.addHandler(handler)
    try:
        yield reasons
    finally:
        logger.removeHandler(handler)
        if not was_enabled:
            log_state.artifact_names.discard("recompiles")
            logger.setLevel(old_level)
            logger.propagate = old_propagate


# dynamo warns here when a recompile is refused by ``recompile_limit``; the frame then runs
# eagerly, so no compilation starts, yet the code did ask to be recompiled.
_LIMIT_LOGGER = "torch._dynamo.convert_frame"
_LIMIT_PREFIX = "torch._dynamo hit config."


@contextlib.contextmanager
def _limit_hits() -> Iterator[list[str]]:
    """Collects dynamo's "hit config.recompile_limit" warnings while active (private API)."""
    hits: list[str] = []
    logger = logging.getLogger(_LIMIT_LOGGER)
    handler = _ListHandler(hits, logging.WARNING, _LIMIT_PREFIX)
    logger.addHandler(handler)
    try:
        yield hits
    finally:
        logger.removeHandler(handler)


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def _compile_starts() -> Iterator[list[str] | None]:
    """Records the compile id ("frame/attempt") of every dynamo compilation while active."""
    handler = getattr(torch._dynamo, "callback_handler", None)
    if handler is None:  # pragma: no cover - older torch: fall back to counting graphs
        yield None
        return
    ids: list[str] = []

    def on_start(args: Any) -> None:
        if args.callback_trigger.name == "DYNAMO":
            ids.append(args.compile_id)

    handler.register_start_callback(on_start)
    try:
        yield ids
    finally:
        handler.remove_start_callback(on_start)


@dataclasses.dataclass
class CompileCount:
    """What ``torch.compile`` did inside a :func:`count_compiles` block.

    Attributes:
        compiles: frames dynamo compiled (the first compile and every recompile). A function
            compiled with ``fullgraph=True`` counts one per (re)compilation. A recompile that
            ``recompile_limit`` refused (the function then silently runs eagerly) counts too.
        graphs: FX graphs produced (more than ``compiles`` when there are graph breaks).
        reasons: dynamo's explanation of each recompilation (the guards that failed).

    Example:
        >>> from functrain import testing
        >>> testing.CompileCount(compiles=1, graphs=1, reasons=[])
        CompileCount(compiles=1, graphs=1, reasons=[])
    """

    compiles: int = 0
    graphs: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCount]:
    """Counts ``torch.compile`` compilations (first compiles and recompiles) inside the block.

    The count is global: every compiled function that runs inside the block contributes. The
    yielded :class:`CompileCount` is filled in when the block exits.

    Yields:
        A :class:`CompileCount`, all zero inside the block; its ``compiles``, ``graphs`` and
        ``reasons`` are set when the block exits (also when it raises).

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> step = torch.compile(lambda x, lr: x - lr * x, fullgraph=True, backend="eager")
        >>> with testing.count_compiles() as count:
        ...     for lr in (0.1, 0.2, 0.3):  # a tensor hyperparameter: no recompile
        ...         _ = step(torch.ones(3), torch.tensor(lr))
        >>> count.compiles
        1
    """
    count = CompileCount()
    graphs0 = _graph_count()
    with _recompile_reasons() as reasons, _compile_starts() as ids, _limit_hits() as hits:
        try:
            yield count
        finally:
            count.graphs = _graph_count() - graphs0
            # A refused recompile counts: otherwise assert_max_compiles(1) passed a step that
            # asked to recompile on every call once the limit was reached.
            count.compiles = (count.graphs if ids is None else len(ids)) + len(hits)
            count.reasons = list(reasons) + hits


def _too_many(
    what: str, got: int, n: int, reasons: list[str], verb: str = "compiled"
) -> AssertionError:
    detail = (
        "\n".join(reasons)
        if reasons
        else "(run with TORCH_LOGS=recompiles to see which guard failed)"
    )
    times = "time" if got == 1 else "times"
    return AssertionError(f"{what} {verb} {got} {times}, at most {n} allowed:\n{detail}")


@contextlib.contextmanager
def assert_max_compiles(n: int) -> Iterator[CompileCount]:
    """Fails if ``torch.compile`` compiles more than ``n`` times inside the block.

    The error lists dynamo's recompilation reasons (which guard failed), so an accidental
    recompile (a Python-float hyperparameter, a changing shape) is easy to diagnose. The check
    runs when the block exits normally; an exception raised inside the block propagates
    unchecked.

    Args:
        n: the largest number of compilations allowed (counted as by :func:`count_compiles`).

    Yields:
        The :class:`CompileCount` of the block, filled in when it exits.

    Raises:
        AssertionError: ``code inside the block compiled <k> times, at most <n> allowed:``
            followed by dynamo's recompilation reasons, one a line (or a hint to run with
            ``TORCH_LOGS=recompiles`` when none were captured).

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> f = torch.compile(lambda x, s: x * s, fullgraph=True, backend="eager")
        >>> with testing.assert_max_compiles(1):
        ...     _ = f(torch.ones(2), torch.tensor(2.0)); _ = f(torch.ones(2), torch.tensor(3.0))
    """
    with count_compiles() as count:
        yield count
    if count.compiles > n:
        raise _too_many("code inside the block", count.compiles, n, count.reasons)


def assert_max_traces(fn: F | None = None, *, n: int) -> Any:
    """Wraps ``fn`` so that it fails once ``torch.compile`` has traced it more than ``n`` times.

    The counterpart of ``chex.assert_max_traces``. It works on either side of
    ``torch.compile``:

    - inside: ``torch.compile(assert_max_traces(step, n=1))`` counts dynamo's traces of
      ``step`` (as chex counts ``jax.jit`` traces);
    - outside: ``assert_max_traces(torch.compile(step), n=1)`` counts the compilations that
      calls of the compiled function trigger (with graph breaks, the resumed frames' too: a
      function compiled without ``fullgraph=True`` is best wrapped inside).

    Unlike chex, calls that run eagerly (no ``torch.compile``) are not traces and do not count.

    Args:
        fn: the function to wrap; omit it to use ``assert_max_traces(n=...)`` as a decorator.
        n: the largest number of traces allowed.

    Returns:
        With ``fn``: a wrapper that calls ``fn`` and carries the count so far in its
        ``traces`` attribute. Without it: a decorator that makes that wrapper.

    Raises:
        AssertionError: from a call of the wrapper once the count exceeds ``n``:
            ``<fn's qualname> traced <k> times, at most <n> allowed`` while dynamo traces it
            (inside ``torch.compile``; dynamo may append its own notes), or ``... compiled <k>
            times ...`` followed by the recompilation reasons when wrapping a compiled ``fn``.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> @testing.assert_max_traces(n=1)
        ... def step(x, lr):
        ...     return x - lr * x
        >>> compiled = torch.compile(step, fullgraph=True, backend="eager")
        >>> for lr in (0.1, 0.2):
        ...     _ = compiled(torch.ones(2), torch.tensor(lr))
        >>> step.traces
        1
        >>> try:
        ...     _ = compiled(torch.ones(2), 0.5)  # a Python float is a constant: retrace
        ... except Exception as err:
        ...     print("traced 2 times" in str(err))
        True
    """
    if fn is None:
        return functools.partial(assert_max_traces, n=n)
    name = getattr(fn, "__qualname__", repr(fn))

    def check(reasons: list[str], verb: str) -> None:
        if wrapper.traces > n:
            raise _too_many(name, wrapper.traces, n, reasons, verb)

    # Calls counted per compilation, with the analysis attempt they were made in: dynamo
    # restarts the analysis of a frame (to compile the part before a graph break, for one), and
    # the calls of an abandoned attempt are not traces.
    attempts: dict[Any, tuple[int, int]] = {}

    @torch._dynamo.assume_constant_result
    def on_trace() -> int:
        # dynamo calls an assume_constant_result function while tracing (once per analysis
        # attempt) and bakes its result into the graph: it never runs per compiled call.
        trace = torch._guards.CompileContext.current_trace_id()
        compile_id, attempt = (None, 0) if trace is None else trace
        seen_attempt, calls = attempts.get(compile_id, (attempt, 0))
        if seen_attempt != attempt:
            wrapper.traces -= calls
            calls = 0
        attempts[compile_id] = (attempt, calls + 1)
        wrapper.traces += 1
        check([], "traced")
        return 0

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            on_trace()
            return fn(*args, **kwargs)
        # Called from eager code: count the compilations that ``fn`` (a compiled function)
        # triggers.
        with count_compiles() as count:
            out = fn(*args, **kwargs)
        wrapper.traces += count.compiles
        check(count.reasons, "compiled")
        return out

    wrapper.traces = 0  # type: ignore[attr-defined]
    return wrapper
