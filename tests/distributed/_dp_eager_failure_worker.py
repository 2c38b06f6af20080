"""Worker of ``test_dp_eager_failure.py``: one rank of a 2-rank gloo job on loopback.

An eager data-parallel step whose own part raises on rank 1 only, with the process staying
alive (the probe catches the error): a bad token id in rank 1's batch (``IndexError`` from the
embedding lookup, on micro-batch ``i > 0`` where ``K > 1``), a rank-specific shape, a
``grad_stats`` hook that raises, a state made for another optimizer. Each scenario records what
every rank raised and how long the call took, whether the ranks are still in step afterwards
(one all-reduce), whether the state given to the failed call is unchanged, and then retries the
same call on every rank with good data and goes on: the result must equal, bit for bit, a fresh
step's run on the good batches. ``GROUP_TIMEOUT`` is longer than the test's job timeout: a rank
left waiting in a collective fails the test instead of timing out on its own. Not collected by
pytest.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import gloo_jobs
import torch
import torch.distributed as tdist

import functrain as ft
from functrain import distributed as dist

GROUP_TIMEOUT = 300
SHORT_TIMEOUT = 5  # the group timeout of the probe that waits for it (device_flags)
SIZES = [5, 7]  # the ranks' batch sizes
VOCAB = 10
BAD_ID = 99  # an embedding row that does not exist: IndexError on the rank that holds it
HOOK_FAILURE = "per_micro_batch failed (simulated on rank 1)"
FAIL = {"hook": False}  # rank 1 turns it on around the failing call of the hook scenario


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb": torch.randn(VOCAB, 4, generator=g, dtype=torch.float64),
        "w": torch.randn(4, 6, generator=g, dtype=torch.float64),
        "v": torch.randn(6, generator=g, dtype=torch.float64),
    }


def global_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SIZES)
    return {
        "ids": torch.randint(0, VOCAB, (n,), generator=g),
        "x": torch.randn(n, 4, generator=g, dtype=torch.float64),
        "y": torch.randn(n, generator=g, dtype=torch.float64),
    }


def share(step: int, rank: int) -> dict[str, torch.Tensor]:
    return gloo_jobs.shares(global_batch(step), SIZES, rank)


def with_bad_id(batch: dict[str, torch.Tensor], row: int = -1) -> dict[str, torch.Tensor]:
    """``batch`` with one token id past the embedding (``row``: the last row by default, i.e.
    in the last micro-batch)."""
    ids = batch["ids"].clone()
    ids[row] = BAD_ID
    return {**batch, "ids": ids}


def with_wide_x(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` whose features have 5 columns instead of 4: a shape error in the loss."""
    return {**batch, "x": torch.cat([batch["x"], batch["x"][:, :1]], dim=1)}


def _hidden(p: Any, b: Any) -> torch.Tensor:
    return torch.tanh((b["x"] + p["emb"][b["ids"]]) @ p["w"]) @ p["v"]


def loss_fn(p: Any, b: Any) -> torch.Tensor:
    return (_hidden(p, b) - b["y"]).square().mean()


def rich_loss(p: Any, b: Any, buffers: Any = None) -> ft.LossOutput:
    """A ``LossSum`` loss with a ``LossSum`` and a mean aux metric and buffers: every
    collective of the step (counts, aux counts, buffers' broadcast)."""
    h = _hidden(p, b)
    err = h - b["y"]
    n = err.shape[0]
    return ft.LossOutput(
        ft.LossSum(err.square().sum(), n),
        aux={"abs": ft.LossSum(err.abs().sum(), n), "h": h.mean()},
        buffers={"mean": 0.9 * buffers["mean"] + 0.1 * h.detach().mean()},
    )


def failing_hook() -> ft.GradStatsHook:
    """A hook whose ``per_micro_batch`` raises while ``FAIL["hook"]`` is on (rank 1)."""

    def per_micro_batch(g: Any, b: torch.Tensor) -> dict[str, torch.Tensor]:
        if FAIL["hook"]:
            raise RuntimeError(HOOK_FAILURE)
        return {"sq": ft.tree.norm(g, squared=True)}

    def update(stats: Any, grads: Any, state: Any) -> tuple[dict, Any]:
        return {"hook/sq": stats.values["sq"].sum()}, state + stats.values["sq"].sum()

    return ft.GradStatsHook(
        init=lambda p: torch.zeros((), dtype=torch.float64),
        per_micro_batch=per_micro_batch,
        update=update,
        name="hook",
    )


def dp_tx() -> ft.GradientTransformation:
    return ft.chain(ft.dp_noisy_mean(1.0, 0.7, float(sum(SIZES)), 7), ft.sgd(0.3, momentum=0.9))


def _bytes(values: Any) -> Iterator[bytes]:
    for leaf in ft.tree.leaves(values):
        if isinstance(leaf, torch.Tensor):
            x = leaf.detach().contiguous()
            yield f"{x.dtype}{tuple(x.shape)}".encode()
            yield x.numpy().tobytes()
        else:
            yield repr(leaf).encode()


def digest(*values: Any) -> str:
    """A hash of every tensor's dtype, shape and bytes (and other leaves' reprs)."""
    h = hashlib.sha256()
    for value in values:
        for chunk in _bytes(value):
            h.update(chunk)
    return h.hexdigest()


def state_digest(state: ft.TrainState) -> str:
    return digest(state.step, state.params, state.opt_state, state.buffers, state.key, state.extra)


def scenario(
    rank: int,
    group: Any,
    make: Callable[[], dist.DataParallelTrainStep],
    *,
    steps: int,
    fail_at: int,
    spoil: Callable[[dict], dict] | None = None,
    wrong_state: Callable[[ft.TrainState], ft.TrainState] | None = None,
    buffers: Any = None,
    failing: tuple[int, ...] = (1,),
) -> dict:
    """``steps`` calls on this rank's shares; call ``fail_at`` is first attempted with the
    ``failing`` ranks' batches spoiled (``spoil``), states replaced (``wrong_state``) or hooks
    failing (neither given), then retried on every rank with the good batch and state. A fresh
    step on the good batches gives the reference."""
    step = make()
    state = step.init_state(params(), buffers=buffers)
    out: dict = {}
    metrics: dict = {}
    for s in range(steps):
        mine = share(s, rank)
        if s == fail_at:
            before = state_digest(state)
            given, bad_state = mine, state
            if rank in failing:
                if spoil is not None:
                    given = spoil(mine)
                elif wrong_state is not None:
                    bad_state = wrong_state(state)
                else:
                    FAIL["hook"] = True
            try:
                out["failure"] = gloo_jobs.attempt(step, bad_state, given)
            finally:
                FAIL["hook"] = False
            out["in_step"] = gloo_jobs.in_step(group, rank)
            out["untouched"] = state_digest(state) == before  # raises if it was consumed
        state, metrics = step(state, mine)  # the retry (donate=True: the state is usable)
    fresh = make()
    ref = fresh.init_state(params(), buffers=buffers)
    ref_metrics: dict = {}
    for s in range(steps):
        ref, ref_metrics = fresh(ref, share(s, rank))
    out["same_as_fresh"] = state_digest(state) == state_digest(ref)
    out["metrics_as_fresh"] = digest(metrics) == digest(ref_metrics)
    out["digest"] = digest(state.params, state.buffers)  # replicated (ZeRO: not opt_state)
    out["steps"] = int(state.step)
    return out


def make(group: Any, loss: Any = loss_fn, tx: Any = None, **kw: Any) -> Callable[[], Any]:
    return lambda: dist.make_data_parallel_train_step(
        loss, tx if tx is not None else ft.adam(0.05), group=group, **kw
    )


BUFFERS = {"mean": torch.zeros((), dtype=torch.float64)}


def first_call(rank: int, group: Any, out_dir: str) -> dict:
    return scenario(rank, group, make(group), steps=2, fail_at=0, spoil=with_bad_id)


def first_call_no_checks(rank: int, group: Any, out_dir: str) -> dict:
    step = make(group, check_ranks=False, micro_batches=2)
    return scenario(rank, group, step, steps=2, fail_at=0, spoil=with_bad_id)


def both_later(rank: int, group: Any, out_dir: str) -> dict:
    """Both ranks' batches hold a bad id: each raises its own error."""
    step = make(group, micro_batches=2)
    return scenario(rank, group, step, steps=3, fail_at=1, spoil=with_bad_id, failing=(0, 1))


def later_k3(rank: int, group: Any, out_dir: str) -> dict:
    step = make(group, rich_loss, micro_batches=3)
    return scenario(rank, group, step, steps=4, fail_at=2, spoil=with_bad_id, buffers=BUFFERS)


def later_autograd(rank: int, group: Any, out_dir: str) -> dict:
    step = make(group, micro_batches=2, grad_backend="autograd", tx=ft.sgd(0.1, momentum=0.9))
    return scenario(rank, group, step, steps=3, fail_at=1, spoil=with_bad_id)


def later_shape(rank: int, group: Any, out_dir: str) -> dict:
    return scenario(rank, group, make(group), steps=3, fail_at=1, spoil=with_wide_x)


def later_wrong_state(rank: int, group: Any, out_dir: str) -> dict:
    def wrong(state: ft.TrainState) -> ft.TrainState:  # a state restored for another optimizer
        return state.replace(opt_state=ft.sgd(0.1, momentum=0.9).init(state.params))

    return scenario(rank, group, make(group), steps=3, fail_at=1, wrong_state=wrong)


def dp_first(rank: int, group: Any, out_dir: str) -> dict:
    step = make(group, tx=dp_tx(), per_example_clip=1.0, micro_batches=2)
    return scenario(rank, group, step, steps=2, fail_at=0, spoil=with_bad_id)


def dp_later(rank: int, group: Any, out_dir: str) -> dict:
    step = make(group, tx=dp_tx(), per_example_clip=1.0, micro_batches=2)
    return scenario(rank, group, step, steps=3, fail_at=1, spoil=with_bad_id)


def zero_first(rank: int, group: Any, out_dir: str) -> dict:
    step = make(group, shard_optimizer=True)
    return scenario(rank, group, step, steps=2, fail_at=0, spoil=with_bad_id)


def zero_later(rank: int, group: Any, out_dir: str) -> dict:
    step = make(group, rich_loss, shard_optimizer=True, micro_batches=2)
    return scenario(rank, group, step, steps=3, fail_at=1, spoil=with_bad_id, buffers=BUFFERS)


def stats_later(rank: int, group: Any, out_dir: str) -> dict:
    # cosine=True: an accumulator, summed over the ranks (one more all-reduce to join).
    hook = ft.noise_scale_hook(cosine=True)
    step = make(group, micro_batches=2, grad_stats=hook)
    return scenario(rank, group, step, steps=3, fail_at=1, spoil=with_bad_id)


def hook_first(rank: int, group: Any, out_dir: str) -> dict:
    step = make(group, micro_batches=2, grad_stats=failing_hook())
    return scenario(rank, group, step, steps=2, fail_at=0)


def hook_later(rank: int, group: Any, out_dir: str) -> dict:
    step = make(group, micro_batches=2, grad_stats=failing_hook())
    return scenario(rank, group, step, steps=3, fail_at=1)


def device_flags(rank: int, group: Any, out_dir: str) -> dict:
    """What a later failure does where the flags are not read on the host (device tensors,
    NCCL), simulated on CPU: the failing rank raises at once, alone; the others wait in the
    step's collectives until the group's timeout (here 5 s) and then raise. Run last: the
    group is left broken."""
    short = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=SHORT_TIMEOUT))
    step = make(short)()
    state = step.init_state(params())
    state, _ = step(state, share(0, rank))
    assert step._grad_zeros is not None
    step._grad_zeros.on_host = False  # as a result whose loss lives on a GPU
    bad = with_bad_id(share(1, rank)) if rank == 1 else share(1, rank)
    out = gloo_jobs.attempt(step, state, bad)
    if rank == 1:
        time.sleep(SHORT_TIMEOUT + 2)  # alive, as a job that caught the error: rank 0 times out
    return out


def collectives(rank: int, group: Any, out_dir: str) -> dict:
    """The collectives of each call: four healthy ones, then one failing on rank 1."""
    out: dict = {}
    for name, check_ranks in (("checked", True), ("unchecked", False)):
        step = make(group, check_ranks=check_ranks)()
        state = step.init_state(params())
        per_call = []
        for s in range(4):
            with gloo_jobs.counting() as calls:
                state, _ = step(state, share(s, rank))
            per_call.append(calls)
        bad = with_bad_id(share(4, rank)) if rank == 1 else share(4, rank)
        with gloo_jobs.counting() as calls:
            failure = gloo_jobs.attempt(step, state, bad)
        out[name] = {"healthy": per_call, "failing": calls, "raised": failure["raised"]}
    return out


if __name__ == "__main__":
    gloo_jobs.run_probes(
        {
            "first_call": first_call,
            "first_call_no_checks": first_call_no_checks,
            "both_later": both_later,
            "later_k3": later_k3,
            "later_autograd": later_autograd,
            "later_shape": later_shape,
            "later_wrong_state": later_wrong_state,
            "dp_first": dp_first,
            "dp_later": dp_later,
            "zero_first": zero_first,
            "zero_later": zero_later,
            "stats_later": stats_later,
            "hook_first": hook_first,
            "hook_later": hook_later,
            "collectives": collectives,
            "device_flags": device_flags,  # last: it leaves a group broken
        },
        init_timeout=60,
        group_timeout=GROUP_TIMEOUT,
    )
