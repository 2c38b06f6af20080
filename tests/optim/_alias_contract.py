"""Checks every optimizer alias must pass (the Rprop, NovoGrad, Polyak, SM3 and optimistic tests use them): purity, low precision,
masks, compilation and a train-step smoke run, run on any transform factory."""

from __future__ import annotations

from typing import Any

import torch

import functrain as ft


def tree_data(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g).to(dtype),
        "b": torch.randn(3, generator=g).to(dtype),
        "k": torch.randn(2, 3, 2, generator=g).to(dtype),
    }


def run(tx: Any, grads: list[Any], params: Any, **kw: Any) -> tuple[list[Any], Any]:
    state, outs = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params, **kw)
        outs.append(u)
        params = ft.apply_updates(params, u)
    return outs, state


def check_pure(tx: Any, **kw: Any) -> None:
    params, grads = tree_data(), [tree_data(seed=s) for s in (1, 2, 3)]
    state = tx.init(params)
    for g in grads:
        keep = [ft.tree.map(torch.clone, x) for x in (g, state, params)]
        _, new_state = tx.update(g, state, params, **kw)
        for before, now in zip(keep, (g, state, params)):
            for a, b in zip(ft.tree.leaves(before), ft.tree.leaves(now)):
                assert torch.equal(a, b)
        state = new_state


def check_bfloat16(tx: Any, **kw: Any) -> None:
    """bfloat16 leaves keep their dtype and follow the float32 run to bfloat16 precision."""
    p16 = tree_data(torch.bfloat16)
    p32 = ft.tree.map(lambda x: x.float(), p16)
    grads = [tree_data(torch.bfloat16, seed=s) for s in (1, 2, 3)]
    u16, _ = run(tx, grads, p16, **kw)
    u32, _ = run(tx, [ft.tree.map(lambda x: x.float(), g) for g in grads], p32, **kw)
    for a, b in zip(ft.tree.leaves(u16[0]), ft.tree.leaves(u32[0])):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)


def check_masked(tx: Any, **kw: Any) -> None:
    """``masked`` passes masked-out leaves through and matches the transform on the rest."""
    mask = {"w": True, "b": False, "k": True}
    params, grads = tree_data(), [tree_data(seed=s) for s in (1, 2, 3)]
    um, _ = run(ft.masked(tx, mask), grads, params, **kw)
    sub = {k: v for k, v in params.items() if mask[k]}
    us, _ = run(tx, [{k: g[k] for k in sub} for g in grads], sub, **kw)
    for full, part, g in zip(um, us, grads):
        assert torch.equal(full["b"], g["b"])
        for k in sub:
            torch.testing.assert_close(full[k], part[k], rtol=1e-12, atol=1e-14)


def check_compiles(tx: Any, steps: int = 4, **kw: Any) -> None:
    """``torch.compile(fullgraph=True)`` of ``update`` matches eager and compiles once."""
    params = tree_data(torch.float32)
    update = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    s_c = s_e = tx.init(params)
    with ft.testing.assert_max_compiles(1):
        for i in range(steps):
            g = tree_data(torch.float32, seed=i + 1)
            u_c, s_c = update(g, s_c, params, **kw)
            u_e, s_e = tx.update(g, s_e, params, **kw)
            for a, b in zip(ft.tree.leaves(u_c), ft.tree.leaves(u_e)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def check_train_step(tx: Any) -> None:
    """A few steps of ``make_train_step`` (and K=2 micro-batches) reduce a least-squares loss."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    batch = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}

    def loss_fn(params: Any, batch: Any) -> torch.Tensor:
        return ((batch["x"] @ params["w"] - batch["y"]) ** 2).mean()

    for k in (1, 2):
        params = {"w": torch.zeros(3, dtype=torch.float64)}
        step = ft.make_train_step(loss_fn, tx, micro_batches=k)
        state = ft.TrainState.create(params=params, tx=tx)
        first = float(loss_fn(params, batch))
        for _ in range(5):
            state, _ = step(state, batch)
        assert float(loss_fn(state.params, batch)) < first
