"""Third review of the examples: run as a user runs them (real launches, TensorBoard's reader)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from example_files import EXAMPLES, ROOT, load_example

from functrain.logging import TensorBoardWriter, read_scalars


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_rank_of_a_refused_ddp_launch_exits_non_zero(tmp_path: Path) -> None:
    # Two gloo ranks started by hand with torchrun's environment, so that each rank's own
    # exit status is seen (torchrun folds them into one). The test holds the --logdir lock a
    # running launch's rank 0 would hold. The old code: rank 0 exited 1, rank 1 exited 0.
    fcntl = pytest.importorskip("fcntl")  # no lock (and nothing to test) on Windows
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    base.update(
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    cmd = [sys.executable, os.path.join(EXAMPLES, "digits_ddp.py"), "--fast"]
    cmd += ["--timeout", "30", "--logdir", str(tmp_path)]
    with open(tmp_path / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        procs = [
            subprocess.Popen(
                cmd,
                env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in (0, 1)
        ]
        outputs = [proc.communicate(timeout=120) for proc in procs]
    message = (
        f"error: another run is writing to {tmp_path}; wait for it to end or choose a new --logdir"
    )
    codes = [proc.returncode for proc in procs]
    assert codes == [1, 1], outputs
    (out0, err0), (out1, err1) = outputs
    assert err0.count(message) == 1 and "Traceback" not in err0, err0  # said once, by rank 0
    assert message not in err1 and "Traceback" not in err1, err1
    assert out0 == out1 == ""  # nothing trained, nothing printed
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_a_ddp_rerun_into_a_used_logdir_is_refused(tmp_path: Path, monkeypatch) -> None:
    # digits_ddp.py does not resume: a second launch into the same --logdir used to train and
    # log steps 1, 2, ... again beside the first run's, two points at every step in TensorBoard
    # (char_lm.py and per_sample.py refuse this already).
    with TensorBoardWriter(str(tmp_path)) as writer:
        writer.write_scalars(1, {"train/loss": 1.0})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # one process: dist.init does nothing
    example = load_example("digits_ddp")
    monkeypatch.setattr(sys, "argv", ["digits_ddp.py", "--fast", "--logdir", str(tmp_path)])
    with pytest.raises(SystemExit) as err:
        example.main()
    assert str(err.value.code) == f"error: {tmp_path} already holds a run; choose a new --logdir"
    assert read_scalars(tmp_path)["."]["train/loss"] == ([1], [1.0])  # the old run, alone


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("per_sample", ["--noise-multiplier", "inf"]),
        ("digits_ddp", ["--dp", "--noise-multiplier", "inf"]),
    ],
)
def test_an_infinite_noise_multiplier_is_a_usage_error(name, argv, monkeypatch, capsys) -> None:
    # Passed the ">= 0" check and ended in the accountant's ValueError: a traceback.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    example = load_example(name)
    with pytest.raises(SystemExit) as err:
        if name == "digits_ddp":  # it reads sys.argv
            monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
            example.parse_args()
        else:
            example.parse_args(argv)
    assert err.value.code == 2
    assert "--noise-multiplier must be >= 0 and finite, got inf" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["directory", "missing parent"])
def test_a_bad_checkpoint_path_is_refused_before_training(where, tmp_path, monkeypatch, capsys):
    # Checked when the run ended: a directory or a missing parent lost the whole run's state.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path if where == "directory" else tmp_path / "nowhere" / "state.ckpt"
    example = load_example("digits_ddp")
    monkeypatch.setattr(sys, "argv", ["digits_ddp.py", "--fast", "--checkpoint", str(path)])
    with pytest.raises(SystemExit) as err:
        example.parse_args()
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "--checkpoint" in message
    assert ("is a directory" if where == "directory" else "not a writable directory") in message
