"""One rank of test_plateau_dp.py's job (not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _plateau_worker.py OUT``.

Every rank runs ``STEPS`` data-parallel steps of ``tx()`` (a ``reduce_on_plateau`` chain, which
reads the loss as ``value=``) on its half of a fixed batch, eagerly and compiled, and records the
plateau state. Writes ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import gloo_jobs
import torch

import functrain as ft
from functrain import distributed as dist

STEPS = 6


def params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 1, generator=gen, dtype=torch.float64)}


def batch() -> dict[str, torch.Tensor]:
    """The global batch of 8 examples; rank r takes rows 4r .. 4r + 3."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    return {"x": x, "y": x[:, :1] * 3.0}


def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()


def tx() -> ft.GradientTransformation:
    # A rate too small to lower the loss beyond rtol: the loss plateaus and the scale drops.
    return ft.chain(ft.sgd(1e-9), ft.reduce_on_plateau(factor=0.5, patience=1))


def _plateau(state: ft.TrainState) -> dict:
    s = state.opt_state[1]
    return {f: float(getattr(s, f)) for f in ("scale", "best_value", "plateau_count", "count")}


def run(rank: int) -> dict:
    mine = {k: v[4 * rank : 4 * rank + 4] for k, v in batch().items()}
    out = {}
    for name, kw in (("eager", {}), ("compiled", {"compile": {"backend": "aot_eager"}})):
        step = dist.make_data_parallel_train_step(loss, tx(), donate=False, **kw)
        state = step.init_state(params())
        for _ in range(STEPS):
            state, _ = step(state, mine)
        out[name] = _plateau(state)
    return out


if __name__ == "__main__":
    gloo_jobs.run_worker(run, init_timeout=30)
