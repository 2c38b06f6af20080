"""Worker of ``test_dp_failure_review.py``: one rank of a 2-rank gloo job on loopback.

A second look at the data-parallel step's failure agreement (a rank whose own part of the step
raises makes every rank raise): errors that cannot be rendered, huge or unpicklable ones,
chained ones with notes, different errors on both ranks, ``NonFiniteError`` on one rank and
another error on the other, aux metrics whose names changed before the failing call, seeded
runs of failing and healthy calls (random failing ranks, batch sizes, empty batches, ZeRO-1,
DP-SGD with Poisson-sized batches, ``noise_scale_hook(cosine=True)``) compared bit for bit with
runs that never failed, ``compile=`` after a first-call failure, and a ``KeyboardInterrupt`` on
one rank mid-step. Each probe records what every rank raised; the group's timeout
(``GROUP_TIMEOUT``) turns a rank left waiting in a collective into a failed probe instead of a
hung job. Not collected by pytest.
"""

from __future__ import annotations

import datetime
import os
import random
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import _dp_eager_failure_worker as base
import gloo_jobs
import torch
import torch.distributed as tdist
from _dp_eager_failure_worker import digest, params, state_digest
from gloo_jobs import in_step

import functrain as ft
from functrain import distributed as dist

GROUP_TIMEOUT = 30  # a rank left waiting fails its probe after this long, not the whole job
SHORT_TIMEOUT = 4  # the interrupt probe's group: its healthy rank waits this long, by design
VOCAB = base.VOCAB
# What this rank's loss raises on the call being attempted (a factory), if anything.
FAIL: dict[str, Callable[[], BaseException] | None] = {"make": None}
CALLS: dict[str, int] = {"n": 0}  # loss evaluations on this rank (aux_names_change)


def _maybe_fail() -> None:
    make = FAIL["make"]
    if make is not None:
        raise make()


def flag_loss(p: Any, b: Any) -> torch.Tensor:
    """The eager failure worker's loss, raising ``FAIL["make"]()`` where it is set."""
    _maybe_fail()
    return base.loss_fn(p, b)


def flag_rich_loss(p: Any, b: Any, buffers: Any = None) -> ft.LossOutput:
    """The rich ``LossSum`` loss with buffers, raising ``FAIL["make"]()`` where it is set."""
    _maybe_fail()
    return base.rich_loss(p, b, buffers)


def batch_of(seed: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        "ids": torch.randint(0, VOCAB, (n,), generator=g),
        "x": torch.randn(n, 4, generator=g, dtype=torch.float64),
        "y": torch.randn(n, generator=g, dtype=torch.float64),
    }


def raised(err: BaseException) -> dict:
    """What a probe records of an exception (robust to one that cannot be rendered)."""
    try:
        message = str(err)
    except Exception as bad:
        message = f"<str failed: {type(bad).__name__}>"
    return {
        "type": f"{type(err).__module__}.{type(err).__qualname__}",
        "message": message[:5000],
        "length": len(message),
        "notes": list(getattr(err, "__notes__", [])),
        "cause": None if err.__cause__ is None else type(err.__cause__).__name__,
        "frames": [f.name for f in traceback.extract_tb(err.__traceback__)],
    }


def attempt(step: Any, state: Any, batch: Any, fail: Callable[[], BaseException] | None) -> dict:
    """``step(state, batch)`` with this rank's loss raising ``fail()`` (if given): what it
    raised (any ``BaseException``) and how long it took."""
    FAIL["make"] = fail
    start = time.monotonic()
    try:
        step(state, batch)
        out: dict = {"raised": None}
    except BaseException as err:  # KeyboardInterrupt included: the probe records it
        out = {"raised": raised(err)}
    finally:
        FAIL["make"] = None
    out["seconds"] = time.monotonic() - start
    return out


def make(group: Any, loss: Any = flag_loss, tx: Any = None, **kw: Any) -> Callable[[], Any]:
    return lambda: dist.make_data_parallel_train_step(
        loss, tx if tx is not None else ft.adam(0.05), group=group, **kw
    )


def later_failure(
    rank: int,
    group: Any,
    fails: dict[int, Callable[[], BaseException]],
    *,
    at: int = 1,
    step_maker: Callable[[], Any] | None = None,
) -> dict:
    """Calls ``0..at-1`` healthy, call ``at`` with rank ``r``'s loss raising ``fails[r]()``,
    then the same call again, healthy, and one more: both must go on as a fresh run that
    never failed (bit for bit), and the state given to the failed call must be untouched."""
    step = (step_maker or make(group))()
    state = step.init_state(params())
    for s in range(at):
        state, _ = step(state, base.share(s, rank))
    before = state_digest(state)
    out = attempt(step, state, base.share(at, rank), fails.get(rank))
    out["in_step"] = in_step(group, rank)
    out["untouched"] = state_digest(state) == before
    for s in (at, at + 1):
        state, _ = step(state, base.share(s, rank))
    fresh = (step_maker or make(group))()
    ref = fresh.init_state(params())
    for s in range(at + 2):
        ref, _ = fresh(ref, base.share(s, rank))
    out["same_as_fresh"] = state_digest(state) == state_digest(ref)
    return out


class Unrenderable(Exception):
    """An error whose ``str`` and ``repr`` raise (a broken ``__str__`` in user code). Not a
    ``RuntimeError``: the gradient stage reads those errors' messages itself (looking for
    torch.func's saved-tensor-hooks refusal), and the error ``str`` raises there replaces it."""

    def __str__(self) -> str:
        raise ValueError("this error cannot be rendered")

    def __repr__(self) -> str:
        raise ValueError("nor represented")


class Unpicklable(RuntimeError):
    """An error holding a lock, a lambda and a meta tensor: none of them pickles."""

    def __init__(self) -> None:
        super().__init__("an unpicklable error (simulated on rank 1)")
        self.lock = threading.Lock()
        self.fn = lambda: 0
        self.tensor = torch.empty(3, device="meta")


def chained() -> BaseException:
    """``raise ValueError(...) from KeyError(...)`` with a note of its own."""
    try:
        raise KeyError("the inner cause")
    except KeyError as inner:
        err = ValueError("the outer error (simulated on rank 1)")
        err.__cause__ = inner
        err.add_note("a note added by the user's code")
        return err


HUGE = 10_000_000


def unrenderable_later(rank: int, group: Any, out_dir: str) -> dict:
    return later_failure(rank, group, {1: Unrenderable})


def unrenderable_first(rank: int, group: Any, out_dir: str) -> dict:
    return later_failure(rank, group, {1: Unrenderable}, at=0)


def huge_message(rank: int, group: Any, out_dir: str) -> dict:
    return later_failure(rank, group, {1: lambda: RuntimeError("x" * HUGE)})


def unpicklable(rank: int, group: Any, out_dir: str) -> dict:
    return later_failure(rank, group, {1: Unpicklable})


def chained_with_notes(rank: int, group: Any, out_dir: str) -> dict:
    return later_failure(rank, group, {1: chained})


def different_types(rank: int, group: Any, out_dir: str) -> dict:
    fails = {0: lambda: ValueError("rank 0's own error"), 1: lambda: IndexError("rank 1's own")}
    return later_failure(rank, group, fails)


def nan_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**batch, "y": torch.full_like(batch["y"], float("nan"))}


def nonfinite(rank: int, group: Any, out_dir: str) -> dict:
    """``max_consecutive_skips=0``: call 1 is non-finite on every rank (skipped), so call 2
    raises ``NonFiniteError`` from the replicated skip counter, on every rank alike (``both``),
    or on rank 0 while rank 1's own checks raise first (``mixed``: a state made for another
    optimizer)."""
    out: dict = {}
    for name in ("both", "mixed"):
        step = make(group, max_consecutive_skips=0)()
        state = step.init_state(params())
        state, _ = step(state, base.share(0, rank))
        state, m = step(state, nan_batch(base.share(1, rank)))
        out[f"{name}_skipped"] = int(m["skipped"])
        given = state
        if name == "mixed" and rank == 1:
            given = state.replace(opt_state=ft.sgd(0.1, momentum=0.9).init(state.params))
        out[name] = attempt(step, given, base.share(2, rank), None)
        out[name]["in_step"] = in_step(group, rank)
    return out


def aux_loss(p: Any, b: Any) -> ft.LossOutput:
    """A loss whose aux metrics gain a name from its third evaluation on (every rank alike)."""
    CALLS["n"] += 1
    _maybe_fail()
    err = base._hidden(p, b) - b["y"]
    aux = {"abs": err.abs().mean()}
    if CALLS["n"] > 2:
        aux["late"] = err.square().max()
    return ft.LossOutput(err.square().mean(), aux=aux)


def aux_names_change(rank: int, group: Any, out_dir: str) -> dict:
    """Calls 0 and 1 report one aux metric, later calls two; call 3 fails on rank 1."""
    CALLS["n"] = 0
    step = make(group, aux_loss)()
    state = step.init_state(params())
    for s in range(3):
        state, m = step(state, base.share(s, rank))
    out = attempt(
        step, state, base.share(3, rank), (lambda: RuntimeError("late")) if rank else None
    )
    out["in_step"] = in_step(group, rank)
    state, m = step(state, base.share(3, rank))
    out["names"] = sorted(m)
    return out


def after_mismatch(rank: int, group: Any, out_dir: str) -> dict:
    """The first call finds the ranks' parameters differ (no broadcast): RankMismatchError on
    every rank. From broadcast parameters, the next call (still checked as a first call) fails
    on rank 1; then two healthy calls, which must equal a fresh run's."""
    step = make(group)()
    mine = params()
    if rank == 1:
        mine = {k: v + 1 for k, v in mine.items()}
    out = {
        "mismatch": attempt(step, step.init_state(mine, broadcast=False), base.share(0, rank), None)
    }
    state = step.init_state(params())
    before = state_digest(state)
    fail = (lambda: RuntimeError("after the mismatch")) if rank == 1 else None
    out["failure"] = attempt(step, state, base.share(0, rank), fail)
    out["untouched"] = state_digest(state) == before
    for s in (0, 1):
        state, _ = step(state, base.share(s, rank))
    fresh = make(group)()
    ref = fresh.init_state(params())
    for s in (0, 1):
        ref, _ = fresh(ref, base.share(s, rank))
    out["same_as_fresh"] = state_digest(state) == state_digest(ref)
    out["in_step"] = in_step(group, rank)
    return out


# -- seeded runs of failing and healthy calls ---------------------------------------------


def plan(seed: int, calls: int, lo: int, hi: int) -> list[tuple[tuple[int, ...], list[int]]]:
    """Every call's failing ranks and both ranks' batch sizes (the same on every rank): new
    batch shapes arrive on failing calls and healthy ones alike."""
    rnd = random.Random(seed)
    out = []
    for _ in range(calls):
        failing = rnd.choice([(), (), (), (0,), (1,), (0, 1)])
        sizes = [rnd.randint(lo, hi) for _ in range(2)]
        for r in failing:  # a failing rank's loss runs on its own examples
            sizes[r] = max(sizes[r], 2)
        out.append((failing, sizes))
    if seed % 2 == 0:  # the first call fails (its checks' exchange carries the failure)
        out[0] = ((1,), [hi, hi])
    if lo == 0:  # an empty batch on one rank while the other fails, and the other way round
        out[4], out[6] = ((1,), [0, hi]), ((0,), [hi - 1, 0])
    return out


def seeded(
    rank: int,
    group: Any,
    maker: Callable[[], Any],
    *,
    seed: int,
    lo: int,
    hi: int,
    calls: int = 10,
    buffers: Any = None,
    donate: bool = True,
) -> dict:
    """``calls`` calls of a seeded plan; then a fresh step on the calls that succeeded only.

    Records each call's outcome (``ok`` or the type raised), whether every failed call left
    its state untouched, and whether the final state and every successful call's metrics
    equal the never-failing run's, bit for bit.
    """
    steps = plan(seed, calls, lo, hi)
    step = maker()
    state = step.init_state(params(), buffers=buffers)
    outcomes: list[str] = []
    metrics: list[str] = []
    untouched = True
    for c, (failing, sizes) in enumerate(steps):
        batch = gloo_jobs.shares(batch_of(c, sum(sizes)), sizes, rank)
        FAIL["make"] = (lambda: RuntimeError(f"call {c}")) if rank in failing else None
        before = state_digest(state)
        try:
            state, m = step(state, batch)
            outcomes.append("ok")
            metrics.append(digest(m))
        except Exception as err:
            outcomes.append(type(err).__name__)
            untouched = untouched and state_digest(state) == before
        finally:
            FAIL["make"] = None
    fresh = maker()
    ref = fresh.init_state(params(), buffers=buffers)
    ref_metrics = []
    for c, (_, sizes) in enumerate(steps):
        if outcomes[c] == "ok":
            ref, m = fresh(ref, gloo_jobs.shares(batch_of(c, sum(sizes)), sizes, rank))
            ref_metrics.append(digest(m))
    return {
        "outcomes": outcomes,
        "untouched": untouched,
        "same_as_fresh": state_digest(state) == state_digest(ref),
        "metrics_as_fresh": metrics == ref_metrics,
        "in_step": in_step(group, rank),
    }


def dp_tx() -> ft.GradientTransformation:
    return ft.chain(ft.dp_noisy_mean(1.0, 0.7, 6.0, 7), ft.sgd(0.3, momentum=0.9))


SEEDED = {
    "zero_rich": lambda g: dict(
        maker=make(g, flag_rich_loss, shard_optimizer=True, micro_batches=2, bucket_cap_mb=1e-4),
        lo=0,
        hi=6,
        buffers=base.BUFFERS,
    ),
    "dp_poisson": lambda g: dict(
        maker=make(g, tx=dp_tx(), per_example_clip=1.0, micro_batches=2), lo=0, hi=5
    ),
    "cosine_stats": lambda g: dict(
        maker=make(g, micro_batches=2, grad_stats=ft.noise_scale_hook(cosine=True)), lo=2, hi=6
    ),
    "autograd_no_donate": lambda g: dict(
        maker=make(g, tx=ft.sgd(0.1, momentum=0.9), grad_backend="autograd", donate=False),
        lo=0,
        hi=4,
    ),
}


def seeded_runs(rank: int, group: Any, out_dir: str) -> dict:
    return {
        f"{name}/{seed}": seeded(rank, group, seed=seed, **config(group))
        for name, config in SEEDED.items()
        for seed in (1, 2)
    }


# -- compile= after a first-call failure ---------------------------------------------------


def compiled_after_first_failure(rank: int, group: Any, out_dir: str) -> dict:
    """``compile=`` (aot_eager): rank 1's first call raises inside the compiled gradient region
    (an embedding id out of range); the retry and two more calls then compile nothing more
    than a run that never failed."""
    import torch._dynamo

    def run(fail_first: bool) -> tuple[str, int]:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        step = make(group, base.loss_fn, compile={"backend": "aot_eager"})()
        state = step.init_state(params())
        if fail_first:
            bad = base.with_bad_id(base.share(0, rank)) if rank == 1 else base.share(0, rank)
            out["failure"] = attempt(step, state, bad, None)
        for s in range(3):
            state, _ = step(state, base.share(s, rank))
        return state_digest(state), int(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    out: dict = {}
    failed, graphs = run(True)
    fresh, fresh_graphs = run(False)
    out.update(graphs=graphs, fresh_graphs=fresh_graphs, same_as_fresh=failed == fresh)
    return out


# -- a rank that leaves a call alone (last: their groups are left broken) -----------------


def lone_exit(
    rank: int, short: Any, maker: Callable[[Any], Any], at: int, fail: Any, device: bool
) -> dict:
    """Rank 1's call ``at`` ends on rank 1 alone (``fail()`` raised by its loss; with
    ``device``, as where the flags are not read on the host), while rank 0 waits in that call's
    collectives until its group's timeout (``SHORT_TIMEOUT``). Then both ranks call the step
    again and ``full_state``: rank 1's new collectives must not pair with rank 0's pending
    ones (the ranks would silently combine the batches of different calls)."""
    step = maker(short)()
    state = step.init_state(params())
    for s in range(at):
        state, _ = step(state, base.share(s, rank))
    if device:
        step._grad_zeros.on_host = False  # as a result whose loss lives on a GPU (NCCL)
    out: dict = {"first": attempt(step, state, base.share(at, rank), fail if rank else None)}
    out["again"] = attempt(step, state, base.share(at, rank), None)
    start = time.monotonic()
    try:
        step.full_state(state)
        out["full_state"] = None
    except Exception as err:
        out["full_state"] = raised(err)
    out["full_state_seconds"] = time.monotonic() - start
    return out


def lone_exits(rank: int, group: Any, out_dir: str) -> dict:
    def zero(g: Any) -> Callable[[], Any]:
        return make(g, shard_optimizer=True, donate=False)

    def plain(g: Any) -> Callable[[], Any]:
        return make(g, donate=False)

    scenarios = {
        "interrupt_later": (zero, 1, KeyboardInterrupt, False),
        "interrupt_first": (zero, 0, KeyboardInterrupt, False),
        "generator_exit": (plain, 1, GeneratorExit, False),
        "device_failure": (zero, 1, lambda: IndexError("rank 1 alone"), True),
    }
    # Made while both ranks are here: later, rank 0 comes a short timeout after rank 1.
    timeout = datetime.timedelta(seconds=SHORT_TIMEOUT)
    shorts = [tdist.new_group(backend="gloo", timeout=timeout) for _ in scenarios]
    out = {}
    for short, (name, args) in zip(shorts, scenarios.items()):
        tdist.barrier(group=group)  # the probe's group, whose timeout is long
        out[name] = lone_exit(rank, short, *args)
    return out


PROBES = {
    "unrenderable_later": unrenderable_later,
    "unrenderable_first": unrenderable_first,
    "huge_message": huge_message,
    "unpicklable": unpicklable,
    "chained_with_notes": chained_with_notes,
    "different_types": different_types,
    "nonfinite": nonfinite,
    "aux_names_change": aux_names_change,
    "after_mismatch": after_mismatch,
    "seeded_runs": seeded_runs,
    "compiled_after_first_failure": compiled_after_first_failure,
    "lone_exits": lone_exits,  # last: it leaves groups broken
}


if __name__ == "__main__":
    # DP_FAILURE_PROBES=a,b runs only those probes (to show one on an old checkout).
    chosen = [n for n in os.environ.get("DP_FAILURE_PROBES", "").split(",") if n]
    probes = {n: PROBES[n] for n in chosen} if chosen else PROBES
    gloo_jobs.run_probes(probes, init_timeout=60, group_timeout=GROUP_TIMEOUT)
