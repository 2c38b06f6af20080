"""train_loop reads each epoch's iterator as a ``for`` loop does: ``len()`` batches, then the
``next`` that raises ``StopIteration``. A ``RandomSampler`` draws its remainder permutation at
that ``next`` (even an empty one), so a generator shared across epochs that the loop does not
reseed must be left where a plain ``for epoch: for batch in loader:`` loop leaves it, else every
later epoch's order differs from the user's classic loop with the same seed."""

import pytest
import torch
from loop_order import Recorder, fresh_state
from torch.utils.data import DataLoader, Sampler, TensorDataset

import functrain as ft
from functrain.checkpoint import CheckpointManager

BATCH, EPOCHS = 4, 3
SIZES = [12, 10]  # divisible by the batch size, and not
DROP_LAST = [False, True]


def _dataset(n: int) -> TensorDataset:
    """``(x, y, id)`` rows of a noiseless linear problem in float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return TensorDataset(
        x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.arange(n)
    )


class Wrapped:
    """A user's iterable around a DataLoader: sized, but not a DataLoader, so the loop does
    not reseed the generator inside (its stream continues from epoch to epoch)."""

    def __init__(self, loader: DataLoader, length: int | None = None) -> None:
        self.loader = loader
        self.length = len(loader) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return iter(self.loader)


class EpochSampler(Sampler[int]):
    """A DistributedSampler-like sampler with ``set_epoch`` whose generator (``rng``, which the
    loop cannot see) lives across epochs and draws once more when its iterator runs out."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.epochs_set: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epochs_set.append(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        yield from torch.randperm(self.n, generator=self.rng).roll(self.epoch).tolist()
        torch.randperm(self.n, generator=self.rng)  # like RandomSampler's remainder draw


def _shuffled(n: int, drop_last: bool) -> tuple[DataLoader, torch.Generator]:
    gen = torch.Generator().manual_seed(7)
    dataset = _dataset(n)
    return DataLoader(dataset, BATCH, shuffle=True, generator=gen, drop_last=drop_last), gen


def _plain(loader, epochs: int = EPOCHS, max_steps: int | None = None, sampler=None):
    """The reference: the batches' ids of a classic nested ``for`` loop."""
    seen: list[list[int]] = []
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for _, _, idx in loader:
            seen.append(idx.tolist())
            if len(seen) == max_steps:
                break
        if len(seen) == max_steps:
            break
    return seen


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("drop_last", DROP_LAST)
def test_a_shared_seeded_generator_gives_the_plain_loops_order(n, drop_last):
    loader, gen = _shuffled(n, drop_last)
    recorder = Recorder()
    ft.train_loop(recorder, fresh_state(), Wrapped(loader), epochs=EPOCHS)

    ref_loader, ref_gen = _shuffled(n, drop_last)
    expected = _plain(ref_loader)
    assert len(expected) == EPOCHS * len(ref_loader)
    assert recorder.seen == expected
    assert torch.equal(gen.get_state(), ref_gen.get_state())  # left where the loop leaves it


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("drop_last", DROP_LAST)
def test_a_function_returning_a_loader_seeded_once_gives_the_plain_loops_order(n, drop_last):
    loader, _ = _shuffled(n, drop_last)
    recorder = Recorder()
    with pytest.warns(UserWarning, match="seeded once"):  # its stream is kept, and warned about
        ft.train_loop(recorder, fresh_state(), lambda epoch: loader, epochs=EPOCHS)
    assert recorder.seen == _plain(_shuffled(n, drop_last)[0])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("drop_last", DROP_LAST)
def test_a_sampler_with_set_epoch_gives_the_plain_loops_order(n, drop_last):
    sampler = EpochSampler(n, seed=3)
    loader = DataLoader(_dataset(n), BATCH, sampler=sampler, drop_last=drop_last)
    recorder = Recorder()
    ft.train_loop(recorder, fresh_state(), loader, epochs=EPOCHS)
    assert sampler.epochs_set == [0, 1, 2]  # the loop calls set_epoch

    ref_sampler = EpochSampler(n, seed=3)
    ref = DataLoader(_dataset(n), BATCH, sampler=ref_sampler, drop_last=drop_last)
    assert recorder.seen == _plain(ref, sampler=ref_sampler)
    assert torch.equal(sampler.rng.get_state(), ref_sampler.rng.get_state())


@pytest.mark.parametrize("max_steps", [3, 4])  # at the first epoch's end, one batch into the next
def test_max_steps_reads_no_further_than_a_loop_that_breaks(max_steps):
    loader, gen = _shuffled(12, drop_last=False)
    recorder = Recorder()
    ft.train_loop(recorder, fresh_state(), Wrapped(loader), epochs=EPOCHS, max_steps=max_steps)

    ref_loader, ref_gen = _shuffled(12, drop_last=False)
    assert recorder.seen == _plain(ref_loader, max_steps=max_steps)
    assert torch.equal(gen.get_state(), ref_gen.get_state())


def test_a_resume_that_skips_a_whole_epoch_ends_it_as_a_for_loop_does(tmp_path):
    # A checkpoint saved outside train_loop has no data position: the loop skips `step`
    # batches from epoch 0's start, here all of epoch 0 and one batch of epoch 1.
    n, stop = 12, 4
    first = ft.train_loop(Recorder(), fresh_state(), [_plain_batch(n)] * stop).state
    manager = CheckpointManager(tmp_path)
    manager.save(stop, first)

    sampler = EpochSampler(n, seed=3)
    recorder = Recorder()
    resumed = ft.train_loop(
        recorder,
        fresh_state(),
        DataLoader(_dataset(n), BATCH, sampler=sampler),
        epochs=EPOCHS,
        checkpoint_manager=manager,
    )
    assert resumed.resumed_from == stop
    ref_sampler = EpochSampler(n, seed=3)
    expected = _plain(DataLoader(_dataset(n), BATCH, sampler=ref_sampler), sampler=ref_sampler)
    assert recorder.seen == expected[stop:]


def _plain_batch(n: int):
    x, y, idx = _dataset(n).tensors
    return x, y, idx


@pytest.mark.parametrize("length", [2, 5])  # shorter and longer than the 3 batches it yields
def test_a_wrong_len_still_bounds_the_epoch(length):
    loader, _ = _shuffled(12, drop_last=False)
    recorder = Recorder()
    if length < 3:  # the batch read to end each epoch is dropped, and said so
        with pytest.warns(UserWarning, match=r"more than its len\(\) = 2 batches"):
            result = ft.train_loop(recorder, fresh_state(), Wrapped(loader, length), epochs=EPOCHS)
    else:
        result = ft.train_loop(recorder, fresh_state(), Wrapped(loader, length), epochs=EPOCHS)
    per_epoch = min(length, 3)
    assert int(result.state.step) == EPOCHS * per_epoch
    assert all(len(ids) == BATCH for ids in recorder.seen)


def test_an_endless_iterable_with_a_len_is_not_drained():
    class Endless:
        def __len__(self) -> int:
            return 2

        def __iter__(self):
            x, y, idx = _plain_batch(BATCH)
            while True:
                yield x, y, idx

    with pytest.warns(UserWarning, match="not trained on"):
        result = ft.train_loop(Recorder(), fresh_state(), Endless(), epochs=EPOCHS)
    assert int(result.state.step) == EPOCHS * 2


def test_an_error_at_the_epochs_end_comes_after_the_last_steps_checkpoint(tmp_path):
    class Failing:
        def __len__(self) -> int:
            return 3

        def __iter__(self):
            x, y, idx = _plain_batch(BATCH)
            yield from [(x, y, idx)] * 3
            raise RuntimeError("broken shard")  # at the next that should end the epoch

    manager = CheckpointManager(tmp_path)
    with pytest.raises(RuntimeError, match="broken shard") as info:
        ft.train_loop(
            Recorder(), fresh_state(), Failing(), checkpoint_manager=manager, checkpoint_every=1
        )
    assert int(info.value.train_state.step) == 3
    assert manager.all_steps() == [1, 2, 3]
