"""Worker of ``test_uneven_batches.py``: one rank of a 2-rank gloo job on loopback.

Each probe runs the ordinary data-parallel step with an empty batch on some rank in some
steps (or a batch the split refuses) next to the single-process step on the concatenation of
the ranks' batches, and reports the gaps, what each rank raised and how long it took. Not
collected by pytest.
"""

from __future__ import annotations

import time

import gloo_jobs
import torch
from gloo_jobs import digest, gap, shares

import functrain as ft
from functrain import distributed as dist

SHAPES = {"w": (4, 3), "v": (5,), "b": ()}
PLAN = [[0, 5], [3, 4], [4, 0], [2, 3]]  # an empty rank in steps 1 and 3


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def predict(p, x):
    return (x[:, :4] @ p["w"]).sum(1) + x @ p["v"] + p["b"]


def mean_loss(p, batch, buffers):
    """A mean loss with a mean aux metric and a buffer (an average of the inputs)."""
    err = predict(p, batch["x"]) - batch["y"]
    ema = {"ema": 0.5 * buffers["ema"] + 0.5 * batch["x"].mean(0)}
    return ft.LossOutput(err.square().mean(), aux={"abs": err.abs().mean()}, buffers=ema)


def sum_loss(p, batch):
    """A LossSum loss over the masked examples, with a LossSum aux metric."""
    m = batch["m"]
    err = predict(p, batch["x"]) - batch["y"]
    hit = ft.LossSum(((err.abs() < 1).double() * m).sum(), m.sum())
    return ft.LossOutput(ft.LossSum((err.square() * m).sum(), m.sum()), aux={"hit": hit})


def global_batch(step: int, n: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    x = 0.4 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    m = (torch.rand(n, generator=g) < 0.7).double()
    return {"x": x, "y": y, "m": m}


def compare(rank, group, loss_fn, *, buffers=None, nan_at=(), plan=PLAN, **kw) -> dict:
    """The data-parallel run vs the single-process run on the concatenated batches."""
    step = dist.make_data_parallel_train_step(loss_fn, ft.adam(0.05), group=group, **kw)
    drop = ("shard_optimizer", "bucket_cap_mb", "sync_buffers")
    ref_step = ft.make_train_step(
        loss_fn, ft.adam(0.05), **{k: v for k, v in kw.items() if k not in drop}
    )
    state = step.init_state(params(), buffers=buffers)
    ref = ref_step.prepare(ft.TrainState.create(params=params(), tx=ft.adam(0.05)))
    out: dict = {"params": 0.0, "metrics": 0.0, "skipped": [], "ref_skipped": []}
    out["kept_buffers"] = []
    for s, sizes in enumerate(plan):
        whole = global_batch(s, sum(sizes))
        if s in nan_at:
            whole["y"][0] = float("nan")
        mine = shares(whole, sizes, rank)
        before = None if buffers is None else state.buffers["ema"].clone()
        state, metrics = step(state, mine)
        # The loss reads no buffer: the reference only needs some to update.
        ref_in = ref if buffers is None else ref.replace(buffers=state.buffers)
        ref, ref_metrics = ref_step(ref_in, whole)
        out["skipped"].append(bool(metrics.get("skipped", False)))
        out["ref_skipped"].append(bool(ref_metrics.get("skipped", False)))
        out["params"] = max(out["params"], gap(state.params, ref.params))
        for name in ("loss", "num_examples", "num_tokens", "abs", "hit"):
            if name in ref_metrics:
                out["metrics"] = max(out["metrics"], gap(metrics[name], ref_metrics[name]))
        if before is not None:
            out["kept_buffers"].append(bool(torch.equal(before, state.buffers["ema"])))
    full = step.full_state(state) if kw.get("shard_optimizer") else state
    out["opt_state"] = gap(full.opt_state, ref.opt_state)
    out["digest"] = digest(state.params)
    return out


def buffers0() -> dict:
    return {"ema": torch.zeros(5, dtype=torch.float64)}


def raised(fn) -> dict:
    """What ``fn()`` raised (type name, message) and how long it took."""
    start = time.monotonic()
    try:
        fn()
    except Exception as err:
        return {"type": type(err).__name__, "msg": str(err), "s": time.monotonic() - start}
    return {"type": None, "msg": "", "s": time.monotonic() - start}


def refusal(rank, group, bad_batch, *, donate=True, **kw) -> dict:
    """Rank 1 gives ``bad_batch(whole_share)``; then a good step on the same state."""
    step = dist.make_data_parallel_train_step(
        sum_loss, ft.adam(0.05), group=group, donate=donate, **kw
    )
    ref_step = ft.make_train_step(
        sum_loss, ft.adam(0.05), **{k: v for k, v in kw.items() if k != "shard_optimizer"}
    )
    state = step.init_state(params())
    before = digest(state.params)
    whole = global_batch(0, 6)
    mine = shares(whole, [4, 2], rank)
    if rank == 1:
        mine = bad_batch(mine)
    out = raised(lambda: step(state, mine))
    out["untouched"] = digest(state.params) == before
    good = global_batch(1, 5)
    state, _ = step(state, shares(good, [2, 3], rank))  # the state is still usable
    ref, _ = ref_step(ft.TrainState.create(params=params(), tx=ft.adam(0.05)), good)
    out["after"] = gap(state.params, ref.params)
    return out


def all_empty(rank, group, out_dir, **kw) -> dict:
    step = dist.make_data_parallel_train_step(sum_loss, ft.adam(0.05), group=group, **kw)
    state = step.init_state(params())
    before = digest(state.params)
    out = raised(lambda: step(state, shares(global_batch(0, 0), [0, 0], rank)))
    out["untouched"] = digest(state.params) == before
    state, metrics = step(state, shares(global_batch(1, 4), [2, 2], rank))
    out["num_examples"] = int(metrics["num_examples"])
    return out


def grad_stats_empty(rank, group, out_dir) -> dict:
    step = dist.make_data_parallel_train_step(
        sum_loss, ft.adam(0.05), group=group, grad_stats=ft.noise_scale_hook(), micro_batches=2
    )
    state = step.init_state(params())
    before = digest(state.params)
    out = raised(lambda: step(state, shares(global_batch(0, 4), [4, 0], rank)))
    out["untouched"] = digest(state.params) == before
    return out


def refused_dp(rank, group, out_dir) -> dict:
    """A DP-SGD step (its own split: small and empty batches are taken) with rank 1's batch
    ragged: every rank raises promptly, the state untouched."""

    def dp_loss(p, batch):
        return (predict(p, batch["x"]) - batch["y"]).square().mean()

    tx = ft.chain(ft.dp_noisy_mean(1.0, 0.5, 6.0, 0), ft.sgd(0.1))
    step = dist.make_data_parallel_train_step(dp_loss, tx, group=group, per_example_clip=1.0)
    state = step.init_state(params())
    before = digest(state.params)
    mine = shares(global_batch(0, 6), [4, 2], rank)
    out = raised(lambda: step(state, ragged(mine) if rank == 1 else mine))
    out["untouched"] = digest(state.params) == before
    return out


def few(batch: dict) -> dict:
    return {k: v[:1] for k, v in batch.items()}


def ragged(batch: dict) -> dict:
    return {**batch, "m": batch["m"][:1]}


PROBES = {
    "mean": lambda r, g, o: compare(r, g, mean_loss, buffers=buffers0(), sync_buffers="none"),
    "mean_broadcast": lambda r, g, o: compare(r, g, mean_loss, buffers=buffers0()),
    "mean_k2": lambda r, g, o: compare(r, g, mean_loss, buffers=buffers0(), micro_batches=2),
    "sum": lambda r, g, o: compare(r, g, sum_loss),
    "sum_k2_sharded": lambda r, g, o: compare(
        r, g, sum_loss, micro_batches=2, shard_optimizer=True, bucket_cap_mb=1e-4
    ),
    "sum_skip": lambda r, g, o: compare(
        r,
        g,
        sum_loss,
        nan_at=(1, 2),
        plan=[[0, 5], [3, 0], [0, 4], [2, 3]],
        nonfinite="skip",
        max_consecutive_skips=3,
    ),
    "all_empty": all_empty,
    "all_empty_sharded": lambda r, g, o: all_empty(r, g, o, shard_optimizer=True),
    "refused_few": lambda r, g, o: refusal(r, g, few, micro_batches=2),
    "refused_ragged": lambda r, g, o: refusal(r, g, ragged),
    "refused_sharded": lambda r, g, o: refusal(r, g, few, micro_batches=2, shard_optimizer=True),
    "grad_stats_empty": grad_stats_empty,
    "refused_dp": refused_dp,
}

if __name__ == "__main__":
    gloo_jobs.run_probes(PROBES, init_timeout=30, group_timeout=60)
