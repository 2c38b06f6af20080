"""Worker of ``test_distributed_review3.py``: one rank of a gloo job on loopback.

Each probe compares the data-parallel step on this rank's share with a single-process
``ft.make_train_step`` reference in float64, computed here on every rank, and writes what it
found to ``rank<r>.json`` (after every probe, so a crash keeps the earlier results).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

import functrain as ft
from functrain import distributed as dist

SIZES = [3, 5]  # examples per rank (uneven on purpose)


def gap(a, b) -> float:
    """Largest relative difference between two pytrees of tensors."""
    out = 0.0
    for x, y in zip(ft.tree.leaves(a), ft.tree.leaves(b)):
        x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
        if x.shape != y.shape:
            return float("inf")
        if not torch.equal(x.isnan(), y.isnan()) or not torch.equal(x.isinf(), y.isinf()):
            return float("inf")
        same = x.isnan() | (x.isinf() & (x == y))  # NaN where NaN, the same infinity
        d = (x - y).masked_fill(same, 0).abs().max().item() if x.numel() else 0.0
        out = max(out, d / (1e-12 + y.abs().max().item()) if d == d else float("inf"))
    return out


def batch(step: int, rank: int | None) -> dict[str, torch.Tensor]:
    """The global batch of ``step`` (``rank=None``) or ``rank``'s contiguous share of it."""
    g = torch.Generator().manual_seed(100 + step)
    full = {"x": torch.randn(sum(SIZES), 3, generator=g), "y": torch.randn(sum(SIZES), generator=g)}
    if rank is None:
        return full
    lo = sum(SIZES[:rank])
    return {k: v[lo : lo + SIZES[rank]] for k, v in full.items()}


def buffer_loss(params, batch, buffers):
    """A loss that reads and updates a running-mean buffer (as BatchNorm does)."""
    x = batch["x"] - buffers["mean"]
    err = x @ params["w"] + params["b"] - batch["y"]
    new = {"mean": 0.9 * buffers["mean"] + 0.1 * batch["x"].mean(0)}
    aux = {"abs_err": err.abs().mean()}
    return ft.LossOutput(err.square().mean(), aux=aux, buffers=new)


def probe_buffers(rank: int, world: int, shard: bool) -> dict:
    """Buffers broadcast from rank 0 each step; parameters as one process on the whole batch."""
    params = {"w": torch.tensor([0.5, -0.2, 0.1]), "b": torch.tensor(0.3)}
    buffers = {"mean": torch.zeros(3)}
    tx = ft.chain(ft.clip_by_global_norm(0.5), ft.adam(0.05))
    step = dist.make_data_parallel_train_step(buffer_loss, tx, shard_optimizer=shard)
    state = step.init_state(params, buffers=buffers)
    ref_step = ft.make_train_step(buffer_loss, tx)
    ref = ft.TrainState.create(params=params, tx=tx, buffers=buffers)
    worst, worst_buf, worst_aux = 0.0, 0.0, 0.0
    for i in range(4):
        state, metrics = step(state, batch(i, rank))
        # Every rank takes rank 0's buffers: the running mean of rank 0's share only.
        rank0 = 0.9 * ref.buffers["mean"] + 0.1 * batch(i, 0)["x"].mean(0)
        ref, ref_metrics = ref_step(ref, batch(i, None))
        ref = ref.replace(buffers={"mean": rank0})
        worst = max(worst, gap(state.params, ref.params))
        worst_buf = max(worst_buf, gap(state.buffers, ref.buffers))
        assert sorted(metrics) == sorted(ref_metrics), (sorted(metrics), sorted(ref_metrics))
        # Every metric (aux, norms) is that of one process on the whole batch.
        worst_aux = max(worst_aux, *(gap(metrics[k], ref_metrics[k]) for k in ref_metrics))
    return {"params": worst, "buffers": worst_buf, "aux": worst_aux}


def dropout_loss(params, batch):
    kept = F.dropout(torch.ones_like(batch["x"]), 0.5, training=True)
    return ((batch["x"] * kept) @ params["w"] - batch["y"]).square().mean()


def probe_dropout(rank: int, world: int) -> dict:
    """Rank r's masks are those of one process whose key is ``rank_key(key, r)``."""
    params = {"w": torch.tensor([0.5, -0.2, 0.1])}
    tx = ft.sgd(0.1)
    step = dist.make_data_parallel_train_step(dropout_loss, tx, micro_batches=[1, SIZES[rank] - 1])
    state0 = step.init_state(params, seed=7)
    local = ft.make_train_step(dropout_loss, tx, micro_batches=[1, SIZES[rank] - 1])
    mine = batch(0, rank)
    ref_local, _ = local(
        ft.TrainState.create(params=params, tx=tx, key=dist.rank_key(state0.key, rank)), mine
    )
    # The DP gradient is the example-weighted mean of the ranks' local gradients.
    g_local = (params["w"] - ref_local.params["w"]) / 0.1
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, g_local.tolist())
    g = sum(SIZES[r] * torch.tensor(gathered[r]) for r in range(world)) / sum(SIZES)
    new, _ = step(state0, mine)
    again_state = step.init_state(params, seed=7)
    again, _ = step(again_state, mine)
    return {
        "params": gap(new.params["w"], params["w"] - 0.1 * g),
        "repeat": gap(again.params, new.params),
        "local_grads_differ": gathered[0] != gathered[1],
    }


def probe_loss_scale_one_rank_inf(rank: int, world: int, shard: bool) -> dict:
    """An inf on one rank under dynamic loss scaling: every rank skips and halves the scale."""

    def loss(params, b):
        return (b["x"] @ params["w"] - b["y"]).square().mean()

    kwargs = {"loss_scale": ft.DynamicLossScale(2.0**8), "max_consecutive_skips": 3}
    tx = ft.adamw(0.05, weight_decay=0.1)
    params = {"w": torch.tensor([0.5, -0.2, 0.1])}
    step = dist.make_data_parallel_train_step(loss, tx, shard_optimizer=shard, **kwargs)
    state = step.prepare(step.init_state(params))
    ref_step = ft.make_train_step(loss, tx, **kwargs)
    ref = ref_step.prepare(ft.TrainState.create(params=params, tx=tx))
    worst, skipped = 0.0, []
    for i in range(4):
        mine, full = batch(i, rank), batch(i, None)
        if i == 1:
            mine["x"] = mine["x"].clone()
            if rank == world - 1:
                mine["x"][0, 0] = float("inf")
            full["x"] = full["x"].clone()
            full["x"][sum(SIZES[: world - 1]), 0] = float("inf")
        state, metrics = step(state, mine)
        ref, ref_metrics = ref_step(ref, full)
        skipped.append(float(metrics["skipped"]))
        assert sorted(metrics) == sorted(ref_metrics), (sorted(metrics), sorted(ref_metrics))
        worst = max(worst, *(gap(metrics[k], ref_metrics[k]) for k in ref_metrics))
        worst = max(worst, gap(state.params, ref.params), gap(state.extra, ref.extra))
        if not shard:
            worst = max(worst, gap(state.opt_state, ref.opt_state))
    full_state = step.full_state(state)
    return {"gap": max(worst, gap(full_state.opt_state, ref.opt_state)), "skipped": skipped}


def probe_aux_mismatch(rank: int, world: int) -> dict:
    """Ranks whose loss_fn returns other aux names fail clearly, on every rank, at once."""

    def loss(params, b):
        err = (b["x"] @ params["w"] - b["y"]).square()
        aux = {"a": err.mean()} if rank == 0 else {"b": err.mean()}
        return ft.LossOutput(err.mean(), aux=aux)

    step = dist.make_data_parallel_train_step(loss, ft.sgd(0.1))
    state = step.init_state({"w": torch.zeros(3)})
    try:
        step(state, batch(0, rank))
    except dist.RankMismatchError as err:
        return {"error": "RankMismatchError", "message": str(err)}
    return {"error": None}


def token_loss(params, b):
    """A token-weighted loss with a token-weighted and an example-weighted aux metric."""
    err = (b["x"] @ params["w"] - b["y"]).square()
    m = b["m"]
    hits = ((err < 1.0) & m).sum()
    aux = {"hit_rate": ft.LossSum(hits, m.sum()), "mean_err": err.mean()}
    return ft.LossOutput(ft.LossSum((err * m).sum(), m.sum()), aux=aux)


def probe_tokens_micro(rank: int, world: int) -> dict:
    """LossSum metrics over ranks with different numbers of micro-batches, by hand."""
    params = {"w": torch.tensor([0.5, -0.2, 0.1])}
    micro = [[1, 2], 3][rank % 2]  # 2 micro-batches on rank 0, 3 on rank 1
    mask = torch.tensor([True, False, True, True, True, False, True, True])
    full = {**batch(0, None), "m": mask}
    lo = sum(SIZES[:rank])
    mine = {k: v[lo : lo + SIZES[rank]] for k, v in full.items()}
    step = dist.make_data_parallel_train_step(token_loss, ft.sgd(0.1), micro_batches=micro)
    new, metrics = step(step.init_state(params), mine)
    ref_step = ft.make_train_step(token_loss, ft.sgd(0.1))
    ref, ref_metrics = ref_step(ft.TrainState.create(params=params, tx=ft.sgd(0.1)), full)
    err = (full["x"] @ params["w"] - full["y"]).square()
    hand = {
        "loss": (err * mask).sum() / mask.sum(),
        "hit_rate": ((err < 1.0) & mask).sum() / mask.sum(),
        "mean_err": err.mean(),
        "num_tokens": mask.sum().double(),
    }
    return {
        "params": gap(new.params, ref.params),
        "metrics": {k: gap(metrics[k], v) for k, v in hand.items()},
        "ref_agrees": {k: gap(ref_metrics[k], v) for k, v in hand.items()},
        "hit_rate": float(hand["hit_rate"]),
    }


def probe_bf16_tokens(rank: int, world: int) -> dict:
    """``num_tokens`` of a bfloat16 LossSum over ranks: exact, as one process keeps it."""

    def loss(params, b):
        err = (b @ params["w"]).square()
        return ft.LossSum(err.sum(), torch.tensor(err.numel()))

    params = {"w": torch.ones(3, dtype=torch.bfloat16)}
    mine = torch.full((501 - rank, 3), 0.01, dtype=torch.bfloat16)  # 501 + 500 = 1001
    step = dist.make_data_parallel_train_step(loss, ft.sgd(0.1))
    _, metrics = step(step.init_state(params), mine)
    return {"num_tokens": metrics["num_tokens"].item(), "dtype": str(metrics["num_tokens"].dtype)}


def probe_batchnorm(rank: int, world: int, shard: bool) -> dict:
    """Real BatchNorm (per-rank batch statistics): the example-weighted mean of the ranks'
    single-process gradients, and rank 0's running statistics (int64 counter included)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    model, params, buffers = ft.functionalize(net.double())

    def loss(p, b, buffers):
        out, new = model.apply(p, buffers, b["x"])
        return ft.LossOutput((out.squeeze(-1) - b["y"]).square().mean(), buffers=new)

    mine = batch(0, rank)
    local = ft.make_train_step(loss, ft.sgd(1.0))
    ref, _ = local(ft.TrainState.create(params=params, tx=ft.sgd(1.0), buffers=buffers), mine)
    g_local = {k: (params[k] - ref.params[k]).tolist() for k in params}  # lr 1: the gradient
    gathered: list = [None] * world
    torch.distributed.all_gather_object(
        gathered, (g_local, [v.tolist() for v in ref.buffers.values()])
    )
    expect = {
        k: params[k]
        - sum(SIZES[r] * torch.tensor(gathered[r][0][k]) for r in range(world)) / sum(SIZES)
        for k in params
    }
    step = dist.make_data_parallel_train_step(loss, ft.sgd(1.0), shard_optimizer=shard)
    new, _ = step(step.init_state(params, buffers=buffers), mine)
    rank0_buffers = [torch.tensor(v) for v in gathered[0][1]]
    return {
        "params": gap(new.params, expect),
        "buffers": gap(list(new.buffers.values()), rank0_buffers),
        "counter": str(new.buffers["1.num_batches_tracked"].dtype),
    }


PROBES = {
    "buffers": lambda r, w: probe_buffers(r, w, False),
    "buffers_zero": lambda r, w: probe_buffers(r, w, True),
    "dropout": probe_dropout,
    "scale_inf": lambda r, w: probe_loss_scale_one_rank_inf(r, w, False),
    "scale_inf_zero": lambda r, w: probe_loss_scale_one_rank_inf(r, w, True),
    "tokens_micro": probe_tokens_micro,
    "bf16_tokens": probe_bf16_tokens,
    "batchnorm": lambda r, w: probe_batchnorm(r, w, False),
    "batchnorm_zero": lambda r, w: probe_batchnorm(r, w, True),
    "aux_mismatch": probe_aux_mismatch,
}


def main() -> None:
    out_dir = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Here, not at import: pytest's --doctest-modules imports this file in the test process.
    torch.set_default_dtype(torch.float64)
    dist.init(backend="gloo", timeout=30)
    result: dict = {"rank": rank, "world": world}
    for name, probe in PROBES.items():
        try:
            result[name] = probe(rank, world)
        except Exception:
            result[name] = {"error": traceback.format_exc()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    dist.shutdown()


if __name__ == "__main__":
    main()
