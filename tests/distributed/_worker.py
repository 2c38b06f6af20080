"""One rank of the multi-process tests (run by test_multiprocess.py, not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _worker.py FAULT OUT_DIR``
with ``FAULT`` one of ``hang`` / ``kill``. Every rank writes ``OUT_DIR/rank{r}.json``.

Checks, all in float64 with unequal per-rank batch sizes and token counts:

1. the plain and the sharded data-parallel steps, 20 steps, against ``ft.make_train_step`` on
   the concatenated batch (computed independently on every rank: no waiting);
2. the whole optimizer state gathered from the shards against the single-process one;
3. optimizer-state memory per rank of a larger model, sharded vs whole;
4. rank keys, buffer broadcast, the ranks-disagree check;
5. the fault: the last rank hangs (``hang``) or kills itself (``kill``) and the others must
   raise ``DistributedStepError`` within the short timeout of a fresh group, state untouched.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

STEPS = 20
FAULT_TIMEOUT = 3.0
SIZES = {2: [5, 9], 3: [4, 7, 2]}


def make_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb": torch.randn(7, 5, generator=g, dtype=torch.float64) * 0.5,
        "b1": torch.zeros(7, dtype=torch.float64),
        "scale": torch.tensor(1.0, dtype=torch.float64),
        "head": torch.randn(3, 7, generator=g, dtype=torch.float64) * 0.5,
        "row": torch.zeros(1, 3, dtype=torch.float64),
    }


def global_batch(step: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    t = 6
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    return {
        "x": torch.randn(n, t, 5, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (n, t), generator=g),
        "mask": torch.arange(t)[None, :] < lengths[:, None],
    }


def loss_fn(params, batch):
    import functrain as ft

    h = torch.tanh(batch["x"] @ params["emb"].T + params["b1"]) * params["scale"]
    logits = h @ params["head"].T + params["row"]
    ce = F.cross_entropy(logits.reshape(-1, 3), batch["y"].reshape(-1), reduction="none")
    mask = batch["mask"].reshape(-1).to(ce.dtype)
    correct = (logits.argmax(-1).reshape(-1) == batch["y"].reshape(-1)).to(ce.dtype)
    tokens = mask.sum()
    return ft.LossOutput(
        ft.LossSum((ce * mask).sum(), tokens),
        aux={"acc": ft.LossSum((correct * mask).sum(), tokens), "x_mean": batch["x"].mean()},
    )


def make_tx():
    import functrain as ft

    decay_mask = lambda p: ft.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    return ft.chain(
        ft.clip_by_global_norm(0.5),  # small: clipping is active
        ft.scale_by_adam(),
        ft.masked(ft.add_decayed_weights(0.05), decay_mask),
        ft.inject_hyperparams(ft.scale_by_learning_rate)(
            learning_rate=ft.linear_schedule(0.05, 0.01, STEPS)
        ),
    )


def close(a, b, rtol=1e-9, atol=1e-11) -> float:
    """Largest violation ratio (<= 1 means close); comparing pytrees leaf by leaf."""
    import functrain as ft

    worst = 0.0
    for x, y in zip(ft.tree.leaves(a), ft.tree.leaves(b)):
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            err = (x.double() - y.double()).abs() / (atol + rtol * y.double().abs())
            worst = max(worst, float(err.max()))
    return worst


def reference(n_global: int):
    import functrain as ft

    tx = make_tx()
    step = ft.make_train_step(loss_fn, tx, micro_batches=3)
    state = ft.TrainState.create(params=make_params(), tx=tx)
    history = []
    for s in range(STEPS):
        state, m = step(state, global_batch(s, n_global))
        history.append({k: float(v) for k, v in m.items()})
    return state, history


def data_parallel(rank: int, world: int, shard: bool):
    import functrain as ft
    from functrain import distributed as dist

    sizes = SIZES[world]
    step = dist.make_data_parallel_train_step(
        loss_fn, make_tx(), shard_optimizer=shard, micro_batches=1 + rank % 2, bucket_cap_mb=0.0005
    )
    params = make_params()
    if rank != 0:  # init_state must broadcast rank 0's parameters
        params = ft.tree.map(lambda x: x + 1.0, params)
    state = step.init_state(params)
    history = []
    start = sum(sizes[:rank])
    for s in range(STEPS):
        batch = ft.tree.map(lambda x: x[start : start + sizes[rank]], global_batch(s, sum(sizes)))
        state, m = step(state, batch)
        history.append({k: float(v) for k, v in m.items()})
    return step, state, history


def memory(rank: int, world: int) -> dict[str, int]:
    import functrain as ft
    from functrain import distributed as dist

    g = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(256, 64, generator=g),
        "b1": torch.zeros(256),
        "w2": torch.randn(10, 256, generator=g),
        "b2": torch.zeros(10),
    }
    sharded = dist.make_data_parallel_train_step(
        lambda p, b: b.sum(), ft.adamw(1e-3), shard_optimizer=True
    )
    whole = ft.adamw(1e-3).init(params)
    state = sharded.init_state(params)
    return {
        "sharded": dist.optimizer_state_bytes(state.opt_state),
        "whole": dist.optimizer_state_bytes(whole),
    }


def main() -> None:
    fault, out_dir = sys.argv[1], sys.argv[2]
    import functrain as ft
    from functrain import distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result: dict = {"rank": rank, "world": world}
    ref_state, ref_history = reference(sum(SIZES[world]))

    dist.init(backend="gloo", timeout=60)
    for shard in (False, True):
        name = "sharded" if shard else "plain"
        step, state, history = data_parallel(rank, world, shard)
        result[f"{name}_params"] = close(state.params, ref_state.params)
        keys = [k for k in ref_history[0] if k in history[0]]
        result[f"{name}_metric_keys"] = sorted(keys)
        result[f"{name}_metrics"] = max(
            abs(h[k] - r[k]) / (1e-11 + 1e-9 * abs(r[k]))
            for h, r in zip(history, ref_history)
            for k in keys
        )
        full = step.full_state(state)
        result[f"{name}_opt_state"] = close(full.opt_state, ref_state.opt_state)
        if shard:
            again = step.shard_state(full)
            result["reshard"] = close(again.opt_state, state.opt_state, rtol=0, atol=0)
    result["memory"] = memory(rank, world)

    keys = [None] * world
    torch.distributed.all_gather_object(keys, int(dist.rank_key(ft.random_key(0))))
    result["rank_keys_distinct"] = len(set(keys)) == world

    # Buffers: each rank counts its own examples; broadcast makes rank 0's count everyone's.
    def counting(params, batch, buffers):
        return ft.LossOutput(
            (params["w"] * batch).mean(), buffers={"n": buffers["n"] + batch.numel()}
        )

    bstep = dist.make_data_parallel_train_step(counting, ft.sgd(0.1))
    bstate = bstep.init_state({"w": torch.ones(())}, buffers={"n": torch.zeros(())})
    bstate, _ = bstep(bstate, torch.ones(rank + 2))
    result["buffer"] = float(bstate.buffers["n"])

    # A NaN in one element of the gradient, from one rank, skips the step on every rank (in the
    # sharded mode most ranks do not even hold that element): params and state kept.
    def nan_on_rank_1(params, batch):
        out = loss_fn(params, batch)
        if rank != 1:
            return out
        nan_grad = (params["row"][0, 2] * 0).sqrt()  # value 0, gradient NaN
        return out._replace(loss=out.loss._replace(total=out.loss.total + nan_grad))

    for shard in (False, True):
        nstep = dist.make_data_parallel_train_step(nan_on_rank_1, make_tx(), shard_optimizer=shard)
        nstate = nstep.init_state(make_params())
        before = ft.tree.map(lambda x: x.clone(), (nstate.params, nstate.opt_state))
        nstate, m = nstep(nstate, global_batch(0, 3))
        kept = close((nstate.params, nstate.opt_state), before, 0, 0) == 0
        result[f"nonfinite_{shard}"] = [int(m["skipped"]), kept, float(m["loss"])]

    # Ranks that disagree about the parameters are told so, on every rank (no hang).
    mstep = dist.make_data_parallel_train_step(lambda p, b: (p["w"].sum() * b).mean(), ft.sgd(0.1))
    mstate = ft.TrainState.create(params={"w": torch.full((2,), float(rank))}, tx=ft.sgd(0.1))
    try:
        mstep(mstate, torch.ones(3))
        result["mismatch"] = "no error"
    except dist.RankMismatchError as err:
        result["mismatch"] = str(err)

    # The fault, on a fresh group with a short timeout.
    group = torch.distributed.new_group(timeout=datetime.timedelta(seconds=FAULT_TIMEOUT))
    fstep = dist.make_data_parallel_train_step(
        loss_fn, make_tx(), shard_optimizer=True, group=group
    )
    fstate = fstep.init_state(make_params())
    batch = global_batch(0, 2 + rank)
    fstate, _ = fstep(fstate, batch)  # one good step on the group
    path = os.path.join(out_dir, f"rank{rank}.json")
    if rank == world - 1:
        with open(path, "w") as f:
            json.dump(result, f)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(FAULT_TIMEOUT + 2)
        os._exit(0)
    before = ft.tree.map(lambda x: x.clone(), fstate.params)
    start = time.monotonic()
    try:
        fstep(fstate, batch)
        result["fault"] = "no error"
    except dist.DistributedStepError as err:
        result["fault"] = str(err)
        error = err
    result["fault_seconds"] = time.monotonic() - start
    result["fault_state_intact"] = not fstate.consumed and close(fstate.params, before, 0, 0) == 0
    with open(path, "w") as f:
        json.dump(result, f)
    if result["fault"] != "no error":
        print(f"rank {rank}: {error}", file=sys.stderr, flush=True)
        os._exit(3)  # a broken group cannot be destroyed cleanly
    os._exit(0)


if __name__ == "__main__":
    main()
