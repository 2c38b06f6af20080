"""Shared by the torch.optim interop tests: batches, and N steps of a run in torch or functrain."""

from __future__ import annotations

from typing import Any

import torch

import functrain as ft


def make_batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` float64 regression batches of 5 examples (4 inputs, 2 targets)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(5, 4, generator=gen, dtype=torch.float64),
            torch.randn(5, 2, generator=gen, dtype=torch.float64),
        )
        for _ in range(n)
    ]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y.to(out.dtype)) ** 2).mean()


def torch_steps(
    batches: list, net: Any, opt: Any, start: int, stop: int, sched: Any = None, clip: Any = None
) -> None:
    """Steps ``start..stop`` of the classic loop (``clip``: ``clip_grad_norm_``'s max norm)."""
    for x, y in batches[start:stop]:
        opt.zero_grad()
        mse(net(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()


def ft_steps(batches: list, model: Any, tx: Any, params: Any, state: Any, start: int, stop: int):
    """The same steps with ``tx.update`` + ``ft.apply_updates``; returns ``(params, state)``."""
    grad = torch.func.grad(lambda p, x, y: mse(model(p, x), y))
    for x, y in batches[start:stop]:
        updates, state = tx.update(grad(params, x, y), state, params)
        params = ft.apply_updates(params, updates)
    return params, state


def functional(net: torch.nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    """``ft.functionalize(net)``'s apply function and a detached copy of its params."""
    model, params, _ = ft.functionalize(net)
    return model, {k: v.detach().clone() for k, v in params.items()}
