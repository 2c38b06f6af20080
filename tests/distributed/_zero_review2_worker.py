"""One rank of test_zero_review2.py's job (not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _zero_review2_worker.py OUT``.
Every rank runs the probes below, each in a fresh gloo group, and writes ``OUT/rank{r}.json``
after each. References are single-process float64 runs of ``ft.make_train_step`` on the
concatenation of both ranks' batches (from ``_zero_review_worker``), computed on every rank.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from gloo_jobs import run_probes

_spec = importlib.util.spec_from_file_location(
    "_zero_review_worker", Path(__file__).parent / "_zero_review_worker.py"
)
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)  # type: ignore[union-attr]


def awkward_params() -> dict[str, torch.Tensor]:
    """Sizes that do not divide by 2, an empty leaf and a row vector."""
    g = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(5, 3, generator=g, dtype=torch.float64),
        "b": torch.randn(7, generator=g, dtype=torch.float64)[:3],
        "e": torch.zeros(0, 4, dtype=torch.float64),
        "r": torch.randn(1, 3, generator=g, dtype=torch.float64),
    }


def awkward_loss(p, batch):
    y = batch["x"] @ p["w"] + p["b"] + p["r"][0] + p["e"].sum()
    return ((y - batch["y"]) ** 2).mean()


def _error(fn) -> dict:
    try:
        fn()
    except Exception as err:  # the test checks the type and message
        return {"type": type(err).__name__, "message": str(err)}
    return {"type": None}


def probe_collectives(rank: int, group, out_dir: str) -> dict:
    from functrain import distributed as dist

    half = dist.all_reduce_tree([torch.tensor([40000.0, 1e-3], dtype=torch.float16)], op="mean")
    b = torch.tensor([1.5 * (rank + 1)], dtype=torch.bfloat16)
    bsum = dist.all_reduce_tree([b], op="sum", group=group)
    z = torch.tensor([1 + 2j, -3j], dtype=torch.complex128) * (rank + 1)
    nc = (torch.arange(6.0, dtype=torch.float64).view(2, 3) * (rank + 1)).t()
    reduced = dist.all_reduce_tree({"z": z, "nc": nc}, op="mean", group=group)
    bcast = dist.broadcast_tree({"z": z, "nc": nc}, group=group)
    return {
        "half_mean": half[0].double().tolist(),
        "bf16_sum_is_bf16": bsum[0].dtype == torch.bfloat16,
        "bf16_sum": bsum[0].double().tolist(),
        "z_mean": [[c.real, c.imag] for c in reduced["z"].tolist()],
        "nc_mean": reduced["nc"].tolist(),
        "z_bcast": [[c.real, c.imag] for c in bcast["z"].tolist()],
        "nc_bcast": bcast["nc"].tolist(),
        "int_mean": _error(lambda: dist.all_reduce_tree([torch.tensor([3])], op="mean")),
    }


def _txs():
    import functrain as ft

    return {
        "adamw": lambda: ft.adamw(0.05, weight_decay=0.1),
        "sgd": lambda: ft.sgd(0.05, momentum=0.9, nesterov=True),
        "lion": lambda: ft.lion(0.01, weight_decay=0.2),
        "clip_adamw": lambda: ft.chain(ft.clip_by_global_norm(0.05), ft.adamw(0.05)),
        "clip_sgd": lambda: ft.chain(ft.clip_by_global_norm(0.05), ft.sgd(0.1)),
    }


def probe_optimizers(rank: int, group, out_dir: str) -> dict:
    return {
        name: W.sharded_vs_reference(rank, group, make_tx, awkward_params(), awkward_loss)
        for name, make_tx in _txs().items()
    }


def probe_mixed_dtypes(rank: int, group, out_dir: str) -> dict:
    """float32 and float64 parameters (buckets of their own) against one process."""
    import functrain as ft
    from functrain import distributed as dist

    p0 = awkward_params()
    p0["w"] = p0["w"].float()

    def loss_fn(p, batch):
        return awkward_loss({**p, "w": p["w"].double()}, batch)

    make_tx = lambda: ft.chain(ft.clip_by_global_norm(0.05), ft.adamw(0.05))  # noqa: E731
    ref, _ = W.reference(make_tx, p0, loss_fn)
    step = dist.make_data_parallel_train_step(loss_fn, make_tx(), shard_optimizer=True, group=group)
    state = step.init_state(p0)
    for s in range(W.STEPS):
        state, _ = step(state, W.local_batch(s, rank))
    return {
        k: [str(v.dtype), float((v.double() - ref.params[k].double()).abs().sum())]
        for k, v in state.params.items()
    }


def probe_mismatch(rank: int, group, out_dir: str) -> dict:
    """Ranks passing other shapes or dtypes (last: before the fix gloo aborted a process)."""
    from functrain import distributed as dist

    return {
        "mismatch_same_size": _error(
            lambda: dist.all_reduce_tree(
                {"a": torch.ones(2), "w": torch.ones((2, 3) if rank == 0 else (3, 2))},
                group=group,
            )
        ),
        "mismatch_size": _error(
            lambda: dist.broadcast_tree(
                {"a": torch.ones(2), "w": torch.ones(2 if rank == 0 else 3)}, group=group
            )
        ),
        "mismatch_dtype": _error(
            lambda: dist.all_reduce_tree(
                {"w": torch.ones(2, dtype=torch.float32 if rank == 0 else torch.float64)},
                group=group,
            )
        ),
    }


def probe_adafactor(rank: int, group, out_dir: str) -> dict:
    import functrain as ft
    from functrain import distributed as dist

    return _error(
        lambda: dist.make_data_parallel_train_step(
            awkward_loss, ft.adafactor(0.01), shard_optimizer=True, group=group
        )
    )


PROBES = {
    "collectives": probe_collectives,
    "optimizers": probe_optimizers,
    "mixed_dtypes": probe_mixed_dtypes,
    "adafactor": probe_adafactor,
    "mismatch": probe_mismatch,
}


def main() -> None:
    run_probes(PROBES, init_timeout=60, group_timeout=15)


if __name__ == "__main__":
    main()
