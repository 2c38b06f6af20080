"""A zoo of small float64 ``torch.nn`` models for the per-sample gradient sweep.

Each case builds ``(loss_fn, params, batch, buffers)`` for ``functrain``'s per-sample routes
and says whether the ``"layers"`` rules cover it (else the name of the call a refusal must
name). :func:`naive` is the reference: one ``torch.autograd.grad`` per example, on a batch of
one, with fresh copies of the parameters and the model in the same mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from functrain import tree

D = torch.float64
ROWS = 5  # examples per batch: chunk size 2 does not divide it


class Case(NamedTuple):
    """One model of the sweep.

    Attributes:
        loss_fn: ``loss_fn(params, batch[, buffers=...]) -> mean loss``.
        params: the differentiated parameters (a dict of detached tensors).
        batch: the inputs, leading batch dimension :data:`ROWS` (or 1).
        buffers: passed as ``buffers=`` when not ``None``.
        layers: ``None`` where the ``"layers"`` rules apply, else text their refusal names.
        vmap: ``None`` where ``vmap(grad)`` works, else text of its clear error.
        fatal: the ``"layers"`` refusal stops ``"auto"`` too (vmap cannot do better).
        ignore: a warning of PyTorch's own (a regex) that the case triggers, or ``None``.
    """

    loss_fn: Callable[..., Any]
    params: dict[str, torch.Tensor]
    batch: Any
    buffers: Any = None
    layers: str | None = None
    vmap: str | None = None
    fatal: bool = False
    ignore: str | None = None


# vmap's warning for an op without a batching rule (it loops over the examples instead).
SLOW_VMAP = "There is a performance drop"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=D)


def _idx(high: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=_gen(seed))


def _module_case(
    model: nn.Module,
    x: Any,
    *,
    layers: str | None = None,
    vmap: str | None = None,
    fatal: bool = False,
    ignore: str | None = None,
    trainable: Callable[[str], bool] = lambda name: True,
    math_attention: bool = False,
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
) -> Case:
    """A module called with ``functional_call`` on ``params`` (and its buffers, if any)."""
    torch.manual_seed(seed)
    model = model.double().eval()  # eval: BatchNorm reads its running statistics (buffers)
    with torch.no_grad():
        for p in model.parameters():  # nonzero biases, norm weights off 1: every term counts
            p.add_(0.3 * torch.randn(p.shape, generator=_gen(seed + 1), dtype=D))
        for b in model.buffers():  # BatchNorm's running statistics, away from 0 and 1
            if b.is_floating_point():
                b.add_(0.3 * torch.randn(b.shape, generator=_gen(seed + 3), dtype=D)).abs_()
    params = {k: v.detach().clone() for k, v in model.named_parameters() if trainable(k)}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()} or None
    with warnings.catch_warnings():
        if ignore is not None:
            warnings.filterwarnings("ignore", ignore)
        targets = _x(*_output_shape(model, x), seed=seed + 2)

    def reduce(out: torch.Tensor, b: Any) -> torch.Tensor:
        if loss is not None:
            return loss(out)
        return F.mse_loss(out, b["y"])

    def run(p: Any, inputs: Any, state: Any) -> torch.Tensor:
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        if math_attention:  # vmap has no batching rule for the fused CPU attention kernel
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.functional_call(model, (p, state or {}), args)
        return torch.func.functional_call(model, (p, state or {}), args)

    if buffers is None:

        def loss_fn(p: Any, b: Any) -> torch.Tensor:
            return reduce(_first(run(p, b["x"], None)), b)

    else:

        def loss_fn(p: Any, b: Any, buffers: Any = None) -> torch.Tensor:  # type: ignore[misc]
            return reduce(_first(run(p, b["x"], buffers)), b)

    batch = {"x": x, "y": targets}
    return Case(loss_fn, params, batch, buffers, layers, vmap, fatal, ignore)


def _first(out: Any) -> torch.Tensor:
    """The output tensor of a module that returns ``(output, state)`` (RNNs, attention)."""
    return out[0] if isinstance(out, tuple) else out


def _output_shape(model: nn.Module, x: Any) -> tuple[int, ...]:
    args = x if isinstance(x, tuple) else (x,)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return tuple(_first(model(*args)).shape)


class Twice(nn.Module):
    """One linear applied twice (weight tying within a layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


class TiedLM(nn.Module):
    """An embedding tied to the output projection, with padding and repeated tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3, padding_idx=1)
        self.norm = nn.LayerNorm(3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.emb(idx)), self.emb.weight)


class BareParameter(nn.Module):
    """A bare ``nn.Parameter`` used in a matmul in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x @ self.w))


class SeqFirst(nn.Module):
    """``nn.MultiheadAttention(batch_first=False)`` on a batch-first input, transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.transpose(0, 1)
        return self.attn(s, s, s)[0].transpose(0, 1)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention(batch_first=True)`` as self-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


class Bag(nn.Module):
    """``nn.EmbeddingBag`` over fixed-length bags (2-d indices)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 3, mode=mode)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.bag(idx)


def _tokens_mean(out: torch.Tensor) -> torch.Tensor:
    """A token-level loss averaged over the tokens of the batch (reduction ``"mean"``)."""
    return out.square().mean()


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def build_cases() -> dict[str, Callable[[], Case]]:
    """Case name -> builder (models are built lazily: only the selected tests pay)."""
    n = ROWS
    tok = _idx(6, n, 4, seed=3)
    tok[:, 0] = 1  # the padding index in every example
    tok[:, 2] = tok[:, 3]  # a repeated index in every example
    seq = _x(n, 4, 3)
    mha = "multi_head_attention_forward"
    same_even = "Using padding='same' with even kernel"
    return {
        "linear": lambda: _module_case(nn.Linear(4, 3), _x(n, 4)),
        "linear-no-bias": lambda: _module_case(nn.Linear(4, 3, bias=False), _x(n, 4)),
        "linear-bias-only": lambda: _module_case(
            nn.Linear(4, 3), _x(n, 4), trainable=lambda k: k == "bias"
        ),
        "linear-seq-token-mean": lambda: _module_case(
            _seq(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), _x(n, 6, 4), loss=_tokens_mean
        ),
        "bilinear": lambda: _module_case(
            nn.Bilinear(3, 4, 2), (_x(n, 3), _x(n, 4, seed=1)), layers="bilinear", ignore=SLOW_VMAP
        ),
        "conv1d-stride-dilation": lambda: _module_case(
            nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=1), _x(n, 2, 11)
        ),
        "conv1d-same-dilated": lambda: _module_case(
            nn.Conv1d(2, 3, 4, padding="same", dilation=2), _x(n, 2, 9)
        ),
        "conv1d-same-even-kernel": lambda: _module_case(  # padded 1 left, 2 right
            nn.Conv1d(2, 3, 4, padding="same"), _x(n, 2, 7), ignore=same_even
        ),
        "conv2d-one-channel": lambda: _module_case(  # the grouped per-example kernel
            nn.Conv2d(1, 2, 3, padding=1), _x(n, 1, 6, 6)
        ),
        "conv2d-groups": lambda: _module_case(
            nn.Conv2d(4, 6, 3, groups=2, stride=2), _x(n, 4, 7, 7)
        ),
        "conv2d-depthwise": lambda: _module_case(
            nn.Conv2d(3, 6, 3, groups=3, padding=1), _x(n, 3, 5, 5)
        ),
        "conv2d-same": lambda: _module_case(
            nn.Conv2d(2, 3, (3, 5), padding="same"), _x(n, 2, 5, 6)
        ),
        "conv2d-reflect": lambda: _module_case(
            nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), _x(n, 2, 5, 5)
        ),
        "conv2d-circular": lambda: _module_case(
            nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="circular", stride=2), _x(n, 2, 6, 5)
        ),
        "conv2d-replicate": lambda: _module_case(
            nn.Conv2d(2, 3, 3, padding=2, padding_mode="replicate", dilation=2), _x(n, 2, 5, 5)
        ),
        "conv3d-stride": lambda: _module_case(
            nn.Conv3d(2, 3, 2, stride=(2, 1, 1), padding=(0, 1, 0)), _x(n, 2, 5, 3, 4)
        ),
        "conv-transpose1d": lambda: _module_case(
            nn.ConvTranspose1d(2, 3, 3, stride=2, output_padding=1),
            _x(n, 2, 5),
            layers="conv_transpose1d",
        ),
        "conv-transpose2d-groups": lambda: _module_case(
            nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1, padding=1),
            _x(n, 4, 3, 3),
            layers="conv_transpose2d",
        ),
        "embedding-padding-repeats": lambda: _module_case(
            _seq(nn.Embedding(6, 3, padding_idx=1), nn.Tanh()), tok
        ),
        "embedding-sparse": lambda: _module_case(
            _seq(nn.Embedding(6, 3, sparse=True), nn.Tanh()), tok, vmap="sparse=True"
        ),
        "embedding-max-norm": lambda: _module_case(
            _seq(nn.Embedding(6, 3, max_norm=0.5), nn.Tanh()),
            tok,
            layers="max_norm",
            vmap="max_norm",
            fatal=True,
        ),
        "embedding-bag-mean": lambda: _module_case(
            Bag("mean"), tok, layers="embedding_bag", ignore=SLOW_VMAP
        ),
        "embedding-bag-sum": lambda: _module_case(
            Bag("sum"), tok, layers="embedding_bag", ignore=SLOW_VMAP
        ),
        "layer-norm": lambda: _module_case(nn.LayerNorm((2, 3)), _x(n, 4, 2, 3)),
        "layer-norm-no-bias": lambda: _module_case(nn.LayerNorm(3, bias=False), seq),
        "group-norm": lambda: _module_case(nn.GroupNorm(2, 4), _x(n, 4, 3), layers="group_norm"),
        "instance-norm-affine": lambda: _module_case(
            nn.InstanceNorm1d(3, affine=True), _x(n, 3, 5), layers="instance_norm"
        ),
        "rms-norm": lambda: _module_case(nn.RMSNorm(3), seq, layers="rms_norm"),
        "batch-norm-eval": lambda: _module_case(
            _seq(nn.Linear(3, 4), nn.BatchNorm1d(4)), _x(n, 3), layers="batch_norm"
        ),
        "mha-batch-first": lambda: _module_case(SelfAttention(), _x(n, 3, 4), layers=mha),
        "mha-seq-first": lambda: _module_case(SeqFirst(), _x(n, 3, 4), layers=mha),
        "transformer-encoder-layer": lambda: _module_case(
            nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True),
            _x(n, 3, 4),
            layers=mha,
            math_attention=True,
        ),
        "gru": lambda: _module_case(
            nn.GRU(3, 2, batch_first=True), seq, layers="gru", vmap="recurrent module"
        ),
        "lstm": lambda: _module_case(
            nn.LSTM(3, 2, batch_first=True), seq, layers="lstm", vmap="recurrent module"
        ),
        "prelu": lambda: _module_case(_seq(nn.Linear(3, 4), nn.PReLU(4)), _x(n, 3), layers="prelu"),
        "linear-twice": lambda: _module_case(Twice(), _x(n, 2, 3)),
        "tied-embedding": lambda: _module_case(TiedLM(), tok, loss=_tokens_mean),
        "bare-parameter-matmul": lambda: _module_case(BareParameter(), _x(n, 4), layers="matmul"),
        "batch-of-one": lambda: _module_case(
            _seq(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(9, 2)), _x(1, 2, 5)
        ),
    }


def naive(case: Case) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example gradients (dense) and losses: one ``torch.autograd.grad`` per example on a
    batch of one, with fresh copies of the parameters."""
    names = list(case.params)
    n = tree.leaves(case.batch)[0].shape[0]
    rows, losses = [], []
    extra = {} if case.buffers is None else {"buffers": case.buffers}
    for i in range(n):
        example = tree.map(lambda t, i=i: t[i : i + 1], case.batch)
        p = {k: case.params[k].clone().requires_grad_(True) for k in names}
        loss = case.loss_fn(p, example, **extra)
        grads = torch.autograd.grad(loss, [p[k] for k in names], allow_unused=True)
        rows.append(
            [
                torch.zeros_like(p[k]) if g is None else g.to_dense() if g.is_sparse else g
                for g, k in zip(grads, names)
            ]
        )
        losses.append(loss.detach())
    return [torch.stack(col) for col in zip(*rows)], torch.stack(losses)
