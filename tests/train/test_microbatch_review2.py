"""Second review of batch splitting, micro-batch combination and the eval step.

Properties: for random batches, splits (counts that do not divide the batch, explicit sizes),
strategies, mean and :class:`~functrain.LossSum` losses with per-micro-batch counts (zero,
int, float) and aux metrics, the step's gradient and metrics are the full-batch values worked
out by hand in float64.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import functrain as ft

ENGINES = [("loop", "func"), ("loop", "autograd"), ("vmap", "func")]


def _per_example(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A non-linear per-example loss, so that a wrong weighting shows in the gradient."""
    return (x @ w).sin() + 0.5 * (x @ w).square() + w.square().sum()


@st.composite
def _cases(draw):
    n = draw(st.integers(1, 9))
    if draw(st.booleans()):
        micro_batches = draw(st.integers(1, n))
    else:
        sizes, left = [], n
        while left:
            sizes.append(draw(st.integers(1, left)))
            left -= sizes[-1]
        micro_batches = tuple(sizes)
    strategy, backend = draw(st.sampled_from(ENGINES))
    kind = draw(st.sampled_from(["mean", "sum-int", "sum-float", "sum-tensor"]))
    seed = draw(st.integers(0, 2**16))
    return n, micro_batches, strategy, backend, kind, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_any_split_gives_the_full_batch_gradient_loss_counts_and_aux(case):
    n, micro_batches, strategy, backend, kind, seed = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    # Token counts per example, some 0 (so whole micro-batches may count nothing), at least one
    # token in the batch so the token mean exists.
    tokens = torch.randint(0, 3, (n,), generator=gen)
    tokens[0] = max(int(tokens[0]), 1)
    w0 = torch.randn(3, generator=gen, dtype=torch.float64)
    batch = {"x": x, "t": tokens, "nested": [(x * 2,)]}

    def loss_fn(p, b):
        per = _per_example(p["w"], b["x"]) * b["t"]
        count = b["t"].sum()
        if kind == "mean":
            loss = _per_example(p["w"], b["x"]).mean()
        elif kind == "sum-tensor":
            loss = ft.LossSum(per.sum(), count)
        elif kind == "sum-float" and strategy == "loop":
            loss = ft.LossSum(per.sum(), float(count))
        else:  # a Python int (vmap cannot read a batched count into a Python number)
            loss = (
                ft.LossSum(per.sum(), int(count))
                if strategy == "loop"
                else ft.LossSum(per.sum(), count)
            )
        aux = {
            "mean_x": b["nested"][0][0].mean(),
            "hits": (b["x"][:, 0] > 0).sum(),  # an int count: read as a mean over examples
            "tok": ft.LossSum((b["x"][:, 1] * b["t"]).sum(), b["t"].sum()),
        }
        return ft.LossOutput(loss, aux=aux)

    tx = ft.sgd(1.0)
    step = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=micro_batches,
        strategy=strategy,
        grad_backend=backend,
        donate=False,
    )
    new, m = step(ft.TrainState.create(params={"w": w0}, tx=tx), batch)

    def full(w):
        if kind == "mean":
            return _per_example(w, x).mean()
        return (_per_example(w, x) * tokens).sum() / tokens.sum()

    torch.testing.assert_close(
        w0 - new.params["w"], torch.func.grad(full)(w0), rtol=1e-11, atol=1e-13
    )
    torch.testing.assert_close(m["loss"], full(w0), rtol=1e-12, atol=1e-14)
    assert int(m["num_examples"]) == n and m["num_examples"].dtype == torch.int64
    if kind == "mean":
        assert "num_tokens" not in m
    else:
        assert float(m["num_tokens"]) == float(tokens.sum())
    sizes = ft.split_batch(batch, micro_batches).sizes
    chunks = torch.split(x, list(sizes))
    # "hits" per micro-batch is a count, read as that micro-batch's mean: Σ (nᵢ/N) hitsᵢ.
    hits = sum(len(c) / n * float((c[:, 0] > 0).sum()) for c in chunks)
    torch.testing.assert_close(float(m["hits"]), hits, rtol=1e-6, atol=0)
    torch.testing.assert_close(m["mean_x"], (2 * x).mean(), rtol=1e-12, atol=1e-14)
    tok = (x[:, 1] * tokens).sum() / tokens.sum()
    torch.testing.assert_close(m["tok"], tok, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- the eval step


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), data=st.data())
def test_eval_step_is_the_example_and_token_weighted_full_batch_value(n, data):
    micro_batches = data.draw(st.integers(1, n))
    as_sum = data.draw(st.booleans())
    torch.manual_seed(n)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)
    ).double()
    with torch.no_grad():  # running statistics that differ from the batch's own
        net[1].running_mean.fill_(0.3)
        net[1].running_var.fill_(2.0)
    net.eval()  # dropout off, running statistics used
    model, params, buffers = ft.functionalize(net)
    x = torch.randn(n, 3, dtype=torch.float64)
    tokens = torch.arange(n) % 3
    tokens[-1] = 1

    def loss_fn(p, b, buffers):
        out = model(p, b["x"]).square().sum(-1)
        aux = {"tok": ft.LossSum((out * b["t"]).sum(), b["t"].sum()), "m": out.max()}
        loss = ft.LossSum((out * b["t"]).sum(), b["t"].sum()) if as_sum else out.mean()
        return ft.LossOutput(loss, aux=aux)

    tx = ft.sgd(0.1)
    state = ft.TrainState.create(params=params, buffers=buffers, tx=tx)
    before = {k: v.clone() for k, v in state.buffers.items()}
    m = ft.make_eval_step(loss_fn, micro_batches=micro_batches)(state, {"x": x, "t": tokens})

    with torch.no_grad():
        out = net(x).square().sum(-1)  # nn.Module in eval mode: the reference
    tok = (out * tokens).sum() / tokens.sum()
    torch.testing.assert_close(m["loss"], tok if as_sum else out.mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m["tok"], tok, rtol=1e-12, atol=1e-14)
    sizes = ft.split_batch(x, micro_batches).sizes
    expected_max = sum(len(c) / n * c.max() for c in torch.split(out, list(sizes)))
    torch.testing.assert_close(m["m"], expected_max, rtol=1e-12, atol=1e-14)
    assert int(m["num_examples"]) == n
    assert ("num_tokens" in m) == as_sum
    assert not state.consumed and not m["loss"].requires_grad
    assert all(torch.equal(before[k], state.buffers[k]) for k in before)


# ---------------------------------------------------------------- misread inputs


def test_a_one_element_size_tensor_is_sizes_not_a_count():
    # operator.index(torch.tensor([4])) is 4: the sizes [4] were read as K=4 micro-batches.
    assert ft.split_batch(torch.zeros(4), torch.tensor([4])).sizes == (4,)
    seen = []

    def loss_fn(p, b):
        seen.append(b.shape[0])
        return (p["w"] * b).mean()

    tx = ft.sgd(0.1)
    state = ft.TrainState.create(params={"w": torch.tensor(1.0)}, tx=tx)
    ft.make_eval_step(loss_fn, micro_batches=torch.tensor([4]))(state, torch.ones(4))
    assert seen == [4]
    # make_train_step takes sizes as a sequence; a size tensor is refused, not misread.
    with pytest.raises(ValueError, match="micro_batches must be a positive int"):
        ft.make_train_step(loss_fn, tx, micro_batches=torch.tensor([4]))


def _step(loss_fn):
    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, donate=False)
    return step(ft.TrainState.create(params={"w": torch.tensor(1.0)}, tx=tx), torch.ones(4))


def test_a_bool_tensor_count_is_refused_as_a_bool_is():
    # torch.tensor(True) (mask.any() for mask.sum()) counted one unit per micro-batch.
    with pytest.raises(TypeError, match=r"LossSum.count must be a number .* torch.bool"):
        _step(lambda p, b: ft.LossSum((p["w"] * b).sum(), (b > 0).any()))


def test_aux_keys_must_be_strings():
    # A key 1 went into the metrics dict, where loggers expect names.
    with pytest.raises(TypeError, match=r"aux keys must be strings, got LossOutput.aux\[1\]"):
        _step(lambda p, b: ft.LossOutput((p["w"] * b).mean(), aux={1: b.mean()}))


@pytest.mark.parametrize(
    "result, error, message",
    [
        (lambda p, b: p["w"] * b, ValueError, r"must be a 0-d \(scalar\) tensor, got shape \(2,\)"),
        (lambda p, b: ((p["w"] * b).mean(), {}), TypeError, "plain tuple"),
        (lambda p, b: 1.5, TypeError, r"must be a 0-d tensor, ft.LossSum or ft.LossOutput, got f"),
        (
            lambda p, b: b.long().sum(),
            TypeError,
            "must be a floating-point tensor, got torch.int64",
        ),
        (lambda p, b: [(p["w"] * b).mean()], TypeError, "got list"),
    ],
    ids=["vector", "tuple", "python-float", "int-tensor", "list"],
)
def test_wrong_loss_results_are_named(result, error, message):
    with pytest.raises(error, match=message):
        _step(result)


def test_a_loss_that_needs_no_grad_gives_a_zero_gradient():
    _, m = _step(lambda p, b: b.mean())
    assert float(m["grad_norm"]) == 0.0 and float(m["loss"]) == 1.0


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"x": torch.ones(4), "name": "abc"}, r"batch\['name'\] must be a tensor .* got str"),
        (
            {"x": torch.ones(4), "y": [torch.ones(3)]},
            r"batch\['x'\] has 4, batch\['y'\]\[0\] has 3",
        ),
    ],
    ids=["string-leaf", "leading-dims"],
)
def test_bad_batch_leaves_are_refused_by_path(batch, message):
    with pytest.raises((TypeError, ValueError), match=message):
        ft.split_batch(batch, 2)
