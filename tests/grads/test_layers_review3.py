"""Third review of ``method="layers"``: geometry, views, ties and refusals.

Every numeric check compares the per-sample gradients, the ghost norms, the Gram matrix and the
clipped sum against one autograd call per example in float64 (``naive_per_sample``).
"""

import pytest
import torch
import torch.nn.functional as F
from grad_problems import naive_per_sample

import functrain as ft
from functrain import tree
from functrain.grads import _layer_dispatch

D = torch.float64


def _randn(*shape, seed=0, dtype=D):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _flat(per_sample):
    return torch.cat([g.reshape(g.shape[0], -1) for g in tree.leaves(per_sample)], 1).double()


def _check_all(loss_fn, params, batch, *, method="layers", clip=0.4, rtol=1e-10, atol=1e-12):
    """Per-sample grads, norms, Gram and clipped sum against the naive float64 loop."""
    as64 = tree.map(lambda t: t.double() if t.is_floating_point() else t, (params, batch))
    reference = _flat(naive_per_sample(loss_fn, *as64))
    factors = (clip / reference.norm(dim=1)).clamp(max=1.0)
    close = {"rtol": rtol, "atol": atol}
    for chunk_size in (None, 2):
        kw = {"chunk_size": chunk_size, "method": method}
        if method == "layers":
            got = ft.per_sample_grads(loss_fn, params, batch, **kw)
            torch.testing.assert_close(_flat(got), reference, **close)
        norms = ft.per_sample_grad_norms(loss_fn, params, batch, **kw).global_norm
        torch.testing.assert_close(norms.double(), reference.norm(dim=1), **close)
        gram = ft.per_sample_gram(loss_fn, params, batch, **kw)
        torch.testing.assert_close(gram.double(), reference @ reference.T, **close)
        summed = ft.clipped_grad_sum(loss_fn, params, batch, clip, **kw).grad_sum
        flat_sum = _flat(tree.map(lambda t: t[None], summed))[0]
        torch.testing.assert_close(flat_sum, factors @ reference, **close)


def _refused(loss_fn, params, batch, match):
    for run in (
        lambda: ft.per_sample_grads(loss_fn, params, batch, method="layers"),
        lambda: ft.per_sample_grad_norms(loss_fn, params, batch, method="layers"),
        lambda: ft.per_sample_gram(loss_fn, params, batch, method="layers"),
        lambda: ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method="layers"),
    ):
        with pytest.raises(ValueError, match=match):
            run()


B = 5
X = _randn(B, 5, seed=1)
W, BIAS = _randn(3, 5, seed=2), _randn(3, seed=3)
IDX = torch.randint(0, 7, (B, 6), generator=torch.Generator().manual_seed(4))
IDX[0, :4] = 2  # the padding row, repeated within an example
IDX[1] = 3  # one row repeated over the whole example
EMB = _randn(7, 5, seed=5)


# --- Bugs found in this review (fixed) ------------------------------------------------------


def test_embedding_of_empty_sequences():
    """Indices ``(B, 0)`` crashed the embedding rule's backward (``reshape(B, 0, -1)``)."""

    def loss_fn(p, b):
        return F.embedding(b["i"], p["e"]).sum() + F.linear(b["x"], p["e"]).sin().sum()

    batch = {"i": torch.zeros(B, 0, dtype=torch.long), "x": X}
    _check_all(loss_fn, {"e": EMB}, batch)


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        (  # (a trained grouped weight has a rule; a bias torch's convolution refuses, none)
            lambda p, x: F.conv1d(x[:, None].expand(-1, 2, -1), p["g"], p["n"], groups=2).sum(),
            r"params\['g'\] is used by conv1d with a bias of shape \(5,\)",
        ),
        (
            lambda p, x: F.conv1d(x[:, None], p["c"], padding="same", stride=2).sum(),
            r"params\['c'\] is used by conv1d with padding='same' and a stride other than 1",
        ),
        (
            lambda p, x: F.embedding(IDX[:1], p["e"], max_norm=1.0).sum() * x.sum(),
            r"params\['e'\] is used by embedding with max_norm",
        ),
        (
            lambda p, x: F.embedding(IDX[:1], p["e"], scale_grad_by_freq=True).sum() * x.sum(),
            r"params\['e'\] is used by embedding with scale_grad_by_freq=True",
        ),
        (
            lambda p, x: F.linear(p["n"], p["w"]).sum() * x.sum(),
            r"params\['n'\] is used by linear with a parameter as its input",
        ),
        (
            lambda p, x: F.linear(x, p["w"][:, :5]).sum() * x.sum(),
            r"params\['w'\] is used by __getitem__",
        ),
        (
            lambda p, x: torch.ops.aten.linear(x, p["w"]).sum(),
            r"params\['w'\] is used by linear through torch.ops",
        ),
    ],
    ids=[
        "groups-bias-shape",
        "same-strided",
        "max-norm",
        "grad-by-freq",
        "param-input",
        "weight-view",
        "aten-linear",
    ],
)
def test_refusals_say_which_argument_has_no_rule(loss_fn, match):
    """The refusal of a call that has a rule read "linear, which has no per-layer rule (rules:
    linear, ...)", contradicting itself; it now names what the rule does not cover."""
    params = {
        "w": W,
        "b": BIAS,
        "g": _randn(4, 1, 3, seed=6),
        "c": _randn(2, 1, 3, seed=7),
        "e": EMB,
        "n": _randn(5, seed=8),
    }
    _refused(loss_fn, params, X, match)


# --- Cases that already worked (regression tests) -------------------------------------------

CONV_IMG = _randn(B, 2, 7, 6, seed=10)
CONV_CASES = {
    "conv1d-tuples": (
        lambda p, x: F.conv1d(x[..., 0], p["w"], p["b"], stride=(2,), padding=(2,), dilation=(3,)),
        (3, 2, 3),
    ),
    "conv3d-tuples": (
        lambda p, x: F.conv3d(
            x.unsqueeze(2).expand(-1, -1, 3, -1, -1),
            p["w"],
            p["b"],
            stride=(1, 2, 1),
            padding=(1, 0, 2),
            dilation=(2, 1, 1),
        ),
        (3, 2, 2, 3, 2),
    ),
    "conv3d-same-dilated": (
        lambda p, x: F.conv3d(x[:, :, None], p["w"], p["b"], padding="same", dilation=(1, 2, 1)),
        (3, 2, 1, 3, 3),
    ),
    "valid-strided": (lambda p, x: F.conv2d(x, p["w"], p["b"], 2, "valid"), (3, 2, 3, 3)),
    "asymmetric-pad": (lambda p, x: F.conv2d(F.pad(x, (1, 0, 2, 3)), p["w"], p["b"]), (3, 2, 3, 3)),
    "channels-last": (
        lambda p, x: F.conv2d(x, p["w"], p["b"], padding=1),
        (3, 2, 3, 3),
    ),
    "transposed-sliced": (
        lambda p, x: F.conv2d(x.transpose(-1, -2)[..., 1:], p["w"], p["b"], padding=(1, 0)),
        (3, 2, 3, 2),
    ),
    "used-twice": (
        lambda p, x: F.conv2d(F.conv2d(x, p["w"], p["b"], padding=1).tanh(), p["w"], p["b"], 2),
        (2, 2, 3, 3),
    ),
}


@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_geometry(name):
    fn, shape = CONV_CASES[name]
    params = {"w": _randn(*shape, seed=11), "b": _randn(shape[0], seed=12)}
    img = CONV_IMG.contiguous(memory_format=torch.channels_last)
    _check_all(lambda p, x: fn(p, x).sin().sum(), params, img if "last" in name else CONV_IMG)


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_module_padding_modes(mode, bias):
    module = torch.nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=1, padding_mode=mode, bias=bias)
    model, params, _ = ft.functionalize(module.double())
    _check_all(lambda p, x: model(p, x).sin().sum(), params, CONV_IMG)


def test_linear_on_several_leading_dims_and_weight_reuse():
    def loss_fn(p, b):
        h = F.linear(b["a"], p["w"], p["b"]).tanh()  # (T1, T2, 3) per example
        again = F.linear(b["t"], p["w"])  # the same weight on (T, 5)
        return F.linear(h, p["v"]).sin().sum() + again.cos().sum()

    batch = {"a": _randn(B, 3, 2, 5, seed=13), "t": _randn(B, 4, 5, seed=14)}
    _check_all(loss_fn, {"w": W, "b": BIAS, "v": _randn(5, 3, seed=15)}, batch)


def test_tied_embedding_with_padding_and_a_summed_loss():
    def loss_fn(p, i):
        logits = F.linear(F.embedding(i, p["e"], padding_idx=2).tanh(), p["e"])
        return F.cross_entropy(logits.flatten(0, 1), i.flatten(), reduction="sum")

    _check_all(loss_fn, {"e": EMB}, IDX)
    long = torch.randint(0, 7, (B, 40), generator=torch.Generator().manual_seed(16))
    _check_all(lambda p, i: F.embedding(i, p["e"], padding_idx=0).sin().sum(), {"e": EMB}, long)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_without_bias_and_on_two_dims(bias):
    module = torch.nn.LayerNorm((2, 5), bias=bias).double()
    model, params, _ = ft.functionalize(module)
    params = tree.map(lambda t: t + _randn(*t.shape, seed=17), params)
    x = _randn(B, 3, 2, 5, seed=18)
    _check_all(lambda p, x: F.linear(model(p, x), W).sin().sum(), params, x)


def test_layer_norm_without_affine_before_a_linear():
    x = _randn(B, 3, 5, seed=19)
    _check_all(lambda p, x: F.linear(F.layer_norm(x, (5,)), p["w"]).sin().sum(), {"w": W}, x)


def test_module_with_a_buffer_and_a_batch_of_one():
    class Shifted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(5, 3)
            self.register_buffer("shift", torch.randn(5))

        def forward(self, x):
            return self.lin(x + self.shift)

    torch.manual_seed(0)
    model, params, _ = ft.functionalize(Shifted().double())
    _check_all(lambda p, x: model(p, x).sin().sum(), params, X[:1])


def test_float32_against_a_float64_loop():
    def loss_fn(p, x):
        h = F.conv1d(x[:, None], p["c"], padding=1).flatten(1)
        return F.linear(F.layer_norm(h, (10,), p["n"]), p["w"]).sin().sum()

    params = {"c": _randn(2, 1, 3, seed=22), "n": _randn(10, seed=23), "w": _randn(3, 10, seed=24)}
    f32 = tree.map(lambda t: t.float(), params)
    _check_all(loss_fn, f32, X.float(), rtol=1e-4, atol=1e-4)


def test_auto_falls_back_to_vmap_for_a_matmul(monkeypatch):
    """``method="auto"`` with a parameter no rule covers is still exact (through vmap)."""
    monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)

    def loss_fn(p, x):
        return (torch.matmul(x, p["m"]) + F.linear(x, p["w"], p["b"])).sin().sum()

    params = {"m": _randn(5, 3, seed=20), "w": W, "b": BIAS}
    _check_all(loss_fn, params, _randn(B, 2, 5, seed=21), method="auto")
