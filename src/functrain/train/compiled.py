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

Errors: dynamo reports an exception raised while tracing (by ``loss_fn`` or by one of the
step's own checks) as ``Unsupported: Observed exception`` and a failing tensor operation as a
fake-tensor error, without the original exception. The step then runs once eagerly, on copies
of the parameters and optimizer state, and raises the error that run raises (the eager step's
type and message); if that run succeeds, dynamo's error is raised with a note saying the step
itself is fine. Other tracing failures (host reads, ``ft.key_generator``) and hitting dynamo's
``recompile_limit`` (a new compilation per batch shape) get a note saying what to do. The state
passed to a failing call is left as it was.

The fused in-place optimizer kernels are eager-only (:class:`functrain.train.fast.FusedStage`
takes the pure ``tx.update`` path while compiling): inductor fuses that path's ``foreach``
arithmetic itself. The compiled update is out of place: with ``donate=True`` the new state gets
new memory and the consumed state's is freed with it, not reused (the peak holds both).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch

from functrain import tree
from functrain.train import faults, gradient, optimizer_stage, rng

__all__: list[str] = []  # internal: used by make_train_step

_dynamo_exc = torch._dynamo.exc


def _compile_arguments() -> frozenset[str] | None:
    """``torch.compile``'s keyword argument names (``None`` if its signature is unreadable)."""
    try:
        names = inspect.signature(torch.compile).parameters
    except (TypeError, ValueError):  # pragma: no cover - a wrapped torch.compile
        return None
    return frozenset(names) - {"model"}  # the step is the model


_COMPILE_ARGUMENTS = _compile_arguments()


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
        # torch.compile's own error ("compile() got an unexpected keyword argument") names
        # neither the option nor what is accepted; "model" would clash with the step itself.
        unknown = [] if _COMPILE_ARGUMENTS is None else sorted(set(options) - _COMPILE_ARGUMENTS)
        if unknown:
            raise TypeError(
                f"compile: unknown torch.compile keyword argument(s) {unknown!r}; it takes "
                f"{', '.join(sorted(_COMPILE_ARGUMENTS or ()))}"
            )
    else:
        raise TypeError(
            "compile must be a bool or a dict of torch.compile keyword arguments (e.g. "
            f"{{'mode': 'max-autotune-no-cudagraphs'}}), got {type(compile).__name__}"
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
    inductor = options.get("options") or {}
    if not isinstance(inductor, Mapping):
        raise TypeError(
            "compile: options must be a dict of inductor settings (e.g. "
            f"{{'options': {{'max_autotune': True}}}}), got {type(inductor).__name__}"
        )
    # "max-autotune" turns CUDA graphs on for CUDA inputs (the device is not known here); the
    # "cudagraphs" backend is nothing but CUDA graphs.
    if (
        options.get("mode") in ("reduce-overhead", "max-autotune")
        or inductor.get("triton.cudagraphs")
        or options.get("backend") == "cudagraphs"
    ):
        # CUDA graphs replay into fixed output buffers: a state or metric kept from an earlier
        # step would be overwritten by the next replay, which a pure step must never do.
        raise ValueError(
            "compile: CUDA graphs (mode='reduce-overhead', and 'max-autotune' on CUDA, "
            "triton.cudagraphs, backend='cudagraphs') reuse the step's output memory across "
            "calls, so an earlier state or metric a caller keeps would change under it; use "
            "mode='max-autotune-no-cudagraphs' or the default mode"
        )
    if options.get("disable"):
        raise ValueError(
            "compile: {'disable': True} would run the step eagerly while it says compiled; "
            "pass compile=False for an eager step"
        )
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
        self.core = core
        self.fn = torch.compile(_own_code(core), **options)
        self.dynamic = options.get("dynamic")
        self.recompile_limit = options.get("recompile_limit")
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
        args = (params, opt_state, buffers, key, step, extra, batch, split, devices)
        return self.run(args, key=key, devices=devices)

    def run(
        self, args: tuple[Any, ...], *, key: torch.Tensor | None, devices: list[torch.device]
    ) -> Any:
        """``core(*args)`` compiled, for a core of any signature (the data-parallel step's
        stages): ``args`` begin with the parameters and the optimizer state (or another pytree
        of tensors), which the eager rerun that explains an error copies; the global generators
        of ``devices`` are seeded from stream ``1`` of ``key`` around the graph."""
        self.metas.clear()
        mb_key = None if key is None else rng.fold_in(key, 1)
        hooks_on = _hooks_enabled()
        try:
            with gradient._seeding(mb_key, self.seed_rng, devices):
                return self.fn(*args)
        except _dynamo_exc.FailOnRecompileLimitHit as err:
            limit, source = _recompile_limit(self.recompile_limit)
            err.add_note(_RECOMPILE_LIMIT_NOTE.format(limit=limit, source=source))
            raise
        except _dynamo_exc.TorchDynamoException as err:
            _restore_hooks(hooks_on)  # before the eager rerun, which may use the hooks
            clear = gradient._saved_tensor_hooks_error(err, "compile=")
            if clear is not None:
                raise clear from err
            if "DictMetaData" in str(err) and "sourceless builder" in str(err):
                raise ValueError(_LEAFLESS_DICT_MESSAGE) from err
            real = self._explain(err, mb_key, args, devices)
            if real is None:
                raise
            real.add_note(_EAGER_RERUN_NOTE)
            # Its own cause kept (``raise ValueError(...) from err`` in loss_fn); dynamo's error
            # hidden (``from None`` when it had none).
            raise real from real.__cause__
        finally:
            _restore_hooks(hooks_on)

    def _explain(
        self,
        err: Exception,
        mb_key: torch.Tensor | None,
        args: tuple[Any, ...],
        devices: list[torch.device],
    ) -> Exception | None:
        """The error to raise instead of dynamo's ``err``, or ``None`` (``err`` given a note)."""
        if _raised_while_tracing(err):
            real = self._eager_error(mb_key, args, devices)
            if real is None:
                err.add_note(_COMPILE_ONLY_NOTE + _dynamic_hint(self.dynamic))
            return real
        # A graph break (Unsupported) or a data-dependent guard (UserError) under fullgraph=True.
        if isinstance(err, (_dynamo_exc.Unsupported, _dynamo_exc.UserError)):
            err.add_note(_untraceable_note(err, self.dynamic))
        return None

    def _eager_error(
        self, mb_key: torch.Tensor | None, args: tuple[Any, ...], devices: list[torch.device]
    ) -> Exception | None:
        """The error an eager run of the core raises for ``args`` (``None`` if it succeeds).

        Dynamo reports an exception raised by the traced code (``loss_fn``'s, or one of the
        step's own checks) as "Observed exception" and a failing tensor operation as a fake-tensor
        error, both without the original exception; the eager run raises the real one. It runs
        on copies of the parameters and optimizer state, so that its in-place optimizer writes
        (eager with ``donate=True``) cannot touch the state being stepped, and is seeded as the
        compiled call is.
        """
        params, opt_state, *rest = args
        try:
            copies = tuple(
                tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, t)
                for t in (params, opt_state)
            )
        except Exception:  # e.g. out of memory: keep dynamo's error
            return None
        self.metas.clear()
        try:
            with gradient._seeding(mb_key, self.seed_rng, devices):
                self.core(*copies, *rest)
        except torch.OutOfMemoryError:  # the eager run's own cost, not the step's error
            return None
        except Exception as real:
            return real
        finally:
            # The copies' writes are no business of the caller's torn-state check.
            optimizer_stage.reset_in_place_writes()
            self.metas.clear()
        return None


_EAGER_RERUN_NOTE = (
    "functrain: raised by an eager run of the train step (on copies of the state), made to show "
    "this error because torch.compile reported it only as a tracing failure; the state passed "
    "to the step is unchanged"
)
_COMPILE_ONLY_NOTE = (
    "functrain: torch.compile failed to trace the train step (compile=...), but the same step "
    "runs eagerly: this is a torch.compile limitation, not an error in loss_fn; compile=False "
    "runs the step eagerly"
)
# torch 2.13's dynamo cannot flatten (optree) a dict that holds no tensor, which the state of
# a group masking every parameter holds ({"w": None, ...}); its own message calls it a dynamo
# bug and names none of the user's code.
_LEAFLESS_DICT_MESSAGE = (
    "compile=: torch.compile cannot trace a pytree holding a dict without tensors (torch's "
    "'Unexpected type in sourceless builder: DictMetaData'). The optimizer state holds one "
    "when a ft.partition / ft.masked group masks every parameter: a label no parameter "
    "carries, an all-False mask, or ft.muon on a model whose parameters are all matrices (its "
    "AdamW group is empty). Give every group a parameter, or use compile=False"
)

_RECOMPILE_LIMIT_NOTE = (
    "functrain: this compiled train step was already compiled for {limit} different input "
    "shapes, dtypes or structures ({source}), and compiles once more for every new one "
    "(TORCH_LOGS=recompiles shows which input changed). Most "
    "often the batch shape varies (variable sequence lengths, a partial last batch): pad "
    "batches to a few fixed shapes (buckets) or drop the last partial batch; or pass "
    "compile={{'dynamic': True}} (symbolic shapes; not for models with dropout), or raise "
    "the limit (compile={{'recompile_limit': N}}). A Python number kept in the state (a "
    "counter in state.extra or a hook state) compiles anew whenever it changes: keep it as a "
    "tensor. The state passed to the step is unchanged"
)


_autograd_c = torch._C._autograd


def _hooks_enabled() -> bool | None:
    """Whether saved-tensor hooks may be pushed (``None`` where torch cannot say)."""
    is_enabled = getattr(_autograd_c, "_saved_tensors_hooks_is_enabled", None)
    return None if is_enabled is None else bool(is_enabled())


def _restore_hooks(enabled: bool | None) -> None:
    """Re-enables saved-tensor hooks if they were enabled before a compiled call.

    torch.func transforms disable them while they run; a compilation that fails inside one
    (a ``loss_fn`` with activation checkpointing under ``compile=``) leaves them disabled for
    the whole process, so every later ``torch.utils.checkpoint`` or ``save_on_cpu``, even
    in an eager step, failed with torch.func's refusal. A flag read: no device work.
    """
    if enabled and not _autograd_c._saved_tensors_hooks_is_enabled():
        _autograd_c._saved_tensors_hooks_enable()


def _recompile_limit(own: Any) -> tuple[int, str]:
    """The limit a step hit and where it was set: its own ``compile=`` entry, else dynamo's."""
    if own is not None:  # torch.compile(recompile_limit=N) takes precedence over the config
        return int(own), f"compile={{'recompile_limit': {own}}}"
    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8))
    return int(limit), "torch._dynamo.config.recompile_limit"


def _raised_while_tracing(err: Exception) -> bool:
    """Whether dynamo's ``err`` stands for an exception the traced code raised."""
    if isinstance(err, _dynamo_exc.TorchRuntimeError):  # a tensor op failed on fake tensors
        return True
    if isinstance(err, _dynamo_exc.Unsupported):
        gb_type = getattr(err, "gb_type", None) or str(err)
        return gb_type.startswith("Observed exception")
    return False


def _dynamic_hint(dynamic: Any) -> str:
    if dynamic:
        return " (here it may be compile={'dynamic': True}: try the default static shapes)"
    return ""


def _untraceable_note(err: Exception, dynamic: Any) -> str:
    note = (
        "functrain: compile= runs the train step's tensor work, loss_fn included, as one "
        "torch.compile(fullgraph=True) graph, and the above could not be traced: loss_fn must "
        "not read tensors on the host (.item(), float(t), `if` on a tensor value) or call "
        "untraceable code; compile=False runs the same step eagerly"
    )
    if "Generator" in str(err):
        note += (
            ". ft.key_generator(key) creates a torch.Generator, which cannot be traced: under "
            "compile= use global-generator randomness (torch.rand, nn.Dropout), which the step "
            "seeds from the state's key"
        )
    return note + _dynamic_hint(dynamic)
