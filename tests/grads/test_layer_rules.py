"""``method="layers"``: per-sample gradients and ghost-clipped sums from per-layer rules."""

import math

import pytest
import torch
import torch.nn.functional as F
from grad_problems import LAYER_PROBLEMS, PROBLEMS, mlp_problem, naive_per_sample
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

import functrain as ft
from functrain import tree
from functrain.grads import _layer_dispatch, _layer_passes, _layer_rules, clipping
from functrain.testing import assert_trees_all_close, assert_trees_all_equal


def _clip_reference(ps, clip):
    """Σᵢ gᵢ·min(1, C/‖gᵢ‖) from per-sample gradients, and how many were clipped."""
    norms = torch.stack([g.reshape(g.shape[0], -1).square().sum(1) for g in tree.leaves(ps)])
    factors = (clip / norms.sum(0).sqrt()).clamp(max=1.0)
    total = tree.map(lambda g: torch.einsum("i,i...->...", factors, g), ps)
    return total, int((factors < 1).sum())


@pytest.mark.parametrize("name", LAYER_PROBLEMS)
def test_per_sample_matches_naive_loop(name):
    loss_fn, params, batch = PROBLEMS[name]()
    expected = naive_per_sample(loss_fn, params, batch)
    got = ft.per_sample_grads(loss_fn, params, batch, method="layers")
    assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", LAYER_PROBLEMS)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_ghost_clipped_sum_matches_naive_clip(name, chunk_size):
    loss_fn, params, batch = PROBLEMS[name]()
    ps = naive_per_sample(loss_fn, params, batch)
    norms = torch.stack([g.reshape(g.shape[0], -1).square().sum(1) for g in tree.leaves(ps)])
    clip = float(norms.sum(0).sqrt().median())  # about half the examples get clipped
    expected, clipped = _clip_reference(ps, clip)
    out = ft.clipped_grad_sum(loss_fn, params, batch, clip, method="layers", chunk_size=chunk_size)
    assert_trees_all_close(out.grad_sum, expected, rtol=1e-10, atol=1e-12)
    assert int(out.num_clipped) == clipped > 0
    n = tree.leaves(batch)[0].shape[0]
    losses = [loss_fn(params, tree.map(lambda x, i=i: x[i : i + 1], batch)) for i in range(n)]
    assert out.count == n
    torch.testing.assert_close(out.loss_sum, torch.stack(losses).sum(), rtol=1e-12, atol=0)


@settings(deadline=None, max_examples=25)
@given(
    dims=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    bias=st.booleans(),
    n_inner=st.integers(-1, 2),
)
def test_conv_rule_matches_naive_loop_for_any_geometry(
    dims, kernel, stride, dilation, padding, bias, n_inner
):
    """Any stride, dilation and padding; an example is one image (``n_inner=0``), one image
    without a batch dimension (``-1``) or an inner batch of several images."""
    g = torch.Generator().manual_seed(dims * 100 + kernel * 10 + stride)
    size = dilation * (kernel - 1) + 2 + stride
    conv = [F.conv1d, F.conv2d, F.conv3d][dims - 1]
    params = {"w": torch.randn(3, 2, *[kernel] * dims, generator=g, dtype=torch.float64)}
    if bias:
        params["b"] = torch.randn(3, generator=g, dtype=torch.float64)
    shape = (n_inner,) if n_inner > 0 else ()
    batch = torch.randn(4, *shape, 2, *[size] * dims, generator=g, dtype=torch.float64)

    def loss_fn(p, x):
        x = x.flatten(0, 1) if n_inner > 0 else x[0] if n_inner < 0 else x
        out = conv(x, p["w"], p.get("b"), stride, padding, dilation)
        return out.sin().sum()

    expected = naive_per_sample(loss_fn, params, batch)
    assert_trees_all_close(
        ft.per_sample_grads(loss_fn, params, batch, method="layers"),
        expected,
        rtol=1e-10,
        atol=1e-12,
    )
    clipped, _ = _clip_reference(expected, 0.5)
    assert_trees_all_close(
        ft.clipped_grad_sum(loss_fn, params, batch, 0.5, method="layers").grad_sum,
        clipped,
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_same_padding_with_an_even_kernel_pads_asymmetrically():
    g = torch.Generator().manual_seed(7)
    params = {"w": torch.randn(2, 1, 2, 4, generator=g, dtype=torch.float64)}
    batch = torch.randn(3, 1, 5, 6, generator=g, dtype=torch.float64)

    def loss_fn(p, x):
        return F.conv2d(x, p["w"], padding="same").tanh().sum()

    got = ft.per_sample_grads(loss_fn, params, batch, method="layers")
    assert_trees_all_close(got, naive_per_sample(loss_fn, params, batch), rtol=1e-10)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_linear_norm_routes_agree(rows):
    """One row per example, few rows (the ghost identity) and many rows (forming gᵀx)."""
    g = torch.Generator().manual_seed(rows)
    params = {"w": torch.randn(5, 7, generator=g, dtype=torch.float64)}
    batch = torch.randn(4, rows, 7, generator=g, dtype=torch.float64)

    def loss_fn(p, x):
        return F.linear(x, p["w"]).tanh().sum()

    ps = naive_per_sample(loss_fn, params, batch)
    expected, _ = _clip_reference(ps, 0.1)
    got = ft.clipped_grad_sum(loss_fn, params, batch, 0.1, method="layers").grad_sum
    assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-12)


def test_unused_parameter_and_zero_gradients():
    params = {"w": torch.ones(2, 3, dtype=torch.float64), "unused": torch.ones(4)}
    batch = torch.zeros(3, 3, dtype=torch.float64)  # zero inputs: zero weight gradients

    def loss_fn(p, x):
        return F.linear(x, p["w"]).sum()

    grads = ft.per_sample_grads(loss_fn, params, batch, method="layers")
    assert_trees_all_equal(
        grads, tree.map(lambda p: torch.zeros(3, *p.shape, dtype=p.dtype), params)
    )
    out = ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method="layers")
    assert_trees_all_equal(out.grad_sum, tree.zeros_like(params))
    assert int(out.num_clipped) == 0


def test_inputs_untouched_and_outputs_detached():
    loss_fn, params, batch = PROBLEMS["lm"]()
    params = tree.map(lambda p: p.clone().requires_grad_(True), params)
    before = tree.map(lambda p: p.detach().clone(), params)
    grads = ft.per_sample_grads(loss_fn, params, batch, method="layers")
    out = ft.clipped_grad_sum(loss_fn, params, batch, 0.1, method="layers")
    assert_trees_all_equal(tree.map(torch.Tensor.detach, params), before, bitwise=True)
    for leaf in tree.leaves((grads, out.grad_sum, out.loss_sum)):
        assert not leaf.requires_grad
    assert all(p.grad is None for p in tree.leaves(params))


def test_unsupported_use_names_the_parameter():
    loss_fn, params, batch = PROBLEMS["tied"]()  # indexes an embedding matrix directly
    with pytest.raises(ValueError, match=r"params\['emb'\] is used by __getitem__"):
        ft.per_sample_grads(loss_fn, params, batch, method="layers")
    with pytest.raises(ValueError, match=r"params\['emb'\]"):
        ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method="layers")


def test_batch_norm_is_refused():
    # (A grouped convolution, once refused here too, has a rule: test_layer_grouped_weight.py.)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    bn = {"weight": torch.ones(4, dtype=torch.float64), "bias": torch.zeros(4, dtype=torch.float64)}
    stats = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"params\['weight'\] is used by batch_norm"):
        ft.per_sample_grads(
            lambda p, x: F.batch_norm(x, *stats, p["weight"], p["bias"]).sum(),
            bn,
            x,
            method="layers",
        )


def test_auto_uses_ghost_clipping_only_when_it_applies(monkeypatch):
    calls = []
    original = clipping.clipped_sum_by_layers

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(clipping, "clipped_sum_by_layers", spy)
    monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)  # every model counts as large
    for name in ("mlp", "tied"):
        loss_fn, params, batch = PROBLEMS[name]()
        expected, clipped = _clip_reference(naive_per_sample(loss_fn, params, batch), 0.2)
        out = ft.clipped_grad_sum(loss_fn, params, batch, 0.2)
        assert_trees_all_close(out.grad_sum, expected, rtol=1e-10, atol=1e-12)
        assert int(out.num_clipped) == clipped
    assert len(calls) == 2  # tried on both; "tied" fell back to vmap after the attempt
    monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", math.inf)
    loss_fn, params, batch = mlp_problem()
    ft.clipped_grad_sum(loss_fn, params, batch, 0.2)
    assert len(calls) == 2  # small per-sample gradients: vmap


def test_randomness_and_has_aux_follow_the_vmap_method():
    loss_fn, params, batch = mlp_problem()

    def noisy(p, b):
        return loss_fn(p, {**b, "x": F.dropout(b["x"], 0.5)}), b["y"]

    results = []
    for method in ("vmap", "layers"):
        torch.manual_seed(0)
        results.append(
            ft.per_sample_value_and_grads(
                noisy, params, batch, randomness="different", has_aux=True, method=method
            )
        )
    assert_trees_all_close(results[1], results[0], rtol=1e-10, atol=1e-12)


def test_bad_method():
    loss_fn, params, batch = mlp_problem()
    with pytest.raises(ValueError, match="method must be one of"):
        ft.per_sample_grads(loss_fn, params, batch, method="ghost")
    with pytest.raises(ValueError, match="method must be one of"):
        ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method="fast")


def test_layers_method_refuses_to_compile():
    loss_fn, params, batch = mlp_problem()
    for fn in (
        lambda: ft.per_sample_grads(loss_fn, params, batch, method="layers"),
        lambda: ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method="layers"),
    ):
        with pytest.raises(Exception, match="runs eagerly only"):
            torch.compile(fn, backend="eager", fullgraph=True)()


@pytest.mark.parametrize("name", LAYER_PROBLEMS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_ghost_norms_match_naive_norms(name, chunk_size):
    loss_fn, params, batch = PROBLEMS[name]()
    ps = naive_per_sample(loss_fn, params, batch)
    leaf = tree.map(lambda g: g.reshape(g.shape[0], -1).norm(dim=1), ps)
    total = torch.stack(tree.leaves(leaf)).square().sum(0).sqrt()
    got = ft.per_sample_grad_norms(loss_fn, params, batch, chunk_size=chunk_size, method="layers")
    assert_trees_all_close(got.leaf_norms, leaf, rtol=1e-10, atol=1e-12)
    assert_trees_all_close(got.global_norm, total, rtol=1e-10, atol=1e-12)


def test_ghost_norms_auto_and_fallback(monkeypatch):
    monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)
    for name in ("mlp", "transformer"):  # the transformer falls back to vmap
        loss_fn, params, batch = PROBLEMS[name]()
        ps = naive_per_sample(loss_fn, params, batch)
        leaf = tree.map(lambda g: g.reshape(g.shape[0], -1).norm(dim=1), ps)
        got = ft.per_sample_grad_norms(loss_fn, params, batch)
        assert_trees_all_close(got.leaf_norms, leaf, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"params\['.*'\] is used by"):
        ft.per_sample_grad_norms(loss_fn, params, batch, method="layers")
    x = torch.randn(3, 2, dtype=torch.float64)
    empty = ft.per_sample_grad_norms(lambda p, b: b.sum(), {}, x, method="layers")
    assert empty.leaf_norms == {} and torch.equal(empty.global_norm, torch.zeros(3, dtype=x.dtype))


def test_fast_and_generic_vmap_paths_agree(monkeypatch):
    """The rules run below the vmap over examples directly when they can (``_on_batch``), and
    through the autograd.Functions' ``vmap`` rules otherwise: both give the naive numbers."""
    taken = []
    on_batch = _layer_rules._Rules._on_batch

    def spy(self, x, run):
        out = on_batch(self, x, run)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(_layer_rules._Rules, "_on_batch", spy)
    available = _layer_rules._FAST
    for name in LAYER_PROBLEMS:
        loss_fn, params, batch = PROBLEMS[name]()
        expected = naive_per_sample(loss_fn, params, batch)
        for fast in (True, False):
            monkeypatch.setattr(_layer_rules, "_FAST", fast and available)
            got = ft.per_sample_grads(loss_fn, params, batch, method="layers")
            assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-12)
            clip, _ = _clip_reference(expected, 0.05)
            out = ft.clipped_grad_sum(loss_fn, params, batch, 0.05, method="layers")
            assert_trees_all_close(out.grad_sum, clip, rtol=1e-10, atol=1e-12)
    assert any(taken) == available and not all(taken)


def test_autocast_is_refused_and_auto_falls_back(monkeypatch):
    """Autocast casts inside the layer call, below the rules: they refuse rather than guess."""
    torch.manual_seed(0)
    model, params, _ = ft.functionalize(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    )
    batch = {"x": torch.randn(5, 8), "y": torch.randint(0, 3, (5,))}

    def loss_fn(p, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(p, b["x"])
        return F.cross_entropy(out.float(), b["y"])

    with pytest.raises(
        ValueError, match=r"params\['0.weight'\] is used by linear under torch.autocast"
    ):
        ft.per_sample_grads(loss_fn, params, batch, method="layers")
    monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)
    expected = ft.clipped_grad_sum(loss_fn, params, batch, 0.1, method="vmap")
    got = ft.clipped_grad_sum(loss_fn, params, batch, 0.1)
    assert_trees_all_equal(got.grad_sum, expected.grad_sum)


@pytest.mark.parametrize("method", ["layers", "vmap"])
def test_activation_checkpointing_gets_a_clear_error(method, monkeypatch):
    """``torch.utils.checkpoint`` recomputes the forward in the backward, outside the rules and
    the vmap over examples; neither route supports it, and the error says so (and names the
    loop, which does) instead of a functorch internal."""
    monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)
    model, params, _ = ft.functionalize(
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    )
    batch = {"x": torch.randn(6, 4), "y": torch.randint(0, 3, (6,))}

    def loss_fn(p, b):
        out = checkpoint(lambda x: model(p, x), b["x"], use_reentrant=False)
        return F.cross_entropy(out, b["y"])

    message = (
        r"params\['0.weight'\] is used by linear under saved-tensor hooks.*method='loop'"
        if method == "layers"
        else r"method='vmap': loss_fn runs under saved-tensor hooks.*method='loop'"
    )
    with pytest.raises(ValueError, match=message):
        ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method=method)
    with pytest.raises(ValueError, match=message):
        ft.per_sample_grads(loss_fn, params, batch, method=method)
    # "auto" takes the loop, whose autograd passes recompute as torch does.
    got = ft.clipped_grad_sum(loss_fn, params, batch, 1.0)
    want = ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method="loop")
    assert_trees_all_equal(got.grad_sum, want.grad_sum)


def _gram_reference(ps):
    rows = torch.cat([g.reshape(g.shape[0], -1) for g in tree.leaves(ps)], dim=1)
    return rows @ rows.T


@pytest.mark.parametrize("name", LAYER_PROBLEMS)
@pytest.mark.parametrize("chunk_size", [None, 2, 3])
def test_ghost_gram_matches_naive_loop(name, chunk_size):
    """Every layer's part of ⟨gᵢ, gⱼ⟩ (ghost for linear layers and embeddings, per-example
    gradients otherwise, tied parameters summed first), over pairs of chunks."""
    loss_fn, params, batch = PROBLEMS[name]()
    expected = _gram_reference(naive_per_sample(loss_fn, params, batch))
    got = ft.per_sample_gram(loss_fn, params, batch, method="layers", chunk_size=chunk_size)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    cosine = ft.per_sample_gram(loss_fn, params, batch, method="layers", cosine=True)
    norms = expected.diagonal().sqrt()
    torch.testing.assert_close(cosine, expected / torch.outer(norms, norms), rtol=1e-10, atol=0)


@pytest.mark.parametrize("rows", [1, 2, 9])
@pytest.mark.parametrize("vocab", [3, 40])
def test_gram_routes_agree(rows, vocab):
    """A linear layer's Gram by its three routes (one row; few rows: ghost; many rows: formed
    gradients) and an embedding's by both (few tokens for the vocabulary: ghost)."""
    g = torch.Generator().manual_seed(rows * vocab)
    params = {
        "emb": torch.randn(vocab, 7, generator=g, dtype=torch.float64),
        "w": torch.randn(5, 7, generator=g, dtype=torch.float64),
    }
    batch = torch.randint(0, vocab, (4, rows), generator=g)

    def loss_fn(p, ids):
        return F.linear(F.embedding(ids, p["emb"]), p["w"]).tanh().sum()

    expected = _gram_reference(naive_per_sample(loss_fn, params, batch))
    got = ft.per_sample_gram(loss_fn, params, batch, method="layers")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gram_auto_takes_layers_when_large_and_vmap_otherwise(monkeypatch):
    loss_fn, params, batch = mlp_problem()
    expected = ft.per_sample_gram(loss_fn, params, batch, method="vmap")
    taken = []
    original = _layer_passes.gram_by_layers

    def spy(*args, **kwargs):
        taken.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr("functrain.grads.streaming.gram_by_layers", spy)
    torch.testing.assert_close(ft.per_sample_gram(loss_fn, params, batch), expected)
    assert not taken  # small: vmap
    monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)
    torch.testing.assert_close(
        ft.per_sample_gram(loss_fn, params, batch), expected, rtol=1e-10, atol=1e-12
    )
    assert taken
    with pytest.raises(ValueError, match="method must be one of"):
        ft.per_sample_gram(loss_fn, params, batch, method="ghost")
