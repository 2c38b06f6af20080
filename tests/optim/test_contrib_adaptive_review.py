"""Review regressions for MoMo, MoMo-Adam, ACProp, MADGRAD, ADOPT and simplified AdEMAMix:
edge cases (overflowing gradients, degenerate decays) against float64 references written
by hand from Schaipp et al.'s algorithm, plus the train-step contract (the loss handed to
MoMo as ``value=``, skipped non-finite steps)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import functrain as ft

F64 = torch.float64


def _momo_reference(
    p0: list[float], steps: list[tuple[list[float], float]], lr: float, beta: float
) -> tuple[list[float], float]:
    """MoMo with ``adapt_lower_bound=True``, ``lower_bound=0``, no weight decay, in exact
    rational arithmetic (no overflow); ``steps`` are ``(gradient, loss)`` pairs. Returns the
    params and the bound as floats."""
    q = Fraction
    p, d = [q(x) for x in p0], [q(0)] * len(p0)
    fbar = gamma = lb = q(0)
    for k, (g_, f_) in enumerate(steps):
        g, f = [q(x) for x in g_], q(f_)
        b = q(beta) if k > 0 else q(0)
        fbar = b * fbar + (1 - b) * f
        d = [b * di + (1 - b) * gi for di, gi in zip(d, g)]
        gamma = b * gamma + (1 - b) * sum(gi * pi for gi, pi in zip(g, p))
        norm = sum(di * di for di in d)
        iprod = sum(di * pi for di, pi in zip(d, p))
        cap = fbar - gamma + iprod
        if cap < lb:
            lb = max(cap / 2, q(0))
        h = max(fbar - lb - gamma + iprod, q(0))
        tau = q(0) if norm <= q(2.220446049250313e-16) else min(q(lr), h / norm)
        p = [pi - tau * di for pi, di in zip(p, d)]
        lb = max(fbar + iprod - gamma - tau * norm / 2, q(0))
    return [float(x) for x in p], float(lb)


@pytest.mark.parametrize(("dtype", "huge"), [(torch.float32, 1e20), (F64, 1e160)])
def test_momo_adaptive_bound_survives_overflowing_gradient_norm(
    dtype: torch.dtype, huge: float
) -> None:
    """‖d‖² of a huge (finite) gradient overflows to inf and τ becomes 0; the bound's
    ``0.5·τ·‖d‖²`` was 0·inf = NaN, which poisoned every later step. ``beta=0`` keeps the
    later steps comparable with the exact run (momentum would carry the huge gradient on)."""
    steps = [([huge, -huge, huge], 1.0), ([1.0, 2.0, -0.5], 2.0), ([0.5, -1.0, 0.25], 0.5)]
    tx = ft.momo(0.5, beta=0.0, adapt_lower_bound=True)
    params = [torch.zeros(3, dtype=dtype)]
    state = tx.init(params)
    for i, (g, f) in enumerate(steps):
        u, state = tx.update([torch.tensor(g, dtype=dtype)], state, params, value=f)
        params = ft.apply_updates(params, u)
        want_p, want_lb = _momo_reference([0.0, 0.0, 0.0], steps[: i + 1], lr=0.5, beta=0.0)
        assert math.isfinite(state.lb.item()), f"step {i}"
        torch.testing.assert_close(state.lb.item(), want_lb, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(params[0].tolist(), want_p, rtol=1e-6, atol=1e-6)


def test_momo_bound_after_normal_steps_unchanged() -> None:
    """The overflow guard leaves the ordinary case on the reference (float64, tight)."""
    steps = [([0.3, -1.2, 2.0], 3.0), ([1.0, 2.0, -0.5], 0.1), ([0.5, -1.0, 0.25], 1.5)]
    want_p, want_lb = _momo_reference([1.0, -1.0, 0.5], steps, lr=0.7, beta=0.8)
    tx = ft.momo(0.7, beta=0.8, adapt_lower_bound=True)
    params = [torch.tensor([1.0, -1.0, 0.5], dtype=F64)]
    state = tx.init(params)
    for g, f in steps:
        u, state = tx.update([torch.tensor(g, dtype=F64)], state, params, value=f)
        params = ft.apply_updates(params, u)
    torch.testing.assert_close(state.lb.item(), want_lb, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(params[0].tolist(), want_p, rtol=1e-12, atol=1e-14)


def test_momo_adam_refuses_b1_one() -> None:
    """b1 = 1 makes MoMo-Adam's bias correction 1 − b1ᵗ zero: every update was 0 and the
    adaptive bound NaN, silently. It is refused like Adam's."""
    with pytest.raises(ValueError, match="b1"):
        ft.momo_adam(b1=1.0)
    ft.momo(beta=1.0)  # momo has no bias correction: beta = 1 stays legal


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_momo_value_is_the_unmasked_mean_of_a_loss_sum(micro_batches: int) -> None:
    """With a LossSum and K micro-batches MoMo's ``value`` is Σ total / Σ count over the
    whole batch (not a mean of per-micro-batch means)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=gen, dtype=F64)
    y = torch.randn(12, generator=gen, dtype=F64)
    m = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1], dtype=F64)
    seen: list = []
    inner = ft.momo(0.5)

    def update(u, s, p=None, **kw):
        seen.append(kw.get("value"))
        return inner.update(u, s, p, **kw)

    tx = ft.GradientTransformation(inner.init, update)

    def loss_fn(p, b):
        return ft.LossSum((((b["x"] @ p["w"] - b["y"]) ** 2) * b["m"]).sum(), b["m"].sum())

    step = ft.make_train_step(loss_fn, tx, micro_batches=micro_batches, donate=False)
    state = ft.TrainState.create(params={"w": torch.zeros(3, dtype=F64)}, tx=tx)
    step(state, {"x": x, "y": y, "m": m})
    want = sum(float(yi) ** 2 * float(mi) for yi, mi in zip(y, m)) / float(m.sum())
    torch.testing.assert_close(float(seen[-1]), want, rtol=1e-12, atol=0.0)
