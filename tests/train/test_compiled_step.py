"""``make_train_step(..., compile=...)``: same numbers as eager, one compilation, clear errors.

Most tests compile with ``backend="aot_eager"`` (dynamo and AOTAutograd, no code generation):
recompilations and graph breaks are dynamo's doing, whatever the backend, and it keeps this
file fast. One test uses the default inductor backend. References are the eager step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functrain as ft
from functrain import testing

FAST = {"backend": "aot_eager"}


def _mlp(dtype=torch.float64, *, batch_norm=False, dropout=False):
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 8)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(8))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(0.3))
    model, params, buffers = ft.functionalize(nn.Sequential(*layers, nn.Linear(8, 2)).to(dtype))
    if batch_norm:

        def loss_fn(p, b, buffers):
            out, new_buffers = model.apply(p, buffers, b["x"])
            return ft.LossOutput((out - b["y"]).square().mean(), buffers=new_buffers)

    else:

        def loss_fn(p, b):
            return (model(p, b["x"]) - b["y"]).square().mean()

    return loss_fn, params, buffers or None


def _batches(n_steps, n=10, dtype=torch.float64, nan_at=None):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n_steps):
        b = {"x": torch.randn(n, 4, generator=g, dtype=dtype), "y": torch.randn(n, 2, generator=g)}
        b["y"] = b["y"].to(dtype)
        if i == nan_at:
            b["x"][3, 1] = float("nan")
        out.append(b)
    return out


def _tolerance(dtype):
    return (
        {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    )


def _snapshot(state):
    """Copies of ``(params, opt_state, buffers, step)`` (a donating step consumes the state)."""
    return ft.tree.map(torch.clone, (state.params, state.opt_state, state.buffers, state.step))


def _run_both(loss_fn, params, buffers, tx, batches, *, compile=FAST, **kwargs):
    """Runs the compiled and the eager step side by side; returns states, metrics, compiles."""
    compiled = ft.make_train_step(loss_fn, tx, compile=compile, **kwargs)
    eager = ft.make_train_step(loss_fn, tx, **kwargs)
    sc = ft.TrainState.create(params=params, tx=tx, buffers=buffers)
    se = ft.TrainState.create(params=params, tx=tx, buffers=buffers)
    history = []
    with testing.count_compiles() as count:
        for batch in batches:
            before = _snapshot(sc)
            sc, mc = compiled(sc, batch)
            se, me = eager(se, batch)
            history.append((before, _snapshot(sc), mc, me))
    return sc, se, history, count


def _assert_close(compiled, eager, dtype):
    tol = _tolerance(dtype)
    for x, y in zip(ft.tree.leaves(compiled), ft.tree.leaves(eager)):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, equal_nan=True, **tol)
        else:
            assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("strategy", "micro_batches", "dtype"),
    [
        ("loop", 1, torch.float64),
        ("loop", 4, torch.float32),
        ("vmap", 4, torch.float64),
    ],
)
def test_matches_eager_with_clipping_and_a_skipped_nan_step(strategy, micro_batches, dtype):
    loss_fn, params, _ = _mlp(dtype)
    schedule = ft.warmup_cosine_decay_schedule(0.0, 0.05, 2, 20)
    tx = ft.chain(ft.clip_by_global_norm(0.5), ft.adamw(schedule, weight_decay=0.1))
    batches = _batches(5, n=10, dtype=dtype, nan_at=2)  # 10 rows, K=4: sizes 3, 3, 2, 2
    sc, se, history, count = _run_both(
        loss_fn, params, None, tx, batches, strategy=strategy, micro_batches=micro_batches
    )
    assert count.compiles == 1, count.reasons
    _assert_close(sc, se, dtype)
    for i, (_, _, mc, me) in enumerate(history):
        assert set(mc) == set(me)
        _assert_close(mc, me, dtype)
        assert int(mc["skipped"]) == (i == 2)
    # The NaN step left params and optimizer state bit-for-bit as they were.
    before, after = history[2][0], history[2][1]
    testing.assert_trees_all_equal(before[:2], after[:2])
    assert int(after[3]) == 3


@pytest.mark.parametrize("inject", [True, False], ids=["inject_hyperparams", "schedule"])
def test_a_scheduled_run_compiles_once(inject):
    loss_fn, params, _ = _mlp(torch.float32)
    schedule = ft.warmup_cosine_decay_schedule(0.0, 1e-2, 20, 200)
    tx = ft.inject_hyperparams(ft.adamw)(learning_rate=schedule) if inject else ft.adamw(schedule)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, compile=FAST)
    state = ft.TrainState.create(params=params, tx=tx)
    batch = _batches(1, n=4, dtype=torch.float32)[0]
    lrs = []
    with testing.assert_max_compiles(1):
        for _ in range(200):
            state, metrics = step(state, batch)
            if inject:
                lrs.append(metrics["lr"])
    assert int(state.step) == 200
    if inject:  # the learning rate did follow the schedule, on tensors
        expected = torch.stack(
            [torch.as_tensor(schedule(i), dtype=torch.float32) for i in range(200)]
        )
        torch.testing.assert_close(torch.stack(lrs), expected)


def test_batch_norm_buffers_loss_scale_grad_stats_and_skip_counters():
    loss_fn, params, buffers = _mlp(batch_norm=True)
    hook = ft.GradStatsHook(
        init=lambda p: torch.zeros((), dtype=torch.float64),
        per_micro_batch=lambda g, b: {"sq": ft.tree.norm(g, squared=True)},
        update=lambda s, g, h: ({"sq_max": s.values["sq"].max()}, h + s.values["sq"].sum()),
    )
    tx = ft.sgd(0.1, momentum=0.9)
    options = dict(
        micro_batches=4,
        grad_stats=hook,
        max_consecutive_skips=3,
        loss_scale=ft.DynamicLossScale(init_scale=2.0**10),
    )
    batches = _batches(4, nan_at=1)
    sc, se, history, count = _run_both(loss_fn, params, buffers, tx, batches, **options)
    assert count.compiles == 1, count.reasons  # the extra entries exist before the first call
    _assert_close(sc, se, torch.float64)
    for _, _, mc, me in history:
        _assert_close(mc, me, torch.float64)
    assert sorted(sc.extra) == ["grad_stats", "loss_scale", "nonfinite"]
    assert int(sc.extra["nonfinite"].total) == 1
    # BatchNorm statistics moved, except on the skipped step.
    assert not torch.equal(sc.buffers["1.running_mean"], buffers["1.running_mean"])
    testing.assert_trees_all_equal(history[1][0][2], history[1][1][2])


def test_default_inductor_backend_matches_eager():
    loss_fn, params, _ = _mlp(torch.float32)
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adam(1e-2))
    sc, se, _, count = _run_both(
        loss_fn, params, None, tx, _batches(3, dtype=torch.float32), compile=True, micro_batches=2
    )
    assert count.compiles == 1, count.reasons
    _assert_close(sc, se, torch.float32)


@pytest.fixture(scope="module")
def compiled_step():
    loss_fn, params, _ = _mlp(torch.float32)
    tx = ft.adam(1e-2)
    return ft.make_train_step(loss_fn, tx, micro_batches=2, compile=FAST), params, tx


def test_new_states_and_donation_do_not_recompile(compiled_step):
    step, params, tx = compiled_step
    batch = _batches(1, dtype=torch.float32)[0]
    step(ft.TrainState.create(params=params, tx=tx), batch)  # warm up
    with testing.assert_max_compiles(0):
        for seed in range(3):  # fresh states: nothing is guarded on tensor identity
            state = ft.TrainState.create(params=params, tx=tx, seed=seed)
            new_state, _ = step(state, batch)
            with pytest.raises(ft.ConsumedStateError):
                state.params
            step(new_state, batch)


def test_bookkeeping_errors_are_raised_eagerly(compiled_step):
    step, params, tx = compiled_step
    state = ft.TrainState.create(params=params, tx=tx)
    with pytest.raises(ValueError, match="micro_batches=2 is more than"):
        step(state, {"x": torch.zeros(1, 4), "y": torch.zeros(1, 2)})
    with pytest.raises(TypeError, match=r"expects a ft\.TrainState"):
        step(state.params, {"x": torch.zeros(4, 4), "y": torch.zeros(4, 2)})
    assert not state.consumed


def test_donate_false_keeps_the_input_state():
    loss_fn, params, _ = _mlp(torch.float32)
    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, donate=False, compile=FAST)
    state = ft.TrainState.create(params=params, tx=tx)
    batch = _batches(1, dtype=torch.float32)[0]
    a, _ = step(state, batch)
    b, _ = step(state, batch)
    testing.assert_trees_all_equal(a, b)
    testing.assert_trees_all_equal(state.params, params)


def test_dropout_is_reproducible_and_seeded_like_eager_for_one_micro_batch():
    loss_fn, params, _ = _mlp(torch.float32, dropout=True)
    tx = ft.sgd(0.1)
    batch = _batches(1, dtype=torch.float32)[0]
    results = {}
    for k in (1, 3):
        step = ft.make_train_step(loss_fn, tx, micro_batches=k, donate=False, compile=FAST)
        state = ft.TrainState.create(params=params, tx=tx, seed=5)
        rng_before = torch.get_rng_state()
        a, _ = step(state, batch)
        assert torch.equal(torch.get_rng_state(), rng_before)  # global generator restored
        b, _ = step(state, batch)
        testing.assert_trees_all_equal(a, b)
        results[k] = a
    eager = ft.make_train_step(loss_fn, tx, donate=False)
    reference, _ = eager(ft.TrainState.create(params=params, tx=tx, seed=5), batch)
    _assert_close(results[1].params, reference.params, torch.float32)


def test_each_step_has_its_own_compile_cache():
    # Dynamo caches per code object; steps must not share TrainStep._core's entries (nine
    # compiled steps would otherwise exhaust the default recompile_limit of 8).
    loss_fn, params, _ = _mlp(torch.float32)
    tx = ft.sgd(0.1)
    batch = _batches(1, dtype=torch.float32)[0]
    with torch._dynamo.config.patch(recompile_limit=1):
        for _ in range(2):
            step = ft.make_train_step(loss_fn, tx, compile=FAST)
            step(ft.TrainState.create(params=params, tx=tx), batch)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"grad_backend": "autograd"}, ValueError, "grad_backend='autograd' cannot be compiled"),
        ({"compile": "yes"}, TypeError, "compile must be a bool or a dict"),
        ({"compile": {"fullgraph": False}}, ValueError, "fullgraph=True"),
        # CUDA graphs replay into the same output memory: a kept state would change under it
        ({"compile": {"mode": "reduce-overhead"}}, ValueError, "CUDA graphs"),
        ({"compile": {"mode": "max-autotune"}}, ValueError, "max-autotune-no-cudagraphs"),
        ({"compile": {"options": {"triton.cudagraphs": True}}}, ValueError, "CUDA graphs"),
        ({"compile": {"disable": True}}, ValueError, "compile=False"),
    ],
)
def test_incompatible_options_are_named(kwargs, error, match):
    options = {"compile": True, **kwargs}
    with pytest.raises(error, match=match):
        ft.make_train_step(lambda p, b: p["w"].sum(), ft.sgd(0.1), **options)


def test_skip_counter_is_recorded_eagerly_after_a_compiled_step(monkeypatch):
    """On CUDA the consecutive-skip counter is copied to pinned memory behind an event, so the
    next call can read it without a sync. That bookkeeping must run outside the graph (an event
    made while tracing would be a graph break under fullgraph=True, or never recorded), after
    the compiled core returns, on the counter the new state holds."""
    from functrain.train import faults

    seen = []
    real = faults.StepFaults._record

    def spy(self, counter):
        seen.append((torch.compiler.is_compiling(), counter))
        return real(self, counter)

    monkeypatch.setattr(faults.StepFaults, "_record", spy)
    loss_fn, params, _ = _mlp()
    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, compile=FAST, max_consecutive_skips=3)
    state = ft.TrainState.create(params=params, tx=tx)
    for batch in _batches(3, nan_at=1):
        state, _ = step(state, batch)
        eager = [c for compiling, c in seen if not compiling]
        assert eager and eager[-1] is state.extra["nonfinite"].consecutive
    assert int(state.extra["nonfinite"].consecutive) == 0  # the NaN step, then a good one
