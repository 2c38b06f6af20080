"""Integration review: realistic model code through functrain's entry points vs plain PyTorch.

Models as users write them (a ResNet basic-block stack with in-place ReLU and residual add, a
pre-norm causal transformer with tied embeddings, an LSTM/GRU classifier, a Sequential MLP with
Flatten, LayerNorm and Dropout) are trained with ``ft.make_train_step`` and compared with the
classic loop on a deep copy (``backward`` per micro-batch weighted by its share of the batch,
``torch.optim.AdamW``); per-sample routes are compared with a per-example autograd loop.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import functrain as ft

DT = torch.float64
LR, WD = 1e-2, 1e-4


class BasicBlock(nn.Module):
    """torchvision's BasicBlock without downsampling."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, c: int = 4, n: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.layers = nn.Sequential(BasicBlock(c), BasicBlock(c))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        return self.fc(torch.flatten(self.pool(self.layers(x)), 1))


class PreNormBlock(nn.Module):
    def __init__(self, d: int, heads: int, p: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=p, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.Dropout(p))
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        x = x + self.drop(a)
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 8, p: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(PreNormBlock(d, 2, p), PreNormBlock(d, 2, p))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # The CPU flash kernel has no vmap batching rule (warns); the math kernel is exact.
        with sdpa_kernel(SDPBackend.MATH):
            return self.head(self.ln(self.blocks(self.emb(idx))))


class RNNClassifier(nn.Module):
    def __init__(self, kind: str = "lstm") -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(6, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(idx))
        return self.fc(out[:, -1])


def mlp(p: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 16),
        nn.LayerNorm(16),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(16, 3),
    )


def build(kind: str, **kw: Any) -> nn.Module:
    torch.manual_seed(0)
    ctor = {"resnet": ResNet, "lm": TinyLM, "lstm": RNNClassifier, "gru": RNNClassifier}
    if kind == "gru":
        kw["kind"] = "gru"
    return (ctor[kind](**kw) if kind in ctor else mlp(**kw)).to(DT)


def data(kind: str, n: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "resnet":
        x = torch.randn(n, 2, 5, 5, generator=g, dtype=DT)
        return {"x": x, "y": torch.randint(0, 3, (n,), generator=g)}
    if kind == "lm":
        idx = torch.randint(0, 11, (n, 7), generator=g)
        return {"x": idx[:, :-1], "y": idx[:, 1:]}
    if kind in ("lstm", "gru"):
        return {
            "x": torch.randint(0, 11, (n, 5), generator=g),
            "y": torch.randint(0, 3, (n,), generator=g),
        }
    return {
        "x": torch.randn(n, 3, 4, generator=g, dtype=DT),
        "y": torch.randint(0, 3, (n,), generator=g),
    }


def crit(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def make_loss(model: ft.FunctionalModel, has_buffers: bool) -> Any:
    if has_buffers:

        def loss_fn(params: dict, batch: dict, buffers: dict) -> ft.LossOutput:
            out, new_buffers = model.apply(params, buffers, batch["x"])
            return ft.LossOutput(crit(out, batch["y"]), buffers=new_buffers)

        return loss_fn
    return lambda params, batch: crit(model(params, batch["x"]), batch["y"])


def reference_train(net: nn.Module, batches: list[dict], sizes: list[int]) -> nn.Module:
    """The classic loop; each micro-batch weighted by its share (exact for unequal sizes)."""
    net = copy.deepcopy(net)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WD)
    for batch in batches:
        total, start = batch["y"].shape[0], 0
        for n in sizes:
            part = {k: v[start : start + n] for k, v in batch.items()}
            start += n
            (crit(net(part["x"]), part["y"]) * n / total).backward()
        opt.step()
        opt.zero_grad()
    return net


def functrain_train(net: nn.Module, batches: list[dict], **kw: Any) -> ft.TrainState:
    model, params, buffers = ft.functionalize(net)
    tx = ft.adamw(LR, weight_decay=WD)
    state = ft.TrainState.create(params=params, tx=tx, buffers=buffers or None)
    step = ft.make_train_step(make_loss(model, bool(buffers)), tx, **kw)
    for batch in batches:
        state, metrics = step(state, batch)
        assert all(bool(torch.isfinite(v).all()) for v in metrics.values())
    return state


CASES = [
    ({}, [7]),
    ({"grad_backend": "func"}, [7]),
    ({"micro_batches": 3}, [3, 2, 2]),
    ({"micro_batches": 3, "grad_backend": "func"}, [3, 2, 2]),
    ({"micro_batches": [2, 5], "grad_backend": "autograd"}, [2, 5]),
]


@pytest.mark.parametrize("kind", ["resnet", "lm", "lstm", "mlp"])
@pytest.mark.parametrize(("kw", "sizes"), CASES)
def test_train_step_matches_classic_loop(kind: str, kw: dict, sizes: list[int]) -> None:
    net = build(kind)
    batches = [data(kind, 7, s) for s in range(2)]
    ref = reference_train(net, batches, sizes).state_dict()
    state = functrain_train(net, batches, **kw)
    for name, value in {**state.params, **(state.buffers or {})}.items():
        torch.testing.assert_close(value, ref[name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["lm", "mlp"])
def test_vmap_strategy_matches_classic_loop(kind: str) -> None:
    net = build(kind)
    batches = [data(kind, 6, s) for s in range(2)]
    ref = reference_train(net, batches, [2, 2, 2]).state_dict()
    state = functrain_train(net, batches, strategy="vmap", micro_batches=3)
    for name, value in state.params.items():
        torch.testing.assert_close(value, ref[name])


def test_compiled_step_matches_classic_loop() -> None:
    net = build("mlp")
    batches = [data("mlp", 7, s) for s in range(2)]
    ref = reference_train(net, batches, [7]).state_dict()
    state = functrain_train(net, batches, compile={"backend": "aot_eager"})
    for name, value in state.params.items():
        torch.testing.assert_close(value, ref[name])


def naive_per_example(net: nn.Module, params: dict, buffers: dict, batch: dict) -> list[dict]:
    out = []
    for i in range(batch["y"].shape[0]):
        ps = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        logits = torch.func.functional_call(net, {**ps, **buffers}, (batch["x"][i : i + 1],))
        grads = torch.autograd.grad(crit(logits, batch["y"][i : i + 1]), list(ps.values()))
        out.append(dict(zip(ps, grads)))
    return out


@pytest.mark.parametrize("kind", ["resnet", "lm", "mlp"])
def test_per_sample_routes_match_naive_loop(kind: str) -> None:
    net = build(kind).eval()  # eval-mode BatchNorm, dropout off
    model, params, buffers = ft.functionalize(net)
    batch = data(kind, 5)

    def loss_fn(params: dict, batch: dict, buffers: dict) -> torch.Tensor:
        return crit(model.apply(params, buffers, batch["x"])[0], batch["y"])

    refs = naive_per_example(net, params, buffers, batch)
    psg = ft.per_sample_grads(loss_fn, params, batch, buffers=buffers, chunk_size=3)
    for name in params:
        torch.testing.assert_close(psg[name], torch.stack([r[name] for r in refs]))
    ref_norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in r.values())) for r in refs])
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, buffers=buffers)
    torch.testing.assert_close(norms.global_norm, ref_norms)
    clip = float(ref_norms.median())
    clipped = ft.clipped_grad_sum(loss_fn, params, batch, clip, buffers=buffers)
    for name in params:
        ref = sum(r[name] * min(1.0, clip / float(n)) for r, n in zip(refs, ref_norms))
        torch.testing.assert_close(clipped.grad_sum[name], ref)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_model_under_vmap_gives_clear_error(kind: str) -> None:
    """nn.LSTM / nn.GRU cannot be vmapped by PyTorch; the old error named only shapes."""
    model, params, _ = ft.functionalize(build(kind))
    batch = data(kind, 4)
    loss_fn = make_loss(model, False)
    with pytest.raises(RuntimeError, match=r"recurrent module.*method='loop'"):
        ft.per_sample_grads(loss_fn, params, batch, method="vmap")
    with pytest.raises(RuntimeError, match=r"recurrent module.*method='loop'"):
        ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method="vmap")
    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, strategy="vmap", micro_batches=2)
    with pytest.raises(RuntimeError, match=r"recurrent module.*strategy='loop'"):
        step(ft.TrainState.create(params=params, tx=tx), batch)


def test_dropout_noise_scale_checkpoint_resume_and_eval(tmp_path: Any) -> None:
    """Dropout on: reproducible per state; a restored state continues bit for bit."""
    net = build("lm", p=0.2)
    model, params, _ = ft.functionalize(net)
    tx = ft.adamw(LR, weight_decay=WD)
    step = ft.make_train_step(
        make_loss(model, False),
        tx,
        micro_batches=[3, 4],
        grad_stats=ft.noise_scale_hook(),
        donate=False,
    )
    state = ft.TrainState.create(params=params, tx=tx, seed=5)
    batches = [data("lm", 7, s) for s in range(3)]
    for batch in batches[:2]:
        state, metrics = step(state, batch)
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert {"noise_scale/b_simple", "noise_scale/gradient_diversity"} <= metrics.keys()
    again, _ = step(state, batches[2])
    path = tmp_path / "state.safetensors"
    ft.checkpoint.save(str(path), state)
    restored = ft.checkpoint.restore(
        str(path), step.prepare(ft.TrainState.create(params=params, tx=tx))
    )
    resumed, _ = step(restored, batches[2])
    uninterrupted, _ = step(state, batches[2])
    for a, b in [(again, uninterrupted), (uninterrupted, resumed)]:
        ft.testing.assert_trees_all_equal(a.params, b.params)
        ft.testing.assert_trees_all_equal(a.opt_state, b.opt_state)
        ft.testing.assert_trees_all_equal(a.extra, b.extra)
    # Evaluation: eval mode (dropout off), a split that the metrics do not depend on.
    evaluate = ft.make_eval_step(
        lambda p, b: crit(model.eval()(p, b["x"]), b["y"]), micro_batches=[2, 5]
    )
    ref = copy.deepcopy(net).eval()
    ref.load_state_dict(resumed.params, strict=False)
    with torch.no_grad():
        expected = crit(ref(batches[0]["x"]), batches[0]["y"])
    torch.testing.assert_close(evaluate(resumed, batches[0])["loss"], expected)


def test_resnet_checkpoint_resume_with_buffers(tmp_path: Any) -> None:
    net = build("resnet")
    model, params, buffers = ft.functionalize(net)
    tx = ft.adamw(LR, weight_decay=WD)
    step = ft.make_train_step(make_loss(model, True), tx, micro_batches=3, donate=False)
    state = ft.TrainState.create(params=params, tx=tx, buffers=buffers)
    state, _ = step(state, data("resnet", 7, 0))
    path = tmp_path / "state.safetensors"
    ft.checkpoint.save(str(path), state)
    restored = ft.checkpoint.restore(
        str(path), ft.TrainState.create(params=params, tx=tx, buffers=buffers)
    )
    a, _ = step(state, data("resnet", 7, 1))
    b, _ = step(restored, data("resnet", 7, 1))
    ft.testing.assert_trees_all_equal(a.params, b.params)
    ft.testing.assert_trees_all_equal(a.buffers, b.buffers)
