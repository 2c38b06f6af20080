"""Activation checkpointing *inside* an ``nn.Module`` run through ``ft.functionalize``.

``torch.utils.checkpoint`` recomputes the checkpointed forward during backward, after the
functional model's call has put the module's own tensors back. The step reinstalls the call's
tensors for that recompute (``functrain.train._recompute``); before, every step after the
first took its gradients at the initial parameters, silently. Reference: the classic torch
loop on a copy of the module, float64, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import functrain as ft

F64 = torch.float64
LR = 0.5


class Net(torch.nn.Module):
    def __init__(self, mode: str = "checkpoint") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(4, 8)
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 1)
        self.mode = mode
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        if self.mode == "checkpoint":
            h = checkpoint(self.block, h, use_reentrant=False)
        elif self.mode == "sequential":
            h = checkpoint_sequential(self.block, 2, h, use_reentrant=False)
        elif self.mode == "closure":  # the checkpointed function reaches the module itself
            h = checkpoint(lambda t: self.block(t) * self.l1.weight.sum(), h, use_reentrant=False)
        return self.head(h)


def _batches(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [
        {
            "x": torch.randn(6, 4, generator=g, dtype=F64),
            "y": torch.randn(6, 1, generator=g, dtype=F64),
        }
        for _ in range(n)
    ]


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _torch_params(net: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for b in batches:
        opt.zero_grad()
        _mse(net(b["x"]), b["y"]).backward()
        opt.step()
    return {k: v.detach() for k, v in net.named_parameters()}


def _functrain_params(net: torch.nn.Module, batches, **options) -> dict[str, torch.Tensor]:
    model, params, _ = ft.functionalize(net)
    tx = ft.sgd(LR)
    step = ft.make_train_step(lambda p, b: _mse(model(p, b["x"]), b["y"]), tx, **options)
    state = ft.TrainState.create(params=params, tx=tx)
    for b in batches:
        state, _ = step(state, b)
    return state.params


def _norms_hook() -> ft.GradStatsHook:
    """A hook that needs whole micro-batch gradients: the torch.autograd.grad loop."""
    return ft.GradStatsHook(
        init=lambda p: None,
        per_micro_batch=lambda g, b: {"sq": ft.tree.norm(g, squared=True)},
        update=lambda stats, g, s: ({}, s),
    )


@pytest.mark.parametrize("mode", ["checkpoint", "sequential", "closure"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"micro_batches": 2},
        {"micro_batches": 2, "grad_stats": ft.noise_scale_hook(cosine=True)},
        {"micro_batches": 3, "grad_stats": _norms_hook()},
    ],
    ids=["K1", "K2", "K2-cosine-hook", "K3-autograd-grad"],
)
def test_steps_follow_the_torch_loop_bit_for_bit(mode: str, options: dict) -> None:
    net = Net(mode)
    want = _torch_params(copy.deepcopy(net), _batches())
    got = _functrain_params(net, _batches(), **options)
    ft.testing.assert_trees_all_close(got, want, rtol=1e-13, atol=0)


def test_the_module_holds_its_own_tensors_after_the_step() -> None:
    net = Net()
    own = {k: v for k, v in net.named_parameters()}
    _functrain_params(net, _batches(2))
    for k, v in net.named_parameters():
        assert v is own[k]
    assert all(v.grad is None for v in net.parameters())


def test_a_model_called_with_two_parameter_sets_is_refused_when_recomputed() -> None:
    net = Net()
    model, params, _ = ft.functionalize(net)
    other = {k: v + 1.0 for k, v in params.items()}

    def loss_fn(p, b):  # the second call's tensors differ: which does the recompute need?
        return _mse(model(p, b["x"]), b["y"]) + _mse(model(other, b["x"]), b["y"])

    step = ft.make_train_step(loss_fn, ft.sgd(LR))
    state = ft.TrainState.create(params=params, tx=ft.sgd(LR))
    with pytest.raises(RuntimeError, match="two different sets of parameters"):
        step(state, _batches(1)[0])
    # Nothing was swapped in for good: the module still holds its own tensors.
    assert all(type(v) is torch.nn.Parameter for v in net.parameters())


def test_the_same_parameters_called_twice_are_fine() -> None:
    net = Net()
    ref = copy.deepcopy(net)
    model, params, _ = ft.functionalize(net)
    tx = ft.sgd(LR)
    step = ft.make_train_step(
        lambda p, b: _mse(model(p, b["x"]), b["y"]) + _mse(model(p, 2 * b["x"]), b["y"]), tx
    )
    state = ft.TrainState.create(params=params, tx=tx)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for b in _batches():
        state, _ = step(state, b)
        opt.zero_grad()
        (_mse(ref(b["x"]), b["y"]) + _mse(ref(2 * b["x"]), b["y"])).backward()
        opt.step()
    ft.testing.assert_trees_all_close(
        state.params, dict(ref.named_parameters()), rtol=1e-13, atol=0
    )
