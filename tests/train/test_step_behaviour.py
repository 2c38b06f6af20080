"""Train/eval step behaviour: randomness, donation, purity, metrics, hooks and clear errors."""

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft


def _linear_problem(n=8, seed=0):
    torch.manual_seed(seed)
    model, params, _ = ft.functionalize(nn.Linear(3, 2).double())
    batch = {
        "x": torch.randn(n, 3, dtype=torch.float64),
        "y": torch.randn(n, 2, dtype=torch.float64),
    }

    def loss_fn(p, b):
        return (model(p, b["x"]) - b["y"]).square().mean()

    return model, params, batch, loss_fn


# ---------------------------------------------------------------- randomness


def _dropout_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    model, params, _ = ft.functionalize(net)
    masks = []

    def loss_fn(p, b):
        masks.append(F.dropout(torch.ones(32), 0.5))  # records this micro-batch's stream
        return model(p, b).square().mean()

    return params, loss_fn, masks


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_dropout_is_reproducible_and_differs_between_micro_batches(strategy):
    params, loss_fn, masks = _dropout_problem()
    tx = ft.sgd(0.1)  # (Adam's first step is sign(g): blind to the mask)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, strategy=strategy, donate=False)
    state = ft.TrainState.create(params=params, tx=tx, seed=7)
    x = torch.ones(6, 4, dtype=torch.float64)  # identical examples: only dropout differs
    rng_before = torch.get_rng_state()
    a, ma = step(state, x)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global generator restored
    b, mb = step(state, x)
    ft.testing.assert_trees_all_equal(a, b)
    ft.testing.assert_trees_all_equal(ma, mb)
    if strategy == "loop":
        assert (
            len(masks) == 4 and torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[3])
        )
        assert not torch.equal(masks[0], masks[1])  # different micro-batches, different masks
    # the next step (advanced key) draws differently
    c, _ = step(a, x)
    d, _ = step(b, x)
    ft.testing.assert_trees_all_equal(c.params, d.params)
    assert not torch.equal(a.key, c.key)
    other = ft.TrainState.create(params=params, tx=tx, seed=8)
    assert not ft.tree.allclose(step(other, x)[0].params, a.params)


def test_vmap_micro_batches_get_different_dropout():
    params, loss_fn, _ = _dropout_problem()
    x = torch.ones(4, 4, dtype=torch.float64)
    seen = {}

    def per_mb(g, b):
        return {"g0": g["0.weight"].sum()}

    def update(stats, grads, s):
        seen["g0"] = stats.values["g0"]
        return {}, s

    hook = ft.GradStatsHook(lambda p: None, per_mb, update)
    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, strategy="vmap", grad_stats=hook)
    step(ft.TrainState.create(params=params, tx=tx), x)
    assert seen["g0"][0] != seen["g0"][1]


def test_key_argument_is_per_micro_batch():
    keys = []

    def loss_fn(p, b, key):
        keys.append(int(key))
        noise = torch.rand((), generator=ft.key_generator(key), dtype=torch.float64)
        return (p["w"] * b).mean() + noise

    tx = ft.sgd(0.1)
    state = ft.TrainState.create(params={"w": torch.ones((), dtype=torch.float64)}, tx=tx, seed=1)
    step = ft.make_train_step(loss_fn, tx, micro_batches=3, donate=False)
    step(state, torch.ones(6, dtype=torch.float64))
    assert keys == [int(ft.fold_in(state.key, i)) for i in (1, 2, 3)]
    with pytest.raises(ValueError, match=r"vmap.*key"):
        ft.make_train_step(loss_fn, tx, strategy="vmap")


# ---------------------------------------------------------------- purity and donation


def _all_tensors(x):
    return [t for t in ft.tree.leaves(x) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_no_hidden_state(strategy, backend):
    net = nn.Linear(3, 2).double()
    model, params, _ = ft.functionalize(net)
    x = torch.randn(6, 3, dtype=torch.float64)
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-2))
    step = ft.make_train_step(
        lambda p, b: model(p, b).square().mean(),
        tx,
        micro_batches=3,
        strategy=strategy,
        grad_backend=backend if strategy == "loop" else "func",
    )
    state = ft.TrainState.create(params=params, tx=tx)
    for _ in range(2):
        state, metrics = step(state, x)
    for t in _all_tensors(state) + list(metrics.values()):
        assert not t.requires_grad and t.grad is None and t.grad_fn is None
    assert all(p.grad is None for p in net.parameters())


def test_donation_reuses_memory_and_rejects_reuse():
    _, params, batch, loss_fn = _linear_problem()
    tx = ft.adam(1e-2)
    state = ft.TrainState.create(params=params, tx=tx)
    ptr = state.params["weight"].data_ptr()
    step = ft.make_train_step(loss_fn, tx)
    new, _ = step(state, batch)
    assert new.params["weight"].data_ptr() == ptr  # updated in place
    assert state.consumed
    with pytest.raises(ft.ConsumedStateError, match="donate=False"):
        step(state, batch)
    with pytest.raises(ft.ConsumedStateError):
        state.params
    with pytest.raises(ft.ConsumedStateError):
        ft.make_eval_step(loss_fn)(state, batch)


def test_donate_false_keeps_the_input_state():
    _, params, batch, loss_fn = _linear_problem()
    tx = ft.adam(1e-2)
    state = ft.TrainState.create(params=params, tx=tx)
    snapshot = ft.tree.map(torch.clone, state)
    step = ft.make_train_step(loss_fn, tx, donate=False)
    a, _ = step(state, batch)
    b, _ = step(state, batch)
    ft.testing.assert_trees_all_equal(state, snapshot)
    ft.testing.assert_trees_all_equal(a, b)
    # donating and non-donating steps compute the same numbers
    c, _ = ft.make_train_step(loss_fn, tx)(ft.tree.map(torch.clone, snapshot), batch)
    ft.testing.assert_trees_all_equal(a, c)


def test_a_failing_step_does_not_consume():
    _, params, batch, loss_fn = _linear_problem()
    tx = ft.adam(1e-2)
    state = ft.TrainState.create(params=params, tx=tx)
    step = ft.make_train_step(loss_fn, tx, micro_batches=20)
    with pytest.raises(ValueError, match="more than"):
        step(state, batch)
    assert not state.consumed


def test_aliased_params_in_optimizer_state_are_not_overwritten():
    class KeepState(NamedTuple):
        previous: dict

    def keep_params():  # a pure transform that keeps a reference to its input params
        return ft.GradientTransformation(
            lambda p: KeepState(p), lambda u, s, p=None: (u, KeepState(p))
        )

    _, params, batch, loss_fn = _linear_problem()
    tx = ft.chain(keep_params(), ft.sgd(0.1))
    state = ft.TrainState.create(params=params, tx=tx)
    before = ft.tree.map(torch.clone, state.params)
    new, _ = ft.make_train_step(loss_fn, tx)(state, batch)
    ft.testing.assert_trees_all_equal(new.opt_state[0].previous, before)


# ---------------------------------------------------------------- metrics


def test_metrics():
    _, params, batch, loss_fn = _linear_problem()

    class Hyper(NamedTuple):
        hyperparams: dict

    tx = ft.chain(
        ft.clip_by_global_norm(0.01),
        ft.GradientTransformation(
            lambda p: Hyper({"learning_rate": torch.tensor(0.5)}), lambda u, s, p=None: (u, s)
        ),
        ft.sgd(0.5),
    )
    state = ft.TrainState.create(params=params, tx=tx)
    grad = torch.func.grad(loss_fn)(state.params, batch)
    new, m = ft.make_train_step(loss_fn, tx, micro_batches=3, donate=False)(state, batch)
    expected = {"loss", "num_examples", "grad_norm", "update_norm", "param_norm", "lr", "skipped"}
    assert set(m) == expected
    assert int(m["skipped"]) == 0
    ft.testing.assert_trees_all_close(m["grad_norm"], ft.tree.norm(grad), rtol=1e-12)  # before clip
    ft.testing.assert_trees_all_close(
        m["update_norm"], torch.tensor(0.005, dtype=torch.float64), rtol=1e-9
    )
    ft.testing.assert_trees_all_close(m["param_norm"], ft.tree.norm(new.params), rtol=1e-12)
    assert float(m["lr"]) == 0.5 and int(m["num_examples"]) == 8
    assert all(isinstance(v, torch.Tensor) for v in m.values())
    _, m2 = ft.make_train_step(loss_fn, tx, norm_metrics=False)(state, batch)
    assert "grad_norm" not in m2


def test_inject_hyperparams_learning_rate_is_reported():
    if not hasattr(ft, "inject_hyperparams"):
        pytest.skip("inject_hyperparams not available yet")
    _, params, batch, loss_fn = _linear_problem()
    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=0.25)
    state = ft.TrainState.create(params=params, tx=tx)
    _, m = ft.make_train_step(loss_fn, tx)(state, batch)
    assert float(m["lr"]) == 0.25


def test_aux_metrics_combine_exactly():
    model, params, batch, _ = _linear_problem(n=10)

    def loss_fn(p, b):
        err = (model(p, b["x"]) - b["y"]).square()
        return ft.LossOutput(
            err.mean(),
            aux={"max_sq": err.max(), "pos": ft.LossSum((b["y"] > 0).sum(), b["y"].numel())},
        )

    tx = ft.sgd(0.1)
    state = ft.TrainState.create(params=params, tx=tx)
    _, m = ft.make_train_step(loss_fn, tx, micro_batches=4, donate=False)(state, batch)
    ft.testing.assert_trees_all_close(m["pos"], (batch["y"] > 0).double().mean(), rtol=1e-12)
    err = (model(params, batch["x"]) - batch["y"]).square()
    sizes = [3, 3, 2, 2]
    expected = sum(n / 10 * c.max() for n, c in zip(sizes, torch.tensor_split(err, 4)))
    ft.testing.assert_trees_all_close(m["max_sq"], expected, rtol=1e-12)


def test_eval_step():
    _, params, batch, loss_fn = _linear_problem(n=10)
    state = ft.TrainState.create(params=params, tx=ft.sgd(0.1))
    m = ft.make_eval_step(loss_fn, micro_batches=4)(state, batch)
    ft.testing.assert_trees_all_close(m["loss"], loss_fn(params, batch), rtol=1e-12)
    assert not m["loss"].requires_grad and not state.consumed


# ---------------------------------------------------------------- gradient-statistics hook


@pytest.mark.parametrize("strategy", ["loop", "vmap", "loop-autograd"])
@pytest.mark.parametrize("sizes", [3, (2, 5, 1, 2)])
def test_grad_stats_hook_sees_each_micro_batch(strategy, sizes):
    strategy, _, backend = strategy.partition("-")
    model, params, batch, _ = _linear_problem(n=10)
    weights = torch.arange(10, dtype=torch.float64) % 3

    def loss_fn(p, b):
        err = (model(p, b["x"]) - b["y"]).square().sum(-1) * b["w"]
        return ft.LossSum(err.sum(), b["w"].sum())

    batch = {**batch, "w": weights}
    hook = ft.GradStatsHook(
        init=lambda p: torch.zeros((), dtype=torch.float64),
        per_micro_batch=lambda g, b: {"sq": ft.tree.norm(g, squared=True), "b": b},
        update=lambda stats, grads, s: ({"calls": s + 1}, s + 1),
        name="test_hook",
    )
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=sizes,
        strategy=strategy,
        grad_stats=hook,
        donate=False,
        grad_backend=backend or "func",
    )
    state = ft.TrainState.create(params=params, tx=tx)
    captured = {}
    inner_update = hook.update

    def capture(stats, grads, s):
        captured["stats"] = stats
        return inner_update(stats, grads, s)

    step.grad_stats = hook._replace(update=capture)
    new, m = step(state, batch)
    split = ft.split_batch(batch, sizes)
    sq, bs, losses = [], [], []
    for start, n in zip(split.starts, split.sizes):
        mb = {k: v[start : start + n] for k, v in batch.items()}
        out = loss_fn(params, mb)
        g = torch.func.grad(lambda p: loss_fn(p, mb).total / loss_fn(p, mb).count)(params)
        sq.append(ft.tree.norm(g, squared=True))
        bs.append(mb["w"].sum())
        losses.append(out.total / out.count)
    stats = captured["stats"]
    ft.testing.assert_trees_all_close(stats.values["sq"], torch.stack(sq), rtol=1e-10)
    ft.testing.assert_trees_all_close(stats.sizes, torch.stack(bs))
    ft.testing.assert_trees_all_close(stats.values["b"], torch.stack(bs))
    ft.testing.assert_trees_all_close(stats.losses, torch.stack(losses), rtol=1e-12)
    assert float(m["calls"]) == 1 and float(new.extra["test_hook"]) == 1
    assert float(step(new, batch)[1]["calls"]) == 2  # the hook's state persists in extra


# ---------------------------------------------------------------- clear errors


def test_clear_errors():
    model, params, batch, loss_fn = _linear_problem()
    tx = ft.adam(1e-2)

    def fresh():
        return ft.TrainState.create(params=params, tx=tx)

    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    with pytest.raises(ValueError, match="different leading"):
        step(fresh(), {"x": batch["x"], "y": batch["y"][:5]})
    with pytest.raises(ValueError, match="more than the 8 examples"):
        ft.make_train_step(loss_fn, tx, micro_batches=9)(fresh(), batch)
    with pytest.raises(ValueError, match=r"0-d \(scalar\).*shape \(8, 2\)"):
        ft.make_train_step(lambda p, b: model(p, b["x"]), tx)(fresh(), batch)
    with pytest.raises(TypeError, match="plain tuple"):
        ft.make_train_step(lambda p, b: (loss_fn(p, b), {}), tx)(fresh(), batch)
    with pytest.raises(ValueError, match="strategy"):
        ft.make_train_step(loss_fn, tx, strategy="scan")
    with pytest.raises(ValueError, match="chunk_size"):
        ft.make_train_step(loss_fn, tx, strategy="vmap", chunk_size=0)


def test_params_that_changed_structure_are_rejected():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    model, params, _ = ft.functionalize(net)
    tx = ft.adam(1e-2)
    x = torch.randn(4, 3, dtype=torch.float64)
    step = ft.make_train_step(lambda p, b: model(p, b).square().mean(), tx)
    state, _ = step(ft.TrainState.create(params=params, tx=tx), x)
    bigger = {**state.params, "extra": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ft.tree.TreeMismatchError, match=r"changed structure.*'extra'"):
        step(state.replace(params=bigger), x)
    reshaped = {**state.params, "2.bias": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(ft.tree.TreeMismatchError, match=r"changed structure.*'2.bias'.*\(3,\)"):
        step(state.replace(params=reshaped), x)
    # The model changed (a layer was added) but the old state is used: named missing params.
    net.append(nn.Linear(2, 2).double())
    model2, _, _ = ft.functionalize(net)
    step2 = ft.make_train_step(lambda p, b: model2(p, b).square().mean(), tx)
    with pytest.raises(KeyError, match=r"missing \['3.bias', '3.weight'\]"):
        step2(state, x)
    assert not state.consumed


def test_vmap_with_batchnorm_updates_raises_and_says_what_to_do():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    model, params, buffers = ft.functionalize(net)
    x = torch.randn(8, 3, dtype=torch.float64)
    tx = ft.sgd(0.1)

    def loss_fn(p, b, buffers):
        out, buffers = model.apply(p, buffers, b)
        return ft.LossOutput(out.square().mean(), buffers=buffers)

    state = ft.TrainState.create(params=params, tx=tx, buffers=buffers)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, strategy="vmap")
    with pytest.raises((ValueError, RuntimeError), match="strategy='loop'"):
        step(state, x)
    assert not state.consumed

    def counting_loss(p, b, buffers):  # returns new buffers without mutating anything
        new = {k: v + 1 for k, v in buffers.items()}
        return ft.LossOutput(model.eval()(p, b).square().mean(), buffers=new)

    step = ft.make_train_step(counting_loss, tx, micro_batches=2, strategy="vmap")
    with pytest.raises(ValueError, match=r"cannot reproduce the sequential buffer updates"):
        step(state, x)

    def eval_mode_loss(p, b, buffers):
        out, _ = model.eval().apply(p, buffers, b)
        return out.square().mean()

    new, _ = ft.make_train_step(eval_mode_loss, tx, micro_batches=2, strategy="vmap")(state, x)
    ft.testing.assert_trees_all_equal(new.buffers, buffers)
