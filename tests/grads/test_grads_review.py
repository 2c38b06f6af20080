"""Adversarial review of the per-sample gradient API: edge cases a user of Opacus, BackPACK or
``torch.func`` would try, against naive float64 per-example loops and hand-computed references.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from grad_problems import cnn_problem, mlp_problem, naive_per_sample

import functrain as ft
from functrain import tree
from functrain.testing import assert_trees_all_close

TOL = {"rtol": 1e-10, "atol": 1e-13}


def _linear_problem(n: int = 5) -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(7)
    params = {
        "w": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "b": torch.randn(3, generator=g, dtype=torch.float64),
    }
    batch = {
        "x": torch.randn(n, 2, generator=g, dtype=torch.float64),
        "y": torch.randn(n, 3, generator=g, dtype=torch.float64),
    }

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return (F.linear(b["x"], p["w"], p["b"]) - b["y"]).square().mean()

    return loss_fn, params, batch


def _flat(ps: Any) -> torch.Tensor:
    leaves = tree.leaves(ps)
    return torch.cat([x.reshape(x.shape[0], -1) for x in leaves], 1)


def _summed(grad_sum: Any) -> torch.Tensor:
    """A summed gradient pytree flattened in the order of :func:`_flat`'s columns."""
    return torch.cat([x.reshape(-1) for x in tree.leaves(grad_sum)])


# --- every function, every method, against the naive loop (float64) -------------------------


@pytest.mark.parametrize("make", [mlp_problem, cnn_problem], ids=["mlp", "cnn"])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5, 9])
def test_every_function_and_method_matches_the_naive_loop(make, n, chunk_size):
    loss_fn, params, batch = make(n)
    ref = naive_per_sample(loss_fn, params, batch)
    flat = _flat(ref)
    norms = flat.norm(dim=1)
    clip = 0.9 * float(norms.median())  # no norm on the boundary
    factors = (clip / norms).clamp(max=1)
    for method in ("vmap", "layers"):
        got = ft.per_sample_grads(loss_fn, params, batch, chunk_size=chunk_size, method=method)
        assert_trees_all_close(got, ref, **TOL)
    for method in ("auto", "vmap", "layers"):
        opts = {"chunk_size": chunk_size, "method": method}
        got_norms = ft.per_sample_grad_norms(loss_fn, params, batch, **opts)
        torch.testing.assert_close(got_norms.global_norm, norms, **TOL)
        gram = ft.per_sample_gram(loss_fn, params, batch, **opts)
        torch.testing.assert_close(gram, flat @ flat.T, **TOL)
        out = ft.clipped_grad_sum(loss_fn, params, batch, clip, **opts)
        torch.testing.assert_close(_summed(out.grad_sum), factors @ flat, **TOL)
        assert out.count == n and int(out.num_clipped) == int((factors < 1).sum())
    moments = ft.per_sample_grad_moments(loss_fn, params, batch, chunk_size=chunk_size)
    assert moments.count == n
    assert_trees_all_close(moments.mean, tree.map(lambda g: g.mean(0), ref), **TOL)


def test_params_as_the_user_gives_them():
    """Transposed (non-contiguous) weights, requires_grad, a 0-d parameter and one tensor
    present twice in the tree (two independent leaves, each with its own use)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64)
    params = {
        "a": torch.randn(3, 4, generator=g, dtype=torch.float64).T,  # (4, 3), non-contiguous
        "b": w,
        "c": w,
        "s": torch.tensor(0.7, dtype=torch.float64, requires_grad=True),
    }
    batch = {"x": torch.randn(4, 3, generator=g, dtype=torch.float64)}

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        h = torch.tanh(F.linear(F.linear(b["x"], p["b"]), p["c"]))
        return (F.linear(h, p["a"]) * p["s"]).square().mean()

    ref = naive_per_sample(loss_fn, params, batch)
    got = ft.per_sample_grads(loss_fn, params, batch, chunk_size=3)
    assert_trees_all_close(got, ref, **TOL)
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, method="vmap")
    torch.testing.assert_close(norms.leaf_norms["s"], ref["s"].abs(), **TOL)
    # Without the 0-d parameter every use is a linear layer: the layer rules apply.
    linear = {k: v for k, v in params.items() if k != "s"}
    ref = naive_per_sample(lambda p, b: loss_fn({**p, "s": params["s"]}, b), linear, batch)
    fn = lambda p, b: loss_fn({**p, "s": params["s"].detach()}, b)  # noqa: E731
    assert_trees_all_close(ft.per_sample_grads(fn, linear, batch, method="layers"), ref, **TOL)
    norms = ft.per_sample_grad_norms(fn, linear, batch, method="layers").global_norm
    torch.testing.assert_close(norms, _flat(ref).norm(dim=1), **TOL)


def test_bfloat16_params_keep_their_dtype_and_match_float64():
    loss_fn, params, batch = _linear_problem()
    ref = naive_per_sample(loss_fn, params, batch)
    low = tree.cast(params, torch.bfloat16)
    low_batch = tree.cast(batch, torch.bfloat16)
    for method in ("vmap", "layers"):
        got = ft.per_sample_grads(loss_fn, low, low_batch, method=method)
        assert all(x.dtype == torch.bfloat16 for x in tree.leaves(got))
        assert_trees_all_close(tree.cast(got, torch.float64), ref, rtol=0.05, atol=0.05)


# --- batch pytrees ---------------------------------------------------------------------------


def test_batch_leaves_errors_name_the_leaf():
    loss_fn, params, batch = _linear_problem()
    with pytest.raises(ValueError, match=r"batch\['y'\] has leading dimension 4.*have 5"):
        ft.per_sample_grads(loss_fn, params, {"x": batch["x"], "y": batch["y"][:4]})
    for bad, what in ((3, "int"), ("s", "str"), (torch.tensor(1.0), "0-d")):
        with pytest.raises(ValueError, match=rf"batch\['k'\].*{what}"):
            ft.per_sample_grad_norms(loss_fn, params, {**batch, "k": bad})
    # None is an empty subtree, and integer / bool leaves are ordinary batch leaves.
    extra = {**batch, "none": None, "i": torch.arange(5), "m": torch.ones(5, dtype=torch.bool)}
    ref = naive_per_sample(loss_fn, params, batch)
    assert_trees_all_close(ft.per_sample_grads(loss_fn, params, extra), ref, **TOL)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "2"])
def test_chunk_size_must_be_a_positive_int(bad):
    loss_fn, params, batch = _linear_problem()
    with pytest.raises((ValueError, TypeError), match="chunk_size"):
        ft.per_sample_grads(loss_fn, params, batch, chunk_size=bad)


@pytest.mark.parametrize("method", ["vmap", "layers"])
def test_empty_batch_gives_empty_results(method):
    """A Poisson-sampled DP batch can be empty: every reduction gives its empty value (no
    examples: zero clipped sum, count 0) instead of ``range() arg 3 must not be zero``."""
    loss_fn, params, _ = _linear_problem()
    empty = {
        "x": torch.zeros(0, 2, dtype=torch.float64),
        "y": torch.zeros(0, 3, dtype=torch.float64),
    }
    for chunk_size in (None, 2):
        opts = {"chunk_size": chunk_size, "method": method}
        chunks = list(ft.per_sample_chunks(loss_fn, params, empty, **opts))
        assert [(c.start, c.stop) for c in chunks] == [(0, 0)]
        losses, grads = ft.per_sample_value_and_grads(loss_fn, params, empty, **opts)
        assert losses.shape == (0,)
        assert {k: tuple(v.shape) for k, v in grads.items()} == {"w": (0, 3, 2), "b": (0, 3)}
        norms = ft.per_sample_grad_norms(loss_fn, params, empty, **opts)
        assert norms.global_norm.shape == (0,) and norms.leaf_norms["w"].shape == (0,)
        assert ft.per_sample_gram(loss_fn, params, empty, cosine=True, **opts).shape == (0, 0)
        out = ft.clipped_grad_sum(loss_fn, params, empty, 1.0, **opts)
        assert out.count == 0 and int(out.num_clipped) == 0 and float(out.loss_sum) == 0.0
        assert_trees_all_close(out.grad_sum, tree.zeros_like(params), rtol=0, atol=0)
    moments = ft.per_sample_grad_moments(loss_fn, params, empty)
    assert moments.count == 0
    full = ft.grad_moments(naive_per_sample(loss_fn, *_linear_problem()[1:]))
    merged = ft.merge_grad_moments(moments, full)
    assert_trees_all_close(merged.mean, full.mean, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs more than 1 examples, got 0"):
        ft.grad_variance(moments)
    # The DP mean of an empty batch is pure noise over the expected batch size...
    tx = ft.dp_noisy_mean(1.0, 0.0, expected_batch_size=4, seed=0)
    noisy, _ = tx.update(out.grad_sum, tx.init(params))
    assert_trees_all_close(noisy, tree.zeros_like(params), rtol=0, atol=0)
    # ...while optax's aggregate divides by the realized batch size: no mean of no examples.
    agg = ft.differentially_private_aggregate(1.0, 0.0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        agg.update(grads, agg.init(params))


# --- params ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["vmap", "layers"])
def test_meta_params_get_a_clear_error(method):
    loss_fn, params, batch = _linear_problem()
    meta = tree.map(lambda p: p.to("meta"), params)
    with pytest.raises(ValueError, match=r"params\['b'\] is on the meta device"):
        ft.per_sample_grads(loss_fn, meta, batch, method=method)
    with pytest.raises(ValueError, match="meta device"):
        ft.clipped_grad_sum(loss_fn, meta, batch, 1.0, method=method)


# --- loss_fn ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["vmap", "layers"])
def test_loss_fn_results_that_are_not_a_scalar_loss(method):
    _, params, batch = _linear_problem()
    cases = [
        (lambda p, b: F.linear(b["x"], p["w"]), r"got \(1, 3\)"),
        (lambda p, b: 1.0, "got float"),
        (lambda p, b: 1, "got int"),
    ]
    for fn, what in cases:
        with pytest.raises(ValueError, match=f"scalar mean loss.*{what}"):
            ft.per_sample_grads(fn, params, batch, method=method)


@pytest.mark.parametrize("method", ["vmap", "layers"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_aux_with_non_tensor_leaves(method, chunk_size):
    """``aux`` leaves that are not tensors (None, numbers, strings) are the same for every
    example: they come back once, as returned; tensor leaves are batched."""
    loss_fn, params, batch = _linear_problem()

    def with_aux(p: Any, b: Any) -> Any:
        loss = loss_fn(p, b)
        return loss, {"loss": loss.detach(), "none": None, "n": 3, "tag": "mse", "x": b["x"][0]}

    opts = {"chunk_size": chunk_size, "method": method, "has_aux": True}
    grads, aux = ft.per_sample_grads(with_aux, params, batch, **opts)
    assert_trees_all_close(grads, naive_per_sample(loss_fn, params, batch), **TOL)
    assert (aux["none"], aux["n"], aux["tag"]) == (None, 3, "mse")
    torch.testing.assert_close(aux["x"], batch["x"], rtol=0, atol=0)
    losses = ft.per_sample_value_and_grads(loss_fn, params, batch, chunk_size=chunk_size)[0]
    torch.testing.assert_close(aux["loss"], losses, **TOL)
    # A LossOutput without aux, with has_aux=True: aux is None.
    out_fn = lambda p, b: ft.LossOutput(loss_fn(p, b))  # noqa: E731
    assert ft.per_sample_grads(out_fn, params, batch, **opts)[1] is None


@pytest.mark.parametrize("method", ["vmap", "layers"])
def test_parameter_used_under_no_grad(method):
    """A use under ``torch.no_grad`` contributes no gradient (as ``torch.func.grad``): the
    layer rules have nothing to refuse there."""
    loss_fn, params, batch = _linear_problem()

    def fn(p: Any, b: Any) -> torch.Tensor:
        with torch.no_grad():
            scale = 1 + p["w"].square().sum() + p["b"].abs().sum()  # a constant here
        return loss_fn(p, b) * scale

    ref = naive_per_sample(fn, params, batch)
    assert_trees_all_close(ft.per_sample_grads(fn, params, batch, method=method), ref, **TOL)
    norms = ft.per_sample_grad_norms(fn, params, batch, method=method).global_norm
    torch.testing.assert_close(norms, _flat(ref).norm(dim=1), **TOL)
    out = ft.clipped_grad_sum(fn, params, batch, 0.5, method=method)
    factors = (0.5 / _flat(ref).norm(dim=1)).clamp(max=1)
    torch.testing.assert_close(_summed(out.grad_sum), factors @ _flat(ref), **TOL)


def test_buffers_of_an_eval_batch_norm():
    g = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    net = net.double().eval()
    net[1].running_mean.normal_(generator=g)
    net[1].running_var.uniform_(0.5, 2.0, generator=g)
    model, params, buffers = ft.functionalize(net)
    batch = {
        "x": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "y": torch.randn(4, dtype=torch.float64),
    }

    def loss_fn(p: Any, b: Any, buffers: Any) -> torch.Tensor:
        out, _ = model.apply(p, buffers, b["x"])
        return (out.squeeze(-1) - b["y"]).square().mean()

    ref = naive_per_sample(loss_fn, params, batch, buffers=buffers)
    got = ft.per_sample_grads(loss_fn, params, batch, buffers=buffers, chunk_size=3)
    assert_trees_all_close(got, ref, **TOL)
    with pytest.raises(ValueError, match=r"params\['1.weight'\] is used by batch_norm"):
        ft.per_sample_grads(loss_fn, params, batch, buffers=buffers, method="layers")


@pytest.mark.parametrize("method", ["vmap", "layers"])
def test_dropout_randomness_modes(method):
    params = {"w": torch.ones(8, 3, dtype=torch.float64)}
    batch = {"x": torch.ones(6, 3, dtype=torch.float64)}

    def fn(p: Any, b: Any) -> torch.Tensor:
        return F.dropout(F.linear(b["x"], p["w"]), 0.5, training=True).sum()

    if method == "vmap":
        with pytest.raises(RuntimeError, match="randomness"):
            ft.per_sample_grads(fn, params, batch, method=method)
    torch.manual_seed(0)
    opts = {"chunk_size": 3, "method": method}
    same = ft.per_sample_grads(fn, params, batch, randomness="same", **opts)["w"]
    assert torch.equal(same[0], same[2]) and torch.equal(same[3], same[5])
    assert set(same.unique().tolist()) <= {0.0, 2.0}
    torch.manual_seed(0)
    diff = ft.per_sample_grads(fn, params, batch, randomness="different", method=method)["w"]
    assert set(diff.unique().tolist()) <= {0.0, 2.0}
    assert len({tuple(row[:, 0].tolist()) for row in diff}) > 1  # 6 masks of 8: not all equal


# --- reductions ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["vmap", "layers"])
def test_clip_norm_extremes(method):
    loss_fn, params, batch = _linear_problem()
    flat = _flat(naive_per_sample(loss_fn, params, batch))
    norms = flat.norm(dim=1)
    for clip in (0.0, 1e-300, 1e300, math.inf, torch.tensor(0.3, dtype=torch.float64)):
        out = ft.clipped_grad_sum(loss_fn, params, batch, clip, method=method, chunk_size=2)
        factors = torch.clamp(clip / norms, max=1)
        got = _summed(out.grad_sum)
        torch.testing.assert_close(got, factors @ flat, rtol=1e-10, atol=1e-300)
        assert int(out.num_clipped) == int((factors < 1).sum())


@pytest.mark.parametrize("bad", [-1.0, -1e-9, math.nan])
def test_negative_or_nan_clip_norm_is_refused(bad):
    """A negative ``C`` flipped every gradient's sign; a NaN ``C`` turned clipping off."""
    loss_fn, params, batch = _linear_problem()
    for method in ("vmap", "layers"):
        with pytest.raises(ValueError, match="l2_norm_clip"):
            ft.clipped_grad_sum(loss_fn, params, batch, bad, method=method)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        ft.per_example_global_norm_clip({"w": torch.ones(2, 3)}, bad)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        ft.dpsgd(0.1, bad, 1.0, seed=0)


def test_dp_hyperparameters_are_checked_at_construction():
    with pytest.raises(ValueError, match="noise_multiplier"):
        ft.differentially_private_aggregate(1.0, -0.5, seed=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        ft.dp_noisy_mean(1.0, -0.5, 4, seed=0)
    for bad in (0, 0.0, -2):
        with pytest.raises(ValueError, match="expected_batch_size"):
            ft.dp_noisy_mean(1.0, 1.0, bad, seed=0)
    # A bool is no number here (True would silently mean a batch of one, or C = 1).
    with pytest.raises(TypeError, match="expected_batch_size"):
        ft.dp_noisy_mean(1.0, 1.0, True, seed=0)
    with pytest.raises(TypeError, match="l2_norm_clip"):
        ft.dpsgd(0.1, True, 1.0, seed=0)
    with pytest.raises(TypeError, match="l2_norm_clip"):
        ft.clipped_grad_sum(lambda p, x: (x @ p).mean(), torch.zeros(2), torch.eye(2), True)


def test_dp_transforms_with_noise_off_equal_a_hand_reference():
    loss_fn, params, batch = _linear_problem(6)
    ps = naive_per_sample(loss_fn, params, batch)
    clip = 0.4
    rows = []
    for i in range(6):  # clip each example by hand
        gi = tree.map(lambda g, i=i: g[i], ps)
        norm = math.sqrt(sum(float(x.square().sum()) for x in tree.leaves(gi)))
        rows.append(tree.scale(min(1.0, clip / norm), gi))
    clipped_sum = tree.add(*rows)
    agg = ft.differentially_private_aggregate(clip, 0.0, seed=1)
    out, _ = agg.update(ps, agg.init(params))
    assert_trees_all_close(out, tree.scale(1 / 6, clipped_sum), **TOL)
    noisy = ft.dp_noisy_mean(clip, 0.0, expected_batch_size=8, seed=1)
    total = ft.clipped_grad_sum(loss_fn, params, batch, clip, chunk_size=4).grad_sum
    out, _ = noisy.update(total, noisy.init(params))
    assert_trees_all_close(out, tree.scale(1 / 8, clipped_sum), **TOL)


def test_variance_and_snr_with_one_and_two_examples():
    loss_fn, params, batch = _linear_problem(2)
    ps = naive_per_sample(loss_fn, params, batch)
    one = ft.per_sample_grad_moments(loss_fn, params, tree.map(lambda x: x[:1], batch))
    with pytest.raises(ValueError, match="needs more than 1 examples, got 1"):
        ft.grad_snr(one)
    assert_trees_all_close(ft.grad_variance(one, ddof=0), tree.zeros_like(params), rtol=0, atol=0)
    two = ft.per_sample_grad_moments(loss_fn, params, batch, chunk_size=1)
    var = tree.map(lambda g: (g[0] - g[1]).square() / 2, ps)  # unbiased, two examples
    assert_trees_all_close(ft.grad_variance(two), var, **TOL)
    snr = tree.map(lambda g, v: g.mean(0).square() / v, ps, var)
    assert_trees_all_close(ft.grad_snr(two), snr, rtol=1e-9, atol=0)


@pytest.mark.parametrize("method", ["vmap", "layers"])
def test_cosine_with_zero_gradients_is_zero_not_nan(method):
    loss_fn, params, batch = _linear_problem(4)
    batch = {"x": batch["x"].clone(), "y": batch["y"].clone()}
    batch["x"][1] = 0  # example 1: w's gradient is zero; make b's zero too (residual 0)
    batch["y"][1] = params["b"]
    cos = ft.per_sample_gram(loss_fn, params, batch, cosine=True, method=method)
    assert torch.isfinite(cos).all()
    assert torch.equal(cos[1], torch.zeros(4, dtype=cos.dtype))
    assert torch.equal(cos[:, 1], torch.zeros(4, dtype=cos.dtype))
    flat = _flat(naive_per_sample(loss_fn, params, batch))
    keep = [0, 2, 3]
    unit = flat[keep] / flat[keep].norm(dim=1, keepdim=True)
    torch.testing.assert_close(cos[keep][:, keep], unit @ unit.T, **TOL)


def test_statistics_of_grads_with_mismatched_rows_name_the_leaf():
    """``grad_moments`` used the first leaf's row count for every leaf (a wrong ``count``),
    the others failed inside torch."""
    grads = {"a": torch.randn(2, 3), "b": torch.randn(3, 3)}
    for fn in (ft.per_sample_norms, ft.grad_moments, ft.grad_gram):
        with pytest.raises(ValueError, match=r"grads\['b'\] has leading dimension 3.*have 2"):
            fn(grads)
    with pytest.raises(ValueError, match=r"grads\['b'\] has leading dimension 3"):
        ft.per_example_global_norm_clip(grads, 1.0)
    for fn in (ft.per_sample_norms, ft.grad_moments, ft.grad_gram):
        with pytest.raises(ValueError, match=r"grads\['a'\].*0-d"):
            fn({"a": torch.tensor(1.0)})
        with pytest.raises(TypeError, match=r"grads\['a'\].*floating"):
            fn({"a": torch.arange(6).reshape(2, 3)})
