"""Worker of ``test_grad_stats_data_parallel.py``: one rank of a 2-rank gloo job on loopback.

Each probe runs the data-parallel step with a ``grad_stats`` hook on this rank's share of a
global batch (rank 0: 5 examples, rank 1: 3; ``micro_batches=2`` gives sizes 3, 2 and 2, 1) and,
on every rank, the single-process ``ft.make_train_step`` on the whole batch with
``micro_batches=[3, 2, 2, 1]`` (the ranks' micro-batches in rank order), in float64, and reports
the gaps in metrics, hook state and the stats the hook's ``update`` saw. Not collected by pytest.
"""

from __future__ import annotations

import gloo_jobs
import torch
from gloo_jobs import gap

import functrain as ft
from functrain import distributed as dist

SIZES = [5, 3]  # the ranks' batch sizes
REF_SPLIT = [3, 2, 2, 1]  # micro_batches=2 on each rank, in rank order


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, generator=g, dtype=torch.float64),
        "b": torch.tensor(0.2, dtype=torch.float64),
    }


def loss_fn(p, batch):
    err = batch["x"] @ p["w"] + p["b"] - batch["y"]
    return err.square().mean()


def global_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SIZES)
    return {
        "x": torch.randn(n, 3, generator=g, dtype=torch.float64),
        "y": torch.randn(n, generator=g, dtype=torch.float64),
    }


def share(batch: dict, rank: int) -> dict:
    lo = sum(SIZES[:rank])
    return {k: v[lo : lo + SIZES[rank]] for k, v in batch.items()}


def custom_hook(seen: list) -> ft.GradStatsHook:
    """Uses every input: sizes, losses, two values, the combined gradient and a state."""

    def per_micro_batch(g, b):
        return {"sq": ft.tree.norm(g, squared=True), "w0": g["w"][0] * b}

    def update(stats, grads, state):
        seen.append(stats)
        metrics = {
            "custom/loss": (stats.sizes * stats.losses).sum() / stats.sizes.sum(),
            "custom/sq_max": stats.values["sq"].max(),
            # Σᵢ bᵢ ĝᵢ[0] = N · g[0]: the micro-batch values agree with the global gradient.
            "custom/w0_gap": stats.values["w0"].sum() - stats.sizes.sum() * grads["w"][0],
        }
        return metrics, state + stats.values["sq"].sum()

    return ft.GradStatsHook(
        init=lambda p: torch.zeros((), dtype=torch.float64),
        per_micro_batch=per_micro_batch,
        update=update,
        name="custom",
    )


def compare(rank, group, make_hook, strategy="loop") -> dict:
    seen, ref_seen = [], []
    hook, ref_hook = make_hook(seen), make_hook(ref_seen)
    tx = ft.sgd(0.1, momentum=0.9)
    step = dist.make_data_parallel_train_step(
        loss_fn, tx, group=group, micro_batches=2, strategy=strategy, grad_stats=hook
    )
    ref_step = ft.make_train_step(
        loss_fn, tx, micro_batches=REF_SPLIT, strategy=strategy, grad_stats=ref_hook
    )
    state = step.init_state(params())
    ref = ft.TrainState.create(params=params(), tx=tx)
    out: dict = {"metric_gap": 0.0, "names": None, "values": []}
    for i in range(3):
        batch = global_batch(i)
        state, metrics = step(state, share(batch, rank))
        ref, ref_metrics = ref_step(ref, batch)
        if sorted(metrics) != sorted(ref_metrics):
            out["names"] = [sorted(metrics), sorted(ref_metrics)]
        common = [k for k in ref_metrics if k in metrics]
        out["metric_gap"] = max(
            out["metric_gap"], gap([metrics[k] for k in common], [ref_metrics[k] for k in common])
        )
        out["values"].append({k: float(v) for k, v in metrics.items()})
    name = hook.name
    out["state_gap"] = gap(state.extra[name], ref.extra[name])
    out["param_gap"] = gap(state.params, ref.params)
    if seen:  # the custom hook: the stats its update saw, in the reference's order
        out["stats_gap"] = max(
            gap([s.sizes, s.losses, s.values], [r.sizes, r.losses, r.values])
            for s, r in zip(seen, ref_seen, strict=True)
        )
        out["sizes"] = seen[0].sizes.tolist()
    return out


def noise(rank, group, out_dir) -> dict:
    return compare(rank, group, lambda seen: ft.noise_scale_hook(decay=0.5))


def noise_vmap(rank, group, out_dir) -> dict:
    return compare(rank, group, lambda seen: ft.noise_scale_hook(decay=0.5), strategy="vmap")


def cosine(rank, group, out_dir) -> dict:
    return compare(rank, group, lambda seen: ft.noise_scale_hook(decay=0.5, cosine=True))


def custom(rank, group, out_dir) -> dict:
    return compare(rank, group, custom_hook)


def mismatched_k(rank, group, out_dir) -> dict:
    """Rank 0 splits into 2 micro-batches, rank 1 into 3: refused on both ranks."""
    step = dist.make_data_parallel_train_step(
        loss_fn,
        ft.sgd(0.1),
        group=group,
        micro_batches=2 + rank,
        check_ranks=False,  # checked even so
        grad_stats=ft.noise_scale_hook(),
    )
    try:
        step(step.init_state(params()), share(global_batch(0), rank))
    except Exception as err:  # reported to the test
        return {"type": type(err).__name__, "message": str(err)}
    return {"type": None}


if __name__ == "__main__":
    gloo_jobs.run_probes(
        {
            "noise": noise,
            "noise_vmap": noise_vmap,
            "cosine": cosine,
            "custom": custom,
            "mismatched_k": mismatched_k,
        },
        init_timeout=60,
        group_timeout=30,
    )
