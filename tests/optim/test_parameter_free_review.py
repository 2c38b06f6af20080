"""Review regressions for the learning-rate-free optimizers with float16 parameters.

Prodigy's and D-Adaptation's moments are scaled by the distance estimate (about ``1e-6 · g``
at the start): in a float16 state ``v`` was 0 and the next step ``m / (d · eps)``, millions of
times too long. COCOB's ``L`` starts at ``eps = 1e-8``, which float16 holds as 0: a zero
gradient bet ``0 / 0 = NaN``. Expected values are the rules written per element in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

import functrain as ft

F16, F64 = torch.float16, torch.float64


def _grads(n: int, size: int) -> list[torch.Tensor]:
    """float16-representable gradients of mixed sign, one element always zero."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        g = torch.randn(size, generator=gen, dtype=F64).to(F16)
        g[0] = 0.0
        out.append(g)
    return out


def _prodigy_fixed_point(grads: list[torch.Tensor], b1: float, b2: float, eps: float, d0: float):
    """Prodigy's updates at fixed parameters (``x = x₀``): ``n`` stays 0, so ``d = d₀``."""
    n = grads[0].numel()
    m, v, out = [0.0] * n, [0.0] * n, []
    for t, gt in enumerate(grads, start=1):
        g = [float(x) for x in gt.tolist()]
        dlr = d0 * math.sqrt(1 - b2**t) / (1 - b1**t)
        for i in range(n):
            m[i] = b1 * m[i] + (1 - b1) * d0 * g[i]
            v[i] = b2 * v[i] + (1 - b2) * (d0 * g[i]) ** 2
        out.append([-dlr * m[i] / (math.sqrt(v[i]) + d0 * eps) for i in range(n)])
    return out


def _dadapt_fixed_point(grads: list[torch.Tensor], b1: float, b2: float, eps: float, d0: float):
    """D-Adaptation AdamW's updates at fixed parameters (no weight decay)."""
    n, sb2 = grads[0].numel(), math.sqrt(b2)
    m, v, s, d, num, out = [0.0] * n, [0.0] * n, [0.0] * n, d0, 0.0, []
    for t, gt in enumerate(grads, start=1):
        g = [float(x) for x in gt.tolist()]
        dlr = d * math.sqrt(1 - b2**t) / (1 - b1**t)
        acc = sum(g[i] * s[i] / (math.sqrt(v[i]) + eps) for i in range(n))
        for i in range(n):
            m[i] = b1 * m[i] + (1 - b1) * dlr * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            s[i] = sb2 * s[i] + (1 - sb2) * dlr * g[i]
        num = sb2 * num + (1 - sb2) * dlr * acc
        d = max(d, num / ((1 - sb2) * sum(abs(x) for x in s)))
        out.append([-m[i] / (math.sqrt(v[i]) + eps) for i in range(n)])
    return out


@pytest.mark.parametrize(
    ("make", "ref"),
    [(ft.prodigy, _prodigy_fixed_point), (ft.dadapt_adamw, _dadapt_fixed_point)],
)
def test_float16_params_step_like_the_float64_rule(make, ref) -> None:
    """Default hyperparameters (``d₀ = 1e-6``), float16 parameters and gradients."""
    grads = _grads(8, 6)
    tx = make()
    params = [torch.linspace(-1, 1, 6, dtype=F16)]
    state = tx.init(params)
    want = ref(grads, 0.9, 0.999, 1e-8, 1e-6)
    for g, w in zip(grads, want):
        u, state = tx.update([g], state, params)
        assert u[0].dtype == F16
        # float16 rounding: 2⁻¹¹ relative, and half the subnormal spacing 2⁻²⁴ near 1e-6.
        torch.testing.assert_close(u[0].double(), torch.tensor(w, dtype=F64), rtol=1e-3, atol=4e-8)
    assert state.exp_avg_sq[0].dtype == torch.float32  # widened where float16 cannot hold it


def _cocob_fixed_point(grads: list[torch.Tensor], alpha: float, eps: float):
    """COCOB-Backprop's updates at fixed parameters (``x = x₀``, so the reward stays 0)."""
    n = grads[0].numel()
    big, total, cum, out = [eps] * n, [0.0] * n, [0.0] * n, []
    for gt in grads:
        g = [float(x) for x in gt.tolist()]
        row = []
        for i in range(n):
            big[i] = max(big[i], abs(g[i]))
            total[i] += abs(g[i])
            cum[i] -= g[i]
            row.append(cum[i] / (big[i] * max(total[i] + big[i], alpha * big[i])) * big[i])
        out.append(row)
    return out


@pytest.mark.parametrize("dtype", [F16, torch.float32])
def test_cocob_zero_gradient_in_half_precision_is_finite(dtype: torch.dtype) -> None:
    grads = [g.to(dtype) for g in _grads(5, 4)]
    tx = ft.cocob()
    params = [torch.linspace(-1, 1, 4, dtype=dtype)]
    state = tx.init(params)
    want = _cocob_fixed_point([g.double() for g in grads], 100.0, 1e-8)
    for g, w in zip(grads, want):
        u, state = tx.update([g], state, params)
        assert u[0].dtype == dtype
        # The state keeps the leaves' dtype: float16 sums round to 11 bits at every step.
        torch.testing.assert_close(u[0].double(), torch.tensor(w, dtype=F64), rtol=2e-3, atol=0)
