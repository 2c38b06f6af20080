"""``train_loop``: an optional helper that runs a pure train step over epochs of batches.

The pure step stays the core (``state, metrics = step(state, batch)``); this module is the
boilerplate around it that every script rewrites: epochs over any iterable of batches (a
``torch.utils.data.DataLoader`` with workers and pinned memory included), batches moved to the
params' device, default TensorBoard metrics and timings, periodic evaluation, checkpoints with an
exact resume, and a clean Ctrl-C.

**Metrics** (written with :meth:`~functrain.logging.MetricWriter.write_scalars`, as tensors: the
writer does the host conversion, so wrap it in :class:`~functrain.logging.AsyncWriter` to keep
that off the step). See :func:`metric_tags` for the names:

- ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/update_param_ratio``
  (``update_norm / param_norm``) and every other metric of the step;
- ``perf/step_time_s``, ``perf/examples_per_s``, ``perf/tokens_per_s`` (token losses),
  ``perf/data_time_s`` (host time waiting for the batch iterator, per step);
- ``eval/<name>`` for the eval step's metrics, averaged over the eval batches.

**Timing.** The loop never synchronizes inside a step. ``perf/*`` measure the wall-clock time
between log points, evaluation and checkpoint saves left out. On the CPU the clock is read at
every log point. On CUDA a timing event is recorded at each log point and an interval is reported
once its closing event has completed (queried, never waited for), so ``perf/*`` values may
describe an earlier log interval than the step they are written at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.train._loop_data import (
    TensorBatches,
)
from functrain.train._loop_metrics import History, metric_tags
from functrain.train._loop_run import Run
from functrain.train.state import TrainState

__all__ = ["History", "LoopResult", "TensorBatches", "metric_tags", "train_loop"]


class LoopResult(NamedTuple):
    """What :func:`train_loop` returns.

    Attributes:
        state: the final train state.
        history: every scalar logged (train, perf and eval), see :class:`History`.
        interrupted: whether the loop stopped on Ctrl-C (only with ``catch_interrupt=True``).
        resumed_from: the checkpoint step the run resumed from, or ``None``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.sgd(0.5)
        >>> step = ft.make_train_step(lambda p, b: (p["w"] - b).square().mean(), tx)
        >>> state = ft.TrainState.create(params={"w": torch.zeros(())}, tx=tx)
        >>> result = ft.train_loop(step, state, [torch.ones(4)] * 3)
        >>> int(result.state.step), result.interrupted, result.history.values("train/loss")
        (3, False, [1.0, 0.0, 0.0])
    """

    state: TrainState
    history: History
    interrupted: bool = False
    resumed_from: int | None = None


# -- internals -----------------------------------------------------------------------------------


def _device_of(state: TrainState) -> torch.device:
    for leaf in tree.leaves(state.params):
        return leaf.device
    return torch.device("cpu")


def _read_position(manager: Any, step: int) -> tuple[tuple[int, int], bool | None]:
    """The data position saved with checkpoint ``step`` and whether that step was evaluated
    (``None``: unknown, for a checkpoint saved outside ``train_loop``)."""
    from functrain.checkpoint import read_metadata

    user = (read_metadata(manager.path(step)).get("user") or {}).get("train_loop") or {}
    evaluated = user.get("evaluated")
    evaluated = evaluated if isinstance(evaluated, bool) else None
    if isinstance(user.get("epoch"), int) and isinstance(user.get("batch"), int):
        return (user["epoch"], user["batch"]), evaluated
    # A checkpoint saved outside train_loop: one batch per step from the start of epoch 0.
    return (0, step), evaluated


def train_loop(
    step: Callable[[TrainState, Any], tuple[TrainState, Mapping[str, Any]]],
    state: TrainState,
    batches: Iterable[Any] | Callable[[int], Iterable[Any]],
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    eval_step: Callable[[TrainState, Any], Mapping[str, Any]] | None = None,
    eval_batches: Iterable[Any] | None = None,
    eval_every: int | None = None,
    writer: Any = None,
    log_every: int = 1,
    checkpoint_manager: Any = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    catch_interrupt: bool = False,
) -> LoopResult:
    """Runs ``step`` over ``epochs`` of ``batches`` with logging, evaluation and checkpoints.

    Each batch is moved to ``device`` (``non_blocking``), then ``state, metrics = step(state,
    batch)``. Every ``log_every`` steps (and at the last one) the metrics go to ``writer`` under
    the tags of :func:`metric_tags`, with ``perf/*`` timings; they stay tensors, so the writer
    decides when to read them (an :class:`~functrain.logging.AsyncWriter` reads them off the
    step path). Steps are numbered by ``state.step`` after the step: the first is step 1.

    **Data order.** ``batches`` is an iterable read once per epoch (a list,
    :class:`TensorBatches`, a ``DataLoader``) or a function ``batches(epoch) -> iterable``. Before
    each epoch the loop calls ``batches.set_epoch(epoch)`` when it exists (and the sampler's, for
    ``DistributedSampler``), and reseeds a ``DataLoader``'s ``generator`` from ``(seed,
    epoch)``, so each epoch's order is reproducible; the same goes for the sampler of a
    ``batch_sampler`` (``BatchSampler(RandomSampler(ds, generator=g), ...)``) and for a
    ``batch_sampler`` with a ``generator`` (:class:`~functrain.PoissonSampler`). A
    ``RandomSampler`` without a generator uses the global random generator and is warned
    about. What a function ``batches(epoch)`` returns is treated the same way (so a
    ``DataLoader`` it builds afresh each epoch, as a resumed process does, keeps its order),
    except for a generator the function seeded itself
    (``generator=torch.Generator().manual_seed(epoch)``): its seed is the function's choice
    and is kept. Such a generator that has drawn since it was seeded (seeded once and shared
    by every epoch) continues its stream, which a resumed run restarts, and is warned about.
    An unseeded ``torch.Generator()`` is seeded from ``(seed, epoch)``. Each epoch reads its
    iterator as a ``for`` loop does: ``len(batches)`` batches, then one ``next`` that ends it
    (a sampler may draw then, as ``RandomSampler`` does, so a generator that outlives the
    epoch is left where a plain ``for batch in loader`` loop leaves it; a batch that ``next``
    still yields, past ``len``, is dropped, with a warning). A run stopped by ``max_steps`` reads nothing past
    its last step's batch, like a loop that breaks there.

    **Checkpoints and resume.** With ``checkpoint_manager`` (a
    :class:`~functrain.checkpoint.CheckpointManager`) the state is saved every
    ``checkpoint_every`` steps, at the end, and on Ctrl-C, with the data position (epoch,
    batches consumed) in the checkpoint's metadata and the train loss and latest eval metrics
    as its metrics (``best_metric="eval/loss"`` works). With ``resume=True`` the loop first
    restores the latest valid checkpoint (``state`` is the restore target), skips the batches
    already consumed and continues, so a resumed run is bit-for-bit the uninterrupted one. The
    writer is flushed before each save, so the logs always cover the checkpoint. Each step is
    saved and evaluated at most once, across resumes too: a resumed run with nothing left to
    do writes no checkpoint and no evaluation again (it evaluates the resumed step only if the
    run that saved it stopped before doing so). For an iterable without ``len`` the loop reads
    one batch ahead to learn where an epoch ends.

    **Writer.** ``writer`` is a :class:`~functrain.logging.MetricWriter`, which the loop
    flushes at the end (closing it is yours, e.g. ``with writer:``), or a function
    ``writer(purge_step)`` that the loop calls once it knows whether it resumed (``purge_step``
    is the resumed step + 1, else ``None``) and closes at the end. Pass it on to
    ``TensorBoardWriter(logdir, purge_step=purge_step)`` so that a resumed run leaves no
    duplicate points behind.

    **Errors.** Any other exception (from the data, the step, the eval step, the writer or the
    checkpoint manager) propagates with the loop's latest state attached as
    ``err.train_state``, so that a long run's progress survives it although the given
    ``state`` was donated: the state after the last completed step, or, for an error inside a
    step, that step's input (a train step that raises leaves its input usable, or ``None`` if
    it failed halfway through writing its update into that input's memory). No checkpoint is
    saved on an error; save ``err.train_state`` yourself if you want one.

    **Ctrl-C.** A ``KeyboardInterrupt`` raised between steps (in the batch iterator, say) or a
    Ctrl-C during a step (held until the step returns) saves a checkpoint when a manager is
    given, flushes the writer and is re-raised with ``err.train_state`` as above; with
    ``catch_interrupt=True`` the loop returns instead, with ``interrupted=True``. A second
    Ctrl-C during a step stops it at once, possibly halfway through writing its update into the
    donated state's memory: that state is neither saved nor returned. The
    ``KeyboardInterrupt`` is then re-raised even with ``catch_interrupt=True``, with
    ``err.train_state = None`` (the latest checkpoint is the last whole state), or the step's
    untouched input for a step with ``donate=False``.

    Args:
        step: a train step, ``step(state, batch) -> (new_state, metrics)``.
        state: the initial state (and the restore target when resuming).
        batches: an iterable of batches re-read each epoch, or ``epoch -> iterable`` (see
            *Data order* for how its result is reseeded).
        epochs: passes over ``batches``.
        max_steps: stop once ``state.step`` reaches this (an absolute step, so a resumed run
            stops at the same place).
        eval_step: ``eval_step(state, batch) -> metrics`` (e.g. :func:`make_eval_step`); run
            under ``torch.no_grad`` over ``eval_batches``. Metrics are averaged with the batches'
            ``num_examples`` as weights (``num_tokens`` for ``loss`` when present; a
            :class:`~functrain.LossSum` value as ``Σ total / Σ count``) and written as
            ``eval/<name>``. A batch of weight 0 (empty) adds nothing, its NaN mean included.
        eval_batches: an iterable of eval batches, read once per evaluation.
        eval_every: evaluate every this many steps; ``None``: at the end of every epoch. There
            is always an evaluation at the end.
        writer: a metric writer, a function ``purge_step -> writer``, or ``None``.
        log_every: write train metrics every this many steps.
        checkpoint_manager: a ``CheckpointManager`` or ``None``.
        checkpoint_every: save every this many steps (``None``: only at the end and on
            Ctrl-C).
        resume: restore the latest checkpoint of ``checkpoint_manager`` if there is one.
        seed: seeds each epoch's ``DataLoader`` shuffling (with the epoch number).
        device: where batches go; default: the device of ``state.params``.
        catch_interrupt: return on Ctrl-C instead of re-raising ``KeyboardInterrupt``.

    Returns:
        A :class:`LoopResult` ``(state, history, interrupted, resumed_from)``.

    Example:
        >>> import torch, functrain as ft
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x = torch.randn(64, 3)
        >>> data = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5])}
        >>> def loss_fn(params, batch):
        ...     return (batch["x"] @ params["w"] - batch["y"]).square().mean()
        >>> tx = ft.inject_hyperparams(ft.sgd)(learning_rate=0.1)
        >>> result = ft.train_loop(
        ...     ft.make_train_step(loss_fn, tx, micro_batches=2),
        ...     ft.TrainState.create(params={"w": torch.zeros(3)}, tx=tx),
        ...     ft.TensorBatches(data, batch_size=16, seed=0),
        ...     epochs=10,
        ...     eval_step=ft.make_eval_step(loss_fn),
        ...     eval_batches=[data],
        ... )
        >>> int(result.state.step), result.history.last("eval/loss") < 1e-3
        (40, True)
        >>> {"train/loss", "train/lr", "train/grad_norm", "train/update_param_ratio",
        ...  "perf/step_time_s", "perf/examples_per_s"} <= set(result.history.tags())
        True
    """
    _check_positive_int("log_every", log_every)
    _check_positive_int("epochs", epochs, allow_zero=True)
    for name, value in (
        ("max_steps", max_steps),
        ("eval_every", eval_every),
        ("checkpoint_every", checkpoint_every),
    ):
        if value is not None:
            _check_positive_int(name, value, allow_zero=name == "max_steps")
    if (eval_step is None) != (eval_batches is None):
        raise ValueError("eval_step and eval_batches go together: give both or neither")
    if not isinstance(state, TrainState):
        raise TypeError(f"train_loop expects a ft.TrainState, got {type(state).__name__}")

    resumed_from = evaluated = None
    position = (0, 0)
    if checkpoint_manager is not None and resume and checkpoint_manager.latest_step() is not None:
        state = checkpoint_manager.restore_latest(target=state)
        resumed_from = checkpoint_manager.restored_step
        position, evaluated = _read_position(checkpoint_manager, resumed_from)
    owns_writer = writer is not None and not _is_writer(writer)
    if owns_writer and not callable(writer):
        raise TypeError(
            "writer must be a metric writer (with write_scalars, e.g. "
            "ft.logging.TensorBoardWriter(logdir)), a function purge_step -> writer, or None; "
            f"got {type(writer).__name__}"
        )
    device = torch.device(device) if device is not None else _device_of(state)
    if owns_writer:
        writer = writer(None if resumed_from is None else resumed_from + 1)
        if not _is_writer(writer):
            raise TypeError(
                f"the writer factory returned {type(writer).__name__}, not a metric writer "
                "(an object with write_scalars, e.g. ft.logging.TensorBoardWriter(logdir, "
                "purge_step=purge_step))"
            )
    run = Run(
        step,
        state,
        writer=writer,
        device=device,
        max_steps=max_steps,
        log_every=log_every,
        eval_step=eval_step,
        eval_batches=eval_batches,
        eval_every=eval_every,
        manager=checkpoint_manager,
        checkpoint_every=checkpoint_every,
        resumed_from=resumed_from,
        resumed_evaluated=evaluated,
    )
    interrupted = completed = False
    try:
        try:
            with run.guard:
                run.train(batches, epochs, position, seed)
            completed = True
        except KeyboardInterrupt:
            interrupted = True
            try:
                run.on_interrupt()
            finally:
                run.finish_writer(owns_writer, suppress_errors=False)
            if run.torn or not catch_interrupt:  # a torn step leaves no state to return
                raise
        finally:
            if not interrupted:
                run.finish_writer(owns_writer, suppress_errors=not completed)
    except BaseException as err:
        # Whatever stops the loop (Ctrl-C, a failing save or flush included) carries the state.
        run.attach_state(err)
        raise
    return LoopResult(run.state, run.history, interrupted, resumed_from)


def _is_writer(writer: Any) -> bool:
    return callable(getattr(writer, "write_scalars", None))


def _check_positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} int, got {value!r}")
