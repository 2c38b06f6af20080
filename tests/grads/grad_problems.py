"""Small float64 models for per-sample gradient tests, and a naive per-example reference.

A module of its own (not ``conftest``) so that test files can import it by a unique name even
when several test directories are collected in one run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from functrain import tree

Problem = tuple[Callable[..., Any], Any, Any]


def naive_per_sample(loss_fn: Callable[..., Any], params: Any, batch: Any, **extra: Any) -> Any:
    """One autograd call per example on a batch of one, stacked: the honest reference."""
    leaves, spec = tree.flatten(params)
    n = tree.leaves(batch)[0].shape[0]
    per_example = []
    for i in range(n):
        example = tree.map(lambda x, i=i: x[i : i + 1], batch)
        p = [x.detach().clone().requires_grad_(True) for x in leaves]
        loss = loss_fn(tree.unflatten(spec, p), example, **extra)
        per_example.append(torch.autograd.grad(loss, p))
    return tree.unflatten(spec, [torch.stack(gs) for gs in zip(*per_example)])


def _module_problem(model: torch.nn.Module, batch: Any, loss: Callable[..., Any]) -> Problem:
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return loss(torch.func.functional_call(model, p, (b["x"],)), b["y"])

    return loss_fn, params, batch


def mlp_problem(n: int = 7) -> Problem:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    batch = {
        "x": torch.randn(n, 5, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (n,), generator=g),
    }
    return _module_problem(model, batch, F.cross_entropy)


def cnn_problem(n: int = 6) -> Problem:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    batch = {
        "x": torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 2, (n,), generator=g),
    }
    return _module_problem(model, batch, F.cross_entropy)


def tied_problem(n: int = 5) -> Problem:
    """Embedding and output projection share one matrix: its gradient has two terms."""
    g = torch.Generator().manual_seed(2)
    vocab, dim, seq = 7, 4, 3
    params = {
        "emb": torch.randn(vocab, dim, generator=g, dtype=torch.float64),
        "w": torch.randn(dim, dim, generator=g, dtype=torch.float64) / 2,
    }
    batch = {
        "x": torch.randint(0, vocab, (n, seq), generator=g),
        "y": torch.randint(0, vocab, (n, seq), generator=g),
    }

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        h = torch.tanh(p["emb"][b["x"]] @ p["w"])
        logits = h @ p["emb"].T
        return F.cross_entropy(logits.reshape(-1, vocab), b["y"].reshape(-1))

    return loss_fn, params, batch


def transformer_problem(n: int = 4) -> Problem:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    layer = torch.nn.TransformerEncoderLayer(
        d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
    ).eval()
    batch = {
        "x": torch.randn(n, 5, 8, generator=g, dtype=torch.float64),
        "y": torch.randn(n, 8, generator=g, dtype=torch.float64),
    }
    loss_fn, params, batch = _module_problem(
        layer, batch, lambda out, y: F.mse_loss(out.mean(1), y)
    )

    def math_attention_loss(p: Any, b: Any) -> torch.Tensor:
        # vmap has no CPU batching rule for the fused attention kernel (it warns and loops);
        # the math backend is made of batchable ops.
        with sdpa_kernel(SDPBackend.MATH):
            return loss_fn(p, b)

    return math_attention_loss, params, batch


PROBLEMS = {
    "mlp": mlp_problem,
    "cnn": cnn_problem,
    "tied": tied_problem,
    "transformer": transformer_problem,
}
