"""Per-sample gradients of recurrent models: ``method="loop"``, and ``"auto"`` picking it.

PyTorch's fused recurrent kernels (``nn.LSTM``/``nn.GRU``/``nn.RNN`` and their cells) have no
``vmap`` batching rule and no layer rule, so per-sample gradients, norms, clipped sums, moments
and Gram matrices of such models used to raise. Every number here is checked in float64
against a naive loop: one ``torch.autograd.grad`` per example on a batch of one, with fresh
copies of the parameters (``LossSum``: the example's ``total / count``, 0 for no units).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from grad_problems import example_rows, naive_per_example, stacked_examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import functrain as ft
from functrain.grads import _routes

F64 = torch.float64
N, T, IN, HID = 5, 4, 3, 4
TOL = {"rtol": 1e-10, "atol": 1e-12}
Problem = tuple[Callable[..., Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]


class Tagger(nn.Module):
    """A recurrent layer then a linear head on every step; ``x`` is ``(batch, time, in)``."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        width = (getattr(rnn, "proj_size", 0) or rnn.hidden_size) * (
            2 if getattr(rnn, "bidirectional", False) else 1
        )
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.rnn, nn.LSTMCell):  # a cell stepped in a Python loop
            h = c = x.new_zeros(x.shape[0], self.rnn.hidden_size)
            steps = []
            for t in range(x.shape[1]):
                h, c = self.rnn(x[:, t], (h, c))
                steps.append(h)
            return self.head(torch.stack(steps, 1))
        first = self.rnn.batch_first
        y, _ = self.rnn(x if first else x.transpose(0, 1))
        return self.head(y if first else y.transpose(0, 1))


def _data(seed: int = 1, n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, T, IN, generator=g, dtype=F64),
        "y": torch.randint(0, 3, (n, T), generator=g),
        "len": torch.tensor([4, 1, 3, 0, 2, 4, 1][:n]),
    }


def _tagger(rnn: nn.Module, loss: str = "mean") -> Problem:
    torch.manual_seed(0)
    model = Tagger(rnn).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits(p: dict, b: dict) -> torch.Tensor:
        return torch.func.functional_call(model, p, (b["x"],))

    if loss == "mean":

        def loss_fn(p: dict, b: dict) -> torch.Tensor:
            return F.cross_entropy(logits(p, b).flatten(0, 1), b["y"].flatten())

    elif loss == "packed":  # packed sequences, padding masked out of the loss

        def loss_fn(p: dict, b: dict) -> torch.Tensor:
            lengths = b["len"].clamp_min(1)
            packed = pack_padded_sequence(b["x"], lengths, batch_first=True, enforce_sorted=False)
            out, _ = torch.func.functional_call(model.rnn, _sub(p, "rnn."), (packed,))
            y, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
            z = torch.func.functional_call(model.head, _sub(p, "head."), (y,))
            mask = torch.arange(T) < lengths[:, None]
            per_token = F.cross_entropy(z.flatten(0, 1), b["y"].flatten(), reduction="none")
            return (per_token * mask.flatten()).sum() / mask.sum()

    else:  # a token-weighted LossSum over padded sequences; an example of length 0 counts none

        def loss_fn(p: dict, b: dict) -> ft.LossSum:
            mask = (torch.arange(T) < b["len"][:, None]).flatten()
            per_token = F.cross_entropy(
                logits(p, b).flatten(0, 1), b["y"].flatten(), reduction="none"
            )
            return ft.LossSum((per_token * mask).sum(), mask.sum())

    return loss_fn, params, _data()


def _sub(p: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in p.items() if k.startswith(prefix)}


CASES: dict[str, Callable[[], Problem]] = {
    "lstm": lambda: _tagger(nn.LSTM(IN, HID, batch_first=True)),
    "lstm-2-layers-seq-first": lambda: _tagger(nn.LSTM(IN, HID, num_layers=2)),
    "lstm-bidirectional": lambda: _tagger(nn.LSTM(IN, HID, batch_first=True, bidirectional=True)),
    "lstm-proj-2-layers": lambda: _tagger(
        nn.LSTM(IN, HID, num_layers=2, proj_size=2, batch_first=True)
    ),
    "gru": lambda: _tagger(nn.GRU(IN, HID, num_layers=2, batch_first=True)),
    "rnn-relu-seq-first": lambda: _tagger(nn.RNN(IN, HID, nonlinearity="relu")),
    "lstm-cell-loop": lambda: _tagger(nn.LSTMCell(IN, HID)),
    "lstm-packed": lambda: _tagger(nn.LSTM(IN, HID, batch_first=True), "packed"),
    "gru-loss-sum": lambda: _tagger(nn.GRU(IN, HID, batch_first=True), "sum"),
}


naive, _stacked, _flat = naive_per_example, stacked_examples, example_rows


def _assert_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=k)


# --- the numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 2, 1])
@pytest.mark.parametrize("method", ["auto", "loop"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_per_sample_grads_match_a_naive_loop(name, method, chunk_size, loop_calls) -> None:
    loss_fn, params, batch = CASES[name]()
    before = {k: v.clone() for k, v in params.items()}
    want, losses = naive(loss_fn, params, batch)
    got_losses, got = ft.per_sample_value_and_grads(
        loss_fn, params, batch, method=method, chunk_size=chunk_size
    )
    _assert_close(got, _stacked(want))
    torch.testing.assert_close(got_losses, losses, **TOL)
    assert len(loop_calls) == N  # "auto" took the loop, once per example
    ft.testing.assert_trees_all_equal(params, before)


@pytest.mark.parametrize("method", ["auto", "loop"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_reductions_match_a_naive_loop(name, method) -> None:
    loss_fn, params, batch = CASES[name]()
    want, losses = naive(loss_fn, params, batch)
    rows = _flat(want)
    norms = rows.norm(dim=1)
    kw = {"method": method, "chunk_size": 2}

    got = ft.per_sample_grad_norms(loss_fn, params, batch, **kw)
    torch.testing.assert_close(got.global_norm, norms, **TOL)
    for k, g in _stacked(want).items():
        torch.testing.assert_close(got.leaf_norms[k], g.flatten(1).norm(dim=1), **TOL)

    s = norms.sort().values
    clip = float(s[1] + s[2]) / 2  # between two norms: clips some examples, not all
    out = ft.clipped_grad_sum(loss_fn, params, batch, clip, **kw)
    factors = (clip / norms).clamp(max=1.0)
    _assert_close(
        out.grad_sum, {k: torch.tensordot(factors, g, 1) for k, g in _stacked(want).items()}
    )
    assert int(out.num_clipped) == int((norms > clip).sum()) == 3
    torch.testing.assert_close(out.loss_sum, losses.sum(), **TOL)
    assert out.count == N

    m = ft.per_sample_grad_moments(loss_fn, params, batch, **kw)
    assert m.count == N
    mean = {k: g.mean(0) for k, g in _stacked(want).items()}
    _assert_close(m.mean, mean)
    _assert_close(m.m2, {k: ((g - g.mean(0)) ** 2).sum(0) for k, g in _stacked(want).items()})

    torch.testing.assert_close(
        ft.per_sample_gram(loss_fn, params, batch, **kw), rows @ rows.T, **TOL
    )


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 7), chunk=st.one_of(st.none(), st.integers(1, 8)))
def test_any_batch_and_chunk_size(n: int, chunk: int | None) -> None:
    """Chunks that divide the batch or not, larger than it, a batch of one."""
    loss_fn, params, _ = CASES["gru"]()
    batch = _data(seed=n, n=n)
    want, _ = naive(loss_fn, params, batch)
    _assert_close(ft.per_sample_grads(loss_fn, params, batch, chunk_size=chunk), _stacked(want))
    got = ft.per_sample_grad_norms(loss_fn, params, batch, chunk_size=chunk)
    torch.testing.assert_close(got.global_norm, _flat(want).norm(dim=1), **TOL)


def test_loop_differentiates_what_torch_func_grad_can() -> None:
    """A gradient penalty inside loss_fn (its own torch.func.grad) next to an LSTM."""
    loss_fn, params, batch = CASES["lstm"]()

    def penalized(p: dict, b: dict) -> torch.Tensor:
        inner = torch.func.grad(lambda x: loss_fn(p, {**b, "x": x}))(b["x"])
        return loss_fn(p, b) + inner.square().sum()

    want, _ = naive(penalized, params, batch)
    _assert_close(ft.per_sample_grads(penalized, params, batch, method="loop"), _stacked(want))


# --- which route "auto" takes ----------------------------------------------------------------


def _mlp() -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (b["x"],))
        return F.cross_entropy(out.flatten(0, 1), b["y"].flatten())

    return loss_fn, params, _data()


def test_auto_keeps_the_layer_rules_and_vmap_elsewhere(loop_calls) -> None:
    loss_fn, params, batch = _mlp()
    kw = {"chunk_size": 2}
    grads = ft.per_sample_grads(loss_fn, params, batch, **kw)
    ft.testing.assert_trees_all_equal(
        grads, ft.per_sample_grads(loss_fn, params, batch, method="layers", **kw)
    )
    ft.testing.assert_trees_all_equal(
        ft.clipped_grad_sum(loss_fn, params, batch, 0.1, **kw),
        ft.clipped_grad_sum(loss_fn, params, batch, 0.1, method="vmap", **kw),
    )
    ft.testing.assert_trees_all_equal(
        ft.per_sample_grad_norms(loss_fn, params, batch, **kw),
        ft.per_sample_grad_norms(loss_fn, params, batch, method="vmap", **kw),
    )
    ft.testing.assert_trees_all_equal(
        ft.per_sample_grad_moments(loss_fn, params, batch, **kw),
        ft.per_sample_grad_moments(loss_fn, params, batch, method="vmap", **kw),
    )
    assert not loop_calls
    want, _ = naive(loss_fn, params, batch)
    _assert_close(grads, _stacked(want))


def test_auto_takes_the_loop_for_a_float32_lstm_without_torch_warnings(loop_calls) -> None:
    """On CPU, vmap runs a float32 nn.LSTM through its slow fallback with a warning (an error
    under -W error); "auto" must see the kernel first, with warnings shown or raised."""
    torch.manual_seed(0)
    lstm = nn.LSTM(IN, HID, batch_first=True)
    params = {k: v.detach() for k, v in lstm.named_parameters()}
    x = torch.randn(N, T, IN)

    def loss_fn(p: dict, b: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(lstm, p, (b,))[0].square().mean()

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        norms = ft.per_sample_grad_norms(loss_fn, params, x)
        out = ft.clipped_grad_sum(loss_fn, params, x, 1e-3)
    assert not shown, [str(w.message) for w in shown]
    assert len(loop_calls) == 2 * N
    want, _ = naive(loss_fn, params, x)
    torch.testing.assert_close(norms.global_norm, _flat(want).norm(dim=1))
    assert int(out.num_clipped) == N


def test_a_recurrent_kernel_met_after_an_unwatched_call_still_takes_the_loop(loop_calls) -> None:
    """ "auto" watches a loss_fn until one call ran without a recurrent kernel; one that calls
    it only later (float64: vmap fails) is still sent to the loop."""
    loss_fn, params, batch = CASES["lstm"]()
    use_rnn = [False]

    def switching(p: dict, b: dict) -> torch.Tensor:
        if use_rnn[0]:
            return loss_fn(p, b)
        return sum(v.square().sum() for v in p.values()) * b["x"].mean()

    ft.clipped_grad_sum(switching, params, batch, 1.0)
    assert not loop_calls
    assert switching in _routes._WATCHED  # the next call runs unwatched
    use_rnn[0] = True
    want, _ = naive(loss_fn, params, batch)
    got = ft.per_sample_grad_norms(switching, params, batch)
    torch.testing.assert_close(got.global_norm, _flat(want).norm(dim=1), **TOL)
    assert len(loop_calls) == N


def test_a_frozen_recurrent_encoder_passed_as_buffers(loop_calls) -> None:
    """The rules see no parameter in the LSTM; its vmapped forward then fails: the loop."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(IN, HID, batch_first=True).double(), nn.Linear(HID, 3).double()
    params = {k: v.detach() for k, v in head.named_parameters()}
    frozen = {k: v.detach() for k, v in lstm.named_parameters()}

    def loss_fn(p: dict, b: dict, buffers: dict) -> torch.Tensor:
        h, _ = torch.func.functional_call(lstm, buffers, (b["x"],))
        out = torch.func.functional_call(head, p, (h,))
        return F.cross_entropy(out.flatten(0, 1), b["y"].flatten())

    batch = _data()
    want, _ = naive(lambda p, b: loss_fn(p, b, frozen), params, batch)
    got = ft.per_sample_grads(loss_fn, params, batch, buffers=frozen)
    _assert_close(got, _stacked(want))
    assert len(loop_calls) == N


@pytest.mark.parametrize("method", ["vmap", "layers"])
def test_explicit_methods_still_refuse_and_name_the_loop(method) -> None:
    loss_fn, params, batch = CASES["gru"]()
    with pytest.raises((RuntimeError, ValueError), match="method='loop'"):
        ft.per_sample_grads(loss_fn, params, batch, method=method)
    with pytest.raises((RuntimeError, ValueError), match="method='loop'"):
        ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method=method)


def test_moments_take_no_layer_method() -> None:
    loss_fn, params, batch = _mlp()
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'vmap', 'loop'\)"):
        ft.per_sample_grad_moments(loss_fn, params, batch, method="layers")


# --- randomness ----------------------------------------------------------------------------


def _dropout_lstm() -> Problem:
    """Dropout between the two layers of an LSTM (drawn inside the fused kernel) and after."""
    torch.manual_seed(0)
    model = Tagger(nn.LSTM(IN, HID, num_layers=2, dropout=0.5, batch_first=True)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (b["x"],))
        return F.cross_entropy(F.dropout(out, 0.3).flatten(0, 1), b["y"].flatten())

    batch = _data()
    batch = {k: torch.cat([v[:1], v[:1], v[1:4]]) for k, v in batch.items()}  # 0 and 1 equal
    return loss_fn, params, batch


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_randomness_error_raises_and_leaves_the_generator_alone(method) -> None:
    loss_fn, params, batch = _dropout_lstm()
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="randomness='error'"):
        ft.per_sample_grads(loss_fn, params, batch, method=method)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(RuntimeError, match="randomness='error'"):
        ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method=method)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_randomness_different_draws_as_a_naive_loop_does(chunk_size) -> None:
    """Examples draw one after another from the global generator: a naive loop after the same
    seed gets the same numbers (whatever the chunks), and equal examples differ."""
    loss_fn, params, batch = _dropout_lstm()
    torch.manual_seed(7)
    want, _ = naive(loss_fn, params, batch)
    after_naive = torch.rand(3)
    torch.manual_seed(7)
    got = ft.per_sample_grads(
        loss_fn, params, batch, method="loop", randomness="different", chunk_size=chunk_size
    )
    _assert_close(got, _stacked(want))
    assert torch.equal(torch.rand(3), after_naive)  # the generator moved as far
    assert not torch.equal(got["rnn.weight_hh_l1"][0], got["rnn.weight_hh_l1"][1])
    torch.manual_seed(7)
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, randomness="different")
    torch.testing.assert_close(norms.global_norm, _flat(want).norm(dim=1), **TOL)


def test_randomness_same_shares_one_draw_per_chunk() -> None:
    """``"same"``: every example of a chunk draws what its first example drew (a naive loop
    that restores the seed before each example of the chunk); each chunk draws anew."""
    loss_fn, params, batch = _dropout_lstm()
    torch.manual_seed(3)
    got = ft.per_sample_grads(loss_fn, params, batch, randomness="same", chunk_size=3)
    want = []
    torch.manual_seed(3)
    for lo in (0, 3):
        start = torch.get_rng_state()
        part = {k: v[lo : lo + 3] for k, v in batch.items()}
        for i in range(part["x"].shape[0]):
            torch.set_rng_state(start)
            want += naive(loss_fn, params, {k: v[i : i + 1] for k, v in part.items()})[0]
    _assert_close(got, _stacked(want))
    w = got["rnn.weight_hh_l1"]
    assert torch.equal(w[0], w[1])  # equal examples, one draw
    torch.manual_seed(3)
    different = ft.per_sample_grads(loss_fn, params, batch, randomness="different", chunk_size=3)
    assert not torch.equal(different["rnn.weight_hh_l1"][1], w[1])  # example 1 drew anew


def test_randomness_same_is_vmaps_draw_on_a_model_vmap_batches() -> None:
    """Dropout in a linear model: under ``"same"`` the loop and vmap share one mask per chunk
    (the same numbers) and leave the generator in the same state."""
    torch.manual_seed(0)
    w = torch.randn(3, IN, dtype=F64)

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        return F.dropout(b["x"] @ p["w"].T, 0.5).square().mean()

    batch = {k: v[:1].repeat_interleave(N, 0) for k, v in _data().items()}  # N equal examples
    outs, after = {}, {}
    for method in ("vmap", "loop"):
        torch.manual_seed(11)
        outs[method] = ft.per_sample_grads(
            loss_fn, {"w": w}, batch, method=method, randomness="same", chunk_size=2
        )
        after[method] = torch.rand(4)
    _assert_close(outs["loop"], outs["vmap"])
    assert torch.equal(after["loop"], after["vmap"])
    g = outs["loop"]["w"]
    assert torch.equal(g[0], g[1]) and not torch.equal(g[0], g[2])  # one draw per chunk


# --- the rest of the interface ---------------------------------------------------------------


def test_aux_buffers_and_parameters_that_require_grad() -> None:
    """``has_aux`` per example; results hold no graph, params and their ``.grad`` untouched,
    also under ``torch.no_grad``."""
    loss_fn, params, batch = CASES["lstm"]()
    as_parameters = {k: nn.Parameter(v.clone()) for k, v in params.items()}

    def with_aux(p: dict, b: dict) -> tuple[torch.Tensor, dict]:
        loss = loss_fn(p, b)
        return loss, {"double": 2 * loss, "tag": "lstm"}

    with torch.no_grad():
        grads, aux = ft.per_sample_grads(
            with_aux, as_parameters, batch, has_aux=True, method="loop"
        )
    want, losses = naive(loss_fn, params, batch)
    _assert_close(grads, _stacked(want))
    torch.testing.assert_close(aux["double"], 2 * losses, **TOL)
    assert aux["tag"] == "lstm"
    assert not aux["double"].requires_grad
    assert not any(g.requires_grad for g in grads.values())
    assert all(p.grad is None for p in as_parameters.values())


def test_empty_batch() -> None:
    loss_fn, params, batch = CASES["lstm"]()
    empty = {k: v[:0] for k, v in batch.items()}
    grads = ft.per_sample_grads(loss_fn, params, empty, method="loop")
    assert {k: tuple(v.shape) for k, v in grads.items()} == {
        k: (0, *v.shape) for k, v in params.items()
    }
    out = ft.clipped_grad_sum(loss_fn, params, empty, 1.0, method="loop")
    assert out.count == 0 and int(out.num_clipped) == 0
    ft.testing.assert_trees_all_equal(out.grad_sum, ft.tree.zeros_like(params))
    assert ft.per_sample_grad_norms(loss_fn, params, empty, method="loop").global_norm.shape == (0,)
    with pytest.raises(ValueError, match="empty batch with has_aux=True"):
        ft.per_sample_grads(
            lambda p, b: (loss_fn(p, b), b["x"]), params, empty, has_aux=True, method="loop"
        )


def test_per_sample_chunks_of_the_loop() -> None:
    loss_fn, params, batch = CASES["gru"]()
    want, losses = naive(loss_fn, params, batch)
    chunks = list(ft.per_sample_chunks(loss_fn, params, batch, chunk_size=2, method="loop"))
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 4), (4, 5)]
    for c in chunks:
        _assert_close(c.grads, _stacked(want[c.start : c.stop]))
        torch.testing.assert_close(c.losses, losses[c.start : c.stop], **TOL)


# --- DP-SGD ----------------------------------------------------------------------------------


def test_dp_sgd_step_on_an_lstm_equals_clipping_by_hand() -> None:
    """``make_train_step(per_example_clip=C)`` with the noise off: ``θ - lr Σ clip(gᵢ, C) / B``
    from the naive per-example gradients, over micro-batches that split the batch unevenly."""
    loss_fn, params, _ = CASES["lstm-bidirectional"]()
    clip, lr, expected = 0.3, 0.5, 6.0
    tx = ft.chain(ft.dp_noisy_mean(clip, 0.0, expected_batch_size=expected, seed=0), ft.sgd(lr))
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, per_example_clip=clip)
    state = ft.TrainState.create(params=params, tx=tx)
    reference = dict(params)
    for seed, n in enumerate([5, 7, 1]):
        batch = _data(seed=seed + 10, n=n)
        want, losses = naive(loss_fn, reference, batch)
        norms = _flat(want).norm(dim=1)
        factors = (clip / norms).clamp(max=1.0)
        reference = {
            k: v - lr * sum(f * g[k] for f, g in zip(factors, want)) / expected
            for k, v in reference.items()
        }
        state, metrics = step(state, batch)
        ft.testing.assert_trees_all_close(state.params, reference, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(metrics["loss"], losses.mean(), **TOL)
        assert float(metrics["clipped_fraction"]) == pytest.approx(float((norms > clip).sum()) / n)
