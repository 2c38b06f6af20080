"""Review of the per-sample ``"loop"`` route and of ``"auto"`` picking it (recurrent models).

Every number is checked against a naive float64 loop: one ``torch.autograd.grad`` per example
on a batch of one, with fresh copies of the parameters (``LossSum``: the example's
``total / count``, 0 for no tokens). The model is a small language model: an embedding
(with dropout where randomness is tested), a two-layer ``nn.LSTM`` (dropout between its
layers) and a linear head, with a token-weighted ``LossSum`` over padded sequences.

Bugs this file pins (each test named after what failed on the old code):

* a frozen recurrent encoder passed as ``buffers`` raised under the reductions' ghost route
  (``"auto"`` with 64 MiB of per-sample gradients, e.g. a large head): ``RuntimeError``
  from the LSTM kernel under the rules' ``vmap`` instead of taking the loop; ``"layers"``
  raised that raw error instead of one naming ``method='loop'``;
* a refused attempt of ``"auto"`` (the rules or ``vmap`` before the recurrent kernel) drew
  the embedding dropout's numbers, so ``"auto"`` and ``"loop"`` differed on an LSTM with
  dropout, and the generators ended elsewhere;
* a bound method ``loss_fn`` (``model.loss``) was watched at every call;
* ``method="loop"`` under ``torch.compile`` failed with ``length mismatch``.
"""

from __future__ import annotations

import gc
import sys
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from grad_problems import example_rows, naive_per_example, stacked_examples
from torch import nn

import functrain as ft
from functrain.grads import _layer_dispatch, _per_example, _routes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
import gloo_jobs

F64 = torch.float64
V, E, H, T, N = 11, 4, 5, 6, 5
TOL = {"rtol": 1e-10, "atol": 1e-12}


class LM(nn.Module):
    """Embedding, 2-layer LSTM (dropout between layers), linear head over the vocabulary."""

    def __init__(self, dropout: float = 0.0, emb_dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.rnn = nn.LSTM(E, H, num_layers=2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(H, V)
        self.emb_dropout = emb_dropout

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        x = self.emb(tok)
        if self.emb_dropout:
            x = F.dropout(x, self.emb_dropout)
        return self.head(self.rnn(x)[0])


def lm(dropout: float = 0.0, emb_dropout: float = 0.0, dtype: torch.dtype = F64) -> tuple:
    torch.manual_seed(0)
    model = LM(dropout, emb_dropout).to(dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: dict, b: dict) -> ft.LossSum:
        z = torch.func.functional_call(model, p, (b["tok"],))
        mask = (torch.arange(T) < b["len"][:, None]).flatten()
        wide = z.flatten(0, 1).to(torch.promote_types(dtype, torch.float32))
        tok = F.cross_entropy(wide, b["tgt"].flatten(), reduction="none")
        return ft.LossSum((tok * mask).sum().to(dtype), mask.sum())

    return model, params, loss_fn


def lm_batch(seed: int, n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tok": torch.randint(0, V, (n, T), generator=g),
        "tgt": torch.randint(0, V, (n, T), generator=g),
        # lengths 0..T: an example of no tokens (loss and gradient 0) appears in most batches
        "len": torch.tensor([0, T, 3, 1, T, 2, 5, 4][:n]) if n <= 8 else torch.randint(0, T, (n,)),
    }


naive, stacked, rows = naive_per_example, stacked_examples, example_rows


def assert_close(got: dict, want: dict, **tol: Any) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **(tol or TOL), msg=k)


@pytest.fixture
def watches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls run under the RecurrentWatch."""
    entered: list[int] = []
    inner = _per_example.RecurrentWatch.__enter__

    def spy(self: Any) -> Any:
        entered.append(1)
        return inner(self)

    monkeypatch.setattr(_per_example.RecurrentWatch, "__enter__", spy)
    return entered


# --- 1. DP-SGD steps on a recurrent language model -------------------------------------------


def _dp_reference(loss_fn, params, batches, clip, lr, expected) -> list:
    """``θ ← θ − lr Σ clip(gᵢ, C) / B`` from naive per-example gradients, per step."""
    out, ref = [], dict(params)
    for batch in batches:
        want, losses = naive(loss_fn, ref, batch)
        norms = rows(want).norm(dim=1)
        factors = (clip / norms).clamp(max=1.0)
        ref = {
            k: v - lr * sum(f * g[k] for f, g in zip(factors, want)) / expected
            for k, v in ref.items()
        }
        out.append((ref, losses.mean(), float((norms > clip).sum()) / len(norms)))
    return out


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_dp_sgd_step_on_an_lstm_language_model_equals_clipping_by_hand(micro_batches) -> None:
    """``make_train_step(per_example_clip=C, micro_batches=K)``, noise off, on a LossSum LM:
    unequal micro-batches (7 = 3+2+2), a batch smaller than K, one of a single example."""
    _, params, loss_fn = lm()
    clip, lr, expected = 0.05, 0.7, 6.0
    tx = ft.chain(ft.dp_noisy_mean(clip, 0.0, expected_batch_size=expected, seed=0), ft.sgd(lr))
    step = ft.make_train_step(loss_fn, tx, micro_batches=micro_batches, per_example_clip=clip)
    state = ft.TrainState.create(params=params, tx=tx)
    batches = [lm_batch(1, 7), lm_batch(2, 2), lm_batch(3, 1)]
    fractions = []
    for batch, (ref, loss, fraction) in zip(
        batches, _dp_reference(loss_fn, params, batches, clip, lr, expected)
    ):
        state, metrics = step(state, batch)
        ft.testing.assert_trees_all_close(state.params, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(metrics["loss"], loss, **TOL)
        assert float(metrics["clipped_fraction"]) == pytest.approx(fraction)
        fractions.append(fraction)
    assert 0 < fractions[0] < 1  # some examples clipped, not all


def _rank_run(rank: int) -> dict:
    """Worker body: the data-parallel DP step vs the one-process step on the whole batch."""
    from functrain import distributed as dist

    _, params, loss_fn = lm()

    def tx() -> ft.GradientTransformation:
        return ft.chain(ft.dp_noisy_mean(0.05, 0.0, 6.0, seed=1), ft.sgd(0.7, momentum=0.5))

    step = dist.make_data_parallel_train_step(loss_fn, tx(), per_example_clip=0.05, micro_batches=2)
    ref_step = ft.make_train_step(loss_fn, tx(), per_example_clip=0.05, micro_batches=2)
    state, ref = step.init_state(params), ft.TrainState.create(params=params, tx=tx())
    out = {"params": 0.0, "metrics": 0.0, "moved": 0.0}
    for s, sizes in enumerate([[3, 4], [0, 5], [2, 1]]):  # unequal, and an empty rank
        whole = lm_batch(10 + s, sum(sizes))
        state, metrics = step(state, gloo_jobs.shares(whole, sizes, rank))
        ref, ref_metrics = ref_step(ref, whole)
        out["params"] = max(out["params"], gloo_jobs.gap(state.params, ref.params))
        out["metrics"] = max(
            out["metrics"], gloo_jobs.gap(metrics, {k: ref_metrics[k] for k in metrics})
        )
    out["moved"] = gloo_jobs.gap(state.params, params)
    out["digest"] = gloo_jobs.digest(state.params)
    return out


def test_data_parallel_dp_step_on_an_lstm_equals_one_process(tmp_path: Path) -> None:
    job = gloo_jobs.run_job(str(Path(__file__).resolve()), 2, tmp_path, timeout=120)
    for rank, data in enumerate(job):
        assert "error" not in data and data["exit"] == 0, (rank, data)
        assert data["params"] < 1e-12 and data["metrics"] < 1e-12, data
        assert data["moved"] > 1e-3  # the steps did something
    assert job[0]["digest"] == job[1]["digest"]


# --- 2. statistics of recurrent models -------------------------------------------------------


def test_grad_stats_hook_and_gram_of_an_lstm() -> None:
    """A step's micro-batch gradients (the hook's input) of an LSTM: the mean of the naive
    per-example gradients (token-weighted for LossSum); ``strategy='vmap'`` names the loop;
    ``grad_gram`` of the loop's per-sample gradients is the per-sample Gram matrix."""
    _, params, loss_fn = lm()
    batch = lm_batch(4, 6)
    seen: list[Any] = []
    hook = ft.GradStatsHook(
        init=lambda p: None,
        per_micro_batch=lambda g, b: {"sq": ft.tree.norm(g, squared=True)},
        update=lambda stats, g, s: (seen.append(stats) or {}, s),
    )
    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, grad_stats=hook)
    step(ft.TrainState.create(params=params, tx=tx), batch)
    want, _ = naive(loss_fn, params, batch)
    counts = batch["len"].double()
    sq = []
    for lo in (0, 3):  # ∇(Σ tokens)/count = Σ cᵢ gᵢ / Σ cᵢ over the micro-batch
        c = counts[lo : lo + 3]
        mean = {n: sum(c[i] * want[lo + i][n] for i in range(3)) / c.sum() for n in params}
        sq.append(ft.tree.norm(mean, squared=True))
    [stats] = seen
    torch.testing.assert_close(stats.values["sq"], torch.stack(sq), **TOL)
    assert stats.sizes.tolist() == [float(counts[:3].sum()), float(counts[3:].sum())]
    with pytest.raises(RuntimeError, match="strategy='loop'"):
        vstep = ft.make_train_step(loss_fn, tx, micro_batches=2, strategy="vmap")
        vstep(ft.TrainState.create(params=params, tx=tx), batch)
    g = ft.per_sample_grads(loss_fn, params, batch)
    torch.testing.assert_close(ft.grad_gram(g), rows(want) @ rows(want).T, **TOL)
    torch.testing.assert_close(
        ft.per_sample_gram(loss_fn, params, batch, chunk_size=4), rows(want) @ rows(want).T, **TOL
    )


# --- 3. a frozen recurrent encoder under the ghost route (bug) --------------------------------


def _frozen(dtype: torch.dtype) -> tuple:
    torch.manual_seed(0)
    enc, head = nn.LSTM(E, H, batch_first=True).to(dtype), nn.Linear(H, V).to(dtype)
    emb = torch.randn(V, E, dtype=dtype)
    params = {k: v.detach() for k, v in head.named_parameters()}
    frozen = {k: v.detach() for k, v in enc.named_parameters()}

    def loss_fn(p: dict, b: dict, buffers: dict) -> torch.Tensor:
        h, _ = torch.func.functional_call(enc, buffers, (emb[b["tok"]],))
        z = torch.func.functional_call(head, p, (h,))
        return F.cross_entropy(z.flatten(0, 1), b["tgt"].flatten())

    return params, frozen, loss_fn


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_frozen_recurrent_encoder_under_the_ghost_route(dtype, monkeypatch, loop_calls) -> None:
    """Large per-sample gradients (as a real vocabulary head has) send "auto" reductions to
    the layer rules; an LSTM on buffers only then failed under their vmapped forward."""
    monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)  # every reduction tries the rules
    params, frozen, loss_fn = _frozen(dtype)
    batch = lm_batch(5)
    want, losses = naive(loss_fn, params, batch, buffers=frozen)
    r = rows(want)
    tol = TOL if dtype == F64 else {"rtol": 1e-5, "atol": 1e-6}
    kw = {"buffers": frozen, "chunk_size": 2}
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, **kw)
    torch.testing.assert_close(norms.global_norm, r.norm(dim=1), **tol)
    clip = float(r.norm(dim=1).median())
    out = ft.clipped_grad_sum(loss_fn, params, batch, clip, **kw)
    factors = (clip / r.norm(dim=1)).clamp(max=1.0)
    assert_close(
        out.grad_sum, {k: torch.tensordot(factors, g, 1) for k, g in stacked(want).items()}, **tol
    )
    torch.testing.assert_close(out.loss_sum, losses.sum(), **tol)
    torch.testing.assert_close(ft.per_sample_gram(loss_fn, params, batch, **kw), r @ r.T, **tol)
    assert len(loop_calls) >= 3 * N  # each reduction took the loop


def test_frozen_recurrent_encoder_in_a_dp_step_with_a_large_head(monkeypatch) -> None:
    monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)
    params, frozen, loss_fn = _frozen(F64)
    clip, lr, expected = 0.1, 0.5, 5.0
    tx = ft.chain(ft.dp_noisy_mean(clip, 0.0, expected_batch_size=expected, seed=0), ft.sgd(lr))
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, per_example_clip=clip)
    state = ft.TrainState.create(params=params, tx=tx, buffers=frozen)
    batch = lm_batch(6)
    [(ref, _, _)] = _dp_reference(
        lambda p, b: loss_fn(p, b, frozen), params, [batch], clip, lr, expected
    )
    state, _ = step(state, batch)
    ft.testing.assert_trees_all_close(state.params, ref, rtol=1e-10, atol=1e-12)


def test_layers_on_a_frozen_recurrent_encoder_names_the_loop() -> None:
    params, frozen, loss_fn = _frozen(F64)
    batch = lm_batch(5)
    with pytest.raises(RuntimeError, match="method='loop'"):
        ft.per_sample_grads(loss_fn, params, batch, buffers=frozen, method="layers")
    with pytest.raises(RuntimeError, match="method='loop'"):
        ft.clipped_grad_sum(loss_fn, params, batch, 1.0, buffers=frozen, method="layers")
    with pytest.raises(RuntimeError, match="method='loop'"):
        ft.per_sample_grad_norms(loss_fn, params, batch, buffers=frozen, method="layers")


# --- 4. randomness: dropout on the embeddings and inside the LSTM ------------------------------


def _reductions(loss_fn, params, batch, **kw) -> dict[str, Any]:
    return {
        "grads": ft.per_sample_grads(loss_fn, params, batch, **kw),
        "norms": ft.per_sample_grad_norms(loss_fn, params, batch, **kw).global_norm,
        "clip": ft.clipped_grad_sum(loss_fn, params, batch, 0.05, **kw).grad_sum,
        "moments": ft.per_sample_grad_moments(loss_fn, params, batch, **kw).m2,
    }


@pytest.mark.parametrize("ghost", [False, True])
@pytest.mark.parametrize("randomness", ["different", "same"])
def test_auto_is_the_loop_bit_for_bit_with_dropout(randomness, ghost, monkeypatch) -> None:
    """Dropout on the embeddings draws before the LSTM is met: "auto"'s refused attempt (the
    rules or vmap) drew those numbers, then the loop drew again. Chunks of 2 over 5 examples."""
    if ghost:
        monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)
    _, params, loss_fn = lm(dropout=0.4, emb_dropout=0.3)
    batch = lm_batch(7)
    kw = {"randomness": randomness, "chunk_size": 2}
    outs, after = {}, {}
    for method in ("auto", "loop"):
        torch.manual_seed(11)
        outs[method] = _reductions(loss_fn, params, batch, method=method, **kw)
        after[method] = torch.get_rng_state()
    ft.testing.assert_trees_all_equal(outs["auto"], outs["loop"])
    assert torch.equal(after["auto"], after["loop"])


def test_randomness_different_is_a_naive_loop_after_the_same_seed() -> None:
    _, params, loss_fn = lm(dropout=0.4, emb_dropout=0.3)
    batch = lm_batch(8)
    torch.manual_seed(3)
    want, _ = naive(loss_fn, params, batch)
    state = torch.get_rng_state()
    torch.manual_seed(3)
    got = ft.per_sample_grads(loss_fn, params, batch, randomness="different", chunk_size=2)
    assert_close(got, stacked(want))
    assert torch.equal(torch.get_rng_state(), state)


def test_randomness_same_shares_each_chunks_draw() -> None:
    """Chunks of 2 over 5 equal examples: one draw per chunk (the last chunk of one example
    draws its own), and the generator ends where that reference leaves it."""
    _, params, loss_fn = lm(dropout=0.4, emb_dropout=0.3)
    batch = {k: v[1:2].repeat_interleave(5, 0) for k, v in lm_batch(9).items()}
    torch.manual_seed(4)
    want = []
    for lo in range(0, 5, 2):
        start = torch.get_rng_state()
        for i in range(lo, min(lo + 2, 5)):
            torch.set_rng_state(start)
            want += naive(loss_fn, params, {k: v[i : i + 1] for k, v in batch.items()})[0]
    state = torch.get_rng_state()
    torch.manual_seed(4)
    got = ft.per_sample_grads(loss_fn, params, batch, randomness="same", chunk_size=2)
    assert_close(got, stacked(want))
    assert torch.equal(torch.get_rng_state(), state)
    w = got["rnn.weight_hh_l1"]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_randomness_error_raises_and_leaves_the_generator(method) -> None:
    _, params, loss_fn = lm(emb_dropout=0.3)
    state = torch.get_rng_state()
    for f in (ft.per_sample_grads, ft.per_sample_grad_norms):
        with pytest.raises(RuntimeError, match="randomness"):
            f(loss_fn, params, lm_batch(1), method=method)
        assert torch.equal(torch.get_rng_state(), state)


def test_a_refused_layer_rule_draws_what_vmap_draws() -> None:
    """Not recurrent: dropout, then a parameter used by a call without a rule (the rules
    refuse, "auto" reruns under vmap): the draws are vmap's, the generator ends as vmap's."""
    torch.manual_seed(0)
    p = {"w": torch.randn(3, 4, dtype=F64), "s": torch.randn(3, dtype=F64)}

    def loss_fn(p: dict, b: torch.Tensor) -> torch.Tensor:
        return (F.dropout(b, 0.5) @ p["w"].T * p["s"]).square().mean()

    x = torch.randn(6, 4, dtype=F64)
    outs = {}
    for method in ("auto", "vmap"):
        torch.manual_seed(5)
        g = ft.per_sample_grads(loss_fn, p, x, method=method, randomness="different")
        outs[method] = (g, torch.rand(3))
    ft.testing.assert_trees_all_equal(outs["auto"], outs["vmap"])


# --- 5. the watch: which loss_fns "auto" watches, and what it keeps ----------------------------


class Model:
    """A loss_fn as a bound method (a new object at every attribute access)."""

    def __init__(self, recurrent: bool) -> None:
        self.model, self.params, self.lm_loss = lm() if recurrent else (None, None, None)
        self.recurrent = recurrent

    def loss(self, p: dict, b: dict) -> Any:
        if self.recurrent:
            return self.lm_loss(p, b)
        return ((b["tok"].double() @ p["w"]) ** 2).mean()


def test_a_bound_method_is_watched_until_its_first_clean_call(watches) -> None:
    m = Model(recurrent=False)
    p, batch = {"w": torch.randn(T, dtype=F64)}, lm_batch(1)
    for _ in range(3):
        ft.clipped_grad_sum(m.loss, p, batch, 1.0)
        ft.per_sample_grad_norms(m.loss, p, batch)
    assert len(watches) == 1
    other = Model(recurrent=False)  # another instance: watched on its own
    ft.per_sample_grad_norms(other.loss, p, batch)
    assert len(watches) == 2
    # and the record keeps neither alive
    refs = [weakref.ref(m), weakref.ref(other)]
    del m, other
    gc.collect()
    assert all(r() is None for r in refs)


def test_the_watch_keeps_no_loss_fn_or_model_alive() -> None:
    def make() -> Callable[..., Any]:
        model = nn.Linear(T, 1).double()
        return lambda p, b: torch.func.functional_call(model, p, (b["tok"].double(),)).mean()

    f = make()
    p = {k: v.detach() for k, v in f.__closure__[0].cell_contents.named_parameters()}
    ft.clipped_grad_sum(f, p, lm_batch(1), 1.0, method="vmap")
    ft.clipped_grad_sum(f, p, lm_batch(1), 1.0)
    assert f in _routes._WATCHED
    ref = weakref.ref(f.__closure__[0].cell_contents)
    del f
    gc.collect()
    assert ref() is None


def test_a_loss_fn_that_meets_an_lstm_only_on_some_batches(loop_calls) -> None:
    """A branch on the batch's structure: clean batches, LSTM batches, clean again; every
    call's numbers are the naive loop's (float64: vmap fails and sends the batch to the loop;
    float32 under ``-W error``: torch's fallback warning does)."""
    for dtype in (F64, torch.float32):
        _, params, lm_loss = lm(dtype=dtype)

        def loss_fn(p: dict, b: dict) -> Any:
            if "tok" in b:
                return lm_loss(p, b)
            return sum((v.double() ** 2).sum() for v in p.values()).to(dtype) * b["z"].mean()

        plain = {"z": torch.randn(N, 2, dtype=dtype)}
        tol = TOL if dtype == F64 else {"rtol": 1e-5, "atol": 1e-6}
        for batch in (plain, lm_batch(2), plain, lm_batch(3)):
            want, _ = naive(loss_fn, params, batch)
            got = ft.per_sample_grad_norms(loss_fn, params, batch, chunk_size=3)
            torch.testing.assert_close(got.global_norm, rows(want).norm(dim=1), **tol)
            out = ft.clipped_grad_sum(loss_fn, params, batch, 0.1)
            factors = (0.1 / rows(want).norm(dim=1)).clamp(max=1.0)
            torch.testing.assert_close(
                out.grad_sum["head.bias"],
                sum(f * g["head.bias"] for f, g in zip(factors, want)),
                **tol,
            )
    assert len(loop_calls) == 2 * 2 * 2 * N  # the LSTM batches, both reductions, both dtypes


def test_non_recurrent_models_keep_their_routes(loop_calls, watches, monkeypatch) -> None:
    """An MLP and a CNN: per-sample gradients by the layer rules, reductions by vmap (watched
    on the first call only), never the loop."""
    ruled: list[int] = []
    inner = _routes.per_sample_by_layers

    def spy(*args: Any) -> Any:
        ruled.append(1)
        return inner(*args)

    monkeypatch.setattr(_routes, "per_sample_by_layers", spy)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double()
    for model, x in (
        (mlp, torch.randn(5, 4, dtype=F64)),
        (cnn, torch.randn(5, 1, 4, 4, dtype=F64)),
    ):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_fn(p: dict, b: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
            return torch.func.functional_call(model, p, (b,)).square().mean()

        before = (len(ruled), len(watches))
        for _ in range(3):
            g = ft.per_sample_grads(loss_fn, params, x, chunk_size=2)
            ft.per_sample_grad_norms(loss_fn, params, x, chunk_size=2)
            ft.clipped_grad_sum(loss_fn, params, x, 1.0)
        assert len(ruled) - before[0] == 3 * 3  # three chunks, three calls
        assert len(watches) - before[1] == 1
        want, _ = naive(loss_fn, params, x)
        assert_close(g, stacked(want))
    assert not loop_calls


# --- 6. edges -----------------------------------------------------------------------------


def test_edges_of_the_loop(loop_calls) -> None:
    """A batch of one, an example of no tokens, an empty batch, ``nn.Parameter`` leaves,
    ``has_aux`` (a non-tensor leaf kept), ``no_grad`` around the call."""
    _, params, loss_fn = lm()
    as_params = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    batch = lm_batch(2)
    want, losses = naive(loss_fn, params, batch)

    def with_aux(p: dict, b: dict) -> tuple:
        out = loss_fn(p, b)
        return out, {"total": out.total, "name": "lm"}

    with torch.no_grad():
        (got_losses, aux), grads = ft.per_sample_value_and_grads(
            with_aux, as_params, batch, has_aux=True
        )
        one = ft.per_sample_grads(loss_fn, params, {k: v[1:2] for k, v in batch.items()})
    assert_close(grads, stacked(want))
    torch.testing.assert_close(got_losses, losses, **TOL)
    assert aux["name"] == "lm" and aux["total"].shape == (N,)
    assert not aux["total"].requires_grad and not grads["head.bias"].requires_grad
    assert all(p.grad is None for p in as_params.values())
    assert_close(one, stacked(want[1:2]))
    assert float(losses[0]) == 0.0 and all(float(g.abs().max()) == 0 for g in want[0].values())
    empty = {k: v[:0] for k, v in batch.items()}
    assert ft.per_sample_grads(loss_fn, params, empty)["head.weight"].shape == (0, V, H)
    assert ft.per_sample_grad_norms(loss_fn, params, empty).global_norm.shape == (0,)
    out = ft.clipped_grad_sum(loss_fn, params, empty, 1.0)
    assert out.count == 0 and float(out.grad_sum["head.bias"].abs().sum()) == 0.0
    assert ft.per_sample_gram(loss_fn, params, empty).shape == (0, 0)
    assert ft.per_sample_grad_moments(loss_fn, params, empty).count == 0
    assert len(loop_calls) == N + 1  # "auto" took the loop; an empty batch has no example


def test_the_loop_under_inference_mode() -> None:
    """Autograd records nothing under ``torch.inference_mode``: the loop gave zero gradients
    (vmap's were right). Also with params, batch and frozen buffers made in inference mode."""
    _, params, loss_fn = lm()
    batch = lm_batch(2)
    want, losses = naive(loss_fn, params, batch)
    r = rows(want)
    with torch.inference_mode():
        (got_losses, grads) = ft.per_sample_value_and_grads(loss_fn, params, batch)
        norms = ft.per_sample_grad_norms(loss_fn, params, batch).global_norm
        out = ft.clipped_grad_sum(loss_fn, params, batch, 1e9, method="loop")
        made_here = ft.tree.map(torch.clone, (params, batch))
        again = ft.per_sample_grads(loss_fn, *made_here, method="loop")
    assert_close(grads, stacked(want))
    assert_close(again, stacked(want))
    torch.testing.assert_close(got_losses, losses, **TOL)
    torch.testing.assert_close(norms, r.norm(dim=1), **TOL)
    assert_close(out.grad_sum, {k: g.sum(0) for k, g in stacked(want).items()})
    # an MLP by the loop: vmap's numbers
    torch.manual_seed(0)
    p = {"w": torch.randn(3, 4, dtype=F64)}
    x = torch.randn(5, 4, dtype=F64)

    def mlp(p: dict, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(b @ p["w"].T).square().mean()

    ref = ft.per_sample_grads(mlp, p, x, method="vmap")
    with torch.inference_mode():
        got = ft.per_sample_grads(mlp, p, x, method="loop")
    assert_close(got, ref)
    # a frozen encoder whose weights were made in inference mode
    params, frozen, enc_loss = _frozen(F64)
    want, _ = naive(enc_loss, params, batch, buffers=frozen)
    with torch.inference_mode():
        got = ft.per_sample_grads(
            enc_loss, params, batch, buffers=ft.tree.map(torch.clone, frozen), method="loop"
        )
    assert_close(got, stacked(want))


def test_complex_parameters_by_the_loop_are_vmaps() -> None:
    """The loop and ``vmap(grad)`` follow one convention for a real loss of complex leaves
    (the conjugate Wirtinger gradient), checked on ``|x·w|²``: ``2 (x·w) conj(x)``."""
    torch.manual_seed(0)
    w = {"w": torch.randn(3, dtype=torch.complex128)}
    x = torch.randn(4, 3, dtype=torch.complex128)

    def loss_fn(p: dict, b: torch.Tensor) -> torch.Tensor:
        return (b @ p["w"]).abs().square().mean()

    got = ft.per_sample_grads(loss_fn, w, x, method="loop")["w"]
    torch.testing.assert_close(got, ft.per_sample_grads(loss_fn, w, x, method="vmap")["w"])
    torch.testing.assert_close(got, 2 * (x @ w["w"])[:, None] * x.conj(), **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_lstm_is_the_naive_loop_in_that_dtype(dtype) -> None:
    _, params, loss_fn = lm(dtype=dtype)
    batch = lm_batch(3)
    want, _ = naive(loss_fn, params, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ft.per_sample_grads(loss_fn, params, batch)
    assert_close(got, stacked(want), rtol=0, atol=0)
    ref = rows([{k: v.double() for k, v in g.items()} for g in want]).norm(dim=1)
    norms = ft.per_sample_grad_norms(loss_fn, params, batch).global_norm
    assert norms.dtype == dtype
    torch.testing.assert_close(norms.double(), ref, rtol=1e-2, atol=1e-4)


def test_the_loop_under_torch_compile() -> None:
    """Documented as eager only: a graph break under torch.compile (it failed with ``length
    mismatch``), with the eager numbers."""
    _, params, loss_fn = lm()
    batch = lm_batch(4, 3)
    want, _ = naive(loss_fn, params, batch)

    @torch.compile(backend="eager")
    def norms(p: dict, b: dict) -> torch.Tensor:
        return ft.per_sample_grad_norms(loss_fn, p, b, method="loop").global_norm * 2

    torch.testing.assert_close(norms(params, batch), 2 * rows(want).norm(dim=1), **TOL)


if __name__ == "__main__":  # a rank of test_data_parallel_dp_step_on_an_lstm_equals_one_process
    gloo_jobs.run_worker(_rank_run)
