"""Review of the DP-SGD step (make_train_step(per_example_clip=C)) against float64 loops by hand.

What ``tx`` receives must be exactly ``Σᵢ clip(gᵢ, C)`` for every batch size and split; the
metrics must be the per-example mean loss and clipped fraction, accumulated without the
rounding of a half-precision running sum; bad clipping norms are refused when the step is built.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft

C = 0.5


def _recorder(seen: list, clip=None):
    """A ``tx`` that records the updates it is handed and leaves the parameters alone.

    Behind a noiseless ``dp_noisy_mean`` with expected batch size 1 (adds 0, divides by 1:
    exact), as the DP step requires of its ``tx``.
    """

    def init(params):
        return ()

    def update(updates, state, params=None, **extra):
        seen.append(ft.tree.map(lambda u: u.detach().clone(), updates))
        return ft.tree.map(torch.zeros_like, updates), state

    noiseless = ft.dp_noisy_mean(C if clip is None else clip, 0.0, expected_batch_size=1, seed=0)
    return ft.chain(noiseless, ft.GradientTransformation(init, update))


def _per_example(loss_fn, params, batch, dtype=torch.float64):
    """Per-example losses, gradients, by single-example autograd calls (no vmap)."""
    names = list(params)
    n = ft.tree.leaves(batch)[0].shape[0]
    out = []
    for i in range(n):
        leaves = [params[k].detach().requires_grad_() for k in names]
        one = ft.tree.map(lambda x: x[i : i + 1], batch)
        loss = loss_fn(dict(zip(names, leaves)), one)
        grads = torch.autograd.grad(loss, leaves)
        out.append((loss.detach().to(dtype), [g.to(dtype) for g in grads]))
    return names, out


def _clipped_sum_by_hand(loss_fn, params, batch):
    """``Σᵢ clip(gᵢ, C)``, the mean loss and the clipped fraction, in float64."""
    names, examples = _per_example(loss_fn, params, batch)
    total = {k: torch.zeros_like(params[k], dtype=torch.float64) for k in names}
    losses, clipped = [], 0
    for loss, grads in examples:
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        factor = min(1.0, C / norm) if norm > 0 else 1.0
        clipped += norm > C
        for k, g in zip(names, grads):
            total[k] += factor * g
        losses.append(float(loss))
    n = len(losses)
    return total, math.fsum(losses) / max(n, 1), clipped / max(n, 1)


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model, params, _ = ft.functionalize(net.to(dtype))

    def loss_fn(p, b):
        return torch.nn.functional.cross_entropy(model(p, b["x"]), b["y"])

    def batch(n, seed):
        gen = torch.Generator().manual_seed(seed)
        x = (torch.randn(n, 4, generator=gen, dtype=torch.float64) * 2).to(dtype)
        return {"x": x, "y": torch.randint(0, 3, (n,), generator=gen)}

    return loss_fn, params, batch


@given(n=st.integers(0, 11), k=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_tx_receives_exactly_the_clipped_sum_for_every_split(n, k, seed):
    # Poisson batch sizes: empty, one example, fewer than K, not divisible by K.
    loss_fn, params, batch = _mlp()
    seen: list = []
    tx = _recorder(seen)
    step = ft.make_train_step(loss_fn, tx, micro_batches=k, per_example_clip=C, donate=False)
    b = batch(n, seed)
    _, metrics = step(ft.TrainState.create(params=params, tx=tx), b)
    total, loss, fraction = _clipped_sum_by_hand(loss_fn, params, b)
    (got,) = seen
    ft.testing.assert_trees_all_close(got, total, rtol=1e-12, atol=1e-15)
    assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-12, abs=1e-15)
    assert float(metrics["clipped_fraction"]) == pytest.approx(fraction, abs=1e-15)
    assert int(metrics["num_examples"]) == n


def _bf16_problem(n):
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 5).to(torch.bfloat16)
    model, params, _ = ft.functionalize(net)
    gen = torch.Generator().manual_seed(1)
    b = {
        "x": (torch.randn(n, 6, generator=gen) * 3).to(torch.bfloat16),
        "y": torch.randint(0, 5, (n,), generator=gen),
    }
    return model, params, b


def _bf16_ulp(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7)


def test_bfloat16_loss_is_the_mean_rounded_once_not_a_bfloat16_running_sum():
    # 300 examples with K = 512: one micro-batch per example. A bfloat16 running sum of
    # losses around 3 reaches 512, where its spacing is 4: every addition rounds by up to 2.
    model, params, b = _bf16_problem(300)

    def loss_fn(p, batch):
        return torch.nn.functional.cross_entropy(model(p, batch["x"]), batch["y"])

    tx = _recorder([])
    step = ft.make_train_step(loss_fn, tx, micro_batches=512, per_example_clip=C, donate=False)
    _, metrics = step(ft.TrainState.create(params=params, tx=tx), b)
    _, examples = _per_example(loss_fn, params, b)
    mean = math.fsum(float(loss) for loss, _ in examples) / 300
    assert metrics["loss"].dtype == torch.bfloat16
    assert abs(float(metrics["loss"]) - mean) <= _bf16_ulp(mean)
    clipped = sum(math.sqrt(sum(float((g * g).sum()) for g in gs)) > C for _, gs in examples)
    assert metrics["clipped_fraction"].dtype == torch.float32  # a ratio of counts
    assert float(metrics["clipped_fraction"]) == pytest.approx(clipped / 300, rel=1e-7)


def test_bfloat16_clipped_sum_is_accumulated_wide_and_rounded_once():
    model, params, b = _bf16_problem(256)

    def loss_fn(p, batch):
        return torch.nn.functional.cross_entropy(model(p, batch["x"]), batch["y"])

    seen: list = []
    tx = _recorder(seen)
    step = ft.make_train_step(loss_fn, tx, micro_batches=256, per_example_clip=C, donate=False)
    step(ft.TrainState.create(params=params, tx=tx), b)
    (got,) = seen
    total, _, _ = _clipped_sum_by_hand(loss_fn, params, b)
    names, examples = _per_example(loss_fn, params, b)
    factors = [min(1.0, C / math.sqrt(sum(float((g * g).sum()) for g in gs))) for _, gs in examples]
    for i, name in enumerate(names):
        # Each clipped term carries its own bfloat16 rounding: allow 2⁻⁸ of Σ|terms| for those
        # and 2⁻⁸ of the result for rounding it once. 255 bfloat16 additions exceed this.
        magnitude = sum(f * gs[i].abs() for f, (_, gs) in zip(factors, examples))
        err = (got[name].double() - total[name]).abs()
        bound = (total[name].abs() + magnitude) * 2.0**-8
        assert got[name].dtype == torch.bfloat16
        assert bool((err <= bound).all()), float((err / bound).max())


def test_a_float32_loss_of_a_bfloat16_model_keeps_its_precision():
    _, params, b = _bf16_problem(9)

    def loss_fn(p, batch):  # bfloat16 weights, the arithmetic and the loss in float32
        w, bias = p["weight"].float(), p["bias"].float()
        logits = torch.nn.functional.linear(batch["x"].float(), w, bias)
        return torch.nn.functional.cross_entropy(logits, batch["y"])

    tx = _recorder([])
    step = ft.make_train_step(loss_fn, tx, micro_batches=4, per_example_clip=C, donate=False)
    _, metrics = step(ft.TrainState.create(params=params, tx=tx), b)
    _, examples = _per_example(loss_fn, params, b)
    mean = math.fsum(float(loss) for loss, _ in examples) / 9
    assert metrics["loss"].dtype == torch.float32
    assert float(metrics["loss"]) == pytest.approx(mean, rel=1e-6)


@pytest.mark.parametrize(
    ("clip", "error", "match"),
    [
        (lambda count: 1.0, TypeError, "not a schedule"),
        (torch.tensor([0.5, 1.0]), ValueError, r"shape \(2,\)"),
        (torch.tensor(1), ValueError, "torch.int64"),
    ],
)
def test_a_clipping_norm_that_is_not_one_number_is_refused_at_build_time(clip, error, match):
    tx = ft.chain(ft.dp_noisy_mean(1.0, 1.0, expected_batch_size=4, seed=0), ft.sgd(0.1))
    with pytest.raises(error, match="per_example_clip") as info:
        ft.make_train_step(lambda p, b: (b @ p["w"]).mean(), tx, per_example_clip=clip)
    assert info.match(match)


def test_a_0d_tensor_clipping_norm_works_like_the_number():
    loss_fn, params, batch = _mlp()
    b = batch(7, 3)
    results = []
    for clip in (C, torch.tensor(C, dtype=torch.float64)):
        seen: list = []
        step = ft.make_train_step(
            loss_fn, _recorder(seen, clip), micro_batches=3, per_example_clip=clip, donate=False
        )
        step(ft.TrainState.create(params=params, tx=_recorder([])), b)
        results.append(seen[0])
    ft.testing.assert_trees_all_close(results[0], results[1], rtol=1e-15, atol=0)


def test_noise_on_a_nonempty_batch_is_sigma_c_over_the_expected_size():
    # The same step with sigma and with 0: the difference of the updates is the noise alone.
    d, sigma, expected, lr = 100_000, 1.3, 7.0, 1.0
    params = {"w": torch.zeros(d, dtype=torch.float64)}
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(5, d, generator=gen, dtype=torch.float64)
    loss_fn = lambda p, x: (x @ p["w"] + 1).square().mean()  # noqa: E731
    out = []
    for s in (sigma, 0.0):
        tx = ft.chain(ft.dp_noisy_mean(C, s, expected_batch_size=expected, seed=4), ft.sgd(lr))
        step = ft.make_train_step(loss_fn, tx, micro_batches=3, per_example_clip=C)
        state, _ = step(ft.TrainState.create(params=params, tx=tx), b)
        out.append(state.params["w"])
    noise = out[0] - out[1]
    target = lr * sigma * C / expected
    assert float(noise.std()) == pytest.approx(target, rel=0.015)  # se 1/sqrt(2d) = 0.22%
    assert abs(float(noise.mean())) < 5 * target / d**0.5


def test_a_failing_step_leaves_the_donated_input_state_untouched():
    loss_fn, params, batch = _mlp()
    calls = [0]

    def flaky(p, b):
        calls[0] += 1
        if calls[0] == 2:  # the second micro-batch
            raise RuntimeError("flaky loss")
        return loss_fn(p, b)

    tx = ft.chain(ft.dp_noisy_mean(C, 1.0, expected_batch_size=6.0, seed=0), ft.adam(0.1))
    step = ft.make_train_step(flaky, tx, micro_batches=3, per_example_clip=C)
    state = ft.TrainState.create(params=params, tx=tx, seed=2)
    before = ft.tree.map(torch.clone, (state.params, state.opt_state))
    with pytest.raises(RuntimeError, match="flaky loss"):
        step(state, batch(6, 0))
    ft.testing.assert_trees_all_equal((state.params, state.opt_state), before)
    assert int(state.step) == 0
    new, metrics = step(state, batch(6, 0))  # still usable
    assert int(new.step) == 1 and int(metrics["num_examples"]) == 6


def test_eval_mode_buffers_reach_the_loss_and_come_back_unchanged():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    model, params, buffers = ft.functionalize(net.double().eval())

    def loss_fn(p, b, buffers):
        out, _ = model.apply(p, buffers, b["x"])
        return torch.nn.functional.cross_entropy(out, b["y"])

    gen = torch.Generator().manual_seed(5)
    b = {
        "x": torch.randn(7, 3, generator=gen, dtype=torch.float64),
        "y": torch.tensor([0, 1] * 3 + [1]),
    }
    seen: list = []
    tx = _recorder(seen)
    step = ft.make_train_step(loss_fn, tx, micro_batches=3, per_example_clip=C, donate=False)
    new, metrics = step(ft.TrainState.create(params=params, tx=tx, buffers=buffers), b)
    total, loss, _ = _clipped_sum_by_hand(lambda p, x: loss_fn(p, x, buffers=buffers), params, b)
    ft.testing.assert_trees_all_close(seen[0], total, rtol=1e-12, atol=1e-15)
    assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-12)
    ft.testing.assert_trees_all_equal(new.buffers, buffers)


def test_an_empty_batch_reports_zeros_in_the_params_dtype():
    loss_fn, params, batch = _mlp(torch.float32)
    tx = ft.chain(ft.dp_noisy_mean(C, 0.0, expected_batch_size=4.0, seed=0), ft.sgd(1.0))
    step = ft.make_train_step(loss_fn, tx, micro_batches=4, per_example_clip=C, donate=False)
    state = ft.TrainState.create(params=params, tx=tx)
    new, metrics = step(state, batch(0, 0))
    assert metrics["loss"].dtype == torch.float32 and float(metrics["loss"]) == 0.0
    assert float(metrics["clipped_fraction"]) == 0.0 and int(metrics["num_examples"]) == 0
    ft.testing.assert_trees_all_equal(new.params, params)  # no noise, zero sum: no change
