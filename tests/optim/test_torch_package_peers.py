"""functrain's optimizers against the PyPI packages PyTorch users know them from, in float64.

Each package optimizer and its functrain counterpart, under the argument mapping the
docstrings give, run 25 steps on the same quadratic with per-step noise (the gradient depends
on the current parameters, so the two trajectories feed back). Where the mapping is exact they
agree to ``rtol=1e-10``; where a default differs by design, the test shows the setting that
closes the gap (a schedule, a chain) or the exact size of the difference. Each test skips when
its package is not installed (``pip install prodigyopt dadaptation madgrad torch-optimizer``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft

F64 = torch.float64
STEPS = 25
SHAPES = ((5, 3), (4,))


def _problem(seed: int) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor], int], Any]]:
    """Initial float64 params and ``grad(params, t)`` of a noisy diagonal quadratic."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
    curv = [torch.rand(s, generator=gen, dtype=F64) + 0.5 for s in SHAPES]
    centre = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
    noise = [[0.3 * torch.randn(s, generator=gen, dtype=F64) for s in SHAPES] for _ in range(STEPS)]

    def grad(p: list[torch.Tensor], t: int) -> list[torch.Tensor]:
        return [h * (x - c) + e for x, h, c, e in zip(p, curv, centre, noise[t])]

    return params, grad


def _torch_run(cls: type, seed: int = 0, steps: int = STEPS, **kwargs: Any) -> list[Any]:
    """The package optimizer's trajectory, the gradients fed through ``p.grad``."""
    params, grad = _problem(seed)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = cls(ps, **kwargs)
    out = []
    for t in range(steps):
        # A fresh tensor each step: the packages' coupled weight decay adds into p.grad.
        for p, g in zip(ps, grad([p.detach() for p in ps], t)):
            p.grad = g.clone()
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def _ft_run(tx: ft.GradientTransformation, seed: int = 0, steps: int = STEPS) -> list[Any]:
    params, grad = _problem(seed)
    state = tx.init(params)
    out = []
    for t in range(steps):
        updates, state = tx.update(grad(params, t), state, params)
        params = ft.apply_updates(params, updates)
        out.append(params)
    return out


def _agree(theirs: list[Any], ours: list[Any]) -> None:
    ft.testing.assert_trees_all_close(ours, theirs, rtol=1e-10)


def _max_rel(theirs: list[Any], ours: list[Any]) -> float:
    return max(
        ((a - b).abs() / b.abs()).max().item() for x, y in zip(ours, theirs) for a, b in zip(x, y)
    )


def _undo_bias_correction(lr: float, b1: float, b2: float) -> Callable[[torch.Tensor], Any]:
    """A schedule cancelling optax's ``√(1 − b2ᵗ) / (1 − b1ᵗ)`` (``t = count + 1``), in float64."""

    def schedule(count: torch.Tensor) -> torch.Tensor:
        t = count.to(F64) + 1
        return lr * (1 - b1**t) / torch.sqrt(1 - b2**t)

    return schedule


# ---- prodigyopt.Prodigy ----

PRODIGY_CASES = [
    ({}, {}),
    (
        {"lr": 0.5, "betas": (0.8, 0.99), "beta3": 0.95, "eps": 1e-6, "d0": 1e-3, "d_coef": 2.0},
        {
            "learning_rate": 0.5,
            "betas": (0.8, 0.99),
            "beta3": 0.95,
            "eps": 1e-6,
            "estim_lr0": 1e-3,
            "estim_lr_coef": 2.0,
        },
    ),
    (
        {"weight_decay": 0.1, "safeguard_warmup": True},
        {"weight_decay": 0.1, "safeguard_warmup": True},
    ),
]


@pytest.mark.parametrize(("theirs", "ours"), PRODIGY_CASES)
def test_prodigy_matches_prodigyopt_with_bias_correction(theirs: dict, ours: dict) -> None:
    prodigyopt = pytest.importorskip("prodigyopt")
    ref = _torch_run(prodigyopt.Prodigy, use_bias_correction=True, **theirs)
    _agree(ref, _ft_run(ft.prodigy(**ours)))


def test_prodigyopt_default_is_prodigy_with_bias_correction_undone() -> None:
    # prodigyopt's default use_bias_correction=False leaves √(1 − b2ᵗ)/(1 − b1ᵗ) out of dlr;
    # optax always applies it. A schedule dividing it out gives the package's default.
    prodigyopt = pytest.importorskip("prodigyopt")
    ref = _torch_run(prodigyopt.Prodigy, lr=1.0)
    _agree(ref, _ft_run(ft.prodigy(_undo_bias_correction(1.0, 0.9, 0.999))))
    assert _max_rel(ref, _ft_run(ft.prodigy())) > 1e-2


def test_prodigyopt_coupled_decay_is_a_chain() -> None:
    prodigyopt = pytest.importorskip("prodigyopt")
    ref = _torch_run(prodigyopt.Prodigy, use_bias_correction=True, weight_decay=0.1, decouple=False)
    _agree(ref, _ft_run(ft.chain(ft.add_decayed_weights(0.1), ft.prodigy())))


def test_prodigyopt_without_momentum_steps_with_the_new_d() -> None:
    # With betas[0] = 0 prodigyopt steps with −dlr · d_new · g / denom, where optax's
    # m = (1 − 0) · d_old · g gives −dlr · d_old · g / denom: a step on which d grows differs
    # by d_new / d_old (the first steps, where d cannot grow yet, and steps where it stays agree).
    prodigyopt = pytest.importorskip("prodigyopt")
    params, grad = _problem(0)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = prodigyopt.Prodigy(ps, betas=(0.0, 0.999), use_bias_correction=True)
    tx = ft.prodigy(betas=(0.0, 0.999))
    state = tx.init(params)
    growth = 1.0
    for t in range(5):
        d_old = state.estim_lr.item()
        for p, g in zip(ps, grad(params, t)):
            p.grad = g
        opt.step()
        updates, state = tx.update(grad(params, t), state, params)
        d_new = opt.param_groups[0]["d"]
        assert state.estim_lr.item() == pytest.approx(d_new, rel=1e-12)
        theirs = [p.detach() - x for p, x in zip(ps, params)]
        ratio = d_new / d_old
        growth = max(growth, ratio)
        # atol: ``theirs`` is a difference of O(1) params, exact to about 1e-16 only.
        scaled = [u * ratio for u in updates]
        ft.testing.assert_trees_all_close(scaled, theirs, rtol=1e-10, atol=1e-14)
        params = [p.detach().clone() for p in ps]
    assert growth > 1.5  # d grew on some step: the rules differed there


# ---- dadaptation.DAdaptAdam ----


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        ({}, {}),
        (
            {"lr": 0.5, "betas": (0.8, 0.99), "eps": 1e-6, "d0": 1e-3, "weight_decay": 0.1},
            {
                "learning_rate": 0.5,
                "betas": (0.8, 0.99),
                "eps": 1e-6,
                "estim_lr0": 1e-3,
                "weight_decay": 0.1,
            },
        ),
    ],
)
def test_dadapt_adamw_matches_dadaptation(theirs: dict, ours: dict) -> None:
    dadaptation = pytest.importorskip("dadaptation")
    ref = _torch_run(dadaptation.DAdaptAdam, use_bias_correction=True, decouple=True, **theirs)
    _agree(ref, _ft_run(ft.dadapt_adamw(**ours)))


def test_dadaptation_defaults_are_a_chain_with_bias_correction_undone() -> None:
    # DAdaptAdam's defaults: no bias correction and coupled (L2) weight decay.
    dadaptation = pytest.importorskip("dadaptation")
    ref = _torch_run(dadaptation.DAdaptAdam, lr=1.0, weight_decay=0.1)
    tx = ft.chain(
        ft.add_decayed_weights(0.1), ft.dadapt_adamw(_undo_bias_correction(1.0, 0.9, 0.999))
    )
    _agree(ref, _ft_run(tx))


# ---- madgrad.MADGRAD and torch_optimizer.MADGRAD ----

MADGRAD_CASES = [
    {"lr": 0.01},
    {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1, "eps": 1e-4},
    {"lr": 0.05, "momentum": 0.0},
]


@pytest.mark.parametrize("package", ["madgrad", "torch_optimizer"])
@pytest.mark.parametrize("kwargs", MADGRAD_CASES)
def test_madgrad_matches_the_packages(package: str, kwargs: dict) -> None:
    module = pytest.importorskip(package)
    ref = _torch_run(module.MADGRAD, **kwargs)
    ours = dict(kwargs)
    _agree(ref, _ft_run(ft.madgrad(ours.pop("lr"), **ours)))


def test_madgrad_decoupled_decay_is_a_negative_decayed_weights() -> None:
    # madgrad's decouple_decay=True subtracts (lr + eps) · wd · p after the step.
    madgrad = pytest.importorskip("madgrad")
    lr, wd = 0.05, 0.1
    ref = _torch_run(madgrad.MADGRAD, lr=lr, weight_decay=wd, decouple_decay=True)
    tx = ft.chain(ft.scale_by_madgrad(lr), ft.add_decayed_weights(-(lr + 1e-6) * wd))
    _agree(ref, _ft_run(tx))


# ---- torch_optimizer's older optimizers ----

TORCH_OPTIMIZER_CASES = [
    ("Yogi", {"lr": 0.01}, lambda: ft.yogi(0.01)),
    ("AdaBelief", {"lr": 0.01, "eps": 1e-8}, lambda: ft.adabelief(0.01, eps=1e-8, eps_root=1e-8)),
    # Lamb: only without eps (the package's sits on the uncorrected moments), without weight
    # decay (optax's is added to bias-corrected moments) and with ‖p‖ ≤ 10 (its clamp).
    ("Lamb", {"lr": 0.01, "eps": 0.0}, lambda: ft.lamb(0.01, eps=0.0)),
    ("NovoGrad", {"lr": 0.01, "betas": (0.9, 0.25), "eps": 1e-6}, lambda: ft.novograd(0.01)),
    (
        "NovoGrad",
        {"lr": 0.01, "betas": (0.9, 0.25), "eps": 1e-6, "weight_decay": 0.1},
        lambda: ft.novograd(0.01, weight_decay=0.1),
    ),
]


@pytest.mark.parametrize(("name", "theirs", "ours"), TORCH_OPTIMIZER_CASES)
def test_torch_optimizer_peers(name: str, theirs: dict, ours: Callable[[], Any]) -> None:
    topt = pytest.importorskip("torch_optimizer")
    # NovoGrad's second moment is torch.zeros([]), in the default dtype: float64 throughout
    # needs float64 as the default (with float32 the two differ by about 1e-10 relative).
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        ref = _torch_run(getattr(topt, name), **theirs)
    finally:
        torch.set_default_dtype(default)
    _agree(ref, _ft_run(ours()))
