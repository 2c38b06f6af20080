"""inject_stateful_hyperparams, StatefulSchedule, WrappedSchedule (optax.schedules' stateful API).

References: float64 loops of the update rules with the schedules' values computed by hand,
``ft.inject_hyperparams`` (step-count schedules), and optax's own stateful-schedule test.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
import functrain.optim.stateful_hyperparams as sh
from functrain import checkpoint, testing


class _Total(NamedTuple):
    total: torch.Tensor


class ExampleStatefulSchedule(sh.StatefulSchedule):
    """optax's test schedule: the running sum of the ``addendum`` extra argument."""

    def init(self) -> _Total:
        return _Total(torch.zeros((), dtype=torch.int32))

    def update(self, state: _Total, **extra_args) -> _Total:
        return _Total(state.total + extra_args["addendum"])

    def __call__(self, state: _Total, **extra_args) -> torch.Tensor:
        return state.total


class _Plateau(NamedTuple):
    lr: torch.Tensor
    best: torch.Tensor


class HalveOnNoImprovement:
    """Loss-driven (not subclassing the protocol): halve the rate when the loss did not drop."""

    def __init__(self, lr: float, factor: float = 0.5) -> None:
        self.lr, self.factor = lr, factor

    def init(self) -> _Plateau:
        return _Plateau(torch.tensor(self.lr), torch.tensor(math.inf))

    def update(self, state: _Plateau, *, loss: torch.Tensor, **extra_args) -> _Plateau:
        worse = loss >= state.best
        lr = torch.where(worse, state.lr * self.factor, state.lr)
        return _Plateau(lr, torch.minimum(state.best, loss.to(state.best.dtype)))

    def __call__(self, state: _Plateau, **extra_args) -> torch.Tensor:
        return state.lr


def _problem(dtype=torch.float64, steps=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(4, 3, generator=g, dtype=dtype), "b": torch.randn(3, generator=g)}
    params["b"] = params["b"].to(dtype)
    grads = [
        {"w": torch.randn(4, 3, generator=g, dtype=dtype), "b": torch.randn(3, generator=g)}
        for _ in range(steps)
    ]
    for gr in grads:
        gr["b"] = gr["b"].to(dtype)
    return params, grads


def _run(tx, params, grads, state=None, extras=None):
    state = tx.init(params) if state is None else state
    seen = []
    for t, gr in enumerate(grads):
        u, state = tx.update(gr, state, params, **(extras[t] if extras else {}))
        params = ft.apply_updates(params, u)
        seen.append(state)
    return params, state, seen


def test_wrapped_schedule_follows_the_count():
    # optax's test_wrap_stateless_schedule.
    sched = ft.linear_schedule(1.0, 0.0, transition_steps=10)
    wrapped = sh.WrappedSchedule(sched)
    state = wrapped.init()
    assert isinstance(state, sh.WrappedScheduleState)
    assert state.count.dtype == torch.int32 and state.count.shape == ()
    for t in range(8):
        assert int(state.count) == t
        testing.assert_trees_all_equal(wrapped(state), sched(torch.tensor(t, dtype=torch.int32)))
        state = wrapped.update(state, loss=torch.ones(()))  # extra arguments ignored
    # Saturates instead of wrapping around (optax's safe_increment).
    top = sh.WrappedScheduleState(torch.tensor(2**31 - 1, dtype=torch.int32))
    assert int(wrapped.update(top).count) == 2**31 - 1
    assert isinstance(wrapped, sh.StatefulSchedule)
    assert isinstance(HalveOnNoImprovement(0.1), sh.StatefulSchedule)
    assert not isinstance(sched, sh.StatefulSchedule)


@settings(max_examples=15, deadline=None)
@given(
    init=st.floats(0.01, 1.0),
    end=st.floats(0.0, 1.0),
    transition=st.integers(1, 8),
    steps=st.integers(1, 10),
    momentum=st.sampled_from([0.0, 0.9]),
)
def test_plain_schedule_matches_inject_hyperparams_and_hand_sgd(
    init, end, transition, steps, momentum
):
    params, grads = _problem(steps=steps)
    sched = ft.linear_schedule(init, end, transition_steps=transition)
    stateful = sh.inject_stateful_hyperparams(ft.sgd)
    explicit = stateful(learning_rate=sh.WrappedSchedule(sched), momentum=momentum)
    implicit = stateful(learning_rate=sched, momentum=momentum)  # wrapped automatically
    plain = ft.inject_hyperparams(ft.sgd)(learning_rate=sched, momentum=momentum)
    got, _, seen = _run(explicit, params, grads)
    got_implicit, _, _ = _run(implicit, params, grads)
    ref, _, ref_seen = _run(plain, params, grads)
    testing.assert_trees_all_equal(got, ref)
    testing.assert_trees_all_equal(got_implicit, ref)
    for t, (s, r) in enumerate(zip(seen, ref_seen)):
        testing.assert_trees_all_equal(s.hyperparams, r.hyperparams)
        assert int(s.hyperparams_states["learning_rate"].count) == t + 1
        assert int(s.count) == t + 1

    # Hand: lr(t) = (init - end)(1 - min(t, T)/T) + end, trace m = g + momentum m, p -= lr m.
    p = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    for t, gr in enumerate(grads):
        lr = (init - end) * (1 - min(t, transition) / transition) + end
        for k in p:
            m[k] = gr[k] + momentum * m[k]
            p[k] = p[k] - lr * m[k]
        # The schedule computes in float32 (int32 count), as optax's does in JAX's default mode.
        assert seen[t].hyperparams["learning_rate"].item() == pytest.approx(lr, rel=1e-6, abs=1e-7)
        assert seen[t].hyperparams["learning_rate"].dtype == torch.float64
    testing.assert_trees_all_close(got, p, rtol=1e-5, atol=1e-6)


def test_optax_example_stateful_schedule():
    # optax's test_inject_stateful_hyperparams: two updates with addendum 0.3.
    grads = (torch.ones(3), torch.ones(2))
    tx = sh.inject_stateful_hyperparams(ft.scale)(step_size=ExampleStatefulSchedule())
    state = tx.init(grads)
    assert state.hyperparams["step_size"].item() == 0
    addendum = 0.3 * torch.ones(())
    u, state = tx.update(grads, state, params=grads, addendum=addendum)
    testing.assert_trees_all_equal(u, (torch.zeros(3), torch.zeros(2)))  # the value at init
    u, state = tx.update(grads, state, params=grads, addendum=addendum)
    testing.assert_trees_all_equal(state.hyperparams["step_size"], addendum)
    testing.assert_trees_all_equal(state.hyperparams_states["step_size"].total, 2 * addendum)
    testing.assert_trees_all_equal(u, (torch.full((3,), 0.3), torch.full((2,), 0.3)))


def test_loss_driven_schedule_gives_hand_values_and_extra_args_reach_inner():
    losses = [3.0, 2.0, 2.5, 1.0, 1.5, 1.6, 0.5]
    params, grads = _problem(steps=len(losses))
    received = []

    def recording_scale(step_size):
        inner = ft.scale(step_size)

        def update(updates, state, params=None, **extra):
            received.append(sorted(extra))
            return inner.update(updates, state, params)

        return ft.GradientTransformation(inner.init, update)

    tx = sh.inject_stateful_hyperparams(recording_scale)(step_size=HalveOnNoImprovement(0.8))
    extras = [{"loss": torch.tensor(v)} for v in losses]
    got, _, seen = _run(tx, params, grads, extras=extras)
    assert received == [["loss"]] * len(losses)

    # Hand, in Python floats: the value used at step t is the rate before that step's update.
    lr, best, used = 0.8, math.inf, []
    for loss in losses:
        used.append(lr)
        if loss >= best:
            lr *= 0.5
        best = min(best, loss)
    assert used == [0.8, 0.8, 0.8, 0.4, 0.4, 0.2, 0.1]
    for t, s in enumerate(seen):
        assert s.hyperparams["step_size"].item() == pytest.approx(used[t], rel=1e-7)
    assert seen[-1].hyperparams_states["step_size"].lr.item() == pytest.approx(lr, rel=1e-7)
    # The recorded value is a tensor of its own, although __call__ returns the state's lr.
    for s in [tx.init(params), *seen]:
        value, lr_state = s.hyperparams["step_size"], s.hyperparams_states["step_size"].lr
        assert value.data_ptr() != lr_state.data_ptr()
    expected = {
        k: params[k] + sum(used[t] * grads[t][k] for t in range(len(losses))) for k in params
    }
    testing.assert_trees_all_close(got, expected, rtol=1e-6)


def test_recorded_values_never_alias_schedule_states():
    class Frozen:  # update returns the very same state
        def init(self):
            return torch.tensor(0.25)

        def update(self, state, **extra_args):
            return state

        def __call__(self, state, **extra_args):
            return state

    params, grads = _problem(torch.float32, steps=3)
    tx = sh.inject_stateful_hyperparams(ft.scale)(step_size=Frozen())
    state = tx.init(params)
    for gr in grads:
        assert state.hyperparams["step_size"].data_ptr() != (
            state.hyperparams_states["step_size"].data_ptr()
        )
        state.hyperparams["step_size"].fill_(7.0)  # scheduled: overwritten, state untouched
        u, state = tx.update(gr, state, params)
        testing.assert_trees_all_equal(u, ft.tree.map(lambda g: 0.25 * g, gr))


def test_numeric_override_takes_effect_and_scheduled_override_does_not():
    params, grads = _problem(steps=4)
    sched = ft.constant_schedule(0.1)
    tx = sh.inject_stateful_hyperparams(ft.sgd)(learning_rate=sched, momentum=0.5)
    state = tx.init(params)
    state.hyperparams["learning_rate"] = torch.tensor(5.0, dtype=torch.float64)  # no effect
    state.hyperparams["momentum"] = torch.tensor(0.0, dtype=torch.float64)
    got, _, _ = _run(tx, params, grads, state=state)
    ref, _, _ = _run(ft.sgd(0.1, momentum=0.0), params, grads)
    testing.assert_trees_all_close(got, ref, rtol=1e-6)


def test_static_args():
    params, grads = _problem(steps=4)
    mask = lambda p: ft.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    tx = sh.inject_stateful_hyperparams(ft.adamw, static_args="mask")(
        learning_rate=ft.constant_schedule(0.1), weight_decay=0.5, mask=mask
    )
    got, state, _ = _run(tx, params, grads)
    ref, _, _ = _run(ft.adamw(0.1, weight_decay=0.5, mask=mask), params, grads)
    testing.assert_trees_all_close(got, ref, rtol=1e-6)
    assert "mask" not in state.hyperparams and "mask" not in state.hyperparams_states
    # Without static_args the mask is taken as a schedule and its value refused, naming it.
    tx = sh.inject_stateful_hyperparams(ft.adamw)(learning_rate=0.1, mask=mask)
    with pytest.raises(TypeError, match=r"`mask` is callable.*static_args=\('mask',\)"):
        tx.init(params)
    with pytest.raises(ValueError, match="static_args"):
        sh.inject_stateful_hyperparams(ft.adamw, static_args=("nope",))


@pytest.mark.parametrize(
    ("param_dtype", "hyperparam_dtype", "expected"),
    [
        (torch.float64, None, torch.float64),
        (torch.float32, None, torch.float32),
        (torch.bfloat16, None, torch.float32),  # at least float32, as inject_hyperparams
        (torch.float32, torch.float64, torch.float64),
        (torch.float64, torch.float16, torch.float16),
    ],
)
def test_hyperparam_dtype(param_dtype, hyperparam_dtype, expected):
    params, grads = _problem(param_dtype, steps=3)
    tx = sh.inject_stateful_hyperparams(ft.sgd, hyperparam_dtype=hyperparam_dtype)(
        learning_rate=ft.linear_schedule(0.1, 0.0, 5), momentum=0.9
    )
    state = tx.init(params)
    for _ in range(2):
        for name, value in state.hyperparams.items():
            assert value.dtype == expected and value.shape == (), name
        assert state.hyperparams_states["learning_rate"].count.dtype == torch.int32
        assert state.count.dtype == torch.int32
        u, state = tx.update(grads[0], state, params)
        assert all(u[k].dtype == param_dtype for k in u)


def test_checkpoint_resume_is_bitwise():
    params, grads = _problem(torch.float32, steps=10)
    target = {k: torch.zeros_like(v) for k, v in params.items()}

    def loss_of(p):
        return sum(((p[k] - target[k]) ** 2).sum() for k in p) / 2

    def make():
        return sh.inject_stateful_hyperparams(ft.adamw)(
            learning_rate=HalveOnNoImprovement(0.05),
            weight_decay=ft.linear_schedule(0.1, 0.0, 6),
            b1=0.8,
        )

    def run(tx, p, state, gs):
        for gr in gs:
            u, state = tx.update(gr, state, p, loss=loss_of(p))
            p = ft.apply_updates(p, u)
        return p, state

    tx = make()
    full_p, full_state = run(tx, params, tx.init(params), grads)
    mid_p, mid_state = run(tx, params, tx.init(params), grads[:5])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.safetensors")
        checkpoint.save(path, {"params": mid_p, "opt_state": mid_state})
        fresh = make()  # a new process would rebuild the transform
        template = {"params": params, "opt_state": fresh.init(params)}
        restored = checkpoint.restore(path, target=template)
    assert isinstance(restored["opt_state"], sh.InjectStatefulHyperparamsState)
    assert isinstance(restored["opt_state"].hyperparams_states["learning_rate"], _Plateau)
    testing.assert_trees_all_equal(restored["opt_state"], mid_state)
    end_p, end_state = run(fresh, restored["params"], restored["opt_state"], grads[5:])
    testing.assert_trees_all_equal(end_p, full_p)
    testing.assert_trees_all_equal(end_state, full_state)


def test_compiled_update_does_not_recompile_across_steps():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    params, grads = _problem(torch.float32, steps=6)
    tx = sh.inject_stateful_hyperparams(ft.sgd)(
        learning_rate=HalveOnNoImprovement(0.1), momentum=ft.linear_schedule(0.5, 0.9, 4)
    )
    counter = CompileCounter()
    update = torch.compile(tx.update, backend=counter, fullgraph=True)
    state_c = state_e = tx.init(params)
    p_c = p_e = params
    losses = [3.0, 2.0, 2.5, 1.0, 1.5, 0.5]
    for gr, loss in zip(grads, losses):
        u_c, state_c = update(gr, state_c, p_c, loss=torch.tensor(loss))
        u_e, state_e = tx.update(gr, state_e, p_e, loss=torch.tensor(loss))
        testing.assert_trees_all_close(u_c, u_e, rtol=1e-6)
        testing.assert_trees_all_close(state_c, state_e, rtol=1e-6)
        p_c, p_e = ft.apply_updates(p_c, u_c), ft.apply_updates(p_e, u_e)
    assert counter.frame_count == 1
    assert state_c.hyperparams["learning_rate"].item() == pytest.approx(0.025)


def test_update_does_not_mutate_inputs():
    params, grads = _problem(steps=1)
    tx = sh.inject_stateful_hyperparams(ft.adamw)(
        learning_rate=HalveOnNoImprovement(0.1), weight_decay=ft.linear_schedule(0.1, 0.0, 3)
    )
    state = tx.init(params)
    for loss in (1.0, 2.0):
        before = ft.tree.map(lambda x: x.clone(), (grads[0], state, params))
        _, new_state = tx.update(grads[0], state, params, loss=torch.tensor(loss))
        testing.assert_trees_all_equal((grads[0], state, params), before)
        state = new_state


def test_bad_arguments_raise():
    params = {"w": torch.ones(2)}
    grads = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match="inject_stateful_hyperparams expects a transform"):
        sh.inject_stateful_hyperparams(3.0)
    with pytest.raises(TypeError, match="hyperparam_dtype"):
        sh.inject_stateful_hyperparams(ft.sgd, hyperparam_dtype="float32")
    with pytest.raises(ValueError, match="floating-point"):
        sh.inject_stateful_hyperparams(ft.sgd, hyperparam_dtype=torch.int32)
    with pytest.raises(TypeError, match=r"inject_stateful_hyperparams\(sgd\).*sgd takes"):
        sh.inject_stateful_hyperparams(ft.sgd)(lr=0.1)
    with pytest.raises(ValueError, match="learning_rate must be finite"):
        sh.inject_stateful_hyperparams(ft.sgd)(learning_rate=math.nan)
    with pytest.raises(TypeError, match="schedule_fn"):
        sh.WrappedSchedule(0.1)

    class Bad:
        def init(self):
            return torch.zeros(())

        def update(self, state, **extra_args):
            return state

        def __call__(self, state, **extra_args):
            return "fast"

    with pytest.raises(TypeError, match=r"learning_rate\(state\) gave str"):
        sh.inject_stateful_hyperparams(ft.sgd)(learning_rate=Bad()).init(params)

    tx = sh.inject_stateful_hyperparams(ft.sgd)(
        learning_rate=ft.constant_schedule(0.1), momentum=0.9
    )
    state = tx.init(params)
    with pytest.raises(TypeError, match="InjectStatefulHyperparamsState"):
        tx.update(grads, (state,), params)
    with pytest.raises(KeyError, match="momentum"):
        tx.update(grads, state._replace(hyperparams={}), params)
    with pytest.raises(KeyError, match="lr"):
        tx.update(grads, state._replace(hyperparams={**state.hyperparams, "lr": 1.0}), params)
    with pytest.raises(KeyError, match="hyperparams_states"):
        tx.update(grads, state._replace(hyperparams_states={}), params)


def test_state_follows_the_params_device():
    # init() of a schedule cannot know the device (optax's takes no argument): the wrapper
    # moves its CPU state there. The meta device stands in for an accelerator.
    params = {"w": torch.ones(3, device="meta")}
    tx = sh.inject_stateful_hyperparams(ft.sgd)(
        learning_rate=HalveOnNoImprovement(0.1), momentum=ft.linear_schedule(0.5, 0.9, 4)
    )
    state = tx.init(params)
    devices = {x.device.type for x in ft.tree.leaves(state) if isinstance(x, torch.Tensor)}
    assert devices == {"meta"}


@pytest.mark.parametrize(
    "schedule",
    [
        ft.WrappedSchedule(ft.linear_schedule(1.0, 0.0, 10)),
        # any object of StatefulSchedule's shape, subclass or not
        type(
            "Halving",
            (),
            {
                "init": lambda self: torch.tensor(1.0),
                "update": lambda self, state, **extra: state / 2,
                "__call__": lambda self, state, **extra: state,
            },
        )(),
    ],
)
def test_inject_hyperparams_refuses_a_stateful_schedule_by_name(schedule):
    # Before: the step count was passed as the schedule's state, failing later with an
    # AttributeError ("'Tensor' object has no attribute 'count'") that named neither.
    with pytest.raises(TypeError, match=r"learning_rate is a stateful schedule.*inject_stateful"):
        ft.inject_hyperparams(ft.sgd)(learning_rate=schedule)
    # the same schedule is what inject_stateful_hyperparams takes
    params = {"w": torch.ones(2)}
    tx = ft.inject_stateful_hyperparams(ft.sgd)(learning_rate=schedule)
    updates, _ = tx.update({"w": torch.ones(2)}, tx.init(params), params)
    assert torch.allclose(updates["w"], -torch.ones(2))


class _CountdownFromPythonNumbers:
    """A stateful schedule whose init() returns Python numbers (an optax user's habit)."""

    def init(self):
        return {"lr": 0.1, "calls": 0}

    def update(self, state, **extra_args):
        return {"lr": state["lr"] * 0.5, "calls": state["calls"] + 1}

    def __call__(self, state, **extra_args):
        return state["lr"]


def test_python_number_schedule_states_become_tensors_and_compile_once():
    # Before: init() kept the numbers as numbers; the first update made them tensors, so the
    # state changed type and a compiled update compiled twice.
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    params, grads = _problem(torch.float32, steps=4)
    tx = sh.inject_stateful_hyperparams(ft.sgd)(learning_rate=_CountdownFromPythonNumbers())
    state = tx.init(params)
    schedule_state = state.hyperparams_states["learning_rate"]
    assert all(isinstance(v, torch.Tensor) for v in schedule_state.values())
    counter = CompileCounter()
    update = torch.compile(tx.update, backend=counter, fullgraph=True)
    p = params
    for step, gr in enumerate(grads):
        u, state = update(gr, state, p)
        expected = {k: -(0.1 * 0.5**step) * g for k, g in gr.items()}
        testing.assert_trees_all_close(u, expected, rtol=1e-6)
        p = ft.apply_updates(p, u)
    assert counter.frame_count == 1
    assert int(state.hyperparams_states["learning_rate"]["calls"]) == 4


@pytest.mark.parametrize("stateful", [False, True], ids=["inject", "inject_stateful"])
def test_a_state_with_missing_or_misspelt_hyperparams_is_refused_by_name(stateful):
    wrapper = ft.inject_stateful_hyperparams if stateful else ft.inject_hyperparams
    tx = wrapper(ft.sgd)(learning_rate=0.1, momentum=0.9)
    params = {"w": torch.ones(2)}
    grads = {"w": torch.ones(2)}
    state = tx.init(params)
    misspelt = {**state.hyperparams, "lr": state.hyperparams["learning_rate"]}
    del misspelt["learning_rate"]
    with pytest.raises(KeyError, match=r"no entry for \['learning_rate'\]"):
        tx.update(grads, state._replace(hyperparams=misspelt), params)
    extra = {**state.hyperparams, "lr": torch.tensor(0.5)}
    with pytest.raises(KeyError, match=r"entries \['lr'\] that sgd does not inject"):
        tx.update(grads, state._replace(hyperparams=extra), params)
