"""Launching multi-process jobs on CPU for the distributed tests: gloo over loopback.

Each worker script gets the environment ``torchrun`` would give it, writes its results to
``<out>/rank<r>.json`` and exits; :func:`finish` collects them with each rank's exit code and
stderr, killing a rank that outlives the timeout (a deadlock must fail the tests, not hang them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    """This process's environment without its own rank variables, gloo on loopback."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return env


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment ``torchrun`` gives rank ``rank`` of ``world``, on loopback."""
    return dict(
        base_env(),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def start(script: str, world: int, args: Sequence[str]) -> list[subprocess.Popen]:
    """Starts ``world`` ranks of ``tests/distributed/<script> <args...>``."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(HERE / script), *args],
            env=rank_env(rank, world, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]


def finish(procs: list[subprocess.Popen], out: Path, timeout: float) -> list[dict]:
    """Each rank's ``rank<r>.json`` (``{}`` if it wrote none) with ``exit`` and ``stderr`` added."""
    results = []
    for rank, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        path = out / f"rank{rank}.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data["exit"], data["stderr"] = proc.returncode, err
        results.append(data)
    return results


def kill_all(jobs: Iterable[list[subprocess.Popen]]) -> None:
    """Kills whatever is still running (after a failure part-way through collecting)."""
    for procs in jobs:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_probes(probes: dict, *, init_timeout: float, group_timeout: float) -> None:
    """A worker's ``main``: runs each ``probe(rank, group, out_dir)`` in a fresh gloo group and
    writes ``<out>/rank<r>.json`` after every probe, so a crash keeps the earlier results."""
    import datetime
    import traceback

    import torch.distributed as tdist

    from functrain import distributed as dist

    out_dir = sys.argv[1]
    rank = int(os.environ["RANK"])
    dist.init(backend="gloo", timeout=init_timeout)
    result: dict = {}
    for name, probe in probes.items():
        group = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=group_timeout))
        try:
            result[name] = probe(rank, group, out_dir)
        except Exception:
            result[name] = {"error": traceback.format_exc()[-3000:]}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    dist.shutdown()


def run_worker(run: Any, *, init_timeout: float = 15) -> None:
    """A worker's ``main``: ``run(rank)`` (or ``run(rank, out_dir)``) in the default gloo group,
    its result (or the traceback of its failure) written to ``<out>/rank<r>.json``."""
    import inspect
    import traceback

    from functrain import distributed as dist

    out_dir = sys.argv[1]
    rank = int(os.environ["RANK"])
    dist.init(backend="gloo", timeout=init_timeout)
    try:
        wants_dir = len(inspect.signature(run).parameters) > 1
        result = run(rank, out_dir) if wants_dir else run(rank)
    except Exception:
        result = {"error": traceback.format_exc()[-3000:]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.shutdown()


def run_job(script: str, world: int, out: Path, timeout: float = 120) -> list[dict]:
    """Starts ``world`` ranks of ``script``, waits for them and returns :func:`finish`'s results
    (killing any rank left running on the way out); prints the job's wall time."""
    start_time = time.monotonic()
    procs = start(script, world, [str(out)])
    try:
        results = finish(procs, out, timeout=timeout)
    finally:
        kill_all([procs])
    print(f"gloo job {script}: {time.monotonic() - start_time:.1f} s")
    return results


def gap(a: Any, b: Any) -> float:
    """Largest absolute difference between two pytrees of tensors (inf on a shape mismatch)."""
    import torch

    import functrain as ft

    out = 0.0
    for x, y in zip(ft.tree.leaves(a), ft.tree.leaves(b), strict=True):
        x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
        if x.shape != y.shape:
            return float("inf")
        out = max(out, (x - y).abs().max().item() if x.numel() else 0.0)
    return out


def digest(tree: Any) -> str:
    """A hash of a pytree's bytes: equal on two ranks only if the values are bitwise equal."""
    import functrain as ft

    h = hashlib.sha256()
    for leaf in ft.tree.leaves(tree):
        h.update(leaf.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def probe_results(job: list[dict], name: str) -> list[dict]:
    """Every rank's results of probe ``name``; fails naming the rank (its exit code and the end
    of its stderr) that has none, or whose probe recorded an ``error``."""
    found = []
    for rank, data in enumerate(job):
        assert name in data, (rank, data.get("exit"), data.get("stderr", "")[-3000:])
        assert "error" not in data[name], (rank, data[name]["error"])
        found.append(data[name])
    return found


def shares(batch: dict, sizes: list[int], rank: int) -> dict:
    """``rank``'s contiguous rows of a global ``batch`` cut into pieces of ``sizes``."""
    lo = sum(sizes[:rank])
    return {k: v[lo : lo + sizes[rank]] for k, v in batch.items()}


_COLLECTIVES = (
    "all_reduce",
    "all_gather_object",
    "broadcast",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather",
    "broadcast_object_list",
    "barrier",
)


@contextlib.contextmanager
def counting() -> Iterator[list[str]]:
    """The names of the ``torch.distributed`` collectives called inside, in order."""
    calls: list[str] = []
    saved = {name: getattr(_dist(), name) for name in _COLLECTIVES}

    def counted(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return saved[name](*args, **kwargs)

        return call

    for name in _COLLECTIVES:
        setattr(_dist(), name, counted(name))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(_dist(), name, fn)


def _dist() -> Any:
    import torch.distributed  # in the workers only: the launcher needs no torch

    return torch.distributed


def attempt(step: Any, state: Any, batch: Any) -> dict:
    """What ``step(state, batch)`` raised (type, message, notes) and how long it took."""
    start = time.monotonic()
    try:
        step(state, batch)
        out: dict = {"raised": None}
    except Exception as err:
        out = {
            "raised": {
                "type": f"{type(err).__module__}.{type(err).__qualname__}",
                "message": str(err),
                "notes": list(getattr(err, "__notes__", [])),
            }
        }
    out["seconds"] = time.monotonic() - start
    return out


def in_step(group: Any, rank: int) -> float:
    """One all-reduce of ``rank + 1``: 3 on both ranks when no collective was left behind."""
    import torch  # in the workers only

    t = torch.tensor([float(rank + 1)])
    _dist().all_reduce(t, group=group)
    return float(t)
