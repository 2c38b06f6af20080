"""Per-sample gradients of a module with activation checkpointing inside its ``forward``.

``"loop"`` (one autograd pass per example) recomputes as torch does; the recompute runs during
backward, after ``ft.functionalize``'s call returned, and now sees that call's parameters (before,
the module's own: silently wrong per-example gradients). ``"auto"`` takes the loop there;
``"layers"`` and ``"vmap"`` refuse by name. Reference: torch autograd, one example at a time, on a
copy of the module holding the same parameters (float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import functrain as ft

F64 = torch.float64


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(4, 8)
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.block, torch.tanh(self.l1(x)), use_reentrant=False)
        return self.head(h)


def _problem():
    net = Net()
    model, params, _ = ft.functionalize(net)
    # Parameters unlike the module's own tensors: a recompute with those would show.
    params = {k: v + 0.25 for k, v in params.items()}
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(5, 4, generator=g, dtype=F64), "y": torch.randn(5, 2, dtype=F64)}

    def loss_fn(p, b):
        return ((model(p, b["x"]) - b["y"]) ** 2).mean()

    reference = copy.deepcopy(net)
    with torch.no_grad():
        for k, v in reference.named_parameters():
            v.copy_(params[k])
    rows = []
    for i in range(5):
        out = reference(batch["x"][i : i + 1])
        loss = ((out - batch["y"][i : i + 1]) ** 2).mean()
        rows.append(torch.autograd.grad(loss, list(reference.parameters())))
    names = [k for k, _ in reference.named_parameters()]
    expected = {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}
    return loss_fn, params, batch, expected


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_per_sample_grads_match_torch_one_example_at_a_time(method: str) -> None:
    loss_fn, params, batch, expected = _problem()
    got = ft.per_sample_grads(loss_fn, params, batch, method=method)
    ft.testing.assert_trees_all_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_reductions_match_the_reference(method: str) -> None:
    loss_fn, params, batch, expected = _problem()
    flat = torch.cat([expected[k].reshape(5, -1) for k in params], dim=1)
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, method=method)
    torch.testing.assert_close(norms.global_norm, flat.norm(dim=1), rtol=1e-12, atol=0)
    gram = ft.per_sample_gram(loss_fn, params, batch, method=method)
    torch.testing.assert_close(gram, flat @ flat.T, rtol=1e-12, atol=1e-14)
    clip = 0.5
    factor = (clip / flat.norm(dim=1)).clamp(max=1.0)
    want = {k: torch.einsum("i,i...->...", factor, v) for k, v in expected.items()}
    got = ft.clipped_grad_sum(loss_fn, params, batch, clip, method=method).grad_sum
    ft.testing.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["layers", "vmap"])
def test_the_batched_methods_refuse_by_name(method: str) -> None:
    loss_fn, params, batch, _ = _problem()
    with pytest.raises(ValueError, match=r"saved-tensor hooks.*method='loop'"):
        ft.per_sample_grads(loss_fn, params, batch, method=method)
