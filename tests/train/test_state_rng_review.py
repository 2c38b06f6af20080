"""Review of TrainState and random keys: argument checks, copies, scoped seeding, pytree use.

Expected keys come from a pure-Python SplitMix64 written here, never from the code under test.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix_ref(z: int) -> int:
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _state(**kw) -> ft.TrainState:
    return ft.TrainState.create(params={"w": torch.ones(3)}, tx=ft.adam(1e-3), **kw)


# --- seeds and keys -------------------------------------------------------------------------


def test_create_and_random_key_accept_numpy_integer_seeds():
    for seed in (np.int64(3), np.uint64(2**64 - 1), np.int32(-7)):
        expected = _mix_ref(int(seed))
        assert ft.key_seed(ft.random_key(seed)) == expected
        assert ft.key_seed(_state(seed=seed).key) == expected
    for bad in (True, 1.0, torch.tensor(3)):
        with pytest.raises(TypeError, match="seed must be an int"):
            _state(seed=bad)


def test_keys_must_be_0d():
    with pytest.raises(ValueError, match=r"0-d tensor.*shape \(1,\)"):
        _state(key=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"0-d tensor.*shape \(2,\)"):
        ft.fold_in(torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError, match="0-d tensor"):
        ft.key_seed(torch.zeros(1, 1, dtype=torch.int64))
    # An element of a split is a valid key.
    key = ft.split_key(ft.random_key(0), 2)[1]
    assert ft.key_seed(_state(key=key).key) == _mix_ref(_mix_ref(0) + 2 * GOLDEN)


def test_fold_in_refuses_non_integer_data():
    key = ft.random_key(4)
    for bad in (1.7, 1.0, True, "1"):
        with pytest.raises(TypeError, match="fold_in data must be an int"):
            ft.fold_in(key, bad)
    ref = _mix_ref(_mix_ref(4) + GOLDEN * 8)
    assert ft.key_seed(ft.fold_in(key, np.int64(7))) == ref
    assert ft.key_seed(ft.fold_in(key, torch.tensor(7))) == ref


def test_split_key_refuses_negative_and_non_integer_num():
    key = ft.random_key(0)
    with pytest.raises(ValueError, match="split_key num must be non-negative, got -1"):
        ft.split_key(key, -1)
    with pytest.raises(TypeError, match="split_key num must be an int"):
        ft.split_key(key, 2.0)
    assert ft.split_key(key, 0).shape == (0,)


@given(
    seed=st.integers(min_value=-(2**70), max_value=2**70),
    base=st.integers(min_value=0, max_value=2**40),
)
def test_fold_in_nearby_streams_are_distinct_and_leave_the_key_alone(seed, base):
    key = ft.random_key(seed)
    before = key.clone()
    derived = [ft.key_seed(ft.fold_in(key, base + i)) for i in range(8)]
    assert derived == [_mix_ref(_mix_ref(seed) + GOLDEN * (base + i + 1)) for i in range(8)]
    assert len(set(derived)) == 8 and ft.key_seed(key) not in derived
    assert torch.equal(key, before)


# --- seeded_rng -------------------------------------------------------------------------------


def test_seeded_rng_restores_the_cpu_generator_on_errors_and_when_nested():
    torch.manual_seed(7)
    torch.randn(1)  # leaves a cached normal sample in the generator state
    state = torch.get_rng_state()
    expected = torch.randn(5)
    torch.set_rng_state(state)
    with pytest.raises(KeyError):
        with ft.seeded_rng(ft.random_key(1)):
            outer = torch.rand(3)
            with ft.seeded_rng(ft.random_key(2)):
                torch.randn(1)
            # The inner block restored the outer stream where it stood.
            after_inner = torch.rand(3)
            raise KeyError("inside")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.randn(5), expected)
    with ft.seeded_rng(ft.random_key(1)):
        assert torch.equal(torch.rand(3), outer) and torch.equal(torch.rand(3), after_inner)


class _FakeGenerator:
    def __init__(self) -> None:
        self.seeds: list[int] = []

    def manual_seed(self, seed: int) -> _FakeGenerator:
        self.seeds.append(seed)
        return self


def test_seeded_rng_seeds_the_current_cuda_device_for_an_unindexed_cuda(monkeypatch):
    # No GPU here: CUDA's generators and their state calls are stood in for, the CPU part is real.
    saved: list[int] = []
    restored: list[tuple[int, int]] = []

    def get_rng_state(index):
        saved.append(index)
        return torch.tensor([100 + index])

    gens = (_FakeGenerator(), _FakeGenerator(), _FakeGenerator())
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, index: restored.append((int(state), index))
    )
    monkeypatch.setattr(torch.cuda, "default_generators", gens)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    key = ft.random_key(5)
    with ft.seeded_rng(key, [torch.device("cuda")]):
        assert restored == []
    assert saved == [1] and restored == [(101, 1)]  # device 1's own state comes back
    assert [g.seeds for g in gens] == [[], [_mix_ref(5)], []]
    with ft.seeded_rng(key, ["cpu", "cuda:2", torch.device("meta")]):
        pass
    assert saved[-1] == 2 and restored[-1] == (102, 2)
    assert [g.seeds for g in gens] == [[], [_mix_ref(5)], [_mix_ref(5)]]


def test_a_failing_step_leaves_the_global_generator_alone():
    def loss(params, batch):
        torch.nn.functional.dropout(batch, 0.5)
        raise ValueError("bad batch")

    torch.manual_seed(3)
    before = torch.get_rng_state()
    step = ft.make_train_step(loss, ft.adam(1e-3), donate=False)
    with pytest.raises(ValueError, match="bad batch"):
        step(_state(seed=1), torch.ones(4))
    assert torch.equal(torch.get_rng_state(), before)


# --- TrainState.create -------------------------------------------------------------------------


def test_create_copies_the_key_unless_copy_is_false():
    key = ft.random_key(9)
    owned = _state(key=key)
    shared = _state(key=key, copy=False)
    key.add_(1)  # the caller reuses its tensor
    assert ft.key_seed(owned.key) == _mix_ref(9)
    assert shared.key is key


def test_create_names_tx_init_as_the_source_of_its_errors():
    def init(params):
        raise ValueError("unsupported leaf")

    tx = ft.GradientTransformation(init, lambda u, s, p=None: (u, s))
    with pytest.raises(ValueError, match="unsupported leaf") as info:
        ft.TrainState.create(params={"w": torch.ones(1)}, tx=tx)
    assert "raised by tx.init(params) in TrainState.create" in info.value.__notes__


# --- TrainState.replace ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"step": 5}, TypeError, r"step must be a 0-d int64 tensor, got int"),
        ({"step": torch.tensor(5.0)}, TypeError, r"got a torch.float32 tensor of shape \(\)"),
        ({"step": torch.zeros(1, dtype=torch.int64)}, TypeError, r"shape \(1,\)"),
        ({"key": torch.tensor(1.0)}, TypeError, "random key must be an int64 tensor"),
        ({"key": torch.tensor([1, 2])}, ValueError, "0-d tensor"),
        ({"params": {"w": 1.0}}, TypeError, r"params\['w'\] must be a tensor"),
        ({"params": {"w": torch.ones(2, dtype=torch.int64)}}, TypeError, "floating-point"),
        ({"params": {"w": torch.ones(2, requires_grad=True)}}, ValueError, r"\['w'\] requires"),
        ({"buffers": {"m": [1]}}, TypeError, r"buffers\['m'\]\[0\] must be a tensor"),
        ({"extra": [1]}, TypeError, "extra must be a dict, got list"),
    ],
)
def test_replace_checks_the_values_it_is_given(changes, error, match):
    state = _state()
    with pytest.raises(error, match=match):
        state.replace(**changes)


def test_replace_keeps_accepting_valid_values_and_shares_the_rest():
    state = _state(buffers={"m": torch.zeros(2)})
    new = state.replace(key=None, buffers=None, extra=None, step=state.step + 1)
    assert new.key is None and new.buffers is None and new.extra == {} and int(new.step) == 1
    assert new.params is state.params and new.opt_state is state.opt_state
    assert state.replace(params={"w": torch.zeros(3, dtype=torch.bfloat16)}).params["w"].dtype == (
        torch.bfloat16
    )


# --- the state as a value ----------------------------------------------------------------------


def test_state_round_trips_through_pytrees_deepcopy_and_pickle():
    shared = torch.arange(3.0)
    state = ft.TrainState(
        torch.tensor(4), {"a": shared, "b": shared}, (), None, None, {"ema": shared}
    )
    for rebuilt in (
        optree.tree_unflatten(optree.tree_structure(state), optree.tree_leaves(state)),
        torch_pytree.tree_unflatten(*torch_pytree.tree_flatten(state)),
        copy.deepcopy(state),
        pickle.loads(pickle.dumps(state)),
    ):
        assert isinstance(rebuilt, ft.TrainState)
        assert int(rebuilt.step) == 4 and rebuilt.key is None and rebuilt.buffers is None
        assert torch.equal(rebuilt.params["a"], shared) and rebuilt.opt_state == ()
        assert rebuilt.params["a"] is rebuilt.params["b"] is rebuilt.extra["ema"]
    state._consume("a test")
    assert pickle.loads(pickle.dumps(state)).consumed and copy.deepcopy(state).consumed
