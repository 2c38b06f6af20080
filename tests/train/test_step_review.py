"""Review of make_train_step against the classic PyTorch loop and hand computation.

Every engine (strategy, gradient backend, donation, fused kernels, norm metrics, compile) is
checked against ``torch.optim`` with ``loss.backward()`` on an ``nn.Module`` in float64; plus
losses that do not depend on the params, states made for another optimizer, BatchNorm and
dropout across uneven micro-batches, and host reads inside the step.
"""

import copy
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft

N = 10


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N,))


def _classic_adamw(net, x, y, sizes, steps):
    """``loss * nᵢ / N`` per micro-batch, ``backward()``, ``step()``, ``zero_grad()``."""
    net = copy.deepcopy(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        for xc, yc in zip(x.split(sizes), y.split(sizes)):
            (F.cross_entropy(net(xc), yc) * len(yc) / N).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in net.named_parameters()}


ENGINES = [
    dict(strategy="loop", grad_backend="autograd", donate=True, fused=True),
    dict(strategy="loop", grad_backend="autograd", donate=True, fused=False, norm_metrics=False),
    dict(strategy="loop", grad_backend="autograd", donate=False, fused=True),
    dict(strategy="loop", grad_backend="func", donate=True, fused=True, norm_metrics=False),
    dict(strategy="loop", grad_backend="func", donate=False, fused=False),
    dict(strategy="vmap", grad_backend="auto", donate=True, fused=True),
    dict(strategy="vmap", grad_backend="func", donate=False, fused=False, norm_metrics=False),
]


@pytest.mark.parametrize("micro_batches", [1, 4, (1, 9), N])
@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: "-".join(map(str, e.values())))
def test_every_engine_matches_the_classic_torch_loop(engine, micro_batches):
    net = _net()
    x, y = _data()
    expected = _classic_adamw(net, x, y, (3, 3, 2, 2), steps=3)  # any split: the same gradient
    model, params, _ = ft.functionalize(net)
    tx = ft.adamw(1e-2, weight_decay=0.1)
    step = ft.make_train_step(
        lambda p, b: F.cross_entropy(model(p, b["x"]), b["y"]),
        tx,
        micro_batches=micro_batches,
        **engine,
    )
    state = ft.TrainState.create(params=params, tx=tx)
    for _ in range(3):
        state, _ = step(state, {"x": x, "y": y})
    ft.testing.assert_trees_all_close(state.params, expected, rtol=1e-12, atol=1e-14)


def test_compiled_step_matches_the_classic_torch_loop():
    net = _net()
    x, y = _data()
    expected = _classic_adamw(net, x, y, (4, 3, 3), steps=3)
    model, params, _ = ft.functionalize(net)
    tx = ft.adamw(1e-2, weight_decay=0.1)
    step = ft.make_train_step(
        lambda p, b: F.cross_entropy(model(p, b[0]), b[1]),
        tx,
        micro_batches=3,
        compile={"backend": "aot_eager"},
    )
    state = ft.TrainState.create(params=params, tx=tx)
    for _ in range(3):
        state, _ = step(state, (x, y))
    ft.testing.assert_trees_all_close(state.params, expected, rtol=1e-12, atol=1e-14)


def test_metrics_match_hand_computation_with_a_schedule_and_clipping():
    net = _net()
    x, y = _data()
    model, params, _ = ft.functionalize(net)

    def loss_fn(p, b):
        return F.cross_entropy(model(p, b[0]), b[1])

    for fused in (True, False):
        schedule = lambda count: 0.1 / (1 + count)  # noqa: E731
        tx = ft.chain(
            ft.clip_by_global_norm(0.3),
            ft.inject_hyperparams(ft.sgd)(learning_rate=schedule, momentum=0.9),
        )
        step = ft.make_train_step(loss_fn, tx, micro_batches=(3, 7), fused=fused)
        state = ft.TrainState.create(params=params, tx=tx)
        for i in range(3):
            before = {k: v.clone() for k, v in state.params.items()}
            grad = torch.func.grad(loss_fn)(before, (x, y))
            state, m = step(state, (x, y))
            change = {k: state.params[k] - before[k] for k in before}
            close = ft.testing.assert_trees_all_close
            close(m["loss"], loss_fn(before, (x, y)), rtol=1e-13)
            close(m["grad_norm"], ft.tree.norm(grad), rtol=1e-13)  # before clipping
            close(m["update_norm"], ft.tree.norm(change), rtol=1e-12)
            close(m["param_norm"], ft.tree.norm(state.params), rtol=1e-13)
            # The rate this step used (the schedule at count i; a float32 tensor, see report).
            assert float(m["lr"]) == float(schedule(torch.tensor(i, dtype=torch.int32)))
            assert int(m["num_examples"]) == N and int(m["skipped"]) == 0


# ---------------------------------------------------------------- losses independent of params


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("hook", [False, True])
@pytest.mark.parametrize("form", ["constant", "detached"])
def test_a_loss_that_does_not_depend_on_the_params_has_a_zero_gradient(backend, hook, form):
    # A constant or detached loss has gradient zero: torch.func.grad says so; the autograd
    # backend (the default for an eager loop) used to raise "element 0 of tensors does not
    # require grad" instead.
    params = {"w": torch.ones(2, dtype=torch.float64)}
    batch = torch.ones(4, 2, dtype=torch.float64)

    def loss_fn(p, b):
        value = (b @ p["w"]).mean()
        return torch.tensor(2.0, dtype=torch.float64) if form == "constant" else value.detach()

    grad_stats = None
    if hook:
        grad_stats = ft.GradStatsHook(
            init=lambda p: None,
            per_micro_batch=lambda g, n: {"g": ft.tree.norm(g)},
            update=lambda stats, g, s: ({"g_max": stats.values["g"].max()}, s),
        )
    tx = ft.adam(0.1)
    step = ft.make_train_step(
        loss_fn, tx, micro_batches=2, grad_backend=backend, grad_stats=grad_stats
    )
    state, m = step(ft.TrainState.create(params=params, tx=tx), batch)
    assert torch.equal(state.params["w"], params["w"])
    assert float(m["grad_norm"]) == 0.0 and float(m["loss"]) == 2.0
    if hook:
        assert float(m["g_max"]) == 0.0


# ---------------------------------------------------------------- the state's optimizer


def _quadratic():
    params = {"w": torch.tensor([1.0, -2.0, 3.0])}
    batch = torch.linspace(-1, 1, 12).reshape(4, 3)
    return params, batch, lambda p, b: (b @ p["w"]).square().mean()


@pytest.mark.parametrize(
    "step_tx, state_tx",
    [
        (lambda: ft.sgd(0.1), lambda: ft.adam(0.1)),  # used to run silently with Adam's state
        (lambda: ft.adam(0.1), lambda: ft.sgd(0.1, momentum=0.9)),  # AttributeError 'mu'
        (lambda: ft.adam(0.1), lambda: ft.adamw(0.1)),
    ],
    ids=["sgd-given-adam", "adam-given-sgd-momentum", "adam-given-adamw"],
)
@pytest.mark.parametrize("fused", [True, False])
def test_a_state_made_for_another_optimizer_is_refused_at_any_call(step_tx, state_tx, fused):
    params, batch, loss_fn = _quadratic()
    tx = step_tx()
    step = ft.make_train_step(loss_fn, tx, fused=fused)
    state, _ = step(ft.TrainState.create(params=params, tx=tx), batch)
    state, _ = step(state, batch)
    foreign = ft.TrainState.create(params=state.params, tx=state_tx())
    with pytest.raises(ft.tree.TreeMismatchError, match="not made by this step's optimizer"):
        step(foreign, batch)
    assert not foreign.consumed  # refused before any work: still usable
    state, _ = step(state, batch)  # the step's own state still goes through
    assert int(state.step) == 3


def test_states_of_this_optimizer_from_anywhere_are_accepted():
    params, batch, loss_fn = _quadratic()
    tx = ft.inject_hyperparams(ft.adamw)(learning_rate=0.1)
    step = ft.make_train_step(loss_fn, tx, max_consecutive_skips=2, donate=False)
    state, _ = step(ft.TrainState.create(params=params, tx=tx), batch)
    same = [
        state,
        state.replace(extra=dict(state.extra)),
        copy.deepcopy(state),
        ft.tree.map(torch.clone, state),
        step.prepare(ft.TrainState.create(params=params, tx=tx)),
        ft.TrainState.create(params=params, tx=ft.inject_hyperparams(ft.adamw)(learning_rate=1.0)),
    ]
    for other in same:
        step(other, batch)


@pytest.mark.parametrize("fused", [True, False])
def test_params_cast_to_another_dtype_between_steps_are_refused_naming_the_leaf(fused):
    # The optimizer state was made for float32 params: a cast of the params alone used to run,
    # mixing a bfloat16 parameter with float32 moments.
    params, batch, _ = _quadratic()
    tx = ft.adam(0.1)
    step = ft.make_train_step(lambda p, b: (b @ p["w"].float()).square().mean(), tx, fused=fused)
    state, _ = step(ft.TrainState.create(params=params, tx=tx), batch)
    name = next(iter(state.params))
    cast = state.replace(params={**state.params, name: state.params[name].bfloat16()})
    with pytest.raises(ft.tree.TreeMismatchError, match=rf"changed dtype.*{name}.*bfloat16"):
        step(cast, batch)
    assert not cast.consumed  # refused before any work
    state, _ = step(state, batch)  # the original dtypes still go through
    assert int(state.step) == 2


# ---------------------------------------------------------------- buffers and randomness


def test_batchnorm_and_dropout_over_uneven_micro_batches_match_the_classic_loop():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)
    ).double()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,))
    sizes = (5, 4, 3)
    ref = copy.deepcopy(net).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    model, params, buffers = ft.functionalize(net)

    def loss_fn(p, b, buffers):
        out, new_buffers = model.apply(p, buffers, b[0])
        return ft.LossOutput(F.cross_entropy(out, b[1]), buffers=new_buffers)

    tx = ft.sgd(0.1, momentum=0.9)
    step = ft.make_train_step(loss_fn, tx, micro_batches=sizes)
    state = ft.TrainState.create(params=params, tx=tx, buffers=buffers, seed=7)
    for _ in range(3):
        # The classic loop with the step's documented streams: micro-batch i uses
        # fold_in(key, i + 1) for its dropout masks; BatchNorm sees each micro-batch in turn.
        for i, (xc, yc) in enumerate(zip(x.split(sizes), y.split(sizes))):
            with ft.seeded_rng(ft.fold_in(state.key, i + 1)):
                (F.cross_entropy(ref(xc), yc) * len(yc) / 12).backward()
        opt.step()
        opt.zero_grad()
        state, _ = step(state, (x, y))
    close = ft.testing.assert_trees_all_close
    close(state.params, {k: v.detach() for k, v in ref.named_parameters()}, rtol=1e-12, atol=1e-14)
    close(state.buffers, dict(ref.named_buffers()), rtol=1e-12, atol=1e-14)
    assert int(state.buffers["1.num_batches_tracked"]) == 9  # 3 steps × 3 micro-batches


# ---------------------------------------------------------------- host reads


class _RecordHostReads(TorchDispatchMode):
    """Records where functrain's train step reads a tensor value on the host."""

    READS = (
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.item.default,
    )

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            frames = [
                f"{f.filename}:{f.lineno}"
                for f in traceback.extract_stack()
                if "functrain/train/" in f.filename.replace("\\", "/")
            ]
            if frames:
                self.sites.append(frames[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_the_step_reads_no_tensor_value_on_the_host(backend):
    # CPU-only runs cannot see device syncs; this sees every value read the train package
    # makes (a state without a key: the key is the one value a step reads, on the CPU).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model, params, buffers = ft.functionalize(net)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))

    def loss_fn(p, b, buffers):
        out, new_buffers = model.apply(p, buffers, b[0])
        total = F.cross_entropy(out, b[1], reduction="sum")
        hits = ft.LossSum((out.argmax(-1) == b[1]).sum(), b[1].numel())
        return ft.LossOutput(ft.LossSum(total, (b[1] >= 0).sum()), {"acc": hits}, new_buffers)

    hook = ft.GradStatsHook(
        init=lambda p: torch.zeros(()),
        per_micro_batch=lambda g, n: {"g": ft.tree.norm(g)},
        update=lambda stats, g, s: ({"g_mean": stats.values["g"].mean()}, s + 1),
    )
    for kwargs in ({}, {"loss_scale": ft.DynamicLossScale(), "grad_stats": hook}):
        tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-2))
        step = ft.make_train_step(
            loss_fn, tx, micro_batches=(5, 4, 3), grad_backend=backend, **kwargs
        )
        state = ft.TrainState.create(params=params, tx=tx, buffers=buffers, seed=None)
        state, _ = step(state, (x, y))  # first call: one-time checks
        with _RecordHostReads() as mode:
            for _ in range(2):
                state, _ = step(state, (x, y))
        assert mode.sites == []


# ---------------------------------------------------------------- low-precision counts


@pytest.mark.parametrize(
    "strategy, backend", [("loop", "autograd"), ("loop", "func"), ("vmap", "func")]
)
@pytest.mark.parametrize("micro_batches", [1, 8])
def test_token_counts_of_a_bfloat16_loss_are_exact(strategy, backend, micro_batches):
    # 8 rows of 1001 tokens: bfloat16 holds 1001 as 1000 and sums of such counts drift
    # further, which used to scale the loss, the gradient and the aux ratios by up to 0.5 %
    # (and differently for each micro_batches, the very thing LossSum exists to prevent).
    rows, tokens = 8, 1001
    batch = torch.zeros(rows, tokens)
    batch[:, 0] = 1.0  # one "hit" per row

    def loss_fn(p, b):
        total = p["w"].to(torch.bfloat16) * b.shape[0]  # d total / dw = rows, exactly
        hits = ft.LossSum((b > 0).sum(), b.numel())  # an integer total
        return ft.LossOutput(ft.LossSum(total, b.numel()), aux={"hit_rate": hits})

    tx = ft.sgd(1.0)
    params = {"w": torch.tensor(2.0)}
    step = ft.make_train_step(
        loss_fn, tx, micro_batches=micro_batches, strategy=strategy, grad_backend=backend
    )
    state, m = step(ft.TrainState.create(params=params, tx=tx), batch)
    assert float(m["num_tokens"]) == rows * tokens
    grad = rows / (rows * tokens)  # of Σ totals / Σ counts
    ft.testing.assert_trees_all_close(state.params["w"], torch.tensor(2.0 - grad), rtol=1e-7)
    assert m["loss"].dtype == torch.bfloat16  # the dtype loss_fn gave, rounded once
    assert m["loss"] == torch.tensor(2.0 / tokens).to(torch.bfloat16)
    ft.testing.assert_trees_all_close(m["hit_rate"], torch.tensor(1 / tokens), rtol=1e-7)
    evaluated = ft.make_eval_step(loss_fn, micro_batches=micro_batches)(state, batch)
    assert float(evaluated["num_tokens"]) == rows * tokens


# ---------------------------------------------------------------- micro-batch sizes


@pytest.mark.parametrize("sizes", [(2.5, 2.5, 1), (2.0, 3.0), "23", (True, 4), 2.0])
def test_non_integer_micro_batch_sizes_are_refused_not_truncated(sizes):
    # ft.split_batch used to cut (2.5, 2.5, 1) as (2, 2, 1) and the string "23" as (2, 3).
    with pytest.raises(TypeError, match="ints"):
        ft.split_batch({"x": torch.zeros(5)}, sizes)


def test_numpy_integer_micro_batches_are_accepted():
    np = pytest.importorskip("numpy")
    batch = {"x": torch.arange(5.0)}
    assert ft.split_batch(batch, np.int64(2)).sizes == (3, 2)
    assert ft.split_batch(batch, [np.int64(1), np.int64(4)]).sizes == (1, 4)
    loss_fn = lambda p, b: (p["w"] * b["x"]).mean()  # noqa: E731
    tx = ft.sgd(1.0)
    state = ft.TrainState.create(params={"w": torch.tensor(0.0)}, tx=tx)
    step = ft.make_train_step(loss_fn, tx, micro_batches=[np.int64(1), np.int64(4)])
    state, _ = step(state, batch)
    assert float(state.params["w"]) == -2.0  # -mean(x)


@pytest.mark.parametrize("name", ["grad_norm", "update_norm", "param_norm", "lr"])
def test_aux_named_like_a_step_metric_is_refused_before_anything_is_written(name):
    # The step's own metric silently replaced the aux value (grad_norm 7 came back as 1.5).
    tx = ft.sgd(1.0)

    def loss_fn(p, b):
        return ft.LossOutput((p["w"] * b).mean(), aux={name: torch.tensor(7.0)})

    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = ft.TrainState.create(params={"w": torch.tensor(1.0)}, tx=tx)
    with pytest.raises(ValueError, match=name):
        step(state, torch.arange(4.0))
    plain = ft.make_train_step(lambda p, b: (p["w"] * b).mean(), tx, micro_batches=2)
    new_state, _ = plain(state, torch.arange(4.0))  # the state is intact and usable
    assert new_state.params["w"] == 1.0 - 1.5
