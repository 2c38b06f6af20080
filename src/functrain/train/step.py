"""``make_train_step``: training as a pure function of state and batch.

``step(state, batch) -> (new_state, metrics)`` runs, with no hidden ``.grad`` state:

1. split ``batch`` into micro-batches (:mod:`functrain.train.microbatch`);
2. the gradient stage (:mod:`functrain.train.gradient`): one explicit gradient pytree per
   micro-batch, combined exactly into the full-batch gradient; buffers are threaded through the
   micro-batches in order and each micro-batch gets its own random stream;
3. the optimizer stage (:mod:`functrain.train.optimizer_stage`), one separable function
   ``(grads, opt_state, params) -> (params, opt_state, updates)``: ``tx.update`` then
   ``apply_updates`` (in place on the consumed state's parameter memory when donating);
4. a new :class:`~functrain.TrainState` (step + 1, key advanced) and metrics, all tensors.

Nothing in the step reads a device value on the host: metrics stay tensors until a writer reads
them. Tensors follow the params' device. Arguments and states are checked eagerly beforehand
(:mod:`functrain.train._step_checks`). The :class:`TrainStep` object lives in
:mod:`functrain.train.train_step` and ``make_eval_step`` (the loss with no gradient work) in
:mod:`functrain.train.eval_step`; both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from functrain.optim.base import GradientTransformation
from functrain.optim.loss_scale import DynamicLossScale
from functrain.train.eval_step import EvalStep, make_eval_step
from functrain.train.grad_stats import GradStatsHook
from functrain.train.optimizer_stage import find_learning_rate
from functrain.train.train_step import TrainStep

__all__ = ["EvalStep", "TrainStep", "find_learning_rate", "make_eval_step", "make_train_step"]


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
    per_example_clip: float | torch.Tensor | None = None,
) -> TrainStep:
    """Builds ``step(state, batch) -> (new_state, metrics)``, a pure training step.

    The step splits ``batch`` (a pytree of tensors with a shared leading dimension) into
    ``micro_batches`` micro-batches, takes each one's gradient as an explicit pytree, combines
    them into the exact gradient of the full-batch loss, applies ``tx`` and returns the new
    state and metrics. See :mod:`functrain.train.loss` for what ``loss_fn`` may take and return:
    ``loss_fn(params, batch) -> mean loss`` is the simplest form; ``buffers=`` / ``key=``
    parameters, :class:`~functrain.LossSum` (token-count weighted) and
    :class:`~functrain.LossOutput` (aux metrics, updated buffers) are the richer ones. The
    step's full-batch loss (unscaled) reaches ``tx.update`` as ``value=loss`` when ``tx.update``
    takes extra keyword arguments (chains do), e.g. for
    ``ft.chain(ft.adam(1e-3), ft.reduce_on_plateau())``.

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
            A step that raises leaves its input usable, unless it failed while writing the
            update into that memory (e.g. out of device memory between two fused kernel
            calls): then the input is consumed too, and the error says so.
        seed_rng: seed the global random generators (CPU and the params' CUDA devices) from the
            micro-batch's key around each gradient computation, and restore them afterwards, so
            ``nn.Dropout`` and ``torch.rand`` are reproducible and differ between micro-batches.
            Ignored for states without a key.
        grad_backend: ``"func"`` (``torch.func.grad``, one gradient pytree per micro-batch),
            ``"autograd"`` (reverse mode on step-local leaves that alias the parameters:
            backward accumulates the weighted micro-batch gradients in place, with the memory
            and speed of a classic loop, also with a ``grad_stats`` hook that needs only
            ``‖ĝᵢ‖²`` (:attr:`~functrain.GradStatsHook.per_micro_batch_sq_norm`), perhaps with
            a running sum of unit gradients (``noise_scale_hook(cosine=True)``, see
            :attr:`~functrain.GradStatsHook.accumulates_unit_gradients`); with other hooks,
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
            (``{"mode": "max-autotune-no-cudagraphs"}``, ``{"backend": "aot_eager"}``;
            CUDA graphs are refused; ``fullgraph`` is
            always ``True``, ``dynamic`` defaults to ``False``). State checks, donation and
            the batch split stay eager. Hyperparameters, schedules and counters are tensors, so
            a run compiles once per batch shape. Same numbers as eager to rounding; under
            compile the optimizer update is out of place (donated memory is freed, not reused)
            and dropout is seeded once per step rather than once per micro-batch (identical
            to eager for one micro-batch). Not with ``grad_backend="autograd"``. See
            :mod:`functrain.train.compiled`.
        per_example_clip: ``C`` for a DP-SGD step: ``tx`` then receives ``Σᵢ clip(gᵢ, C)``,
            the sum over the batch's examples of their gradients clipped to norm ``C``
            (formed micro-batch by micro-batch), and must begin with
            :func:`~functrain.dp_noisy_mean` with the same ``C`` (noise once per step,
            division by the expected batch size; the step does not inspect ``tx``, so another
            chain would apply the un-noised sum). ``chunk_size`` then bounds the examples per
            ``vmap`` call. Batches may vary in size and be empty (Poisson sampling). Metrics:
            ``loss``, ``num_examples``, ``clipped_fraction``, ``skipped``, ``update_norm``,
            ``param_norm`` (these two of the noisy update), no ``grad_norm``. Only the
            ``"loop"`` strategy with a count of micro-batches, without ``grad_stats``,
            ``loss_scale`` or ``compile``. See :mod:`functrain.train.dp_stage`.

    Returns:
        A :class:`TrainStep`. Metrics (a flat dict of tensors): ``loss`` (full-batch loss),
        ``num_examples``, ``num_tokens`` (for ``LossSum`` losses: the total count, exact, as a
        float of at least float32), the aux values, ``grad_norm`` (before clipping),
        ``update_norm``, ``param_norm`` (after the update), ``lr`` when the optimizer state
        exposes one (``inject_hyperparams``), ``lr_scale`` with :func:`~functrain.reduce_on_plateau`
        (its factor on the updates, after ``lr``) and, with ``nonfinite="skip"``, ``skipped``
        (0-d int32, 1 if the step was skipped as non-finite).

    Random streams: micro-batch ``i`` (0-based) uses ``fold_in(state.key, i + 1)`` (with
    ``"vmap"``: chunk ``i``), and the new state's key is ``fold_in(state.key, 0)``. The same
    state and batch give the same result.

    Ensembles: a step called under ``torch.func.vmap`` (over a stack of members' parameters or
    states, as ``jax.vmap`` of a train step) runs its pure path: nothing is donated, ``"auto"``
    takes ``torch.func``'s gradients, and each member gets what a call of its own gives.
    Keys: one key shared by the members seeds them alike (vmap's ``randomness`` then decides
    whether their draws differ); a key per member (a batched ``state.key``) folds as tensors
    and needs ``seed_rng=False``. ``grad_backend="autograd"``, ``compile=``,
    ``max_consecutive_skips`` and a key per member with ``seed_rng=True`` raise ``ValueError``
    there. Each member needs its own buffers (BatchNorm statistics), stacked like its parameters.

    Meta-learning: as ``jax.grad`` through an optax training loop, ``torch.func.grad`` (or
    ``jvp``) of a function of the state after some steps differentiates through them: through
    each micro-batch gradient (second order), the accumulation and ``tx.update``, with respect
    to the initial parameters (``TrainState.create`` inside the transform keeps them its
    inputs) or to a tensor hyperparameter such as the learning rate. The step then runs the same
    pure path as under ``vmap``, with the same refusals.

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
        per_example_clip=per_example_clip,
    )
