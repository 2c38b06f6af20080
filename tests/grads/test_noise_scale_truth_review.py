r"""``noise_scale_hook`` on real models against ground truth from per-example gradients.

Models: an MLP and a small CNN on sklearn's ``load_digits``, float64. The ground truth of a
fixed batch comes from a naive loop of ``torch.autograd.grad``, one call per example.

What "truth" is for micro-batches drawn from a finite batch. Take a fixed batch of ``N``
examples with per-example gradients ``gₙ``, mean ``ḡ`` and ``s² = Σₙ‖gₙ − ḡ‖² / (N − 1)``. A
random split of the batch into ``K`` micro-batches of fixed sizes ``bᵢ`` (``Σ bᵢ = N``) makes
each micro-batch a simple random sample *without replacement*, while the step gradient
``ĝ = ḡ`` is the same for every split. Sampling without replacement gives
``E[ĝᵢ] = ḡ`` and ``tr Cov(ĝᵢ) = (s²/bᵢ)(1 − bᵢ/N)`` (the finite-population correction), so::

    E[Σᵢ bᵢ‖ĝᵢ‖² − N‖ĝ‖²] = Σᵢ bᵢ(‖ḡ‖² + s²/bᵢ − s²/N) − N‖ḡ‖² = (K − 1)·s²

for *any* sizes: the mean over splits of the hook's ``tr(Σ)`` is exactly ``s²`` (the
``N − 1`` sample covariance trace, not the ``N`` population one), and of its ``|G|²`` exactly
``‖ḡ‖² − s²/N`` (the unbiased estimate of the squared mean from ``N`` draws).

For a ``LossSum`` loss the micro-batch gradient is ``ĝᵢ = Hᵢ/Cᵢ``, with ``hₙ`` the gradient of
example ``n``'s summed loss, ``cₙ`` its count, ``Hᵢ, Cᵢ`` their sums over the micro-batch, and
``bᵢ = Cᵢ``. With unequal counts ``1/Cᵢ`` is random and there is no closed form (the
estimator's ``Cov(ĝᵢ) = Σ/bᵢ`` is documented as an approximation then), but by linearity::

    E[tr(Σ)_est] = (Σᵢ f(mᵢ) − ‖H‖²/C) / (K − 1),   f(m) = mean over all m-subsets A of ‖H_A‖²/C_A

(``mᵢ`` examples in micro-batch ``i``), which we enumerate exactly. With equal counts
``cₙ = L`` this reduces to ``s_h²/L`` (``s_h²`` the sample covariance trace of the ``hₙ``),
i.e. ``L·Σ_seq`` for the per-sequence mean gradient, as the hook's docstring says.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import functrain as ft

F64 = torch.float64
PREFIX = "noise_scale/"


def _digits(n: int, seed: int, tokens: bool = False) -> dict[str, torch.Tensor]:
    """``n`` digits (pixels scaled to [0, 1]); with ``tokens`` a ragged mask of 1–4 tokens."""
    x, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(seed).choice(len(y), n, replace=False)
    batch = {"x": torch.tensor(x[idx] / 16.0, dtype=F64), "y": torch.tensor(y[idx])}
    if tokens:
        counts = torch.tensor(np.random.default_rng(seed + 1).integers(1, 5, n))
        batch["mask"] = (torch.arange(4) < counts[:, None]).to(F64)
    return batch


def _mlp_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(64, 12, generator=g, dtype=F64) / 8,
        "b1": torch.zeros(12, dtype=F64),
        "w2": torch.randn(12, 10, generator=g, dtype=F64) / 4,
        "b2": torch.zeros(10, dtype=F64),
    }


def _cnn_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "k": torch.randn(3, 1, 3, 3, generator=g, dtype=F64) / 3,
        "kb": torch.zeros(3, dtype=F64),
        "w": torch.randn(3 * 36, 10, generator=g, dtype=F64) / 10,
        "b": torch.zeros(10, dtype=F64),
    }


def _mlp_logits(p: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _cnn_logits(p: dict, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(F.conv2d(x.reshape(-1, 1, 8, 8), p["k"], p["kb"]))  # (n, 3, 6, 6)
    return h.flatten(1) @ p["w"] + p["b"]


MODELS = {"mlp": (_mlp_params, _mlp_logits), "cnn": (_cnn_params, _cnn_logits)}


def _mean_loss(logits_fn: Callable) -> Callable:
    def loss(p: dict, b: dict) -> torch.Tensor:
        return F.cross_entropy(logits_fn(p, b["x"]), b["y"])

    return loss


def _token_total(logits_fn: Callable, p: dict, b: dict) -> torch.Tensor:
    """Summed loss over tokens: token ``t`` of an example is its logits at temperature t+1."""
    logits = logits_fn(p, b["x"])
    per = torch.stack(
        [F.cross_entropy(logits / (t + 1), b["y"], reduction="none") for t in range(4)], 1
    )
    return (per * b["mask"]).sum()


def _token_loss(logits_fn: Callable) -> Callable:
    def loss(p: dict, b: dict) -> ft.LossSum:
        return ft.LossSum(_token_total(logits_fn, p, b), b["mask"].sum())

    return loss


def _flat(grads: Any) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def _per_example(params: dict, batch: dict, logits_fn: Callable, tokens: bool):
    """Naive per-example gradients ``(N, P)`` (mean loss: ``gₙ``; LossSum: ``hₙ``) and counts."""
    names = list(params)
    leaves = [params[k].detach().requires_grad_(True) for k in names]
    rows, counts = [], []
    for n in range(len(batch["y"])):
        one = {k: v[n : n + 1] for k, v in batch.items()}
        p = dict(zip(names, leaves, strict=True))
        if tokens:
            value = _token_total(logits_fn, p, one)
            counts.append(float(one["mask"].sum()))
        else:
            value = F.cross_entropy(logits_fn(p, one["x"]), one["y"])
            counts.append(1.0)
        rows.append(_flat(torch.autograd.grad(value, leaves)))
    return torch.stack(rows), torch.tensor(counts, dtype=F64)


def _recording(hook: Any, log: list) -> Any:
    """The hook, with its ``update`` logging the ``‖ĝᵢ‖²`` and sizes it is handed."""

    def update(stats: Any, grads: Any, state: Any) -> Any:
        log.append((stats.values["sq_norm"].detach().clone(), torch.as_tensor(stats.sizes).clone()))
        return hook.update(stats, grads, state)

    return hook._replace(update=update)


def _hand_estimate(micro: list[torch.Tensor], sizes: list[float]) -> tuple[float, float]:
    """The documented estimator applied by hand to hand-made micro-batch gradients."""
    b = torch.tensor(sizes, dtype=F64)
    g = sum(bi * gi for bi, gi in zip(b, micro, strict=True)) / b.sum()
    sq = torch.stack([gi @ gi for gi in micro])
    trace = float(((b * sq).sum() - b.sum() * (g @ g)) / (len(micro) - 1))
    return trace, float(g @ g) - trace / float(b.sum())


def _micro_grads(rows: torch.Tensor, counts: torch.Tensor, order: torch.Tensor, sizes: list[int]):
    out, start = [], 0
    for m in sizes:
        idx = order[start : start + m]
        out.append(rows[idx].sum(0) / counts[idx].sum())
        start += m
    return out


def _run_draws(model: str, sizes: list[int], tokens: bool, draws: int, seed: int):
    """Per-draw hook estimates over random splits, plus the per-example rows and counts."""
    make_params, logits_fn = MODELS[model]
    params, batch = make_params(), _digits(sum(sizes), seed, tokens)
    loss = _token_loss(logits_fn) if tokens else _mean_loss(logits_fn)
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        loss, tx, micro_batches=sizes, grad_stats=ft.noise_scale_hook(decay=0.5), donate=False
    )
    state = ft.TrainState.create(params=params, tx=tx)
    g = torch.Generator().manual_seed(seed)
    traces, grad_sqs = [], []
    for _ in range(draws):
        order = torch.randperm(sum(sizes), generator=g)
        _, metrics = step(state, {k: v[order] for k, v in batch.items()})
        # After one step the bias-corrected averages are that step's estimates.
        traces.append(float(metrics[PREFIX + "trace_sigma"]))
        grad_sqs.append(float(metrics[PREFIX + "grad_sq"]))
    rows, counts = _per_example(params, batch, logits_fn, tokens)
    return np.array(traces), np.array(grad_sqs), rows, counts


def _assert_within_3se(values: np.ndarray, truth: float) -> None:
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean() - truth) <= 3 * se + 1e-12 * abs(truth), (values.mean(), truth, se)


MEAN_SIZES = [[9, 9], [5, 13], [6, 6, 6], [2, 7, 9], [3, 4, 5, 6], [2, 2, 2, 2, 2, 2, 3, 3]]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("sizes", MEAN_SIZES, ids=str)
def test_mean_over_splits_is_the_sample_covariance_trace(model: str, sizes: list[int]) -> None:
    traces, grad_sqs, rows, _ = _run_draws(model, sizes, False, draws=60, seed=len(sizes))
    n = rows.shape[0]
    mean = rows.mean(0)
    s2 = float(((rows - mean) ** 2).sum() / (n - 1))  # N − 1: see the module docstring
    _assert_within_3se(traces, s2)
    _assert_within_3se(grad_sqs, float(mean @ mean) - s2 / n)
    # ĝ = ḡ for every split, so |G|² is tied to tr(Σ) step by step.
    np.testing.assert_allclose(grad_sqs, float(mean @ mean) - traces / n, rtol=1e-9, atol=1e-14)


def _subset_mean(rows: torch.Tensor, counts: torch.Tensor, m: int) -> float:
    """``f(m)``: the mean of ``‖H_A‖²/C_A`` over all ``m``-subsets ``A`` (exact enumeration)."""
    idx = torch.tensor(list(itertools.combinations(range(rows.shape[0]), m)))
    h, c = rows[idx].sum(1), counts[idx].sum(1)
    return float(((h * h).sum(1) / c).mean())


@pytest.mark.parametrize(
    "sizes", [[5, 7], [2, 4, 6], [3, 3, 3, 3], [1, 1, 1, 1, 2, 2, 2, 2]], ids=str
)
def test_loss_sum_with_unequal_counts_matches_the_exact_expectation(sizes: list[int]) -> None:
    traces, grad_sqs, rows, counts = _run_draws("mlp", sizes, True, draws=60, seed=7)
    assert len(set(counts.tolist())) > 1  # unequal counts indeed
    h, c = rows.sum(0), float(counts.sum())
    truth = (sum(_subset_mean(rows, counts, m) for m in sizes) - float(h @ h) / c) / (
        len(sizes) - 1
    )
    _assert_within_3se(traces, truth)
    _assert_within_3se(grad_sqs, float(h @ h) / c**2 - truth / c)


def test_loss_sum_with_equal_counts_is_count_times_the_sequence_noise() -> None:
    make_params, logits_fn = MODELS["mlp"]
    sizes, draws = [3, 4, 5], 60
    params, batch = make_params(), _digits(12, 3, tokens=True)
    batch["mask"] = torch.ones_like(batch["mask"])[:, :4]  # L = 4 tokens each
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        _token_loss(logits_fn),
        tx,
        micro_batches=sizes,
        grad_stats=ft.noise_scale_hook(),
        donate=False,
    )
    state = ft.TrainState.create(params=params, tx=tx)
    g = torch.Generator().manual_seed(0)
    traces = []
    for _ in range(draws):
        order = torch.randperm(12, generator=g)
        _, metrics = step(state, {k: v[order] for k, v in batch.items()})
        traces.append(float(metrics[PREFIX + "trace_sigma"]))
    rows, _ = _per_example(params, batch, logits_fn, tokens=True)
    s2_h = float(((rows - rows.mean(0)) ** 2).sum() / 11)
    _assert_within_3se(np.array(traces), s2_h / 4)


CONFIGS = [
    {"strategy": "loop", "grad_backend": "autograd"},
    {"strategy": "loop", "grad_backend": "func"},
    {"strategy": "vmap"},
    {"strategy": "loop", "grad_backend": "autograd", "nonfinite": "ignore"},
    {"strategy": "vmap", "nonfinite": "ignore"},
    {"strategy": "loop", "grad_backend": "autograd", "loss_scale": ft.DynamicLossScale(2.0**10)},
    {"strategy": "loop", "grad_backend": "func", "loss_scale": ft.DynamicLossScale(2.0**10)},
    {"strategy": "vmap", "loss_scale": ft.DynamicLossScale(2.0**10)},
]


@pytest.mark.parametrize("cosine", [False, True], ids=["plain", "cosine"])
@pytest.mark.parametrize("tokens", [False, True], ids=["mean", "loss_sum"])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_hook_inputs_are_the_micro_batch_norms_by_hand(
    options: dict, tokens: bool, cosine: bool
) -> None:
    make_params, logits_fn = MODELS["cnn"]
    sizes = [2, 5, 3, 4]
    params, batch = make_params(1), _digits(sum(sizes), 11, tokens)
    loss = _token_loss(logits_fn) if tokens else _mean_loss(logits_fn)
    log: list = []
    tx = ft.sgd(0.1)
    hook = _recording(ft.noise_scale_hook(cosine=cosine), log)
    step = ft.make_train_step(
        loss, tx, micro_batches=sizes, grad_stats=hook, donate=False, **options
    )
    _, metrics = step(ft.TrainState.create(params=params, tx=tx), batch)

    rows, counts = _per_example(params, batch, logits_fn, tokens)
    micro = _micro_grads(rows, counts, torch.arange(sum(sizes)), sizes)
    b = [
        float(counts[s : s + m].sum())
        for s, m in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True)
    ]
    ((sq, got_sizes),) = log
    torch.testing.assert_close(
        sq.to(F64), torch.stack([g @ g for g in micro]), rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(got_sizes.to(F64), torch.tensor(b, dtype=F64), rtol=0, atol=0)
    trace, grad_sq = _hand_estimate(micro, b)
    assert math.isclose(float(metrics[PREFIX + "trace_sigma"]), trace, rel_tol=1e-9)
    assert math.isclose(float(metrics[PREFIX + "grad_sq"]), grad_sq, rel_tol=1e-9)
    if cosine:
        pairs = [float(u @ v / (u.norm() * v.norm())) for u, v in itertools.combinations(micro, 2)]
        expected = sum(pairs) / len(pairs)
        assert math.isclose(float(metrics[PREFIX + "mean_cosine"]), expected, rel_tol=1e-10)


def test_b_simple_over_30_steps_is_the_ratio_of_hand_moving_averages() -> None:
    logits_fn = MODELS["mlp"][1]
    sizes, decay = [3, 5, 4], 0.8
    loss = _mean_loss(logits_fn)
    tx = ft.sgd(0.5)
    step = ft.make_train_step(
        loss, tx, micro_batches=sizes, grad_stats=ft.noise_scale_hook(decay=decay), donate=False
    )
    state = ft.TrainState.create(params=_mlp_params(), tx=tx)
    ema_s = ema_g = 0.0
    for t in range(1, 31):
        batch = _digits(12, 100 + t)
        rows, counts = _per_example(state.params, batch, logits_fn, tokens=False)
        trace, grad_sq = _hand_estimate(_micro_grads(rows, counts, torch.arange(12), sizes), sizes)
        ema_s = decay * ema_s + (1 - decay) * trace
        ema_g = decay * ema_g + (1 - decay) * grad_sq
        state, metrics = step(state, batch)
        correction = 1 - decay**t
        assert math.isclose(float(metrics[PREFIX + "b_simple"]), ema_s / ema_g, rel_tol=1e-9)
        assert math.isclose(
            float(metrics[PREFIX + "trace_sigma"]), ema_s / correction, rel_tol=1e-9
        )
        assert math.isclose(float(metrics[PREFIX + "grad_sq"]), ema_g / correction, rel_tol=1e-9)
    assert int(state.extra["noise_scale"].count) == 30
