"""``method="layers"`` for bias-only fine-tuning (BitFit / DP-BiTFiT): frozen weights, trained biases.

A linear, convolution or layer-norm call whose weight is a constant (not a parameter, the same
for every example) and whose bias is a parameter gets the bias's per-sample gradient from the
rule; a parameter weight with a constant bias too. Grouped and depthwise convolutions
(``groups > 1``) of constant weight take the bias-only rule (a trained grouped weight has its
own rule: test_layer_grouped_weight.py). Every result is compared
in float64 with one autograd call per example (``naive_per_sample``) and with ``method="vmap"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from grad_problems import check_layer_reductions, naive_per_sample, spy_layer_route
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import functrain as ft
from functrain import tree
from functrain.grads import _layer_rules
from functrain.testing import assert_trees_all_close

D = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split(
    model: nn.Module, trainable: Callable[[str], bool], as_parameters: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(params, frozen)``: the trained leaves and the constants closed over.

    ``as_parameters`` keeps the frozen ones as the module's own ``nn.Parameter`` (they require
    grad, as when only the biases are handed to ``per_sample_grads``).
    """
    params, frozen = {}, {}
    for name, p in model.named_parameters():
        if trainable(name):
            params[name] = p.detach().clone()
        else:
            frozen[name] = p if as_parameters else p.detach().clone()
    return params, frozen


def _problem(
    model: nn.Module, x: torch.Tensor, classes: int, trainable: Callable[[str], bool], **kw: Any
) -> tuple[Callable[..., torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = model.double()
    with torch.no_grad():  # nonzero biases: every term counts
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=_gen(7), dtype=D))
    params, frozen = _split(model, trainable, **kw)

    def loss_fn(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, {**frozen, **p}, (b["x"],))
        return F.cross_entropy(out, b["y"])

    batch = {"x": x, "y": torch.randint(0, classes, (x.shape[0],), generator=_gen(2))}
    return loss_fn, params, batch


def _bias(name: str) -> bool:
    return name.endswith("bias")


def mlp(n: int = 6, **kw: Any) -> Any:
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    return _problem(model, torch.randn(n, 5, generator=_gen(1), dtype=D), 3, _bias, **kw)


def mnist_cnn(n: int = 4, **kw: Any) -> Any:
    """The Opacus MNIST example's CNN, biases only."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 8, 2, padding=3),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, 2),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    x = torch.randn(n, 1, 28, 28, generator=_gen(1), dtype=D)
    return _problem(model, x, 10, _bias, **kw)


class _Mix(nn.Module):
    """A trainable conv1d, a layer norm of frozen weight, a bias-only linear, a frozen-bias head."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv1d(2, 4, 3, padding=1)  # fully trainable
        self.norm = nn.LayerNorm(4 * 6)  # weight frozen, bias trained
        self.hidden = nn.Linear(4 * 6, 7)  # bias only
        self.head = nn.Linear(7, 3)  # weight trained, bias frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x)).flatten(1)
        return self.head(torch.tanh(self.hidden(self.norm(h))))


def mix(n: int = 5) -> Any:
    trainable = {"first.weight", "first.bias", "norm.bias", "hidden.bias", "head.weight"}
    x = torch.randn(n, 2, 6, generator=_gen(1), dtype=D)
    return _problem(_Mix(), x, 3, trainable.__contains__)


class _Convs(nn.Module):
    """A bias-only conv3d, a conv2d with nothing trained (no bias, frozen weight: a constant
    call), a conv2d with a trained weight and a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(2, 3, 2)
        self.c2 = nn.Conv2d(3, 2, 2, bias=False)
        self.head = nn.Conv2d(2, 2, 2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c2(torch.tanh(self.c3(x)).sum(2)))
        return self.head(h).flatten(1)


def convs(n: int = 4) -> Any:
    x = torch.randn(n, 2, 3, 4, 4, generator=_gen(1), dtype=D)
    trainable = {"c3.bias", "head.weight"}
    return _problem(_Convs(), x, 2 * 3 * 3, trainable.__contains__)


PROBLEMS = {
    "mlp": mlp,
    "mlp-frozen-nn-parameters": lambda: mlp(as_parameters=True),
    "mnist-cnn": mnist_cnn,
    "mix": mix,
    "convs": convs,
}


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_layers_match_naive_loop_and_vmap(name: str) -> None:
    loss_fn, params, batch = PROBLEMS[name]()
    expected = naive_per_sample(loss_fn, params, batch)
    assert all(g.abs().sum() > 0 for g in tree.leaves(expected))  # every bias is used
    got = ft.per_sample_grads(loss_fn, params, batch, method="layers")
    assert_trees_all_close(got, expected, **TOL)
    by_vmap = ft.per_sample_grads(loss_fn, params, batch, method="vmap")
    assert_trees_all_close(got, by_vmap, **TOL)


def test_auto_takes_the_rules_for_bias_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_layer_route(monkeypatch)
    loss_fn, params, batch = mnist_cnn()
    got = ft.per_sample_grads(loss_fn, params, batch)
    assert calls == ["layers"]
    assert_trees_all_close(got, naive_per_sample(loss_fn, params, batch), **TOL)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_ghost_reductions_match_vmap(chunk_size: int | None) -> None:
    loss_fn, params, batch = mnist_cnn(n=5)
    kw = {"chunk_size": chunk_size}
    want = ft.per_sample_grad_norms(loss_fn, params, batch, method="vmap", **kw)
    got = ft.per_sample_grad_norms(loss_fn, params, batch, method="layers", **kw)
    assert_trees_all_close(got.global_norm, want.global_norm, **TOL)
    assert_trees_all_close(got.leaf_norms, want.leaf_norms, **TOL)
    # The naive loop's norms, for an independent reference.
    ps = naive_per_sample(loss_fn, params, batch)
    sq = torch.stack([g.reshape(g.shape[0], -1).square().sum(1) for g in tree.leaves(ps)])
    assert_trees_all_close(got.global_norm, sq.sum(0).sqrt(), **TOL)

    clip = float(got.global_norm.median())  # about half the examples clipped
    want_sum = ft.clipped_grad_sum(loss_fn, params, batch, clip, method="vmap", **kw)
    got_sum = ft.clipped_grad_sum(loss_fn, params, batch, clip, method="layers", **kw)
    assert_trees_all_close(got_sum.grad_sum, want_sum.grad_sum, **TOL)
    assert int(got_sum.num_clipped) == int(want_sum.num_clipped) > 0
    factors = (clip / sq.sum(0).sqrt()).clamp(max=1.0)
    by_hand = tree.map(lambda g: torch.einsum("i,i...->...", factors, g), ps)
    assert_trees_all_close(got_sum.grad_sum, by_hand, **TOL)


def _per_example_weight(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    # A weight computed from each example's input (a hypernetwork): no rule forms its gradient.
    w = b["x"].t() @ b["x"]
    return F.cross_entropy(F.linear(b["x"], w, p["b"]), b["y"])


def _weight_from_a_parameter(
    p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]
) -> torch.Tensor:
    # The weight is the output of another rule: it depends on a parameter, not a constant.
    w = F.linear(torch.eye(4, dtype=D), p["w"])
    return F.cross_entropy(F.linear(b["x"], w, p["b"]), b["y"])


REFUSED = {
    "per-example weight": (_per_example_weight, "linear with a weight that is not a parameter"),
    "weight from a parameter": (
        _weight_from_a_parameter,
        "linear with a weight that is not a parameter",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_still_refused_without_a_rule(name: str) -> None:
    loss_fn, match = REFUSED[name]
    x = torch.randn(3, 4, dtype=D)
    params = {"b": torch.randn(4, dtype=D)}
    if name == "weight from a parameter":
        params["w"] = torch.randn(4, 4, dtype=D)
    batch = {"x": x, "y": torch.tensor([0, 1, 2])}
    with pytest.raises(ValueError, match=f"params\\['b'\\] is used by {match}"):
        ft.per_sample_grads(loss_fn, params, batch, method="layers")
    # "auto" falls back to vmap, which agrees with the naive loop.
    got = ft.per_sample_grads(loss_fn, params, batch)
    assert_trees_all_close(got, naive_per_sample(loss_fn, params, batch), **TOL)


# Grouped and depthwise convolutions (groups > 1): frozen weights, trained biases.


class _Grouped(nn.Module):
    """A frozen depthwise convolution, a frozen grouped one, a frozen linear head; biases trained.

    The depthwise bias's gradient passes through the grouped convolution's input gradient.
    """

    def __init__(self, dims: int, channels: int, mult: int, groups: int, **conv: Any) -> None:
        super().__init__()
        conv_nd = (nn.Conv1d, nn.Conv2d)[dims - 1]
        width = channels * mult
        self.depthwise = conv_nd(channels, width, groups=channels, **conv)
        self.grouped = conv_nd(width, width, 2, padding=1, groups=groups)
        self.head = nn.Linear(width, 3)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.grouped(torch.tanh(self.depthwise(x))))
        return self.head(h.mean(tuple(range(-self.dims, 0))))


def grouped_cnn(
    n: int = 5,
    dims: int = 2,
    channels: int = 3,
    mult: int = 2,
    groups: int = 2,
    size: int = 7,
    **conv: Any,
) -> Any:
    torch.manual_seed(3)  # the module's initial weights
    conv = {"kernel_size": 3, **conv}
    model = _Grouped(dims, channels, mult, groups, **conv)
    x = torch.randn(n, channels, *[size] * dims, generator=_gen(1), dtype=D)
    return _problem(model, x, 3, _bias)


GROUPED = {
    "conv2d-depthwise": lambda: grouped_cnn(groups=6),
    "conv2d-grouped-strided": lambda: grouped_cnn(groups=3, stride=2, padding=1),
    "conv2d-same-dilated": lambda: grouped_cnn(mult=1, groups=3, padding="same", dilation=2),
    "conv1d-depthwise-valid": lambda: grouped_cnn(dims=1, size=9, groups=6, padding="valid"),
    "conv1d-grouped-strided-dilated": lambda: grouped_cnn(
        dims=1, size=11, channels=4, groups=2, stride=3, padding=2, dilation=2
    ),
    # Examples whose norms tie (a review's hypothesis case): the clip must avoid the tie.
    "conv2d-tied-norms": lambda: grouped_cnn(
        n=3, dims=2, channels=1, mult=2, groups=2, size=1, kernel_size=1, stride=2, padding=1
    ),
}


@pytest.mark.parametrize("name", sorted(GROUPED))
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_grouped_bias_only_matches_naive_loop(name: str, chunk_size: int | None) -> None:
    check_layer_reductions(*GROUPED[name](), chunk_size=chunk_size)


# torch's own warning (the naive loop's calls raise it too) for an even kernel with "same".
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@settings(max_examples=20, deadline=None)
@given(
    dims=st.sampled_from([1, 2]),
    channels=st.integers(1, 4),
    mult=st.integers(1, 2),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.sampled_from([0, 1, 2, "same", "valid"]),
    dilation=st.integers(1, 2),
    data=st.data(),
)
def test_grouped_bias_only_matches_naive_loop_hypothesis(
    dims: int,
    channels: int,
    mult: int,
    kernel: int,
    stride: int,
    padding: int | str,
    dilation: int,
    data: st.DataObject,
) -> None:
    if padding == "same":
        stride = 1  # torch refuses padding="same" with a stride
    if channels == 1:
        mult = 2  # the second convolution's groups > 1 (the first's is 1: the groups=1 rule)
    width = channels * mult
    groups = data.draw(st.sampled_from([g for g in range(2, width + 1) if width % g == 0]))
    conv = {"kernel_size": kernel, "stride": stride, "padding": padding, "dilation": dilation}
    size = dilation * (kernel - 1) + 1 + data.draw(st.integers(0, 3))
    problem = grouped_cnn(
        n=3, dims=dims, channels=channels, mult=mult, groups=groups, size=size, **conv
    )
    check_layer_reductions(*problem)


def test_auto_takes_the_rules_for_grouped_bias_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_layer_route(monkeypatch)
    loss_fn, params, batch = grouped_cnn(groups=6)
    got = ft.per_sample_grads(loss_fn, params, batch)
    assert calls == ["layers"]
    assert_trees_all_close(got, naive_per_sample(loss_fn, params, batch), **TOL)


def test_grouped_bias_only_fast_and_generic_vmap_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the vmap directly (``_on_batch``) or through ConvBias's ``vmap`` rule; with an
    example's own input, a per-example input without its batch dimension, and an input that is
    the same for every example."""
    w = torch.randn(4, 1, 3, generator=_gen(4), dtype=D)
    shared = torch.randn(1, 2, 6, generator=_gen(5), dtype=D)

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        own = F.conv1d(x, w, p["b"], padding=1, groups=2)
        unbatched = F.conv1d(x[0], w, p["b"], stride=2, groups=2)
        same = F.conv1d(shared, w, p["c"], dilation=2, groups=2)
        return own.tanh().sum() + unbatched.square().sum() + (same * x.sum()).sum()

    params = {"b": torch.randn(4, generator=_gen(6), dtype=D), "c": torch.zeros(4, dtype=D)}
    x = torch.randn(4, 2, 6, generator=_gen(7), dtype=D)
    expected = naive_per_sample(loss_fn, params, x)
    assert expected["c"].abs().sum() > 0
    available = _layer_rules._FAST
    for fast in (True, False):
        monkeypatch.setattr(_layer_rules, "_FAST", fast and available)
        got = ft.per_sample_grads(loss_fn, params, x, method="layers")
        assert_trees_all_close(got, expected, **TOL)


def test_grouped_bias_only_empty_batch() -> None:
    w = torch.randn(4, 1, 2, 2, generator=_gen(4), dtype=D)

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, p["b"], groups=2).square().sum()

    params = {"b": torch.randn(4, generator=_gen(6), dtype=D)}
    x = torch.randn(0, 2, 3, 3, dtype=D)
    got = ft.per_sample_grads(loss_fn, params, x, method="layers")
    assert got["b"].shape == (0, 4)
    norms = ft.per_sample_grad_norms(loss_fn, params, x, method="layers")
    assert norms.global_norm.shape == (0,)


def _grouped_mismatched_bias(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    # A broadcast bias: torch's convolution refuses it, the rule must not add it.
    return F.conv1d(x, torch.ones(4, 1, 3, dtype=D), p["w"], groups=2).square().mean()


def test_grouped_mismatched_bias_still_refused() -> None:
    params = {"w": torch.randn(1, generator=_gen(8), dtype=D)}
    x = torch.randn(3, 2, 5, generator=_gen(9), dtype=D)
    match = "conv1d with a bias of shape \\(1,\\)"
    with pytest.raises(ValueError, match=f"params\\['w'\\] is used by {match}"):
        ft.per_sample_grads(_grouped_mismatched_bias, params, x, method="layers")
    with pytest.raises(RuntimeError, match="bias"):  # torch's own refusal, via vmap
        ft.per_sample_grads(_grouped_mismatched_bias, params, x)
