"""One rank of test_zero_review.py's job (not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _zero_review_worker.py OUT``.
Every rank runs the probes below and writes ``OUT/rank{r}.json`` after each: per probe, the
numbers the test checks (or the error it raised). References are single-process float64 runs
of ``ft.make_train_step`` on the concatenation of all ranks' batches, computed on every rank.
Each probe runs in a fresh process group: one that fails on one rank only leaves the others
waiting in a collective until the group's timeout, and the probes after it still run.
"""

from __future__ import annotations

import os

import torch
from gloo_jobs import run_probes

STEPS = 4
SIZES = (3, 5)  # rank r's batch size (world 2)


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 3, generator=g, dtype=torch.float64),
        "b": torch.zeros(3, dtype=torch.float64),
        "s": torch.tensor(1.0, dtype=torch.float64),  # 0-d
        "r": torch.zeros(1, 3, dtype=torch.float64),  # fewer rows than ranks
    }


def loss(p, batch):
    y = (batch["x"] @ p["w"]) * p["s"] + p["b"] + p["r"][0]
    return ((y - batch["y"]) ** 2).mean()


def global_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SIZES)
    return {
        "x": torch.randn(n, 5, generator=g, dtype=torch.float64),
        "y": torch.randn(n, 3, generator=g, dtype=torch.float64),
    }


def local_batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    import functrain as ft

    start = sum(SIZES[:rank])
    return ft.tree.map(lambda x: x[start : start + SIZES[rank]], global_batch(step))


def gap(a, b) -> float:
    """Largest violation ratio of two pytrees (<= 1: close to rtol 1e-10; inf: shapes differ)."""
    import functrain as ft

    la, lb = ft.tree.leaves(a), ft.tree.leaves(b)
    if len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            err = (x.double() - y.double()).abs() / (1e-13 + 1e-10 * y.double().abs())
            worst = max(worst, float(err.nan_to_num(float("inf")).max()))
    return worst


def scalar_loss(p, batch):
    return ((batch["x"].sum(1) * p["s"] - batch["y"][:, 0]) ** 2).mean()


def reference(make_tx, p0, loss_fn=loss, steps: int = STEPS):
    import functrain as ft

    step = ft.make_train_step(loss_fn, make_tx())
    state = ft.TrainState.create(params=p0, tx=make_tx())
    history = []
    for s in range(steps):
        state, m = step(state, global_batch(s))
        history.append({k: float(v) for k, v in m.items()})
    return state, history


def sharded_vs_reference(rank: int, group, make_tx, p0, loss_fn=loss) -> dict:
    from functrain import distributed as dist

    ref, ref_history = reference(make_tx, p0, loss_fn)
    step = dist.make_data_parallel_train_step(loss_fn, make_tx(), shard_optimizer=True, group=group)
    state = step.init_state(p0)
    history = []
    for s in range(STEPS):
        state, m = step(state, local_batch(s, rank))
        history.append({k: float(v) for k, v in m.items()})
    metrics = {
        k: max(abs(h[k] - r[k]) / (1e-13 + 1e-10 * abs(r[k])) for h, r in zip(history, ref_history))
        for k in ("loss", "grad_norm", "update_norm", "param_norm")
    }
    return {
        "params": gap(state.params, ref.params),
        "opt_state": gap(step.full_state(state).opt_state, ref.opt_state),
        "metrics": metrics,
    }


def ndim_labels():
    import functrain as ft

    # A common idiom: biases (ndim 1) apart. A (0,) piece of the 0-d "s" used to have ndim 1.
    labels = lambda p: ft.tree.map(lambda x: "decay" if x.ndim != 1 else "plain", p)  # noqa: E731
    return ft.chain(
        ft.clip_by_global_norm(0.3),
        ft.partition(
            {"decay": ft.adamw(0.05, weight_decay=0.1), "plain": ft.sgd(0.05, momentum=0.9)},
            labels,
        ),
    )


def probe_ndim_labels(rank: int, group, out_dir: str) -> dict:
    return sharded_vs_reference(rank, group, ndim_labels, params())


def probe_scalar_only(rank: int, group, out_dir: str) -> dict:
    """More ranks than elements: one 0-d parameter, which every rank updates (a replica): its
    gradient and update must count once in grad_norm, the clip and update_norm."""
    import functrain as ft

    return sharded_vs_reference(
        rank,
        group,
        lambda: ft.chain(ft.clip_by_global_norm(0.2), ft.adamw(0.1, weight_decay=0.5)),
        {"s": torch.tensor(0.5, dtype=torch.float64)},
        scalar_loss,
    )


def probe_checkpoint(rank: int, group, out_dir: str) -> dict:
    """Rank 0 saves the gathered state after 2 steps; each rank also saves its own shard."""
    import functrain as ft
    from functrain import distributed as dist

    step = dist.make_data_parallel_train_step(
        loss, ndim_labels(), shard_optimizer=True, group=group
    )
    state = step.init_state(params())
    for s in range(2):
        state, _ = step(state, local_batch(s, rank))
    full = step.full_state(state)
    if rank == 0:
        ft.checkpoint.save(os.path.join(out_dir, "full.safetensors"), full)
    ft.checkpoint.save(os.path.join(out_dir, f"shard{rank}.safetensors"), state)
    dist.barrier(group=group)
    # Every rank's replicas of the 0-d parameter's state, bit for bit (rank 0's are saved).
    paths, leaves, _ = ft.tree.flatten_with_paths(state.opt_state)
    replicas = {
        ft.tree.path_str(p, "opt_state"): float(x).hex()
        for p, x in zip(paths, leaves)
        if isinstance(x, torch.Tensor) and "'s'" in ft.tree.path_str(p, "")
    }
    return {"saved": True, "replicas": replicas}


def probe_numel_mask(rank: int, group, out_dir: str) -> dict:
    """Weight decay only for tensors of 8+ elements: the (2, 3) and (3, 3) pieces of the (5, 3)
    matrix have fewer, so the shards used to skip its decay silently."""
    import functrain as ft
    from functrain import distributed as dist

    make_tx = lambda: ft.adamw(  # noqa: E731
        0.05, weight_decay=0.5, mask=lambda p: ft.tree.map(lambda x: x.numel() >= 8, p)
    )
    try:
        out = sharded_vs_reference(rank, group, make_tx, params())
    except dist.ShardingError as err:
        return {"error": "ShardingError", "message": str(err)}
    return {"error": None, **out}


PROBES = {
    "ndim_labels": probe_ndim_labels,
    "scalar_only": probe_scalar_only,
    "checkpoint": probe_checkpoint,
    "numel_mask": probe_numel_mask,
}


def main() -> None:
    run_probes(PROBES, init_timeout=120, group_timeout=20)


if __name__ == "__main__":
    main()
