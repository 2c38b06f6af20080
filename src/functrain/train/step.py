"""``make_train_step`` and ``make_eval_step``: training as a pure function of state and batch.

``step(state, batch) -> (new_state, metrics)`` runs, with no hidden ``.grad`` state:

1. split ``batch`` into micro-batches (:mod:`functrain.train.microbatch`);
2. the gradient stage (:mod:`functrain.train.gradient`): one explicit gradient pytree per
   micro-batch, combined exactly into the full-batch gradient; buffers are threaded through the
   micro-batches in order and each micro-batch gets its own random stream;
3. the optimizer stage, one separable function ``(grads, opt_state, params) -> (params,
   opt_state, updates)``: ``tx.update`` then ``apply_updates`` (in place on the consumed state's
   parameter memory when donating);
4. a new :class:`~functrain.TrainState` (step + 1, key advanced) and metrics, all tensors.

Nothing in the step reads a device value on the host: metrics stay tensors until a writer reads
them. Tensors follow the params' device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import optree
import torch

from functrain import tree
from functrain.optim.base import GradientTransformation, apply_updates
from functrain.optim.loss_scale import DynamicLossScale
from functrain.train import compiled, fast, faults, gradient, microbatch, rng
from functrain.train import loss as loss_lib
from functrain.train.gradient import GradStatsHook
from functrain.train.state import TrainState

__all__ = ["EvalStep", "TrainStep", "find_learning_rate", "make_eval_step", "make_train_step"]


class Applied(NamedTuple):
    """Result of the optimizer stage: new params, new opt state, the updates (or ``None``)."""

    params: Any
    opt_state: Any
    updates: Any
    update_norm: Any = None  # ‖new params − params‖ from a fused path that has no ``updates``


def find_learning_rate(opt_state: Any) -> torch.Tensor | None:
    """The learning rate an optimizer state exposes, or ``None``.

    Looks for the first node with a ``hyperparams`` dict holding ``"learning_rate"`` (the state
    of :func:`functrain.inject_hyperparams`, found duck-typed anywhere in ``opt_state``).

    Example:
        >>> import functrain as ft
        >>> ft.find_learning_rate((ft.EmptyState(),)) is None
        True
    """
    nodes = optree.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(getattr(x, "hyperparams", None), dict)
    )
    for node in nodes:
        hyperparams = getattr(node, "hyperparams", None)
        if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
            return hyperparams["learning_rate"]
    return None


def _add_in_place(params: Any, updates: Any, keep: set[int]) -> Any:
    """``apply_updates`` writing into the params' memory (except leaves whose id is in ``keep``)."""
    paths, p_leaves, spec = tree.flatten_with_paths(params)
    u_leaves = tree.flatten_up_to(spec, updates, ("params", "updates"), params)
    same, same_u, out = [], [], list(p_leaves)
    for i, (path, p, u) in enumerate(zip(paths, p_leaves, u_leaves)):
        if u is None:
            continue
        if p.shape != u.shape:
            raise tree.TreeMismatchError(
                f"{tree.path_str(path, 'updates')}: shape {tuple(u.shape)} does not match "
                f"{tree.path_str(path, 'params')} shape {tuple(p.shape)}"
            )
        if id(p) in keep or p.dtype != u.dtype:
            # Aliased elsewhere (so its memory is not ours to reuse) or mixed precision:
            # out of place, with apply_updates' rounding.
            s = p + u
            out[i] = s if s.dtype == p.dtype else s.to(p.dtype)
        else:
            same.append(p)
            same_u.append(u)
    if same:
        torch._foreach_add_(same, same_u)
    return tree.unflatten(spec, out)


def apply_optimizer(
    tx: GradientTransformation,
    grads: Any,
    opt_state: Any,
    params: Any,
    *,
    in_place: bool,
    found_inf: torch.Tensor | None = None,
) -> Applied:
    """The optimizer stage: ``tx.update`` then ``apply_updates``.

    With ``in_place=True`` (a donated state) the new parameters reuse the old parameters' memory,
    except leaves that are referenced twice in ``params`` or kept by the new optimizer state
    (those are updated out of place). This is the function a fused fast path replaces.

    ``found_inf`` (0-d bool tensor, from the step's non-finite check): where true, the
    parameters and the optimizer state come out bit-for-bit unchanged, with no host read (see
    :func:`functrain.train.faults.apply_guarded`; a fused path may pass it to its kernels and
    fall back to this generic skip otherwise).
    """
    if found_inf is not None:
        tx = faults.skip_unless(tx, ~found_inf)
    with torch.no_grad():
        updates, new_opt_state = tx.update(grads, opt_state, params)
        if not in_place:
            return Applied(apply_updates(params, updates), new_opt_state, updates)
        p_leaves = tree.leaves(params)
        ids = [id(p) for p in p_leaves]
        keep = {i for i in ids if ids.count(i) > 1} if len(set(ids)) != len(ids) else set()
        keep |= {id(x) for x in tree.leaves(new_opt_state)} & set(ids)
        return Applied(_add_in_place(params, updates, keep), new_opt_state, updates)


apply_optimizer.supports_found_inf = True  # type: ignore[attr-defined]


def _devices(params: Any) -> list[torch.device]:
    return list({leaf.device: None for leaf in tree.leaves(params)})


class _StructureGuard:
    """Remembers the params' structure and shapes of the first step and checks later ones."""

    def __init__(self) -> None:
        self.spec: Any = None
        self.shapes: tuple[torch.Size, ...] = ()
        self.reference: Any = None

    def check(self, params: Any) -> list[Any]:
        """Raises unless ``params`` has the first step's structure; returns its leaves."""
        leaves, spec = tree.flatten(params)
        shapes = tuple(leaf.shape for leaf in leaves)
        if self.spec is None:
            self.spec, self.shapes = spec, shapes
            self.reference = tree.unflatten(spec, [torch.empty(s, device="meta") for s in shapes])
            return leaves
        if spec == self.spec and shapes == self.shapes:
            return leaves
        try:
            tree.check_shapes(self.reference, params, ("first step's params", "state.params"))
        except tree.TreeMismatchError as err:
            raise tree.TreeMismatchError(
                f"state.params changed structure since this step was first called ({err}); "
                "a step, its optimizer state and its model belong to one parameter structure: "
                "build a new state (and step) for the new model"
            ) from None
        raise tree.TreeMismatchError(
            f"state.params changed structure since this step was first called: {spec} vs "
            f"{self.spec}"
        )


def _check_micro_batches(micro_batches: Any) -> None:
    def positive(n: Any) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 1

    sizes = (
        micro_batches
        if isinstance(micro_batches, Sequence) and not isinstance(micro_batches, str)
        else None
    )
    if not (positive(micro_batches) or (sizes and all(positive(s) for s in sizes))):
        raise ValueError(
            "micro_batches must be a positive int (the number of micro-batches) or a non-empty "
            f"sequence of positive ints (their sizes), got {micro_batches!r}"
        )


def _check_opt_state(tx: GradientTransformation, params: Any, opt_state: Any) -> None:
    """Raises a path-named error when ``opt_state`` is not of the kind ``tx.init`` makes.

    ``tx.init`` runs on meta tensors (no memory, no numbers; the CPU generator is restored in
    case an init draws from it). An init that cannot run on meta tensors is not checked.
    """
    meta = tree.map(lambda p: torch.empty_like(p, device="meta"), params)
    try:
        with torch.random.fork_rng(devices=[]):
            expected = tx.init(meta)
    except Exception:  # best effort: the update then fails on its own terms
        return
    if tree.structure(expected) == tree.structure(opt_state):
        return
    hint = (
        "state.opt_state was not made by this step's optimizer: create the state with the "
        "same tx (ft.TrainState.create(params=..., tx=tx))"
    )
    try:
        tree.check_shapes(expected, opt_state, ("tx.init(params)", "state.opt_state"))
    except tree.TreeMismatchError as err:
        raise tree.TreeMismatchError(f"{hint}; {err}") from None
    raise tree.TreeMismatchError(
        f"{hint}; node types differ: {tree.structure(opt_state)} vs {tree.structure(expected)}"
    )


def _check_state(state: Any, where: str) -> TrainState:
    if not isinstance(state, TrainState):
        raise TypeError(f"{where} expects a ft.TrainState, got {type(state).__name__}")
    if state.consumed:
        state.step  # noqa: B018  (raises ConsumedStateError with the explanation)
    return state


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
    ) -> None:
        if strategy not in ("loop", "vmap"):
            raise ValueError(f"strategy must be 'loop' or 'vmap', got {strategy!r}")
        if grad_backend not in ("auto", "func", "autograd"):
            raise ValueError(
                f"grad_backend must be 'auto', 'func' or 'autograd', got {grad_backend!r}"
            )
        if grad_backend == "auto":
            # Reverse mode accumulating in place matches the classic loop's time and memory;
            # vmap and compiled steps need torch.func.
            eager_loop = strategy == "loop" and compile is False
            grad_backend = "autograd" if eager_loop else "func"
        self.grad_backend = grad_backend
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise TypeError(f"tx must be a GradientTransformation, got {type(tx).__name__}")
        _check_micro_batches(micro_batches)
        for name, flag in (
            ("donate", donate),
            ("seed_rng", seed_rng),
            ("norm_metrics", norm_metrics),
            ("fused", fused),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        compile_options = compiled.compile_options(compile, grad_backend=grad_backend)
        self.loss_fn = loss_fn
        self.tx = tx
        self.micro_batches = micro_batches
        self.strategy = strategy
        self.donate = donate
        self.grad_stats = grad_stats
        self.norm_metrics = norm_metrics
        self.faults = faults.StepFaults(nonfinite, max_consecutive_skips, loss_scale)
        self._scale_slot: compiled.LossScaleSlot | None = None
        if compile_options is not None and loss_scale is not None:
            self._scale_slot = compiled.LossScaleSlot()
            scaled_loss = self._scale_slot.wrap(loss_fn)
        else:
            scaled_loss = self.faults.wrap_loss(loss_fn)
        self.grad_stage = gradient.GradStage(
            scaled_loss,
            strategy=strategy,
            chunk_size=chunk_size,
            # A compiled step seeds outside the graph (seeding reads the key on the host).
            seed_rng=seed_rng and compile_options is None,
            backend=grad_backend,
            per_micro_batch=None if grad_stats is None else grad_stats.per_micro_batch,
        )
        # The autograd loop's gradients are step-local .grad tensors: the step's own to write.
        writable = grad_stats is None and strategy == "loop" and grad_backend == "autograd"
        self.faults.grads_writable = writable
        self._guard = _StructureGuard()
        self._no_lr: set[Any] = set()
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
        if self._guard.spec is None:  # the first call: was the state made for this tx?
            _check_opt_state(self.tx, params, opt_state)
        p_leaves = self._guard.check(params)
        token = self.faults.begin(extra, params)  # may raise NonFiniteError; sets the scale
        try:
            split = microbatch.split_batch(batch, self.micro_batches)
            # Only seeding reads the devices (a state without a key is never seeded).
            devices = [] if key is None else list({p.device: None for p in p_leaves})
            if self._compiled is None:
                fields, metrics = self._core(
                    params, opt_state, buffers, key, step, extra, batch, split, devices
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
        finally:
            self.faults.end(token)
        if self.donate:
            # Consumed only once the update succeeded: a failing step leaves the state usable.
            state._consume("a train step (donate=True)")
        return TrainState(*fields), metrics

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
    ) -> tuple[tuple[Any, ...], dict[str, torch.Tensor]]:
        """The step's tensor computation: the new state's fields and the metrics.

        Pure apart from the donated parameter memory, with no host reads: this is what
        ``compile=`` runs under ``torch.compile(fullgraph=True)``.
        """
        if self._scale_slot is not None:
            self._scale_slot.scale = extra[faults.LOSS_SCALE_KEY].scale
        result = self.grad_stage(params, batch, split, buffers, key, devices)
        if self._scale_slot is not None:
            self._scale_slot.scale = None
        metrics = dict(result.metrics)
        # Unscaled gradients and ``ok`` (finite loss and gradients; None with "ignore").
        check = self.faults.check(metrics, result.grads, extra, params)
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
        stage = self.apply_optimizer
        if self.norm_metrics:
            metrics["grad_norm"] = fast.global_norm(grads)
            if isinstance(stage, fast.FusedStage):  # a leading clip reuses the norm
                stage = stage.with_grad_norm(metrics["grad_norm"])
        # Compiled: out of place. The in-place stage finds aliased leaves by id(), on which
        # dynamo would guard (a recompile for every new state); the consumed state's memory is
        # freed with it instead of reused.
        in_place = self.donate and not torch.compiler.is_compiling()
        applied = faults.apply_guarded(
            stage,
            self.tx,
            grads,
            opt_state,
            params,
            in_place=in_place,
            ok=ok,
            found_inf=check.found_inf,
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
        """Adds ``update_norm``, ``param_norm`` and ``lr`` (also used by the data-parallel step)."""
        if self.norm_metrics:
            if update_norm is not None:
                metrics["update_norm"] = update_norm
            metrics["param_norm"] = fast.global_norm(params)
        lr = self._find_learning_rate(opt_state)
        if lr is not None:
            if not isinstance(lr, torch.Tensor):
                lr = torch.full((), float(lr), device=device)
            metrics["lr"] = lr

    def _find_learning_rate(self, opt_state: Any) -> Any:
        """:func:`find_learning_rate`, remembering the optimizer-state structures that have none.

        The search calls a Python predicate on every node; a structure whose leaves are all
        plain tensors has no ``hyperparams`` node if it had none before (node types and dict
        keys are part of the structure), so later steps skip the search.
        """
        if torch.compiler.is_compiling():  # traced once: nothing to save
            return find_learning_rate(opt_state)
        leaves, spec = optree.tree_flatten(opt_state)
        if spec in self._no_lr:
            return None
        lr = find_learning_rate(opt_state)
        if lr is None and all(type(x) is torch.Tensor for x in leaves):
            self._no_lr.add(spec)
        return lr

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


def _merge(metrics: dict[str, torch.Tensor], new: dict[str, torch.Tensor], source: str) -> None:
    for name, value in new.items():
        if name in metrics:
            raise ValueError(f"{source} metric {name!r} clashes with an existing metric")
        metrics[name] = value


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: GradientTransformation,
    *,
    micro_batches: int | Sequence[int] = 1,
    strategy: Literal["loop", "vmap"] = "loop",
    chunk_size: int | None = None,
    donate: bool = True,
    seed_rng: bool = True,
    grad_backend: Literal["auto", "func", "autograd"] = "auto",
    grad_stats: GradStatsHook | None = None,
    norm_metrics: bool = True,
    nonfinite: Literal["skip", "ignore"] = "skip",
    max_consecutive_skips: int | None = None,
    loss_scale: DynamicLossScale | None = None,
    fused: bool = True,
    compile: bool | Mapping[str, Any] = False,
) -> TrainStep:
    """Builds ``step(state, batch) -> (new_state, metrics)``, a pure training step.

    The step splits ``batch`` (a pytree of tensors with a shared leading dimension) into
    ``micro_batches`` micro-batches, takes each one's gradient as an explicit pytree, combines
    them into the exact gradient of the full-batch loss, applies ``tx`` and returns the new
    state and metrics. See :mod:`functrain.train.loss` for what ``loss_fn`` may take and return:
    ``loss_fn(params, batch) -> mean loss`` is the simplest form; ``buffers=`` / ``key=``
    parameters, :class:`~functrain.LossSum` (token-count weighted) and
    :class:`~functrain.LossOutput` (aux metrics, updated buffers) are the richer ones.

    Args:
        loss_fn: the loss of one micro-batch.
        tx: the optimizer (a ``GradientTransformation``).
        micro_batches: the number ``K`` of micro-batches (sizes may differ: 10 examples with
            ``K=4`` gives 3, 3, 2, 2) or an explicit sequence of sizes.
        strategy: ``"loop"`` (one micro-batch after another, memory of one; buffers such as
            BatchNorm statistics evolve exactly as in a classic accumulation loop) or ``"vmap"``
            (``torch.func.vmap`` over stacked equal-size micro-batches; raises a clear error for
            models that update buffers).
        chunk_size: with ``"vmap"``, the most micro-batches vmapped at once (bounds memory).
        donate: consume the input state: its parameter memory is updated in place and the
            consumed ``TrainState`` raises :class:`~functrain.ConsumedStateError` if used again.
            ``False`` keeps the input state intact (for research code comparing states).
        seed_rng: seed the global random generators (CPU and the params' CUDA devices) from the
            micro-batch's key around each gradient computation, and restore them afterwards, so
            ``nn.Dropout`` and ``torch.rand`` are reproducible and differ between micro-batches.
            Ignored for states without a key.
        grad_backend: ``"func"`` (``torch.func.grad``, one gradient pytree per micro-batch),
            ``"autograd"`` (reverse mode on step-local leaves that alias the parameters: without
            a ``grad_stats`` hook, backward accumulates the weighted micro-batch gradients in
            place, with the memory and speed of a classic loop; with one,
            ``torch.autograd.grad`` per micro-batch) or ``"auto"`` (the default: ``"autograd"``
            for an eager ``"loop"`` step, ``"func"`` for ``"vmap"`` and compiled steps). Same
            numbers to rounding; either way the gradient is an explicit pytree inside the step
            and nothing is left in any ``.grad``. ``"vmap"`` always uses ``torch.func``.
        grad_stats: an optional :class:`~functrain.GradStatsHook` (per-micro-batch gradient
            statistics), its state kept in ``state.extra``.
        norm_metrics: report ``grad_norm``, ``update_norm`` and ``param_norm``.
        nonfinite: ``"skip"``: a step whose loss or gradient has a NaN or inf changes nothing
            but ``state.step`` and the key (params, optimizer state, buffers and hook states
            are kept bit-for-bit, with no host sync; metric ``skipped``); ``"ignore"``: no check.
            See :mod:`functrain.train.faults`.
        max_consecutive_skips: raise :class:`~functrain.NonFiniteError` (from the next call,
            the input state intact) once more steps than this in a row were skipped; keeps
            counters in ``state.extra["nonfinite"]`` (metric ``skipped_total``).
        loss_scale: a :class:`~functrain.DynamicLossScale` for float16 training (GradScaler's
            policy): the loss is scaled before differentiation and the gradients unscaled; an
            overflow skips the step and halves the scale. State in
            ``state.extra["loss_scale"]``, metric ``loss_scale``. Use :meth:`TrainStep.prepare`
            to build checkpoint-restore targets for these two options.
        fused: with ``donate=True``, update the consumed state in place with fused kernels
            (``torch._fused_adamw_``, ``_fused_sgd_``, ...) when ``tx`` is built from
            primitives they cover (the Adam and SGD families, with clipping, weight-decay
            masks, schedules, ``inject_hyperparams``), else with in-place ``torch._foreach_*``
            arithmetic or, for unknown transforms, ``tx.update``. Same numbers as ``tx.update``
            to rounding (see :mod:`functrain.optim.fused`). ``update_norm`` is then the norm
            of the parameter change. ``False`` always runs ``tx.update``.
        compile: run the step's tensor work (gradients, non-finite check, optimizer update,
            new state and metrics) as one ``torch.compile(fullgraph=True)`` graph; ``True``
            for the defaults (inductor) or a dict of ``torch.compile`` keyword arguments
            (``{"mode": "max-autotune"}``, ``{"backend": "aot_eager"}``; ``fullgraph`` is
            always ``True``, ``dynamic`` defaults to ``False``). State checks, donation and
            the batch split stay eager. Hyperparameters, schedules and counters are tensors, so
            a run compiles once per batch shape. Same numbers as eager to rounding; under
            compile the optimizer update is out of place (donated memory is freed, not reused)
            and dropout is seeded once per step rather than once per micro-batch (identical
            to eager for one micro-batch). Not with ``grad_backend="autograd"``. See
            :mod:`functrain.train.compiled`.

    Returns:
        A :class:`TrainStep`. Metrics (a flat dict of tensors): ``loss`` (full-batch loss),
        ``num_examples``, ``num_tokens`` (for ``LossSum`` losses: the total count), the aux
        values, ``grad_norm`` (before clipping), ``update_norm``, ``param_norm`` (after the
        update), ``lr`` when the optimizer state exposes one (``inject_hyperparams``) and
        ``skipped`` (0-d int32, 1 if the step was skipped as non-finite).

    Random streams: micro-batch ``i`` (0-based) uses ``fold_in(state.key, i + 1)`` (with
    ``"vmap"``: chunk ``i``), and the new state's key is ``fold_in(state.key, 0)``. The same
    state and batch give the same result.

    Differences from the classic PyTorch loop (``(loss / K).backward()`` per micro-batch, then
    ``optimizer.step()``, ``zero_grad()``): no ``.grad`` state; uneven micro-batches and
    token-count losses are weighted exactly (``loss / K`` is only exact for equal sizes and mean
    losses); the micro-batch gradients are available to statistics hooks.

    Example:
        >>> import torch, functrain as ft
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model, params, _ = ft.functionalize(torch.nn.Linear(3, 1))
        >>> def loss_fn(params, batch):
        ...     return (model(params, batch["x"]).squeeze(-1) - batch["y"]).square().mean()
        >>> tx = ft.adamw(1e-2)
        >>> step = ft.make_train_step(loss_fn, tx, micro_batches=4)
        >>> state = ft.TrainState.create(params=params, tx=tx)
        >>> batch = {"x": torch.randn(10, 3), "y": torch.randn(10)}
        >>> state, metrics = step(state, batch)
        >>> int(state.step), sorted(metrics)
        (1, ['grad_norm', 'loss', 'num_examples', 'param_norm', 'skipped', 'update_norm'])
    """
    return TrainStep(
        loss_fn,
        tx,
        micro_batches=micro_batches,
        strategy=strategy,
        chunk_size=chunk_size,
        donate=donate,
        seed_rng=seed_rng,
        grad_backend=grad_backend,
        grad_stats=grad_stats,
        norm_metrics=norm_metrics,
        nonfinite=nonfinite,
        max_consecutive_skips=max_consecutive_skips,
        loss_scale=loss_scale,
        fused=fused,
        compile=compile,
    )


class EvalStep:
    """``eval_step(state, batch) -> metrics`` with no gradient work; see :func:`make_eval_step`.

    Example:
        >>> import torch, functrain as ft
        >>> loss_fn = lambda params, batch: ((batch["x"] * params["w"]).sum(-1) ** 2).mean()
        >>> eval_step = ft.make_eval_step(loss_fn)
        >>> state = ft.TrainState.create(params={"w": torch.ones(3)}, tx=ft.sgd(0.1))
        >>> eval_step(state, {"x": torch.ones(4, 3)})["loss"]
        tensor(9.)
    """

    def __init__(
        self, loss_fn: Callable[..., Any], micro_batches: int | Sequence[int], seed_rng: bool
    ) -> None:
        self.loss_fn = loss_fn
        self.micro_batches = micro_batches
        self.seed_rng = seed_rng
        self.accepted = loss_lib.accepted_inputs(loss_fn)
        self.metas: list[Any] = []
        self.objective = gradient.make_objective(loss_fn, self.accepted, self.metas)

    def __call__(self, state: TrainState, batch: Any) -> dict[str, torch.Tensor]:
        """Loss and aux metrics of ``batch`` (combined exactly over micro-batches)."""
        _check_state(state, "eval step")
        params, buffers, key = state.params, state.buffers, state.key
        split = microbatch.split_batch(batch, self.micro_batches)
        devices = _devices(params)
        combiner = gradient.Combiner(split.total)
        with torch.no_grad():
            for i, size in enumerate(split.sizes):
                mb = microbatch.micro_batch(batch, split, i)
                mb_key = None if key is None else rng.fold_in(key, i + 1)
                self.metas.clear()
                with gradient._seeding(mb_key, self.seed_rng, devices):
                    _, payload = self.objective(params, mb, buffers, mb_key)
                combiner.add(self.metas[-1], size, payload)
        return combiner.metrics(combiner.loss.device)  # type: ignore[union-attr]


def make_eval_step(
    loss_fn: Callable[..., Any],
    *,
    micro_batches: int | Sequence[int] = 1,
    seed_rng: bool = True,
) -> EvalStep:
    """Builds ``eval_step(state, batch) -> metrics``: the loss with no gradient work.

    Runs under ``torch.no_grad`` with the same ``loss_fn`` forms as :func:`make_train_step`
    (micro-batching bounds memory; the combination is exact). Buffers are read, never updated:
    buffers a loss returns are ignored, so use an eval-mode model (``model.eval()``) for
    BatchNorm's running statistics. The state is not consumed.

    Example:
        >>> import torch, functrain as ft
        >>> evaluate = ft.make_eval_step(lambda p, b: (p["w"] * b).mean(), micro_batches=3)
        >>> state = ft.TrainState.create(params={"w": torch.tensor(2.0)}, tx=ft.sgd(0.1))
        >>> evaluate(state, torch.arange(7.0))["loss"]
        tensor(6.)
    """
    return EvalStep(loss_fn, micro_batches, seed_rng)
