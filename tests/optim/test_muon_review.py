"""Review of Muon composed with the rest of functrain (steps, wrappers, checkpoints, errors).

References are the pure optax path (``tx.update`` + ``apply_updates`` on the full-batch
gradient, float64) and Muon's rule written out by hand in float64.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain import testing

VOCAB, DIM, SEQ = 11, 8, 5


class _Block(nn.Module):
    """A one-head transformer block with an embedding, LayerNorms and an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.q, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(3))
        # No key bias: its gradient is exactly zero (softmax ignores it), and AdamW would
        # turn that zero's rounding noise into an O(lr) update that no tolerance can follow.
        self.k = nn.Linear(DIM, DIM, bias=False)
        self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        h = self.embed(tok)
        x = self.ln1(h)
        att = torch.softmax(self.q(x) @ self.k(x).mT / math.sqrt(DIM), dim=-1)
        h = h + self.o(att @ self.v(x))
        h = h + self.down(F.gelu(self.up(self.ln2(h))))
        return self.head(h)


def _setup() -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model, params, _ = ft.functionalize(_Block().double(), copy=True)

    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        logits = model.apply(p, {}, batch["tok"])[0]
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch["y"].reshape(-1))

    gen = torch.Generator().manual_seed(1)
    batch = {
        "tok": torch.randint(0, VOCAB, (6, SEQ), generator=gen),
        "y": torch.randint(0, VOCAB, (6, SEQ), generator=gen),
    }
    return loss_fn, params, batch


def _pure(loss_fn: Any, tx: Any, params: Any, batches: list[Any]) -> Any:
    """The reference: the full-batch gradient through ``tx.update`` and ``apply_updates``."""
    params = {k: v.clone() for k, v in params.items()}
    state = tx.init(params)
    for b in batches:
        grads = torch.func.grad(loss_fn)(params, b)
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
    return params, state


def _run(step: Any, tx: Any, params: Any, batches: list[Any]) -> ft.TrainState:
    state = step.prepare(ft.TrainState.create(params=params, tx=tx))
    for b in batches:
        state, _ = step(state, b)
    return state


STEP_OPTIONS = [
    {"strategy": "loop", "grad_backend": "autograd", "micro_batches": 1},
    {"strategy": "loop", "grad_backend": "func", "micro_batches": 3},
    {"strategy": "loop", "grad_backend": "autograd", "micro_batches": 3, "fused": False},
    {"strategy": "vmap", "micro_batches": 1},
    {"strategy": "vmap", "micro_batches": 3, "fused": False},
]


@pytest.mark.parametrize("options", STEP_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_train_step_matches_pure_update(options: dict[str, Any]) -> None:
    loss_fn, params, batch = _setup()
    tx = ft.muon(0.05, weight_decay=0.01, adam_weight_decay=0.01)
    want, _ = _pure(loss_fn, tx, params, [batch] * 3)
    got = _run(ft.make_train_step(loss_fn, tx, **options), tx, params, [batch] * 3)
    testing.assert_trees_all_close(got.params, want, rtol=1e-10, atol=1e-12)


def test_compiled_step_compiles_once_with_schedule() -> None:
    loss_fn, params, batch = _setup()
    tx = ft.muon(ft.warmup_cosine_decay_schedule(0.0, 0.05, 5, 20))
    want, _ = _pure(loss_fn, tx, params, [batch] * 20)
    step = ft.make_train_step(loss_fn, tx, compile={"backend": "aot_eager"})
    torch._dynamo.reset()
    with testing.count_compiles() as count:
        got = _run(step, tx, params, [batch] * 20)
    assert count.compiles == 1, count.reasons
    testing.assert_trees_all_close(got.params, want, rtol=1e-9, atol=1e-11)


def test_nonfinite_batch_is_skipped() -> None:
    loss_fn, params, batch = _setup()
    tx = ft.muon(0.05)
    step = ft.make_train_step(loss_fn, tx)
    state, _ = step(step.prepare(ft.TrainState.create(params=params, tx=tx)), batch)
    before = copy.deepcopy((state.params, state.opt_state))
    bad = {**batch}
    step_nan = ft.make_train_step(lambda p, b: loss_fn(p, b) * b["s"].mean(), tx)
    bad["s"] = torch.tensor(float("nan"), dtype=torch.float64).expand(6)
    after, _ = step_nan(state, bad)
    testing.assert_trees_all_equal((after.params, after.opt_state), before, bitwise=True)


def test_inject_hyperparams_lr_change_mid_run() -> None:
    loss_fn, params, batch = _setup()
    tx = ft.inject_hyperparams(ft.muon)(learning_rate=0.05)
    p, state = dict(params), tx.init(params)
    ref, ref_state = dict(params), None
    for i in range(4):
        lr = 0.05 if i < 2 else 0.01
        state.hyperparams["learning_rate"] = torch.tensor(lr, dtype=torch.float64)
        g = torch.func.grad(loss_fn)(p, batch)
        u, state = tx.update(g, state, p)
        p = ft.apply_updates(p, u)
        plain = ft.muon(lr)
        ref_state = plain.init(ref) if ref_state is None else ref_state
        ru, ref_state = plain.update(torch.func.grad(loss_fn)(ref, batch), ref_state, ref)
        ref = ft.apply_updates(ref, ru)
    testing.assert_trees_all_close(p, ref, rtol=1e-12, atol=1e-14)


def test_multisteps_averages_then_updates() -> None:
    loss_fn, params, batch = _setup()
    half = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    tx = ft.MultiSteps(ft.muon(0.05), every_k_schedule=2)
    p, state = dict(params), tx.init(params)
    for b in half * 2:
        u, state = tx.update(torch.func.grad(loss_fn)(p, b), state, p)
        p = ft.apply_updates(p, u)
    want, _ = _pure(loss_fn, ft.muon(0.05), params, [batch] * 2)
    testing.assert_trees_all_close(p, want, rtol=1e-10, atol=1e-12)


def test_clip_then_muon_matches_hand_clip() -> None:
    loss_fn, params, batch = _setup()
    g = torch.func.grad(loss_fn)(params, batch)
    g = {k: 10.0 * v for k, v in g.items()}
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.muon(0.05))
    got, _ = tx.update(g, tx.init(params), params)
    plain = ft.muon(0.05)
    want, _ = plain.update({k: v / norm for k, v in g.items()}, plain.init(params), params)
    testing.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)


def _hand_muon(g: torch.Tensor, beta: float = 0.95) -> torch.Tensor:
    """One first step of scale_by_muon in float64 (nesterov, count 1), by hand."""
    mu = (1 - beta) * g
    m = beta * mu / (1 - beta**2) + (1 - beta) * g / (1 - beta)
    x = m / (torch.linalg.matrix_norm(m) + 1e-8)
    t = x.shape[0] > x.shape[1]
    x = x.T if t else x
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if t else x


@pytest.mark.parametrize("wrap", ["masked", "partition"])
def test_masked_and_partition_around_scale_by_muon(wrap: str) -> None:
    gen = torch.Generator().manual_seed(3)
    g = {
        "w": torch.randn(4, 6, generator=gen, dtype=torch.float64),
        "b": torch.randn(4, generator=gen, dtype=torch.float64),
    }
    if wrap == "masked":
        tx = ft.masked(ft.scale_by_muon(), lambda p: ft.tree.map(lambda x: x.dim() == 2, p))
    else:
        tx = ft.partition({"m": ft.scale_by_muon(), "s": ft.scale(2.0)}, {"w": "m", "b": "s"})
    got, _ = tx.update(g, tx.init(g), g)
    testing.assert_trees_all_close(got["w"], _hand_muon(g["w"]), rtol=1e-10, atol=1e-12)
    want_b = g["b"] if wrap == "masked" else 2.0 * g["b"]
    testing.assert_trees_all_close(got["b"], want_b, rtol=0, atol=0)


def test_checkpoint_round_trip_continues_bit_for_bit(tmp_path: Any) -> None:
    loss_fn, params, batch = _setup()
    tx = ft.muon(ft.warmup_cosine_decay_schedule(0.0, 0.05, 2, 6), weight_decay=0.01)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    whole = _run(step, tx, params, [batch] * 6)
    half = _run(step, tx, params, [batch] * 3)
    ft.checkpoint.save(tmp_path / "c.safetensors", half)
    target = step.prepare(ft.TrainState.create(params=params, tx=tx))
    state = ft.checkpoint.restore(tmp_path / "c.safetensors", target)
    for _ in range(3):
        state, _ = step(state, batch)
    testing.assert_trees_all_equal(
        (state.params, state.opt_state), (whole.params, whole.opt_state), bitwise=True
    )


def test_vector_to_scale_by_muon_is_a_clear_error() -> None:
    tx = ft.scale_by_muon()
    v = {"b": torch.ones(3)}
    with pytest.raises(ValueError, match="rank >= 2"):
        tx.update(v, tx.init(v))


def test_dimension_numbers_missing_a_leaf_names_it() -> None:
    g = {"a": torch.ones(2, 3), "c": torch.ones(3, 2)}
    tx = ft.scale_by_muon(weight_dimension_numbers={"a": ft.MuonDimensionNumbers()})
    with pytest.raises(TypeError, match=r"\['c'\]"):
        tx.update(g, tx.init(g))


def test_conv_weight_without_dimension_numbers_goes_to_adamw() -> None:
    # As in optax: the default labels are "muon" for 2-D leaves only (ndim == 2).
    params = {"conv": torch.ones(2, 3, 3, 3, dtype=torch.float64)}
    g = {"conv": torch.linspace(-1, 1, 54, dtype=torch.float64).reshape(2, 3, 3, 3)}
    tx = ft.muon(0.1)
    got, _ = tx.update(g, tx.init(params), params)
    adam = ft.adamw(0.1, eps=1e-8, weight_decay=0.0, nesterov=True)
    want, _ = adam.update(g, adam.init(params), params)
    testing.assert_trees_all_close(got, want, rtol=0, atol=0)
