"""train_loop with ``batches`` a function ``epoch -> DataLoader``: the loader it returns is
reseeded, has its sampler's epoch set and is warned about like a DataLoader given directly, so
that a resumed run sees the data order of an uninterrupted one; a seed the function chose
itself is kept."""

import pytest
import torch
from loop_order import BATCH, EPOCHS, N, Recorder, fresh_state, make_dataset, stop_and_resume
from torch.utils.data import DataLoader, DistributedSampler

import functrain as ft


def _epochs(seen):
    return [[i for ids in seen[k : k + 3] for i in ids] for k in range(0, len(seen), 3)]


# Each maker stands for a script: called once per process, it returns the ``batches`` function.
def _fresh_unseeded_generator(dataset):
    return lambda epoch: DataLoader(dataset, BATCH, shuffle=True, generator=torch.Generator())


def _one_loader_reused(dataset):
    loader = DataLoader(dataset, BATCH, shuffle=True, generator=torch.Generator())
    return lambda epoch: loader


def _generator_seeded_once(dataset):
    g = torch.Generator().manual_seed(7)  # shared by every epoch: its stream continues
    return lambda epoch: DataLoader(dataset, BATCH, shuffle=True, generator=g)


def _seeded_loader_reused(dataset):
    loader = DataLoader(dataset, BATCH, shuffle=True, generator=torch.Generator().manual_seed(7))
    return lambda epoch: loader


def _seeded_by_the_function(dataset):
    def batches(epoch):
        return DataLoader(
            dataset, BATCH, shuffle=True, generator=torch.Generator().manual_seed(100 + epoch)
        )

    return batches


def _distributed(dataset):
    def batches(epoch):
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=1)
        return DataLoader(dataset, BATCH, sampler=sampler)

    return batches


MAKERS = [
    _fresh_unseeded_generator,
    _one_loader_reused,
    _seeded_by_the_function,
    _distributed,
]


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("stop", [3, 4])  # at an epoch's end, one batch into the next
def test_a_resumed_run_sees_the_uninterrupted_data_order(tmp_path, make, stop):
    dataset = make_dataset()
    whole = Recorder()
    ft.train_loop(whole, fresh_state(), make(dataset), epochs=EPOCHS)
    epochs = _epochs(whole.seen)
    for order in epochs:  # every epoch is a permutation of the data ...
        assert sorted(order) == list(range(N))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # ... reshuffled each epoch

    seen, _ = stop_and_resume(make, dataset, stop, tmp_path)
    assert seen == whole.seen  # the same batches, in the same order


def test_a_generator_the_function_seeded_keeps_its_seed():
    # The reference: torch's own loader over that generator, iterated outside train_loop.
    dataset = make_dataset()
    recorder = Recorder()
    ft.train_loop(recorder, fresh_state(), _seeded_by_the_function(dataset), epochs=EPOCHS)
    for epoch, order in enumerate(_epochs(recorder.seen)):
        gen = torch.Generator().manual_seed(100 + epoch)
        expected = [
            int(i) for _, _, idx in DataLoader(dataset, BATCH, True, generator=gen) for i in idx
        ]
        assert order == expected


def test_a_distributed_sampler_gets_the_epoch():
    dataset = make_dataset()
    epochs_set: list[int] = []
    make = _distributed(dataset)

    def batches(epoch):
        loader = make(epoch)
        original = loader.sampler.set_epoch

        def set_epoch(e):
            epochs_set.append(e)
            original(e)

        loader.sampler.set_epoch = set_epoch
        return loader

    recorder = Recorder()
    ft.train_loop(recorder, fresh_state(), batches, epochs=EPOCHS)
    assert epochs_set == [0, 1, 2]
    # DistributedSampler's documented order: randperm seeded with seed + epoch.
    for epoch, order in enumerate(_epochs(recorder.seen)):
        expected = torch.randperm(N, generator=torch.Generator().manual_seed(1 + epoch))
        assert order == expected.tolist()


def test_an_unseeded_shuffling_loader_from_a_function_warns():
    dataset = make_dataset()
    with pytest.warns(UserWarning, match="global random generator"):
        ft.train_loop(
            Recorder(),
            fresh_state(),
            lambda epoch: DataLoader(dataset, BATCH, shuffle=True),
            max_steps=1,
        )


@pytest.mark.parametrize("make", [_generator_seeded_once, _seeded_loader_reused])
def test_a_generator_seeded_once_and_shared_by_every_epoch_warns(make):
    # Its stream continues from epoch to epoch (the function's choice, kept), which a resumed
    # process restarts from the seed: the order would differ, so the loop says so.
    dataset = make_dataset()
    recorder = Recorder()
    with pytest.warns(UserWarning, match="seeded once"):
        ft.train_loop(recorder, fresh_state(), make(dataset), epochs=2)
    epochs = _epochs(recorder.seen)
    gen = torch.Generator().manual_seed(7)  # the function's seed is kept: torch's order
    loader = DataLoader(dataset, BATCH, shuffle=True, generator=gen)
    assert epochs[0] == [int(i) for _, _, idx in loader for i in idx]
    assert sorted(epochs[1]) == list(range(N)) and epochs[1] != epochs[0]
