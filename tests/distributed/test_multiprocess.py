"""Real multi-process runs on CPU (gloo over loopback): 2 and 3 ranks, and the torchrun example.

Processes are expensive, so each job checks many things at once (see ``_worker.py``):
data-parallel steps, plain and sharded, against a single process on the concatenated batch;
the gathered optimizer state; the sharded state's memory; rank keys; buffer broadcast; the
ranks-disagree check; and a fault (a rank that hangs, or kills itself) that the other ranks
must report with a clear error within the timeout, their state untouched.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gloo_jobs
import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
FAULT_TIMEOUT = 3.0  # as in _worker.py


def _finish_job(procs: list[subprocess.Popen], out: Path) -> list[tuple[int, str, dict]]:
    results = []
    for data in gloo_jobs.finish(procs, out, timeout=240):
        code, err = data.pop("exit"), data.pop("stderr")
        results.append((code, err, data))
    return results


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[tuple[int, str, dict]]]:
    """The 2-rank job (a rank hangs) and the 3-rank job (a rank is killed), run side by side."""
    out = {world: tmp_path_factory.mktemp(f"world{world}") for world in (2, 3)}
    started = {
        world: gloo_jobs.start("_worker.py", world, [fault, str(out[world])])
        for world, fault in ((2, "hang"), (3, "kill"))
    }
    try:
        return {world: _finish_job(procs, out[world]) for world, procs in started.items()}
    finally:
        gloo_jobs.kill_all(started.values())


def _results(jobs: dict, world: int) -> list[tuple[int, str, dict]]:
    results = jobs[world]
    for rank, (code, err, data) in enumerate(results):
        assert data, f"rank {rank} wrote no results (exit code {code}):\n{err[-3000:]}"
    return results


def _check_numbers(results: list[tuple[int, str, dict]], world: int) -> None:
    for code, err, data in results:
        rank = data["rank"]
        for mode in ("plain", "sharded"):
            # Violation ratios against rtol=1e-9, atol=1e-11 (float64): <= 1 means close.
            assert data[f"{mode}_params"] <= 1, (rank, mode, data)
            assert data[f"{mode}_metrics"] <= 1, (rank, mode, data)
            assert data[f"{mode}_opt_state"] <= 1, (rank, mode, data)
            assert {"loss", "num_tokens", "acc", "x_mean", "grad_norm", "lr"} <= set(
                data[f"{mode}_metric_keys"]
            )
        assert data["reshard"] == 0, rank
        assert data["rank_keys_distinct"]
        assert data["buffer"] == 2.0  # rank 0's buffer (it saw 2 examples) everywhere
        for shard in (False, True):
            skipped, kept, loss = data[f"nonfinite_{shard}"]
            assert (skipped, kept) == (1, True), (rank, shard, data[f"nonfinite_{shard}"])
            assert loss == loss  # the loss itself was finite: only a gradient element was NaN
        assert "parameter values (checksums): rank 1 differs" in data["mismatch"]
    memory = [data["memory"] for _, _, data in results]
    whole = memory[0]["whole"]
    shares = [m["sharded"] / whole for m in memory]
    print(
        f"\noptimizer state per rank, world {world}: {[m['sharded'] for m in memory]} bytes "
        f"of {whole} unsharded: {[round(s, 3) for s in shares]} (1/world = {1 / world:.3f})"
    )
    assert max(shares) <= 1.05 / world
    assert sum(m["sharded"] for m in memory) <= whole + 64 * world  # replicated counters only


def _check_fault(data: dict, err: str) -> None:
    assert data["fault_state_intact"], data
    assert "failed" in data["fault"] and "resume from the last checkpoint" in data["fault"]
    assert data["fault_seconds"] < FAULT_TIMEOUT + 4, data["fault_seconds"]
    assert "DistributedStepError" in err or "rank " in err


def test_two_ranks_match_one_process_and_a_hanging_rank_times_out(jobs):
    results = _results(jobs, 2)
    _check_numbers(results, 2)
    code, err, data = results[0]
    assert code == 3, err[-3000:]  # the worker's exit code after reporting the fault
    _check_fault(data, err)
    assert f"longer than {FAULT_TIMEOUT:g} s" in data["fault"]
    assert data["fault_seconds"] >= FAULT_TIMEOUT - 0.5  # it did wait for the timeout


def test_three_ranks_match_one_process_and_a_killed_rank_stops_the_others(jobs):
    results = _results(jobs, 3)
    _check_numbers(results, 3)
    assert results[2][0] == -9  # SIGKILL
    for code, err, data in results[:2]:
        assert code == 3, err[-3000:]
        _check_fault(data, err)


def test_torchrun_example_runs_and_learns(tmp_path: Path):
    checkpoint = tmp_path / "state.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={gloo_jobs.free_port()}",
        str(ROOT / "examples" / "digits_ddp.py"),
        "--fast",
        "--checkpoint",
        str(checkpoint),
    ]
    proc = subprocess.run(
        cmd, env=gloo_jobs.base_env(), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = re.search(r"final: first_loss=([\d.]+) last_loss=([\d.]+)", proc.stdout)
    assert final, proc.stdout
    first, last = float(final.group(1)), float(final.group(2))
    assert last < first - 0.3, proc.stdout
    assert "0.50 of it" in proc.stdout  # the sharded optimizer state is half per rank
    assert proc.stdout.count("final:") == 1  # only rank 0 prints
    assert checkpoint.exists()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="lists threads from /proc")
def test_shutdown_releases_the_process_group(tmp_path: Path):
    """``dist.shutdown`` must stop gloo's threads. When ``torch._dynamo`` was first imported after
    the group existed (``torch.func.grad`` imports it), torch kept the group alive; its threads
    outlived the interpreter and sometimes aborted the process on exit (a flaky CI failure)."""
    procs = gloo_jobs.start("_shutdown_worker.py", 2, [str(tmp_path)])
    for rank, (code, err, data) in enumerate(_finish_job(procs, tmp_path)):
        assert code == 0 and data, (rank, code, err[-3000:])
        assert any("gloo" in name for name in data["during"]), data  # the probe sees them
        assert not [name for name in data["after"] if "gloo" in name], (rank, data)
