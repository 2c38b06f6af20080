"""Shared data of the per-element float64 references of the parameter-free optimizers' tests:
two leaves (so global sums are exercised), gradients with a zero leaf and a sign flip."""

from __future__ import annotations

from typing import Any

import torch

import functrain as ft

F64 = torch.float64


def grads(n: int, seed: int, zero_leaf: int) -> list[list[torch.Tensor]]:
    """``n`` gradients of the two leaves; step 2 zeroes leaf ``zero_leaf``, step 3 flips step 1."""
    gen = torch.Generator().manual_seed(seed)
    out = [
        [torch.randn(3, generator=gen, dtype=F64), torch.randn(2, generator=gen, dtype=F64)]
        for _ in range(n)
    ]
    out[2][zero_leaf] = torch.zeros_like(out[2][zero_leaf])
    out[3] = [-x for x in out[1]]
    return out


def flat(tree: list[torch.Tensor]) -> list[float]:
    return [v for x in tree for v in x.tolist()]


def p0() -> list[torch.Tensor]:
    return [torch.linspace(-1, 1, 3, dtype=F64), torch.tensor([0.5, -2.0], dtype=F64)]


def run(tx: ft.GradientTransformation, grads: Any, params: Any) -> list[list[float]]:
    """The flattened params after each update of ``tx``."""
    state, out = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params)
        params = ft.apply_updates(params, u)
        out.append(flat(params))
    return out


def lin(c: object) -> object:
    """A schedule written once for tensors and numbers: ``1 − 0.05·c``."""
    c = c.double() if isinstance(c, torch.Tensor) else c
    return 1.0 - 0.05 * c


def assert_train_step_halves_loss(tx: ft.GradientTransformation, init: float, steps: int) -> None:
    """``steps`` of ``make_train_step`` (K=2) on a least-squares problem from ``w = init``
    at least halve the loss."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=F64)
    batch = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)}

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()

    params = {"w": torch.full((3,), init, dtype=F64)}
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = step.prepare(ft.TrainState.create(params=params, tx=tx))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]


def assert_compiles_once_like_eager(
    tx: ft.GradientTransformation, rtol: float, atol: float
) -> None:
    """``torch.compile(tx.update, fullgraph=True)`` over six steps compiles once and follows
    the eager updates (to ``rtol``/``atol``: float32 maths reordered by the compiler)."""
    params = {"w": torch.linspace(-1, 1, 6).reshape(3, 2), "b": torch.ones(2)}
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    se = sc = tx.init(params)
    pe = pc = params
    with ft.testing.assert_max_compiles(1):
        for i in range(6):
            g = {"w": torch.full((3, 2), 0.1 * (i - 2)) + 0.01, "b": torch.ones(2) * (i % 2 - 0.5)}
            ue, se = tx.update(g, se, pe)
            uc, sc = compiled(g, sc, pc)
            ft.testing.assert_trees_all_close(uc, ue, rtol=rtol, atol=atol)
            pe, pc = ft.apply_updates(pe, ue), ft.apply_updates(pc, uc)
