"""Whole torch.optim recipes against their functrain equivalents (docs/migration/from-torch-optim.md).

Each test runs a realistic recipe on a small module both ways for 10–20 steps in float64,
feeding the same gradients to both sides, and compares the parameters after every step. The
references are the real ``torch.optim`` optimizers and ``lr_scheduler`` objects; nothing
expected comes from functrain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft

F64 = torch.float64
STEPS = 15
Params = dict[str, torch.Tensor]


class _Net(torch.nn.Module):
    """Embedding, a linear layer, LayerNorm and a head: the usual param-group cases."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.fc = torch.nn.Linear(4, 6)
        self.ln = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 3)


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net().to(F64)


def _grads(net: torch.nn.Module, n: int = STEPS, scale: float = 1.0) -> list[Params]:
    """A fixed sequence of gradient dicts shaped like the module's parameters."""
    g = torch.Generator().manual_seed(1)
    return [
        {k: scale * torch.randn(p.shape, generator=g, dtype=F64) for k, p in net.named_parameters()}
        for _ in range(n)
    ]


def _torch_run(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    grads: list[Params],
    sched: Any = None,
    before_step: Callable[[int], None] | None = None,
) -> list[Params]:
    """Parameters after each torch step; the scheduler steps after the optimizer, as usual."""
    named = dict(net.named_parameters())
    out = []
    for i, g in enumerate(grads):
        opt.zero_grad()
        for k, p in named.items():
            if p.requires_grad:
                p.grad = g[k].clone()
        if before_step is not None:
            before_step(i)
        opt.step()
        if sched is not None:
            sched.step()
        out.append({k: p.detach().clone() for k, p in named.items()})
    return out


def _ft_run(
    tx: ft.GradientTransformation,
    net: torch.nn.Module,
    grads: list[Params],
    edit_state: Callable[[int, Any], Any] | None = None,
) -> list[Params]:
    """Parameters after each functrain update fed the same gradients."""
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    state = tx.init(params)
    out = []
    for i, g in enumerate(grads):
        if edit_state is not None:
            state = edit_state(i, state)
        updates, state = tx.update({k: v.clone() for k, v in g.items()}, state, params)
        params = ft.apply_updates(params, updates)
        out.append({k: v.clone() for k, v in params.items()})
    return out


def _assert_same(ours: list[Params], ref: list[Params], rtol: float = 1e-12) -> None:
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-14, msg=f"step {i}, {k}")


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or name.startswith("ln.")


def _labels(net: torch.nn.Module) -> dict[str, str]:
    return {
        k: "emb" if k.startswith("emb.") else ("no_decay" if _no_decay(k) else "decay")
        for k, _ in net.named_parameters()
    }


# --- parameter groups -------------------------------------------------------------------


def test_three_param_groups_adamw_equal_partition() -> None:
    """AdamW with groups (decay, no decay on biases/LayerNorm, low-lr embedding) == partition."""
    net, labels = _net(), _labels(_net())
    grads = _grads(net)
    groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "no_decay": [], "emb": []}
    for k, p in net.named_parameters():
        groups[labels[k]].append(p)
    opt = torch.optim.AdamW(
        [
            {"params": groups["decay"], "weight_decay": 0.1},
            {"params": groups["no_decay"], "weight_decay": 0.0},
            {"params": groups["emb"], "lr": 1e-3, "weight_decay": 0.1},
        ],
        lr=1e-2,
    )
    ref = _torch_run(net, opt, grads)
    tx = ft.partition(
        {
            "decay": ft.adamw(1e-2, weight_decay=0.1),
            "no_decay": ft.adamw(1e-2, weight_decay=0.0),
            "emb": ft.adamw(1e-3, weight_decay=0.1),
        },
        labels,
    )
    _assert_same(_ft_run(tx, _net(), grads), ref)


def test_adamw_mask_equals_two_groups() -> None:
    """The same recipe without the embedding group: ``adamw(..., mask=...)``."""
    net = _net()
    grads = _grads(net)
    named = list(net.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for k, p in named if not _no_decay(k)]},
            {"params": [p for k, p in named if _no_decay(k)], "weight_decay": 0.0},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )
    ref = _torch_run(net, opt, grads)
    mask = {k: not _no_decay(k) for k, _ in named}
    _assert_same(_ft_run(ft.adamw(1e-2, weight_decay=0.1, mask=mask), _net(), grads), ref)


# --- schedulers -------------------------------------------------------------------------

_SCH = torch.optim.lr_scheduler


@pytest.fixture
def x64() -> Any:
    """Schedules give default-dtype values for a tensor count (documented): float64 here."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


def _adam_with(net: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.01)


@pytest.mark.parametrize(
    ("make_sched", "schedule"),
    [
        (
            lambda o: _SCH.SequentialLR(
                o, [_SCH.LinearLR(o, 0.1, 1.0, 4), _SCH.CosineAnnealingLR(o, 11, 0.01)], [4]
            ),
            ft.warmup_cosine_decay_schedule(0.01, 0.1, 4, 15, end_value=0.01),
        ),
        (lambda o: _SCH.StepLR(o, 4, 0.5), ft.exponential_decay(0.1, 4, 0.5, staircase=True)),
        (
            lambda o: _SCH.LambdaLR(o, lambda t: 1.0 / (1.0 + 0.3 * t)),
            lambda t: 0.1 / (1.0 + 0.3 * t),
        ),
    ],
    ids=["linear-warmup-cosine", "step", "lambda"],
)
@pytest.mark.usefixtures("x64")
def test_scheduler_after_step_equals_schedule_from_zero(
    make_sched: Callable[[torch.optim.Optimizer], Any], schedule: Callable[[Any], Any]
) -> None:
    """``opt.step(); sched.step()`` uses ``sched`` value t at step t: optax's count from 0."""
    net = _net()
    opt = _adam_with(net)
    ref = _torch_run(net, opt, _grads(net), make_sched(opt))
    tx = ft.adamw(schedule, weight_decay=0.01)
    _assert_same(_ft_run(tx, _net(), _grads(net)), ref)


def test_one_cycle_lr_also_cycles_adam_b1() -> None:
    """OneCycleLR cycles AdamW's beta1 (0.95 ↔ 0.85) by default; functrain schedules only lr."""
    for cycle_momentum in (False, True):
        net = _net()
        opt = _adam_with(net)
        sched = _SCH.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS, cycle_momentum=cycle_momentum)
        lrs: list[float] = []
        b1s: list[float] = []

        def record(i: int, opt: torch.optim.Optimizer = opt, sched: Any = sched) -> None:
            if i > 0:
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
            b1s.append(opt.param_groups[0]["betas"][0])

        ref = _torch_run(net, opt, _grads(net), None, record)
        table = torch.tensor(lrs, dtype=F64)
        # The very learning rates torch used, as a schedule of the update count.
        ours = _ft_run(ft.adamw(lambda t: table[t], weight_decay=0.01), _net(), _grads(net))
        if not cycle_momentum:
            _assert_same(ours, ref)
        else:
            assert min(b1s) < 0.86 and max(b1s) == pytest.approx(0.95)
            with pytest.raises(AssertionError):
                _assert_same(ours, ref, rtol=1e-6)


# --- clipping, freezing -----------------------------------------------------------------


def test_clip_grad_norm_then_adamw_equals_chain() -> None:
    """clip_grad_norm_ + AdamW == chain(clip_by_global_norm, adamw), up to torch's 1e-6."""
    net = _net()
    grads = _grads(net, scale=0.3)  # norms on both sides of the threshold below
    max_norm = 3.2
    norms = [math.sqrt(sum(float(v.pow(2).sum()) for v in g.values())) for g in grads]
    assert min(norms) < max_norm < max(norms)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    ref = _torch_run(
        net, opt, grads, None, lambda i: torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
    )
    tx = ft.chain(ft.clip_by_global_norm(max_norm), ft.adamw(1e-2, weight_decay=1e-2))
    # The documented difference: torch divides by norm + 1e-6, a relative 1e-6 on clipped steps.
    _assert_same(_ft_run(tx, _net(), grads), ref, rtol=1e-5)


@pytest.mark.parametrize("where", ["last", "selective"])
def test_requires_grad_false_equals_freeze_after_weight_decay(where: str) -> None:
    """A frozen submodule under AdamW(weight_decay) == freeze at the end of the chain."""
    net = _net()
    grads = _grads(net)
    net.emb.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    ref = _torch_run(net, opt, grads)
    mask = {k: k.startswith("emb.") for k, _ in net.named_parameters()}
    inner = ft.adamw(1e-2, weight_decay=1e-2)
    tx = (
        ft.chain(inner, ft.freeze(mask))
        if where == "last"
        else ft.selective_transform(inner, freeze_mask=mask)
    )
    _assert_same(_ft_run(tx, _net(), grads), ref)


def test_freeze_at_head_of_chain_still_decays_frozen_weights() -> None:
    """freeze zeroes gradients only: a weight-decay transform after it still moves the leaf."""
    net = _net()
    grads = _grads(net, n=3)
    mask = {k: k.startswith("emb.") for k, _ in net.named_parameters()}
    out = _ft_run(ft.chain(ft.freeze(mask), ft.adamw(0.1, weight_decay=0.1)), net, grads)
    w0 = net.emb.weight.detach()
    # Adam of a zero gradient is 0, so only the decoupled decay acts: p ← p (1 − lr·wd).
    torch.testing.assert_close(out[-1]["emb.weight"], w0 * (1 - 0.1 * 0.1) ** 3, rtol=1e-12, atol=0)


# --- optimizer aliases ------------------------------------------------------------------

_O = torch.optim


@pytest.mark.parametrize(
    ("make_torch", "tx"),
    [
        (
            lambda ps: _O.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
            ft.chain(ft.add_decayed_weights(1e-2), ft.sgd(0.05, 0.9, nesterov=True)),
        ),
        (
            lambda ps: _O.RMSprop(ps, lr=1e-2, alpha=0.9, eps=1e-3, centered=True, momentum=0.9),
            ft.rmsprop(1e-2, 0.9, 1e-3, eps_in_sqrt=False, centered=True, momentum=0.9),
        ),
        (
            lambda ps: _O.Adagrad(ps, lr=0.1, lr_decay=0.0, eps=0.0),
            ft.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0),
        ),
        (lambda ps: _O.Adamax(ps), ft.adamax(2e-3)),
        # NAdam's docstring: equal once 0.96^(t·momentum_decay) is 0.
        (lambda ps: _O.NAdam(ps, momentum_decay=1e9), ft.nadam(2e-3)),
        # RAdam's docstring: equal with eps=0.
        (lambda ps: _O.RAdam(ps, eps=0.0), ft.radam(1e-3, eps=0.0)),
    ],
    ids=["sgd-nesterov-wd", "rmsprop-centered-momentum", "adagrad", "adamax", "nadam", "radam"],
)
@pytest.mark.usefixtures("x64")  # torch.optim.NAdam keeps mu_product in the default dtype
def test_alias_trajectory_on_module(
    make_torch: Callable[[Any], torch.optim.Optimizer], tx: ft.GradientTransformation
) -> None:
    """The aliases the migration guide and their docstrings map torch.optim to."""
    net = _net()
    ref = _torch_run(net, make_torch(net.parameters()), _grads(net))
    _assert_same(_ft_run(tx, _net(), _grads(net)), ref)


def test_nadam_defaults_differ_by_momentum_warmup() -> None:
    """With torch's default momentum_decay=4e-3 the trajectories differ (docstring)."""
    net = _net()
    ref = _torch_run(net, _O.NAdam(net.parameters()), _grads(net))
    with pytest.raises(AssertionError):
        _assert_same(_ft_run(ft.nadam(2e-3), _net(), _grads(net)), ref, rtol=1e-6)


# --- changing the learning rate mid-run ---------------------------------------------------


def _set_lr_at(step: int, lr: float) -> Callable[[int, Any], Any]:
    def edit(i: int, state: Any) -> Any:
        if i == step:
            state.hyperparams["learning_rate"] = torch.tensor(lr, dtype=F64)
        return state

    return edit


@pytest.mark.parametrize(
    ("make_torch", "factory", "kwargs"),
    [
        (lambda ps: _O.AdamW(ps, lr=1e-2), ft.adamw, {"weight_decay": 1e-2}),
        (lambda ps: _O.SGD(ps, lr=0.1, momentum=0.9), ft.sgd, {"momentum": 0.9}),
    ],
    ids=["adamw", "sgd-momentum"],
)
def test_param_group_lr_edit_equals_inject_hyperparams(
    make_torch: Callable[[Any], torch.optim.Optimizer], factory: Any, kwargs: dict[str, Any]
) -> None:
    """``param_group["lr"] = x`` before step 7 == replacing ``hyperparams["learning_rate"]``."""
    net = _net()
    opt = make_torch(net.parameters())
    lr0 = opt.param_groups[0]["lr"]

    def edit(i: int) -> None:
        if i == 7:
            opt.param_groups[0]["lr"] = lr0 / 4

    ref = _torch_run(net, opt, _grads(net), None, edit)
    tx = ft.inject_hyperparams(factory)(learning_rate=lr0, **kwargs)
    _assert_same(_ft_run(tx, _net(), _grads(net), _set_lr_at(7, lr0 / 4)), ref)


def test_rmsprop_momentum_applies_lr_before_the_momentum() -> None:
    """After an lr change, ft.rmsprop's momentum buffer still carries the old lr (optax order)."""
    net = _net()
    opt = _O.RMSprop(net.parameters(), lr=1e-2, alpha=0.9, eps=1e-3, momentum=0.9)

    def edit(i: int) -> None:
        if i == 7:
            opt.param_groups[0]["lr"] = 1e-3

    ref = _torch_run(net, opt, _grads(net), None, edit)
    tx = ft.inject_hyperparams(ft.rmsprop)(
        learning_rate=1e-2, decay=0.9, eps=1e-3, eps_in_sqrt=False, momentum=0.9
    )
    ours = _ft_run(tx, _net(), _grads(net), _set_lr_at(7, 1e-3))
    _assert_same(ours[:7], ref[:7])
    with pytest.raises(AssertionError):
        _assert_same(ours[7:], ref[7:], rtol=1e-6)
