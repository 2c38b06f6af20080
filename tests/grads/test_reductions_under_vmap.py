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


def _linear_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    # A linear call: the layer rules cover it, so "auto" would take them outside a transform.
    return ((torch.nn.functional.linear(b["x"], p["w"]).squeeze(-1) - b["y"]) ** 2).mean()


def _linear_members() -> torch.Tensor:
    ws, _ = _data()
    return ws[:, None, :]  # (members, 1, D): one output unit each


REDUCTIONS = {
    "per_sample_grads": lambda w, b, **kw: ft.per_sample_grads(_linear_loss, {"w": w}, b, **kw)[
        "w"
    ],
    "per_sample_grad_norms": lambda w, b, **kw: (
        ft.per_sample_grad_norms(_linear_loss, {"w": w}, b, chunk_size=2, **kw).global_norm
    ),
    "clipped_grad_sum": lambda w, b, **kw: ft.clipped_grad_sum(
        _linear_loss, {"w": w}, b, 0.5, chunk_size=2, **kw
    ).grad_sum["w"],
    "per_sample_gram": lambda w, b, **kw: ft.per_sample_gram(
        _linear_loss, {"w": w}, b, chunk_size=2, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_auto_takes_vmap_under_an_outer_vmap(name):
    _, batch = _data()
    fn = REDUCTIONS[name]
    ws = _linear_members()
    got = torch.func.vmap(lambda w: fn(w, batch, method="auto"))(ws)
    want = torch.stack([fn(w, batch, method="auto") for w in ws])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@pytest.mark.parametrize("method", ["layers", "loop"])
def test_eager_routes_under_an_outer_vmap_are_refused_by_name(name, method):
    _, batch = _data()
    fn = REDUCTIONS[name]
    with pytest.raises(ValueError, match=rf"method='{method}' cannot run under a torch.func"):
        torch.func.vmap(lambda w: fn(w, batch, method=method))(_linear_members())


def _naive_statistic(name: str, w: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The statistic from per-example autograd gradients kept differentiable (create_graph)."""
    rows = []
    for i in range(N):
        example = {k: v[i : i + 1] for k, v in batch.items()}
        (g,) = torch.autograd.grad(_linear_loss({"w": w}, example), w, create_graph=True)
        rows.append(g)
    g = torch.stack(rows)
    flat = g.reshape(N, -1)
    norms = flat.norm(dim=1)
    return {
        "per_sample_grads": g,
        "per_sample_grad_norms": norms,
        "clipped_grad_sum": (g * torch.clamp(0.5 / norms, max=1.0)[:, None, None]).sum(0),
        "per_sample_gram": flat @ flat.T,
    }[name]


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_differentiating_through_a_reduction_with_torch_func_grad(name):
    """A penalty on per-sample gradients (``torch.func.grad`` through the call) gets the
    derivative of the statistic, not the zero of detached values."""
    _, batch = _data()
    w = _linear_members()[0]
    fn = REDUCTIONS[name]

    got = torch.func.grad(lambda w: (fn(w, batch, method="auto") ** 2).sum())(w)
    w_ = w.clone().requires_grad_()
    (want,) = torch.autograd.grad((_naive_statistic(name, w_, batch) ** 2).sum(), w_)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_results_stay_detached_from_autograd():
    """Outside torch.func, parameters that require grad give results without a graph."""
    _, batch = _data()
    w = _linear_members()[0].clone().requires_grad_()
    for name, fn in REDUCTIONS.items():
        assert not fn(w, batch, method="auto").requires_grad, name
