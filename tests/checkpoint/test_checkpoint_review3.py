"""Third review of ``functrain.checkpoint``: metadata keys, huge metrics, optimizer states."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch

import functrain as ft
from functrain import checkpoint


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_bitwise(a: Any, b: Any) -> None:
    la, lb = ft.tree.leaves(a), ft.tree.leaves(b)
    assert ft.tree.structure(a) == ft.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride()
        # Bytes, not values: NaN payloads and -0.0 must survive too.
        assert torch.equal(_bytes(x), _bytes(y))


@pytest.mark.parametrize("metadata", [{1: "a"}, {1: "a", "1": "b"}, {"x": {True: 1}}])
def test_non_string_metadata_keys_are_refused(tmp_path: Any, metadata: dict) -> None:
    path = tmp_path / "s.safetensors"
    checkpoint.save(path, {"w": torch.ones(1)}, metadata={"keep": 1})
    # Old code saved them and read back {"1": ...} ({1: "a", "1": "b"} lost "a").
    with pytest.raises(TypeError, match="metadata keys must be strings"):
        checkpoint.save(path, {"w": torch.zeros(1)}, metadata=metadata)
    assert checkpoint.read_metadata(path) == {"keep": 1}  # the previous file is intact


def test_metadata_scalars_round_trip_exactly(tmp_path: Any) -> None:
    path = tmp_path / "ü dir" / "s.safetensors"
    metadata = {"nan": math.nan, "inf": -math.inf, "big": 10**40, "ключ": "é", "z": -0.0}
    checkpoint.save(path, {}, metadata=metadata)
    got = checkpoint.read_metadata(path)
    assert got.keys() == metadata.keys()
    assert math.isnan(got["nan"]) and got["inf"] == -math.inf and got["big"] == 10**40
    assert got["ключ"] == "é" and math.copysign(1.0, got["z"]) == -1.0


def test_huge_int_metric_does_not_crash_save_or_scan(tmp_path: Any) -> None:
    directory = tmp_path / "a b ü"
    mgr = checkpoint.CheckpointManager(directory, max_to_keep=1, best_metric="loss")
    mgr.save(1, {"w": torch.ones(1)}, metrics={"loss": 0.5})
    # Old code: OverflowError from math.isfinite(10**400).
    mgr.save(2, {"w": torch.ones(1)}, metrics={"loss": 10**400})
    again = checkpoint.CheckpointManager(directory, max_to_keep=1, best_metric="loss")
    assert again.all_steps() == mgr.all_steps() == [1, 2]
    assert again.best_step() == mgr.best_step() == 1  # an infinite loss is never best
    assert again.metrics(2)["loss"] == math.inf


def test_non_string_metric_names_are_refused(tmp_path: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match="metric names must be strings"):
        mgr.save(1, {"w": torch.ones(1)}, metrics={0: 0.5})
    assert mgr.all_steps() == []


def test_nan_best_metric_and_stale_temp_in_unicode_directory(tmp_path: Any) -> None:
    directory = tmp_path / "runs ü 1"
    mgr = checkpoint.CheckpointManager(directory, max_to_keep=1, best_metric="loss")
    mgr.save(1, {"w": torch.full((2,), 1.0)}, metrics={"loss": 0.3})
    mgr.save(2, {"w": torch.full((2,), 2.0)}, metrics={"loss": math.nan})
    mgr.save(3, {"w": torch.full((2,), 3.0)}, metrics={"loss": 0.4})
    assert mgr.all_steps() == [1, 3] and mgr.best_step() == 1
    stale = os.path.join(directory, ".checkpoint_00000004.safetensors.999999999.ab.tmp")
    with open(stale, "wb") as f:
        f.write(b"\0" * 16)
    again = checkpoint.CheckpointManager(directory, max_to_keep=1, best_metric="loss")
    assert not os.path.exists(stale) and again.latest_step() == 3
    _assert_bitwise(again.restore_latest({"w": torch.zeros(2)}), {"w": torch.full((2,), 3.0)})


def _states() -> dict[str, Any]:
    params = {"w": torch.randn(3, 2), "b": torch.randn(2), "s": torch.tensor(1.5)}
    labels = {"w": "a", "b": "b", "s": "b"}
    return {
        "params": params,
        "sgd": ft.sgd(0.1),
        "multisteps": ft.MultiSteps(ft.adam(1e-3), 3),
        "inject": ft.inject_hyperparams(ft.adam)(learning_rate=1e-3),
        "masked": ft.masked(ft.adam(1e-3), {"w": True, "b": False, "s": False}),
        "partition": ft.partition({"a": ft.adam(1e-3), "b": ft.sgd(0.1, momentum=0.9)}, labels),
    }


@pytest.mark.parametrize("name", ["sgd", "multisteps", "inject", "masked", "partition"])
def test_trained_optimizer_states_round_trip_bitwise(tmp_path: Any, name: str) -> None:
    torch.manual_seed(0)
    s = _states()
    params, tx = s["params"], s[name]

    def loss_fn(p: Any, batch: torch.Tensor) -> torch.Tensor:
        return (p["w"] * batch).sum() * p["b"].sum() + p["s"] ** 2

    step = ft.make_train_step(loss_fn, tx)
    state = ft.TrainState.create(params=params, tx=tx, seed=None)
    for _ in range(2):
        state, _ = step(state, torch.randn(4, 3, 2))
    path = tmp_path / "s.safetensors"
    checkpoint.save(path, state)
    restored = checkpoint.restore(path, ft.TrainState.create(params=params, tx=tx, seed=None))
    assert type(restored.opt_state) is type(state.opt_state)
    assert restored.key is None and restored.buffers is None
    _assert_bitwise(restored, state)


def test_dtype_zoo_and_empty_shapes_round_trip_bitwise(tmp_path: Any) -> None:
    tree = {
        "i": torch.tensor(-(2**62), dtype=torch.int64),
        "e": torch.empty(0, 3, dtype=torch.bfloat16),
        "b": torch.tensor([True, False, True]),
        "c": torch.complex(torch.randn(2), torch.randn(2)),
        "h": torch.tensor([-0.0, math.inf, 65504.0], dtype=torch.float16),
        "n": torch.tensor(math.nan, dtype=torch.float64),
    }
    path = tmp_path / "s.safetensors"
    checkpoint.save(path, tree)
    _assert_bitwise(
        checkpoint.restore(path, {k: torch.zeros_like(v) for k, v in tree.items()}), tree
    )
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"checkpoint\['h'\] has dtype"):
        checkpoint.restore(path, {**tree, "h": torch.zeros(3, dtype=torch.bfloat16)})
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"checkpoint\['e'\] has shape"):
        checkpoint.restore(path, {**tree, "e": torch.zeros(3, dtype=torch.bfloat16)})
