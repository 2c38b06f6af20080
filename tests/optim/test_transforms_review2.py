"""Second review of the non-fused transforms and aliases against optax's formulas.

Every reference below is optax's update rule written out by hand in float64 (per leaf, with
the step count starting at 1 on the first update), run for several steps on pytrees of mixed
shapes (0-d to 4-D) and compared with functrain's trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft

SHAPES = {"s": (), "v": (5,), "m": (3, 4), "k": (2, 3, 2, 2)}
STEPS = 6
F64 = torch.float64


def _tree(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {k: scale * torch.randn(s, generator=gen, dtype=F64) for k, s in SHAPES.items()}


def _data(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    params = _tree(gen)
    return params, [_tree(gen, 0.5 + i) for i in range(STEPS)]


def _run(
    tx: ft.GradientTransformation, params: dict[str, torch.Tensor], grads: list[Any]
) -> list[dict[str, torch.Tensor]]:
    """functrain's updates over ``grads``, with params moving by the updates; checks purity."""
    state = tx.init(params)
    out = []
    for g in grads:
        g_copy = {k: v.clone() for k, v in g.items()}
        p_copy = {k: v.clone() for k, v in params.items()}
        u, state = tx.update(g, state, params)
        for k in g:  # inputs never mutated
            assert torch.equal(g[k], g_copy[k]) and torch.equal(params[k], p_copy[k])
        assert all(u[k].dtype == F64 and u[k].shape == g[k].shape for k in g)
        out.append(u)
        params = ft.apply_updates(params, u)
    return out


def _ref_run(
    step: Callable[[int, dict, dict, dict], dict],
    params: dict[str, torch.Tensor],
    grads: list[Any],
) -> list[dict[str, torch.Tensor]]:
    """Reference trajectory: ``step(t, g, p, state) -> updates`` with ``t`` from 1."""
    state: dict = {}
    out = []
    for t, g in enumerate(grads, start=1):
        u = step(t, g, params, state)
        out.append(u)
        params = {k: params[k] + u[k] for k in params}
    return out


def _close(got: list[dict], want: list[dict], rtol: float = 1e-12, atol: float = 1e-14) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=f"step {i}, {k}")


def _moment(state: dict, name: str, k: str, value: torch.Tensor, decay: float, init=0.0):
    prev = state.setdefault(name, {}).get(k, torch.full_like(value, init))
    state[name][k] = decay * prev + (1 - decay) * value
    return state[name][k]


def _n(n: Any) -> torch.Tensor:
    """The count as float64: an int32 count in ``0.1 * n`` would round the rate to float32."""
    return torch.as_tensor(n, dtype=F64)


def _lr(lr: Any, t: int) -> float:
    """optax evaluates a schedule at the count *before* the increment (t − 1)."""
    return float(lr(t - 1)) if callable(lr) else float(lr)


# --- RMS family -----------------------------------------------------------------------------


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("eps_in_sqrt", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_rmsprop_trajectory_with_momentum(centered, eps_in_sqrt, bias_correction) -> None:
    decay, eps, init, lr, mom = 0.8, 1e-3, 0.5, 0.05, 0.7
    params, grads = _data(1)

    def step(t, g, p, st):
        u = {}
        for k, x in g.items():
            nu = _moment(st, "nu", k, x * x, decay, init)
            mu = _moment(st, "mu", k, x, decay) if centered else torch.zeros_like(x)
            if bias_correction:
                nu, mu = nu / (1 - decay**t), mu / (1 - decay**t)
            var = nu - mu * mu
            s = x / (torch.sqrt(var + eps) if eps_in_sqrt else torch.sqrt(var) + eps)
            tr = st.setdefault("tr", {})
            tr[k] = mom * tr.get(k, torch.zeros_like(x)) - lr * s
            u[k] = mom * tr[k] - lr * s  # nesterov trace
        return u

    tx = ft.rmsprop(
        torch.tensor(lr, dtype=F64),
        decay=torch.tensor(decay, dtype=F64),
        eps=eps,
        initial_scale=torch.tensor(init, dtype=F64),
        eps_in_sqrt=eps_in_sqrt,
        centered=centered,
        momentum=mom,
        nesterov=True,
        bias_correction=bias_correction,
    )
    _close(_run(tx, params, grads), _ref_run(step, params, grads))


def test_adagrad_trajectory_with_schedule() -> None:
    params, grads = _data(2)

    def sched(n):
        return 0.1 / (1 + _n(n))

    def step(t, g, p, st):
        out = {}
        for k, x in g.items():
            ss = st.setdefault("ss", {})
            ss[k] = ss.get(k, torch.full_like(x, 0.1)) + x * x
            out[k] = -_lr(sched, t) * x / torch.sqrt(ss[k] + 1e-7)
        return out

    _close(_run(ft.adagrad(sched), params, grads), _ref_run(step, params, grads))


# --- Adam family ----------------------------------------------------------------------------


def _adam_hats(t, k, x, st, b1, b2):
    m = _moment(st, "mu", k, x, b1)
    v = _moment(st, "nu", k, x * x, b2)
    return m / (1 - b1**t), v / (1 - b2**t)


@pytest.mark.parametrize("tensor_hypers", [False, True])
def test_amsgrad_keeps_the_max_of_the_corrected_nu(tensor_hypers: bool) -> None:
    b1, b2, eps, eps_root, lr = 0.8, 0.9, 1e-6, 1e-9, 0.1
    params, grads = _data(3)
    grads = grads[::-1]  # shrinking gradients: the max matters

    def step(t, g, p, st):
        out = {}
        for k, x in g.items():
            m_hat, v_hat = _adam_hats(t, k, x, st, b1, b2)
            mx = st.setdefault("max", {})
            mx[k] = torch.maximum(mx.get(k, torch.zeros_like(x)), v_hat)
            out[k] = -lr * m_hat / (torch.sqrt(mx[k] + eps_root) + eps)
        return out

    h = (lambda x: torch.tensor(x, dtype=F64)) if tensor_hypers else (lambda x: x)
    tx = ft.amsgrad(h(lr), b1=h(b1), b2=h(b2), eps=h(eps), eps_root=h(eps_root))
    _close(_run(tx, params, grads), _ref_run(step, params, grads))


def test_adamax_trajectory() -> None:
    b1, b2, eps, lr = 0.85, 0.95, 1e-4, 0.02
    params, grads = _data(4)

    def step(t, g, p, st):
        out = {}
        for k, x in g.items():
            m = _moment(st, "mu", k, x, b1)
            nu = st.setdefault("nu", {})
            nu[k] = torch.maximum(x.abs() + eps, b2 * nu.get(k, torch.zeros_like(x)))
            out[k] = -lr * (m / (1 - b1**t)) / nu[k]
        return out

    _close(_run(ft.adamax(lr, b1, b2, eps), params, grads), _ref_run(step, params, grads))


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("b2", [0.9, 0.6])
def test_radam_trajectory_crosses_the_threshold(nesterov: bool, b2: float) -> None:
    """b2 = 0.9: ρₜ passes 5 at t = 6 (un-rectified steps first); b2 = 0.6: ρ∞ = 4 < 5."""
    b1, eps, eps_root, lr, threshold = 0.8, 1e-6, 1e-10, 0.1, 5.0
    params, grads = _data(5)
    grads = grads + _data(6)[1]
    ro_inf = 2 / (1 - b2) - 1

    def step(t, g, p, st):
        out = {}
        b2t = b2**t
        ro = ro_inf - 2 * t * b2t / (1 - b2t)
        for k, x in g.items():
            m = _moment(st, "mu", k, x, b1)
            v = _moment(st, "nu", k, x * x, b2)
            if nesterov:
                m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * x / (1 - b1**t)
            else:
                m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2t)
            if ro >= threshold:
                r = math.sqrt((ro - 4) * (ro - 2) * ro_inf / ((ro_inf - 4) * (ro_inf - 2) * ro))
                out[k] = -lr * r * m_hat / (torch.sqrt(v_hat + eps_root) + eps)
            else:
                out[k] = -lr * m_hat
        return out

    want = _ref_run(step, params, grads)
    for hyp in (lambda x: x, lambda x: torch.tensor(x, dtype=F64)):
        tx = ft.radam(
            hyp(lr),
            b1=hyp(b1),
            b2=hyp(b2),
            eps=hyp(eps),
            eps_root=hyp(eps_root),
            threshold=hyp(threshold),
            nesterov=nesterov,
        )
        _close(_run(tx, params, grads), want, rtol=1e-11)


@pytest.mark.parametrize("b1,b2", [(0.9, 0.99), (0.0, 0.5), (1.0, 1.0)])
def test_lion_trajectory_with_scheduled_decay(b1: float, b2: float) -> None:
    params, grads = _data(7)

    def lr(n):
        return 0.01 * (_n(n) + 1)

    def wd(n):
        return 0.1 / (_n(n) + 1)

    def step(t, g, p, st):
        out = {}
        for k, x in g.items():
            mu = st.setdefault("mu", {}).get(k, torch.zeros_like(x))
            c = torch.sign((1 - b1) * x + b1 * mu)
            st["mu"][k] = b2 * mu + (1 - b2) * x
            out[k] = -_lr(lr, t) * (c + _lr(wd, t) * p[k])
        return out

    _close(_run(ft.lion(lr, b1, b2, weight_decay=wd), params, grads), _ref_run(step, params, grads))


# --- LAMB, LARS -----------------------------------------------------------------------------


def _trust(u: torch.Tensor, p: torch.Tensor, coef: float = 1.0, eps: float = 0.0) -> torch.Tensor:
    pn, un = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
    if pn == 0 or un == 0:
        return u
    return u * (coef * pn / (un + eps))


def test_lamb_trajectory_with_zero_param_leaf_and_mask() -> None:
    b1, b2, eps, wd, lr = 0.9, 0.99, 1e-6, 0.05, 0.1
    params, grads = _data(8)
    params["z"] = torch.zeros(3, dtype=F64)  # ‖p‖ = 0: trust ratio 1
    for g in grads:
        g["z"] = torch.ones(3, dtype=F64)
    mask = {k: k != "v" for k in params}

    def step(t, g, p, st):
        out = {}
        for k, x in g.items():
            m_hat, v_hat = _adam_hats(t, k, x, st, b1, b2)
            a = m_hat / (torch.sqrt(v_hat) + eps) + (wd * p[k] if mask[k] else 0)
            out[k] = -lr * _trust(a, p[k])
        return out

    want = _ref_run(step, params, grads)
    _close(_run(ft.lamb(lr, b1, b2, eps, weight_decay=wd, mask=mask), params, grads), want)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_trajectory_with_masks(nesterov: bool) -> None:
    wd, coef, eps, mom, lr = 0.01, 0.02, 1e-3, 0.9, 0.5
    params, grads = _data(9)
    wd_mask = {k: k in ("m", "k") for k in params}
    tr_mask = lambda p: {k: k != "s" for k in p}  # noqa: E731

    def step(t, g, p, st):
        out = {}
        for k, x in g.items():
            a = x + wd * p[k] if wd_mask[k] else x
            if k != "s":
                a = _trust(a, p[k], coef, eps)
            tr = st.setdefault("tr", {})
            tr[k] = mom * tr.get(k, torch.zeros_like(x)) - lr * a
            out[k] = mom * tr[k] - lr * a if nesterov else tr[k]
        return out

    tx = ft.lars(lr, wd, wd_mask, coef, eps, tr_mask, mom, nesterov)
    _close(_run(tx, params, grads), _ref_run(step, params, grads))


# --- noise, sign, clipping ------------------------------------------------------------------


def test_noisy_sgd_noise_std_anneals_from_count_one() -> None:
    """Noise of zero gradients is ``−lr·σₜ·z``: its std over many elements follows σₜ²=η/tᵞ."""
    eta, gamma, lr = 0.04, 0.55, 2.0
    params = {"w": torch.zeros(200_000, dtype=F64)}
    tx = ft.noisy_sgd(lr, eta, gamma, key=3)
    state = tx.init(params)
    for t in (1, 2, 3, 10):
        while int(state[0].count) < t - 1:
            _, state = tx.update({"w": torch.zeros_like(params["w"])}, state, params)
        u, state = tx.update({"w": torch.zeros_like(params["w"])}, state, params)
        want = lr * math.sqrt(eta / t**gamma)
        assert abs(float(u["w"].std()) / want - 1) < 0.01, t


def test_sign_sgd_with_schedule_and_zeros() -> None:
    params, grads = _data(10)
    grads[0]["v"][2] = 0.0

    def lr(n):
        return 0.1 * 0.5 ** _n(n)

    def step(t, g, p, st):
        return {k: -_lr(lr, t) * torch.sign(x) for k, x in g.items()}

    _close(_run(ft.sign_sgd(lr), params, grads), _ref_run(step, params, grads))


def test_clip_by_block_rms_per_leaf() -> None:
    params, grads = _data(11)
    thr = 0.7

    def step(t, g, p, st):
        return {k: x / max(1.0, float(x.pow(2).mean().sqrt()) / thr) for k, x in g.items()}

    tx = ft.clip_by_block_rms(torch.tensor(thr, dtype=F64))
    _close(_run(tx, params, grads), _ref_run(step, params, grads))


def _agc_ref(u, p, clipping, eps, dims):
    def norms(x):
        if dims is None:
            if x.squeeze().dim() <= 1:
                return x.pow(2).sum().sqrt().expand(x.shape)
            return x.pow(2).sum(dim=tuple(range(1, x.dim())), keepdim=True).sqrt().expand(x.shape)
        return x.pow(2).sum(dim=dims, keepdim=True).sqrt().expand(x.shape)

    gn, pn = norms(u), norms(p)
    mx = clipping * torch.clamp_min(pn, eps)
    return torch.where(gn < mx, u, u * (mx / torch.clamp_min(gn, 1e-6)))


def test_adaptive_grad_clip_units_per_layout() -> None:
    params, grads = _data(12)
    params["v"][:] = 0.0  # eps floor of the parameter norm
    params["m"][1] = 0.0

    def step(t, g, p, st):
        return {k: _agc_ref(x, p[k], 0.05, 1e-3, None) for k, x in g.items()}

    _close(_run(ft.adaptive_grad_clip(0.05), params, grads), _ref_run(step, params, grads))


def test_adaptive_grad_clip_explicit_axis_is_optax_unitwise_norm() -> None:
    """With ``axis`` given, the norm is optax's ``sum(..., axis, keepdims)`` on every leaf."""
    gen = torch.Generator().manual_seed(13)
    params = {"k": torch.randn(2, 3, 4, 5, generator=gen, dtype=F64)}
    grads = [{"k": torch.randn(2, 3, 4, 5, generator=gen, dtype=F64)} for _ in range(3)]

    def step(t, g, p, st):
        return {k: _agc_ref(x, p[k], 0.1, 1e-3, (0, 1, 2)) for k, x in g.items()}

    tx = ft.adaptive_grad_clip(torch.tensor(0.1, dtype=F64), axis=(0, 1, 2))
    _close(_run(tx, params, grads), _ref_run(step, params, grads))


def test_add_decayed_weights_schedule_uses_the_count_before_increment() -> None:
    params, grads = _data(14)

    def wd(n):
        return 0.1 * (_n(n) + 1)

    def step(t, g, p, st):
        return {k: x + _lr(wd, t) * p[k] for k, x in g.items()}

    _close(_run(ft.add_decayed_weights(wd), params, grads), _ref_run(step, params, grads))


# --- state dtypes and counting --------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.scale_by_radam(),
        lambda: ft.scale_by_amsgrad(),
        lambda: ft.scale_by_adamax(),
        lambda: ft.scale_by_lion(),
        lambda: ft.scale_by_rms(bias_correction=True),
        lambda: ft.scale_by_stddev(bias_correction=True),
        lambda: ft.add_noise(0.1, 0.5),
    ],
)
def test_counts_are_int32_and_start_at_one(make) -> None:
    params, grads = _data(15)
    tx = make()
    state = tx.init(params)
    assert state.count.dtype == torch.int32 and int(state.count) == 0
    _, state = tx.update(grads[0], state, params)
    assert state.count.dtype == torch.int32 and int(state.count) == 1
    for f in state._fields:
        leaves = getattr(state, f)
        if isinstance(leaves, dict):
            assert all(x.dtype == F64 for x in leaves.values()), f


# --- invalid hyperparameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.scale_by_rms(decay=1.0, bias_correction=True),
        lambda: ft.scale_by_stddev(decay=1, bias_correction=True),
        lambda: ft.rmsprop(0.1, decay=1.0, bias_correction=True),
        lambda: ft.rmsprop(0.1, decay=1.0, centered=True, bias_correction=True),
    ],
)
def test_unit_decay_with_bias_correction_is_refused(make) -> None:
    """Old code: accepted, and every update was ``nu / (1 − 1ᵗ) = nu / 0`` (NaN or inf)."""
    with pytest.raises(ValueError, match="bias_correction"):
        make()


def test_unit_decay_without_bias_correction_keeps_the_initial_scale() -> None:
    """decay = 1 stays legal without bias correction: nu never moves from initial_scale."""
    tx = ft.rmsprop(0.5, decay=1.0, eps=0.0, initial_scale=4.0)
    params, grads = _data(16)
    want = _ref_run(lambda t, g, p, st: {k: -0.5 * x / 2.0 for k, x in g.items()}, params, grads)
    _close(_run(tx, params, grads), want)
