"""Worker of ``test_zero_noise.py``: one rank of a 2-rank gloo job on loopback.

Each probe runs a ``shard_optimizer=True`` data-parallel step with noise on this rank's share
of a global batch and, on every rank, the single-process step on the whole batch, in float64,
and reports the gaps, a hash of the parameters (the ranks must end bit-for-bit equal) and how
far the noise moved the parameters (so a run whose noise vanished cannot pass). Not collected
by pytest.
"""

from __future__ import annotations

import gloo_jobs
import torch
from gloo_jobs import digest, gap, shares

import functrain as ft
from functrain import distributed as dist

C = 1.0
B_EXPECTED = 8.0
SIGMA = 1.3
# Pieces on 2 ranks: "row" (1, 8) and "mat" (3, 5) are cut along dim 1, "col" (4, 3) and
# "vec" (5,) along dim 0 ("vec" unevenly, 3 + 2), "b" is 0-d (replicated, owned by rank 0).
SHAPES = {"row": (1, 8), "mat": (3, 5), "col": (4, 3), "vec": (5,), "b": ()}
UNEQUAL = [[3, 6], [5, 2], [1, 7]]
EMPTY = [[0, 5], [4, 0], [0, 0]]


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def loss_fn(p, batch):
    x = batch["x"]  # (n, 8)
    h = x @ p["row"].T  # (n, 1)
    m = x[:, :3] @ p["mat"] + x[:, 3:8] @ p["vec"].unsqueeze(1)  # (n, 5) via broadcasting
    c = x[:, :4] @ p["col"]  # (n, 3)
    pred = h.squeeze(1) + 0.3 * m.tanh().sum(1) + 0.2 * c.sin().sum(1) + p["b"]
    return (pred - batch["y"]).square().mean()


def global_batch(step: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {
        "x": 0.4 * torch.randn(n, 8, generator=g, dtype=torch.float64),
        "y": torch.randn(n, generator=g, dtype=torch.float64),
    }


def run(rank, group, make_tx, plan, **step_kwargs) -> dict:
    """Sharded data-parallel run vs single-process run on the concatenated batches."""
    step = dist.make_data_parallel_train_step(
        loss_fn, make_tx(), group=group, shard_optimizer=True, **step_kwargs
    )
    ref_step = ft.make_train_step(loss_fn, make_tx(), **step_kwargs)
    state = step.init_state(params())
    ref = ft.TrainState.create(params=params(), tx=make_tx())
    out: dict = {"params": 0.0, "metrics": 0.0, "names": True}
    for s, sizes in enumerate(plan):
        whole = global_batch(s, sum(sizes))
        state, metrics = step(state, shares(whole, sizes, rank))
        ref, ref_metrics = ref_step(ref, whole)
        out["names"] &= sorted(metrics) == sorted(ref_metrics)
        out["metrics"] = max(out["metrics"], gap(metrics, {k: ref_metrics[k] for k in metrics}))
        out["params"] = max(out["params"], gap(state.params, ref.params))
    out["opt_state"] = gap(step.full_state(state).opt_state, ref.opt_state)
    out["digest"] = digest(state.params)
    out["metric_names"] = sorted(metrics)
    return out


def noisy_sgd_tx(eta: float = 0.5) -> ft.GradientTransformation:
    return ft.noisy_sgd(0.1, eta=eta, gamma=0.55, seed=3)


def adam_noise_tx(eta: float = 0.5) -> ft.GradientTransformation:
    # Noise after adam (before it, adam's first step would normalize most of it away).
    return ft.chain(ft.adam(0.05), ft.add_noise(0.01 * eta, 0.55, key=11))


def injected_noise_tx(eta: float = 0.5) -> ft.GradientTransformation:
    return ft.chain(ft.inject_hyperparams(ft.add_noise)(eta=eta, gamma=0.55, key=5), ft.sgd(0.1))


def dp_tx(noise: float = SIGMA) -> ft.GradientTransformation:
    return ft.chain(ft.dp_noisy_mean(C, noise, B_EXPECTED, 7), ft.sgd(0.5, momentum=0.9))


def with_noise_gap(rank, group, make_tx, plan, **kw) -> dict:
    """The run, plus how far the noise moved the parameters from a noise-free run's."""
    out = run(rank, group, make_tx, plan, **kw)
    quiet = dist.make_data_parallel_train_step(
        loss_fn, make_tx(0.0), group=group, shard_optimizer=True, **kw
    )
    q_state = quiet.init_state(params())
    noisy = dist.make_data_parallel_train_step(
        loss_fn, make_tx(), group=group, shard_optimizer=True, **kw
    )
    n_state = noisy.init_state(params())
    for s, sizes in enumerate(plan[:1]):
        batch = shares(global_batch(s, sum(sizes)), sizes, rank)
        q_state, _ = quiet(q_state, batch)
        n_state, _ = noisy(n_state, batch)
    # Per leaf: the smallest noise effect, so every leaf (each cut, the 0-d one) is noised.
    out["noise_effect"] = min(
        (n_state.params[k] - q_state.params[k]).abs().max().item() for k in SHAPES
    )
    return out


PROBES = {
    "noisy_sgd": lambda r, g, o: with_noise_gap(r, g, noisy_sgd_tx, UNEQUAL),
    "adam_noise": lambda r, g, o: with_noise_gap(r, g, adam_noise_tx, UNEQUAL, micro_batches=1),
    "injected_noise": lambda r, g, o: with_noise_gap(r, g, injected_noise_tx, UNEQUAL),
    "dp": lambda r, g, o: with_noise_gap(r, g, dp_tx, UNEQUAL, per_example_clip=C),
    "dp_micro_empty": lambda r, g, o: with_noise_gap(
        r, g, dp_tx, EMPTY, per_example_clip=C, micro_batches=2
    ),
}


if __name__ == "__main__":
    gloo_jobs.run_probes(PROBES, init_timeout=30, group_timeout=30)
