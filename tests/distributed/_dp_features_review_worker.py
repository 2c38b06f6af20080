"""Worker of ``test_dp_features_review.py``: one rank of a 2-rank gloo job on loopback.

Each probe runs a data-parallel step (DP-SGD, noise under ZeRO-1, grad_stats) on this rank's
share of a global batch next to the single-process step on the whole batch, and reports the
gaps and a hash of the parameters (the ranks must end bitwise equal). Not collected by pytest.
"""

from __future__ import annotations

import warnings

import gloo_jobs
import torch
from gloo_jobs import digest, gap, shares

import functrain as ft
from functrain import distributed as dist

C = 1.0
SHAPES = {"w": (4, 3), "v": (5,), "b": ()}


def params(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()
    }


def loss_fn(p, batch):
    x = batch["x"]
    pred = (x[:, :4] @ p["w"]).sum(1) + x @ p["v"] + p["b"]
    return (pred - batch["y"]).square().mean()


def global_batch(step: int, n: int, dtype: torch.dtype = torch.float64) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    x = 0.4 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    return {"x": x.to(dtype), "y": torch.randn(n, generator=g, dtype=torch.float64).to(dtype)}


def dp_tx() -> ft.GradientTransformation:
    return ft.chain(ft.dp_noisy_mean(C, 1.3, 8.0, 7), ft.sgd(0.5, momentum=0.9))


def noisy_tx() -> ft.GradientTransformation:
    return ft.noisy_sgd(0.1, eta=0.5, gamma=0.55, seed=3)


def compare(rank, group, make_tx, plan, *, nan_at=(), dtype=torch.float64, **kw) -> dict:
    """The data-parallel run vs the single-process run on the concatenated batches."""
    step = dist.make_data_parallel_train_step(loss_fn, make_tx(), group=group, **kw)
    local_kw = {k: v for k, v in kw.items() if k not in ("shard_optimizer", "bucket_cap_mb")}
    ref_step = ft.make_train_step(loss_fn, make_tx(), **local_kw)
    state = step.init_state(params(dtype))
    ref = ref_step.prepare(ft.TrainState.create(params=params(dtype), tx=make_tx()))
    out: dict = {"params": 0.0, "skipped": []}
    for s, sizes in enumerate(plan):
        whole = global_batch(s, sum(sizes), dtype)
        if s in nan_at:
            whole["y"][-1] = float("nan")  # on the last rank's share
        state, metrics = step(state, shares(whole, sizes, rank))
        ref, _ = ref_step(ref, whole)
        out["skipped"].append(bool(metrics["skipped"]))
        out["params"] = max(out["params"], gap(state.params, ref.params))
    full = step.full_state(state) if kw.get("shard_optimizer") else state
    out["opt_state"] = gap(full.opt_state, ref.opt_state)
    out["digest"] = digest(ft.tree.map(lambda x: x.double(), state.params))
    return out


def resume(rank, group, make_tx, **kw) -> dict:
    """Sharded: 2 steps, gather, re-shard in a new step object, 2 more; vs 4 uninterrupted."""
    plan = [[3, 5], [4, 2], [2, 6], [5, 1]]

    def make():
        return dist.make_data_parallel_train_step(
            loss_fn, make_tx(), group=group, shard_optimizer=True, **kw
        )

    a, b = make(), make()
    s_a = a.init_state(params())
    s_b = b.init_state(params())
    for s, sizes in enumerate(plan):
        batch = shares(global_batch(s, sum(sizes)), sizes, rank)
        s_a, _ = a(s_a, batch)
        if s == 1:
            saved = b.full_state(s_b)
            b = make()
            s_b = b.shard_state(saved)
        s_b, _ = b(s_b, batch)
    return {"params": gap(s_a.params, s_b.params), "digest": digest(s_b.params)}


def no_warning(rank, group, make_tx, plan, **kw) -> dict:
    """``compare`` with warnings as errors (a deprecated collective warns on torch >= 2.10)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return compare(rank, group, make_tx, plan, **kw)


def seeds_differ(rank, group, **kw) -> dict:
    """``noisy_sgd`` seeded with the rank: the first call must refuse it on every rank."""
    tx = ft.noisy_sgd(0.1, eta=0.5, gamma=0.55, seed=rank)
    step = dist.make_data_parallel_train_step(loss_fn, tx, group=group, **kw)
    state = step.init_state(params())
    try:
        state, _ = step(state, shares(global_batch(0, 6), [3, 3], rank))
    except dist.RankMismatchError as err:
        return {"refused": "noise key" in str(err)}
    # Old code: no error, and the replicas of the 0-d parameter part.
    return {"refused": False, "b": state.params["b"].item()}


UNEQUAL = [[3, 5], [4, 2], [2, 6]]
PROBES = {
    "grad_stats_no_warning": lambda r, g, o: no_warning(
        r, g, lambda: ft.sgd(0.1), UNEQUAL, grad_stats=ft.noise_scale_hook(), micro_batches=2
    ),
    "seeds_differ_zero": lambda r, g, o: seeds_differ(r, g, shard_optimizer=True),
    "seeds_differ": lambda r, g, o: seeds_differ(r, g),
    "dp_skip": lambda r, g, o: compare(r, g, dp_tx, UNEQUAL, nan_at=(1,), per_example_clip=C),
    "dp_skip_zero_tiny_bucket": lambda r, g, o: compare(
        r,
        g,
        dp_tx,
        UNEQUAL,
        nan_at=(1,),
        per_example_clip=C,
        shard_optimizer=True,
        bucket_cap_mb=1e-5,
        max_consecutive_skips=2,
    ),
    "noise_zero_no_donate": lambda r, g, o: compare(
        r, g, noisy_tx, UNEQUAL, shard_optimizer=True, donate=False, nan_at=(1,)
    ),
    "dp_bf16": lambda r, g, o: compare(
        r, g, dp_tx, UNEQUAL, per_example_clip=C, dtype=torch.bfloat16
    ),
    "resume_dp_zero": lambda r, g, o: resume(r, g, dp_tx, per_example_clip=C),
}


if __name__ == "__main__":
    gloo_jobs.run_probes(PROBES, init_timeout=30, group_timeout=20)
