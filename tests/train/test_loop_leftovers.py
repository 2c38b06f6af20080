"""train_loop: each step saved and evaluated once, and no half-written state handed back."""

import collections
import signal

import pytest
import torch

import functrain as ft
from functrain.checkpoint import CheckpointManager, read_metadata
from functrain.logging import TensorBoardWriter, read_scalars
from functrain.train._loop_run import InterruptGuard

N, BATCH = 24, 4  # 6 batches per epoch


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    return {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}


def _loss(params, batch):
    return (batch["x"] @ params["w"] - batch["y"]).square().mean()


def _setup(**kwargs):
    tx = ft.adam(0.1)
    state = ft.TrainState.create(params={"w": torch.zeros(3, dtype=torch.float64)}, tx=tx)
    return ft.make_train_step(_loss, tx, **kwargs), state


def _manual(n_steps, epoch=0):
    """The reference: ``n_steps`` plain step calls over the same batches, no loop."""
    step, state = _setup()
    for batch in list(ft.TensorBatches(_data(), BATCH, seed=1).iter_epoch(epoch))[:n_steps]:
        state, _ = step(state, batch)
    return state


def _unsized(epoch):
    """The same batches as ``TensorBatches(seed=1)``, from a generator (no ``len``)."""
    yield from ft.TensorBatches(_data(), BATCH, seed=1).iter_epoch(epoch)


class SpyManager(CheckpointManager):
    """A real manager that also counts the saves of each step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saves = collections.Counter()

    def save(self, step, state, metrics=None, *, metadata=None):
        self.saves[int(step)] += 1
        return super().save(step, state, metrics, metadata=metadata)


def _position(manager, step):
    meta = read_metadata(manager.path(step))["user"]["train_loop"]
    return meta["epoch"], meta["batch"]


# -- 1. an epoch of unknown length ends on a checkpoint step -------------------------------------


def test_an_unsized_epoch_ending_on_a_checkpoint_step_is_saved_once(tmp_path):
    runs = {}
    for name, batches in (
        ("sized", ft.TensorBatches(_data(), BATCH, seed=1)),
        ("unsized", _unsized),
    ):
        step, state = _setup()
        manager = SpyManager(tmp_path / name, max_to_keep=None)
        result = ft.train_loop(
            step,
            state,
            batches,
            epochs=2,
            eval_step=ft.make_eval_step(_loss),
            eval_batches=[_data()],
            checkpoint_manager=manager,
            checkpoint_every=3,
        )
        runs[name] = (result, manager)
    sized, unsized = runs["sized"][1], runs["unsized"][1]
    assert set(unsized.saves.values()) == {1}, unsized.saves  # each step saved once
    # The same checkpoints, positions and metrics as with a known epoch length (the reference):
    # an epoch's end is recorded as the next epoch's start, with that step's evaluation.
    assert unsized.saves == sized.saves == {3: 1, 6: 1, 9: 1, 12: 1}
    for s in (3, 6, 9, 12):
        assert _position(unsized, s) == _position(sized, s)
        assert unsized.metrics(s) == sized.metrics(s)
    assert _position(unsized, 6) == (1, 0)
    assert "eval/loss" in unsized.metrics(6)
    ft.testing.assert_trees_all_equal(runs["unsized"][0].state, runs["sized"][0].state)


def test_max_steps_inside_an_unsized_epoch_reads_no_batch_beyond_it():
    read = []

    def batches(epoch):
        for batch in _unsized(epoch):
            read.append(epoch)
            yield batch

    step, state = _setup()
    result = ft.train_loop(step, state, batches, epochs=2, max_steps=4)
    assert int(result.state.step) == 4 and read == [0] * 4
    ft.testing.assert_trees_all_equal(result.state, _manual(4))


# -- 2. a second Ctrl-C stops a step halfway -----------------------------------------------------


class HalfWritten:
    """A donating step that, at step ``at``, is stopped halfway through its in-place update.

    It writes into the donated parameter memory, then gets a second Ctrl-C: through the loop's
    own SIGINT handler when it is installed (the first call holds the interrupt, the second
    raises), else as a bare ``KeyboardInterrupt`` (e.g. a foreign SIGINT handler).
    """

    def __init__(self, step, at):
        self.step, self.at, self.calls = step, at, 0
        self.garbage = None

    def __call__(self, state, batch):
        self.calls += 1
        if self.calls == self.at:
            state.params["w"][:1].fill_(1e30)  # the first leaf slice updated, the rest not
            self.garbage = state.params["w"]
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler) and isinstance(getattr(handler, "__self__", None), InterruptGuard):
                handler(signal.SIGINT, None)  # held ...
                handler(signal.SIGINT, None)  # ... and the second one stops at once
            raise KeyboardInterrupt
        return self.step(state, batch)


@pytest.mark.parametrize("catch_interrupt", [False, True])
def test_a_step_stopped_halfway_hands_back_no_state_and_saves_none(tmp_path, catch_interrupt):
    step, state = _setup(fused=True)
    manager = SpyManager(tmp_path, max_to_keep=None)
    half = HalfWritten(step, at=4)
    with pytest.raises(KeyboardInterrupt) as info:
        ft.train_loop(
            half,
            state,
            ft.TensorBatches(_data(), BATCH, seed=1),
            checkpoint_manager=manager,
            checkpoint_every=2,
            catch_interrupt=catch_interrupt,  # nothing whole to return: raised all the same
        )
    assert dict(manager.saves) == {2: 1}  # nothing saved after the half-written step
    assert info.value.train_state is None
    assert any("half" in note and "step 2" in note for note in info.value.__notes__)
    # The last checkpoint is the last whole state.
    restored = manager.restore_latest(target=_setup()[1])
    ft.testing.assert_trees_all_equal(restored, _manual(2))


def test_a_non_donating_step_stopped_halfway_hands_back_its_input(tmp_path):
    step, state = _setup(donate=False)
    with pytest.raises(KeyboardInterrupt) as info:
        ft.train_loop(
            _Pure(step, at=4),
            state,
            ft.TensorBatches(_data(), BATCH, seed=1),
            catch_interrupt=True,
        )
    ft.testing.assert_trees_all_equal(info.value.train_state, _manual(3))


class _Pure:
    """A ``donate=False`` step (declared by ``.donate``) stopped by a Ctrl-C before it returns."""

    def __init__(self, step, at):
        self.step, self.at, self.calls, self.donate = step, at, 0, step.donate

    def __call__(self, state, batch):
        self.calls += 1
        new_state, metrics = self.step(state, batch)
        if self.calls == self.at:
            raise KeyboardInterrupt  # the new state is lost; the input was left alone
        return new_state, metrics


def test_a_reraised_ctrl_c_between_steps_carries_the_state():
    def batches(epoch):
        for i, batch in enumerate(_unsized(epoch)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    step, state = _setup()
    with pytest.raises(KeyboardInterrupt) as info:
        ft.train_loop(step, state, batches)  # no manager: the state would otherwise be lost
    assert state.consumed
    ft.testing.assert_trees_all_equal(info.value.train_state, _manual(3))


def test_a_failing_save_on_ctrl_c_still_carries_the_state(tmp_path):
    class FullDisk(CheckpointManager):
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    def batches(epoch):
        for i, batch in enumerate(_unsized(epoch)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    step, state = _setup()
    with pytest.raises(OSError, match="disk full") as info:
        ft.train_loop(step, state, batches, checkpoint_manager=FullDisk(tmp_path))
    ft.testing.assert_trees_all_equal(info.value.train_state, _manual(3))


def test_a_writer_failing_at_the_final_flush_still_carries_the_state():
    class Writer:
        def write_scalars(self, step, scalars):
            pass

        def flush(self):
            raise OSError("disk full")

    step, state = _setup()
    with pytest.raises(OSError, match="disk full") as info:
        ft.train_loop(step, state, ft.TensorBatches(_data(), BATCH, seed=1), writer=Writer())
    ft.testing.assert_trees_all_equal(info.value.train_state, _manual(6))


# -- 3. a resumed run with nothing left to do ----------------------------------------------------


def _run(tmp_path, batches=None, **kwargs):
    step, state = _setup()
    manager = SpyManager(tmp_path / "ckpt", max_to_keep=None)
    logdir = tmp_path / "tb"
    result = ft.train_loop(
        kwargs.pop("step", step),
        state,
        batches or ft.TensorBatches(_data(), BATCH, seed=1),
        eval_step=ft.make_eval_step(_loss),
        eval_batches=[_data()],
        writer=lambda purge_step: TensorBoardWriter(logdir, purge_step=purge_step),
        checkpoint_manager=manager,
        **kwargs,
    )
    return result, manager, read_scalars(logdir)["."]


@pytest.mark.parametrize("stop", [{"max_steps": 4}, {"epochs": 1}])
def test_a_resumed_run_with_nothing_left_writes_nothing_again(tmp_path, stop):
    first, first_manager, _ = _run(tmp_path, **stop)
    last = int(first.state.step)
    assert dict(first_manager.saves) == {last: 1}
    again, manager, curves = _run(tmp_path, **stop)
    assert again.resumed_from == last and not manager.saves  # no checkpoint written again
    assert curves["eval/loss"][0] == [last]  # one final evaluation, not one per run
    assert curves["train/loss"][0] == list(range(1, last + 1))


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="needs Python's default SIGINT handler (the loop installs its own over it)",
)
def test_a_resumed_run_evaluates_the_step_a_ctrl_c_left_unevaluated(tmp_path):
    step, _ = _setup()

    def held_at_last(state, batch):  # a Ctrl-C held during step 4: logged and saved, no eval
        if int(state.step) == 3:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        return step(state, batch)

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, step=held_at_last, max_steps=4)
    assert "eval/loss" not in read_scalars(tmp_path / "tb")["."]
    _, manager, curves = _run(tmp_path, max_steps=4)
    assert not manager.saves
    assert curves["eval/loss"][0] == [4]  # the final evaluation, written once, on resume


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="needs Python's default SIGINT handler (the loop installs its own over it)",
)
def test_an_evaluation_a_held_ctrl_c_skipped_is_made_on_resume(tmp_path):
    step, _ = _setup()

    def held_at_4(state, batch):  # a Ctrl-C held during step 4, an eval step
        if int(state.step) == 3:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        return step(state, batch)

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, step=held_at_4, eval_every=2)
    again, _, curves = _run(tmp_path, eval_every=2)
    assert again.resumed_from == 4
    assert curves["eval/loss"][0] == [2, 4, 6]  # each eval step once, none lost


def test_a_data_error_after_a_checkpoint_step_of_an_unsized_epoch_keeps_that_checkpoint(tmp_path):
    def batches(epoch):
        for i, batch in enumerate(_unsized(epoch)):
            if i == 3:
                raise OSError("shard 3 unreadable")
            yield batch

    step, state = _setup()
    manager = SpyManager(tmp_path, max_to_keep=None)
    with pytest.raises(OSError, match="shard 3"):
        ft.train_loop(step, state, batches, checkpoint_manager=manager, checkpoint_every=3)
    assert dict(manager.saves) == {3: 1} and _position(manager, 3) == (0, 3)
    ft.testing.assert_trees_all_equal(manager.restore(3, target=_setup()[1]), _manual(3))
