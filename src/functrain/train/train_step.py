"""The :class:`TrainStep` object that :func:`~functrain.make_train_step` builds.

A train step is eager Python bookkeeping (argument and state checks, donation, the batch split,
the non-finite counters) around a tensor computation (``_core``: gradients, the non-finite check,
the optimizer update, the new state and metrics) that ``compile=`` can run as one graph. See
:mod:`functrain.train.step` for what a step does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from functrain import _func_transforms
from functrain.optim.base import GradientTransformation
from functrain.optim.loss_scale import DynamicLossScale
from functrain.train import compiled, dp_stage, fast, faults, gradient, microbatch, rng
from functrain.train._grad_helpers import _check_dense_grads
from functrain.train._step_checks import (
    OptStateGuard,
    _check_no_overlap,
    _check_opt_state,
    _check_state,
    _check_step_args,
    _StructureGuard,
    consume_torn,
)
from functrain.train.grad_stats import GradStatsHook
from functrain.train.optimizer_stage import (
    Applied,
    LearningRateLookup,
    apply_optimizer,
    in_place_writes_started,
    reset_in_place_writes,
)
from functrain.train.state import TrainState

__all__ = ["TrainStep"]


class TrainStep:
    """A pure train step ``step(state, batch) -> (new_state, metrics)``; see make_train_step.

    Example:
        >>> import torch, functrain as ft
        >>> loss_fn = lambda params, batch: ((batch["x"] * params["w"]).sum(-1) ** 2).mean()
        >>> step = ft.make_train_step(loss_fn, ft.sgd(0.1), micro_batches=2)
        >>> state = ft.TrainState.create(params={"w": torch.ones(3)}, tx=ft.sgd(0.1))
        >>> state, metrics = step(state, {"x": torch.ones(5, 3)})
        >>> int(state.step), sorted(metrics)[:3]
        (1, ['grad_norm', 'loss', 'num_examples'])
    """

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        tx: GradientTransformation,
        *,
        micro_batches: int | Sequence[int],
        strategy: Literal["loop", "vmap"],
        chunk_size: int | None,
        donate: bool,
        seed_rng: bool,
        grad_backend: Literal["auto", "func", "autograd"],
        grad_stats: GradStatsHook | None,
        norm_metrics: bool,
        nonfinite: Literal["skip", "ignore"] = "skip",
        max_consecutive_skips: int | None = None,
        loss_scale: DynamicLossScale | None = None,
        fused: bool = True,
        compile: bool | Mapping[str, Any] = False,
        per_example_clip: float | torch.Tensor | None = None,
    ) -> None:
        _check_step_args(
            loss_fn,
            tx,
            micro_batches,
            strategy,
            chunk_size,
            grad_backend,
            {"donate": donate, "seed_rng": seed_rng, "norm_metrics": norm_metrics, "fused": fused},
        )
        chosen = grad_backend == "auto"
        if chosen:
            # Reverse mode accumulating in place matches the classic loop's time and memory;
            # vmap and compiled steps need torch.func.
            eager_loop = strategy == "loop" and compile is False
            grad_backend = "autograd" if eager_loop else "func"
        self.grad_backend = grad_backend
        compile_options = compiled.compile_options(compile, grad_backend=grad_backend)
        self.loss_fn = loss_fn
        self.tx = tx
        self.micro_batches = micro_batches
        self.strategy = strategy
        self.donate = donate
        self.seed_rng = seed_rng
        self.grad_stats = grad_stats
        self.norm_metrics = norm_metrics
        self.faults = faults.StepFaults(nonfinite, max_consecutive_skips, loss_scale)
        self._scale_slot: compiled.LossScaleSlot | None = None
        if compile_options is not None and loss_scale is not None:
            self._scale_slot = compiled.LossScaleSlot()
            scaled_loss = self._scale_slot.wrap(loss_fn)
        else:
            scaled_loss = self.faults.wrap_loss(loss_fn)
        self.per_example_clip = per_example_clip
        if per_example_clip is not None:
            dp_stage.check_options(
                per_example_clip,
                tx=tx,
                micro_batches=micro_batches,
                strategy=strategy,
                grad_stats=grad_stats,
                loss_scale=loss_scale,
                compile=compile,
                loss_fn=loss_fn,
            )

        def grad_stage(backend: str) -> gradient.GradStage:
            return gradient.GradStage(
                scaled_loss,
                strategy=strategy,
                chunk_size=chunk_size,
                # A compiled step seeds outside the graph (seeding reads the key on the host).
                seed_rng=seed_rng and compile_options is None,
                backend=backend,
                per_micro_batch=None if grad_stats is None else grad_stats.per_micro_batch,
                accumulator=_accumulator(grad_stats),
                loss_scale=None if loss_scale is None else self._current_loss_scale,
                per_micro_batch_sq_norm=None
                if grad_stats is None
                else grad_stats.per_micro_batch_sq_norm,
                accumulates_unit_gradients=grad_stats is not None
                and grad_stats.accumulates_unit_gradients,
            )

        self.grad_stage: gradient.GradStage | dp_stage.ClippedSumStage = grad_stage(grad_backend)
        # Under an outer torch.func transform (vmap over an ensemble's states, grad through a
        # step) backward() cannot run: "auto" then takes torch.func's gradients (made on first
        # use); an explicit "autograd" is refused there.
        self._transformable_stage: Callable[[], gradient.GradStage] | None = None
        if chosen and grad_backend == "autograd":
            self._transformable_stage = functools.cache(lambda: grad_stage("func"))
        elif grad_backend == "func":
            self._transformable_stage = lambda: self.grad_stage  # type: ignore[return-value]
        if per_example_clip is not None:
            self.grad_stage = dp_stage.ClippedSumStage(
                loss_fn, per_example_clip, chunk_size=chunk_size, seed_rng=seed_rng
            )
            clipped_stage = self.grad_stage
            self._transformable_stage = lambda: clipped_stage  # vmap under the transform
        # The backward loop's gradients are step-local .grad tensors: the step's own to write.
        writable = isinstance(self.grad_stage, gradient.GradStage) and (
            self.grad_stage.accumulates_in_place
        )
        self.faults.grads_writable = writable
        self._guard = _StructureGuard()
        self._opt_guard = OptStateGuard(lambda params, opt: _check_opt_state(tx, params, opt))
        self._find_learning_rate = LearningRateLookup()
        # The optimizer stage, separable so that a fused in-place path can replace it.
        self.apply_optimizer: Callable[..., Applied] = apply_optimizer
        if fused and donate:
            # Gradients from the backward loop live in step-local .grad tensors: the fused
            # kernels may unscale them in place (others may be views or shared by leaves).
            self.apply_optimizer = fast.FusedStage(
                update_norm=norm_metrics, grads_writable=writable
            )
        self._compiled: compiled.CompiledCore | None = None
        if compile_options is not None:
            self._compiled = compiled.CompiledCore(
                self._core, compile_options, seed_rng=seed_rng, metas=self.grad_stage.metas
            )

    def _check_transformable(self, key: torch.Tensor | None) -> None:
        """Refuses, by name, what cannot run under an outer ``torch.func`` transform."""
        why = None
        if self.seed_rng and key is not None and torch._C._functorch.is_batchedtensor(key):
            why = (
                "a key per member (a batched state.key) with seed_rng=True (seeding the "
                "generators for loss_fn's random ops reads the key on the host; give the "
                "members one shared key and vmap with randomness='different' for independent "
                "draws, or pass seed_rng=False)"
            )
        elif self._compiled is not None:
            why = "compile= (torch.compile the transformed function instead)"
        elif self.faults.max_consecutive_skips is not None:
            # Raising NonFiniteError reads the skip count on the host; a member's count is a
            # batched tensor there (it failed from the second call with vmap's ".item()" error).
            why = (
                "max_consecutive_skips (raising NonFiniteError reads each member's skip count "
                "on the host; watch the 'skipped' metric instead, or step the members one by one)"
            )
        elif self._transformable_stage is None:
            why = "grad_backend='autograd' (backward() cannot run there; use 'func' or 'auto')"
        if why is not None:
            raise ValueError(
                "this train step was called under a torch.func transform (e.g. "
                "torch.func.vmap over an ensemble's states, or torch.func.grad through the "
                f"step), where {why} cannot run"
            )

    def _current_loss_scale(self) -> torch.Tensor:
        """The scale ``loss_fn`` is multiplied by in this call (eager or compiled)."""
        if self._scale_slot is not None:
            assert self._scale_slot.scale is not None  # set at the start of the compiled core
            return self._scale_slot.scale
        return self.faults.current_scale()

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """One training step on ``batch``; returns the new state and the metrics."""
        _check_state(state, "train step")
        # Not consumed (checked above): the fields directly, without the properties' checks.
        params, opt_state, buffers, key = (
            state._params,
            state._opt_state,
            state._buffers,
            state._key,
        )
        step, extra = state._step, state._extra
        # Under an outer torch.func.vmap nothing is donated (the fused in-place kernels have no
        # batching rule): the step runs its pure path.
        transformed = _func_transforms.active()
        if transformed:
            self._check_transformable(key)
        donate = self.donate and not transformed
        self._opt_guard.check(state, params, opt_state)
        p_leaves = self._guard.check(params)
        if donate:
            _check_no_overlap(p_leaves, params, "train step (donate=True)")
        token = self.faults.begin(extra, params)  # may raise NonFiniteError; sets the scale
        reset_in_place_writes()
        try:
            split = (
                microbatch.split_batch(batch, self.micro_batches)
                if self.per_example_clip is None
                else dp_stage.split(batch, self.micro_batches)  # type: ignore[arg-type]
            )
            # Only seeding reads the devices (a state without a key is never seeded).
            devices = [] if key is None else list({p.device: None for p in p_leaves})
            if self._compiled is None:
                fields, metrics = self._core(
                    params, opt_state, buffers, key, step, extra, batch, split, devices, transformed
                )
            else:
                fields, metrics = self._compiled(
                    self._full_extra(extra, params),
                    params,
                    opt_state,
                    buffers,
                    key,
                    step,
                    batch,
                    split,
                    devices,
                )
        except BaseException as err:
            if donate and in_place_writes_started():
                consume_torn(state, err, "a train step (donate=True)")
            raise
        finally:
            self.faults.end(token)
        if donate:
            # Consumed only once the update succeeded: a step that fails before it writes into
            # the state's memory leaves the state usable.
            state._consume("a train step (donate=True)")
        new_state = TrainState(*fields)
        if self._compiled is not None:
            self.faults.after_compiled(new_state._extra)
        self._opt_guard.issue(new_state)
        return new_state, metrics

    def _core(
        self,
        params: Any,
        opt_state: Any,
        buffers: Any,
        key: torch.Tensor | None,
        step: torch.Tensor,
        extra: dict[str, Any],
        batch: Any,
        split: microbatch.BatchSplit,
        devices: list[torch.device],
        transformed: bool = False,
    ) -> tuple[tuple[Any, ...], dict[str, torch.Tensor]]:
        """The step's tensor computation: the new state's fields and the metrics.

        Pure apart from the donated parameter memory, with no host reads: this is what
        ``compile=`` runs under ``torch.compile(fullgraph=True)``. ``transformed``: under an
        outer ``torch.func`` transform (torch.func's gradients, the pure optimizer stage).
        """
        if self._scale_slot is not None:
            self._scale_slot.scale = extra[faults.LOSS_SCALE_KEY].scale
        grad_stage = self.grad_stage
        if transformed:
            assert self._transformable_stage is not None  # _check_transformable
            grad_stage = self._transformable_stage()
        result = grad_stage(params, batch, split, buffers, key, devices)
        _check_dense_grads(result.grads)  # layouts only: before anything is written
        if self._scale_slot is not None:
            self._scale_slot.scale = None
        metrics = dict(result.metrics)
        # Unscaled gradients and ``ok`` (finite loss and gradients; None with "ignore").
        check = self.faults.check(metrics, result.grads, extra, params, writable=result.owned)
        grads, ok = check.grads, check.ok
        new_extra = {**extra, **check.extra} if check.extra else extra
        if self.grad_stats is not None:
            assert result.stats is not None
            hook_state = (
                extra[self.grad_stats.name]
                if self.grad_stats.name in extra
                else self.grad_stats.init(params)
            )
            hook_metrics, new_hook_state = self.grad_stats.update(result.stats, grads, hook_state)
            new_hook_state = self.faults.keep_if_skipped(ok, new_hook_state, hook_state)
            new_extra = {**new_extra, self.grad_stats.name: new_hook_state}
            _merge(metrics, hook_metrics, "grad_stats")
        _merge(metrics, check.metrics, "the non-finite check")
        # Before anything is written: these are added later, after an in-place update.
        _refuse_own_names(metrics)
        stage = apply_optimizer if transformed else self.apply_optimizer
        grad_norm = None
        if self.norm_metrics and self.per_example_clip is None:  # a DP sum's norm is not private
            grad_norm = metrics["grad_norm"] = fast.global_norm(grads)
        if isinstance(stage, fast.FusedStage) and (grad_norm is not None or result.owned):
            # A leading clip reuses the norm; gradients the grad stage made afresh may be
            # unscaled and clipped in place.
            stage = stage.for_call(grad_norm, grads_writable=result.owned)
        # Compiled: out of place. The in-place stage finds aliased leaves by id(), on which
        # dynamo would guard (a recompile for every new state); the consumed state's memory is
        # freed with it instead of reused.
        in_place = self.donate and not torch.compiler.is_compiling() and not transformed
        applied = faults.apply_guarded(
            stage,
            self.tx,
            grads,
            opt_state,
            params,
            in_place=in_place,
            ok=ok,
            found_inf=check.found_inf,
            value=metrics["loss"],  # the mean loss, unscaled: for tx.update(..., value=)
        )
        del params, opt_state
        new_key = None if key is None else rng.fold_in(key, 0)
        new_buffers = self.faults.keep_if_skipped(ok, result.buffers, buffers)
        update_norm = applied.update_norm
        if self.norm_metrics and applied.updates is not None:
            update_norm = fast.global_norm(applied.updates)  # a fused path may not form updates
        self._finish_metrics(metrics, applied.params, applied.opt_state, update_norm, step.device)
        fields = (step + 1, applied.params, applied.opt_state, new_buffers, new_key, new_extra)
        return fields, metrics

    def _finish_metrics(
        self,
        metrics: dict[str, torch.Tensor],
        params: Any,
        opt_state: Any,
        update_norm: torch.Tensor | None,
        device: torch.device,
    ) -> None:
        """Adds ``update_norm``, ``param_norm``, ``lr`` and ``lr_scale`` (also used by the
        data-parallel step)."""
        if self.norm_metrics:
            if update_norm is not None:
                metrics["update_norm"] = update_norm
            metrics["param_norm"] = fast.global_norm(params)
        lr, scale = self._find_learning_rate.lookup(opt_state)
        if lr is not None:
            if not isinstance(lr, torch.Tensor):
                lr = torch.full((), float(lr), device=device)
            metrics["lr"] = lr
        if scale is not None:  # reduce_on_plateau's factor on the updates, below lr
            metrics["lr_scale"] = scale

    def prepare(self, state: TrainState) -> TrainState:
        """``state`` with the ``state.extra`` entries this step keeps added where missing.

        A step initialises its entries (skip counters, loss scale, ``grad_stats`` hook state)
        at its first call; a checkpoint restore needs them in the target beforehand:
        ``restore(path, target=step.prepare(ft.TrainState.create(...)))``. Existing entries
        are kept; the state is not consumed (the new one shares its tensors).

        Example:
            >>> import torch, functrain as ft
            >>> tx = ft.sgd(0.1)
            >>> step = ft.make_train_step(lambda p, b: (p["w"] * b).mean(), tx,
            ...                           loss_scale=ft.DynamicLossScale())
            >>> state = ft.TrainState.create(params={"w": torch.ones(2)}, tx=tx)
            >>> sorted(step.prepare(state).extra)
            ['loss_scale', 'nonfinite']
        """
        _check_state(state, "TrainStep.prepare")
        return state.replace(extra=self._full_extra(state.extra, state.params))

    def _full_extra(self, extra: dict[str, Any], params: Any) -> dict[str, Any]:
        """``extra`` with the entries this step keeps added where missing."""
        names = [faults.NONFINITE_KEY] if self.faults.stateful else []
        if self.faults.loss_scale is not None:
            names.append(faults.LOSS_SCALE_KEY)
        hook = self.grad_stats
        if all(name in extra for name in names) and (hook is None or hook.name in extra):
            return extra
        out = dict(extra)
        for name, value in self.faults.init_extra(params).items():
            out.setdefault(name, value)
        if hook is not None and hook.name not in out:
            out[hook.name] = hook.init(params)
        return out


_OWN_METRICS = ("grad_norm", "update_norm", "param_norm", "lr", "lr_scale")


def _refuse_own_names(metrics: dict[str, torch.Tensor]) -> None:
    """An aux or ``grad_stats`` metric named like one the step adds would be overwritten."""
    clashes = [name for name in _OWN_METRICS if name in metrics]
    if clashes:
        raise ValueError(
            f"metric(s) {clashes} from loss_fn's aux or grad_stats would be overwritten by the "
            f"step's own metrics of those names ({', '.join(_OWN_METRICS)}): rename them"
        )


def _merge(metrics: dict[str, torch.Tensor], new: dict[str, torch.Tensor], source: str) -> None:
    for name, value in new.items():
        if name in metrics:
            raise ValueError(f"{source} metric {name!r} clashes with an existing metric")
        metrics[name] = value


def _accumulator(hook: GradStatsHook | None) -> Any:
    """The hook's step-local accumulator as ``(init, add)``, or ``None``."""
    if hook is None or hook.accumulate is None:
        return None
    if hook.accumulator_init is None:
        raise TypeError("GradStatsHook.accumulate needs accumulator_init too")
    return hook.accumulator_init, hook.accumulate
