"""Every public transform's ``update`` is differentiable where its maths is (optax users take
``jax.grad`` through updates: learned learning rates, MAML inner loops, learned optimizers).

For each case of the public sweep (``_public_transforms.CASES``: every public transform, the
wrappers ``chain``, ``masked``, ``partition``, ``inject_hyperparams``, ``MultiSteps``,
``apply_if_finite``..., the loss-driven ones with their ``value=``/``obj_fn=``), in float64 on
the sweep's small tree: ``torch.autograd.gradcheck`` (finite differences, the reference) of the
parameters after two consecutive updates and ``apply_updates``, w.r.t. the initial parameters
and both steps' gradients. Transforms whose maths is not differentiable at the points every run
passes through are listed in ``NONSMOOTH`` with the reason, and checked for what they promise
(a finite derivative, no error). Hyperparameters and ``torch.func``: the ``_hyperparams`` file.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _public_transforms import CASES, Case, example_grads, example_params

import functrain as ft
from functrain.optim import _pure_fused

D = torch.float64
STEPS = 2

# Not differentiable where every run goes: checked for a finite derivative, not gradchecked.
NONSMOOTH = {
    "lbfgs": "the zoom line search picks its step by comparisons (a discrete choice)",
    "scale_by_zoom_linesearch": "the step is picked by comparisons (a discrete choice)",
    "scale_by_zoom_linesearch[one]": "the step is picked by comparisons (a discrete choice)",
    "mechanize": "the first step starts on clamp kinks (h = 0 = m, clamp(r, min=0) at r = 0)",
    "mechanize[sgd]": "the first step starts on clamp kinks (h = 0 = m, clamp(r, min=0) at r = 0)",
    "scale_by_stddev[bias_correction]": "the first bias-corrected variance is exactly 0 (√0)",
}

# The default hyperparameters sit on a kink: LDoG's first step lands at distance
# d·‖g‖/√(‖g‖² + eps) from x₀, within 1e-14 of the running maximum d (finite differences cross
# it). A larger eps moves the run off the tie; the maths is the same.
OVERRIDES = {
    "scale_by_distance_over_gradients": lambda: ft.scale_by_distance_over_gradients(eps=1.0),
    # optax stops the gradient through the first step's 1/‖u‖ scaling (finite differences see
    # it): test_differentiable_review.py checks that step against a hand Jacobian instead.
    "scale_by_lbfgs": lambda: ft.scale_by_lbfgs(scale_init_precond=False),
    "lbfgs[linesearch=None]": lambda: ft.lbfgs(1e-2, linesearch=None, scale_init_precond=False),
}

# Updates that are not parameter-shaped (a measure's average): differentiate the updates.
MEASURES = {"measure_with_ema"}


def _run(case: Case, xs: tuple[torch.Tensor, ...], keys: list[str]) -> tuple[torch.Tensor, ...]:
    """The parameters after ``STEPS`` updates (``xs``: params, then each step's gradients)."""
    n = len(keys)
    params = dict(zip(keys, xs[:n]))
    grads = [dict(zip(keys, xs[n * (i + 1) : n * (i + 2)])) for i in range(STEPS)]
    tx = OVERRIDES.get(case.name, case.build)()
    q: Any = case.lift_params(params) if case.lift_params else params
    state = tx.init(q)
    out: Any = q
    for g in grads:
        u, state = tx.update(g, state, q, **case.update_kwargs(q, g))
        if case.name in MEASURES:
            out = u
        else:
            q = out = ft.apply_updates(q, u)
    return tuple(x for x in ft.tree.leaves(out) if isinstance(x, torch.Tensor))


def _inputs() -> tuple[list[str], list[torch.Tensor]]:
    params = example_params(D)
    grads = example_grads(STEPS, D)
    keys = list(params)
    xs = [*params.values(), *(g[k] for g in grads for k in keys)]
    return keys, [x.clone().requires_grad_() for x in xs]


SMOOTH = [n for n in CASES if n not in NONSMOOTH]


@pytest.mark.parametrize("name", SMOOTH)
def test_two_updates_match_finite_differences(name: str) -> None:
    keys, xs = _inputs()
    case = CASES[name]
    # fast_mode: a random projection of the Jacobian against its finite difference (the full
    # Jacobian for ~170 cases would take minutes).
    assert torch.autograd.gradcheck(lambda *a: _run(case, a, keys), xs, fast_mode=True)


@pytest.mark.parametrize("name", sorted(NONSMOOTH))
def test_nonsmooth_transforms_give_a_finite_derivative(name: str) -> None:
    keys, xs = _inputs()
    out = _run(CASES[name], tuple(xs), keys)
    total = sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=D).view_as(o)).sum() for o in out)
    derivs = torch.autograd.grad(total, xs)
    assert all(torch.isfinite(d).all() for d in derivs)
    # The parameters move with themselves: at least the identity part survives.
    assert any(d.abs().sum() > 0 for d in derivs[: len(keys)])


def test_every_listed_exception_is_a_sweep_case() -> None:
    assert set(NONSMOOTH) | set(OVERRIDES) | MEASURES <= set(CASES)


@pytest.mark.parametrize("name", SMOOTH[::4])
def test_tracked_and_untracked_updates_are_bit_identical(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The out-of-place path taken under autograd gives the in-place path's numbers exactly
    (the fused AdamW kernel, which serves only the untracked path, off: it rounds otherwise)."""
    monkeypatch.setattr(_pure_fused, "ENABLED", False)
    keys, xs = _inputs()
    case = CASES[name]
    tracked = _run(case, tuple(xs), keys)
    with torch.no_grad():
        plain = _run(case, tuple(x.detach() for x in xs), keys)
    assert len(tracked) == len(plain)
    for a, b in zip(tracked, plain):
        assert torch.equal(a.detach(), b), name


def test_create_graph_gradients_through_three_adam_steps_match_a_hand_loop() -> None:
    """The optax meta-learning pattern with autograd: grads made with ``create_graph=True``."""

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((p["w"] @ p["b"]) ** 2).sum() + p["b"].sin().sum()

    def by_hand(p0: dict[str, torch.Tensor]) -> torch.Tensor:
        # Adam in plain per-tensor float64 ops, no functrain (lr 0.1, optax defaults).
        p, m, v = dict(p0), {k: 0 * x for k, x in p0.items()}, {k: 0 * x for k, x in p0.items()}
        for t in range(1, 4):
            g = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()), create_graph=True)))
            for k in p:
                m[k] = 0.9 * m[k] + 0.1 * g[k]
                v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
                step = (m[k] / (1 - 0.9**t)) / ((v[k] / (1 - 0.999**t)).sqrt() + 1e-8)
                p[k] = p[k] - 0.1 * step
        return sum((x**2).sum() for x in p.values())

    def with_ft(p0: dict[str, torch.Tensor]) -> torch.Tensor:
        tx = ft.adam(0.1)
        p, s = p0, tx.init(p0)
        for _ in range(3):
            g = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()), create_graph=True)))
            u, s = tx.update(g, s, p)
            p = ft.apply_updates(p, u)
        return sum((x**2).sum() for x in p.values())

    params = {k: v.requires_grad_() for k, v in example_params(D).items() if v.dim()}
    got = torch.autograd.grad(with_ft(params), list(params.values()))
    want = torch.autograd.grad(by_hand(params), list(params.values()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
