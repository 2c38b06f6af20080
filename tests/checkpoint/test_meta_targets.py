"""Restoring into targets whose tensors live on the ``meta`` device.

A meta tensor has a shape and dtype but no values, so a meta target leaf means "expect this
shape and dtype": the saved values come back on the CPU (or on ``device=``). Restore used to
follow the meta device and return meta tensors, silently dropping every saved value.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from functrain import checkpoint


class Moments(NamedTuple):
    mu: Any
    nu: Any


def _saved_state() -> dict[str, Any]:
    # Values whose bits a lossy round trip would change: -0.0, NaN payloads, subnormals,
    # bfloat16 and integers past float32's exact range.
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "special": torch.tensor([-0.0, float("nan"), float("inf"), 1e-310], dtype=torch.float64),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "count": torch.tensor(2**40 + 1, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "opt": Moments(mu=torch.randn(2, generator=g), nu=torch.rand(2, generator=g)),
        "step": 7,
    }


def _like(state: Any, device: str) -> Any:
    """A target with ``state``'s structure; tensor leaves are empty tensors on ``device``."""
    if isinstance(state, torch.Tensor):
        return torch.empty(state.shape, dtype=state.dtype, device=device)
    if isinstance(state, Moments):
        return Moments(_like(state.mu, device), _like(state.nu, device))
    if isinstance(state, dict):
        return {k: _like(v, device) for k, v in state.items()}
    return 0


def _assert_bitwise_equal_on_cpu(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.device.type == "cpu"
        assert got.dtype == want.dtype and got.shape == want.shape
        # Compare raw bytes: torch.equal treats NaN != NaN and -0.0 == 0.0.
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
    elif isinstance(want, tuple):
        assert type(got) is type(want)
        for g, w in zip(got, want, strict=True):
            _assert_bitwise_equal_on_cpu(g, w)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            _assert_bitwise_equal_on_cpu(got[k], want[k])
    else:
        assert got == want


def test_meta_target_restores_saved_values_on_cpu(tmp_path: Any) -> None:
    path = str(tmp_path / "s.safetensors")
    state = _saved_state()
    checkpoint.save(path, state)
    out = checkpoint.restore(path, target=_like(state, "meta"))
    _assert_bitwise_equal_on_cpu(out, state)


def test_meta_target_with_explicit_device(tmp_path: Any) -> None:
    path = str(tmp_path / "s.safetensors")
    state = _saved_state()
    checkpoint.save(path, state)
    out = checkpoint.restore(path, target=_like(state, "meta"), device=torch.device("cpu"))
    _assert_bitwise_equal_on_cpu(out, state)


def test_device_meta_is_refused(tmp_path: Any) -> None:
    # device="meta" would return tensors without values for every leaf: refuse it loudly.
    path = str(tmp_path / "s.safetensors")
    checkpoint.save(path, {"w": torch.ones(2)})
    for target in (None, {"w": torch.zeros(2)}):
        with pytest.raises(ValueError, match="device='meta' would restore tensors without"):
            checkpoint.restore(path, target, device="meta")


def test_mixed_meta_and_cpu_target(tmp_path: Any) -> None:
    path = str(tmp_path / "s.safetensors")
    state = _saved_state()
    checkpoint.save(path, state)
    target = _like(state, "cpu")
    target["w"] = torch.empty(3, 4, dtype=torch.float64, device="meta")
    target["opt"] = Moments(mu=torch.empty(2, device="meta"), nu=torch.zeros(2))
    out = checkpoint.restore(path, target=target)
    _assert_bitwise_equal_on_cpu(out, state)


def test_meta_parameter_keeps_requires_grad(tmp_path: Any) -> None:
    path = str(tmp_path / "s.safetensors")
    w = torch.arange(6.0).reshape(2, 3)
    checkpoint.save(path, {"w": w})
    target = {"w": torch.nn.Parameter(torch.empty(2, 3, device="meta"))}
    out = checkpoint.restore(path, target=target)
    assert isinstance(out["w"], torch.nn.Parameter) and out["w"].requires_grad
    assert out["w"].device.type == "cpu" and torch.equal(out["w"].detach(), w)


@pytest.mark.parametrize(
    ("leaf", "message"),
    [
        (
            torch.empty(4, 3, dtype=torch.float64, device="meta"),
            r"checkpoint\['opt'\]\['mu'\] has shape \(3, 4\) but target has \(4, 3\)",
        ),
        (
            torch.empty(3, 4, dtype=torch.float32, device="meta"),
            r"checkpoint\['opt'\]\['mu'\] has dtype float64 but target has float32",
        ),
    ],
    ids=["shape", "dtype"],
)
def test_meta_target_mismatch_names_the_path(
    tmp_path: Any, leaf: torch.Tensor, message: str
) -> None:
    path = str(tmp_path / "s.safetensors")
    checkpoint.save(path, {"opt": {"mu": torch.zeros(3, 4, dtype=torch.float64)}})
    with pytest.raises(checkpoint.CheckpointMismatchError, match=message):
        checkpoint.restore(path, target={"opt": {"mu": leaf}})


def test_non_strict_missing_meta_entry_is_an_error(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Non-strict restore keeps a missing entry's target value; a meta value has none to keep.
    path = str(tmp_path / "s.safetensors")
    checkpoint.save(path, {"w": torch.ones(2)})
    target = {"w": torch.empty(2, device="meta"), "extra": {"b": torch.empty(1, device="meta")}}
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"target\['extra'\] has no"):
        checkpoint.restore(path, target=target, strict=False)
    # A missing CPU entry is still kept, and a meta entry that is present is filled from the file.
    with caplog.at_level(logging.WARNING, logger="functrain.checkpoint"):
        out = checkpoint.restore(
            path, target={"w": torch.empty(2, device="meta"), "b": torch.zeros(1)}, strict=False
        )
    assert torch.equal(out["w"], torch.ones(2)) and torch.equal(out["b"], torch.zeros(1))
    assert "target['b']" in caplog.text


def test_manager_restore_with_meta_target(tmp_path: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=2)
    state = _saved_state()
    mgr.save(3, state)
    target = _like(state, "meta")
    _assert_bitwise_equal_on_cpu(mgr.restore(3, target=target), state)
    _assert_bitwise_equal_on_cpu(mgr.restore_latest(target=target), state)
    assert mgr.restored_step == 3
    # A mismatch against a meta target is the caller's bug: raised at once, not skipped.
    bad = {**target, "w": torch.empty(4, 3, dtype=torch.float64, device="meta")}
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"checkpoint\['w'\] has shape"):
        mgr.restore_latest(target=bad)
    assert mgr.all_steps() == [3] and not mgr.skipped
    with pytest.raises(ValueError, match="device='meta'"):
        mgr.restore(3, target=target, device="meta")


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=6
    ),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
)
def test_meta_target_round_trip_property(tmp_path_factory: Any, values: list, dtype: Any) -> None:
    path = str(tmp_path_factory.mktemp("p") / "s.safetensors")
    saved = {"x": torch.tensor(values, dtype=torch.float32).to(dtype)}
    checkpoint.save(path, saved)
    target = {"x": torch.empty(len(values), dtype=dtype, device="meta")}
    _assert_bitwise_equal_on_cpu(checkpoint.restore(path, target=target), saved)
