"""ADOPT and ACProp against their rules written per element in float64, plus the shared checks
(purity, bfloat16, masks, compile, a train step) and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from _alias_contract import (
    check_bfloat16,
    check_compiles,
    check_masked,
    check_pure,
    check_train_step,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft

F64 = torch.float64


def _grads(n: int) -> list[torch.Tensor]:
    """Varied gradients: zeros, sign flips, a large step."""
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(5, generator=gen, dtype=F64) for _ in range(n)]
    out[2] = torch.zeros(5, dtype=F64)
    out[3] = -out[1]
    out[5] = 50.0 * out[5]
    out[6][1] = 0.0
    return out


def _adopt_reference(grads, lr, b1, b2, eps, nesterov, clip):
    n = grads[0].numel()
    mu, nu, out = [0.0] * n, [0.0] * n, []
    for k, g in enumerate(grads):
        d1, d2 = (b1, b2) if k > 0 else (1.0, 0.0)
        u = []
        for i, gi in enumerate(g.tolist()):
            x = gi / max(math.sqrt(nu[i]), eps)
            if clip:
                c = k**0.25
                x = min(max(x, -c), c)
            nu[i] = d2 * nu[i] + (1 - d2) * gi * gi
            mu[i] = d1 * mu[i] + (1 - d1) * x
            u.append(-lr * (d1 * mu[i] + (1 - d1) * x if nesterov else mu[i]))
        out.append(u)
    return out


def _acprop_reference(grads, lr, b1, b2, eps, eps_root, wd, p0):
    n = grads[0].numel()
    mu, nu, p, out = [0.0] * n, [0.0] * n, list(p0), []
    for k, g in enumerate(grads):
        u = []
        for i, gi in enumerate(g.tolist()):
            v_hat = 1.0 if k == 0 else nu[i] / (1 - b2**k)
            u.append(-lr * (gi / (math.sqrt(v_hat) + eps) + wd * p[i]))
            nu[i] = b2 * nu[i] + (1 - b2) * (gi - mu[i]) ** 2 + eps_root
            mu[i] = b1 * mu[i] + (1 - b1) * gi
        p = [a + b for a, b in zip(p, u)]
        out.append(u)
    return out


def _run(tx, grads, p0):
    params, state, outs = [p0], tx.init([p0]), []
    for g in grads:
        u, state = tx.update([g], state, params)
        params = ft.apply_updates(params, u)
        outs.append(u[0].tolist())
    return outs


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"b1": 0.5, "b2": 0.9, "eps": 1e-3, "nesterov": True},
        {"b1": 0.8, "b2": 0.5, "use_clipping": False},
        {"nesterov": True, "use_clipping": False},
    ],
)
def test_adopt_matches_rule(kw: dict) -> None:
    full = {"b1": 0.9, "b2": 0.9999, "eps": 1e-6, "nesterov": False, "use_clipping": True}
    full.update(kw)
    grads = _grads(12)
    got = _run(ft.adopt(0.01, **kw), grads, torch.linspace(-1, 1, 5, dtype=F64))
    want = _adopt_reference(
        grads, 0.01, full["b1"], full["b2"], full["eps"], full["nesterov"], full["use_clipping"]
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"b1": 0.5, "b2": 0.9, "eps": 1e-3, "eps_root": 1e-4, "weight_decay": 0.1},
    ],
)
def test_acprop_matches_rule(kw: dict) -> None:
    full = {"b1": 0.9, "b2": 0.999, "eps": 1e-16, "eps_root": 1e-16, "weight_decay": 0.0}
    full.update(kw)
    grads, p0 = _grads(12), torch.linspace(-1, 1, 5, dtype=F64)
    got = _run(ft.acprop(0.01, **kw), grads, p0)
    want = _acprop_reference(grads, 0.01, *full.values(), p0.tolist())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_adopt_clip_value_fn_and_first_step_zero() -> None:
    tx = ft.scale_by_adopt(b1=0.0, clip_value_fn=lambda c: 0.5)
    state = tx.init([torch.zeros(2, dtype=F64)])
    u, state = tx.update([torch.tensor([3.0, -1.0], dtype=F64)], state)
    assert torch.equal(u[0], torch.zeros(2, dtype=F64))  # only nu is filled
    u, state = tx.update([torch.tensor([3.0, -0.25], dtype=F64)], state)
    torch.testing.assert_close(u[0], torch.tensor([0.5, -0.25], dtype=F64), rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(st.floats(1e-3, 1e3))
def test_adopt_and_acprop_scale_invariant(c: float) -> None:
    """Scaling every gradient by c leaves the directions unchanged (eps made negligible)."""
    grads = [g + 0.1 for g in _grads(8)]  # no exact zeros: eps would matter there
    for make in (
        lambda: ft.scale_by_adopt(eps=1e-30, use_clipping=False),
        lambda: ft.scale_by_acprop(eps=0.0, eps_root=0.0),
    ):
        a = _run(make(), grads[1:], grads[0])
        b = _run(make(), [c * g for g in grads[1:]], grads[0])
        # From the second step on (ACProp's first divides by 1, ADOPT's is zero).
        for x, y in zip(a[1:], b[1:]):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "factory",
    [lambda: ft.adopt(1e-2), lambda: ft.adopt(1e-2, nesterov=True), lambda: ft.acprop(1e-2)],
)
def test_shared_properties(factory) -> None:
    check_pure(factory())
    check_bfloat16(factory())
    check_masked(factory())
    check_train_step(factory())


def test_compiles_once_with_schedules() -> None:
    sched = ft.linear_schedule(0.1, 0.01, 6)
    check_compiles(ft.adopt(sched))
    check_compiles(ft.acprop(sched, weight_decay=sched))


def test_complex_leaves() -> None:
    g = [torch.tensor([1.0 + 2.0j, -1.0j], dtype=torch.complex128)]
    with pytest.raises(TypeError, match=r"updates\[0\].*complex128"):
        ft.scale_by_adopt().update(g, ft.scale_by_adopt().init(g))
    # Without clipping, and for ACProp, a complex leaf is treated through |g|² as in optax.
    for tx in (ft.scale_by_adopt(use_clipping=False), ft.scale_by_acprop()):
        state = tx.init(g)
        for _ in range(3):
            u, state = tx.update(g, state)
        assert u[0].dtype == torch.complex128 and torch.isfinite(u[0]).all()
    u, _ = ft.scale_by_acprop().update([g[0] * 2], tx.init(g))
    torch.testing.assert_close(u[0], 2 * g[0] / (1 + 1e-16))


def test_empty_tree_and_bad_arguments() -> None:
    for tx in (ft.scale_by_adopt(), ft.scale_by_acprop()):
        u, state = tx.update({}, tx.init({}))
        assert u == {} and int(state.count) == 1
    with pytest.raises(ValueError, match="b1"):
        ft.adopt(0.1, b1=1.5)
    with pytest.raises(ValueError, match="eps"):
        ft.adopt(0.1, eps=-1.0)
    with pytest.raises(ValueError, match="mu_dtype"):
        ft.adopt(0.1, mu_dtype=torch.int32)
    with pytest.raises(TypeError, match="clip_value_fn"):
        ft.adopt(0.1, clip_value_fn=2.0)
    with pytest.raises(ValueError, match="b2"):
        ft.acprop(0.1, b2=1.0)
    with pytest.raises(ValueError, match="eps_root"):
        ft.acprop(0.1, eps_root=-1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        ft.acprop(float("nan"))


def test_inject_hyperparams() -> None:
    # clip_value_fn is callable, so it is static (else taken for a schedule, as in optax).
    adopt = ft.inject_hyperparams(ft.adopt, static_args="clip_value_fn")
    for alias in (adopt, ft.inject_hyperparams(ft.acprop)):
        tx = alias(learning_rate=0.1)
        params = [torch.ones(2, dtype=F64)]
        state = tx.init(params)
        for _ in range(3):
            u, state = tx.update([torch.ones(2, dtype=F64)], state, params)
        state.hyperparams["learning_rate"].fill_(0.0)
        u, state = tx.update([torch.ones(2, dtype=F64)], state, params)
        assert torch.equal(u[0], torch.zeros(2, dtype=F64))
