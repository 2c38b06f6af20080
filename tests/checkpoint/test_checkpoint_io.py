"""save/restore: round trips, validation messages, devices, atomicity, corruption, pickles."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import pickle
import tempfile
from typing import Any, NamedTuple

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from functrain import checkpoint
from functrain.checkpoint import _file

# --- helpers ----------------------------------------------------------------------------------


class Moments(NamedTuple):
    mu: Any
    nu: Any


class OtherMoments(NamedTuple):
    mu: Any
    nu: Any


@optree.dataclasses.dataclass(namespace="")
class Holder:
    """An optree-registered dataclass with a static (non-pytree) field."""

    step: Any
    params: Any
    label: str = dataclasses.field(default="static", metadata={"pytree_node": False})


def assert_identical(a: Any, b: Any) -> None:
    """Same node types, dict key order, leaf types, dtypes, shapes and bits (NaN payloads too)."""
    assert type(a) is type(b), f"{type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        ab, bb = _file.host_bytes(a), _file.host_bytes(b)
        assert torch.equal(ab, bb), f"{a} vs {b}"
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    elif isinstance(a, (dict, collections.OrderedDict)):
        assert list(a) == list(b)
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple, collections.deque)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    elif isinstance(a, Holder):
        assert a.label == b.label
        assert_identical(a.step, b.step)
        assert_identical(a.params, b.params)
    else:
        assert a == b


def plain(tree: Any) -> Any:
    """What restore() without target documents: builtin containers only."""
    if isinstance(tree, Holder):
        return {"step": plain(tree.step), "params": plain(tree.params)}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return {f: plain(v) for f, v in zip(tree._fields, tree)}
    if isinstance(tree, collections.OrderedDict):
        return collections.OrderedDict((k, plain(v)) for k, v in tree.items())
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple, collections.deque)):
        return type(tree)(plain(v) for v in tree)
    return tree


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


def make_tensor(dtype: torch.dtype, shape: list[int], seed: int, special: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, generator=gen, dtype=dtype) * 100
        if special and t.numel():
            flat = t.view(-1)
            flat[0] = float("nan")
            flat[-1] = float("-inf")
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)


tensors = st.builds(
    make_tensor,
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 3), max_size=3),
    st.integers(0, 2**31),
    st.booleans(),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
)
keys = st.one_of(st.text(max_size=6), st.integers(-5, 5))


def containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=6), children, max_size=3),
        st.dictionaries(st.integers(-5, 5), children, max_size=3),
        st.dictionaries(keys, children, max_size=3).map(collections.OrderedDict),
        st.dictionaries(keys, children, max_size=3).map(lambda d: collections.defaultdict(list, d)),
        st.lists(children, max_size=3).map(collections.deque),
        st.builds(Moments, children, children),
        st.builds(Holder, children, children),
    )


trees = st.recursive(st.one_of(tensors, scalars), containers, max_leaves=12)


def tmp_file(directory: str, name: str = "ckpt.safetensors") -> str:
    return os.path.join(directory, name)


# --- round trips ------------------------------------------------------------------------------


@given(trees)
def test_round_trip_random_trees(tree: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = tmp_file(d)
        checkpoint.save(path, tree, metadata={"k": [1, "x"]})
        assert_identical(checkpoint.restore(path, target=tree), tree)
        assert_identical(checkpoint.restore(path), plain(tree))
        assert checkpoint.read_metadata(path) == {"k": [1, "x"]}


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3)])
def test_round_trip_each_dtype_and_shape(tmp_path: Any, dtype: torch.dtype, shape: tuple) -> None:
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16):
        t = make_tensor(torch.uint8, list(shape), 0, False).to(dtype)
    else:
        t = make_tensor(dtype, list(shape), 0, True)
    path = tmp_file(str(tmp_path))
    checkpoint.save(path, {"t": t})
    assert_identical(checkpoint.restore(path, target={"t": torch.empty_like(t)}), {"t": t})


def test_non_contiguous_conj_and_shared_leaves(tmp_path: Any) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    z = torch.randn(3, dtype=torch.complex64)
    tree = {"t": base.t(), "slice": base[1:3, ::2], "conj": z.conj(), "same": [base, base]}
    path = tmp_file(str(tmp_path))
    checkpoint.save(path, tree)
    out = checkpoint.restore(path, target=tree)
    expected = {k: v for k, v in tree.items()}
    expected["conj"] = z.conj().resolve_conj()
    assert_identical(out, expected)
    out["same"][0].add_(1)  # restored leaves are independent tensors
    assert torch.equal(out["same"][1], base)


def test_restore_returns_target_types_and_static_metadata(tmp_path: Any) -> None:
    saved = Holder(torch.tensor(3), {"opt": (Moments(torch.ones(2), None),)}, label="saved")
    target = Holder(torch.tensor(0), {"opt": (Moments(torch.zeros(2), None),)}, label="target")
    path = tmp_file(str(tmp_path))
    checkpoint.save(path, saved)
    out = checkpoint.restore(path, target=target)
    assert isinstance(out, Holder) and isinstance(out.params["opt"][0], Moments)
    assert out.label == "target"  # static metadata comes from the target, as documented
    assert out.step.item() == 3 and torch.equal(out.params["opt"][0].mu, torch.ones(2))


def test_parameters_and_requires_grad_follow_target(tmp_path: Any) -> None:
    path = tmp_file(str(tmp_path))
    checkpoint.save(path, {"p": torch.nn.Parameter(torch.ones(2)), "g": torch.ones(2)})
    target = {"p": torch.nn.Parameter(torch.zeros(2)), "g": torch.zeros(2, requires_grad=True)}
    out = checkpoint.restore(path, target=target)
    assert isinstance(out["p"], torch.nn.Parameter) and out["p"].requires_grad
    assert type(out["g"]) is torch.Tensor and out["g"].requires_grad and out["g"].is_leaf


def test_file_is_standard_safetensors(tmp_path: Any) -> None:
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    path = tmp_file(str(tmp_path))
    state = {"params": {"w": torch.randn(3, 4)}, "mu": torch.ones(2, dtype=torch.bfloat16)}
    checkpoint.save(path, state)
    loaded = load_file(path)
    assert torch.equal(loaded["['params']['w']"], state["params"]["w"])
    assert torch.equal(loaded["['mu']"], state["mu"])
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata()["format"] == "functrain.checkpoint"
    # and a plain safetensors file from another tool restores as {name: tensor}
    other = tmp_file(str(tmp_path), "other.safetensors")
    save_file({"a": torch.arange(3), "b": torch.ones(2, 2)}, other)
    out = checkpoint.restore(other)
    assert torch.equal(out["a"], torch.arange(3)) and torch.equal(out["b"], torch.ones(2, 2))
    with pytest.raises(checkpoint.InvalidCheckpointError, match="without a functrain tree"):
        checkpoint.restore(other, target={"a": torch.arange(3)})


# --- validation against a target ---------------------------------------------------------------


def adam_like(w_shape: tuple[int, ...]) -> dict[str, Any]:
    w = torch.zeros(w_shape)
    return {"params": {"fc.weight": w}, "opt_state": (Moments({"fc.weight": w}, {"fc.weight": w}),)}


@pytest.mark.parametrize(
    ("saved", "target", "message"),
    [
        (
            adam_like((3, 4)),
            adam_like((4, 4)),
            "checkpoint['opt_state'][0]['mu']['fc.weight'] has shape (3, 4) but target has (4, 4)",
        ),
        (
            {"w": torch.zeros(2)},
            {"w": torch.zeros(2, dtype=torch.float64)},
            "checkpoint['w'] has dtype float32 but target has float64",
        ),
        (
            {"a": torch.zeros(1)},
            {"a": torch.zeros(1), "b": torch.zeros(1)},
            "target['b'] has no counterpart in the checkpoint",
        ),
        (
            {"a": torch.zeros(1), "x": 1},
            {"a": torch.zeros(1)},
            "checkpoint['x'] has no counterpart in target",
        ),
        (
            {"x": [torch.zeros(1)]},
            {"x": (torch.zeros(1),)},
            "checkpoint['x'] is a list but target has a tuple",
        ),
        (
            {"x": 3},
            {"x": torch.zeros(())},
            "checkpoint['x'] is an int but target has a float32 tensor of shape ()",
        ),
        (
            {"x": torch.zeros(2)},
            {"x": 1.0},
            "checkpoint['x'] is a float32 tensor of shape (2,) but target has a float",
        ),
        (
            {"x": None},
            {"x": torch.zeros(1)},
            "checkpoint['x'] is None but target has a float32 tensor",
        ),
        ({"x": [1, 2]}, {"x": [1]}, "checkpoint['x'][1] has no counterpart in target"),
        (
            Moments(1, 2),
            OtherMoments(1, 2),
            "checkpoint is a Moments but target has an OtherMoments",
        ),
        ({"x": True}, {"x": 1}, "checkpoint['x'] is a bool but target has an int"),
    ],
)
def test_mismatch_messages_name_the_path(
    tmp_path: Any, saved: Any, target: Any, message: str
) -> None:
    path = tmp_file(str(tmp_path))
    checkpoint.save(path, saved)
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        checkpoint.restore(path, target=target)
    assert message in str(err.value)


def test_mismatch_message_deep_in_optimizer_state(tmp_path: Any) -> None:
    saved, target = adam_like((4, 4)), adam_like((4, 4))
    saved["opt_state"] = (
        Moments({"fc.weight": torch.zeros(3, 4)}, {"fc.weight": torch.zeros(4, 4)}),
    )
    path = tmp_file(str(tmp_path))
    checkpoint.save(path, saved)
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        checkpoint.restore(path, target=target)
    assert str(err.value) == (
        "checkpoint['opt_state'][0]['mu']['fc.weight'] has shape (3, 4) but target has (4, 4)"
    )
    assert isinstance(err.value, ValueError)  # also a functrain.tree.TreeMismatchError


def test_node_types_match_by_qualified_name_not_module(tmp_path: Any) -> None:
    # A class saved from a script lives in __main__; the same class imported elsewhere must load.
    Elsewhere = collections.namedtuple("Moments", ["mu", "nu"], module="somewhere.else")
    path = tmp_file(str(tmp_path))
    checkpoint.save(path, Moments(torch.ones(1), 2))
    out = checkpoint.restore(path, target=Elsewhere(torch.zeros(1), 0))
    assert type(out) is Elsewhere and out.nu == 2


def test_non_strict_keeps_missing_and_ignores_unexpected(tmp_path: Any, caplog: Any) -> None:
    path = tmp_file(str(tmp_path))
    checkpoint.save(path, {"a": torch.ones(1), "old": torch.ones(1), "m": Moments(1, 2)})
    target = {"a": torch.zeros(1), "new": torch.full((1,), 7.0), "m": OtherMoments(0, 0)}
    with caplog.at_level(logging.WARNING, logger="functrain.checkpoint"):
        out = checkpoint.restore(path, target=target, strict=False)
    assert_identical(
        out, {"a": torch.ones(1), "new": torch.full((1,), 7.0), "m": OtherMoments(1, 2)}
    )
    assert "target['new']" in caplog.text and "checkpoint['old']" in caplog.text
    with pytest.raises(checkpoint.CheckpointMismatchError, match="has shape"):
        checkpoint.restore(path, target={"a": torch.zeros(2)}, strict=False)


def test_unsupported_leaves_name_the_path(tmp_path: Any) -> None:
    path = tmp_file(str(tmp_path))
    with pytest.raises(TypeError, match=r"state\['opt'\]\[1\] of type function"):
        checkpoint.save(path, {"opt": [torch.ones(1), lambda x: x]})
    with pytest.raises(TypeError, match="dict key"):
        checkpoint.save(path, {"opt": {(1, 2): torch.ones(1)}})
    with pytest.raises(TypeError, match="only dense tensors"):
        checkpoint.save(path, {"s": torch.eye(2).to_sparse()})
    with pytest.raises(TypeError, match="metadata must be a dict or None"):
        checkpoint.save(path, {"a": torch.ones(1)}, metadata=[1])
    with pytest.raises(TypeError, match="metadata must be JSON-serializable"):
        checkpoint.save(path, {"a": torch.ones(1)}, metadata={"x": object()})
    assert not os.listdir(tmp_path)


# --- devices ----------------------------------------------------------------------------------


def test_device_mapping_on_cpu(tmp_path: Any) -> None:
    path = tmp_file(str(tmp_path))
    checkpoint.save(path, {"w": torch.ones(2)})
    assert checkpoint.restore(path, device="cpu")["w"].device.type == "cpu"
    # Tensors follow the target leaf's device, except a meta leaf: it only states the shape and
    # dtype. This test used to expect a meta result, which silently dropped the saved values;
    # the values now come back on the CPU (see test_meta_targets.py) ...
    out = checkpoint.restore(path, target={"w": torch.empty(2, device="meta")})
    assert out["w"].device.type == "cpu" and torch.equal(out["w"], torch.ones(2))
    # ... or on device= when it is given
    out = checkpoint.restore(path, target={"w": torch.empty(2, device="meta")}, device="cpu")
    assert torch.equal(out["w"], torch.ones(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mapping_cuda(tmp_path: Any) -> None:
    path = tmp_file(str(tmp_path))
    state = {"w": torch.randn(3, device="cuda"), "n": torch.tensor(2, device="cuda")}
    checkpoint.save(path, state)
    on_cpu = checkpoint.restore(path)
    assert on_cpu["w"].device.type == "cpu" and torch.equal(on_cpu["w"], state["w"].cpu())
    on_gpu = checkpoint.restore(
        path, target={"w": torch.zeros(3, device="cuda"), "n": torch.tensor(0)}
    )
    assert on_gpu["w"].device.type == "cuda" and on_gpu["n"].device.type == "cpu"
    assert torch.equal(on_gpu["w"], state["w"])
    mapped = checkpoint.restore(path, target=state, device="cpu")
    assert mapped["w"].device.type == "cpu"


# --- atomicity and corruption ------------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_save_fsyncs_file_before_rename_and_directory_after(
    tmp_path: Any, monkeypatch: Any
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        assert os.path.basename(src).startswith(".ckpt.safetensors.") and src.endswith(".tmp")
        assert os.path.dirname(src) == os.path.dirname(dst)
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save(tmp_file(str(tmp_path)), {"w": torch.ones(3)})
    assert events == ["fsync-file", "replace", "fsync-dir"]


@pytest.mark.parametrize("fail_at", ["data", "replace"])
def test_failed_save_leaves_previous_checkpoint(
    tmp_path: Any, monkeypatch: Any, fail_at: str
) -> None:
    path = tmp_file(str(tmp_path))
    old = {"w": torch.arange(4.0), "b": torch.zeros(2)}
    checkpoint.save(path, old)

    def boom(*args: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom) if fail_at == "replace" else monkeypatch.setattr(
        _file, "host_bytes", boom
    )
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"w": torch.ones(4), "b": torch.ones(2)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temporary file left behind
    assert_identical(checkpoint.restore(path, target=old), old)


def small_file(tmp_path: Any) -> tuple[str, bytes, Any]:
    path = tmp_file(str(tmp_path))
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(7), "m": Moments(1.5, "x")}
    checkpoint.save(path, state)
    with open(path, "rb") as f:
        return path, f.read(), state


def test_every_truncation_is_rejected(tmp_path: Any) -> None:
    path, data, _ = small_file(tmp_path)
    for cut in range(len(data)):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(checkpoint.InvalidCheckpointError):
            checkpoint.restore(path)


def test_every_single_bit_flip_is_rejected_or_harmless(tmp_path: Any) -> None:
    path, data, state = small_file(tmp_path)
    for pos in range(len(data)):
        corrupt = bytearray(data)
        corrupt[pos] ^= 0x01
        with open(path, "wb") as f:
            f.write(corrupt)
        try:
            out = checkpoint.restore(path, target=state)
        except checkpoint.InvalidCheckpointError:
            continue
        assert_identical(out, state)  # e.g. a flipped padding byte that JSON still accepts


def test_corrupt_data_error_names_the_tensor(tmp_path: Any) -> None:
    path, data, _ = small_file(tmp_path)
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF
    with open(path, "wb") as f:
        f.write(corrupt)
    with pytest.raises(checkpoint.InvalidCheckpointError, match=r"checksum mismatch in tensor"):
        checkpoint.restore(path)
    assert checkpoint.restore(path, verify=False) is not None  # verify=False skips the hashes


def test_missing_file(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError):
        checkpoint.restore(tmp_file(str(tmp_path)))


# --- pickles are never loaded ------------------------------------------------------------------


class Evil:
    """Unpickling this creates a marker directory: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle0", "pickle2", "pickle5", "torch.save"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Any, writer: str) -> None:
    marker = str(tmp_path / "pwned")
    path = tmp_file(str(tmp_path), "evil.safetensors")
    if writer == "torch.save":
        torch.save({"w": torch.ones(1), "x": Evil(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(Evil(marker), f, protocol=int(writer[-1]))
    with pytest.raises(checkpoint.InvalidCheckpointError) as err:
        checkpoint.restore(path, target={"w": torch.ones(1)})
    with pytest.raises(checkpoint.InvalidCheckpointError):
        checkpoint.read_metadata(path)
    assert not os.path.exists(marker)
    message = str(err.value)
    assert path in message and "not a" in message
    if writer != "pickle0":  # protocol-0 pickles have no magic number: reported as foreign
        assert "never unpickles" in message and "nothing in the file was executed" in message
    # the file really is hostile: unpickling it would have created the marker
    with open(path, "rb") as f:
        if writer == "torch.save":
            torch.load(f, weights_only=False)
        else:
            pickle.load(f)  # deliberately, to prove the test file is armed
    assert os.path.exists(marker)


def test_train_state_round_trip_and_path_named_error(tmp_path: Any) -> None:
    import functrain as ft

    if not hasattr(ft, "TrainState"):
        pytest.skip("ft.TrainState not available yet")
    params = {"fc.weight": torch.randn(4, 3), "fc.bias": torch.randn(4)}
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adam(1e-2))
    state = ft.TrainState.create(params=params, tx=tx)
    updates, opt_state = tx.update(ft.tree.ones_like(params), state.opt_state, state.params)
    state = ft.TrainState.create(params=ft.apply_updates(params, updates), tx=tx)
    path = tmp_file(str(tmp_path))
    checkpoint.save(path, ft.TrainState(state.step, state.params, opt_state, None, state.key))
    fresh = ft.TrainState.create(params=ft.tree.zeros_like(params), tx=tx)
    out = checkpoint.restore(path, target=fresh)
    assert type(out) is ft.TrainState
    assert_identical(out.params, state.params)
    assert_identical(out.opt_state, opt_state)
    wrong = ft.TrainState.create(params={**params, "fc.weight": torch.zeros(4, 4)}, tx=tx)
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        checkpoint.restore(path, target=wrong)
    assert str(err.value) == (
        "checkpoint['params']['fc.weight'] has shape (4, 3) but target has (4, 4)"
    )
