"""Second review of the gradient statistics: half-precision moments, chunk lifetimes, the hook.

References are float64 arithmetic done here on explicitly materialised per-sample or
per-micro-batch gradients (``torch.func.grad`` on each slice, or a loss whose per-example
gradient is its input), never values the code under test produced.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import functrain as ft
import functrain.grads.streaming as streaming
from functrain import tree
from functrain.grads.per_sample import PerSampleChunk

F64 = torch.float64


def _linear_problem(x: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """``Σ x·w`` per example: its per-sample gradient is ``x`` itself, in ``x``'s dtype."""
    params = {"w": torch.zeros(x.shape[1], dtype=x.dtype)}
    return (lambda p, b: (b["x"] * p["w"]).sum()), params, {"x": x}


# ------------------------------------------------------------- half-precision moments


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_half_moments_are_summed_in_float32_and_rounded_once(dtype, chunk_size) -> None:
    # The sums behind the moments were kept in the gradients' dtype: bfloat16 means streamed in
    # chunks were off by several units of roundoff. Reduced in float32, each moment is the
    # float64 moment rounded once (relative error at most the unit roundoff, plus float32 noise).
    g = torch.Generator().manual_seed(0)
    x = (1.0 + 0.5 * torch.randn(53, 40, generator=g)).to(dtype)
    loss_fn, params, batch = _linear_problem(x)
    ref = x.double()
    mean, m2 = ref.mean(0), ((ref - ref.mean(0)) ** 2).sum(0)
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # the unit roundoff
    for m in (
        ft.per_sample_grad_moments(loss_fn, params, batch, chunk_size=chunk_size),
        ft.grad_moments({"w": x}),
    ):
        assert m.count == 53
        # m2 (a sum over examples) is float32 for half gradients: in float16 it overflowed.
        assert m.mean["w"].dtype == dtype and m.m2["w"].dtype == torch.float32
        for got, want in ((m.mean["w"], mean), (m.m2["w"], m2)):
            err = ((got.double() - want).abs() / want.abs()).max().item()
            assert err <= unit * (1 + 1e-3), (err, unit)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_global_norm_is_rounded_once(dtype) -> None:
    # The global norm was taken of the leaf norms already rounded to half precision: with
    # leaf norms √1e5 and √2.7e5 float16 gave 608 where √3.7e5 = 608.28 rounds to 608.5.
    grads = {
        "a": torch.full((2, 10), 100.0, dtype=dtype),
        "b": torch.full((2, 3), 300.0, dtype=dtype),
    }
    g = torch.Generator().manual_seed(2)
    grads.update({f"l{i}": torch.randn(2, 7, generator=g).to(dtype) * 30 for i in range(8)})
    norms = ft.per_sample_norms(grads)
    want = torch.cat([x.double().reshape(2, -1) for x in grads.values()], 1).norm(dim=1)
    assert norms.global_norm.dtype == dtype
    torch.testing.assert_close(norms.global_norm, want.to(dtype), rtol=0, atol=0)
    for k, x in grads.items():
        leaf = x.double().reshape(2, -1).norm(dim=1).to(dtype)
        torch.testing.assert_close(norms.leaf_norms[k], leaf, rtol=0, atol=0)


# -------------------------------------------------------- at most one chunk alive at a time


def _tracking_chunks(peaks: list[int]) -> Any:
    """A stand-in for ``per_sample_chunks`` that records, before computing each chunk, how
    many earlier chunks' gradients are still alive (held by the caller)."""
    live: list[list[weakref.ref]] = []

    def chunks(
        loss_fn: Any,
        params: Any,
        batch: Any,
        *,
        chunk_size: int | None = None,
        buffers: Any = None,
        randomness: str = "error",
        method: str = "vmap",
    ) -> Iterator[PerSampleChunk]:
        n = tree.leaves(batch)[0].shape[0]
        step = chunk_size or n
        for lo in range(0, n, step):
            gc.collect()
            peaks.append(sum(any(r() is not None for r in refs) for refs in live))
            part = tree.map(lambda v, lo=lo: v[lo : lo + step], batch)
            grads = ft.per_sample_grads(loss_fn, params, part, buffers=buffers, method=method)
            live.append([weakref.ref(x) for x in tree.leaves(grads)])
            yield PerSampleChunk(lo, min(lo + step, n), grads, None, None)
            del grads, part  # this stand-in keeps nothing once the caller has the chunk

    return chunks


@pytest.mark.parametrize(
    ("name", "held"),
    [("moments", 0), ("norms", 0), ("gram", 1)],  # the Gram matrix needs row chunk i too
)
def test_streaming_drops_each_chunk_before_computing_the_next(monkeypatch, name, held) -> None:
    # A loop variable (or comprehension variable) kept the previous chunk's per-sample
    # gradients alive while the next chunk was computed: twice the promised
    # chunk_size × parameters (three chunks for the Gram matrix).
    peaks: list[int] = []
    tracking = _tracking_chunks(peaks)
    monkeypatch.setattr(streaming, "per_sample_chunks", tracking)
    monkeypatch.setattr(
        streaming,
        "vmap_chunks",
        lambda loss_fn, params, batch, chunk_size, buffers, randomness, method="vmap": tracking(
            loss_fn, params, batch, chunk_size=chunk_size, buffers=buffers, randomness=randomness
        ),
    )
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(11, 6, generator=g, dtype=F64)
    params = {"w": torch.randn(6, generator=g, dtype=F64), "b": torch.zeros((), dtype=F64)}

    def loss_fn(p: dict[str, torch.Tensor], b: torch.Tensor) -> torch.Tensor:
        return ((b @ p["w"] + p["b"]) ** 2).mean()

    rows = torch.cat(
        [
            torch.cat([v.reshape(-1) for v in torch.func.grad(loss_fn)(params, b[None]).values()])
            for b in batch
        ]
    ).reshape(11, -1)
    if name == "moments":
        m = streaming.per_sample_grad_moments(loss_fn, params, batch, chunk_size=4)
        got = torch.cat([m.mean["w"], m.mean["b"][None]])
        torch.testing.assert_close(got, rows.mean(0))
    elif name == "norms":
        norms = streaming.per_sample_grad_norms(loss_fn, params, batch, chunk_size=4, method="vmap")
        torch.testing.assert_close(norms.global_norm, rows.norm(dim=1))
    else:
        gram = streaming.per_sample_gram(loss_fn, params, batch, chunk_size=4, method="vmap")
        torch.testing.assert_close(gram, rows @ rows.T)
    assert len(peaks) >= 3 and max(peaks) <= held, peaks


# ----------------------------------------------- the hook against per-micro-batch references


def _by_hand(micro: list[torch.Tensor], sizes: list[float]) -> tuple[float, float, float]:
    """``tr(Σ)``, ``|G|²`` and the diversity from micro-batch mean gradients, in float64."""
    total = sum(sizes)
    combined = sum(b * g for b, g in zip(sizes, micro)) / total
    c2 = float(combined @ combined)
    sq = [float(g @ g) for g in micro]
    trace = (sum(b * s for b, s in zip(sizes, sq)) - total * c2) / (len(sizes) - 1)
    diversity = sum(b * b * s for b, s in zip(sizes, sq)) / (total**2 * c2)
    return trace, c2 - trace / total, diversity


@pytest.mark.parametrize(("strategy", "chunk_size"), [("loop", None), ("vmap", None), ("vmap", 2)])
@pytest.mark.parametrize("sizes", [[3, 1, 3, 1, 3, 2], [12, 1]])
@pytest.mark.parametrize("tokens", [False, True])
def test_hook_matches_float64_reference(strategy, chunk_size, sizes, tokens) -> None:
    # Unequal micro-batches (one of a single example, K = 2 among them), a vmap chunk size that
    # divides neither group, and a token-weighted LossSum whose micro-batch sizes are its token
    # counts: each micro-batch's gradient by torch.func.grad on its slice, formulas by hand.
    g = torch.Generator().manual_seed(4)
    n = sum(sizes)
    batch = {
        "x": torch.randn(n, 3, 4, generator=g, dtype=F64),
        "y": torch.randn(n, 3, generator=g, dtype=F64),
        "m": (torch.rand(n, 3, generator=g) > 0.4).to(F64),
    }
    batch["m"][:, 0] = 1.0  # every example counts at least one token

    def per_token(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return (b["x"] @ p["w"] + p["c"] - b["y"]) ** 2

    def loss_fn(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Any:
        if tokens:
            return ft.LossSum((per_token(p, b) * b["m"]).sum(), b["m"].sum())
        return per_token(p, b).mean()

    params = {"w": torch.randn(4, generator=g, dtype=F64), "c": torch.zeros((), dtype=F64)}
    decay = 0.5
    tx = ft.sgd(0.05)
    step = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=sizes,
        strategy=strategy,
        chunk_size=chunk_size,
        grad_stats=ft.noise_scale_hook(decay=decay),
    )
    state = ft.TrainState.create(params=params, tx=tx)
    ema_s = ema_g = 0.0
    for t in (1, 2, 3):
        micro, weights = [], []
        for start, size in zip([sum(sizes[:i]) for i in range(len(sizes))], sizes):
            mb = tree.map(lambda v, s=start, b=size: v[s : s + b], batch)
            count = float(mb["m"].sum()) if tokens else float(size)

            def mean_loss(p: dict[str, torch.Tensor], mb: dict[str, Any] = mb) -> torch.Tensor:
                if tokens:
                    return (per_token(p, mb) * mb["m"]).sum() / mb["m"].sum()
                return per_token(p, mb).mean()

            grad = torch.func.grad(mean_loss)(state.params)
            micro.append(torch.cat([grad["w"], grad["c"][None]]))
            weights.append(count)
        trace, grad_sq, diversity = _by_hand(micro, weights)
        ema_s = decay * ema_s + (1 - decay) * trace
        ema_g = decay * ema_g + (1 - decay) * grad_sq
        state, metrics = step(state, batch)
        got = {k: v for k, v in metrics.items() if k.startswith("noise_scale/")}
        assert all(v.dtype == F64 and v.shape == () for v in got.values())
        correction = 1 - decay**t
        for key, want in (
            ("trace_sigma", ema_s / correction),
            ("grad_sq", ema_g / correction),
            ("b_simple", ema_s / ema_g),
            ("gradient_diversity", diversity),
        ):
            assert math.isclose(float(got[f"noise_scale/{key}"]), want, rel_tol=1e-9), key
        assert int(state.extra["noise_scale"].count) == t


def test_hook_estimates_are_unbiased_in_a_train_step() -> None:
    # Per-example gradients x ~ N(G, Σ) (the loss mean(x·w) has per-example gradient x), in
    # unequal micro-batches with one of a single example. With decay 0 each step's metrics are
    # that step's estimates; their average over many steps is within 3 standard errors of
    # tr(Σ) and |G|².
    g = torch.Generator().manual_seed(5)
    dim, sizes, steps = 4, [1, 2, 5], 1500
    grad = torch.randn(dim, generator=g, dtype=F64)
    a = torch.randn(dim, dim, generator=g, dtype=F64)
    sigma = a @ a.T + 0.5 * torch.eye(dim, dtype=F64)
    xs = grad + torch.randn(steps, sum(sizes), dim, generator=g, dtype=F64) @ (
        torch.linalg.cholesky(sigma).T
    )

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return (x @ p["w"]).mean()

    tx = ft.sgd(0.0)
    step = ft.make_train_step(
        loss_fn, tx, micro_batches=sizes, grad_stats=ft.noise_scale_hook(decay=0.0)
    )
    state = ft.TrainState.create(params={"w": torch.zeros(dim, dtype=F64)}, tx=tx)
    traces, grad_sqs = [], []
    for x in xs:
        state, metrics = step(state, x)
        traces.append(metrics["noise_scale/trace_sigma"])
        grad_sqs.append(metrics["noise_scale/grad_sq"])
    for values, truth in ((traces, torch.trace(sigma)), (grad_sqs, grad @ grad)):
        v = torch.stack(values)
        se = float(v.std()) / math.sqrt(steps)
        assert abs(float(v.mean() - truth)) < 3 * se, (float(v.mean()), float(truth), se)


def test_per_sample_chunks_releases_a_chunk_before_computing_the_next() -> None:
    # per_sample_chunks' own locals kept the previous chunk's gradients alive while the next
    # chunk ran, whatever the caller dropped.
    alive_during: list[int] = []
    refs: list[weakref.ref] = []

    def loss_fn(p: dict[str, torch.Tensor], b: torch.Tensor) -> torch.Tensor:
        alive_during.append(sum(r() is not None for r in refs))
        return ((b @ p["w"]) ** 2).mean()

    params = {"w": torch.ones(3, dtype=F64)}
    batch = torch.arange(12, dtype=F64).reshape(4, 3)
    for chunk in ft.per_sample_chunks(loss_fn, params, batch, chunk_size=1, method="vmap"):
        refs.append(weakref.ref(chunk.grads["w"]))
        del chunk
    assert alive_during == [0, 0, 0, 0]
