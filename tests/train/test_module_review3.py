"""Third review of ``ft.functionalize``: lazy modules, ``parametrize.cached()``, RNN weight
references, and shared submodules with kwargs and structured outputs, against the module's own
forward and ``backward`` in float64."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import functrain as ft

D = torch.float64


def _loaded(net: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    ref = copy.deepcopy(net)
    ref.load_state_dict(params, strict=False)
    return ref


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.LazyLinear(3)), nn.LazyBatchNorm1d])
def test_lazy_module_is_a_clear_error_until_materialized(make):
    net = make().to(D)
    with pytest.raises(ValueError, match=r"uninitialized.*run the module once"):
        ft.functionalize(net)
    x = torch.randn(4, 2, dtype=D)
    net(x)  # materializes
    model, params, _ = ft.functionalize(copy.deepcopy(net).eval(), copy=True)
    torch.testing.assert_close(model(params, x), net.eval()(x), rtol=0, atol=0)


def test_parametrize_cached_does_not_reuse_another_calls_weight():
    torch.manual_seed(0)
    net = parametrizations.weight_norm(nn.Linear(3, 2).to(D))
    model, params, _ = ft.functionalize(net, copy=True)
    x = torch.randn(4, 3, dtype=D)
    doubled = {k: 2 * v if k.endswith("original0") else v for k, v in params.items()}
    with parametrize.cached():
        first = model(params, x)
        second = model(doubled, x)
        own = net(x)  # the module's own weights, not a functional call's cached ones
    torch.testing.assert_close(first, net(x), rtol=0, atol=0)
    torch.testing.assert_close(second, _loaded(net, doubled)(x), rtol=0, atol=0)
    torch.testing.assert_close(own, net(x), rtol=0, atol=0)
    with parametrize.cached():  # a transform's tensor must not be left in the cache either
        grads = torch.func.grad(lambda p: model(p, x).sum())(params)
        torch.testing.assert_close(model(doubled, x), second, rtol=0, atol=0)
    ref = copy.deepcopy(net)
    ref(x).sum().backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_rnn_does_not_keep_the_last_calls_params_alive(cls):
    torch.manual_seed(0)
    net = cls(2, 3, batch_first=True).to(D)
    x = torch.randn(2, 4, 2, dtype=D)
    before = net(x)[0]
    model, params, _ = ft.functionalize(net, copy=True)
    leaf = {k: v.clone().requires_grad_() for k, v in params.items()}
    moved = {k: v * 1.5 for k, v in leaf.items()}  # non-leaf: an autograd graph behind them
    model(moved, x)
    watch = weakref.ref(moved["weight_ih_l0"])
    del moved
    gc.collect()
    assert watch() is None
    torch.testing.assert_close(net(x)[0], before, rtol=0, atol=0)


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor
    hidden: tuple[torch.Tensor, ...]


class _Shared(nn.Module):
    """One ``nn.Linear`` used twice (also under a second name) and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.block = nn.Linear(4, 4)
        self.again = self.block
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)
        self.frozen = nn.Parameter(torch.ones(4), requires_grad=False)

    def forward(self, idx: torch.Tensor, *, shift: float = 0.0) -> _Out:
        h = torch.tanh(self.again(torch.tanh(self.block(self.emb(idx))))) * self.frozen
        return _Out(self.head(h * self.scale + shift), (h,))


def test_shared_submodule_tied_head_kwargs_dataclass_autograd_matches_module():
    torch.manual_seed(0)
    net = _Shared().to(D)
    ref = copy.deepcopy(net)
    model, params, buffers = ft.functionalize(net, copy=True)
    assert list(params) == ["frozen", "emb.weight", "block.weight", "block.bias"]
    assert list(buffers) == ["scale"]
    snapshot = {k: v.clone() for k, v in net.state_dict(keep_vars=False).items()}
    idx = torch.tensor([[0, 3, 5], [1, 1, 2]])
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = model(leaves, idx, shift=0.25)
    expected = ref(idx, shift=0.25)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    out.logits.square().sum().backward()
    expected.logits.square().sum().backward()
    ref_params = dict(ref.named_parameters())
    for name in ["emb.weight", "block.weight", "block.bias"]:
        torch.testing.assert_close(leaves[name].grad, ref_params[name].grad, rtol=0, atol=0)
    # requires_grad=False is ignored (documented): the frozen vector gets its gradient too
    func_grads = torch.func.grad(lambda p: model(p, idx, shift=0.25).logits.square().sum())(params)
    for name in ["emb.weight", "block.weight", "block.bias"]:
        torch.testing.assert_close(func_grads[name], ref_params[name].grad, rtol=0, atol=0)
    assert func_grads["frozen"].abs().sum() > 0
    for k, v in net.state_dict().items():  # the functional calls left the module alone
        torch.testing.assert_close(v, snapshot[k], rtol=0, atol=0)
