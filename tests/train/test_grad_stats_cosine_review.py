"""Review of ``noise_scale_hook(cosine=True)`` in the eager autograd loop's in-place backward
and of the backward loop's per-micro-batch squared norms.

References: per-micro-batch mean gradients by ``torch.func.grad`` in float64 with the pairwise
cosines by hand, float64 squared norms, the ``"func"`` backend, and the step without a hook."""

import itertools
import math

import pytest
import torch
from test_grad_stats_cosine_backward import _metrics, _split

import functrain as ft
from functrain.train._grad_helpers import _SqNormRecord

F64 = torch.float64


def _by_hand(mean_loss, params, micro_batches):
    """Mean cosine over pairs of the non-zero micro-batch mean gradients (float64)."""
    flat = []
    for mb in micro_batches:
        grads = torch.func.grad(mean_loss)({k: v.to(F64) for k, v in params.items()}, mb)
        vec = torch.cat([grads[k].reshape(-1) for k in sorted(grads)])
        if vec.norm() > 0:
            flat.append(vec)
    pairs = [float(a @ b / (a.norm() * b.norm())) for a, b in itertools.combinations(flat, 2)]
    return sum(pairs) / len(pairs) if pairs else math.nan


def _step(loss_fn, params, batch, sizes, hook=True, backend="autograd"):
    off = {} if hook else {"grad_stats": None}
    return _metrics(loss_fn, params, batch, sizes, backend, **off)[:2]


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=g, dtype=F64)
    batch = {"x": torch.randn(n, 4, generator=g, dtype=F64), "y": torch.randn(n, 3, generator=g)}
    batch["y"] = batch["y"].to(F64)
    return w, batch


# -- the squared norm the backward loop takes of each leaf's gradient ---------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n", [1000, 33_000])
def test_a_gradients_squared_norm_does_not_depend_on_where_its_memory_sits(dtype, n):
    """The same values at another offset (backward hands over views, e.g. a cat's) gave other
    bits with the BLAS dot (MKL), so the hook's statistics were not reproducible."""
    values = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    record = _SqNormRecord([torch.zeros(n, dtype=dtype).requires_grad_()])
    record.recording = True
    for offset in range(16):
        buffer = torch.zeros(n + 16, dtype=dtype)
        view = buffer[offset : offset + n]
        view.copy_(values)
        record._square(0, view)
    record.remove()
    assert len({part.item() for part in record.parts}) == 1
    expected = float(values.to(F64).square().sum())
    assert math.isclose(record.parts[0].item(), expected, rel_tol=1e-4 if dtype != F64 else 1e-12)


@pytest.mark.parametrize("grad", [torch.zeros(0), torch.tensor(3.0, dtype=F64), torch.ones(2, 0)])
def test_empty_and_0d_gradients_have_their_squared_norm(grad):
    record = _SqNormRecord([torch.zeros_like(grad).requires_grad_()])
    record.recording = True
    record._square(0, grad)
    record._square(0, grad)
    record.remove()
    expected = float(grad.to(F64).square().sum())
    assert [p.item() for p in record.parts] == [expected, expected]


# -- sparse gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("cosine", [False, True])
def test_a_sparse_gradient_gets_the_clear_error_not_a_crash_in_the_hook(backend, cosine):
    model, params, _ = ft.functionalize(torch.nn.Embedding(10, 3, sparse=True))
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        lambda p, b: model(p, b).square().mean(),
        tx,
        micro_batches=2,
        grad_backend=backend,
        grad_stats=ft.noise_scale_hook(cosine=cosine),
        donate=False,
    )
    state = ft.TrainState.create(params=params, tx=tx)
    with pytest.raises(ValueError, match=r"params\['weight'\].*sparse=False"):
        step(state, torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]]))


# -- a loss_fn that runs a backward of its own ----------------------------------------------------


def test_a_backward_inside_loss_fn_does_not_bend_the_first_unit_gradient():
    """The step's sum takes in what loss_fn's own backward adds to .grad (as a classic loop
    does); the hook's norms count only the returned loss's gradient, and so must the unit
    gradients: the first one read all of .grad, and the cosine came out above 1."""
    w, batch = _data(8)

    def mean_loss(p, b):
        return (b["x"] @ p["w"] - b["y"]).square().mean()

    def loss_fn(p, b):
        (b["x"] @ p["w"]).sum().backward()  # into the step-local leaves' .grad
        return mean_loss(p, b)

    sizes = [2, 2, 4]
    state, metrics = _step(loss_fn, {"w": w}, batch, sizes)
    expected = _by_hand(mean_loss, {"w": w}, _split(batch, sizes))
    assert math.isclose(float(metrics["noise_scale/mean_cosine"]), expected, rel_tol=1e-12)
    plain_state, _ = _step(loss_fn, {"w": w}, batch, sizes, hook=False)
    ft.testing.assert_trees_all_equal(state.params, plain_state.params)


# -- cases the in-place path must get right (guards) ---------------------------------------------


def _mean(p, b):
    pred = b["x"] @ p["w"] * p["s"].to(F64) + p["c"]
    return (pred - b["y"]).square().mean()


def _const_first(p, b):
    if bool(b["x"][0, 0] > 10):  # the first micro-batch: a loss without the params
        return b["x"].sum() * 0
    return _mean(p, b)


@pytest.mark.parametrize(
    ("loss_fn", "sizes"),
    [(_mean, [1, 2, 3, 4, 1, 5, 2, 2]), (_mean, [10, 10]), (_const_first, [5, 5, 10])],
)
def test_mixed_dtypes_and_unequal_sizes_agree_with_float64_by_hand_and_func(loss_fn, sizes):
    w, batch = _data(20)
    batch["x"][0, 0] = 11.0 if loss_fn is _const_first else 0.0
    # A 0-d float32 leaf beside float64 ones: the 0-d promotion of the unit sum.
    params = {"w": w, "s": torch.tensor(1.5), "c": torch.zeros(3, dtype=F64)}
    state, metrics = _step(loss_fn, params, batch, sizes)
    expected = _by_hand(loss_fn, params, _split(batch, sizes))
    assert math.isclose(float(metrics["noise_scale/mean_cosine"]), expected, rel_tol=1e-6)
    _, func_metrics = _step(loss_fn, params, batch, sizes, backend="func")
    torch.testing.assert_close(
        metrics["noise_scale/mean_cosine"], func_metrics["noise_scale/mean_cosine"]
    )
    plain_state, _ = _step(loss_fn, params, batch, sizes, hook=False)
    ft.testing.assert_trees_all_equal(state.params, plain_state.params)


@pytest.mark.parametrize("mask", [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0] * 6])
def test_losssum_micro_batches_without_tokens_first_last_or_all(mask):
    w, batch = _data(6)
    batch["m"] = torch.tensor(mask, dtype=F64)

    def token_loss(p, b):
        per = (b["x"] @ p["w"] - b["y"]).square().sum(1) * b["m"]
        return ft.LossSum(per.sum(), b["m"].sum())

    def mean_loss(p, b):
        return (b["x"] @ p["w"] - b["y"]).square().sum(1).mean()

    _, metrics = _step(token_loss, {"w": w}, batch, [2, 2, 2])
    kept = [mb for mb in _split(batch, [2, 2, 2]) if mb["m"].sum() > 0]
    expected = _by_hand(mean_loss, {"w": w}, kept)
    got = float(metrics["noise_scale/mean_cosine"])
    assert (math.isnan(got) and math.isnan(expected)) or math.isclose(got, expected, rel_tol=1e-12)


def test_channels_last_and_transposed_weights():
    g = torch.Generator().manual_seed(3)
    conv = torch.randn(4, 2, 3, 3, generator=g, dtype=F64).to(memory_format=torch.channels_last)
    params = {"conv": conv, "lin": torch.randn(5, 4, generator=g, dtype=F64).T}  # not contiguous
    batch = {"x": torch.randn(6, 2, 5, 5, generator=g, dtype=F64)}

    def loss_fn(p, b):
        h = torch.nn.functional.conv2d(b["x"], p["conv"]).mean((2, 3))
        return torch.tanh(h @ p["lin"]).square().mean()

    state, metrics = _step(loss_fn, params, batch, [2, 2, 2])
    expected = _by_hand(loss_fn, params, _split(batch, [2, 2, 2]))
    assert math.isclose(float(metrics["noise_scale/mean_cosine"]), expected, rel_tol=1e-12)
    plain_state, _ = _step(loss_fn, params, batch, [2, 2, 2], hook=False)
    ft.testing.assert_trees_all_equal(state.params, plain_state.params)


def test_a_failing_micro_batch_leaves_the_next_call_working():
    w, batch = _data(8)
    calls = []

    def loss_fn(p, b):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return (b["x"] @ p["w"] - b["y"]).square().mean()

    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        loss_fn, tx, micro_batches=4, grad_stats=ft.noise_scale_hook(cosine=True), donate=False
    )
    state = ft.TrainState.create(params={"w": w}, tx=tx)
    with pytest.raises(RuntimeError, match="boom"):
        step(state, batch)
    _, metrics = step(state, batch)
    expected = _by_hand(lambda p, b: loss_fn(p, b), {"w": w}, _split(batch, [2, 2, 2, 2]))
    assert math.isclose(float(metrics["noise_scale/mean_cosine"]), expected, rel_tol=1e-12)
