"""train_loop, third review: the data order of a DataLoader whose shuffling lives in a
``batch_sampler``, across resumes, against a hand-written float64 loop; an epoch-end
evaluation lost at resume."""

import signal

import pytest
import torch
from loop_order import (
    BATCH,
    EPOCHS,
    LR,
    N,
    Recorder,
    fresh_state,
    loss,
    make_dataset,
    stop_and_resume,
)
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

import functrain as ft
from functrain.checkpoint import CheckpointManager
from functrain.logging import TensorBoardWriter, read_scalars


def _reference(dataset, seen):
    """Plain float64 SGD on the mean squared error over the batches in ``seen`` (by id)."""
    x, y, _ = dataset.tensors
    w = torch.zeros(3, dtype=torch.float64)
    for ids in seen:
        xb, yb = x[ids], y[ids]
        w = w - LR * 2.0 / len(ids) * xb.T @ (xb @ w - yb)
    return w


def _random_batches(dataset):
    # A script's own seeded sampler, made fresh in every process (as a resumed script does).
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(1))
    return DataLoader(dataset, batch_sampler=BatchSampler(sampler, BATCH, drop_last=False))


def _distributed_batches(dataset):
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=1)
    return DataLoader(dataset, batch_sampler=BatchSampler(sampler, BATCH, drop_last=False))


@pytest.mark.parametrize("make", [_random_batches, _distributed_batches])
@pytest.mark.parametrize("stop", [3, 4, 6])  # at an epoch's end, one batch into the next, ...
def test_a_batch_sampler_resumes_bit_for_bit(tmp_path, make, stop):
    dataset = make_dataset()
    whole = Recorder()
    uninterrupted = ft.train_loop(whole, fresh_state(), make(dataset), epochs=EPOCHS)
    epochs = [whole.seen[i : i + 3] for i in range(0, 3 * EPOCHS, 3)]
    for order in epochs:  # every epoch is a permutation of the data ...
        assert sorted(i for ids in order for i in ids) == list(range(N))
    assert epochs[0] != epochs[1] != epochs[2]  # ... reshuffled each epoch
    ref = _reference(dataset, whole.seen)
    torch.testing.assert_close(uninterrupted.state.params["w"], ref, rtol=1e-12, atol=1e-12)

    seen, resumed = stop_and_resume(make, dataset, stop, tmp_path)
    assert seen == whole.seen  # the same batches, in the same order
    ft.testing.assert_trees_all_equal(resumed.state.params, uninterrupted.state.params)


def test_a_batch_sampler_over_an_unseeded_random_sampler_warns():
    dataset = make_dataset()
    loader = DataLoader(dataset, batch_sampler=BatchSampler(RandomSampler(dataset), BATCH, False))
    with pytest.warns(UserWarning, match="global random generator"):
        ft.train_loop(Recorder(), fresh_state(), loader, max_steps=1)


def test_an_unseeded_random_sampler_warns_although_the_loader_has_a_generator():
    # The loader's generator seeds only its workers; RandomSampler(generator=None) draws its
    # order from the global random generator.
    dataset = make_dataset()
    loader = DataLoader(
        dataset, batch_size=BATCH, sampler=RandomSampler(dataset), generator=torch.Generator()
    )
    with pytest.warns(UserWarning, match="global random generator"):
        ft.train_loop(Recorder(), fresh_state(), loader, max_steps=1)


# -- an epoch-end evaluation that a held Ctrl-C skipped, in an unsized epoch --------------------


def _unsized(epoch):
    """Three batches per epoch from a generator (no ``len``): the loop reads one ahead."""
    x, y, _ = make_dataset().tensors
    order = torch.randperm(N, generator=torch.Generator().manual_seed(epoch))
    for i in range(0, N, BATCH):
        ids = order[i : i + BATCH]
        yield {"x": x[ids], "y": y[ids]}


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="needs Python's default SIGINT handler (the loop installs its own over it)",
)
def test_an_unsized_epoch_end_evaluation_a_held_ctrl_c_skipped_is_made_on_resume(tmp_path):
    step = ft.make_train_step(loss, ft.sgd(LR))

    def held_at_3(state, batch):  # a Ctrl-C held during step 3, epoch 0's last one
        if int(state.step) == 2:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        return step(state, batch)

    x, y, _ = make_dataset().tensors
    logdir, manager = tmp_path / "tb", CheckpointManager(tmp_path / "ckpt")

    def run(train_step):
        return ft.train_loop(
            train_step,
            fresh_state(),
            _unsized,
            epochs=2,
            eval_step=ft.make_eval_step(loss),
            eval_batches=[{"x": x, "y": y}],
            writer=lambda purge_step: TensorBoardWriter(logdir, purge_step=purge_step),
            checkpoint_manager=manager,
        )

    with pytest.raises(KeyboardInterrupt):
        run(held_at_3)
    assert "eval/loss" not in read_scalars(logdir)["."]
    resumed = run(step)
    assert resumed.resumed_from == 3
    steps, values = read_scalars(logdir)["."]["eval/loss"]
    assert steps == [3, 6]  # each epoch's end evaluated once, none lost
    # The float64 reference: plain SGD over epoch 0's batches, then the full-data mean.
    w = torch.zeros(3, dtype=torch.float64)
    for b in _unsized(0):
        w = w - LR * 2.0 / BATCH * b["x"].T @ (b["x"] @ w - b["y"])
    assert values[0] == pytest.approx((x @ w - y).square().mean().item(), rel=1e-6)


def test_a_poisson_batch_sampler_resumes_bit_for_bit(tmp_path):
    # PoissonSampler continues its generator's stream, so a fresh process (a freshly seeded
    # generator) drew other batches for the epochs after the first unless the loop reseeds it.
    dataset = make_dataset()

    def make(_dataset):
        sampler = ft.PoissonSampler(N, 0.5, generator=torch.Generator().manual_seed(1))
        return DataLoader(dataset, batch_sampler=sampler)

    whole = Recorder()
    uninterrupted = ft.train_loop(whole, fresh_state(), make(dataset), epochs=EPOCHS)
    manager = CheckpointManager(tmp_path)
    first, second = Recorder(), Recorder()
    ft.train_loop(
        first, fresh_state(), make(dataset), epochs=EPOCHS, max_steps=5, checkpoint_manager=manager
    )
    resumed = ft.train_loop(
        second, fresh_state(), make(dataset), epochs=EPOCHS, checkpoint_manager=manager
    )
    assert len(whole.seen) == 2 * EPOCHS and all(whole.seen)  # no empty batch: a finite loss
    assert first.seen + second.seen == whole.seen
    ft.testing.assert_trees_all_equal(resumed.state.params, uninterrupted.state.params)
    torch.testing.assert_close(
        uninterrupted.state.params["w"], _reference(dataset, whole.seen), rtol=1e-12, atol=1e-12
    )
