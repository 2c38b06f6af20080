"""The ``"layers"`` route against a naive per-example ``torch.autograd.grad`` loop, float64.

Every public reduction (per-sample gradients, norms, Gram matrices, clipped sums) with
``method="auto"`` and ``method="layers"`` must give the numbers of the loop over examples, or
(``"layers"`` only) refuse with a ``ValueError``; ``"auto"`` must then fall back to ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft

Loss = Callable[..., Any]
ROWS = 4


def _seq(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(*layers).double()


class _Tied(nn.Module):
    """One linear applied twice (an unrolled recurrence): a parameter used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class _SharedEmbedding(nn.Module):
    """Input embedding and output projection share one weight (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3, padding_idx=0)
        self.norm = nn.LayerNorm(3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # In place on the embedding's output: allowed on a plain call, so on the rule's too.
        h = self.norm(self.emb(idx).mul_(2.0))
        return F.linear(h, self.emb.weight).mean(1)


class _Frozen(nn.Module):
    """A frozen layer (not among the differentiated params) between trainable ones."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)
        self.mid.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.mid(torch.relu(self.a(x)))))


class _SubBatch(nn.Module):
    """Each example is two images (a convolution over an example's own batch dimension), and
    one single-channel view of them; in-place ReLU and a ceil-mode max pool in between."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.mono, self.head = (
            nn.Conv2d(2, 8, 2),
            nn.Conv2d(1, 3, 3, 2),
            nn.LazyLinear(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu_(self.conv(x.reshape(-1, 2, 5, 5))), 2, ceil_mode=True)
        mono = self.mono(x.reshape(-1, 1, 5, 5))
        return self.head(torch.cat([h.reshape(len(x), -1), mono.reshape(len(x), -1)], 1))


def _img(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(ROWS, *shape, generator=g, dtype=torch.float64)


def _flat(module: nn.Module) -> nn.Module:
    return _seq(module, nn.Flatten(), nn.LazyLinear(2))


# (model factory, input factory): targets are 2 classes throughout.
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor]]] = {
    "conv1d_dilation_stride": (
        lambda: _flat(nn.Conv1d(2, 3, 3, stride=4, dilation=2)),
        _img(2, 13),
    ),
    "conv1d_groups2": (lambda: _flat(nn.Conv1d(4, 6, 3, groups=2)), _img(4, 9)),
    "conv2d_depthwise": (lambda: _flat(nn.Conv2d(3, 6, 3, groups=3)), _img(3, 6, 6)),
    "conv2d_same_even": (lambda: _flat(nn.Conv2d(2, 3, (2, 4), padding="same")), _img(2, 5, 6)),
    "conv2d_same_dilated": (
        lambda: _flat(nn.Conv2d(2, 3, 3, padding="same", dilation=(1, 2))),
        _img(2, 5, 6),
    ),
    "conv2d_reflect": (
        lambda: _flat(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")),
        _img(2, 5, 5),
    ),
    "conv2d_circular": (
        lambda: _flat(nn.Conv2d(2, 3, (3, 2), padding=(1, 2), padding_mode="circular")),
        _img(2, 5, 5),
    ),
    "conv2d_replicate_nobias": (
        lambda: _flat(nn.Conv2d(1, 3, 3, padding=2, padding_mode="replicate", bias=False)),
        _img(1, 9, 9),
    ),
    "conv2d_one_channel_grouped_kernel": (
        lambda: _flat(nn.Conv2d(1, 2, 2, stride=3)),
        _img(1, 12, 12),
    ),
    "conv2d_stride_gt_kernel_asym": (
        lambda: _flat(nn.Conv2d(2, 3, (1, 2), stride=(3, 4), padding=(1, 0))),
        _img(2, 7, 9),
    ),
    "conv2d_inplace_relu_maxpool": (
        lambda: _flat_pool(nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True)),
        _img(2, 7, 7),
    ),
    "conv2d_maxpool_dilation": (
        lambda: _flat_pool(nn.MaxPool2d(2, stride=1, dilation=2)),
        _img(2, 7, 7),
    ),
    "conv2d_avgpool": (lambda: _flat_pool(nn.AvgPool2d(2, ceil_mode=True)), _img(2, 7, 7)),
    "conv3d": (
        lambda: _flat(nn.Conv3d(2, 2, (1, 2, 3), stride=(1, 2, 1), padding=1)),
        _img(2, 3, 4, 4),
    ),
    "linear_sequence": (
        lambda: _seq(
            nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2), nn.Flatten(), nn.Linear(10, 2)
        ),
        _img(5, 3),
    ),
    "layernorm_groupnorm": (
        lambda: _seq(
            nn.Linear(4, 6),
            nn.LayerNorm(6),
            nn.Unflatten(1, (3, 2)),
            nn.GroupNorm(3, 3),
            nn.Flatten(),
            nn.LayerNorm(6, elementwise_affine=False),
            nn.Linear(6, 2),
        ),
        _img(4),
    ),
    "tied_linear": (lambda: _Tied().double(), _img(3)),
    "frozen_between": (lambda: _Frozen().double(), _img(4)),
    "batchnorm_eval": (
        lambda: _seq(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 2)).eval(),
        _img(2, 5, 5),
    ),
    "batchnorm_eval_buffers_only": (
        lambda: _seq(
            nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3, affine=False), nn.Flatten(), nn.Linear(48, 2)
        ).eval(),
        _img(2, 5, 5),
    ),
    "channels_last_input": (
        lambda: _flat(nn.Conv2d(3, 4, 2, stride=2)),
        lambda g: _img(3, 6, 6)(g).contiguous(memory_format=torch.channels_last),
    ),
    "conv2d_sub_batch": (lambda: _SubBatch().double(), _img(4, 5, 5)),
    "embedding_tied_padding": (
        lambda: _SharedEmbedding().double(),
        lambda g: torch.randint(0, 7, (ROWS, 5), generator=g),
    ),
}


# Cases with a parameter in a call that has no rule: "layers" refuses, "auto" falls back.
# (Grouped and depthwise convolutions, once refused, have a rule: test_layer_grouped_weight.py.)
REFUSED = {"batchnorm_eval", "layernorm_groupnorm"}


def _flat_pool(pool: nn.Module) -> nn.Module:
    return _seq(
        nn.Conv2d(2, 8, 2, padding=1), nn.ReLU(inplace=True), pool, nn.Flatten(), nn.LazyLinear(2)
    )


def _setup(name: str, reduction: str) -> tuple[Loss, dict[str, torch.Tensor], dict, dict]:
    make, inputs = CASES[name]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = make()
    x = inputs(gen)
    model(x)  # materialize lazy layers
    params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    batch = {"x": x, "y": torch.randint(0, 2, (ROWS,), generator=gen)}

    def loss_fn(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        state = {**p, **frozen, **buffers}
        out = torch.func.functional_call(model, state, (b["x"],))
        return F.cross_entropy(out, b["y"], reduction=reduction)

    return loss_fn, params, batch, buffers


def _naive(loss_fn: Loss, params: dict, batch: dict) -> dict[str, torch.Tensor]:
    """Per-example gradients, one ordinary backward pass per example."""
    names = list(params)
    rows: list[tuple[torch.Tensor, ...]] = []
    for i in range(ROWS):
        leaves = [params[k].clone().requires_grad_(True) for k in names]
        example = {k: v[i : i + 1] for k, v in batch.items()}
        loss = loss_fn(dict(zip(names, leaves)), example)
        rows.append(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


# torch's own warning for an even kernel with padding="same", in the naive loop too.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("method", ["auto", "layers"])
@pytest.mark.parametrize(
    ("name", "reduction"),
    # Alternate cases sum their losses: the mean is not special-cased anywhere (a fast file).
    [(n, ("mean", "sum")[i % 2]) for i, n in enumerate(sorted(CASES))],
)
def test_layers_route_matches_naive_loop(name: str, method: str, reduction: str) -> None:
    loss_fn, params, batch, _ = _setup(name, reduction)
    ref = _naive(loss_fn, params, batch)
    flat = torch.cat([g.reshape(ROWS, -1) for g in ref.values()], 1)
    try:
        grads = ft.per_sample_grads(loss_fn, params, batch, method=method)
    except ValueError as err:
        assert method == "layers" and name in REFUSED, err
        assert "method='layers'" in str(err)
        return
    assert method == "auto" or name not in REFUSED
    for k in ref:
        _close(grads[k], ref[k])
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, method=method)
    _close(norms.global_norm, flat.norm(dim=1))
    for k in ref:
        _close(norms.leaf_norms[k], ref[k].reshape(ROWS, -1).norm(dim=1))
    _close(ft.per_sample_gram(loss_fn, params, batch, method=method), flat @ flat.T)
    clip = float(flat.norm(dim=1).median())
    out = ft.clipped_grad_sum(loss_fn, params, batch, clip, method=method)
    factors = (clip / flat.norm(dim=1)).clamp(max=1.0)
    for k in ref:
        expected = (factors.reshape(-1, *[1] * (ref[k].dim() - 1)) * ref[k]).sum(0)
        _close(out.grad_sum[k], expected)


@pytest.mark.parametrize("method", ["auto", "layers"])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_loss_sum_sequence_model_in_chunks(method: str, chunk_size: int | None) -> None:
    """A ``LossSum`` over the tokens of a sequence model: each example's loss is its own mean."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = _seq(nn.Embedding(6, 4, padding_idx=2), nn.LayerNorm(4), nn.Linear(4, 6))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tokens = torch.randint(0, 6, (ROWS, 5), generator=gen)
    batch = {"x": tokens, "y": torch.randint(0, 6, (ROWS, 5), generator=gen)}
    batch["y"][:, 3:] = -100  # padding targets: fewer counted tokens

    def loss_fn(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> ft.LossSum:
        logits = torch.func.functional_call(model, p, (b["x"],))
        total = F.cross_entropy(logits.flatten(0, 1), b["y"].flatten(), reduction="sum")
        return ft.LossSum(total, (b["y"] != -100).sum())

    def mean_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        out = loss_fn(p, b)
        return out.total / out.count

    ref = _naive(mean_loss, params, batch)
    grads = ft.per_sample_grads(loss_fn, params, batch, method=method, chunk_size=chunk_size)
    for k in ref:
        _close(grads[k], ref[k])
    flat = torch.cat([g.reshape(ROWS, -1) for g in ref.values()], 1)
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, method=method, chunk_size=chunk_size)
    _close(norms.global_norm, flat.norm(dim=1))
    gram = ft.per_sample_gram(loss_fn, params, batch, method=method, chunk_size=chunk_size)
    _close(gram, flat @ flat.T)


@pytest.mark.parametrize("method", ["auto", "layers"])
def test_batch_of_one(method: str) -> None:
    loss_fn, params, batch, _ = _setup("conv2d_inplace_relu_maxpool", "mean")
    one = {k: v[:1] for k, v in batch.items()}
    ref = _naive(loss_fn, params, batch)
    grads = ft.per_sample_grads(loss_fn, params, one, method=method)
    for k in ref:
        _close(grads[k], ref[k][:1])
