"""A migration journey: a torch.optim run of a small checkpointed GPT resumes in functrain.

A user's real run, end to end: a GPT-like model whose blocks run under
``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` (as Hugging Face's
gradient checkpointing does), trained by ``torch.optim.AdamW`` with two parameter groups (no
decay on biases and norms), a ``LambdaLR`` warmup-cosine, ``clip_grad_norm_(1.0)`` and 2-step
gradient accumulation done the torch way (``loss / 2``); saved with ``torch.save`` and loaded
with ``weights_only=True``. functrain resumes from the file (``ft.opt_state_from_torch``,
``make_train_step(..., micro_batches=2)``) while torch resumes from the same file; then the
functrain run is handed back to a fresh torch optimizer and scheduler
(``ft.opt_state_to_torch``) and both continue. Everything is float64, so the two must agree to
``1e-10`` relative. The references are torch's own loop, and a per-example torch loop for the
per-sample gradient norms.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

import functrain as ft

VOCAB, WIDTH, HEADS, CONTEXT = 13, 16, 2, 8
LR, BETAS, EPS, DECAY = 3e-3, (0.9, 0.95), 1e-8, 0.1
WARMUP, TOTAL = 3, 16
N_TORCH, M_RESUMED, K_BACK = 6, 4, 3
BATCH, ACCUMULATE = 4, 2
TOL = 1e-10


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    # Schedules give the default dtype for an integer count: float64 runs need it float64
    # (functrain.optim.schedules), else the learning rate is rounded to float32.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Block(torch.nn.Module):
    """A pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = torch.nn.Linear(WIDTH, WIDTH)
        self.ln_2 = torch.nn.LayerNorm(WIDTH)
        self.fc = torch.nn.Linear(WIDTH, 4 * WIDTH)
        self.out = torch.nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(WIDTH, dim=-1)
        q, k, v = (z.view(b, t, HEADS, WIDTH // HEADS).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(WIDTH // HEADS)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, WIDTH))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class TinyGPT(torch.nn.Module):
    """Token and position embeddings, 2 checkpointed blocks, a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, WIDTH)
        self.wpe = torch.nn.Embedding(CONTEXT, WIDTH)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.ln_f = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.wte.weight  # tied, as GPT-2 does
        self.gradient_checkpointing = True

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.wte(idx) + self.wpe(torch.arange(idx.shape[-1], device=idx.device))
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False)  # HF's gradient checkpointing
            else:
                h = block(h)
        return self.head(self.ln_f(h))


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def warmup_cosine(step: int) -> float:
    """Hugging Face's ``get_cosine_schedule_with_warmup`` multiplier, in Python floats."""
    if step < WARMUP:
        return step / WARMUP
    progress = (step - WARMUP) / (TOTAL - WARMUP)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def no_decay(name: str) -> bool:
    return name.endswith("bias") or ".ln_" in name or name.startswith("ln_")


def param_groups(net: TinyGPT, named: bool = True) -> list[dict[str, Any]]:
    """Two groups, decayed weights first (another order than ``net.parameters()``)."""
    pairs = list(net.named_parameters())
    decay = [(n, p) for n, p in pairs if not no_decay(n)]
    rest = [(n, p) for n, p in pairs if no_decay(n)]
    if not named:
        decay, rest = [p for _, p in decay], [p for _, p in rest]
    return [{"params": decay, "weight_decay": DECAY}, {"params": rest, "weight_decay": 0.0}]


def torch_optimizer(net: TinyGPT, named: bool = True) -> tuple[torch.optim.AdamW, Any]:
    """The user's AdamW (two groups) and its LambdaLR."""
    opt = torch.optim.AdamW(param_groups(net, named), lr=LR, betas=BETAS, eps=EPS)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)


def torch_step(net: TinyGPT, opt: torch.optim.Optimizer, sched: Any, batch: dict) -> None:
    """Gradient accumulation the torch way, clipping, step, schedule."""
    for x, y in zip(batch["x"].chunk(ACCUMULATE), batch["y"].chunk(ACCUMULATE)):
        (lm_loss(net(x), y) / ACCUMULATE).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()


def batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=g)
        out.append({"x": tokens[:, :-1], "y": tokens[:, 1:]})
    return out


def torch_clip_grad_norm(max_norm: float) -> ft.GradientTransformation:
    """``clip_grad_norm_``'s numbers (``1e-6`` added to the norm; the docs' recipe)."""

    def clip(updates: Any, params: Any = None) -> Any:
        factor = torch.clamp(max_norm / (ft.tree.norm(updates) + 1e-6), max=1.0)
        return ft.tree.scale(factor, updates)

    return ft.stateless(clip)


def make_tx(form: str, clip: str = "torch") -> ft.GradientTransformation:
    """The functrain equivalent of AdamW with two groups, LambdaLR and clip_grad_norm_."""
    schedule = ft.warmup_cosine_decay_schedule(0.0, LR, WARMUP, TOTAL)
    b1, b2 = BETAS
    if form == "partition":

        def labels(params: dict[str, torch.Tensor]) -> dict[str, str]:
            return {n: "no_decay" if no_decay(n) else "decay" for n in params}

        adamw = ft.partition(
            {
                "decay": ft.adamw(schedule, b1, b2, EPS, weight_decay=DECAY),
                "no_decay": ft.adamw(schedule, b1, b2, EPS, weight_decay=0.0),
            },
            labels,
        )
    else:  # optax's way: one AdamW whose decay is masked
        mask: Callable[[Any], Any] = lambda p: {n: not no_decay(n) for n in p}  # noqa: E731
        adamw = ft.adamw(schedule, b1, b2, EPS, weight_decay=DECAY, mask=mask)
    head = torch_clip_grad_norm(1.0) if clip == "torch" else ft.clip_by_global_norm(1.0)
    return ft.chain(head, adamw)


def checkpoint_bytes(net: TinyGPT, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(
        {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
        buffer,
    )
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_close(fparams: dict[str, torch.Tensor], net: torch.nn.Module, tol: float) -> float:
    tparams = dict(net.named_parameters())
    assert set(fparams) == set(tparams)
    worst = 0.0
    for name, p in tparams.items():
        p = p.detach()
        rel = float((fparams[name].detach() - p).abs().max() / p.abs().max())
        worst = max(worst, rel)
    assert worst < tol, worst
    return worst


def torch_run(data: list[dict[str, torch.Tensor]], named: bool = True) -> dict[str, Any]:
    """The torch phase: ``N_TORCH`` steps, then the checkpoint a torch script keeps."""
    torch.manual_seed(0)
    net = TinyGPT()
    opt, sched = torch_optimizer(net, named)
    for batch in data:
        torch_step(net, opt, sched, batch)
    return checkpoint_bytes(net, opt, sched)


def torch_resume(ckpt: dict[str, Any], named: bool = True) -> tuple[TinyGPT, Any, Any]:
    """torch resumes from the file, the usual way."""
    net = TinyGPT()
    net.load_state_dict(ckpt["model"])
    opt, sched = torch_optimizer(net, named)
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    return net, opt, sched


def functional(ckpt: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor], Callable[..., Any]]:
    net = TinyGPT()
    net.load_state_dict(ckpt["model"])
    model, params, _ = ft.functionalize(net)

    def loss_fn(p: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss(model(p, batch["x"]), batch["y"])

    return model, params, loss_fn


def resumed_state(tx: Any, params: Any, ckpt: dict[str, Any], **kw: Any) -> ft.TrainState:
    """The docs' recipe: the converted moments, and the step counting on from torch's."""
    opt_state = ft.opt_state_from_torch(tx, params, ckpt["optimizer"], **kw)
    resumed_at = torch.tensor(int(ckpt["optimizer"]["state"][0]["step"]))
    state = ft.TrainState.create(params=params, tx=tx, seed=None)
    return state.replace(step=resumed_at, opt_state=opt_state)


def hand_back(net: TinyGPT, tx: Any, state: ft.TrainState) -> tuple[Any, Any]:
    """A fresh AdamW and LambdaLR at the functrain state's step (the docs' recipe)."""
    opt = torch.optim.AdamW(param_groups(net), lr=LR, betas=BETAS, eps=EPS)
    opt.load_state_dict(ft.opt_state_to_torch(tx, state.opt_state, state.params, opt))
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]  # what LambdaLR(..., last_epoch=...) resumes from
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine, last_epoch=int(state.step) - 1)
    return opt, sched


@pytest.mark.parametrize("form", ["partition", "masked"])
def test_torch_run_resumes_in_functrain_and_goes_back(form: str) -> None:
    data = batches(N_TORCH + M_RESUMED + K_BACK, seed=1)
    ckpt = torch_run(data[:N_TORCH])
    tnet, topt, tsched = torch_resume(ckpt)
    model, params, loss_fn = functional(ckpt)
    tx = make_tx(form)
    state = resumed_state(tx, params, ckpt)
    assert int(state.step) == N_TORCH == ckpt["scheduler"]["last_epoch"]
    step = ft.make_train_step(loss_fn, tx, micro_batches=ACCUMULATE)

    # The blocks are checkpointed inside the step: each runs again during backward.
    calls = []
    hooks = [b.register_forward_pre_hook(lambda m, a: calls.append(m)) for b in model.module.blocks]
    for batch in data[N_TORCH : N_TORCH + M_RESUMED]:
        torch_step(tnet, topt, tsched, batch)
        state, _ = step(state, batch)
    for h in hooks:
        h.remove()
    assert len(calls) == M_RESUMED * ACCUMULATE * 2 * 2  # micro-batches x blocks x (fwd, recompute)
    assert_close(state.params, tnet, TOL)
    assert int(state.step) == N_TORCH + M_RESUMED

    # Back to torch: a fresh optimizer and scheduler continue from functrain's state.
    back = TinyGPT()
    back.load_state_dict(state.params, strict=False)  # the tied head is wte.weight
    bopt, bsched = hand_back(back, tx, state)
    assert bsched.get_last_lr() == tsched.get_last_lr()
    for batch in data[N_TORCH + M_RESUMED :]:
        torch_step(tnet, topt, tsched, batch)
        torch_step(back, bopt, bsched, batch)
        state, _ = step(state, batch)
    assert_close(state.params, tnet, TOL)
    assert_close(dict(back.named_parameters()), tnet, TOL)
    assert bopt.state_dict()["state"][0]["step"] == topt.state_dict()["state"][0]["step"]


def test_optax_clip_parts_from_clip_grad_norm() -> None:
    # The table's ft.clip_by_global_norm adds no 1e-6 to the norm: while clipping is active the
    # runs part by about 1e-8 relative (float64), which the docs say; torch's recipe is exact.
    data = batches(N_TORCH + M_RESUMED, seed=2)
    ckpt = torch_run(data[:N_TORCH])
    tnet, topt, tsched = torch_resume(ckpt)
    _, params, loss_fn = functional(ckpt)
    states = {c: resumed_state(make_tx("masked", c), params, ckpt) for c in ("optax", "torch")}
    steps = {c: ft.make_train_step(loss_fn, make_tx("masked", c), micro_batches=2) for c in states}
    for batch in data[N_TORCH:]:
        torch_step(tnet, topt, tsched, batch)
        for c in states:
            states[c], metrics = steps[c](states[c], batch)
            assert float(metrics["grad_norm"]) > 1.0  # clipping is active
    assert_close(states["torch"].params, tnet, TOL)
    assert 1e-10 < assert_close(states["optax"].params, tnet, 1e-6)


def test_unnamed_param_groups_need_order() -> None:
    # Groups built from net.parameters() in another order record no names: shapes catch the
    # default order here, and the error points at order= (old code: the shapes only), with
    # which (params keys in torch's order) the run resumes.
    data = batches(N_TORCH + M_RESUMED, seed=3)
    ckpt = torch_run(data[:N_TORCH], named=False)
    assert "param_names" not in ckpt["optimizer"]["param_groups"][0]
    tnet, topt, tsched = torch_resume(ckpt, named=False)
    _, params, loss_fn = functional(ckpt)
    tx = make_tx("partition")
    for source in (ckpt["optimizer"], topt):  # the file's state dict, or the optimizer
        with pytest.raises(ValueError, match=r"has shape .* insertion order.* pass order="):
            ft.opt_state_from_torch(tx, params, source)
    order = [n for group in param_groups(tnet) for n, _ in group["params"]]
    state = resumed_state(tx, params, ckpt, order=order)
    step = ft.make_train_step(loss_fn, tx, micro_batches=ACCUMULATE)
    for batch in data[N_TORCH:]:
        torch_step(tnet, topt, tsched, batch)
        state, _ = step(state, batch)
    assert_close(state.params, tnet, TOL)
    with pytest.raises(ValueError, match=r"has shape .* insertion order.* pass order="):
        ft.opt_state_to_torch(tx, state.opt_state, state.params, topt)
    back = ft.opt_state_to_torch(tx, state.opt_state, state.params, topt, order=order)
    adam = state.opt_state[1].inner_states["decay"].inner_state[0]  # torch parameter 0: wte
    assert torch.equal(back["state"][0]["exp_avg"], adam.mu["wte.weight"])


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_per_sample_grad_norms_of_resumed_model(method: str) -> None:
    data = batches(N_TORCH + 2, seed=4)
    ckpt = torch_run(data[:N_TORCH])
    _, params, loss_fn = functional(ckpt)
    tx = make_tx("partition")
    state = resumed_state(tx, params, ckpt)
    state, _ = ft.make_train_step(loss_fn, tx, micro_batches=ACCUMULATE)(state, data[N_TORCH])
    batch = data[N_TORCH + 1]
    norms = ft.per_sample_grad_norms(loss_fn, state.params, batch, method=method)

    # The naive reference: the module itself, one example at a time, checkpointing inside.
    net = TinyGPT()
    net.load_state_dict(state.params, strict=False)
    expected, leaves = [], {n: [] for n, _ in net.named_parameters()}
    for i in range(BATCH):
        net.zero_grad()
        lm_loss(net(batch["x"][i : i + 1]), batch["y"][i : i + 1]).backward()
        grads = {n: p.grad for n, p in net.named_parameters()}
        expected.append(torch.stack([g.norm() for g in grads.values()]).norm())
        for n, g in grads.items():
            leaves[n].append(g.norm())
    torch.testing.assert_close(norms.global_norm, torch.stack(expected), rtol=1e-12, atol=0)
    for n, values in leaves.items():
        torch.testing.assert_close(norms.leaf_norms[n], torch.stack(values), rtol=1e-12, atol=0)
    assert norms.global_norm.std() > 0  # examples differ: a shared gradient would not pass


@settings(max_examples=25, deadline=None)
@given(st.integers(1, TOTAL))
def test_handed_back_scheduler_is_at_the_schedule(at: int) -> None:
    # The docs' hand-back recipe puts a fresh LambdaLR at step `at`; its rate for the next
    # opt.step() is functrain's schedule at that count (HF's warmup-cosine in Python floats).
    net = TinyGPT()
    opt = torch.optim.AdamW(param_groups(net), lr=LR)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine, last_epoch=at - 1)
    schedule = ft.warmup_cosine_decay_schedule(0.0, LR, WARMUP, TOTAL)
    expected = float(schedule(torch.tensor(at, dtype=torch.int32)))
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(expected, rel=1e-14, abs=1e-18)
    assert sched.last_epoch == at
