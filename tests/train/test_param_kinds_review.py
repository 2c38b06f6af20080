"""Unusual parameter and gradient kinds in the train step, against torch.optim and by-hand maths.

Sparse gradients (``nn.Embedding(sparse=True)``) are refused with a path-named error before the
state changes; channels_last weights, non-contiguous and interleaved views of one storage,
0-numel and 0-d parameters train as the classic float64 ``torch.optim`` loop does; complex
parameters follow optax's Adam (``ν`` from ``|g|²``), not torch's per-component one.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft

CONFIGS = [
    {},
    {"micro_batches": 3},
    {"micro_batches": 3, "strategy": "vmap"},
    {"fused": False},
    {"nonfinite": "ignore"},
]


def _txs(kind: str) -> tuple[ft.GradientTransformation, Any]:
    """The functrain transform and a factory of the matching torch.optim optimizer."""
    if kind == "adam":
        return ft.adam(1e-2), lambda ps: torch.optim.Adam(ps, 1e-2, foreach=False)
    return ft.sgd(1e-2, momentum=0.9), lambda ps: torch.optim.SGD(
        ps, 1e-2, momentum=0.9, foreach=False
    )


def _sq_loss(out: torch.Tensor) -> torch.Tensor:
    return (out.abs() ** 2).sum(-1).mean()


def _batches(shape: tuple[int, ...], n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(shape, dtype=torch.float64, generator=g)} for _ in range(n)]


# torch's own vmap fallback warns for embedding_bag before the sparse gradient fails.
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("cfg", CONFIGS[:3])
@pytest.mark.parametrize("layer", ["embedding", "bag"])
def test_sparse_gradient_is_refused_with_the_path_before_the_state_changes(layer, cfg):
    torch.manual_seed(0)
    if layer == "embedding":
        first: nn.Module = nn.Embedding(10, 4, sparse=True, dtype=torch.float64)
        x = torch.randint(0, 10, (6,))
    else:
        first = nn.EmbeddingBag(10, 4, sparse=True, mode="sum", dtype=torch.float64)
        x = torch.randint(0, 10, (6, 3))
    model = nn.Sequential(first, nn.Linear(4, 2, dtype=torch.float64))
    fm, params, _ = ft.functionalize(model, copy=True)
    step = ft.make_train_step(lambda p, b: _sq_loss(fm(p, b["x"])), ft.adam(1e-2), **cfg)
    state = ft.TrainState.create(params=params, tx=ft.adam(1e-2))
    before = {k: v.clone() for k, v in state.params.items()}
    # vmap fails inside torch.func, where the parameter is not known: the cause is named.
    where = "" if cfg.get("strategy") == "vmap" else r"params\['0.weight'\].*"
    with pytest.raises(ValueError, match=where + "sparse=False"):
        step(state, {"x": x})
    assert int(state.step) == 0  # the state is still usable and unchanged
    for k, v in state.params.items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_channels_last_conv_matches_torch_optim(opt, cfg):
    torch.manual_seed(0)

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 5, 3), nn.Conv2d(5, 2, 3)).double()

    model, ref = (make().to(memory_format=torch.channels_last) for _ in range(2))
    tx, torch_opt = _txs(opt)
    fm, params, _ = ft.functionalize(model, copy=True)
    step = ft.make_train_step(lambda p, b: _sq_loss(fm(p, b["x"])), tx, **cfg)
    state = ft.TrainState.create(params=params, tx=tx)
    topt = torch_opt(list(ref.parameters()))
    for b in _batches((6, 3, 7, 7)):
        b = {"x": b["x"].to(memory_format=torch.channels_last)}
        state, _ = step(state, b)
        topt.zero_grad()
        _sq_loss(ref(b["x"])).backward()
        topt.step()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-12, atol=1e-14)


def _views() -> dict[str, torch.Tensor]:
    base = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return {
        "a": base[:, :3],  # interleaved with "b" in one storage
        "b": base[:, 3:],
        "t": t.t(),  # non-contiguous
        "z": torch.zeros(0, 4, dtype=torch.float64),  # 0-numel
        "s": torch.tensor(0.5, dtype=torch.float64),  # 0-d
    }


def _views_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    x = b["x"]
    out = (x @ p["a"]) * p["s"] + x @ p["b"] + (x @ p["t"]).sum(-1, keepdim=True) + p["z"].sum()
    return (out**2).mean()


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_interleaved_views_of_one_storage_train_in_place_as_torch_optim(opt, cfg):
    """Old code: the donating step refused ``w[:, :3]`` and ``w[:, 3:]`` as overlapping."""
    tx, torch_opt = _txs(opt)
    step = ft.make_train_step(_views_loss, tx, donate=True, **cfg)
    params = _views()
    state = ft.TrainState.create(params=params, tx=tx, copy=False)
    ref = {k: v.clone().requires_grad_() for k, v in _views().items()}
    topt = torch_opt(list(ref.values()))
    for b in _batches((6, 4)):
        state, _ = step(state, b)
        topt.zero_grad()
        _views_loss(ref, b).backward()
        topt.step()
    for k, v in ref.items():
        torch.testing.assert_close(state.params[k], v.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "cut", [(slice(None, 4), slice(3, None)), (slice(None), slice(None, None, 2))]
)
def test_views_sharing_elements_are_still_refused(cut):
    base = torch.randn(4, 6, dtype=torch.float64)
    params = {"a": base[:, cut[0]], "b": base[:, cut[1]]}
    step = ft.make_train_step(lambda p, b: (p["a"].sum() + p["b"].sum()) * b, ft.sgd(0.1))
    state = ft.TrainState.create(params=params, tx=ft.sgd(0.1), copy=False)
    with pytest.raises(ValueError, match=r"params\['a'\] and params\['b'\] overlap"):
        step(state, torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_complex_adam_follows_optax_abs_sq_moment(cfg):
    """optax's Adam keeps one ``ν`` from ``|g|²`` per complex entry; torch.optim views the
    tensor as real and keeps one per component, so torch is not the reference here."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 2, dtype=torch.complex128, generator=g)
    xs = [{"x": torch.randn(6, 3, dtype=torch.complex128, generator=g)} for _ in range(3)]

    def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return _sq_loss(b["x"] @ p["w"])

    step = ft.make_train_step(loss, ft.adam(1e-2), **cfg)
    state = ft.TrainState.create(params={"w": w0.clone()}, tx=ft.adam(1e-2))
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros(3, 2, dtype=torch.float64)
    for t, b in enumerate(xs, start=1):
        state, _ = step(state, b)
        wg = w.clone().requires_grad_()
        (gr,) = torch.autograd.grad(loss({"w": wg}, b), wg)
        m = 0.9 * m + 0.1 * gr
        v = 0.999 * v + 0.001 * gr.abs() ** 2
        w = w - 1e-2 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    torch.testing.assert_close(state.params["w"], w, rtol=1e-12, atol=1e-14)
