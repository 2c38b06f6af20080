"""examples/digits_ddp.py takes the examples' logdir lock: a second launch into a --logdir that
a running launch writes is refused before it trains, as digits.py and the others are. Without
it both ran, their rank 0s writing two event files of the same steps into one run directory,
which TensorBoard shows as one run with every curve interleaved."""

from __future__ import annotations

import sys

import pytest
from example_files import load_example


def test_a_launch_into_a_busy_logdir_is_refused(tmp_path, monkeypatch):
    # The test holds the lock a running launch's rank 0 would hold (as test_first_user does).
    fcntl = pytest.importorskip("fcntl")  # no lock (and nothing to test) on Windows
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # one process: dist.init does nothing
    example = load_example("digits_ddp")
    monkeypatch.setattr(sys, "argv", ["digits_ddp.py", "--fast", "--logdir", str(tmp_path)])
    with open(tmp_path / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as err:
            example.main()
    assert str(err.value.code) == (
        f"error: another run is writing to {tmp_path}; wait for it to end or choose a new --logdir"
    )
    assert not list(tmp_path.rglob("events.out.tfevents.*"))  # the old code: trained, wrote
