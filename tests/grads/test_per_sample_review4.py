"""Fourth review of the ``vmap`` route of per-sample gradients and of per-example clipping.

References are float64 loops with one ``torch.autograd.grad`` per example (a batch of one) and
clipping factors ``min(1, C/‖gᵢ‖)`` computed by hand.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft

D = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}


def _problem(n: int = 5, seed: int = 0) -> tuple[Any, Any, Any]:
    """A small tanh layer with an unused parameter, integer and bool batch leaves."""
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(4, 3, dtype=D, generator=g),
        "b": torch.randn(4, dtype=D, generator=g),
        "unused": torch.randn(2, dtype=D, generator=g),
    }
    batch = {
        "x": torch.randn(n, 3, dtype=D, generator=g),
        "label": torch.randint(0, 4, (n,), generator=g),
        "keep": torch.arange(n) % 3 != 1,
    }

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        out = torch.tanh(b["x"] @ p["w"].T + p["b"])
        picked = out.gather(1, b["label"][:, None])[:, 0]
        return ((picked - 1.0).square() * b["keep"].to(D)).mean() + 0.1 * out.square().mean()

    return loss_fn, params, batch


def _naive(loss_fn: Any, params: Any, batch: Any, **extra: Any) -> tuple[torch.Tensor, Any]:
    """Per-example losses and gradients: one autograd call per example, zeros where unused."""
    n = next(iter(batch.values())).shape[0]
    losses, grads = [], {k: [] for k in params}
    for i in range(n):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        loss = loss_fn(p, {k: v[i : i + 1] for k, v in batch.items()}, **extra)
        gs = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
        losses.append(loss.detach())
        for (k, q), gr in zip(p.items(), gs):
            grads[k].append(torch.zeros_like(q) if gr is None else gr)
    return torch.stack(losses), {k: torch.stack(v) for k, v in grads.items()}


def _flat(grads: Any) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


# --- per_sample_grads against the naive loop -------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 7), chunk=st.one_of(st.none(), st.integers(1, 9)))
def test_int_bool_leaves_unused_params_and_chunks_match_the_naive_loop(n, chunk):
    loss_fn, params, batch = _problem(n)
    ref_losses, ref = _naive(loss_fn, params, batch)
    losses, grads = ft.per_sample_value_and_grads(loss_fn, params, batch, chunk_size=chunk)
    torch.testing.assert_close(losses, ref_losses, **TOL)
    for k in params:
        torch.testing.assert_close(grads[k], ref[k], **TOL)
    assert torch.equal(grads["unused"], torch.zeros(n, 2, dtype=D))


def test_aux_of_mixed_types_is_batched_per_example():
    loss_fn, params, batch = _problem(5)

    def with_aux(p: Any, b: Any) -> Any:
        out = b["x"] @ p["w"].T
        aux = {"out": out, "arg": out.argmax(-1), "pos": out > 0, "tag": "t", "k": 2, "no": None}
        return loss_fn(p, b), aux

    grads, aux = ft.per_sample_grads(with_aux, params, batch, has_aux=True, chunk_size=2)
    _, ref = _naive(loss_fn, params, batch)
    torch.testing.assert_close(grads["w"], ref["w"], **TOL)
    out = batch["x"] @ params["w"].T  # each example's aux is that of a batch of one: (n, 1, …)
    torch.testing.assert_close(aux["out"], out[:, None], **TOL)
    assert torch.equal(aux["arg"], out.argmax(-1)[:, None])
    assert torch.equal(aux["pos"], (out > 0)[:, None])
    assert aux["arg"].dtype == torch.int64 and aux["pos"].dtype == torch.bool
    assert (aux["tag"], aux["k"], aux["no"]) == ("t", 2, None)
    assert not aux["out"].requires_grad


def test_complex_parameters_match_the_naive_loop():
    g = torch.Generator().manual_seed(1)
    params = {"z": torch.randn(3, dtype=torch.complex128, generator=g)}
    batch = {"x": torch.randn(4, 3, dtype=D, generator=g)}

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return (b["x"].to(torch.complex128) @ p["z"]).abs().square().mean()

    _, ref = _naive(loss_fn, params, batch)
    got = ft.per_sample_grads(loss_fn, params, batch, chunk_size=3)
    torch.testing.assert_close(got["z"], ref["z"], **TOL)
    out = ft.clipped_grad_sum(loss_fn, params, batch, 0.5, method="vmap")
    norms = ref["z"].abs().norm(dim=1)
    factors = torch.clamp(0.5 / norms, max=1.0)
    torch.testing.assert_close(out.grad_sum["z"], (factors[:, None] * ref["z"]).sum(0), **TOL)
    assert int(out.num_clipped) == int((factors < 1).sum())


def test_a_batch_leaf_shared_by_all_examples_is_refused_by_name():
    """Every batch leaf is split by example: a constant goes in ``loss_fn``'s closure."""
    loss_fn, params, batch = _problem(4)
    with pytest.raises(ValueError, match=r"batch\['\w+'\] has leading dimension \d+, but earlier"):
        ft.per_sample_grads(loss_fn, params, {**batch, "const": torch.ones(2)})


def test_dropout_masks_differ_per_example_and_replay_with_the_seed():
    params = torch.ones(16, 3, dtype=D)
    batch = {"x": torch.ones(6, 3, dtype=D)}
    fn = lambda p, b: F.dropout(b["x"] @ p.T, 0.5, training=True).sum()  # noqa: E731
    for chunk in (None, 4):
        torch.manual_seed(3)
        a = ft.per_sample_grads(fn, params, batch, randomness="different", chunk_size=chunk)
        torch.manual_seed(3)
        b = ft.per_sample_grads(fn, params, batch, randomness="different", chunk_size=chunk)
        assert torch.equal(a, b)
        assert len({tuple(row[:, 0].tolist()) for row in a}) > 1
        assert set(a.unique().tolist()) <= {0.0, 2.0}  # inverted dropout: kept units count 2


# --- results are values: no graph kept --------------------------------------------------------


def test_a_batch_that_requires_grad_gives_plain_values():
    """Old code: a batch from an upstream model (requiring grad) made every per-sample
    gradient, and the clipped sum accumulated over chunks, hold the chunks' graphs."""
    loss_fn, params, batch = _problem(5)
    _, ref = _naive(loss_fn, params, batch)
    upstream = {**batch, "x": batch["x"].clone().requires_grad_(True) * 1.0}
    got = ft.per_sample_grads(loss_fn, params, upstream, chunk_size=2)
    torch.testing.assert_close(got["w"], ref["w"], **TOL)
    assert not any(g.requires_grad for g in got.values())
    out = ft.clipped_grad_sum(loss_fn, params, upstream, 0.1, chunk_size=2, method="vmap")
    assert not out.grad_sum["w"].requires_grad and out.grad_sum["w"].grad_fn is None


def test_buffers_that_require_grad_are_not_differentiated():
    """Frozen weights passed as ``buffers=`` still require grad: the old results held graph."""
    loss_fn, params, batch = _problem(4)
    scale = torch.tensor(2.0, dtype=D, requires_grad=True)

    def with_buffers(p: Any, b: Any, buffers: Any = None) -> torch.Tensor:
        return buffers["scale"] * loss_fn(p, b)

    _, ref = _naive(with_buffers, params, batch, buffers={"scale": scale.detach()})
    got = ft.per_sample_grads(with_buffers, params, batch, buffers={"scale": scale})
    torch.testing.assert_close(got["w"], ref["w"], **TOL)
    assert not any(g.requires_grad for g in got.values())


# --- clipping -----------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.0, 0.3, math.inf])
def test_clipped_sum_with_zero_gradient_examples(clip):
    """An example whose gradient is exactly zero keeps factor 1 (no 0/0 NaN), unclipped."""
    loss_fn, params, batch = _problem(5)
    batch["keep"][:] = True
    batch["x"][2] = 0.0  # tanh(b) still gives a gradient for ``b``: zero it by hand below
    zero_fn = lambda p, b: loss_fn(p, b) * (b["x"].abs().sum() > 0).to(D)  # noqa: E731
    losses, ref = _naive(zero_fn, params, batch)
    flat = _flat(ref)
    assert torch.equal(flat[2], torch.zeros_like(flat[2]))
    factors = torch.nan_to_num(torch.clamp(clip / flat.norm(dim=1), max=1.0), nan=1.0)
    for chunk in (None, 1, 2):
        out = ft.clipped_grad_sum(zero_fn, params, batch, clip, chunk_size=chunk, method="vmap")
        torch.testing.assert_close(
            _flat({k: v[None] for k, v in out.grad_sum.items()})[0], factors @ flat, **TOL
        )
        assert int(out.num_clipped) == int((factors < 1).sum())
        torch.testing.assert_close(out.loss_sum, losses.sum(), **TOL)
        assert out.count == 5


def test_nan_and_inf_gradients_reach_the_clipped_sum():
    """A NaN gradient keeps factor 1 (not counted as clipped) and its NaN reaches the sum; an
    inf one is clipped to factor 0, and ``0 · inf`` is NaN: the sum is never silently finite."""
    params = {"w": torch.zeros(3, dtype=D)}
    x = torch.tensor([[1.0, 2.0, 2.0], [math.nan, 0.0, 0.0], [0.0, math.inf, 0.0]], dtype=D)
    fn = lambda p, b: (b["x"] @ p["w"]).mean()  # noqa: E731  gradient: the example's x
    out = ft.clipped_grad_sum(fn, params, {"x": x}, 1.0, method="vmap")
    assert math.isnan(out.grad_sum["w"][0]) and math.isnan(out.grad_sum["w"][1])
    assert int(out.num_clipped) == 2  # the first example (norm 3) and the inf one
    clipped, num = ft.per_example_global_norm_clip([x], 1.0)
    assert math.isnan(clipped[0][0]) and math.isnan(clipped[0][1]) and int(num) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norm_above_65504_is_clipped_not_dropped(dtype):
    """Old code: a float16 norm of 1e5 rounded to inf, so the factor ``C/inf`` was 0 and the
    example vanished from the sum instead of contributing a gradient of norm ``C``. In
    bfloat16 the factors were rounded to 8 bits before the sum: 2 % off after cancellation."""
    x = torch.full((3, 10_000), 1000.0)
    x[1] = 1e-3  # norm 0.1: not clipped
    x[2] = -500.0
    ref64 = x.to(dtype).to(D)  # the per-example gradients as held in ``dtype``
    factors = torch.clamp(1.0 / ref64.norm(dim=1), max=1.0)
    expected = factors @ ref64
    clipped, num = ft.per_example_global_norm_clip([x.to(dtype)], 1.0)
    assert clipped[0].dtype == dtype and int(num) == 2
    torch.testing.assert_close(clipped[0].to(D), expected, rtol=1e-2, atol=1e-5)
    params = torch.zeros(10_000, dtype=dtype)
    out = ft.clipped_grad_sum(
        lambda p, b: (b @ p).mean(), params, x.to(dtype), 1.0, method="vmap", chunk_size=2
    )
    assert out.grad_sum.dtype == dtype and int(out.num_clipped) == 2
    torch.testing.assert_close(out.grad_sum.to(D), expected, rtol=1e-2, atol=1e-5)
