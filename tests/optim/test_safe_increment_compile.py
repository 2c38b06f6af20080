"""``safe_increment``'s per-dtype limit cache and ``torch.compile``: a compiled step whose first
trace met an empty cache filled it, dynamo guarded on its contents, and the second call
recompiled. The suite hid this (earlier tests filled the cache); these tests empty it."""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain import testing
from functrain.optim import _utils


@pytest.fixture
def empty_limit_cache(monkeypatch):
    monkeypatch.setattr(_utils, "_LIMITS", {})


def test_a_compiled_step_compiles_once_from_an_empty_limit_cache(empty_limit_cache):
    tx = ft.adamw(ft.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10), weight_decay=0.1)
    step = ft.make_train_step(
        lambda p, b: ((b @ p["w"]) ** 2).mean(), tx, compile={"backend": "eager"}
    )
    state = ft.TrainState.create(params={"w": torch.ones(3)}, tx=tx)
    with testing.count_compiles() as count:
        for i in range(4):
            state, _ = step(state, torch.full((2, 3), float(i)))
    assert count.compiles == 1, count.reasons


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.uint8, torch.bool])
def test_limits_are_the_same_with_and_without_the_cache(empty_limit_cache, dtype):
    info = None if dtype == torch.bool else torch.iinfo(dtype)
    limit = _utils.INT32_MAX if info is None else min(_utils.INT32_MAX, info.max)
    if dtype == torch.bool:
        assert torch.equal(_utils.safe_increment(torch.tensor(False)), torch.tensor(True))
        return
    below = torch.tensor(limit - 1, dtype=dtype)
    at = torch.tensor(limit, dtype=dtype)
    assert _utils.safe_increment(below).item() == limit
    assert _utils.safe_increment(at).item() == limit  # saturates instead of wrapping
