"""train_loop under failure: errors keep the trained state, bad metrics and arguments are named."""

import pytest
import torch

import functrain as ft
from functrain.checkpoint import CheckpointManager

N, BATCH = 24, 4  # 6 batches per epoch


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    return {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}


def _loss(params, batch):
    return (batch["x"] @ params["w"] - batch["y"]).square().mean()


def _setup(loss_fn=_loss):
    tx = ft.adam(0.1)
    state = ft.TrainState.create(params={"w": torch.zeros(3, dtype=torch.float64)}, tx=tx)
    return ft.make_train_step(loss_fn, tx), state


def _manual(n_steps):
    """The reference: ``n_steps`` plain step calls over the same batches, no loop."""
    step, state = _setup()
    batches = list(ft.TensorBatches(_data(), BATCH, seed=1).iter_epoch(0))
    for batch in batches[:n_steps]:
        state, _ = step(state, batch)
    return state


def test_an_error_in_the_batch_iterator_hands_back_the_last_state():
    step, state = _setup()

    def batches(epoch):
        for i, batch in enumerate(ft.TensorBatches(_data(), BATCH, seed=1).iter_epoch(epoch)):
            if i == 4:
                raise OSError("shard 4 unreadable")
            yield batch

    with pytest.raises(OSError, match="shard 4") as info:
        ft.train_loop(step, state, batches)
    assert state.consumed  # the caller's own state is gone (donated at step 1) ...
    recovered = info.value.train_state  # ... but the trained one comes with the error
    assert int(recovered.step) == 4 and not recovered.consumed
    ft.testing.assert_trees_all_equal(recovered, _manual(4))
    assert any("train_state" in note for note in info.value.__notes__)


def test_an_error_inside_a_step_hands_back_that_steps_intact_input():
    calls = {"n": 0}

    def flaky(params, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("loss blew up")
        return _loss(params, batch)

    step, state = _setup(flaky)
    with pytest.raises(RuntimeError, match="loss blew up") as info:
        ft.train_loop(step, state, ft.TensorBatches(_data(), BATCH, seed=1))
    recovered = info.value.train_state
    assert int(recovered.step) == 2 and not recovered.consumed
    ft.testing.assert_trees_all_equal(recovered, _manual(2))
    # Still usable: the step continues from it.
    step(recovered, next(iter(ft.TensorBatches(_data(), BATCH, seed=1))))


def test_a_failing_writer_hands_back_the_state_and_saves_no_checkpoint(tmp_path):
    class FailingWriter:
        def write_scalars(self, step, scalars):
            if step == 3:
                raise OSError("disk full")

        def flush(self):
            pass

    step, state = _setup()
    manager = CheckpointManager(tmp_path)
    with pytest.raises(OSError, match="disk full") as info:
        ft.train_loop(
            step,
            state,
            ft.TensorBatches(_data(), BATCH, seed=1),
            writer=FailingWriter(),
            checkpoint_manager=manager,
        )
    ft.testing.assert_trees_all_equal(info.value.train_state, _manual(3))
    assert manager.all_steps() == []  # checkpoints stay as documented: none on errors


def test_eval_batches_that_run_dry_are_named_not_skipped():
    step, state = _setup()
    data = _data()
    with pytest.raises(ValueError, match="eval_batches yielded no batch") as info:
        ft.train_loop(
            step,
            state,
            ft.TensorBatches(data, BATCH, seed=1),
            epochs=2,
            eval_step=ft.make_eval_step(_loss),
            eval_batches=(b for b in [data]),  # one-shot: empty at the second evaluation
        )
    assert int(info.value.train_state.step) == 12


def test_non_scalar_metrics_are_named():
    step, state = _setup()

    def with_vector(s, batch):
        s, metrics = step(s, batch)
        return s, {**metrics, "per_class": torch.ones(3)}

    with pytest.raises(ValueError, match=r"'train/per_class' has shape \(3,\)"):
        ft.train_loop(with_vector, state, [_data()])

    def eval_vector(s, batch):
        return {"loss": _loss(s.params, batch), "per_class": torch.ones(3)}

    step, state = _setup()
    with pytest.raises(ValueError, match=r"'eval/per_class' has shape \(3,\)"):
        ft.train_loop(step, state, [_data()], eval_step=eval_vector, eval_batches=[_data()])


def test_a_step_that_does_not_return_state_and_metrics_is_named():
    step, state = _setup()
    with pytest.raises(TypeError, match=r"step must return \(new_state, metrics\)"):
        ft.train_loop(lambda s, b: step(s, b)[0], state, [_data()])


def test_a_writer_that_is_neither_a_writer_nor_a_factory_is_named_before_training():
    step, state = _setup()
    with pytest.raises(TypeError, match="writer must be"):
        ft.train_loop(step, state, [_data()], writer="runs/exp1")
    assert not state.consumed

    with pytest.raises(TypeError, match="writer factory returned str"):
        ft.train_loop(step, state, [_data()], writer=lambda purge_step: "runs/exp1")
    assert not state.consumed


@pytest.mark.parametrize("max_steps", [0, 1])
def test_max_steps_zero_and_one(max_steps, tmp_path):
    step, state = _setup()
    manager = CheckpointManager(tmp_path)
    result = ft.train_loop(
        step,
        state,
        ft.TensorBatches(_data(), BATCH, seed=1),
        max_steps=max_steps,
        checkpoint_manager=manager,
    )
    assert int(result.state.step) == max_steps
    ft.testing.assert_trees_all_equal(result.state, _manual(max_steps))
    assert manager.all_steps() == [max_steps]
    # Resuming past max_steps takes no step and saves nothing new.
    again = ft.train_loop(
        step,
        result.state,
        ft.TensorBatches(_data(), BATCH, seed=1),
        max_steps=max_steps,
        checkpoint_manager=manager,
    )
    assert again.resumed_from == max_steps and int(again.state.step) == max_steps
