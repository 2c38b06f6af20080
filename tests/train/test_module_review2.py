"""Second adversarial review of ``ft.functionalize``: module surgery, reassigned buffers, and
layers whose tensors are reached in unusual ways, against ``nn.Module`` autograd in float64."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import functrain as ft

D = torch.float64


def _module_grads(net: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> dict:
    net.zero_grad()
    loss(net).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _check_grads(net: nn.Module, loss: Callable[[Callable], torch.Tensor]) -> None:
    """``torch.func.grad`` through the functional model equals ``backward`` on a copy."""
    net = net.to(D)
    model, params, _ = ft.functionalize(net, copy=True)
    ref = copy.deepcopy(net)
    grads = torch.func.grad(lambda p: loss(lambda *a, **k: model(p, *a, **k)))(params)
    ft.testing.assert_trees_all_close(grads, _module_grads(ref, loss), rtol=1e-10, atol=1e-12)


class _EMA(nn.Module):
    """Keeps a running mean by *reassigning* its buffer, as many hand-written EMAs do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("avg", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.training:
            self.avg = 0.9 * self.avg + 0.1 * y.detach().mean(0)
        return y


# ----------------------------------------------------------------------------- reassigned buffers


def test_apply_returns_a_buffer_the_forward_reassigns():
    torch.manual_seed(0)
    net = _EMA().to(D)
    model, params, buffers = ft.functionalize(net, copy=True)
    start, ref, expected = buffers, copy.deepcopy(net), torch.zeros(2, dtype=D)
    for _ in range(3):
        x = torch.randn(4, 2, dtype=D)
        out, buffers = model.apply(params, buffers, x)
        torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
        expected = 0.9 * expected + 0.1 * (x @ net.lin.weight.T + net.lin.bias).mean(0)
    torch.testing.assert_close(buffers["avg"], expected.detach())
    torch.testing.assert_close(buffers["avg"], ref.avg, rtol=0, atol=0)
    assert not start["avg"].any() and not net.avg.any()  # inputs and module untouched


def test_call_refuses_to_drop_a_reassigned_buffer():
    model, params, _ = ft.functionalize(_EMA())
    with pytest.raises(RuntimeError, match=r"updated the buffers \['avg'\].*model\.apply"):
        model(params, torch.ones(1, 2))
    model.eval()(params, torch.ones(1, 2))  # no update in eval mode: fine


def test_compiled_apply_returns_a_buffer_the_forward_reassigns():
    net = _EMA()
    model, params, buffers = ft.functionalize(net, copy=True)
    step = torch.compile(lambda p, b, x: model.apply(p, b, x), backend="eager", fullgraph=True)
    x = torch.randn(3, 2)
    _, new = step(params, buffers, x)
    torch.testing.assert_close(new["avg"], 0.1 * net.lin(x).mean(0).detach())


# ----------------------------------------------------------------------------- module surgery


def test_replaced_submodule_raises_instead_of_silently_ignoring_params():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model, params, _ = ft.functionalize(net, copy=True)
    net[0] = nn.Linear(2, 2)  # params["0.weight"] would reach the old, detached Linear
    with pytest.raises(RuntimeError, match=r"submodule '0' was replaced.*ft\.functionalize"):
        torch.func.grad(lambda p: model(p, torch.ones(3, 2)).sum())(params)
    assert all(a is b for a, b in zip(net[0].parameters(), net[0]._parameters.values()))
    model, params, _ = ft.functionalize(net)  # rebuilding works
    torch.testing.assert_close(model(params, torch.ones(3, 2)), net(torch.ones(3, 2)))


def test_parametrization_registered_after_functionalize_is_a_clear_error():
    net = nn.Linear(2, 2)
    model, params, _ = ft.functionalize(net, copy=True)
    nn.utils.parametrize.register_parametrization(net, "weight", nn.Identity())
    with pytest.raises(RuntimeError, match=r"'weight' is no longer a parameter"):
        model(params, torch.ones(1, 2))
    assert (
        net.parametrizations.weight.original is net.parametrizations.weight._parameters["original"]
    )


def test_parameter_reassigned_on_the_same_module_still_uses_the_given_params():
    net = nn.Linear(2, 1).to(D)
    model, params, _ = ft.functionalize(net, copy=True)
    net.weight = nn.Parameter(torch.full((1, 2), 7.0, dtype=D))
    x = torch.ones(3, 2, dtype=D)
    expected = x @ params["weight"].T + params["bias"]
    torch.testing.assert_close(model(params, x), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- probes that held


def test_multihead_attention_training_gradients_with_kdim_vdim_and_bias_kv():
    torch.manual_seed(0)
    net = nn.MultiheadAttention(8, 2, batch_first=True, kdim=4, vdim=5, add_bias_kv=True)
    q, k, v = (torch.randn(2, 3, d, dtype=D) for d in (8, 4, 5))
    _check_grads(net, lambda m: m(q, k, v)[0].square().sum())


def test_transformer_encoder_and_bidirectional_projected_lstm_gradients():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x, seq = torch.randn(2, 3, 8, dtype=D), torch.randn(2, 4, 3, dtype=D)
    _check_grads(enc, lambda m: m(x).square().sum())
    lstm = nn.LSTM(3, 4, proj_size=2, bidirectional=True, batch_first=True)
    _check_grads(lstm, lambda m: m(seq)[0].square().sum())


def test_embedding_padding_idx_row_gets_no_gradient():
    torch.manual_seed(0)
    ids = torch.tensor([[0, 1, 2, 0, 3]])
    _check_grads(nn.Embedding(5, 3, padding_idx=0), lambda m: m(ids).square().sum())


class _Hooked(nn.Module):
    """Tied after construction, hooks reading parameters, a tensor made from a param's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.a.register_forward_pre_hook(lambda mod, inp: (inp[0] * mod.bias.sum(),))
        self.b.register_forward_hook(lambda mod, inp, out: out + mod.weight.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.a.weight
        return self.b(self.a(x)) + torch.ones(x.shape, dtype=w.dtype, device=w.device)


def test_hooks_post_construction_ties_and_forward_made_tensors():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=D)
    _check_grads(_Hooked(), lambda m: m(x).square().sum())


def test_compiled_module_and_nested_functional_models():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)
    model, params, _ = ft.functionalize(torch.compile(net, backend="eager"), copy=True)
    x = torch.randn(5, 3, dtype=D)
    grads = torch.func.grad(lambda p: model(p, x).sum())(params)
    expected = _module_grads(copy.deepcopy(net), lambda m: m(x).sum())
    ft.testing.assert_trees_all_close(
        {k.removeprefix("_orig_mod."): g for k, g in grads.items()}, expected
    )


class _Outer(nn.Module):
    """Runs a functional model of its own submodule ``b`` when given that model's params."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1)
        self.inner: ft.FunctionalModel | None = None

    def forward(self, x: torch.Tensor, inner_params: dict | None = None) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h) if inner_params is None else self.inner(inner_params, h)


def test_nested_functional_model_of_a_submodule():
    torch.manual_seed(0)
    net = _Outer().to(D)
    outer, op, _ = ft.functionalize(net, copy=True)
    net.inner, ip, _ = ft.functionalize(net.b, copy=True)
    ip = {k: 2 * v for k, v in ip.items()}
    x = torch.randn(5, 3, dtype=D)
    ref = copy.deepcopy(net)
    ref.b.load_state_dict(ip)
    torch.testing.assert_close(outer(op, x, ip), ref(x), rtol=0, atol=0)
    g_outer, g_inner = torch.func.grad(lambda p, q: outer(p, x, q).sum(), argnums=(0, 1))(op, ip)
    expected = _module_grads(ref, lambda m: m(x).sum())
    assert not g_outer["b.weight"].any()  # the outer params for b are swapped out by the inner
    torch.testing.assert_close(g_outer["a.weight"], expected["a.weight"])
    torch.testing.assert_close(g_inner["weight"], expected["b.weight"])
    assert net.b.weight is net.b._parameters["weight"]  # both swaps were undone
    torch.testing.assert_close(net(x), outer(op, x), rtol=0, atol=0)
