"""The first step's check that all ranks agree (internal).

Ranks that silently differ (other parameter values because the initial parameters were not
broadcast, other shapes, a mean loss on one rank and a ``LossSum`` on another) would train
different models or send collectives of different sizes. One ``all_gather_object`` of a small
description on the first call turns that into a :class:`RankMismatchError` raised on every rank.
The step's first-call checks (:func:`agree_first_call`, each a :class:`Check`: the ranks'
description by :func:`describe_ranks` and :func:`describe_noise_keys`, a ``grad_stats`` hook's
layout by :func:`describe_grad_stats`) also carry, in the first of their exchanges, whether a
rank's own part of the step raised.
:func:`check_layouts_agree` does the same for shapes and dtypes before ``init_state`` broadcasts
rank 0's parameters: a broadcast of buckets of different sizes silently fills a larger bucket
with rank 0's values or aborts the process whose bucket is smaller (gloo).
:func:`compare_noise_keys` compares the values of the 0-d integer optimizer-state leaves
(noise keys, counters), which must be equal for the ranks to add the same noise, and
:func:`compare_grad_stats` the layout of a ``grad_stats`` hook's gathered statistics. All
of them gather one description per rank (:func:`_gather`) and compare it with rank 0's.
:func:`check_no_rank_failed` gathers whether (and how) each rank's part of a step raised, so that
a rank-local failure (a loss that raises on one rank's batch, a compiled region that fails to
compile on one rank) raises on every rank instead of leaving the others in the step's
collectives until the group's timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as tdist

from functrain import tree
from functrain.distributed import process
from functrain.distributed.errors import DistributedStepError, RankMismatchError
from functrain.train.grad_stats import MicroBatchStats


def _gather(description: Any, group: process.Group, what: str) -> list[Any]:
    """Every rank's ``description``, in rank order (one object all-gather; a failure names
    ``what``)."""
    gathered: list[Any] = [None] * process.world_size(group)
    with process.collective_errors(what, group):
        tdist.all_gather_object(gathered, description, group=group)
    return gathered


def _differences(gathered: list[dict[str, Any]]) -> list[tuple[str, int, Any, Any]]:
    """``(entry, rank, rank 0's value, that rank's value)`` for each entry of a gathered
    description that differs from rank 0's."""
    return [
        (what, r, gathered[0][what], other[what])
        for r, other in enumerate(gathered)
        for what in gathered[0]
        if other[what] != gathered[0][what]
    ]


def describe_ranks(
    params: Any, opt_state: Any, buffers: Any, metric_names: list[str], is_sum: bool
) -> dict[str, Any]:
    """This rank's description for :func:`compare_ranks` (one host read of checksums)."""
    paths, leaves, _ = tree.flatten_with_paths(params)
    with torch.no_grad():  # checksums: one host read, on the first call only
        sums = [x.double().sum() for x in leaves] + [x.double().square().sum() for x in leaves]
        checksums = torch.stack(sums).tolist() if sums else []
    return {
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


def compare_ranks(gathered: list[dict[str, Any]]) -> None:
    """Raises :class:`RankMismatchError` (on every rank: all compare the same gathered
    descriptions) if the ranks' :func:`describe_ranks` differ."""
    problems = [f"{what}: rank {r} differs from rank 0" for what, r, _, _ in _differences(gathered)]
    if problems:
        hint = (
            " (start from the same parameters: step.init_state(...) broadcasts rank 0's)"
            if any("values" in p for p in problems)
            else ""
        )
        raise RankMismatchError("ranks disagree: " + "; ".join(problems) + hint)


def _layout(values: Any, name: str) -> list[tuple[str, tuple[int, ...], str]]:
    paths, leaves, _ = tree.flatten_with_paths(values)
    return [(tree.path_str(p, name), tuple(x.shape), str(x.dtype)) for p, x in zip(paths, leaves)]


def check_layouts_agree(params: Any, buffers: Any, group: process.Group) -> None:
    """Raises :class:`RankMismatchError` on every rank unless all ranks' parameters and buffers
    have the same paths, shapes and dtypes (one small object all-gather)."""
    world = process.world_size(group)
    if world == 1:
        return
    mine = {"parameters": _layout(params, "params"), "buffers": _layout(buffers, "buffers")}
    gathered = _gather(mine, group, "init_state's check that all ranks agree")
    problems = []
    for what, r, ours, theirs in _differences(gathered):
        first = next(
            (f"{a} on rank 0, {b} on rank {r}" for a, b in zip(ours, theirs) if a != b),
            f"{len(ours)} leaves on rank 0, {len(theirs)} on rank {r}",
        )
        problems.append(f"{what}: {first}")
    if problems:
        raise RankMismatchError(
            "init_state: ranks disagree on the structure, shapes or dtypes of "
            + "; ".join(problems)
            + " (every rank must build the same model before rank 0's values are broadcast)"
        )


def describe_noise_keys(opt_state: Any) -> list[int]:
    """The optimizer state's 0-d integer leaves (noise keys, counts) for
    :func:`compare_noise_keys` (one host read each, on the first call)."""
    return [
        x.item()
        for x in tree.leaves(opt_state)
        if isinstance(x, torch.Tensor)
        and x.dim() == 0
        and not (x.is_floating_point() or x.is_complex())
    ]


def compare_noise_keys(gathered: list[list[int]]) -> None:
    """Every rank's optimizer state holds the same 0-d integer leaves (noise keys, counts).

    The ranks draw noise (``dp_noisy_mean``, ``add_noise``) from the key in their optimizer
    state; with other keys (e.g. ``seed=rank``) they would add different noise and their
    parameters would silently part (under ZeRO-1, a 0-d parameter, which every rank updates
    whole). Only 0-d leaves: they are replicated even in a sharded state, whose other leaves
    are pieces that differ between ranks.
    """
    others = [r for r, theirs in enumerate(gathered) if theirs != gathered[0]]
    if others:
        raise RankMismatchError(
            f"ranks disagree: the optimizer state's integer leaves (the noise key of "
            f"dp_noisy_mean or add_noise, counters) of rank(s) {others} differ from rank 0's; "
            "the noise must be drawn once, identically, on every rank: build tx with the same "
            "seed on every rank"
        )


def describe_grad_stats(stats: MicroBatchStats) -> dict[str, Any]:
    """This rank's packing layout of a ``grad_stats`` hook's stats (``K``, value names and
    lengths, the accumulator's leaves) for :func:`compare_grad_stats`."""
    acc = []
    if stats.accumulated is not None:
        for leaf in tree.leaves(stats.accumulated):
            if isinstance(leaf, torch.Tensor):
                acc.append((tuple(leaf.shape), str(leaf.dtype)))
            elif isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
                acc.append(("number", leaf))
            else:
                raise TypeError(
                    "a grad_stats accumulator across ranks must hold tensors and numbers only "
                    f"(they are summed over the ranks), got a {type(leaf).__name__}"
                )
    return {
        "K (micro-batches per rank)": int(stats.sizes.numel()),
        "per_micro_batch values": [(k, int(v.numel())) for k, v in stats.values.items()],
        "accumulator": acc,
    }


def compare_grad_stats(gathered: list[dict[str, Any]]) -> None:
    """First call: every rank packs the same layout, else :class:`RankMismatchError` on every
    rank (the all-gather of the packed stats would mismatch)."""
    problems = [
        f"{what}: {ours!r} on rank 0, {theirs!r} on rank {r}"
        for what, r, ours, theirs in _differences(gathered)
    ]
    if problems:
        raise RankMismatchError(
            "grad_stats across ranks: ranks disagree on " + "; ".join(problems) + " (every "
            "rank must split its batch into the same number K of micro-batches: give the "
            "same micro_batches count on every rank)"
        )


class Check(NamedTuple):
    """One of the first call's checks: what its exchange is called, this rank's description
    (a function: a rank whose part of the step raised has none) and the comparison of all
    ranks' descriptions, which raises on every rank alike."""

    what: str
    describe: Callable[[], Any]
    compare: Callable[[list[Any]], None]


def agree_first_call(
    error: Exception | None,
    checks: list[Check],
    group: process.Group,
    failed_what: str,
    on_lost: Callable[[Exception], None] | None = None,
) -> None:
    """The step's first-call checks, the first of whose exchanges also tells every rank
    whether a rank's own part of the step (``failed_what``) raised ``error``.

    A rank that failed calls it with its ``error`` (its descriptions are not made); the first
    exchange then raises on every rank as :func:`check_no_rank_failed` does, before anything is
    compared. Without checks, the failures travel in one object all-gather of their own.
    Every rank must call it with the same number of checks. ``on_lost`` is told of an
    exchange that failed (a collective error), before the error propagates.
    """
    if not checks:
        check_no_rank_failed(error, group, failed_what, on_lost=on_lost)
        return
    descriptions: list[Any] = [None] * len(checks)
    if error is None:
        # Every description before the first exchange: one that raises on a rank (e.g. a
        # refused grad_stats accumulator) rides in it, and every rank raises, instead of
        # leaving the others in a later exchange.
        try:
            descriptions = [check.describe() for check in checks]
        except Exception as err:
            error = err
    gathered = check_no_rank_failed(
        error,
        group,
        failed_what,
        description=descriptions[0],
        exchange=checks[0].what,
        on_lost=on_lost,
    )
    checks[0].compare(gathered)
    for check, description in zip(checks[1:], descriptions[1:]):
        try:
            others = _gather(description, group, check.what)
        except Exception as lost:
            if on_lost is not None:
                on_lost(lost)
            raise
        check.compare(others)


_MESSAGE_CHARS = 600  # of each failing rank's error in the others' message


def _describe(error: BaseException) -> str:
    """``module.Type: message`` (``Type: message`` for builtins), the message's first paragraph
    only (dynamo's go on with user-code stacks and hints, which the failing rank prints).

    Never raises: the failing rank describes its error just before the exchange the others
    wait in, so an error whose ``__str__`` raises must not keep it from that exchange.
    """
    kind = type(error)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    try:
        message = str(error).strip()
    except Exception as bad:
        message = f"<its message could not be rendered: str() raised {type(bad).__name__}>"
    first = message.split("\n\n", 1)[0]
    if len(first) > _MESSAGE_CHARS:
        first = first[:_MESSAGE_CHARS]
    if first != message:
        first += " [...]"
    return f"{name}: {first}" if first else name


def _add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``, skipped where the error's ``__notes__`` is not a list (the
    error itself is raised all the same)."""
    with contextlib.suppress(TypeError):
        error.add_note(note)


def check_no_rank_failed(
    error: Exception | None,
    group: process.Group,
    what: str,
    *,
    description: Any = None,
    exchange: str | None = None,
    on_lost: Callable[[Exception], None] | None = None,
) -> list[Any]:
    """Every rank tells the others whether its ``what`` raised ``error``; raises on every rank
    if one did (one small object all-gather, which every rank must call), else returns every
    rank's ``description`` (sent with it), in rank order.

    A rank whose ``error`` is not ``None`` raises it (the original exception, its traceback
    kept) with a note naming the failing ranks; the others raise :class:`DistributedStepError`
    naming each failing rank with its error's type and message. If the exchange itself fails
    (a peer died), a failing rank still raises its own error, with a note saying so.
    ``exchange`` names the all-gather in that case (default: after ``what``); ``on_lost`` is
    told of that failure (the collective's error) before anything is raised.
    """
    mine = (None if error is None else _describe(error), description)
    lost_note = None
    try:
        gathered = _gather(mine, group, exchange or f"the ranks' exchange after {what}")
    except Exception as lost:
        if on_lost is not None:
            on_lost(lost)
        if error is None:
            raise
        lost_note = (
            f"functrain: raised by {what} on this rank; telling the other ranks failed too "
            f"({_describe(lost)})"
        )
    if lost_note is not None:
        assert error is not None
        # Raised here, not in the handler above: its cause and context stay the error's own.
        _add_note(error, lost_note)
        raise error
    failed = [r for r, (d, _) in enumerate(gathered) if d is not None]
    if not failed:
        return [theirs for _, theirs in gathered]
    if error is not None:
        _add_note(
            error,
            f"functrain: raised by {what} on rank(s) {failed}, this rank ({process.rank(group)}) "
            "among them; every rank raises (the others DistributedStepError naming this error) "
            "and the state given to the step is untouched",
        )
        raise error
    errors = "; ".join(f"rank {r}: {gathered[r][0]}" for r in failed)
    raise DistributedStepError(
        f"{what} raised on rank(s) {failed} ({errors}); every rank raises (the failing ranks "
        "their own error), no rank took this step and the state given to it is untouched"
    )
