"""Worker of ``test_dp_checkpointed_modules.py``: one rank of a 2-rank gloo job on loopback.

Each probe trains an ``ft.functionalize``-d module whose ``forward`` runs
``torch.utils.checkpoint(..., use_reentrant=False)`` (or ``checkpoint_sequential``) with the
data-parallel step on this rank's share of a global batch (unequal shares), and, on every rank,
a classic torch loop (``zero_grad``, ``backward``, ``torch.optim`` ``step``) on a copy of the
module over the whole global batch, in float64; it reports the gaps in parameters, loss and
``grad_norm``, how far the parameters moved, and a hash of them (equal on both ranks). Not
collected by pytest.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import gloo_jobs
import torch
from gloo_jobs import digest, gap, shares
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import functrain as ft
from functrain import distributed as dist

F64 = torch.float64
PLAN = [[5, 3], [2, 6], [4, 4]]  # the ranks' batch sizes in each of the 3 steps
# micro_batches=2 on each rank, in rank order (5 -> 3 + 2, 3 -> 2 + 1, ...): the single
# process's split that sees the same micro-batches as the two ranks together.
REF_SPLITS = [[3, 2, 2, 1], [1, 1, 3, 3], [2, 2, 2, 2]]


class Mlp(torch.nn.Module):
    """An MLP whose middle block is checkpointed (``"checkpoint"``, ``"sequential"``) or not."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(4, 8)
        self.block = torch.nn.Sequential(
            torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh()
        )
        self.head = torch.nn.Linear(8, 1)
        self.mode = mode
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        if self.mode == "checkpoint":
            h = checkpoint(self.block, h, use_reentrant=False)
        elif self.mode == "sequential":
            h = checkpoint_sequential(self.block, 2, h, use_reentrant=False)
        else:
            h = self.block(h)
        return self.head(h)


class Block(torch.nn.Module):
    """A pre-LayerNorm transformer block (attention, MLP), each half checkpointed."""

    def __init__(self, mode: str, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(3, d)
        self.ln1 = torch.nn.LayerNorm(d)
        # No biases: the key bias has a zero gradient (softmax ignores a shift), so both sides
        # would hold rounding noise of ~1e-17 there, which Adam scales up to ~1e-10.
        self.attn = torch.nn.MultiheadAttention(d, 2, bias=False, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d, 16), torch.nn.GELU(), torch.nn.Linear(16, d)
        )
        self.head = torch.nn.Linear(d, 1)
        self.mode = mode
        self.double()

    def _attention(self, h: torch.Tensor) -> torch.Tensor:
        a = self.ln1(h)
        return h + self.attn(a, a, a, need_weights=False)[0]

    def _feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.ln2(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (n, T, 3)
        h = self.embed(x)
        if self.mode == "checkpoint":
            h = checkpoint(self._attention, h, use_reentrant=False)
            h = checkpoint(self._feed_forward, h, use_reentrant=False)
        else:
            h = self._feed_forward(self._attention(h))
        return self.head(h).mean(1)  # (n, 1)


NETS: dict[str, Callable[[str], torch.nn.Module]] = {"mlp": Mlp, "block": Block}

# functrain transform and the torch optimizer it reproduces (optax's Adam: eps outside sqrt).
OPTIMIZERS: dict[str, tuple[Callable[[], Any], Callable[[Any], torch.optim.Optimizer]]] = {
    "sgd": (
        lambda: ft.sgd(0.3, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9),
    ),
    "adam": (lambda: ft.adam(0.05), lambda ps: torch.optim.Adam(ps, lr=0.05, eps=1e-8)),
}


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).square().mean()


def global_batch(net: str, step: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    shape = (n, 4) if net == "mlp" else (n, 5, 3)
    return {
        "x": torch.randn(shape, generator=g, dtype=F64),
        "y": torch.randn(n, 1, generator=g, dtype=F64),
    }


def torch_loop(net: torch.nn.Module, opt_name: str, name: str) -> tuple[dict, list, list]:
    """The classic loop over the global batches: final parameters, losses, gradient norms."""
    opt = OPTIMIZERS[opt_name][1](net.parameters())
    losses, norms = [], []
    for s, sizes in enumerate(PLAN):
        whole = global_batch(name, s, sum(sizes))
        opt.zero_grad()
        loss = mse(net(whole["x"]), whole["y"])
        loss.backward()
        losses.append(loss.detach())
        norms.append(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()]))
        )
        opt.step()
    return {k: v.detach() for k, v in net.named_parameters()}, losses, norms


def run(rank: int, group: Any, name: str, opt_name: str, **kw: Any) -> dict:
    """The data-parallel step on the checkpointed module vs the torch loop on the global batch."""
    net = NETS[name]("sequential" if kw.pop("sequential", False) else "checkpoint")
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    want, want_losses, want_norms = torch_loop(copy.deepcopy(net), opt_name, name)
    model, params, _ = ft.functionalize(net)
    step = dist.make_data_parallel_train_step(
        lambda p, b: mse(model(p, b["x"]), b["y"]), OPTIMIZERS[opt_name][0](), group=group, **kw
    )
    state = step.init_state(params)
    out: dict = {"loss": 0.0, "grad_norm": 0.0, "hook_metrics": []}
    for s, sizes in enumerate(PLAN):
        state, metrics = step(state, shares(global_batch(name, s, sum(sizes)), sizes, rank))
        out["loss"] = max(out["loss"], gap(metrics["loss"], want_losses[s]))
        out["grad_norm"] = max(out["grad_norm"], gap(metrics["grad_norm"], want_norms[s]))
        out["hook_metrics"].append({k: float(v) for k, v in metrics.items() if "/" in k})
    out["params"] = gap(state.params, want)
    out["moved"] = gap(want, start)
    out["digest"] = digest(state.params)
    # The module holds its own tensors again, untouched by the step.
    out["module_own"] = gap(dict(net.named_parameters()), start) == 0.0
    return out


def hook_reference(name: str) -> list[dict[str, float]]:
    """``noise_scale_hook(cosine=True)``'s metrics from the single-process step on the same
    module without checkpointing, split into the two ranks' micro-batches in rank order."""
    model, params, _ = ft.functionalize(NETS[name]("plain"))
    tx = OPTIMIZERS["sgd"][0]()
    state = ft.TrainState.create(params=params, tx=tx)
    metrics_seen = []
    for s, sizes in enumerate(PLAN):  # one step per split; the hook state carries over
        step = ft.make_train_step(
            lambda p, b: mse(model(p, b["x"]), b["y"]),
            tx,
            micro_batches=REF_SPLITS[s],
            grad_stats=ft.noise_scale_hook(cosine=True),
        )
        state, metrics = step(state, global_batch(name, s, sum(sizes)))
        metrics_seen.append({k: float(v) for k, v in metrics.items() if "/" in k})
    return metrics_seen


def probe(name: str, opt_name: str, **kw: Any) -> Callable[[int, Any, str], dict]:
    return lambda rank, group, out_dir: run(rank, group, name, opt_name, **kw)


def with_hook(name: str) -> Callable[[int, Any, str], dict]:
    def go(rank: int, group: Any, out_dir: str) -> dict:
        out = run(
            rank,
            group,
            name,
            "sgd",
            grad_backend="autograd",
            micro_batches=2,
            grad_stats=ft.noise_scale_hook(cosine=True),
        )
        out["hook_reference"] = hook_reference(name)
        return out

    return go


def default_backend(rank: int, group: Any, out_dir: str) -> dict:
    """The step's default ``grad_backend`` on the checkpointed MLP."""
    return run(rank, group, "mlp", "sgd", micro_batches=2)


AUTOGRAD = {"grad_backend": "autograd"}
PROBES = {
    "mlp_k1": probe("mlp", "sgd", **AUTOGRAD),
    "mlp_k2": probe("mlp", "sgd", micro_batches=2, **AUTOGRAD),
    "mlp_sequential_k2": probe("mlp", "adam", micro_batches=2, sequential=True, **AUTOGRAD),
    "mlp_auto_k2": probe("mlp", "sgd", micro_batches=2, grad_backend="auto"),
    "mlp_k2_cosine": with_hook("mlp"),
    "mlp_k2_zero": probe("mlp", "adam", micro_batches=2, shard_optimizer=True, **AUTOGRAD),
    "block_k1": probe("block", "adam", **AUTOGRAD),
    "block_k2": probe("block", "adam", micro_batches=2, **AUTOGRAD),
    "block_k2_cosine": with_hook("block"),
    "block_k2_zero": probe(
        "block", "adam", micro_batches=2, shard_optimizer=True, bucket_cap_mb=1e-4, **AUTOGRAD
    ),
    "default_backend": default_backend,
}


if __name__ == "__main__":
    gloo_jobs.run_probes(PROBES, init_timeout=30, group_timeout=30)
