"""The first step's check that all ranks agree (internal).

Ranks that silently differ (other parameter values because the initial parameters were not
broadcast, other shapes, a mean loss on one rank and a ``LossSum`` on another) would train
different models or send collectives of different sizes. One ``all_gather_object`` of a small
description on the first call turns that into a :class:`RankMismatchError` raised on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist

from functrain import tree
from functrain.distributed import process
from functrain.distributed.errors import RankMismatchError


def check_ranks_agree(
    params: Any,
    opt_state: Any,
    buffers: Any,
    metric_names: list[str],
    is_sum: bool,
    group: process.Group,
) -> None:
    """Raises :class:`RankMismatchError` on every rank if the ranks' descriptions differ."""
    world = process.world_size(group)
    if world == 1:
        return
    paths, leaves, _ = tree.flatten_with_paths(params)
    with torch.no_grad():  # checksums: one host read, on the first call only
        sums = [x.double().sum() for x in leaves] + [x.double().square().sum() for x in leaves]
        checksums = torch.stack(sums).tolist() if sums else []
    signature = {
        "parameter shapes and dtypes": [
            (tree.path_str(p, "params"), tuple(x.shape), str(x.dtype))
            for p, x in zip(paths, leaves)
        ],
        "parameter values (checksums)": checksums,
        "loss kind": "LossSum" if is_sum else "mean",
        "metric names": metric_names,
        "buffers": [(tuple(x.shape), str(x.dtype)) for x in tree.leaves(buffers)],
        "optimizer state": [
            (tuple(x.shape), str(x.dtype))
            for x in tree.leaves(opt_state)
            if isinstance(x, torch.Tensor)
        ],
    }
    gathered: list[Any] = [None] * world
    with process.collective_errors("the first step's check that all ranks agree", group):
        tdist.all_gather_object(gathered, signature, group=group)
    problems = [
        f"{what}: rank {r} differs from rank 0"
        for r, other in enumerate(gathered)
        for what in signature
        if other[what] != gathered[0][what]
    ]
    if problems:
        hint = (
            " (start from the same parameters: step.init_state(...) broadcasts rank 0's)"
            if any("values" in p for p in problems)
            else ""
        )
        raise RankMismatchError("ranks disagree: " + "; ".join(problems) + hint)
