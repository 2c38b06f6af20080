"""Muon: one update of ``ft.muon`` vs ``torch.optim.Muon`` on the same matrices.

PyTorch always runs the Newton–Schulz iteration in bfloat16; ``ft.muon`` runs it in the
gradient's precision unless ``ns_dtype=torch.bfloat16``, so both rows are timed. functrain's
update is the pure one (``tx.update`` + ``ft.apply_updates``: fresh tensors), which is also
what a train step runs for Muon. The check: after a few steps, ``ft.muon(ns_dtype=bfloat16)``
(without Nesterov, whose bias correction differs from PyTorch's) is within bfloat16 rounding of
``torch.optim.Muon``'s parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import functrain as ft
from benchmarks import Section, interleaved_medians, synced

LAYOUTS = {
    "10 × 512×512": [(512, 512)] * 10,
    "4 × (1024×256, 256×1024)": [(1024, 256), (256, 1024)] * 4,
}
QUICK_LAYOUTS = {"4 × 64×64": [(64, 64)] * 4}
LR, WEIGHT_DECAY, MOMENTUM = 0.02, 0.1, 0.9
TORCH = "torch.optim.Muon (bfloat16 iteration)"


def _params(shapes: list[tuple[int, int]], seed: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(s, generator=gen).to(device) for i, s in enumerate(shapes)}


def _functrain(params: dict[str, torch.Tensor], grads: Any, **kw: Any) -> Callable[[], Any]:
    tx = ft.muon(LR, beta=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=False, **kw)
    box = {"p": {k: v.clone() for k, v in params.items()}}
    box["s"] = tx.init(box["p"])

    def run() -> Any:
        updates, box["s"] = tx.update(grads, box["s"], box["p"])
        box["p"] = ft.apply_updates(box["p"], updates)
        return box["p"]

    return run


def _torch(params: dict[str, torch.Tensor], grads: Any) -> tuple[Callable[[], Any], list[Any]]:
    mine = [torch.nn.Parameter(v.clone()) for v in params.values()]
    for p, g in zip(mine, grads.values()):
        p.grad = g.clone()
    opt = torch.optim.Muon(
        mine, lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, nesterov=False
    )
    return opt.step, mine


def run(quick: bool, device: str = "cpu") -> Section:
    """Times one Muon update and checks the bfloat16 iteration against PyTorch's."""
    layouts = QUICK_LAYOUTS if quick else LAYOUTS
    section = Section(f"Muon update ({device.upper()})")
    for layout, shapes in layouts.items():
        params, grads = _params(shapes, 0, device), _params(shapes, 1, device)
        torch_step, torch_params = _torch(params, grads)
        bf16 = _functrain(params, grads, ns_dtype=torch.bfloat16)
        steps = 3
        for _ in range(steps):
            torch_step()
            got = bf16()
        gap = max(float((got[k] - p.detach()).abs().max()) for k, p in zip(got, torch_params))
        bound = steps * LR * 2 * 2**-6  # updates of size lr·√max(1, out/in)·O(1), bf16-rounded
        section.checks.append(
            (
                f"{layout}: ft.muon(ns_dtype=bfloat16) = torch.optim.Muon",
                gap < bound,
                f"max |Δp| {gap:.1e}, bound {bound:.1e}",
            )
        )
        fns = {
            TORCH: torch_step,
            "ft.muon (float32 iteration, default)": _functrain(params, grads),
            "ft.muon(ns_dtype=torch.bfloat16)": bf16,
        }
        fns = {label: synced(fn, device) for label, fn in fns.items()}
        times = interleaved_medians(fns, repeats=3 if quick else 9, warmup=1)
        for method, seconds in times.items():
            section.rows.append(
                {
                    "layout": layout,
                    "method": method,
                    "ms": 1e3 * seconds,
                    "× torch.optim.Muon": seconds / times[TORCH],
                }
            )
    section.notes.append(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); interleaved medians of "
        "one update (functrain: tx.update + apply_updates); weight decay 0.1, no Nesterov."
    )
    return section
