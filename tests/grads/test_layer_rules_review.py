"""Adversarial cases of ``method="layers"``: each either matches the naive loop or raises.

Every numeric check compares against one autograd call per example (float64), for both the
per-sample gradients and the ghost-clipped sum.
"""

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from grad_problems import naive_per_sample, transformer_problem

import functrain as ft
from functrain import tree
from functrain.grads import _layer_dispatch
from functrain.testing import assert_trees_all_close

D = torch.float64
B = 5


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=_gen(seed), dtype=D)


def _clipped(ps, clip):
    norms = torch.stack([g.reshape(g.shape[0], -1).square().sum(1) for g in tree.leaves(ps)])
    factors = (clip / norms.sum(0).sqrt()).clamp(max=1.0)
    return tree.map(lambda g: torch.einsum("i,i...->...", factors, g), ps)


def _check(loss_fn, params, batch, clip=0.3, rtol=1e-10, atol=1e-12, **kw):
    expected = naive_per_sample(
        loss_fn, params, batch, **{k: v for k, v in kw.items() if k == "buffers"}
    )
    got = ft.per_sample_grads(loss_fn, params, batch, method="layers", **kw)
    assert_trees_all_close(got, expected, rtol=rtol, atol=atol)
    out = ft.clipped_grad_sum(loss_fn, params, batch, clip, method="layers", **kw)
    assert_trees_all_close(out.grad_sum, _clipped(expected, clip), rtol=rtol, atol=atol)


def _refused(loss_fn, params, batch, match):
    with pytest.raises(ValueError, match=match):
        ft.per_sample_grads(loss_fn, params, batch, method="layers")
    with pytest.raises(ValueError, match=match):
        ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method="layers")


X3 = _randn(B, 3, 5)  # B examples of 3 rows of 5 features
W = _randn(4, 5, seed=1)
BIAS = _randn(4, seed=2)
IMG = _randn(B, 2, 7, 6, seed=3)
KER = _randn(3, 2, 3, 2, seed=4)
KB = _randn(3, seed=5)
SEQ = _randn(B, 2, 9, seed=6)
IDX = torch.randint(0, 6, (B, 5), generator=_gen(7))
IDX[0, :3] = 5  # the padding row (-1), repeated within an example
EMB = _randn(6, 4, seed=8)
CONST = _randn(3, 5, seed=9)  # the same for every example
CONST_IMG = _randn(1, 2, 7, 6, seed=20)


# --- Bugs found in review (fixed) ----------------------------------------------------------


def test_linear_with_keyword_arguments():
    """``F.linear(input=x, weight=w)`` crashed with a TypeError (and so did method="auto")."""
    _check(
        lambda p, x: F.linear(input=x, weight=p["w"], bias=p["b"]).sin().sum(),
        {"w": W, "b": BIAS},
        X3,
    )


@pytest.mark.parametrize("bias_shape", [(1,), ()])
def test_linear_with_a_broadcast_bias_is_refused(bias_shape, monkeypatch):
    """A bias broadcast over the outputs gave gradients of the wrong shape, ``(B, out)`` for a
    ``(1,)`` bias, and wrong ghost norms (Σ g² instead of (Σ g)²), silently."""
    params = {"w": W, "b": _randn(*bias_shape, seed=10)}

    def loss_fn(p, x):
        return F.linear(x, p["w"], p["b"]).sin().sum()

    _refused(loss_fn, params, X3, r"params\['b'\] is used by linear as a broadcast bias")
    # "auto" tries the rules, then falls back
    monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)
    got = ft.clipped_grad_sum(loss_fn, params, X3, 0.3).grad_sum
    assert_trees_all_close(
        got, _clipped(naive_per_sample(loss_fn, params, X3), 0.3), rtol=1e-10, atol=1e-12
    )


def test_linear_with_a_vector_weight_is_refused():
    """``F.linear(x, v)`` with a 1-d weight crashed inside the rule instead of being refused."""
    _refused(lambda p, x: F.linear(x, p["v"]).sin().sum(), {"v": _randn(5)}, X3, r"params\['v'\]")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(
    "geometry",
    [{"stride": (2,)}, {"padding": [1]}, {"dilation": (2,)}, {"stride": [1], "padding": "same"}],
)
def test_conv2d_with_one_element_geometry(geometry):
    """PyTorch expands ``stride=(2,)`` to every dimension; the rule used one dimension only."""
    _check(
        lambda p, x: F.conv2d(x, p["w"], p["b"], **geometry).sin().sum(), {"w": KER, "b": KB}, IMG
    )


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda p, x: torch.vmap(lambda row: (x * row).sin().sum())(p["w"]).sum(),
        lambda p, x: torch.vmap(lambda row: F.linear(x, row[None]))(p["w"]).sin().sum(),
        lambda p, x: torch.func.jacrev(lambda w: F.linear(x, w).sin().sum())(p["w"]).sum(),
    ],
    ids=["vmap-elementwise", "vmap-linear", "jacrev"],
)
def test_torch_func_transform_over_a_parameter_is_refused(loss_fn):
    """A parameter wrapped by a transform inside ``loss_fn`` was an unknown tensor to the rules,
    hence a constant: its gradient was silently dropped (off by 3.8 in the first case)."""
    _refused(loss_fn, {"w": W}, X3, r"params\['w'\] is used by .* under a torch.func transform")


def test_inner_vmap_over_an_input_shared_by_the_examples():
    """A linear inside ``loss_fn``'s own vmap over a constant saw no example dimension: its
    "per-example" gradients had the constant's row count (3) instead of B."""

    def loss_fn(p, x):
        return torch.vmap(lambda r: F.linear(r, p["w"]).sin())(CONST).sum() * x.sum()

    _check(loss_fn, {"w": W}, X3)


def test_has_aux_comes_back_without_autograd_history():
    """The aux of the layers method kept the graph of the rules (``requires_grad=True``)."""

    def loss_fn(p, x):
        out = F.linear(x, p["w"], p["b"])
        return out.sin().mean(), out

    results = [
        ft.per_sample_value_and_grads(loss_fn, {"w": W, "b": BIAS}, X3, has_aux=True, method=m)
        for m in ("vmap", "layers")
    ]
    assert_trees_all_close(results[1], results[0], rtol=1e-10, atol=1e-12)
    assert not results[1][0][1].requires_grad


def test_embedding_padding_idx_out_of_range_raises():
    """F.embedding asserts the range only after the mode took the call: no error came."""
    with pytest.raises(ValueError, match="padding_idx 7 is out of range"):
        ft.per_sample_grads(
            lambda p, i: F.embedding(i, p["e"], padding_idx=7).sum(),
            {"e": EMB},
            IDX,
            method="layers",
        )


# --- Cases that already worked (regression tests) ------------------------------------------

LINEAR_CASES = {
    "one-d-input": lambda p, x: F.linear(x[0, 0], p["w"], p["b"]).sin().sum(),
    "two-inner-dims": lambda p, x: (
        F.linear(x.unsqueeze(2).expand(-1, -1, 2, -1), p["w"]).sin().sum()
    ),
    "used-twice": lambda p, x: (
        F.linear(x, p["w"]).sin().sum() + F.linear(x.cos(), p["w"]).square().sum()
    ),
    "non-contiguous": lambda p, x: (
        F.linear(x.transpose(-1, -2).flip(-1).transpose(-1, -2), p["w"]).sin().sum()
    ),
    "constant-plus-batched": lambda p, x: (
        (F.linear(CONST, p["w"]) + F.linear(x, p["w"], p["b"])).sin().sum()
    ),
    "constant-only": lambda p, x: F.linear(CONST, p["w"]).sin().sum() * x.sum(),
    "inner-vmap-over-rows": lambda p, x: torch.vmap(lambda r: F.linear(r, p["w"]).sin())(
        x[0]
    ).sum(),
    "inner-vmap-param-unbatched": lambda p, x: torch.vmap(
        lambda r, w: F.linear(r, w).sin(), in_dims=(0, None)
    )(x[0], p["w"]).sum(),
    "detached-output": lambda p, x: (
        F.linear(x, p["w"]).detach().sum() + F.linear(x, p["w"], p["b"]).sin().sum()
    ),
    "unused-and-param-free": lambda p, x: x.sin().sum(),
}


@pytest.mark.parametrize("name", LINEAR_CASES)
def test_linear_cases(name):
    _check(LINEAR_CASES[name], {"w": W, "b": BIAS}, X3)


def test_recurrent_use_of_one_weight():
    w, b = _randn(5, 5, seed=11), _randn(5, seed=12)

    def loss_fn(p, x):
        h = x[:, 0]
        for t in range(3):
            h = torch.tanh(F.linear(h, p["w"], p["b"]) + x[:, t])
        return h.sin().sum()

    _check(loss_fn, {"w": w, "b": b}, X3)


CONV_CASES = {
    "keywords": lambda p, x: F.conv2d(
        input=x, weight=p["w"], bias=p["b"], stride=(2, 1), padding=(1, 2), dilation=(2, 1)
    ),
    "positional-lists": lambda p, x: F.conv2d(x, p["w"], p["b"], [1, 2], [0, 1]),
    "same-even-dilated": lambda p, x: F.conv2d(x, p["w"], p["b"], padding="same", dilation=(1, 2)),
    "unbatched-image": lambda p, x: F.conv2d(x[0], p["w"], p["b"], groups=1),
    "transposed-input": lambda p, x: F.conv2d(x.transpose(-1, -2), p["w"], p["b"]),
    "expanded-input": lambda p, x: F.conv2d(x[:, :, :1].expand(-1, -1, 7, -1), p["w"], p["b"]),
    "constant-times-batched": lambda p, x: (
        F.conv2d(CONST_IMG, p["w"], p["b"]) * F.conv2d(x, p["w"])
    ),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_cases(name):
    _check(lambda p, x: CONV_CASES[name](p, x).sin().sum(), {"w": KER, "b": KB}, IMG)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_conv1d_unbatched_same_padding_even_kernel():
    params = {"w": _randn(3, 2, 4, seed=13)}
    _check(lambda p, x: F.conv1d(x[0], p["w"], None, padding="same").sin().sum(), params, SEQ)


_LAYER_NORM = torch.nn.LayerNorm(5, dtype=D)
NORM_CASES = {
    "weight-only-keywords": (("w",), lambda p, x: F.layer_norm(x, (5,), weight=p["w"], bias=None)),
    "bias-only": (("b",), lambda p, x: F.layer_norm(x, [5], bias=p["b"])),
    "weight-is-bias": (("w",), lambda p, x: F.layer_norm(x, (5,), p["w"], p["w"])),
    "all-keywords": (
        ("w", "b"),
        lambda p, x: F.layer_norm(
            input=x, normalized_shape=(5,), weight=p["w"], bias=p["b"], eps=0.1
        ),
    ),
    "constant-input": (("w", "b"), lambda p, x: F.layer_norm(CONST, (5,), p["w"], p["b"]) * x),
    "module": (
        ("weight", "bias"),
        lambda p, x: torch.func.functional_call(_LAYER_NORM, p, (x,)),
    ),
}


@pytest.mark.parametrize("name", NORM_CASES)
def test_layer_norm_cases(name):
    names, fn = NORM_CASES[name]
    params = {n: _randn(5, seed=14 + i) for i, n in enumerate(names)}
    _check(lambda p, x: fn(p, x).sin().sum(), params, X3)


EMBEDDING_CASES = {
    "negative-padding-idx": lambda p, i: F.embedding(i, p["e"], padding_idx=-1),
    "keywords": lambda p, i: F.embedding(input=i, weight=p["e"], padding_idx=2),
    "one-index": lambda p, i: F.embedding(i[0, 0], p["e"]),
    "constant-indices": lambda p, i: F.embedding(torch.arange(5), p["e"]) * i.unsqueeze(-1),
    "tied-with-linear": lambda p, i: F.linear(F.embedding(i, p["e"]).tanh(), p["e"]).log_softmax(
        -1
    ),
}


@pytest.mark.parametrize("name", EMBEDDING_CASES)
def test_embedding_cases(name):
    _check(lambda p, i: EMBEDDING_CASES[name](p, i).sin().sum(), {"e": EMB}, IDX)


def test_integer_and_boolean_first_batch_leaves():
    """The anchor slice comes from the first batch leaf, here not floating-point."""
    batch = {"a": IDX, "m": IDX > 2, "x": X3[:, 0]}

    def loss_fn(p, b):
        h = F.embedding(b["a"], p["e"]) * b["m"].unsqueeze(-1)
        return (F.linear(h, p["w2"]) + F.linear(b["x"], p["w"])).sin().sum()

    _check(loss_fn, {"e": EMB, "w": W, "w2": _randn(4, 4, seed=16)}, batch)


def test_loss_sum_loss_output_buffers_and_chunks():
    params = {"w": W, "b": BIAS}
    buffers = {"m": _randn(4, seed=17), "v": _randn(4, seed=18).abs() + 0.5}

    def with_buffers(p, x, buffers):
        h = F.linear(x, p["w"], p["b"]).transpose(-1, -2)
        return F.batch_norm(h, buffers["m"], buffers["v"]).sin().sum()

    def loss_sum(p, x):
        return ft.LossSum(F.linear(x, p["w"], p["b"]).sin().sum(), (x[..., 0] > 0).sum() + 1)

    def loss_output(p, x):
        out = F.linear(x, p["w"], p["b"])
        return ft.LossOutput(out.sin().mean(), aux={"logits": out})

    _check(with_buffers, params, X3, buffers=buffers, chunk_size=2)
    _check(loss_sum, params, X3, chunk_size=3)
    _check(loss_output, params, X3, chunk_size=4)


class _Params(NamedTuple):
    w: torch.Tensor
    b: torch.Tensor


def test_parameter_containers_and_requires_grad():
    _check(lambda p, x: F.linear(x, p.w, p.b).sin().sum(), _Params(W, BIAS), X3)
    nested = {"layers": [{"w": W.clone().requires_grad_(True)}, BIAS]}
    _check(lambda p, x: F.linear(x, p["layers"][0]["w"], p["layers"][1]).sin().sum(), nested, X3)


def test_float32_against_a_float64_reference():
    def loss_fn(p, x):
        return F.linear(x, p["w"], p["b"]).sin().sum()

    params32 = {"w": W.float(), "b": BIAS.float()}
    expected = naive_per_sample(loss_fn, {"w": W, "b": BIAS}, X3.float().double())
    got = ft.per_sample_grads(loss_fn, params32, X3.float(), method="layers")
    assert all(g.dtype == torch.float32 for g in tree.leaves(got))
    assert_trees_all_close(tree.map(torch.Tensor.double, got), expected, rtol=1e-5, atol=1e-5)
    out = ft.clipped_grad_sum(loss_fn, params32, X3.float(), 0.3, method="layers")
    assert_trees_all_close(
        tree.map(torch.Tensor.double, out.grad_sum), _clipped(expected, 0.3), rtol=1e-5, atol=1e-6
    )


def test_functionalized_module():
    module = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.GELU(), torch.nn.Linear(4, 2)
    ).double()
    model, params, _ = ft.functionalize(module)
    _check(lambda p, x: model(p, x).sin().sum(), params, X3)
    emb, head = torch.nn.Embedding(6, 4).double(), torch.nn.Linear(4, 6, bias=False).double()
    head.weight = emb.weight
    tied, tied_params, _ = ft.functionalize(torch.nn.Sequential(emb, torch.nn.Tanh(), head))
    _check(lambda p, i: tied(p, i).log_softmax(-1).sum(), tied_params, IDX)


REFUSED = {
    "transposed-weight": (lambda p, x: F.linear(x[..., :4], p["w"].t()).sum(), r"is used by t\b"),
    "rule-then-sum": (lambda p, x: F.linear(x, p["w"]).sum() + p["w"].sum(), r"is used by sum"),
    "aten-linear": (lambda p, x: torch.ops.aten.linear(x, p["w"]).sum(), r"is used by linear"),
    "max-norm": (
        lambda p, x: F.embedding(IDX[:1], p["e"], max_norm=1.0).sum() * x.sum(),
        "embedding",
    ),
    "grad-by-freq": (
        lambda p, x: F.embedding(IDX[:1], p["e"], scale_grad_by_freq=True).sum() * x.sum(),
        "embedding",
    ),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused(name):
    fn, match = REFUSED[name]
    params = {"w": W, "b": _randn(5, seed=19), "e": EMB}
    _refused(fn, params, X3, match)


def test_transformer_and_rnn_modules_are_refused():
    loss_fn, params, batch = transformer_problem(2)
    _refused(loss_fn, params, batch, "multi_head_attention_forward")
    rnn = torch.nn.RNN(5, 3).double()
    rnn_params = {k: v.detach() for k, v in rnn.named_parameters()}
    _refused(
        lambda p, x: torch.func.functional_call(rnn, p, (x[0],))[0].sum(),
        rnn_params,
        X3,
        "rnn_tanh",
    )


@pytest.mark.parametrize("method", ["vmap", "layers"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_clipped_sum_of_no_parameters(method, chunk_size):
    x = torch.randn(5, 2, dtype=torch.float64)
    out = ft.clipped_grad_sum(
        lambda p, b: b.square().sum(), {}, x, 1.0, method=method, chunk_size=chunk_size
    )
    assert out.grad_sum == {} and int(out.num_clipped) == 0 and out.count == 5
    torch.testing.assert_close(out.loss_sum, x.square().sum(), rtol=1e-12, atol=0)
