"""The eager autograd loop's noise-scale hook against a float64 reference done by hand.

The hook's record takes each micro-batch's squared norm in backward hooks on the leaves; these
tests pin its numbers for the cases that path must get right: many small leaves, mixed small
and large leaves, tied weights, bfloat16, a gradient penalty (a ``torch.autograd.grad`` inside
``loss_fn``), parameters without a gradient, and ``norm_metrics`` on and off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft
from functrain import tree

F64 = torch.float64
BIG = 1 << 16  # a "large" leaf: mixed with small ones below
SIZES = {2: [5, 3], 3: [4, 1, 3], 4: [3, 2, 1, 2]}


def _run(
    loss_fn: Callable[..., torch.Tensor], params: Any, batch: Any, sizes: list[int], nm: bool
) -> tuple[ft.MicroBatchStats, dict[str, torch.Tensor]]:
    """One step with the noise-scale hook; the stats its update got and the step's metrics."""
    hook = ft.noise_scale_hook(decay=0.5)
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=sizes,
        strategy="loop",
        grad_backend="autograd",
        grad_stats=hook,
        norm_metrics=nm,
        donate=False,
    )
    captured: dict[str, Any] = {}

    def capture(stats: Any, grads: Any, state: Any) -> Any:
        captured["stats"] = stats
        return hook.update(stats, grads, state)

    step.grad_stats = hook._replace(update=capture)
    state = ft.TrainState.create(params=params, tx=tx)
    _, metrics = step(state, batch)
    return captured["stats"], metrics


def _reference(
    loss_fn: Callable[..., torch.Tensor], params: Any, batch: Any, sizes: list[int]
) -> dict[str, torch.Tensor]:
    """Micro-batch gradients by ``torch.autograd.grad``, everything after in float64."""
    leaves, spec = tree.flatten(params)
    split = ft.split_batch(batch, sizes)
    sq, mb_grads = [], []
    for start, n in zip(split.starts, split.sizes):
        mb = {k: v[start : start + n] for k, v in batch.items()}
        tracked = [p.detach().clone().requires_grad_() for p in leaves]
        loss = loss_fn(tree.unflatten(spec, tracked), mb)
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, tracked, allow_unused=True)
        else:
            grads = (None,) * len(tracked)
        g64 = [
            torch.zeros_like(p, dtype=F64) if g is None else g.to(F64)
            for p, g in zip(leaves, grads)
        ]
        mb_grads.append(g64)
        sq.append(sum(g.square().sum() for g in g64))
    b = torch.tensor(sizes, dtype=F64)
    total = b.sum()
    combined = [sum(bi * g[j] for bi, g in zip(b, mb_grads)) / total for j in range(len(leaves))]
    c = sum(g.square().sum() for g in combined)
    sq_t = torch.stack(sq)
    trace = ((b * sq_t).sum() - total * c) / (len(sizes) - 1)
    grad_sq = c - trace / total
    return {
        "sq_norm": sq_t,
        "combined": c,
        "noise_scale/trace_sigma": trace,
        "noise_scale/grad_sq": grad_sq,
        "noise_scale/b_simple": trace / grad_sq,
        "noise_scale/gradient_diversity": (b.square() * sq_t).sum() / (total**2 * c),
    }


def _check(
    loss_fn: Callable[..., torch.Tensor],
    params: Any,
    batch: Any,
    k: int,
    rtol: float,
    metrics_rtol: float | None = None,
) -> None:
    sizes = SIZES[k]
    ref = _reference(loss_fn, params, batch, sizes)
    runs = {nm: _run(loss_fn, params, batch, sizes, nm) for nm in (True, False)}
    for nm, (stats, metrics) in runs.items():
        torch.testing.assert_close(
            stats.values["sq_norm"].to(F64), ref["sq_norm"], rtol=rtol, atol=0
        )
        for name in ("trace_sigma", "grad_sq", "b_simple", "gradient_diversity"):
            key = f"noise_scale/{name}"
            torch.testing.assert_close(
                metrics[key].to(F64), ref[key], rtol=metrics_rtol or rtol, atol=0, msg=key
            )
    # With and without the step's own norm metrics: the same metrics.
    on, off = runs[True][1], runs[False][1]
    for key in off:
        torch.testing.assert_close(on[key], off[key], rtol=1e-12 if rtol < 1e-6 else 1e-5, atol=0)


def _batch(n: int, d: int, dtype: torch.dtype = F64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, d, generator=g).to(dtype),
        "y": torch.randn(n, generator=g).to(dtype),
    }


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], w, b)


def _small_leaves_model(dtype: torch.dtype = F64) -> tuple[Any, Callable[..., torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    d = 8
    params = {
        f"l{i}": {
            "w": (torch.randn(d, d, generator=g) / d**0.5).to(dtype),
            "b": (0.1 * torch.randn(d, generator=g)).to(dtype),
            "ln_w": (1 + 0.1 * torch.randn(d, generator=g)).to(dtype),
            "ln_b": (0.1 * torch.randn(d, generator=g)).to(dtype),
        }
        for i in range(4)
    }
    params["head"] = (torch.randn(d, generator=g) / d**0.5).to(dtype)

    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        h = batch["x"]
        for i in range(4):
            q = p[f"l{i}"]
            h = h + torch.tanh(_layer_norm(h, q["ln_w"], q["ln_b"]) @ q["w"] + q["b"])
        return ((h @ p["head"] - batch["y"]) ** 2).mean()

    return params, loss_fn


@pytest.mark.parametrize("k", [2, 3, 4])
def test_many_small_leaves(k: int) -> None:
    params, loss_fn = _small_leaves_model()
    _check(loss_fn, params, _batch(sum(SIZES[k]), 8), k, rtol=1e-10)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_mixed_small_and_large_tied_leaves(k: int) -> None:
    """A large tied embedding (input and output projection), a small tied vector, biases."""
    g = torch.Generator().manual_seed(2)
    vocab, d = BIG // 64 + 3, 64  # above the threshold: reduced in its hook
    params = {
        "emb": torch.randn(vocab, d, generator=g, dtype=F64) / 8,
        "scale": 1 + 0.1 * torch.randn(d, generator=g, dtype=F64),
        "w": torch.randn(d, d, generator=g, dtype=F64) / 8,
        "b": 0.1 * torch.randn(d, generator=g, dtype=F64),
    }
    assert params["emb"].numel() >= BIG

    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        h = p["emb"][batch["tok"]] * p["scale"]
        h = torch.tanh(h @ p["w"] + p["b"]) * p["scale"]  # "scale" used twice
        logits = h @ p["emb"].T  # "emb" tied
        return torch.nn.functional.cross_entropy(logits, batch["y"])

    n = sum(SIZES[k])
    batch = {
        "tok": torch.randint(0, vocab, (n,), generator=g),
        "y": torch.randint(0, vocab, (n,), generator=g),
    }
    _check(loss_fn, params, batch, k, rtol=1e-10)


@pytest.mark.parametrize("k", [2, 4])
def test_bfloat16_params(k: int) -> None:
    params, loss_fn = _small_leaves_model(torch.bfloat16)
    params["big"] = torch.full((BIG,), 0.01, dtype=torch.bfloat16)

    def with_big(p: Any, batch: Any) -> torch.Tensor:
        return loss_fn(p, batch) + (p["big"].float() * batch["x"].float().sum()).square().mean()

    batch = _batch(sum(SIZES[k]), 8, torch.bfloat16)
    # The step differentiates w·L in bfloat16 (w = bᵢ/B) and .grad sums in bfloat16: the
    # reference's gradients differ at bfloat16's rounding; the norms are still widened.
    _check(with_big, params, batch, k, rtol=2e-2, metrics_rtol=2e-1)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_gradient_penalty_in_loss_fn(k: int) -> None:
    """loss_fn's own torch.autograd.grad reaches the leaves' hooks and must not count."""
    params, loss_fn = _small_leaves_model()

    def penalised(p: Any, batch: Any) -> torch.Tensor:
        loss = loss_fn(p, batch)
        leaves = tree.leaves(p)
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        return loss + 0.1 * sum(g.square().sum() for g in grads)

    _check(penalised, params, _batch(sum(SIZES[k]), 8), k, rtol=1e-10)


@pytest.mark.parametrize("k", [3, 4])
def test_parameters_without_gradient(k: int) -> None:
    """A parameter unused by one micro-batch, and a micro-batch that reaches no parameter."""
    params, loss_fn = _small_leaves_model()
    params["extra"] = torch.linspace(-1, 1, 8, dtype=F64)

    def partial(p: Any, batch: Any) -> torch.Tensor:
        n = batch["x"].shape[0]
        if n == 1:  # no parameter: no backward at all
            return batch["y"].square().mean()
        loss = loss_fn(p, batch)
        if n == 2:  # "extra" gets no gradient here
            return loss
        return loss + (batch["x"] @ p["extra"]).square().mean()

    _check(partial, params, _batch(sum(SIZES[k]), 8), k, rtol=1e-10)
