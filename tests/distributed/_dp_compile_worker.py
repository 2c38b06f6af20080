"""Worker of ``test_dp_compile.py``: one rank of a 2-rank gloo job on loopback.

Runs a ``compile=`` data-parallel step next to the eager data-parallel step and the
single-process step on the concatenated batch, counting compilations. Not collected by pytest.
"""

from __future__ import annotations

import gloo_jobs
import torch
from gloo_jobs import digest, gap, shares

import functrain as ft
from functrain import distributed as dist
from functrain import testing

FAST = {"backend": "aot_eager"}  # dynamo's guards decide recompiles, whatever the backend
SIZES = [3, 5]  # unequal shares: the ranks combine sums and counts
STEPS = 30
NAN_AT = 4  # a NaN on rank 1's share: every rank skips that step


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 6, generator=g, dtype=torch.float64),
        "v": torch.randn(6, generator=g, dtype=torch.float64),
    }


def loss_fn(p, batch):
    return (torch.tanh(batch["x"] @ p["w"]) @ p["v"] - batch["y"]).square().mean()


def global_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SIZES)
    out = {
        "x": torch.randn(n, 4, generator=g, dtype=torch.float64),
        "y": torch.randn(n, generator=g, dtype=torch.float64),
    }
    if step == NAN_AT:
        out["y"][-1] = float("nan")
    return out


def make_tx() -> ft.GradientTransformation:
    schedule = ft.warmup_cosine_decay_schedule(0.0, 0.05, 5, STEPS)
    return ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(schedule, weight_decay=0.1))


def matches(rank, group, out_dir) -> dict:
    kw = {"micro_batches": 2, "max_consecutive_skips": 3}
    compiled = dist.make_data_parallel_train_step(
        loss_fn, make_tx(), group=group, compile=FAST, **kw
    )
    eager = dist.make_data_parallel_train_step(loss_fn, make_tx(), group=group, **kw)
    single = ft.make_train_step(loss_fn, make_tx(), **kw)
    sc, se = compiled.init_state(params()), eager.init_state(params())
    ref = ft.TrainState.create(params=params(), tx=make_tx())
    out: dict = {"eager": 0.0, "single": 0.0, "metrics": 0.0, "skipped": []}
    with testing.count_compiles() as count:
        for s in range(STEPS):
            whole = global_batch(s)
            mine = shares(whole, SIZES, rank)
            sc, mc = compiled(sc, mine)
            se, me = eager(se, mine)
            ref, _ = single(ref, whole)
            out["skipped"].append(int(mc["skipped"]))
            out["eager"] = max(out["eager"], gap(sc.params, se.params))
            out["single"] = max(out["single"], gap(sc.params, ref.params))
            assert set(mc) == set(me), (sorted(mc), sorted(me))
            out["metrics"] = max(out["metrics"], gap(mc, me))
    out["opt_state"] = gap(sc.opt_state, ref.opt_state)
    out["compiles"], out["reasons"] = count.compiles, [str(r) for r in count.reasons]
    out["digest"] = digest(sc.params)
    return out


if __name__ == "__main__":
    gloo_jobs.run_probes({"matches": matches}, init_timeout=60, group_timeout=60)
