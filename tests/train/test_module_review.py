"""Adversarial review of ``ft.functionalize``: the functional model against ``nn.Module`` itself."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import functrain as ft

D = torch.float64


def _module_grads(net: nn.Module, loss) -> dict[str, torch.Tensor]:
    net.zero_grad()
    loss(net).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _loaded(net: nn.Module, params: dict, buffers: dict | None = None) -> nn.Module:
    ref = copy.deepcopy(net)
    ref.load_state_dict({**params, **(buffers or {})}, strict=False)
    return ref


# ----------------------------------------------------------------------------- shapes


def test_wrong_param_shape_that_would_broadcast_is_rejected_with_path_and_shapes():
    model, params, _ = ft.functionalize(nn.Sequential(nn.Linear(3, 2)))
    bad = {**params, "0.bias": torch.zeros(1)}  # broadcasts silently inside F.linear
    with pytest.raises(ft.tree.TreeMismatchError, match=r"'0\.bias'.*\(1,\).*\(2,\)"):
        model(bad, torch.randn(4, 3))


def test_wrong_param_shape_error_names_path_not_a_matmul_message():
    model, params, _ = ft.functionalize(nn.Sequential(nn.Linear(3, 2)))
    bad = {**params, "0.weight": torch.zeros(2, 4)}
    with pytest.raises(ft.tree.TreeMismatchError, match=r"'0\.weight'.*\(2, 4\).*\(2, 3\)"):
        model(bad, torch.randn(4, 3))


def test_wrong_buffer_shape_is_rejected_with_path_and_shapes():
    model, params, buffers = ft.functionalize(nn.BatchNorm1d(4))
    bad = {**buffers, "running_mean": torch.zeros(1)}
    with pytest.raises(ft.tree.TreeMismatchError, match=r"'running_mean'.*\(1,\).*\(4,\)"):
        model.apply(params, bad, torch.randn(3, 4))


def test_non_tensor_param_is_rejected_with_its_path():
    model, params, _ = ft.functionalize(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"'bias'.*NoneType"):
        model({**params, "bias": None}, torch.randn(1, 3))


def test_missing_and_extra_keys_are_both_named():
    model, params, _ = ft.functionalize(nn.Sequential(nn.Linear(3, 2)))
    bad = {k: v for k, v in params.items() if k != "0.bias"} | {"0.extra": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"missing \['0\.bias'\], unexpected \['0\.extra'\]"):
        model(bad, torch.randn(4, 3))


def test_shape_check_does_not_break_vmap_over_stacked_params():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)
    model, params, _ = ft.functionalize(net, copy=True)
    x = torch.randn(5, 3, dtype=D)
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    outs = torch.func.vmap(lambda p: model(p, x))(stacked)
    doubled = {k: 2 * v for k, v in params.items()}
    torch.testing.assert_close(outs[1], _loaded(net, doubled)(x))  # batched matmul: not bitwise


# ----------------------------------------------------------------------------- buffers


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return self.lin(x)


def test_call_refuses_to_drop_a_custom_buffer_update():
    model, params, buffers = ft.functionalize(_Counter())
    with pytest.raises(RuntimeError, match=r"model\.apply"):
        model(params, torch.ones(1, 2))
    _, new = model.apply(params, buffers, torch.ones(1, 2))
    assert int(new["calls"]) == 1 and int(buffers["calls"]) == 0
    model.eval()(params, torch.ones(1, 2))  # no update in eval mode: fine


def test_spectral_norm_power_iteration_is_threaded_through_apply_not_dropped():
    torch.manual_seed(0)
    net = nn.utils.spectral_norm(nn.Linear(3, 4).to(D))
    model, params, buffers = ft.functionalize(net, copy=True)
    ref = copy.deepcopy(net)
    for _ in range(3):
        x = torch.randn(2, 3, dtype=D)
        out, buffers = model.apply(params, buffers, x)
        torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    torch.testing.assert_close(buffers["weight_u"], ref.weight_u, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"model\.apply"):  # u would silently stay put
        model(params, x)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 2, 2)])
def test_batchnorm_train_then_eval_matches_the_module(momentum, shape):
    torch.manual_seed(0)
    bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(4, momentum=momentum).to(D)
    model, params, buffers = ft.functionalize(bn, copy=True)
    ref = copy.deepcopy(bn)
    for _ in range(3):
        x = torch.randn(*shape, dtype=D)
        out, buffers = model.apply(params, buffers, x)
        torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    ft.testing.assert_trees_all_close(buffers, dict(ref.named_buffers()), rtol=0, atol=0)
    ref.eval()
    x = torch.randn(*shape, dtype=D)
    # evaluation with the trained buffers is model.eval().apply(params, buffers, ...)
    out, same = model.eval().apply(params, buffers, x)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    ft.testing.assert_trees_all_equal(same, buffers)


def test_eval_call_works_under_inference_mode_and_compile():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).eval()
    model, params, _ = ft.functionalize(net)
    x = torch.randn(4, 2)
    expected = net(x)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(params, x), expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(params, x), expected, rtol=0, atol=0)
    compiled = torch.compile(lambda p, x: model.eval()(p, x), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(params, x), expected)


def test_eval_call_uses_the_functionalize_snapshot_not_trained_buffers():
    # The documented evaluation recipe is model.eval().apply(params, state.buffers, x).
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).to(D)
    model, params, buffers = ft.functionalize(bn, copy=True)
    _, trained = model.apply(params, buffers, 5 + torch.randn(8, 3, dtype=D))
    x = torch.randn(4, 3, dtype=D)
    fresh = copy.deepcopy(bn).eval()
    torch.testing.assert_close(model.eval()(params, x), fresh(x), rtol=0, atol=0)
    assert not torch.allclose(model.eval()(params, x), model.eval().apply(params, trained, x)[0])


# ----------------------------------------------------------------------------- device / dtype


def test_meta_params_fail_with_a_note_naming_them_and_real_params_work():
    with torch.device("meta"):
        net = nn.Linear(3, 2)
    model, params, _ = ft.functionalize(net)
    with pytest.raises(RuntimeError) as info:
        model(params, torch.ones(1, 3))
    assert any("meta device" in n and "'weight'" in n for n in info.value.__notes__)
    real = {k: torch.randn(v.shape) for k, v in params.items()}  # a meta skeleton is fine
    expected = torch.nn.functional.linear(torch.ones(1, 3), real["weight"], real["bias"])
    torch.testing.assert_close(model(real, torch.ones(1, 3)), expected, rtol=0, atol=0)


def test_mixed_dtype_failure_names_the_dtypes():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval()
    model, params, _ = ft.functionalize(net)
    with pytest.raises(RuntimeError) as info:
        model({**params, "0.weight": params["0.weight"].double()}, torch.ones(1, 3))
    (note,) = info.value.__notes__
    assert "'0.weight': cpu/float64" in note and "float32" in note
    assert "num_batches_tracked" not in note


def test_float64_module_matches_and_params_keep_dtype():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)).to(D)
    model, params, _ = ft.functionalize(net, copy=True)
    assert all(p.dtype == D for p in params.values())
    x = torch.randn(5, 3, dtype=D)
    torch.testing.assert_close(model(params, x), net(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- probes that held


def test_tied_weights_sum_gradients_update_both_uses_and_round_trip_state_dict():
    torch.manual_seed(0)
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    net = nn.Sequential(emb, head).to(D)
    model, params, _ = ft.functionalize(net, copy=True)
    assert list(params) == ["0.weight"] and set(params) <= set(net.state_dict())
    x = torch.tensor([[0, 1, 2, 1]])
    grads = torch.func.grad(lambda p: model(p, x).square().sum())(params)
    expected = _module_grads(net, lambda m: m(x).square().sum())
    torch.testing.assert_close(grads["0.weight"], expected["0.weight"], rtol=0, atol=0)
    new = {"0.weight": 2 * params["0.weight"]}
    ref = _loaded(net, new)  # load_state_dict writes the shared tensor: both uses change
    torch.testing.assert_close(model(new, x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_rnn_flat_weights_follow_the_params(cls):
    torch.manual_seed(0)
    net = cls(3, 4, num_layers=2, batch_first=True).to(D)
    model, params, _ = ft.functionalize(net, copy=True)
    x = torch.randn(2, 5, 3, dtype=D)
    new = {k: v + 0.5 for k, v in params.items()}
    torch.testing.assert_close(model(new, x)[0], _loaded(net, new)(x)[0])  # GRU: 1 ulp
    grads = torch.func.grad(lambda p: model(p, x)[0].sum())(params)
    ft.testing.assert_trees_all_close(grads, _module_grads(net, lambda m: m(x)[0].sum()))


def test_multihead_attention_kwargs_and_tuple_output():
    torch.manual_seed(0)
    net = nn.MultiheadAttention(8, 2, batch_first=True).to(D)
    model, params, _ = ft.functionalize(net, copy=True)
    new = {k: 1.1 * v for k, v in params.items()}
    ref = _loaded(net, new).eval()
    q = torch.randn(2, 3, 8, dtype=D)
    with torch.no_grad():  # the module's native fast path
        out, weights = model.eval()(new, q, q, q, average_attn_weights=False)
        ref_out, ref_weights = ref(q, q, q, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)


def test_orthogonal_parametrization_gradients_match_the_module():
    torch.manual_seed(0)
    net = nn.utils.parametrizations.orthogonal(nn.Linear(4, 4).to(D))
    model, params, _ = ft.functionalize(net, copy=True)
    assert set(params) <= set(net.state_dict())
    x = torch.randn(3, 4, dtype=D)
    torch.testing.assert_close(model(params, x), net(x), rtol=0, atol=0)
    grads = torch.func.grad(lambda p: model(p, x).square().sum())(params)
    ft.testing.assert_trees_all_close(grads, _module_grads(net, lambda m: m(x).square().sum()))


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("absent", None)
        self.register_buffer("scale", torch.ones(3), persistent=False)
        self.register_parameter("no_bias", None)

    def forward(self, x: torch.Tensor, *, k: float = 1.0) -> dict:
        return {"y": self.lin(x) * self.scale * k, "none": self.absent}


def test_none_and_non_persistent_buffers_kwargs_and_dict_output():
    net = _Odd()
    model, params, buffers = ft.functionalize(net)
    assert list(params) == ["lin.weight", "lin.bias"] and list(buffers) == ["scale"]
    x = torch.randn(2, 3)
    out, _ = model.apply(params, {"scale": torch.full((3,), 2.0)}, x, k=3.0)
    torch.testing.assert_close(out["y"], net.lin(x) * 6, rtol=0, atol=0)
    assert out["none"] is None


def test_requires_grad_false_params_are_included_and_differentiated():
    # functrain ignores requires_grad (freezing is ft.freeze(mask)); documented in the docstring
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    net[0].requires_grad_(False)
    model, params, _ = ft.functionalize(net)
    assert list(params) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    grads = torch.func.grad(lambda p: model(p, torch.ones(2, 3)).sum())(params)
    assert grads["0.weight"].abs().sum() > 0


def test_calls_never_touch_the_module_and_do_not_leak_between_params():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Linear(4, 1))
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    model, params, buffers = ft.functionalize(net)
    shifted = {k: v + 1 for k, v in params.items()}
    x = torch.randn(5, 3)
    model.apply(shifted, buffers, x)
    torch.func.grad(lambda p: model.apply(p, buffers, x)[0].sum())(shifted)
    a, b, c = (model.eval()(p, x) for p in (shifted, params, shifted))
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    ft.testing.assert_trees_all_equal(dict(net.state_dict()), snapshot)
    assert net.training and all(m.training for m in net.modules())
    torch.testing.assert_close(b, net.eval()(x), rtol=0, atol=0)


def test_per_example_grads_via_vmap_match_module_autograd():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)
    model, params, _ = ft.functionalize(net, copy=True)
    x, y = torch.randn(4, 3, dtype=D), torch.randn(4, 1, dtype=D)

    def loss(p, xi, yi):
        return (model(p, xi[None]) - yi).square().sum()

    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(4):
        expected = _module_grads(net, lambda m, i=i: (m(x[i : i + 1]) - y[i]).square().sum())
        ft.testing.assert_trees_all_close({k: v[i] for k, v in per.items()}, expected)
