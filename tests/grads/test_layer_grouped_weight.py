"""``method="layers"`` for grouped and depthwise convolutions with a trained weight (``groups > 1``).

MobileNet / ConvNeXt depthwise layers and ResNeXt-style grouped layers under full fine-tuning:
the weight's per-example gradient comes from :class:`~functrain.grads._layer_grouped_conv.
GroupedConv` (both its routes, ``"stacked"`` and ``"depthwise"``, are forced in turn). Every
result is compared in float64 with one autograd call per example (``naive_per_sample``):
per-sample gradients, per-leaf and global norms, the clipped sum and the Gram matrix.
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
from functrain.grads import _layer_grouped_conv, _layer_rules
from functrain.testing import assert_trees_all_close

D = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}
CONV_ND = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(
    model: nn.Module,
    x: torch.Tensor,
    classes: int,
    trainable: Callable[[str], bool] = lambda name: True,
) -> tuple[Callable[..., torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(loss_fn, params, batch)``: cross-entropy of ``model`` (float64, nonzero biases)."""
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=_gen(7), dtype=D))
    params = {k: p.detach().clone() for k, p in model.named_parameters() if trainable(k)}
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not trainable(k)}

    def loss_fn(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, {**frozen, **p}, (b["x"],))
        return F.cross_entropy(out, b["y"])

    batch = {"x": x, "y": torch.randint(0, classes, (x.shape[0],), generator=_gen(2))}
    return loss_fn, params, batch


class _Grouped(nn.Module):
    """A depthwise convolution (``mult`` outputs per channel), a grouped one, a linear head."""

    def __init__(
        self, dims: int, channels: int, mult: int, groups: int, bias: bool, **conv: Any
    ) -> None:
        super().__init__()
        width = channels * mult
        self.depthwise = CONV_ND[dims](channels, width, groups=channels, bias=bias, **conv)
        self.grouped = CONV_ND[dims](width, width, 2, padding=1, groups=groups, bias=bias)
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
    bias: bool = True,
    trainable: Callable[[str], bool] = lambda name: True,
    **conv: Any,
) -> Any:
    torch.manual_seed(3)  # the module's initial weights
    conv = {"kernel_size": 3, **conv}
    model = _Grouped(dims, channels, mult, groups, bias, **conv)
    x = torch.randn(n, channels, *[size] * dims, generator=_gen(1), dtype=D)
    return _problem(model, x, 3, trainable)


@pytest.fixture(params=["stacked", "depthwise", "chosen"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Forces a per-example route (``"depthwise"`` where a call has one input channel per
    group, else ``"stacked"``), or leaves the choice to the rule (``"chosen"``)."""
    name = request.param
    if name != "chosen":
        choose = _layer_grouped_conv._route

        def forced(x: torch.Tensor, weight: torch.Tensor, dilation: Any) -> str:
            assert choose(x, weight, dilation) in ("stacked", "depthwise")
            return name if weight.shape[1] == 1 else "stacked"

        monkeypatch.setattr(_layer_grouped_conv, "_route", forced)
    return name


GROUPED = {
    "conv2d-depthwise": lambda: grouped_cnn(mult=1, groups=3),
    "conv2d-depthwise-mult2-no-bias": lambda: grouped_cnn(groups=6, bias=False),
    "conv2d-grouped-strided": lambda: grouped_cnn(groups=3, stride=2, padding=1),
    "conv2d-tuple-stride-padding": lambda: grouped_cnn(
        groups=2, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)
    ),
    "conv2d-same-dilated": lambda: grouped_cnn(mult=1, groups=3, padding="same", dilation=2),
    "conv2d-same-even-kernel": lambda: grouped_cnn(mult=1, groups=3, kernel_size=2, padding="same"),
    "conv1d-depthwise-valid": lambda: grouped_cnn(dims=1, size=9, groups=6, padding="valid"),
    "conv1d-grouped-strided-dilated": lambda: grouped_cnn(
        dims=1, size=11, channels=4, groups=2, stride=3, padding=2, dilation=2
    ),
    "conv1d-long-kernel": lambda: grouped_cnn(
        dims=1, size=20, mult=1, groups=3, kernel_size=9, padding=4
    ),
    "conv3d-depthwise": lambda: grouped_cnn(dims=3, size=4, mult=1, groups=3, padding=1),
    "conv3d-grouped-strided-no-bias": lambda: grouped_cnn(
        dims=3, size=5, channels=4, mult=1, groups=2, stride=(1, 2, 2), bias=False
    ),
    # A trained weight with frozen biases (constant biases: no slot, the weight's rule still).
    "conv2d-frozen-biases": lambda: grouped_cnn(
        groups=3, trainable=lambda k: not k.endswith("bias") or k.startswith("head")
    ),
}


# torch's own warning (the naive loop's calls raise it too) for an even kernel with "same".
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("name", sorted(GROUPED))
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_grouped_weight_matches_naive_loop(name: str, chunk_size: int | None, route: str) -> None:
    check_layer_reductions(*GROUPED[name](), chunk_size=chunk_size, gram=True)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@settings(max_examples=25, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    channels=st.integers(1, 4),
    mult=st.integers(1, 2),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.sampled_from([0, 1, 2, "same", "valid"]),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    force=st.sampled_from([None, "stacked", "depthwise"]),
    data=st.data(),
)
def test_grouped_weight_matches_naive_loop_hypothesis(
    dims: int,
    channels: int,
    mult: int,
    kernel: int,
    stride: int,
    padding: int | str,
    dilation: int,
    bias: bool,
    force: str | None,
    data: st.DataObject,
) -> None:
    if padding == "same":
        stride = 1  # torch refuses padding="same" with a stride
    if channels == 1:
        mult = 2  # the second convolution's groups > 1 (the first's is 1: the groups=1 rule)
    width = channels * mult
    groups = data.draw(st.sampled_from([g for g in range(2, width + 1) if width % g == 0]))
    conv = {"kernel_size": kernel, "stride": stride, "padding": padding, "dilation": dilation}
    size = dilation * (kernel - 1) + 1 + data.draw(st.integers(0, 2 if dims == 3 else 3))
    problem = grouped_cnn(
        n=3, dims=dims, channels=channels, mult=mult, groups=groups, size=size, bias=bias, **conv
    )
    choose = _layer_grouped_conv._route
    if force is not None:  # (hypothesis runs one function many times: no monkeypatch fixture)
        _layer_grouped_conv._route = lambda x, w, d: force if w.shape[1] == 1 else "stacked"
    try:
        check_layer_reductions(*problem, every_used=False, gram=True)
    finally:
        _layer_grouped_conv._route = choose


def test_auto_takes_the_layer_route(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_layer_route(monkeypatch)
    loss_fn, params, batch = grouped_cnn(groups=6)
    got = ft.per_sample_grads(loss_fn, params, batch)
    assert calls == ["layers"]
    assert_trees_all_close(got, naive_per_sample(loss_fn, params, batch), **TOL)


class _MobileNetBlock(nn.Module):
    """A groups=1 stem, an inverted residual block (1x1 expand, depthwise 3x3 with stride,
    1x1 project), a grouped 3x3, pooling and two linear layers; ReLU6 in place."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.expand = nn.Conv2d(8, 16, 1, bias=False)
        self.depthwise = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.project = nn.Conv2d(16, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.stem(x), inplace=True)
        h = F.relu6(self.depthwise(F.relu6(self.expand(h))), inplace=True)
        h = self.project(h)
        h = torch.tanh(self.grouped(h) + h)
        return self.head(torch.tanh(self.fc(h.mean((2, 3)))))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_mobilenet_style_block(chunk_size: int | None, route: str) -> None:
    torch.manual_seed(5)
    x = torch.randn(6, 3, 12, 12, generator=_gen(1), dtype=D)
    check_layer_reductions(*_problem(_MobileNetBlock(), x, 4), chunk_size=chunk_size, gram=True)


def test_tied_grouped_weights_add_up(route: str) -> None:
    """One depthwise weight used twice (different strides), one grouped weight used twice."""

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.conv2d(x, p["dw"], p["b"], padding=1, groups=4))
        h = torch.tanh(F.conv2d(h, p["dw"], None, stride=2, groups=4))
        h = torch.tanh(F.conv2d(h, p["g"], padding=1, groups=2))
        return F.conv2d(h, p["g"], p["b"], groups=2).square().mean()

    params = {
        "dw": torch.randn(4, 1, 3, 3, generator=_gen(3), dtype=D),
        "g": torch.randn(4, 2, 2, 2, generator=_gen(4), dtype=D),
        "b": torch.randn(4, generator=_gen(5), dtype=D),
    }
    x = torch.randn(5, 4, 9, 9, generator=_gen(6), dtype=D)
    check_layer_reductions(loss_fn, params, x, gram=True)


def test_fast_and_generic_vmap_paths(monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    """Below the vmap directly (``_on_batch``) or through GroupedConv's ``vmap`` rule; with an
    example's own input, a per-example input without its batch dimension, an input that is
    the same for every example, and an example's own batch of two (``N = 2``)."""
    shared = torch.randn(1, 2, 6, generator=_gen(5), dtype=D)

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        own = F.conv1d(x, p["w"], p["b"], padding=1, groups=2)
        unbatched = F.conv1d(x[0], p["w"], p["b"], stride=2, groups=2)
        same = F.conv1d(shared, p["v"], None, dilation=2, groups=2)
        pair = F.conv1d(torch.cat([x, 2 * x]), p["v"], padding="same", groups=2)
        return (
            own.tanh().sum()
            + unbatched.square().sum()
            + (same * x.sum()).sum()
            + pair.tanh().square().sum()
        )

    params = {
        "w": torch.randn(4, 1, 3, generator=_gen(4), dtype=D),
        "b": torch.randn(4, generator=_gen(6), dtype=D),
        "v": torch.randn(2, 1, 3, generator=_gen(8), dtype=D),
    }
    x = torch.randn(4, 2, 6, generator=_gen(7), dtype=D)
    expected = naive_per_sample(loss_fn, params, x)
    available = _layer_rules._FAST
    for fast in (True, False):
        monkeypatch.setattr(_layer_rules, "_FAST", fast and available)
        got = ft.per_sample_grads(loss_fn, params, x, method="layers")
        assert_trees_all_close(got, expected, **TOL)
        norms = ft.per_sample_grad_norms(loss_fn, params, x, method="layers")
        flat = torch.cat([g.reshape(4, -1) for g in tree.leaves(expected)], 1)
        assert_trees_all_close(norms.global_norm, flat.norm(dim=1), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batch(dtype: torch.dtype, route: str) -> None:
    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, p["w"], p["b"], groups=2).square().sum()

    params = {"w": torch.randn(4, 1, 2, 2, dtype=dtype), "b": torch.randn(4, dtype=dtype)}
    x = torch.randn(0, 2, 3, 3, dtype=dtype)
    got = ft.per_sample_grads(loss_fn, params, x, method="layers")
    assert got["w"].shape == (0, 4, 1, 2, 2) and got["b"].shape == (0, 4)
    norms = ft.per_sample_grad_norms(loss_fn, params, x, method="layers")
    assert norms.global_norm.shape == (0,)


@pytest.mark.parametrize(
    ("shape", "groups", "kernel"),
    [
        ((16, 1, 3, 3), 16, 3),  # depthwise 3x3: oneDNN's kernel ("stacked" chosen)
        ((16, 1, 5, 5), 16, 5),  # depthwise 5x5: the per-offset route chosen
        ((16, 4, 3, 3), 4, 3),  # grouped
    ],
)
def test_float32_against_float64_loop(shape: tuple[int, ...], groups: int, kernel: int) -> None:
    """The routes the rule picks in float32 (where they differ from float64's), against the
    float64 loop, relative to the largest entry (float32 sums of products)."""

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, p["w"], p["b"], stride=2, padding=kernel // 2, groups=groups)
        return torch.tanh(h).square().mean()

    params = {
        "w": torch.randn(shape, generator=_gen(1)),
        "b": torch.randn(shape[0], generator=_gen(2)),
    }
    x = torch.randn(8, 16, 10, 10, generator=_gen(3))
    double = tree.map(lambda t: t.double(), params)
    expected = naive_per_sample(loss_fn, double, x.double())
    got = ft.per_sample_grads(loss_fn, params, x, method="layers")
    for k in params:
        scale = float(expected[k].abs().max())
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-4, atol=1e-5 * scale)


def _mismatched_bias(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    # A broadcast bias: torch's convolution refuses it, the rule must not take it.
    return F.conv1d(x, p["w"], p["b"], groups=2).square().mean()


def test_mismatched_bias_still_refused() -> None:
    params = {"w": torch.randn(4, 1, 3, dtype=D), "b": torch.randn(1, dtype=D)}
    x = torch.randn(3, 2, 5, generator=_gen(9), dtype=D)
    with pytest.raises(
        ValueError, match=r"params\['w'\] is used by conv1d with a bias of shape \(1,\)"
    ):
        ft.per_sample_grads(_mismatched_bias, params, x, method="layers")
    with pytest.raises(RuntimeError, match="bias"):  # torch's own refusal, via vmap
        ft.per_sample_grads(_mismatched_bias, params, x)
