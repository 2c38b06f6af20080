"""Review of the train step's plumbing: ``value=loss`` to ``tx.update``, ``lr_scale``, the dense
gradient check, the interleaved-views overlap check and the saved-tensor-hooks restore."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain.train import compiled
from functrain.train._grad_helpers import _check_dense_grads
from functrain.train._loop_metrics import metric_tags
from functrain.train._step_checks import _share_bytes


def _loss_fn(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2).mean()


def _sum_loss_fn(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> ft.LossSum:
    r = (batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2
    return ft.LossSum(r.sum(), torch.tensor(float(r.numel()), dtype=torch.float64))


def _setup() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    batch = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    params = {
        "w": torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64),
        "b": torch.tensor(0.4, dtype=torch.float64),
    }
    return params, batch


def _bare() -> ft.GradientTransformation:
    """A user transform written before ``**extra``: passing it ``value=`` is a TypeError."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return ft.tree.map(lambda g: -0.1 * g, updates), state

    return ft.GradientTransformation(lambda params: (), update)


WRAPPED = {
    "chain": lambda: ft.chain(_bare(), ft.scale(1.0)),
    "masked": lambda: ft.masked(_bare(), {"w": True, "b": False}),
    "partition": lambda: ft.partition({"a": _bare(), "o": ft.sgd(0.1)}, {"w": "a", "b": "o"}),
    "inject": lambda: ft.inject_hyperparams(lambda learning_rate: _bare())(learning_rate=0.1),
    "multisteps": lambda: ft.MultiSteps(_bare(), every_k_schedule=1),
    "apply_if_finite": lambda: ft.apply_if_finite(_bare(), 3),
}
CONFIGS = [
    {},
    {"nonfinite": "ignore", "fused": False},
    {"micro_batches": 3, "strategy": "vmap"},
    {"loss_scale": ft.DynamicLossScale(init_scale=2.0**8), "donate": False},
]


@pytest.mark.parametrize("name", sorted(WRAPPED))
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_bare_transform_in_wrappers_gets_no_value(name: str, config: int) -> None:
    """Every wrapper hands ``value=`` on only to an inner ``update`` that takes ``**extra``;
    the first step is plain SGD with rate 0.1 on ``w`` (float64 gradient by hand)."""
    params, batch = _setup()
    tx = WRAPPED[name]()
    step = ft.make_train_step(_loss_fn, tx, **CONFIGS[config])
    state, _ = step(ft.TrainState.create(params=params, tx=tx), batch)
    x, y = batch["x"], batch["y"]
    r = x @ params["w"] + params["b"] - y
    grad_w = 2 * x.T @ r / len(y)
    torch.testing.assert_close(state.params["w"], params["w"] - 0.1 * grad_w, rtol=1e-12, atol=0)


def _recorder(seen: list[torch.Tensor]) -> ft.GradientTransformation:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        seen.append(extra["value"])
        return ft.tree.map(lambda g: -0.01 * g, updates), state

    return ft.GradientTransformation(lambda params: (), update)


@pytest.mark.parametrize("loss_fn", [_loss_fn, _sum_loss_fn])
@pytest.mark.parametrize(
    "kw",
    [
        {"micro_batches": 3},
        {"micro_batches": 3, "strategy": "vmap"},
        {"micro_batches": 2, "loss_scale": ft.DynamicLossScale(init_scale=2.0**10)},
    ],
)
def test_value_is_the_unscaled_full_batch_mean(loss_fn: Any, kw: dict[str, Any]) -> None:
    params, batch = _setup()
    seen: list[torch.Tensor] = []
    tx = ft.chain(_recorder(seen))
    step = ft.make_train_step(loss_fn, tx, **kw)
    step(ft.TrainState.create(params=params, tx=tx), batch)
    x, y = batch["x"], batch["y"]
    expected = float(((x @ params["w"] + params["b"] - y) ** 2).sum()) / len(y)
    assert len(seen) == 1
    assert float(seen[0]) == pytest.approx(expected, rel=1e-13)


def _flat_loss(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return 0.0 * _loss_fn(params, batch) + 1.0  # never improves: a reduction every step


PLATEAU = {
    "partition": lambda: ft.partition(
        {
            "a": ft.chain(ft.sgd(0.1), ft.reduce_on_plateau(factor=0.5, patience=1)),
            "o": ft.sgd(0.1),
        },
        {"w": "a", "b": "o"},
    ),
    "multisteps": lambda: ft.MultiSteps(
        ft.chain(ft.sgd(0.1), ft.reduce_on_plateau(factor=0.5, patience=1)), every_k_schedule=1
    ),
    "masked": lambda: ft.masked(
        ft.chain(ft.sgd(0.1), ft.reduce_on_plateau(factor=0.5, patience=1)),
        {"w": True, "b": False},
    ),
}


@pytest.mark.parametrize("name", sorted(PLATEAU))
def test_lr_scale_nested_and_tagged(name: str) -> None:
    """Patience 1, factor 0.5, a constant loss: 1 (first value is an improvement), then halved
    every step; logged by train_loop as ``train/lr_scale``."""
    params, batch = _setup()
    tx = PLATEAU[name]()
    step = ft.make_train_step(_flat_loss, tx)
    state = ft.TrainState.create(params=params, tx=tx)
    scales = []
    for _ in range(4):
        state, metrics = step(state, batch)
        scales.append(float(metrics["lr_scale"]))
    assert scales == [1.0, 0.5, 0.25, 0.125]
    assert "train/lr_scale" in metric_tags(metrics)
    _, plain = ft.make_train_step(_loss_fn, ft.sgd(0.1))(
        ft.TrainState.create(params=params, tx=ft.sgd(0.1)), batch
    )
    assert "lr_scale" not in plain


def test_dense_check_accepts_unusual_dense_grads() -> None:
    _check_dense_grads(
        {
            "t": torch.randn(4, 5).t(),  # non-contiguous
            "s": torch.randn(8)[::2],
            "c": torch.randn(3, dtype=torch.complex64),
            "m": torch.empty(3, device="meta"),
            "unused": None,
        }
    )
    with pytest.raises(ValueError, match=r"params\['e'\]"):
        _check_dense_grads({"e": torch.eye(3).to_sparse()})


_DTYPES = [torch.float64, torch.float32, torch.float16, torch.uint8]


def _view(data: st.DataObject) -> tuple[torch.dtype, list[int], list[int], int]:
    dtype = data.draw(st.sampled_from(_DTYPES))
    ndim = data.draw(st.integers(1, 3))
    shape = data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    stride = data.draw(st.lists(st.integers(0, 7), min_size=ndim, max_size=ndim))
    return dtype, shape, stride, data.draw(st.integers(0, 12))


def _bytes(dtype: torch.dtype, shape: list[int], stride: list[int], off: int) -> set[int]:
    size = torch.empty((), dtype=dtype).element_size()
    out: set[int] = set()
    for idx in itertools.product(*(range(n) for n in shape)):
        e = off + sum(i * s for i, s in zip(idx, stride))
        out.update(range(e * size, (e + 1) * size))
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_share_bytes_matches_brute_force(data: st.DataObject) -> None:
    storage = torch.zeros(1024, dtype=torch.uint8)
    geo_a, geo_b = _view(data), _view(data)
    a, b = (storage.view(g[0]).as_strided(g[1], g[2], g[3]) for g in (geo_a, geo_b))
    expected = bool(_bytes(*geo_a) & _bytes(*geo_b))
    assert _share_bytes(a, b) is expected
    assert _share_bytes(a, b) is expected  # the cached answer agrees


def test_hooks_restore_keeps_user_disabled_hooks() -> None:
    """A compiled step that fails must not re-enable saved-tensor hooks the user disabled."""
    c = torch._C._autograd
    c._saved_tensors_hooks_disable("disabled by the test")
    try:
        compiled._restore_hooks(compiled._hooks_enabled())
        assert not c._saved_tensors_hooks_is_enabled()
    finally:
        c._saved_tensors_hooks_enable()
