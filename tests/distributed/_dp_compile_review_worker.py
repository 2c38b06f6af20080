"""Worker of ``test_dp_compile_review.py``: one rank of a 2-rank gloo job on loopback.

Runs ``compile=`` data-parallel steps beside the eager data-parallel step with the same options
(and the single-process step on the concatenated batch where the loss allows) for options the
first tests do not cover, counting compilations. Not collected by pytest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gloo_jobs
import torch
from gloo_jobs import gap, shares

import functrain as ft
from functrain import distributed as dist
from functrain import testing

FAST = {"backend": "aot_eager"}  # dynamo's guards decide recompiles, whatever the backend
SIZES = [3, 5]  # unequal shares


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 6, generator=g, dtype=torch.float64),
        "v": torch.randn(6, generator=g, dtype=torch.float64),
    }


def batch_at(step: int, n: int = sum(SIZES)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {
        "x": torch.randn(n, 4, generator=g, dtype=torch.float64),
        "y": torch.randn(n, generator=g, dtype=torch.float64),
    }


def mse(p, batch):
    return (torch.tanh(batch["x"] @ p["w"]) @ p["v"] - batch["y"]).square().mean()


def bn_loss(p, batch, buffers):
    """Batch norm in training mode: the batch's statistics, a new running mean as a buffer."""
    h = batch["x"] @ p["w"]
    mean = h.mean(0)
    err = (torch.tanh((h - mean) / (h.std(0) + 1.0)) @ p["v"] - batch["y"]).square().mean()
    new = {"running": 0.9 * buffers["running"] + 0.1 * mean.detach()}
    return ft.LossOutput(err, aux={"mse": err.detach()}, buffers=new)


def sum_loss(p, batch):
    """A masked per-token loss and a LossSum rate beside a mean aux metric."""
    mask = batch["mask"]
    per = (torch.tanh(batch["x"] @ p["w"]) @ p["v"] - batch["y"]).square()
    correct = ((per < 0.5).to(per.dtype) * mask).sum()
    return ft.LossOutput(
        ft.LossSum((per * mask).sum(), mask.sum()),
        aux={"rate": ft.LossSum(correct, mask.sum()), "mean_y": batch["y"].mean()},
    )


def drop_loss(p, batch, key):
    h = torch.nn.functional.dropout(torch.tanh(batch["x"] @ p["w"]), 0.3, training=True)
    return (h @ p["v"] - batch["y"]).square().mean() + 0.0 * key.double()


def with_buffers(step) -> ft.TrainState:
    return step.init_state(params(), buffers={"running": torch.zeros(6, dtype=torch.float64)})


def run_pair(
    rank: int,
    group: Any,
    loss_fn: Callable[..., Any],
    tx_fn: Callable[[], ft.GradientTransformation],
    kw: dict,
    batches: list[dict],
    make: Callable[[Any], ft.TrainState] = lambda step: step.init_state(params()),
    sizes: Callable[[int], list[int]] = lambda i: SIZES,
) -> tuple[dict, ft.TrainState]:
    """The compiled and the eager DP step over ``batches``: largest gaps, compilations."""
    c = dist.make_data_parallel_train_step(loss_fn, tx_fn(), group=group, compile=FAST, **kw)
    e = dist.make_data_parallel_train_step(loss_fn, tx_fn(), group=group, **kw)
    sc, se = make(c), make(e)
    out: dict = {"eager": 0.0, "metrics": 0.0, "same_keys": True, "skipped": []}
    with testing.count_compiles() as count:
        for i, whole in enumerate(batches):
            mine = shares(whole, sizes(i), rank)
            sc, mc = c(sc, mine)
            se, me = e(se, mine)
            pair = ((sc.params, sc.buffers, sc.opt_state), (se.params, se.buffers, se.opt_state))
            out["eager"] = max(out["eager"], gap(*pair))
            out["same_keys"] &= sorted(mc) == sorted(me)
            out["metrics"] = max(out["metrics"], gap(mc, me))
            out["skipped"].append(int(mc.get("skipped", 0)))
    out["compiles"], out["reasons"] = count.compiles, [str(r) for r in count.reasons]
    return out, sc


def buffers(rank, group, out_dir) -> dict:
    res = {}
    for sync in ("broadcast", "none"):
        batches = [batch_at(s) for s in range(6)]
        batches[3]["y"][-1] = float("nan")  # a skipped step keeps the old buffers
        res[sync], _ = run_pair(
            rank,
            group,
            bn_loss,
            lambda: ft.adam(0.05),
            {"sync_buffers": sync},
            batches,
            with_buffers,
        )
    return res


def loss_sum(rank, group, out_dir) -> dict:
    batches = []
    for s in range(5):
        b = batch_at(s)
        b["mask"] = torch.ones(8, dtype=torch.float64)
        b["mask"][: 2 + s % 2] = 0.0  # rank 0 holds one or no counted token: unequal counts
        b["mask"][5] = 0.0
        batches.append(b)
    out, sc = run_pair(rank, group, sum_loss, lambda: ft.adam(0.05), {}, batches)
    single = ft.make_train_step(sum_loss, ft.adam(0.05), compile=FAST)
    ref = ft.TrainState.create(params=params(), tx=ft.adam(0.05))
    for b in batches:
        ref, _ = single(ref, b)
    out["single"] = gap(sc.params, ref.params)
    return out


def options(rank, group, out_dir) -> dict:
    """vmap, no norms, no fusing, no donation; ``nonfinite="ignore"``; a loss scale."""
    res = {}
    kw = {"strategy": "vmap", "micro_batches": 2, "norm_metrics": False, "fused": False}
    res["vmap"], _ = run_pair(
        rank,
        group,
        mse,
        lambda: ft.adamw(0.05),
        {**kw, "donate": False},
        [batch_at(s) for s in range(4)],
    )
    batches = [batch_at(s) for s in range(4)]
    batches[1]["y"][-1] = float("nan")
    res["ignore"], _ = run_pair(
        rank, group, mse, lambda: ft.sgd(0.1), {"nonfinite": "ignore"}, batches
    )
    batches = [batch_at(s) for s in range(5)]
    batches[2]["x"][6, 0] = float("inf")  # only rank 1's share overflows
    kw = {"loss_scale": ft.DynamicLossScale(init_scale=2.0**8), "sync_buffers": "none"}
    res["scale"], _ = run_pair(
        rank, group, bn_loss, lambda: ft.adam(0.05), kw, batches, with_buffers
    )
    return res


def dropout(rank, group, out_dir) -> dict:
    """Seeded from the state's key: equal to eager (one micro-batch) and reproducible."""
    finals = []
    for run in range(2):
        torch.manual_seed(run)  # the global generator's own state must not matter
        out, sc = run_pair(
            rank, group, drop_loss, lambda: ft.sgd(0.1), {}, [batch_at(s) for s in range(3)]
        )
        finals.append(sc.params)
    out["repro"] = gap(finals[0], finals[1])
    return out


def shapes(rank, group, out_dir) -> dict:
    """An empty share at step 2 (rank 0), then a new shape from step 4."""

    def sizes(i: int) -> list[int]:
        return [0, 8] if i == 2 else [4, 6] if i >= 4 else SIZES

    batches = [batch_at(i, sum(sizes(i))) for i in range(6)]
    out, _ = run_pair(rank, group, mse, lambda: ft.adam(0.05), {}, batches, sizes=sizes)
    return out


def check_ranks(rank, group, out_dir) -> dict:
    res = {}
    for name, comp in (("eager", False), ("compiled", FAST)):
        step = dist.make_data_parallel_train_step(mse, ft.sgd(0.1), group=group, compile=comp)
        state = step.init_state(params())
        if rank == 1:
            state = state.replace(params={"w": state.params["w"] + 1.0, "v": state.params["v"]})
        try:
            step(state, shares(batch_at(0), SIZES, rank))
            res[name] = None
        except Exception as err:
            res[name] = type(err).__name__
    return res


if __name__ == "__main__":
    gloo_jobs.run_probes(
        {
            "buffers": buffers,
            "loss_sum": loss_sum,
            "options": options,
            "dropout": dropout,
            "shapes": shapes,
            "check_ranks": check_ranks,
        },
        init_timeout=60,
        group_timeout=60,
    )
