"""Worker of ``test_dp_data_parallel.py``: one rank of a 2-rank gloo job on loopback.

Each probe runs the data-parallel DP-SGD step (``per_example_clip``) on this rank's share of a
global batch and, on every rank, the single-process ``ft.make_train_step(per_example_clip=C)``
on the whole batch, in float64, and reports the gaps (and hashes of the parameters, so the test
can check that the ranks end bit-for-bit equal). Not collected by pytest.
"""

from __future__ import annotations

import gloo_jobs
import torch
from gloo_jobs import digest, gap, shares

import functrain as ft
from functrain import distributed as dist

C = 1.0
B_EXPECTED = 8.0
NOISE_SIZE = 20_000  # elements of the zero-gradient parameter whose noise is measured


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, generator=g, dtype=torch.float64),
        "b": torch.tensor(0.2, dtype=torch.float64),
        "z": torch.zeros(NOISE_SIZE, dtype=torch.float64),  # no gradient: its update is noise
    }


def loss_fn(p, batch):
    err = batch["x"] @ p["w"] + p["b"] - batch["y"]
    return err.square().mean() + 0.0 * p["z"].sum()


def global_batch(step: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    # Scaled so that some examples' gradients have norms above C and some below.
    return {
        "x": 0.4 * torch.randn(n, 3, generator=g, dtype=torch.float64),
        "y": torch.randn(n, generator=g, dtype=torch.float64),
    }


def tx(noise: float, seed: int = 7) -> ft.GradientTransformation:
    return ft.chain(ft.dp_noisy_mean(C, noise, B_EXPECTED, seed), ft.sgd(0.5, momentum=0.9))


def run(rank, group, plan, noise, micro_batches=1, seed=7) -> dict:
    """``plan``: per step, the ranks' batch sizes; both runs, and what differs."""
    step = dist.make_data_parallel_train_step(
        loss_fn, tx(noise, seed), group=group, per_example_clip=C, micro_batches=micro_batches
    )
    ref_step = ft.make_train_step(
        loss_fn, tx(noise, seed), per_example_clip=C, micro_batches=micro_batches
    )
    state = step.init_state(params())
    ref = ft.TrainState.create(params=params(), tx=tx(noise, seed))
    out: dict = {"params": 0.0, "opt_state": 0.0, "metrics": 0.0, "names": True}
    for s, sizes in enumerate(plan):
        whole = global_batch(s, sum(sizes))
        state, metrics = step(state, shares(whole, sizes, rank))
        ref, ref_metrics = ref_step(ref, whole)
        out["names"] &= sorted(metrics) == sorted(ref_metrics)
        out["metrics"] = max(out["metrics"], gap(metrics, {k: ref_metrics[k] for k in metrics}))
        out["params"] = max(out["params"], gap(state.params, ref.params))
        out["opt_state"] = max(out["opt_state"], gap(state.opt_state, ref.opt_state))
        out.setdefault("num_examples", []).append(int(metrics["num_examples"]))
        out.setdefault("clipped_fraction", []).append(float(metrics["clipped_fraction"]))
        out.setdefault("ref_clipped_fraction", []).append(float(ref_metrics["clipped_fraction"]))
        out.setdefault("loss", []).append(float(metrics["loss"]))
        out.setdefault("ref_loss", []).append(float(ref_metrics["loss"]))
        if s == 0:
            # sgd with momentum from zero: the first update of z is -0.5 · σCξ / B.
            z = state.params["z"] / -0.5
            out["z_std"], out["z_mean"] = z.std().item(), z.mean().item()
    out["digest"] = digest([state.params, state.opt_state])
    return out


UNEQUAL = [[3, 6], [5, 2], [1, 7]]
EMPTY = [[0, 5], [4, 0], [0, 0], [2, 3]]

PROBES = {
    "unequal": lambda r, g, o: run(r, g, UNEQUAL, 0.0),
    "empty": lambda r, g, o: run(r, g, EMPTY, 0.0),
    "micro": lambda r, g, o: run(r, g, [[5, 1], [0, 4], [3, 3]], 0.0, micro_batches=2),
    "noisy": lambda r, g, o: run(r, g, UNEQUAL, 1.3),
    "noisy_micro_empty": lambda r, g, o: run(r, g, EMPTY, 1.3, micro_batches=2),
}


def probe_seed_per_rank(rank, group, out_dir) -> dict:
    """Ranks whose dp_noisy_mean has other seeds: refused on every rank, state untouched."""
    try:
        run(rank, group, UNEQUAL[:1], 1.0, seed=rank)
    except dist.RankMismatchError as err:
        return {"raised": str(err)}
    return {"raised": None}


PROBES["seed_per_rank"] = probe_seed_per_rank


if __name__ == "__main__":
    gloo_jobs.run_probes(PROBES, init_timeout=30, group_timeout=30)
