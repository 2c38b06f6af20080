"""The streaming reductions under an outer ``torch.func.vmap`` (an ensemble of models, one
set of parameters per member): each member's result equals the reduction run on its own."""

from __future__ import annotations

import pytest
import torch

import functrain as ft

MEMBERS, N, D = 3, 6, 4


def _loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()


def _data() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ws = torch.randn(MEMBERS, D, generator=gen, dtype=torch.float64)
    batch = {
        "x": torch.randn(N, D, generator=gen, dtype=torch.float64),
        "y": torch.randn(N, generator=gen, dtype=torch.float64),
    }
    return ws, batch


def _per_member(fn):
    ws, _ = _data()
    return torch.func.vmap(fn)(ws), torch.stack([fn(w) for w in ws])


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 4])
@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_clipped_grad_sum_over_an_ensemble(chunk_size, method):
    _, batch = _data()

    def fn(w):
        out = ft.clipped_grad_sum(_loss, {"w": w}, batch, 1.0, chunk_size=chunk_size, method=method)
        return out.grad_sum["w"]

    got, want = _per_member(fn)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 4])
@pytest.mark.parametrize("cosine", [False, True])
def test_per_sample_gram_over_an_ensemble(chunk_size, cosine):
    _, batch = _data()

    def fn(w):
        return ft.per_sample_gram(_loss, {"w": w}, batch, chunk_size=chunk_size, cosine=cosine)

    got, want = _per_member(fn)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # And each member's matrix is the Gram matrix of its per-sample gradients.
    ws, _ = _data()
    for w, g in zip(ws, got):
        rows = ft.per_sample_grads(_loss, {"w": w}, batch)["w"]
        ref = rows @ rows.T
        if cosine:
            norms = ref.diagonal().sqrt()
            ref = ref / norms[:, None] / norms[None, :]
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
