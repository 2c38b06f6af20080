"""Adam-family transforms against literal float64 transcriptions of optax's update rules."""

from __future__ import annotations

import math

import pytest
import torch

import functrain as ft
from functrain import testing

SHAPES = {"w": (3, 4), "b": (4,)}


def _grads(steps: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
        for _ in range(steps)
    ]


def _run(tx: ft.GradientTransformation, grads: list[dict]) -> list[dict]:
    params = {k: torch.zeros(s, dtype=grads[0][k].dtype) for k, s in SHAPES.items()}
    state = tx.init(params)
    out = []
    for g in grads:
        u, state = tx.update(g, state, params)
        out.append(u)
    return out


def _reference(grads: list[dict], step_fn, init) -> list[dict]:
    """Applies ``step_fn(g, state, t) -> (u, state)`` leaf by leaf, ``t`` counting from 1."""
    states = {k: init(torch.zeros(s, dtype=torch.float64)) for k, s in SHAPES.items()}
    out = []
    for t, g in enumerate(grads, start=1):
        step = {}
        for k in SHAPES:
            step[k], states[k] = step_fn(g[k], states[k], t)
        out.append(step)
    return out


def _adam_ref(b1, b2, eps, eps_root, nesterov=False):
    def step(g, s, t):
        m, v = s
        m = (1 - b1) * g + b1 * m
        v = (1 - b2) * g * g + b2 * v
        if nesterov:
            m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
        else:
            m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return m_hat / (torch.sqrt(v_hat + eps_root) + eps), (m, v)

    return step, lambda z: (z.clone(), z.clone())


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("eps_root", [0.0, 1e-3])
def test_scale_by_adam_matches_reference(nesterov: bool, eps_root: float) -> None:
    grads = _grads(12)
    tx = ft.scale_by_adam(b1=0.8, b2=0.95, eps=1e-3, eps_root=eps_root, nesterov=nesterov)
    testing.assert_trees_all_close(
        _run(tx, grads),
        _reference(grads, *_adam_ref(0.8, 0.95, 1e-3, eps_root, nesterov)),
        rtol=1e-12,
        atol=1e-14,
    )


def test_scale_by_adam_state_and_mu_dtype() -> None:
    grads = _grads(3, dtype=torch.float32)
    tx = ft.scale_by_adam(mu_dtype=torch.bfloat16)
    params = {k: torch.zeros(s) for k, s in SHAPES.items()}
    state = tx.init(params)
    for g in grads:
        u, state = tx.update(g, state)
    assert state.count.dtype == torch.int32 and int(state.count) == 3
    assert state.mu["w"].dtype == torch.bfloat16 and state.nu["w"].dtype == torch.float32
    assert u["w"].dtype == torch.float32


def test_tensor_hyperparameters_equal_numbers() -> None:
    grads = _grads(5)
    numbers = _run(ft.scale_by_adam(0.8, 0.9, 1e-4), grads)
    tensors = _run(
        ft.scale_by_adam(
            torch.tensor(0.8, dtype=torch.float64),
            torch.tensor(0.9, dtype=torch.float64),
            torch.tensor(1e-4, dtype=torch.float64),
        ),
        grads,
    )
    testing.assert_trees_all_close(tensors, numbers, rtol=1e-14)


@pytest.mark.parametrize("bc_mu,bc_nu", [(True, True), (False, False), (True, False)])
def test_scale_by_amsgrad_matches_reference(bc_mu: bool, bc_nu: bool) -> None:
    b1, b2, eps = 0.9, 0.99, 1e-6

    def step(g, s, t):
        m, v, v_max = s
        m = (1 - b1) * g + b1 * m
        v = (1 - b2) * g * g + b2 * v
        m_hat = m / (1 - b1**t) if bc_mu else m
        v_eff = v / (1 - b2**t) if bc_nu else v
        v_max = torch.maximum(v_max, v_eff)
        return m_hat / (torch.sqrt(v_max) + eps), (m, v, v_max)

    grads = [ft.tree.scale(1.0 / (i + 1), g) for i, g in enumerate(_grads(10))]
    tx = ft.scale_by_amsgrad(b1, b2, eps, bias_correction_mu=bc_mu, bias_correction_nu=bc_nu)
    testing.assert_trees_all_close(
        _run(tx, grads),
        _reference(grads, step, lambda z: (z.clone(), z.clone(), z.clone())),
        rtol=1e-12,
    )


def test_scale_by_adamax_matches_reference() -> None:
    b1, b2, eps = 0.7, 0.9, 1e-3

    def step(g, s, t):
        m, v = s
        m = (1 - b1) * g + b1 * m
        v = torch.maximum(g.abs() + eps, b2 * v)
        return (m / (1 - b1**t)) / v, (m, v)

    grads = _grads(10)
    testing.assert_trees_all_close(
        _run(ft.scale_by_adamax(b1, b2, eps), grads),
        _reference(grads, step, lambda z: (z.clone(), z.clone())),
        rtol=1e-12,
    )


def _radam_ref(b1, b2, eps, threshold):
    ro_inf = 2 / (1 - b2) - 1

    def step(g, s, t):
        m, v = s
        m = (1 - b1) * g + b1 * m
        v = (1 - b2) * g * g + b2 * v
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        ro = ro_inf - 2 * t * b2**t / (1 - b2**t)
        if ro >= threshold:
            r = math.sqrt((ro - 4) * (ro - 2) * ro_inf / ((ro_inf - 4) * (ro_inf - 2) * ro))
            return r * m_hat / (torch.sqrt(v_hat) + eps), (m, v)
        return m_hat, (m, v)

    return step, lambda z: (z.clone(), z.clone())


@pytest.mark.parametrize("threshold", [5.0, 8.0, 1e9])
def test_scale_by_radam_matches_reference(threshold: float) -> None:
    grads = _grads(20)
    tx = ft.scale_by_radam(0.9, 0.9, 1e-6, threshold=threshold)
    testing.assert_trees_all_close(
        _run(tx, grads), _reference(grads, *_radam_ref(0.9, 0.9, 1e-6, threshold)), rtol=1e-12
    )


def test_radam_rectifies_from_the_right_step() -> None:
    # b2 = 0.9: rho_t = 19 - 2 t 0.9^t / (1 - 0.9^t) first reaches 5 between t = 5 and 6.
    grads = [{k: torch.ones(s, dtype=torch.float64) for k, s in SHAPES.items()}] * 8
    out = _run(ft.scale_by_radam(b1=0.0, b2=0.9, eps=0.0), grads)
    unrectified = [bool(torch.allclose(u["b"], torch.ones(4, dtype=torch.float64))) for u in out]
    ro = [19 - 2 * t * 0.9**t / (1 - 0.9**t) for t in range(1, 9)]
    assert unrectified == [r < 5 for r in ro]


@pytest.mark.parametrize("mode", ["hard", "smooth", "refined"])
def test_scale_by_lion_matches_reference(mode: str) -> None:
    b1, b2, beta = 0.9, 0.99, 2.0

    def step(g, m, t):
        c = (1 - b1) * g + b1 * m
        u = {"hard": torch.sign(c), "smooth": torch.tanh(beta * c)}.get(mode)
        if u is None:
            u = torch.where(c.abs() < 1, c, torch.sign(c))
        return u, (1 - b2) * g + b2 * m

    grads = _grads(10)
    tx = ft.scale_by_lion(b1, b2, mode=mode, smooth_beta=beta)
    testing.assert_trees_all_close(
        _run(tx, grads), _reference(grads, step, lambda z: z.clone()), rtol=1e-12
    )


@pytest.mark.parametrize(
    "factory",
    [ft.scale_by_adam, ft.scale_by_amsgrad, ft.scale_by_adamax, ft.scale_by_radam],
    ids=lambda f: f.__name__,
)
def test_state_shape_mismatch_names_the_path(factory) -> None:
    tx = factory()
    state = tx.init({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
    with pytest.raises(ft.tree.TreeMismatchError, match=r"\['b'\].*\(5,\).*\(4,\)"):
        tx.update({"w": torch.zeros(3, 4), "b": torch.zeros(5)}, state)
    with pytest.raises(ft.tree.TreeMismatchError, match="'c'"):
        tx.update({"w": torch.zeros(3, 4), "c": torch.zeros(4)}, state)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("arg", ["b1", "b2"])
def test_invalid_decay_rates_are_rejected(arg: str, bad: float) -> None:
    for factory in (ft.scale_by_adam, ft.scale_by_amsgrad, ft.scale_by_adamax, ft.adam):
        kwargs = {arg: bad} if factory is not ft.adam else {"learning_rate": 0.1, arg: bad}
        with pytest.raises(ValueError, match=arg):
            factory(**kwargs)


def test_invalid_eps_and_lion_mode_are_rejected() -> None:
    with pytest.raises(ValueError, match="eps"):
        ft.scale_by_adam(eps=-1e-8)
    with pytest.raises(ValueError, match="mode"):
        ft.scale_by_lion(mode="soft")
    with pytest.raises(TypeError, match="b1"):
        ft.scale_by_adam(b1="0.9")


def test_empty_and_none_updates() -> None:
    tx = ft.scale_by_adam()
    state = tx.init({})
    u, state = tx.update({}, state)
    assert u == {} and int(state.count) == 1
    tx = ft.scale_by_lion()
    params = {"w": torch.ones(2), "b": None}
    u, _ = tx.update({"w": torch.ones(2), "b": None}, tx.init(params))
    assert u["b"] is None and torch.equal(u["w"], torch.ones(2))
