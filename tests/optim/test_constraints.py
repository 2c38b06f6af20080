"""keep_params_nonnegative, centralize and apply_every against their rules written by hand in
float64, with properties, masks, bfloat16, compile and bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

F64 = torch.float64
floats = st.floats(-10, 10, allow_nan=False, width=64)


@given(st.lists(st.tuples(st.floats(0, 10, width=64), floats), min_size=1, max_size=8))
@settings(deadline=None)
def test_nonnegative_rule_and_property(pairs: list[tuple[float, float]]) -> None:
    p = torch.tensor([a for a, _ in pairs], dtype=F64)
    u = torch.tensor([b for _, b in pairs], dtype=F64)
    tx = ft.keep_params_nonnegative()
    before = copy.deepcopy((u, p))
    out, _ = tx.update([u], tx.init([p]), [p])
    testing.assert_trees_all_equal((u, p), before, bitwise=True)
    want = [-a if a + b < 0 else b for a, b in pairs]
    assert out[0].tolist() == want
    assert bool((p + out[0] >= 0).all())


def test_nonnegative_masked_bfloat16_and_no_params() -> None:
    tx = ft.masked(ft.keep_params_nonnegative(), {"a": True, "b": False})
    p = {"a": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "b": torch.ones(2)}
    u = {"a": torch.tensor([-3.0, -1.0], dtype=torch.bfloat16), "b": torch.full((2,), -5.0)}
    out, _ = tx.update(u, tx.init(p), p)
    assert out["a"].dtype == torch.bfloat16
    assert out["a"].tolist() == [-1.0, -1.0] and out["b"].tolist() == [-5.0, -5.0]
    with pytest.raises(ValueError, match="needs params"):
        ft.keep_params_nonnegative().update([torch.ones(1)], ft.EmptyState())
    assert ft.NonNegativeParamsState is ft.EmptyState


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(0, 10**6))
@settings(deadline=None, max_examples=30)
def test_centralize_matches_hand_mean(a: int, b: int, c: int, seed: int) -> None:
    g = torch.randn(a, b, c, generator=torch.Generator().manual_seed(seed), dtype=F64)
    v = torch.randn(b, dtype=F64)
    tx = ft.centralize()
    out, _ = tx.update({"g": g, "v": v}, tx.init({"g": g, "v": v}))
    for i in range(a):
        mean = sum(g[i].flatten().tolist()) / (b * c)
        want = [x - mean for x in g[i].flatten().tolist()]
        torch.testing.assert_close(out["g"][i].flatten().tolist(), want, rtol=0, atol=1e-12)
    assert out["v"] is v  # vectors pass unchanged


def test_centralize_bfloat16_in_float32() -> None:
    g = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.bfloat16)
    out, _ = ft.centralize().update([g], ft.EmptyState())
    assert out[0].dtype == torch.bfloat16
    want = (g.float() - g.float().mean()).to(torch.bfloat16)
    assert torch.equal(out[0], want)


def _apply_every_reference(grads: list[list[float]], k: int) -> list[list[float]]:
    acc, out = None, []
    for t, g in enumerate(grads):
        acc = list(g) if t % k == 0 else [a + b for a, b in zip(acc, g)]
        out.append(list(acc) if t % k == k - 1 else [0.0] * len(g))
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_apply_every_matches_hand_sums(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    grads = [torch.randn(4, generator=gen, dtype=F64) for _ in range(10)]
    grads[2] = torch.zeros(4, dtype=F64)
    grads[3] = -grads[1]
    tx = ft.apply_every(k)
    state = tx.init([torch.zeros(4, dtype=F64)])
    for g, want in zip(grads, _apply_every_reference([g.tolist() for g in grads], k)):
        before = copy.deepcopy((g, state))
        u, new_state = tx.update([g], state)
        testing.assert_trees_all_equal((g, state), before, bitwise=True)
        state = new_state
        torch.testing.assert_close(u[0].tolist(), want, rtol=0, atol=1e-12)
    assert state.count.dtype == torch.int32


def test_apply_every_compiles_once_and_bad_k() -> None:
    tx = ft.apply_every(3)
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    se = sc = tx.init({"w": torch.zeros(2, 2, dtype=torch.bfloat16)})
    with testing.assert_max_compiles(1):
        for i in range(5):
            g = {"w": torch.full((2, 2), float(i), dtype=torch.bfloat16)}
            ue, se = tx.update(g, se)
            uc, sc = compiled(g, sc)
            testing.assert_trees_all_equal(uc, ue, bitwise=True)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ft.apply_every(0)
    with pytest.raises(TypeError, match="k must be an int"):
        ft.apply_every(2.5)


def test_train_step_smoke() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, dtype=F64)
    batch = {"x": x, "y": x.sum((1, 2))}

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        return ((torch.einsum("nij,ij->n", b["x"], p["w"]) - b["y"]) ** 2).mean()

    params = {"w": torch.rand(3, 4, dtype=F64)}
    tx = ft.chain(ft.centralize(), ft.sgd(0.05), ft.keep_params_nonnegative())
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = step.prepare(ft.TrainState.create(params=params, tx=tx))
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert bool((state.params["w"] >= 0).all())
