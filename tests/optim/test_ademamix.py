"""AdEMAMix against the paper's rule written per element in float64, with schedules, masks,
bfloat16, compile, inject_hyperparams, a train step and bad arguments."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import functrain as ft
from functrain import testing

F64 = torch.float64


def _grads(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(5, generator=gen, dtype=F64) for _ in range(n)]
    out[2] = torch.zeros(5, dtype=F64)
    out[3] = -out[1]
    return out


def _f64(c: object) -> object:
    """The count in float64 (an int32 tensor times a float would be float32)."""
    return c.double() if isinstance(c, torch.Tensor) else c


def _reference(grads, b1, b2, b3, alpha, eps, eps_root, lr, wd, p0):
    n = len(p0)
    m1, m2, nu, p, out = [0.0] * n, [0.0] * n, [0.0] * n, list(p0), []
    for t, g in enumerate(grads, start=1):
        c_b3, c_alpha = (
            (b3(t - 1) if callable(b3) else b3),
            (alpha(t - 1) if callable(alpha) else alpha),
        )
        u = []
        for i, gi in enumerate(g.tolist()):
            m1[i] = b1 * m1[i] + (1 - b1) * gi
            m2[i] = c_b3 * m2[i] + (1 - c_b3) * gi
            nu[i] = b2 * nu[i] + (1 - b2) * gi * gi
            m1h, nuh = m1[i] / (1 - b1**t), nu[i] / (1 - b2**t)
            d = (m1h + c_alpha * m2[i]) / (math.sqrt(nuh + eps_root) + eps)
            u.append(-lr * (d + wd * p[i]))
        p = [a + b for a, b in zip(p, u)]
        out.append(p)
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"b1": 0.5, "b2": 0.9, "b3": 0.99, "alpha": 2.0, "eps": 1e-3, "eps_root": 1e-4},
        {
            "b3": lambda c: 0.9 + 0.01 * _f64(c),
            "alpha": lambda c: 0.5 * _f64(c),
            "weight_decay": 0.1,
        },
    ],
)
def test_matches_paper_rule(kw: dict) -> None:
    grads, p0 = _grads(12), torch.linspace(-1, 1, 5, dtype=F64)
    full = {"b1": 0.9, "b2": 0.999, "b3": 0.9999, "alpha": 5.0, "eps": 1e-8, "eps_root": 0.0}
    full.update({k: v for k, v in kw.items() if k != "weight_decay"})
    tx = ft.ademamix(0.01, **kw)
    params = [p0]
    state = tx.init(params)
    want = _reference(
        grads,
        full["b1"],
        full["b2"],
        full["b3"],
        full["alpha"],
        full["eps"],
        full["eps_root"],
        0.01,
        kw.get("weight_decay", 0.0),
        p0.tolist(),
    )
    for g, w in zip(grads, want):
        u, state = tx.update([g], state, params)
        params = ft.apply_updates(params, u)
        torch.testing.assert_close(params[0].tolist(), w, rtol=0, atol=1e-12)


def test_pure_masked_bfloat16() -> None:
    tx = ft.masked(ft.scale_by_ademamix(), {"a": True, "b": False})
    p = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(2)}
    g = {"a": torch.tensor([0.5, -2.0, 0.0], dtype=torch.bfloat16), "b": torch.ones(2)}
    state = tx.init(p)
    before = copy.deepcopy((g, state, p))
    u, new = tx.update(g, state, p)
    testing.assert_trees_all_equal((g, state, p), before, bitwise=True)
    assert u["a"].dtype == torch.bfloat16 and new.inner_state.m1["a"].dtype == torch.bfloat16
    # First step: (g + 6·1e-4·g) / (|g| + eps) in float32, rounded once.
    gf = g["a"].float()
    want = ((gf + 6.0 * (1e-4 * gf)) / (gf.abs() + 1e-8)).to(torch.bfloat16)
    assert torch.equal(u["a"], want)
    assert u["b"] is g["b"]


def test_compiled_with_schedule_compiles_once() -> None:
    tx = ft.ademamix(ft.linear_schedule(0.1, 0.01, 6), b3=ft.linear_schedule(0.9, 0.999, 6))
    params = {"w": torch.ones(3, 2)}
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    se = sc = tx.init(params)
    with testing.assert_max_compiles(1):
        for i in range(6):
            g = {"w": torch.full((3, 2), 0.1 * (i - 2))}
            ue, se = tx.update(g, se, params)
            uc, sc = compiled(g, sc, params)
            testing.assert_trees_all_close(uc, ue, rtol=1e-6, atol=1e-7)


def test_inject_hyperparams_and_train_step() -> None:
    tx = ft.inject_hyperparams(ft.ademamix)(learning_rate=0.05, b3=0.99)
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=F64)
    batch = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)}

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()

    params = {"w": torch.zeros(3, dtype=F64)}
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = step.prepare(ft.TrainState.create(params=params, tx=tx))
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]


def test_bad_arguments_and_empty_tree() -> None:
    with pytest.raises(ValueError, match="b1"):
        ft.scale_by_ademamix(b1=1.0)
    with pytest.raises(ValueError, match="b3"):
        ft.scale_by_ademamix(b3=1.5)
    with pytest.raises(ValueError, match="alpha"):
        ft.scale_by_ademamix(alpha=float("inf"))
    with pytest.raises(ValueError, match="eps"):
        ft.ademamix(0.1, eps=-1.0)
    with pytest.raises(ValueError, match="mu_dtype"):
        ft.scale_by_ademamix(mu_dtype=torch.int32)
    tx = ft.scale_by_ademamix()
    u, state = tx.update({}, tx.init({}))
    assert u == {} and int(state.count) == int(state.count_m2) == 1
