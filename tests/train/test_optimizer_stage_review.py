"""Review of the train step's optimizer stage (``optimizer_stage.py``) and step input checks.

A donating step (fused in place where it recognises the chain, the in-place pure stage where
not), a non-donating step and ``tx.update`` + ``apply_updates`` by hand agree for random
chains; the norm metrics equal float64 norms computed here; a state with a bad leaf is refused
naming the leaf and stays usable; the step reads no tensor value on the host.
"""

from __future__ import annotations

import math
import sys

import optree
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import functrain as ft

F64 = torch.float64


def _loss(p, b):
    return ((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2).mean() + 0.5 * p["s"].square().sum()


def _params(dtype=F64):
    gen = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(3, 2, generator=gen, dtype=dtype),
        "b": torch.randn(2, generator=gen, dtype=dtype),
        "s": torch.randn((), generator=gen, dtype=dtype),
    }


def _batch(seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(4, 3, generator=gen, dtype=dtype),
        "y": torch.randn(4, 2, generator=gen, dtype=dtype),
    }


def _matrices(p):
    return ft.tree.map(lambda x: x.ndim > 1, p)


@st.composite
def _member(draw):
    kind = draw(st.sampled_from(["clip", "adam", "decay", "trace", "schedule", "lr"]))
    if kind == "clip":
        return ft.clip_by_global_norm(draw(st.sampled_from([0.05, 1e3])))
    if kind == "adam":
        return ft.scale_by_adam(b1=0.8, b2=0.95, nesterov=draw(st.booleans()))
    if kind == "decay":
        return ft.add_decayed_weights(0.1, draw(st.sampled_from([None, _matrices])))
    if kind == "trace":
        return ft.trace(draw(st.sampled_from([0.0, 0.9])), draw(st.booleans()))
    if kind == "schedule":
        return ft.scale_by_schedule(ft.warmup_cosine_decay_schedule(0.0, -0.05, 2, 8))
    return ft.scale_by_learning_rate(draw(st.sampled_from([0.03, torch.tensor(0.02, dtype=F64)])))


@st.composite
def _tx(draw):
    tx = ft.chain(*draw(st.lists(_member(), min_size=1, max_size=4)))
    wrap = draw(st.sampled_from([None, None, "masked", "finite"]))
    if wrap == "masked":
        tx = ft.masked(tx, _matrices)
    elif wrap == "finite":
        tx = ft.apply_if_finite(tx, 2)
    return tx


def _norm64(tree) -> float:
    return math.sqrt(sum(float(x.double().square().sum()) for x in ft.tree.leaves(tree)))


def _copy(tree):
    return ft.tree.map(lambda x: x.clone(), tree)


class _NoHostReads(TorchFunctionMode):
    """Fails on any read of a tensor's value on the host.

    Except the fused engines' documented read of a 0-d CPU hyperparameter for the kernels'
    ``lr`` (``_fused_engines._number``: no device sync; accelerator tensors are passed as is).
    """

    READS = frozenset(
        {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__}
        | {torch.Tensor.__index__, torch.Tensor.tolist}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and not _documented_read():
            raise AssertionError(f"host read {func.__name__} during the step")
        return func(*args, **(kwargs or {}))


def _documented_read() -> bool:
    frame = sys._getframe(2)
    return frame.f_code.co_name == "_number" and frame.f_code.co_filename.endswith(
        "_fused_engines.py"
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tx=_tx(), steps=st.integers(1, 3), nan_step=st.sampled_from([None, 0, 1]))
def test_donating_and_pure_steps_match_the_hand_update_and_norms(tx, steps, nan_step):
    params = _params()
    ref_params, ref_state = _copy(params), tx.init(params)
    donating = ft.make_train_step(_loss, tx, donate=True, nonfinite="ignore")
    pure = ft.make_train_step(_loss, tx, donate=False, nonfinite="ignore")
    s_don = ft.TrainState.create(params=params, tx=tx, seed=None)
    s_pure = ft.TrainState.create(params=params, tx=tx, seed=None)
    for i in range(steps):
        batch = _batch(i)
        if i == nan_step:  # apply_if_finite or NaN maths: every path must agree
            batch["x"][0, 0] = float("nan")
        grads = torch.func.grad(_loss)(ref_params, batch)
        updates, ref_state = tx.update(grads, ref_state, ref_params)
        new_ref = ft.apply_updates(ref_params, updates)
        with _NoHostReads():
            s_don, m_don = donating(s_don, batch)
            s_pure, m_pure = pure(s_pure, batch)
        for state, metrics in ((s_don, m_don), (s_pure, m_pure)):
            ft.testing.assert_trees_all_close(state.params, new_ref, rtol=1e-12, atol=1e-14)
            ft.testing.assert_trees_all_close(state.opt_state, ref_state, rtol=1e-12, atol=1e-14)
            for got, want in zip(ft.tree.leaves(state.opt_state), ft.tree.leaves(ref_state)):
                assert got.dtype == want.dtype and got.device == want.device
            if not math.isfinite(_norm64(grads) + _norm64(new_ref)):
                continue  # NaN maths (the params above already agree, NaN for NaN)
            # grad_norm before clipping, update_norm of the applied change, param_norm after.
            assert metrics["grad_norm"].item() == pytest.approx(_norm64(grads), rel=1e-12)
            change = ft.tree.map(lambda a, b: a.double() - b.double(), new_ref, ref_params)
            assert metrics["update_norm"].item() == pytest.approx(
                _norm64(change), rel=1e-9, abs=1e-15
            )
            assert metrics["param_norm"].item() == pytest.approx(_norm64(new_ref), rel=1e-12)
        ref_params = new_ref


@pytest.mark.parametrize("donate", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_step_keeps_every_bit_and_reports_a_zero_update(donate, fused):
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(0.1))
    step = ft.make_train_step(_loss, tx, donate=donate, fused=fused)
    state = ft.TrainState.create(params=_params(torch.float32), tx=tx, seed=None)
    state, _ = step(state, _batch(0, torch.float32))
    before = _copy((state.params, state.opt_state))
    bad = _batch(1, torch.float32)
    bad["y"][1, 1] = float("inf")
    with _NoHostReads():
        state, metrics = step(state, bad)
    ft.testing.assert_trees_all_equal((state.params, state.opt_state), before, bitwise=True)
    assert metrics["update_norm"].item() == 0.0
    assert metrics["param_norm"].item() == pytest.approx(_norm64(before[0]), rel=1e-6)


def _with_leaf(state, index, fn):
    leaves, spec = optree.tree_flatten(state.opt_state)
    leaves[index] = fn(leaves[index])
    return state.replace(opt_state=optree.tree_unflatten(spec, leaves))


@pytest.mark.parametrize("donate, fused", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_an_opt_state_leaf_on_another_device_is_named_and_the_state_stays_usable(
    donate, fused, name
):
    tx = ft.adamw(0.1) if name == "adamw" else ft.sgd(0.1, momentum=0.9)
    step = ft.make_train_step(_loss, tx, donate=donate, fused=fused)
    state = ft.TrainState.create(params=_params(), tx=tx, seed=None)
    index = 1 if name == "adamw" else 0  # ScaleByAdamState.mu['b'], the trace of 'b'
    moved = _with_leaf(state, index, lambda x: x.to("meta"))  # a second device on a CPU box
    before = _copy(state.params)
    with pytest.raises(
        ValueError, match=r"state\.opt_state.*\['b'\] is on meta, the params on cpu"
    ):
        step(moved, _batch(0))
    assert not moved.consumed and not state.consumed
    ft.testing.assert_trees_all_equal(state.params, before, bitwise=True)
    # The state is still usable, with the same step.
    new, _ = step(state, _batch(0))
    assert new.step.item() == 1
