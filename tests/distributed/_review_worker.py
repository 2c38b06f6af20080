"""One rank of test_distributed_review.py's jobs (not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _review_worker.py OUT``.
Every rank runs every probe below and writes ``OUT/rank{r}.json``: per probe, the numbers the
test checks (or the error it raised). The references are single-process float64 runs of
``ft.make_train_step`` on the concatenation of all ranks' batches, computed on every rank.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

STEPS = 4


def gap(a, b, loose: bool = False) -> float:
    """Largest violation ratio of two pytrees (<= 1: close; inf on a shape mismatch), with
    rtol 1e-10 for float64 leaves and 2e-5 for others (float32 leaves round every update).

    ``loose``: 2e-5 for every leaf. A float32 parameter inside a float64 loss makes even a
    single process differ that much between 1 and 2 micro-batches (its updates round).
    """
    import functrain as ft

    worst = 0.0
    la, lb = ft.tree.leaves(a), ft.tree.leaves(b)
    if len(la) != len(lb):
        return float("inf")
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            strict = y.dtype == torch.float64 and not loose
            rtol, atol = (1e-10, 1e-13) if strict else (2e-5, 1e-7)
            err = (x.double() - y.double()).abs() / (atol + rtol * y.double().abs())
            worst = max(worst, float(err.nan_to_num(float("inf")).max()))
    return worst


def split(batch, sizes, rank):
    import functrain as ft

    start = sum(sizes[:rank])
    return ft.tree.map(lambda x: x[start : start + sizes[rank]], batch)


def run(step, state, batches):
    history = []
    for batch in batches:
        state, m = step(state, batch)
        history.append({k: float(v) for k, v in m.items()})
    return state, history


# -- probe: a rank whose LossSum count is zero (all padding) ----------------------------------


def token_params():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g, dtype=torch.float64), "b": torch.zeros(3).double()}


def token_batch(step: int, sizes: list[int]):
    g = torch.Generator().manual_seed(100 + step)
    n = sum(sizes)
    mask = torch.rand(n, 5, generator=g) < 0.7
    mask[sum(sizes[:-1]) :] = False  # the last rank's examples are all padding
    return {
        "x": torch.randn(n, 5, 4, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (n, 5), generator=g),
        "mask": mask,
    }


def token_loss(params, batch):
    import functrain as ft

    logits = batch["x"] @ params["w"] + params["b"]
    ce = F.cross_entropy(logits.reshape(-1, 3), batch["y"].reshape(-1), reduction="none")
    mask = batch["mask"].reshape(-1).to(ce.dtype)
    hits = (logits.argmax(-1).reshape(-1) == batch["y"].reshape(-1)).to(ce.dtype)
    return ft.LossOutput(
        ft.LossSum((ce * mask).sum(), mask.sum()),
        aux={"acc": ft.LossSum((hits * mask).sum(), mask.sum())},
    )


def probe_zero_token_rank(rank: int, world: int) -> dict:
    import functrain as ft
    from functrain import distributed as dist

    sizes = [3] * world
    batches = [token_batch(s, sizes) for s in range(STEPS)]
    tx = lambda: ft.chain(ft.clip_by_global_norm(0.3), ft.adamw(0.05))  # noqa: E731
    ref_step = ft.make_train_step(token_loss, tx())
    ref, ref_hist = run(ref_step, ft.TrainState.create(params=token_params(), tx=tx()), batches)
    out = {}
    for shard in (False, True):
        step = dist.make_data_parallel_train_step(token_loss, tx(), shard_optimizer=shard)
        state, hist = run(
            step, step.init_state(token_params()), [split(b, sizes, rank) for b in batches]
        )
        out[f"shard={shard}"] = {
            "params": gap(state.params, ref.params),
            "skipped": sum(h["skipped"] for h in hist),
            "loss": max(abs(h["loss"] - r["loss"]) for h, r in zip(hist, ref_hist)),
            "acc": max(abs(h["acc"] - r["acc"]) for h, r in zip(hist, ref_hist)),
        }
    return out


# -- probe: ZeRO-1 vs replicated vs one process, awkward parameters ---------------------------


def odd_params():
    g = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(5, 3, generator=g, dtype=torch.float64),  # 5 rows over 2 or 3 ranks
        "b": torch.randn(7, generator=g, dtype=torch.float64),
        "s": torch.tensor(0.7, dtype=torch.float64),  # 0-d: owned by rank 0
        "e": torch.zeros(0, 3, dtype=torch.float64),  # empty
        "one": torch.randn(1, 1, generator=g, dtype=torch.float64),  # smaller than the world
        "f32": torch.randn(2, 7, generator=g, dtype=torch.float32),  # another dtype
    }


def odd_batch(step: int, n: int):
    g = torch.Generator().manual_seed(200 + step)
    return {
        "x": torch.randn(n, 3, generator=g, dtype=torch.float64),
        "y": torch.randn(n, 7, generator=g, dtype=torch.float64),
    }


def odd_loss(params, batch):
    h = torch.tanh(batch["x"] @ params["w"].T) * params["s"]  # (n, 5)
    out = h @ torch.ones(5, 7, dtype=h.dtype) * 0.1 + params["b"] + params["one"].squeeze()
    out = out + batch["x"][:, :2] @ params["f32"].double()
    return ((out - batch["y"]) ** 2).mean() + params["e"].sum()


def odd_tx():
    import functrain as ft

    mask = lambda p: ft.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    return ft.chain(
        ft.clip_by_global_norm(0.2),
        ft.adamw(ft.cosine_decay_schedule(0.05, STEPS), weight_decay=0.1, mask=mask),
    )


def probe_zero_vs_replicated(rank: int, world: int) -> dict:
    import functrain as ft
    from functrain import distributed as dist

    sizes = {1: [6], 2: [5, 2], 3: [4, 1, 3]}[world]
    batches = [odd_batch(s, sum(sizes)) for s in range(STEPS)]
    ref_step = ft.make_train_step(odd_loss, odd_tx())
    ref, ref_hist = run(ref_step, ft.TrainState.create(params=odd_params(), tx=odd_tx()), batches)
    out: dict = {}
    finals = {}
    for shard in (False, True):
        step = dist.make_data_parallel_train_step(
            odd_loss, odd_tx(), shard_optimizer=shard, micro_batches=2 if rank == 0 else 1
        )
        state, hist = run(
            step, step.init_state(odd_params()), [split(b, sizes, rank) for b in batches]
        )
        finals[shard] = state
        full = step.full_state(state)
        out[f"shard={shard}"] = {
            "params": gap(state.params, ref.params, loose=True),
            "opt_state": gap(full.opt_state, ref.opt_state, loose=True),
            # float32 parameters enter the loss: relative 1e-7 differences are rounding
            "loss": max(abs(h["loss"] - r["loss"]) / r["loss"] for h, r in zip(hist, ref_hist)),
            "grad_norm": max(
                abs(h["grad_norm"] - r["grad_norm"]) / r["grad_norm"]
                for h, r in zip(hist, ref_hist)
            ),
            "metrics": hist,
        }
    out["shard_vs_plain"] = gap(finals[True].params, finals[False].params, loose=True)
    return out


# -- probe: a non-finite loss on one rank only ---------------------------------------------------


def probe_nonfinite_one_rank(rank: int, world: int) -> dict:
    import functrain as ft
    from functrain import distributed as dist

    out = {}
    for shard in (False, True):
        step = dist.make_data_parallel_train_step(odd_loss, odd_tx(), shard_optimizer=shard)
        state = step.init_state(odd_params())
        bad = odd_batch(0, 2)
        if rank == world - 1:
            bad["y"][0, 0] = float("nan")
        before = ft.tree.map(lambda x: x.clone(), state.params)
        state, m1 = step(state, bad)
        kept = gap(state.params, before)
        state, m2 = step(state, odd_batch(1, 2))
        out[f"shard={shard}"] = {
            "skipped": [int(m1["skipped"]), int(m2["skipped"])],
            "kept": kept,
            "final": [float(x.double().sum()) for x in ft.tree.leaves(state.params)],
        }
    return out


# -- probe: checkpoint of a sharded state, resumed --------------------------------------------


def probe_checkpoint(rank: int, world: int, out_dir: str) -> dict:
    import functrain as ft
    from functrain import distributed as dist

    batches = [odd_batch(s, 2 + rank) for s in range(STEPS)]
    step = dist.make_data_parallel_train_step(odd_loss, odd_tx(), shard_optimizer=True)
    straight, _ = run(step, step.init_state(odd_params()), batches)

    step = dist.make_data_parallel_train_step(odd_loss, odd_tx(), shard_optimizer=True)
    state, _ = run(step, step.init_state(odd_params()), batches[:2])
    full = step.full_state(state)
    path = os.path.join(out_dir, "state.safetensors")
    if dist.is_rank_zero():
        ft.checkpoint.save(path, full)
    dist.barrier()
    fresh = dist.make_data_parallel_train_step(odd_loss, odd_tx(), shard_optimizer=True)
    target = fresh.prepare(ft.TrainState.create(params=odd_params(), tx=odd_tx()))
    resumed = fresh.shard_state(ft.checkpoint.restore(path, target=target))
    resumed, _ = run(fresh, resumed, batches[2:])
    return {
        "params": gap(resumed.params, straight.params),
        "opt_state": gap(resumed.opt_state, straight.opt_state),
        "step": int(resumed.step),
    }


def probe_init_mismatch(rank: int, world: int) -> dict:
    """Rank 0's parameter is larger than the others': init_state must refuse on every rank."""
    import functrain as ft
    from functrain import distributed as dist

    step = dist.make_data_parallel_train_step(lambda p, b: (p["w"].sum() * b).mean(), ft.sgd(0.1))
    try:
        state = step.init_state({"w": torch.zeros(5 if rank == 0 else 4, 3), "b": torch.ones(3)})
    except dist.RankMismatchError as err:
        return {"error": "RankMismatchError", "message": str(err)}
    return {"error": None, "shape": list(state.params["w"].shape)}


PROBES = {
    "zero_token_rank": probe_zero_token_rank,
    "zero_vs_replicated": probe_zero_vs_replicated,
    "nonfinite_one_rank": probe_nonfinite_one_rank,
    "checkpoint": probe_checkpoint,
    "init_mismatch": probe_init_mismatch,  # last: before the fix it aborted rank 1
}


def main() -> None:
    out_dir = sys.argv[1]
    from functrain import distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init(backend="gloo", timeout=30)
    result: dict = {"rank": rank, "world": world}
    for name, probe in PROBES.items():
        try:
            args = (out_dir,) if name == "checkpoint" else ()
            result[name] = probe(rank, world, *args)
        except Exception:
            result[name] = {"error": traceback.format_exc()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)  # after every probe: a crash keeps the earlier results
    dist.shutdown()


if __name__ == "__main__":
    main()
