"""``ft.reduce_on_plateau``: optax's rule by hand, torch's ReduceLROnPlateau, the train step."""

from __future__ import annotations

import math

import pytest
import torch

import functrain as ft
from functrain import testing


def _optax_rule(values, *, factor, patience, rtol, atol, cooldown, acc, min_scale):
    """optax.contrib.reduce_on_plateau's documented rule, in Python floats (float64)."""
    scale, best, bad, cool, count, avg = 1.0, math.inf, 0, 0, 0, 0.0
    scales = []
    for v in values:
        avg = (count * avg + v) / (count + 1)
        count += 1
        if count == acc:
            improved = avg < (1 - rtol) * best - atol
            if improved:
                best = avg
            bad = 0 if improved else bad + 1
            if cool > 0:
                cool, bad = cool - 1, 0
            elif bad == patience:
                scale, bad, cool = max(scale * factor, min_scale), 0, cooldown
            count, avg = 0, 0.0
        scales.append(scale)
    return scales


def _run(tx, values):
    params = [torch.zeros(2, dtype=torch.float64)]
    state = tx.init(params)
    scales = []
    for v in values:
        u, state = tx.update([torch.ones(2, dtype=torch.float64)], state, params, value=v)
        assert torch.equal(u[0], state.scale.expand(2))
        scales.append(float(state.scale))
    return scales, state


# Plateaus, improvements inside and outside the tolerances, a later drop.
VALUES = [5.0, 4.0, 4.0, 3.9999, 4.0, 3.0, 3.0, 2.9, 2.95, 2.9, 2.9, 2.9, 1.0, 1.0, 1.0, 1.0]
VALUES = [*VALUES, 0.99995, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    "kw",
    [
        {"factor": 0.5, "patience": 2, "rtol": 1e-4, "atol": 0.0, "cooldown": 0},
        {"factor": 0.5, "patience": 1, "rtol": 0.0, "atol": 0.05, "cooldown": 2},
        {"factor": 0.3, "patience": 2, "rtol": 0.01, "atol": 0.01, "cooldown": 1},
        {"factor": 0.1, "patience": 1, "rtol": 1e-4, "atol": 0.0, "cooldown": 0, "min_scale": 0.02},
        {"factor": 0.5, "patience": 1, "rtol": 1e-4, "atol": 0.0, "cooldown": 1, "acc": 3},
        {"factor": 0.5, "patience": 0, "rtol": 1e-4, "atol": 0.0, "cooldown": 0, "acc": 2},
    ],
)
def test_matches_optax_rule_by_hand(kw):
    kw = {"min_scale": 0.0, "acc": 1, **kw}
    expected = _optax_rule(VALUES, **kw)
    acc = kw.pop("acc")
    tx = ft.reduce_on_plateau(**kw, accumulation_size=acc)
    got, state = _run(tx, [torch.tensor(v, dtype=torch.float64) for v in VALUES])
    assert got == pytest.approx(expected, rel=1e-15, abs=0)
    assert len(set(expected)) > 1  # the sequence exercises at least one reduction
    assert state.plateau_count.dtype == torch.int32 and state.count.dtype == torch.int32


@pytest.mark.parametrize("mode", ["rel", "abs"])
@pytest.mark.parametrize("patience,cooldown", [(1, 0), (2, 1), (3, 2)])
def test_lr_sequence_equals_torch(mode, patience, cooldown):
    threshold = 1e-3 if mode == "rel" else 0.02
    values = [1.0, 0.9, 0.9, 0.9, 0.8999, 0.85, 0.85, 0.85, 0.85, 0.5, 0.5, 0.49999, 0.5] * 2
    lr0 = 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt,
        mode="min",
        factor=0.5,
        patience=patience - 1,  # torch reduces when the bad count exceeds patience
        threshold=threshold,
        threshold_mode=mode,
        cooldown=cooldown,
        min_lr=0.1 * lr0,
    )
    torch_lrs = []
    for v in values:
        sched.step(v)
        torch_lrs.append(opt.param_groups[0]["lr"])
    rtol, atol = (threshold, 0.0) if mode == "rel" else (0.0, threshold)
    tx = ft.reduce_on_plateau(
        factor=0.5, patience=patience, rtol=rtol, atol=atol, cooldown=cooldown, min_scale=0.1
    )
    scales, _ = _run(tx, values)
    assert [lr0 * s for s in scales] == pytest.approx(torch_lrs, rel=1e-15)
    assert len(set(torch_lrs)) > 1


def test_value_missing_and_bad_hyperparameters():
    tx = ft.reduce_on_plateau()
    with pytest.raises(TypeError, match="value=loss"):
        tx.update([torch.ones(1)], tx.init([torch.zeros(1)]))
    with pytest.raises(TypeError, match="single real number"):
        tx.update([torch.ones(1)], tx.init([torch.zeros(1)]), value=torch.ones(3))
    for bad in ({"factor": 1.0}, {"rtol": 0.0, "atol": 0.0}, {"rtol": 2.0}, {"patience": -1}):
        with pytest.raises(ValueError):
            ft.reduce_on_plateau(**bad)


def _loss_fn(params, batch):
    return ((batch["x"] @ params["w"] - batch["y"]) ** 2).mean()


def _setup(n=12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    batch = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    return {"w": torch.zeros(3, dtype=torch.float64)}, batch


def _plateau_state(opt_state):
    return opt_state[1]


def test_train_step_scale_drops_on_plateau():
    params, batch = _setup()
    tx = ft.chain(ft.sgd(0.0), ft.reduce_on_plateau(factor=0.5, patience=2))  # constant loss
    step = ft.make_train_step(_loss_fn, tx)
    state = ft.TrainState.create(params=params, tx=tx)
    for _ in range(5):
        state, _ = step(state, batch)
    # loss constant: improves at step 1, then bad, bad -> 0.5, bad, bad -> 0.25
    assert float(_plateau_state(state.opt_state).scale) == 0.25


@pytest.mark.parametrize("k,strategy", [(3, "loop"), (3, "vmap"), (1, "loop")])
def test_train_step_passes_full_batch_mean_loss(k, strategy):
    params, batch = _setup()
    params = {"w": torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64)}
    tx = ft.chain(ft.adam(1e-2), ft.reduce_on_plateau(accumulation_size=5))
    step = ft.make_train_step(_loss_fn, tx, micro_batches=k, strategy=strategy)
    state = ft.TrainState.create(params=params, tx=tx)
    expected = float(_loss_fn(params, batch))  # full-batch mean, float64
    state, metrics = step(state, batch)
    avg = _plateau_state(state.opt_state).avg_value
    assert float(avg) == pytest.approx(expected, rel=1e-12)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-12)


def test_nan_batch_skipped_keeps_plateau_state():
    params, batch = _setup()
    tx = ft.chain(ft.adam(1e-2), ft.reduce_on_plateau(patience=1, accumulation_size=2))
    step = ft.make_train_step(_loss_fn, tx, nonfinite="skip")
    state = ft.TrainState.create(params=params, tx=tx)
    state, _ = step(state, batch)
    before = ft.tree.map(torch.clone, _plateau_state(state.opt_state))
    bad = {"x": batch["x"].clone(), "y": batch["y"].clone()}
    bad["y"][0] = float("nan")
    state, _ = step(state, bad)
    after = _plateau_state(state.opt_state)
    for a, b in zip(after, before):
        assert torch.equal(a, b)


def test_compiled_step_compiles_once():
    params, batch = _setup()
    tx = ft.chain(ft.adam(1e-2), ft.reduce_on_plateau(factor=0.5, patience=2))
    step = ft.make_train_step(_loss_fn, tx, compile={"backend": "aot_eager"})
    eager = ft.make_train_step(_loss_fn, tx)
    sc = ft.TrainState.create(params=params, tx=tx)
    se = ft.TrainState.create(params=params, tx=tx)
    with testing.count_compiles() as count:
        for _ in range(20):
            sc, _ = step(sc, batch)
            se, _ = eager(se, batch)
    assert count.compiles == 1
    for a, b in zip(_plateau_state(sc.opt_state), _plateau_state(se.opt_state)):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_bare_user_transform_without_extra_still_works():
    def init(params):
        return ()

    def update(updates, state, params=None):  # no **extra: must not receive value=
        return ft.tree.map(lambda g: -0.1 * g, updates), state

    params, batch = _setup()
    bare = ft.GradientTransformation(init, update)
    for nonfinite in ("skip", "ignore"):
        for fused in (True, False):
            step = ft.make_train_step(_loss_fn, bare, nonfinite=nonfinite, fused=fused)
            state = ft.TrainState.create(params=params, tx=bare)
            state, _ = step(state, batch)
            assert not torch.equal(state.params["w"], params["w"])


def test_wrappers_pass_value_through():
    params = [torch.zeros(2)]
    for tx in (
        ft.MultiSteps(ft.chain(ft.sgd(1.0), ft.reduce_on_plateau()), every_k_schedule=1),
        ft.inject_hyperparams(
            lambda learning_rate: ft.chain(ft.sgd(learning_rate), ft.reduce_on_plateau())
        )(learning_rate=1.0),
        ft.masked(ft.reduce_on_plateau(), [True]),
    ):
        state = tx.init(params)
        u, state = tx.update([torch.ones(2)], state, params, value=torch.tensor(1.0))
        assert torch.isfinite(u[0]).all()


def test_train_step_reports_the_plateau_scale_as_lr_scale() -> None:
    """A loss that cannot improve: lr stays the injected rate, lr_scale follows the reductions
    (factor 0.5 each time the count of bad values reaches patience=2, after the first value)."""
    params = {"w": torch.zeros(2)}
    tx = ft.chain(
        ft.inject_hyperparams(ft.sgd)(learning_rate=0.1),
        ft.reduce_on_plateau(factor=0.5, patience=2),
    )
    step = ft.make_train_step(lambda p, b: (b * 0.0 + 1.0).sum() + 0.0 * p["w"].sum(), tx)
    state = ft.TrainState.create(params=params, tx=tx)
    scales = []
    for _ in range(7):
        state, metrics = step(state, torch.ones(3))
        assert float(metrics["lr"]) == pytest.approx(0.1)
        scales.append(float(metrics["lr_scale"]))
    assert scales == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125]
    plain = ft.make_train_step(lambda p, b: (p["w"] * b[:2]).sum(), ft.adam(0.1))
    _, metrics = plain(ft.TrainState.create(params=params, tx=ft.adam(0.1)), torch.ones(3))
    assert "lr_scale" not in metrics
