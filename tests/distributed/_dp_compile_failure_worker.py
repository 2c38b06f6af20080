"""Worker of ``test_dp_compile_failure.py``: one rank of a 2-rank gloo job on loopback.

Rank 1's compiled regions fail while rank 0's succeed: a compiler backend that raises (the
first call's gradient region), a batch shape that dynamo cannot trace on a later call (a new
shape on rank 1 only), and an update region whose first run raises. Each probe records what
every rank raised, how long the call took and whether the ranks are still in step afterwards
(one all-reduce); one probe counts the collectives of a compiled and of an eager step.
``GROUP_TIMEOUT`` is longer than the test's job timeout: a rank left waiting in a collective
fails the test instead of timing out on its own. Not collected by pytest.
"""

from __future__ import annotations

from typing import Any

import gloo_jobs
import torch
from gloo_jobs import digest, gap, shares

import functrain as ft
from functrain import distributed as dist

FAST = {"backend": "aot_eager"}
SIZES = [3, 4]
BAD_ROWS = 5  # a share of this many rows cannot be traced (see shape_sensitive_loss)
GROUP_TIMEOUT = 300
NO_COMPILER = "no C++ compiler found (simulated on rank 1)"
UPDATE_OOM = "out of memory in the compiled update (simulated on rank 1)"


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 6, generator=g, dtype=torch.float64),
        "v": torch.randn(6, generator=g, dtype=torch.float64),
    }


def batch_at(step: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {
        "x": torch.randn(n, 4, generator=g, dtype=torch.float64),
        "y": torch.randn(n, generator=g, dtype=torch.float64),
    }


def loss_fn(p: Any, b: Any) -> torch.Tensor:
    return (torch.tanh(b["x"] @ p["w"]) @ p["v"] - b["y"]).square().mean()


def shape_sensitive_loss(p: Any, b: Any) -> torch.Tensor:
    if b["x"].shape[0] == BAD_ROWS:  # fine eagerly; under fullgraph=True, dynamo refuses it
        torch._dynamo.graph_break()
    return loss_fn(p, b)


def broken_backend(gm: Any, example_inputs: Any) -> Any:
    raise RuntimeError(NO_COMPILER)


def make(loss: Any, group: Any, compile: Any) -> dist.DataParallelTrainStep:
    return dist.make_data_parallel_train_step(loss, ft.adam(0.05), group=group, compile=compile)


def first_call(rank: int, group: Any, out_dir: str) -> dict:
    """Rank 1 has no working compiler: its first call's gradient region fails to compile."""
    step = make(loss_fn, group, {"backend": broken_backend} if rank == 1 else FAST)
    state = step.init_state(params())
    out = gloo_jobs.attempt(step, state, shares(batch_at(0, sum(SIZES)), SIZES, rank))
    out["in_step"] = gloo_jobs.in_step(group, rank)
    return out


def later_shape(rank: int, group: Any, out_dir: str) -> dict:
    """Step 2 gives rank 1 a share dynamo cannot trace (a recompilation on rank 1 only); the
    ranks then go on, and end where an eager step that never saw step 2's batch ends."""
    compiled = make(shape_sensitive_loss, group, FAST)
    eager = make(shape_sensitive_loss, group, False)
    sc, se = compiled.init_state(params()), eager.init_state(params())
    out: dict = {}
    for s, sizes in enumerate([SIZES, SIZES, [SIZES[0], BAD_ROWS], SIZES]):
        mine = shares(batch_at(s, sum(sizes)), sizes, rank)
        if s == 2:
            out["failure"] = gloo_jobs.attempt(compiled, sc, mine)
            out["in_step"] = gloo_jobs.in_step(group, rank)
            continue
        sc, _ = compiled(sc, mine)
        se, _ = eager(se, mine)
    out["eager"] = gap(sc.params, se.params)
    out["digest"] = digest(sc.params)
    return out


def update_first(rank: int, group: Any, out_dir: str) -> dict:
    """Rank 1's update region raises on its first run (after the collectives); a second call
    with a working update region then steps both ranks from the untouched state."""
    compiled = make(loss_fn, group, FAST)
    eager = make(loss_fn, group, False)
    update = compiled._compiled_update
    assert update is not None
    working = update.fn
    if rank == 1:

        def fail(*args: Any) -> Any:
            raise RuntimeError(UPDATE_OOM)

        update.fn = fail
    state, ref = compiled.init_state(params()), eager.init_state(params())
    mine = shares(batch_at(0, sum(SIZES)), SIZES, rank)
    out = gloo_jobs.attempt(compiled, state, mine)
    out["in_step"] = gloo_jobs.in_step(group, rank)
    update.fn = working
    state, _ = compiled(state, mine)  # donate=True: would raise if the failed call consumed it
    ref, _ = eager(ref, mine)
    out["eager"] = gap(state.params, ref.params)
    out["digest"] = digest(state.params)
    return out


def collectives(rank: int, group: Any, out_dir: str) -> dict:
    """The collectives of four calls of a compiled and of an eager step (same batches)."""
    out: dict = {}
    for name, compile in (("compiled", FAST), ("eager", False)):
        step = make(loss_fn, group, compile)
        state = step.init_state(params())
        per_call = []
        for s in range(4):
            with gloo_jobs.counting() as calls:
                state, _ = step(state, shares(batch_at(s, sum(SIZES)), SIZES, rank))
            per_call.append(calls)
        out[name] = per_call
    return out


if __name__ == "__main__":
    gloo_jobs.run_probes(
        {
            "collectives": collectives,
            "first_call": first_call,
            "later_shape": later_shape,
            "update_first": update_first,
        },
        init_timeout=60,
        group_timeout=GROUP_TIMEOUT,
    )
