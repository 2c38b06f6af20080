"""Trajectory equality with ``torch.optim`` over 100 steps of a small tanh MLP.

Both sides start from the same parameters and see gradients of the same loss at their own
current parameters, so any difference in the update rule compounds over the trajectory.
float64 runs must agree to 1e-10 relative; float32 runs to float32 rounding. Step sizes are
moderate on purpose: with large steps the dynamics turn chaotic and even last-bit rounding
differences grow exponentially (about 300x per 20 steps for RMSProp at lr=1e-2).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.func import functional_call, grad

import functrain as ft
from functrain import testing

STEPS = 100
# float32 trajectories drift apart by compounded rounding (adaptive updates amplify it).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-3, atol=1e-4),
}


def _problem(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 12),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 3),
    ).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    x = torch.randn(32, 6, generator=gen, dtype=dtype)
    y = torch.randn(32, 3, generator=gen, dtype=dtype)

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return params, grad(loss)


def _run_torch(
    make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer], params, grad_fn
) -> dict[str, torch.Tensor]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    # torch.optim keeps some scalar state (NAdam's mu_product) in the default dtype.
    default = torch.get_default_dtype()
    torch.set_default_dtype(next(iter(params.values())).dtype)
    try:
        opt = make_opt(list(leaves.values()))
        for _ in range(STEPS):
            grads = grad_fn({k: v.detach() for k, v in leaves.items()})
            for k, v in leaves.items():
                v.grad = grads[k]
            opt.step()
    finally:
        torch.set_default_dtype(default)
    return {k: v.detach() for k, v in leaves.items()}


def _run_ft(tx: ft.GradientTransformation, params, grad_fn) -> dict[str, torch.Tensor]:
    state = tx.init(params)
    for _ in range(STEPS):
        updates, state = tx.update(grad_fn(params), state, params)
        params = ft.apply_updates(params, updates)
    return params


LR = 0.05
CASES = {
    "sgd": (lambda: ft.sgd(LR), lambda p: torch.optim.SGD(p, lr=LR)),
    "sgd_momentum": (
        lambda: ft.sgd(LR, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9),
    ),
    "sgd_nesterov": (
        lambda: ft.sgd(LR, momentum=0.9, nesterov=True),
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True),
    ),
    "sgd_weight_decay": (
        lambda: ft.chain(ft.add_decayed_weights(0.01), ft.sgd(LR, momentum=0.8)),
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.8, weight_decay=0.01),
    ),
    "adam": (lambda: ft.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    "adam_betas": (
        lambda: ft.adam(3e-3, b1=0.8, b2=0.99, eps=1e-6),
        lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-6),
    ),
    "adam_l2": (
        lambda: ft.chain(ft.add_decayed_weights(0.05), ft.adam(1e-2)),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.05),
    ),
    "adamw": (
        lambda: ft.adamw(1e-2, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ),
    "rmsprop": (
        lambda: ft.rmsprop(1e-2, decay=0.95, eps=1e-6, eps_in_sqrt=False),
        lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.95, eps=1e-6),
    ),
    "rmsprop_centered": (
        lambda: ft.rmsprop(1e-2, decay=0.9, eps_in_sqrt=False, centered=True),
        lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9, centered=True),
    ),
    "rmsprop_momentum": (
        lambda: ft.rmsprop(1e-3, decay=0.99, eps_in_sqrt=False, momentum=0.9),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.99, momentum=0.9),
    ),
    "rmsprop_centered_momentum": (
        lambda: ft.rmsprop(1e-3, eps_in_sqrt=False, centered=True, momentum=0.5),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9, centered=True, momentum=0.5),
    ),
    "rmsprop_l2": (
        lambda: ft.chain(
            ft.add_decayed_weights(0.05),
            ft.rmsprop(2e-3, decay=0.99, eps_in_sqrt=False, momentum=0.5),
        ),
        lambda p: torch.optim.RMSprop(p, lr=2e-3, alpha=0.99, momentum=0.5, weight_decay=0.05),
    ),
    "adagrad": (
        lambda: ft.adagrad(0.05, initial_accumulator_value=0.1, eps=0.0),
        lambda p: torch.optim.Adagrad(p, lr=0.05, initial_accumulator_value=0.1, eps=0.0),
    ),
    # A huge momentum_decay makes torch's momentum warm-up 0.96**(t * decay) vanish, leaving
    # the constant mu_t = b1 of optax's NAdam.
    "nadam": (
        lambda: ft.nadam(1e-2),
        lambda p: torch.optim.NAdam(p, lr=1e-2, momentum_decay=1e9),
    ),
    "nadamw": (
        lambda: ft.nadamw(1e-2, weight_decay=0.1),
        lambda p: torch.optim.NAdam(
            p, lr=1e-2, momentum_decay=1e9, weight_decay=0.1, decoupled_weight_decay=True
        ),
    ),
    # eps=0: torch adds eps to sqrt(nu) before the bias correction, optax after it.
    "radam": (
        lambda: ft.radam(1e-2, eps=0.0),
        lambda p: torch.optim.RAdam(p, lr=1e-2, eps=0.0),
    ),
    "radam_b2": (
        lambda: ft.radam(1e-2, b2=0.9, eps=0.0),
        lambda p: torch.optim.RAdam(p, lr=1e-2, betas=(0.9, 0.9), eps=0.0),
    ),
    "adamax": (lambda: ft.adamax(2e-2), lambda p: torch.optim.Adamax(p, lr=2e-2)),
    "adamax_betas": (
        lambda: ft.adamax(1e-2, b1=0.8, b2=0.95, eps=1e-2),
        lambda p: torch.optim.Adamax(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-2),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_matches_torch(name: str, dtype: torch.dtype) -> None:
    make_ft, make_torch = CASES[name]
    params, grad_fn = _problem(dtype)
    expected = _run_torch(make_torch, params, grad_fn)
    got = _run_ft(make_ft(), params, grad_fn)
    # The run must have moved the parameters, or equality would be vacuous.
    assert float(ft.tree.norm(ft.tree.sub(expected, params))) > 1e-2
    testing.assert_trees_all_close(got, expected, **TOLERANCES[dtype])


def test_tensor_learning_rate_matches_torch() -> None:
    params, grad_fn = _problem(torch.float64)
    lr = torch.tensor(1e-2, dtype=torch.float64)
    expected = _run_torch(lambda p: torch.optim.Adam(p, lr=1e-2), params, grad_fn)
    got = _run_ft(ft.adam(lr), params, grad_fn)
    testing.assert_trees_all_close(got, expected, **TOLERANCES[torch.float64])


def test_schedule_matches_torch_lambda_lr() -> None:
    params, grad_fn = _problem(torch.float64)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(list(leaves.values()), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (1.0 + 0.1 * n))
    for _ in range(STEPS):
        grads = grad_fn({k: v.detach() for k, v in leaves.items()})
        for k, v in leaves.items():
            v.grad = grads[k]
        opt.step()
        sched.step()
    expected = {k: v.detach() for k, v in leaves.items()}
    # The count is an int32 tensor: evaluate the schedule in float64 like torch's Python floats.
    schedule = lambda n: 0.05 / (1.0 + 0.1 * n.to(torch.float64))  # noqa: E731
    got = _run_ft(ft.sgd(schedule, momentum=0.9), params, grad_fn)
    testing.assert_trees_all_close(got, expected, **TOLERANCES[torch.float64])
