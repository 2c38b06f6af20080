"""``MicroBatchStreams``: the eager step's integer shortcut equals ``fold_in`` and ``seeded_rng``."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain.train import rng


@given(st.integers(-(2**63), 2**63 - 1), st.integers(0, 1000))
def test_keys_and_seeds_equal_fold_in(raw, i):
    key = torch.tensor(raw, dtype=torch.int64)
    streams = rng.MicroBatchStreams(key, True, [torch.device("cpu")])
    expected = ft.fold_in(key, i + 1)
    assert torch.equal(streams.key(i), expected) and streams.key(i).dtype == torch.int64
    with streams.seeding(i):
        got = torch.rand(3)
    with ft.seeded_rng(expected):
        want = torch.rand(3)
    assert torch.equal(got, want)


def test_without_seeding_the_global_generator_is_left_alone():
    streams = rng.MicroBatchStreams(ft.random_key(1), False, [])
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with streams.seeding(0):
        assert torch.equal(torch.get_rng_state(), before)


def test_a_step_hands_each_micro_batch_fold_in_of_its_key():
    seen = []

    def loss_fn(p, b, key):
        seen.append(key.clone())
        return (p["w"] * b).sum()

    state = ft.TrainState.create(params={"w": torch.ones(2)}, tx=ft.sgd(0.1), seed=7)
    key = state.key.clone()
    step = ft.make_train_step(loss_fn, ft.sgd(0.1), micro_batches=3)
    step(state, torch.ones(3, 2))
    assert [int(k) for k in seen] == [int(ft.fold_in(key, i + 1)) for i in range(3)]
