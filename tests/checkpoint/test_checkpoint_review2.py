"""Second adversarial review: states from this week's features, hostile headers, manager steps.

Expected values are the original tensors (compared bit for bit with ``functrain.testing``) or
messages written out by hand, never values produced by the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft
from functrain import checkpoint
from functrain.checkpoint import _file
from functrain.testing import assert_trees_all_equal

# --- helpers ----------------------------------------------------------------------------------


def bits_f32(*words: int) -> torch.Tensor:
    """float32 values with exactly these bit patterns (NaN payloads, -0.0)."""
    return (
        torch.tensor([w - 2**32 if w >= 2**31 else w for w in words])
        .to(torch.int32)
        .view(torch.float32)
    )


SPECIAL = bits_f32(0x7FC00001, 0xFFC12345, 0x80000000, 0x7F800000, 0x00000001)


def rewrite_description(path: Any, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edits the functrain description in place and re-signs it, as a careless tool would."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header, data = json.loads(f.read(n)), f.read()
    description = json.loads(header["__metadata__"]["functrain"])
    edit(description)
    text = json.dumps(description)
    header["__metadata__"]["functrain"] = text
    header["__metadata__"]["functrain_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


# --- states from the new features round-trip bit for bit --------------------------------------


def test_trained_state_with_every_extra_round_trips_bitwise(tmp_path: Any) -> None:
    # bfloat16 params with float64 moments, a loss scale, skip counters and the noise-scale
    # hook state in state.extra, and an accountant in the metadata, as the guides set them up.
    params = {"w": torch.linspace(-1, 1, 6, dtype=torch.bfloat16), "b": torch.zeros(2)}
    tx = ft.adam(1e-2, mu_dtype=torch.float64)
    step = ft.make_train_step(
        lambda p, b: (p["w"].float().sum() * b).mean() + (p["b"] ** 2).sum(),
        tx,
        micro_batches=2,
        loss_scale=ft.DynamicLossScale(init_scale=2.0**10),
        grad_stats=ft.noise_scale_hook(),
        donate=False,
    )
    state = ft.TrainState.create(params=params, tx=tx)
    for batch in ([1.0, 2.0], [3.0, float("inf")], [0.5, 0.25]):  # the inf step is skipped
        state, _ = step(state, torch.tensor(batch))
    assert set(state.extra) == {"loss_scale", "nonfinite", "noise_scale"}
    accountant = ft.RDPAccountant()
    accountant.step(noise_multiplier=1.1, sample_rate=0.01)
    path = tmp_path / "state.safetensors"
    checkpoint.save(path, state, metadata={"accountant": accountant.state_dict()})
    fresh = step.prepare(ft.TrainState.create(params=ft.tree.zeros_like(params), tx=tx))
    out = checkpoint.restore(path, target=fresh)
    assert type(out) is ft.TrainState
    assert type(out.extra["loss_scale"]) is type(state.extra["loss_scale"])
    for field in ("step", "params", "opt_state", "key", "extra"):
        assert_trees_all_equal(getattr(out, field), getattr(state, field), bitwise=True)
    resumed = ft.RDPAccountant()
    resumed.load_state_dict(checkpoint.read_metadata(path)["accountant"])
    assert resumed.history == accountant.history


def test_complex_adam_state_round_trips_bitwise(tmp_path: Any) -> None:
    params = {"z": torch.complex(SPECIAL, SPECIAL.flip(0)), "r": SPECIAL.clone()}
    tx = ft.adam(1e-2)
    state = ft.TrainState.create(params=params, tx=tx)
    grads = {"z": torch.full((5,), 1 - 2j), "r": torch.ones(5)}
    _, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(opt_state=opt_state)
    path = tmp_path / "z.safetensors"
    checkpoint.save(path, state)
    out = checkpoint.restore(path, target=ft.TrainState.create(params=params, tx=tx))
    assert_trees_all_equal(out.params, params, bitwise=True)
    assert_trees_all_equal(out.opt_state, opt_state, bitwise=True)


def test_odd_layouts_restore_as_their_values_and_independent(tmp_path: Any) -> None:
    base = SPECIAL.clone()
    z = torch.complex(SPECIAL, -SPECIAL)
    tree = {
        "expanded": base.expand(3, 5),  # stride 0
        "tied_a": base,
        "tied_b": base,  # the same tensor twice (tied parameters)
        "view": base[1::2],  # a strided view of the same storage
        "neg": z.conj().imag,  # a lazily negated view
        "empty": torch.empty(0, 3, dtype=torch.complex128),
        "scalar": torch.tensor(-0.0, dtype=torch.float16),
        "count": torch.tensor(2**31 - 1, dtype=torch.int32),
    }
    expected = {k: v.clone() for k, v in tree.items()}
    expected["neg"] = SPECIAL.clone()  # conj(z).imag = -(-SPECIAL): both sign flips undone
    path = tmp_path / "s.safetensors"
    checkpoint.save(path, tree)
    out = checkpoint.restore(path, target=tree)
    assert_trees_all_equal(out, expected, bitwise=True)
    assert out["expanded"].is_contiguous()
    # Sharing is not kept (save's docstring says so): each restored leaf owns its memory.
    out["tied_a"].zero_()
    assert_trees_all_equal(out["tied_b"], SPECIAL, bitwise=True)
    assert_trees_all_equal(base, SPECIAL, bitwise=True)  # the saved state is untouched


# --- metadata and headers ---------------------------------------------------------------------


def nested(depth: int) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for _ in range(depth):
        tree = {"k": tree}
    return tree


def test_deep_metadata_is_refused_at_save_not_unreadable_later(tmp_path: Any) -> None:
    path = tmp_path / "s.safetensors"
    checkpoint.save(path, {"w": torch.ones(1)})
    # 900 levels saved and then failed to load from any call stack deeper than ~100 frames.
    for depth in (900, 5000):  # 5000 used to escape json.dumps as a bare RecursionError
        with pytest.raises(TypeError, match="metadata is nested deeper than 256 levels"):
            checkpoint.save(path, {"w": torch.zeros(1)}, metadata=nested(depth))
    assert_trees_all_equal(checkpoint.restore(path), {"w": torch.ones(1)})  # not replaced
    checkpoint.save(path, {"w": torch.zeros(1)}, metadata=nested(255))

    def deep_call(n: int) -> Any:
        return deep_call(n - 1) if n else checkpoint.read_metadata(path)

    assert deep_call(300) == nested(255)


def test_header_over_the_reader_limit_is_refused_at_save(tmp_path: Any, monkeypatch) -> None:
    # The real limit is 100 MiB; a smaller one keeps the test fast. The old writer produced the
    # file and the reader then called it "not a complete checkpoint".
    monkeypatch.setattr(_file, "MAX_HEADER_BYTES", 4096)
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match=r"header .* over the 4096-byte limit .* not in metadata"):
        checkpoint.save(path, {"w": torch.ones(1)}, metadata={"log": "x" * 5000})
    assert not os.listdir(tmp_path)


def test_reader_names_an_oversized_header_as_such(tmp_path: Any, monkeypatch) -> None:
    path = tmp_path / "s.safetensors"
    checkpoint.save(path, {"w": torch.ones(1)}, metadata={"log": "x" * 5000})
    monkeypatch.setattr(_file, "MAX_HEADER_BYTES", 4096)
    with pytest.raises(checkpoint.InvalidCheckpointError, match="over the 4096-byte limit"):
        checkpoint.read_metadata(path)


@pytest.mark.parametrize("version", [0, -1, True, 1.0, None, "1"])
def test_format_versions_that_were_never_written_are_refused(tmp_path: Any, version: Any) -> None:
    path = tmp_path / "s.safetensors"
    checkpoint.save(path, {"w": torch.ones(2)})
    rewrite_description(path, lambda d: d.update(version=version))
    with pytest.raises(checkpoint.InvalidCheckpointError) as err:
        checkpoint.restore(path)
    assert f"malformed format version {version!r} (versions start at 1" in str(err.value)


@pytest.mark.parametrize("maxlen", [-1, 1, "3"])
def test_malformed_deque_maxlen_is_an_invalid_checkpoint(tmp_path: Any, maxlen: Any) -> None:
    # -1 raised a bare ValueError from collections.deque; 1 silently dropped an entry.
    from collections import deque

    path = tmp_path / "s.safetensors"
    checkpoint.save(path, {"d": deque([torch.ones(1), 2], maxlen=3)})
    rewrite_description(path, lambda d: d["tree"]["children"][0].update(maxlen=maxlen))
    with pytest.raises(checkpoint.InvalidCheckpointError, match=r"\['d'\]: malformed deque"):
        checkpoint.restore(path)


# --- CheckpointManager ------------------------------------------------------------------------


def test_manager_looks_up_tensor_steps_as_it_saves_them(tmp_path: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=2, best_metric="loss")
    step = torch.tensor(3)  # state.step is a 0-d int64 tensor
    path = mgr.save(step, {"w": torch.ones(2)}, metrics={"loss": 0.5})
    assert path == mgr.path(step) == str(tmp_path / "checkpoint_00000003.safetensors")
    assert_trees_all_equal(mgr.restore(step), {"w": torch.ones(2)})
    assert mgr.metrics(torch.tensor(3, dtype=torch.int32)) == {"loss": 0.5}


@pytest.mark.parametrize(
    "step",
    [torch.tensor(True), torch.tensor(1 + 0j), torch.tensor(1.0), torch.tensor([1, 2]), True],
    ids=["bool-tensor", "complex-tensor", "float-tensor", "two-elements", "bool"],
)
def test_manager_refuses_steps_that_are_not_integers(tmp_path: Any, step: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path)
    mgr.save(1, {"w": torch.ones(1)})
    with pytest.raises((TypeError, ValueError), match="step must be"):
        mgr.save(step, {"w": torch.zeros(1)})
    with pytest.raises((TypeError, ValueError), match="step must be"):
        mgr.restore(step)  # True used to restore step 1
    assert mgr.all_steps() == [1]


def test_restoring_a_pruned_step_names_the_steps_there_are(tmp_path: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        mgr.save(step, {"w": torch.full((1,), float(step))})
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 1 in .*have \[2, 3\]"):
        mgr.restore(1)


def test_exception_between_write_and_rename_keeps_latest(tmp_path: Any, monkeypatch) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=1)
    mgr.save(1, {"w": torch.ones(2)})

    def crash(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C after the data is written, before the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, {"w": torch.zeros(2)})
    monkeypatch.undo()
    for m in (mgr, checkpoint.CheckpointManager(tmp_path, max_to_keep=1)):
        assert m.latest_step() == 1 and m.all_steps() == [1]
        assert_trees_all_equal(m.restore_latest(), {"w": torch.ones(2)})
    assert os.listdir(tmp_path) == ["checkpoint_00000001.safetensors"]


def test_concurrent_saves_do_not_interleave(tmp_path: Any, monkeypatch) -> None:
    # A background thread's save of step 5 was overtaken by step 6, then pruned by its own
    # save (max_to_keep=1) before returning: save(5) returned a path to nothing.
    mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=1)
    inside, real_save, real_unlink = threading.Event(), checkpoint.io.save, os.unlink
    unlinked_by: dict[str, str] = {}

    def slow_save(path: str, state: Any, **kwargs: Any) -> None:
        if state["w"].item() == 5:
            inside.set()
            threading.Event().wait(0.3)  # step 6 gets its turn here if nothing prevents it
        real_save(path, state, **kwargs)

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        unlinked_by[os.path.basename(path)] = threading.current_thread().name
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.io, "save", slow_save)
    monkeypatch.setattr(os, "unlink", unlink)
    background = threading.Thread(
        target=mgr.save, args=(5, {"w": torch.tensor(5.0)}), name="background"
    )
    background.start()
    assert inside.wait(10)
    mgr.save(6, {"w": torch.tensor(6.0)})
    background.join()
    # Serialised: save(5) completed, and save(6) (this thread) pruned it afterwards.
    assert unlinked_by == {"checkpoint_00000005.safetensors": threading.current_thread().name}
    assert mgr.all_steps() == [6] == checkpoint.CheckpointManager(tmp_path).all_steps()
