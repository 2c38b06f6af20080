"""The faster routes of ``method="layers"`` give the naive loop's per-sample gradients.

* one-channel convolutions (CPU float32, 1-/2-d, undilated): each example's weight gradient from
  one grouped *forward* convolution whose kernels are the output gradients (``_transposed_*``);
* convolutions of 8+ input channels (CPU float32/float64): one grouped convolution backward
  (``_grouped_*``), in the weight's element order, padding passed to the kernel;
* ``F.cross_entropy`` of class indices (CPU): one ``reduction="none"`` call on the physical
  batch instead of ``vmap``'s decomposition.

Every check compares with one autograd call per example (``naive_per_sample``) in float64, and
asserts that the route under test was taken (or not).
"""

import pytest
import torch
import torch.nn.functional as F
from grad_problems import naive_per_sample
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import tree
from functrain.grads import _layer_grads, _layer_rules

D = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
F32_TOL = dict(rtol=1e-4, atol=1e-6)  # float32 results against the float64 loop
F64_TOL = dict(rtol=1e-12, atol=1e-14)


def _randn(*shape, seed=0, dtype=D):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _flat(grads):
    return torch.cat([g.reshape(g.shape[0], -1) for g in tree.leaves(grads)], 1)


def _spy(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture
def transposed_calls(monkeypatch):
    return _spy(monkeypatch, _layer_grads, "_transposed_weight_grads")


@pytest.fixture
def grouped_calls(monkeypatch):
    return _spy(monkeypatch, _layer_grads, "_grouped_weight_grads")


@pytest.fixture
def cross_entropy_calls(monkeypatch):
    return _spy(monkeypatch, _layer_rules, "cross_entropy_rows")


def _conv_problem(dims, in_ch, out_ch, kernel, options, spatial, rows, dtype, seed=0):
    """``conv → tanh → square → mean`` with a bias; the batch as float64 and as ``dtype``."""
    params = {
        "w": _randn(out_ch, in_ch, *kernel, seed=seed + 1) / (in_ch * max(kernel)),
        "b": _randn(out_ch, seed=seed + 2),
    }
    batch = _randn(rows, in_ch, *spatial, seed=seed + 3)

    def loss_fn(p, x):
        return CONV[dims](x, p["w"], p["b"], **options).tanh().square().mean()

    cast = (tree.map(lambda t: t.to(dtype), params), batch.to(dtype))
    return loss_fn, (params, batch), cast


def _check_all_reductions(loss_fn, params, batch, reference, rtol, atol):
    """Per-sample gradients, norms, the Gram matrix and a clipped sum by the rules."""
    got = _flat(ft.per_sample_grads(loss_fn, params, batch, method="layers"))
    assert got.is_contiguous()
    torch.testing.assert_close(got.to(D), reference, rtol=rtol, atol=atol)
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, method="layers").global_norm
    torch.testing.assert_close(norms.to(D), reference.norm(dim=1), rtol=rtol, atol=atol)
    gram = ft.per_sample_gram(loss_fn, params, batch, method="layers")
    torch.testing.assert_close(gram.to(D), reference @ reference.T, rtol=rtol, atol=atol)
    clip = 0.5 * float(reference.norm(dim=1).median())
    factors = (clip / reference.norm(dim=1)).clamp(max=1.0)
    summed = ft.clipped_grad_sum(loss_fn, params, batch, clip, method="layers").grad_sum
    flat_sum = _flat(tree.map(lambda t: t[None], summed))[0]
    torch.testing.assert_close(flat_sum.to(D), factors @ reference, rtol=rtol, atol=atol)


# (dims, in, out, kernel, options, spatial): odd strides, padding, kernels that the strided
# output gradient does not fill exactly (the transposed route's crop).
ONE_CHANNEL = {
    "mnist first layer": (2, 1, 16, (8, 8), dict(stride=2, padding=3), (28, 28)),
    "stride 3, uneven crop": (2, 1, 4, (3, 2), dict(stride=(3, 2), padding=(1, 0)), (11, 9)),
    "padding by dimension": (2, 1, 3, (3, 3), dict(padding=(0, 2), stride=(2, 1)), (7, 8)),
    "padding same": (2, 1, 5, (5, 3), dict(padding="same"), (6, 7)),
    "stride larger than kernel": (2, 1, 3, (2, 2), dict(stride=3), (10, 10)),
    "conv1d": (1, 1, 6, (5,), dict(stride=2, padding=2), (23,)),
    "conv1d valid": (1, 1, 2, (7,), dict(padding="valid", stride=4), (30,)),
}


@pytest.mark.parametrize("name", list(ONE_CHANNEL))
@pytest.mark.parametrize("rows", [1, 5])
def test_one_channel_float32_takes_the_transposed_route(name, rows, transposed_calls):
    dims, in_ch, out_ch, kernel, options, spatial = ONE_CHANNEL[name]
    loss_fn, (params, batch), (p32, b32) = _conv_problem(
        dims, in_ch, out_ch, kernel, options, spatial, rows, torch.float32
    )
    reference = _flat(naive_per_sample(loss_fn, params, batch))
    _check_all_reductions(loss_fn, p32, b32, reference, **F32_TOL)
    assert transposed_calls, "the transposed route was not taken"


@pytest.mark.parametrize(
    "dims, options, dtype",
    [
        (2, dict(dilation=2), torch.float32),  # dilated: grouped or patches
        (3, dict(padding=1), torch.float32),  # 3-d
        (2, dict(stride=2, padding=1), torch.float64),  # float64
    ],
    ids=["dilated", "conv3d", "float64"],
)
def test_other_one_channel_convolutions_stay_exact(dims, options, dtype, transposed_calls):
    kernel, spatial = (3,) * dims, (9, 8, 7)[:dims]
    loss_fn, (params, batch), cast = _conv_problem(dims, 1, 4, kernel, options, spatial, 3, dtype)
    reference = _flat(naive_per_sample(loss_fn, params, batch))
    tol = F32_TOL if dtype == torch.float32 else F64_TOL
    _check_all_reductions(loss_fn, *cast, reference, **tol)
    assert not transposed_calls


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("in_ch", [1, 8])
def test_asymmetric_padding(in_ch, transposed_calls, grouped_calls):
    """``padding="same"`` of an even kernel pads one side more (``F.pad`` before the kernels)."""
    loss_fn, (params, batch), cast = _conv_problem(
        2, in_ch, 8, (4, 2), dict(padding="same"), (7, 6), 3, torch.float32
    )
    reference = _flat(naive_per_sample(loss_fn, params, batch))
    _check_all_reductions(loss_fn, *cast, reference, **F32_TOL)
    assert transposed_calls if in_ch == 1 else grouped_calls


@pytest.mark.parametrize("in_ch", [1, 8])
def test_routes_of_a_non_contiguous_batch(in_ch, transposed_calls, grouped_calls):
    params = {"w": _randn(8, in_ch, 3, 3, seed=1, dtype=torch.float32)}
    wide = _randn(4, in_ch, 12, 20, seed=2, dtype=torch.float32)
    batch = wide[:, :, :, ::2].transpose(2, 3)  # strided and transposed: (4, in_ch, 10, 12)
    assert not batch.is_contiguous()

    def loss_fn(p, x):
        return F.conv2d(x, p["w"], stride=2, padding=1).sin().sum()

    double = tree.map(lambda t: t.double(), params)
    reference = _flat(naive_per_sample(loss_fn, double, batch.double()))
    got = _flat(ft.per_sample_grads(loss_fn, params, batch, method="layers"))
    # Sums of up to 8·9·30 float32 products: the naive float32 loop is off by as much.
    scale = float(reference.abs().max())
    torch.testing.assert_close(got.double(), reference, rtol=1e-4, atol=2e-6 * scale)
    assert transposed_calls if in_ch == 1 else grouped_calls


def test_examples_with_their_own_batch_keep_the_patches(transposed_calls, grouped_calls):
    """Each example ``(2, C, H, W)``: ``N = 2``, the routes for ``N = 1`` stand aside."""
    params = {"w1": _randn(2, 1, 3, 3, seed=1), "w8": _randn(2, 8, 3, 3, seed=2)}
    batch = {"a": _randn(3, 2, 1, 6, 6, seed=3), "b": _randn(3, 2, 8, 5, 5, seed=4)}

    def loss_fn(p, b):
        one = F.conv2d(b["a"].flatten(0, 1), p["w1"], padding=1)
        eight = F.conv2d(b["b"].flatten(0, 1), p["w8"])
        return one.tanh().mean() + eight.square().mean()

    reference = _flat(naive_per_sample(loss_fn, params, batch))
    for p, b, tol in (
        (params, batch, F64_TOL),
        (tree.map(lambda t: t.float(), params), tree.map(lambda t: t.float(), batch), F32_TOL),
    ):
        got = _flat(ft.per_sample_grads(loss_fn, p, b, method="layers"))
        torch.testing.assert_close(got.to(D), reference, **tol)
    assert not transposed_calls and not grouped_calls


MANY_CHANNELS = {
    "mnist second layer": (2, 16, 8, (4, 4), dict(stride=2), (13, 13)),
    "padded 3x3": (2, 8, 8, (3, 3), dict(padding=1), (6, 5)),
    "padding by dimension": (2, 16, 8, (3, 2), dict(padding=(2, 0), stride=(1, 2)), (5, 7)),
    "padding same, dilated": (2, 8, 8, (3, 3), dict(padding="same", dilation=2), (7, 7)),
    "conv1d strided": (1, 16, 8, (4,), dict(stride=3, padding=2), (17,)),
    "conv3d": (3, 8, 8, (2, 3, 2), dict(padding=(1, 0, 1)), (3, 4, 3)),
}


@pytest.mark.parametrize("name", list(MANY_CHANNELS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_many_channels_take_the_grouped_route(name, dtype, grouped_calls):
    dims, in_ch, out_ch, kernel, options, spatial = MANY_CHANNELS[name]
    loss_fn, (params, batch), cast = _conv_problem(
        dims, in_ch, out_ch, kernel, options, spatial, 4, dtype
    )
    reference = _flat(naive_per_sample(loss_fn, params, batch))
    tol = F32_TOL if dtype == torch.float32 else F64_TOL
    _check_all_reductions(loss_fn, *cast, reference, **tol)
    assert grouped_calls, "the grouped route was not taken"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_float32_channels_off_multiples_of_8_keep_the_patches(dtype, grouped_calls):
    """oneDNN's grouped float32 kernel is slow off multiples of 8 channels (12 -> 5 here);
    float64 has no such penalty and keeps the grouped route."""
    loss_fn, (params, batch), cast = _conv_problem(
        2, 12, 5, (3, 3), dict(padding=1), (6, 5), 4, dtype
    )
    reference = _flat(naive_per_sample(loss_fn, params, batch))
    tol = F32_TOL if dtype == torch.float32 else F64_TOL
    _check_all_reductions(loss_fn, *cast, reference, **tol)
    assert bool(grouped_calls) == (dtype == torch.float64)


@pytest.mark.parametrize(
    "in_ch, kernel", [(8, (1, 1)), (4, (3, 3))], ids=["1x1 kernel", "four channels"]
)
def test_other_convolutions_keep_the_patches(in_ch, kernel, grouped_calls, transposed_calls):
    loss_fn, (params, batch), _ = _conv_problem(2, in_ch, 3, kernel, {}, (5, 6), 3, D)
    reference = _flat(naive_per_sample(loss_fn, params, batch))
    got = _flat(ft.per_sample_grads(loss_fn, params, batch, method="layers"))
    torch.testing.assert_close(got, reference, **F64_TOL)
    assert not grouped_calls and not transposed_calls


@given(
    dims=st.sampled_from([1, 2]),
    in_ch=st.sampled_from([1, 8]),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    extra=st.integers(0, 6),
    rows=st.integers(1, 3),
    float32=st.booleans(),
)
def test_conv_routes_equal_the_naive_loop(
    dims, in_ch, kernel, stride, padding, dilation, extra, rows, float32
):
    size = dilation * (kernel - 1) + 1 + extra  # at least the kernel's span
    options = dict(stride=stride, padding=padding, dilation=dilation)
    dtype = torch.float32 if float32 else D
    loss_fn, (params, batch), (p, b) = _conv_problem(
        dims, in_ch, 3, (kernel,) * dims, options, (size,) * dims, rows, dtype, seed=size
    )
    reference = _flat(naive_per_sample(loss_fn, params, batch))
    got = _flat(ft.per_sample_grads(loss_fn, p, b, method="layers"))
    # float32: sums of up to 8·4²·13² products, relative to the largest gradient entry.
    scale = max(1.0, float(reference.abs().max()))
    tol = dict(rtol=1e-4, atol=2e-6 * scale) if float32 else F64_TOL
    torch.testing.assert_close(got.to(D), reference, **tol)


# --- cross-entropy on the physical batch ----------------------------------------------------


def _classifier(rows=5, tokens=None, classes=4, seed=0):
    """A linear classifier of examples ``(tokens, 3)`` (or ``(3,)`` as a batch of one)."""
    params = {"w": _randn(classes, 3, seed=seed), "b": _randn(classes, seed=seed + 1)}
    shape = (rows, 3) if tokens is None else (rows, tokens, 3)
    x = _randn(*shape, seed=seed + 2)
    y = torch.randint(0, classes, shape[:-1], generator=torch.Generator().manual_seed(seed))
    return params, {"x": x, "y": y}


@pytest.mark.parametrize(
    "call",
    [
        lambda z, y: F.cross_entropy(z, y),
        lambda z, y: F.cross_entropy(z, y, reduction="sum"),
        lambda z, y: (
            F.cross_entropy(z, y, reduction="none").mul(torch.arange(1.0, 1 + len(y))).sum()
        ),
        lambda z, y: torch.nn.CrossEntropyLoss()(z, y) * 2,
    ],
    ids=["mean", "sum", "none", "module"],
)
@pytest.mark.parametrize("tokens", [None, 3], ids=["one row", "three rows"])
def test_cross_entropy_on_the_physical_batch(call, tokens, cross_entropy_calls):
    params, batch = _classifier(tokens=tokens)

    def loss_fn(p, b):
        x = b["x"].reshape(-1, 3)
        return call(F.linear(x, p["w"], p["b"]), b["y"].reshape(-1))

    reference = naive_per_sample(loss_fn, params, batch)
    losses, got = ft.per_sample_value_and_grads(loss_fn, params, batch, method="layers")
    torch.testing.assert_close(_flat(got), _flat(reference), **F64_TOL)
    naive_losses = torch.stack(
        [loss_fn(params, tree.map(lambda t, i=i: t[i : i + 1], batch)) for i in range(5)]
    )
    torch.testing.assert_close(losses, naive_losses, **F64_TOL)
    assert cross_entropy_calls, "the physical cross-entropy was not used"
    auto = _flat(ft.per_sample_grads(loss_fn, params, batch))
    torch.testing.assert_close(auto, _flat(reference), **F64_TOL)


@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_ignored_targets(ignore_index, cross_entropy_calls):
    """A ``"mean"`` over the kept rows; an example whose every target is ignored has a
    ``nan`` loss and zero gradients, as its own call gives."""
    params, batch = _classifier(tokens=2)
    batch["y"][1] = ignore_index  # both rows of example 1
    batch["y"][3, 0] = ignore_index

    def loss_fn(p, b):
        logits = F.linear(b["x"].reshape(-1, 3), p["w"], p["b"])
        return F.cross_entropy(logits, b["y"].reshape(-1), ignore_index=ignore_index)

    reference = _flat(naive_per_sample(loss_fn, params, batch))
    losses, got = ft.per_sample_value_and_grads(loss_fn, params, batch, method="layers")
    torch.testing.assert_close(_flat(got), reference, **F64_TOL)
    naive_losses = torch.stack(
        [loss_fn(params, tree.map(lambda t, i=i: t[i : i + 1], batch)) for i in range(5)]
    )
    torch.testing.assert_close(losses, naive_losses, equal_nan=True, **F64_TOL)
    assert losses[1].isnan() and not losses[[0, 2, 3, 4]].isnan().any()
    assert cross_entropy_calls


@pytest.mark.parametrize(
    "kwargs, target",
    [
        (dict(label_smoothing=0.1), "indices"),
        (dict(weight=torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=D)), "indices"),
        ({}, "probabilities"),
    ],
    ids=["label smoothing", "class weights", "probabilities"],
)
def test_other_cross_entropies_run_under_vmap(kwargs, target, cross_entropy_calls):
    params, batch = _classifier()
    if target == "probabilities":
        batch["y"] = _randn(5, 4, seed=9).softmax(-1)

    def loss_fn(p, b):
        return F.cross_entropy(F.linear(b["x"], p["w"], p["b"]), b["y"], **kwargs)

    reference = naive_per_sample(loss_fn, params, batch)
    got = ft.per_sample_grads(loss_fn, params, batch, method="layers")
    torch.testing.assert_close(_flat(got), _flat(reference), **F64_TOL)
    assert not cross_entropy_calls


def test_cross_entropy_of_a_shared_target_or_of_a_parameter(cross_entropy_calls):
    """A target shared by all examples is broadcast; logits that are a parameter have no
    rule (``"layers"`` refuses, ``"auto"`` falls back to ``vmap``)."""
    params, batch = _classifier()
    shared = torch.tensor([2])

    def shared_target(p, b):
        return F.cross_entropy(F.linear(b["x"], p["w"], p["b"]), shared)

    reference = naive_per_sample(shared_target, params, batch)
    got = ft.per_sample_grads(shared_target, params, batch, method="layers")
    torch.testing.assert_close(_flat(got), _flat(reference), **F64_TOL)
    assert cross_entropy_calls

    params["logits"] = _randn(1, 4, seed=7)

    def logits_param(p, b):
        return F.cross_entropy(p["logits"], b["y"]) + F.linear(b["x"], p["w"], p["b"]).sum()

    with pytest.raises(ValueError, match=r"params\['logits'\] is used by cross_entropy"):
        ft.per_sample_grads(logits_param, params, batch, method="layers")
    auto = ft.per_sample_grads(logits_param, params, batch)
    expected = naive_per_sample(logits_param, params, batch)
    torch.testing.assert_close(_flat(auto), _flat(expected), **F64_TOL)
