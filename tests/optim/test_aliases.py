"""Aliases: optax's signatures and defaults, and closed-form references for those torch lacks."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import functrain as ft
from functrain import testing

_ = inspect.Parameter.empty
# Transcribed from optax's alias.py (learning_rate first; "*" marks keyword-only arguments).
OPTAX_SIGNATURES = {
    "sgd": dict(learning_rate=_, momentum=None, nesterov=False, accumulator_dtype=None),
    "noisy_sgd": dict(learning_rate=_, eta=0.01, gamma=0.55, key=None, seed__kw=None),
    "sign_sgd": dict(learning_rate=_),
    "adam": dict(
        learning_rate=_, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, nesterov__kw=False
    ),
    "nadam": dict(
        learning_rate=_, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, nesterov__kw=True
    ),
    "adamw": dict(
        learning_rate=_,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        eps_root=0.0,
        mu_dtype=None,
        weight_decay=1e-4,
        mask=None,
        nesterov__kw=False,
    ),
    "nadamw": dict(
        learning_rate=_,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        eps_root=0.0,
        mu_dtype=None,
        weight_decay=1e-4,
        mask=None,
        nesterov__kw=True,
    ),
    "radam": dict(
        learning_rate=_,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        eps_root=0.0,
        threshold=5.0,
        nesterov__kw=False,
    ),
    "amsgrad": dict(
        learning_rate=_,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        eps_root=0.0,
        mu_dtype=None,
        bias_correction_mu=True,
        bias_correction_nu=True,
    ),
    "adamax": dict(learning_rate=_, b1=0.9, b2=0.999, eps=1e-8),
    "rmsprop": dict(
        learning_rate=_,
        decay=0.9,
        eps=1e-8,
        initial_scale=0.0,
        eps_in_sqrt=True,
        centered=False,
        momentum=None,
        nesterov=False,
        bias_correction=False,
    ),
    "adagrad": dict(learning_rate=_, initial_accumulator_value=0.1, eps=1e-7),
    "lion": dict(learning_rate=_, b1=0.9, b2=0.99, mu_dtype=None, weight_decay=1e-3, mask=None),
    "lamb": dict(
        learning_rate=_, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0, mask=None
    ),
    "lars": dict(
        learning_rate=_,
        weight_decay=0.0,
        weight_decay_mask=True,
        trust_coefficient=0.001,
        eps=0.0,
        trust_ratio_mask=True,
        momentum=0.9,
        nesterov=False,
    ),
    "adafactor": dict(
        learning_rate=None,
        min_dim_size_to_factor=128,
        decay_rate=0.8,
        decay_offset=0,
        multiply_by_parameter_scale=True,
        clipping_threshold=1.0,
        momentum=None,
        dtype_momentum=torch.float32,
        weight_decay_rate=None,
        eps=1e-30,
        factored=True,
        weight_decay_mask=None,
    ),
}


@pytest.mark.parametrize("name", sorted(OPTAX_SIGNATURES))
def test_signature_and_defaults_follow_optax(name: str) -> None:
    params = inspect.signature(getattr(ft, name)).parameters
    expected = OPTAX_SIGNATURES[name]
    got = {}
    for p in params.values():
        key = p.name + ("__kw" if p.kind is inspect.Parameter.KEYWORD_ONLY else "")
        got[key] = p.default
    assert list(got) == list(expected)
    assert got == expected


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(4, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(3, generator=gen, dtype=torch.float64),
    }
    target = {
        k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()
    }

    def grad_fn(p):  # gradient of 0.5 * sum((p - target)^3 / 3 + (p - target)^2): non-linear
        return {k: (p[k] - target[k]) ** 2 / 2 + (p[k] - target[k]) for k in p}

    return params, grad_fn


def _trajectory(tx, steps: int = 20, seed: int = 0) -> list[dict]:
    params, grad_fn = _problem(seed)
    state = tx.init(params)
    out = [params]
    for _ in range(steps):
        u, state = tx.update(grad_fn(params), state, params)
        params = ft.apply_updates(params, u)
        out.append(params)
    return out


def _reference(step_fn, init, steps: int = 20, seed: int = 0) -> list[dict]:
    """``step_fn(g, p, s, t) -> (update, s)`` per leaf; ``t`` counts from 1."""
    params, grad_fn = _problem(seed)
    states = {k: init(v) for k, v in params.items()}
    out = [params]
    for t in range(1, steps + 1):
        g = grad_fn(params)
        new = {}
        for k in params:
            u, states[k] = step_fn(g[k], params[k], states[k], t)
            new[k] = params[k] + u
        params = new
        out.append(params)
    return out


def test_sign_sgd() -> None:
    expected = _reference(lambda g, p, s, t: (-0.05 * torch.sign(g), s), lambda p: None)
    testing.assert_trees_all_close(_trajectory(ft.sign_sgd(0.05)), expected, rtol=1e-13)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion(weight_decay: float) -> None:
    lr, b1, b2 = 0.01, 0.9, 0.99

    def step(g, p, m, t):
        u = -lr * (torch.sign((1 - b1) * g + b1 * m) + weight_decay * p)
        return u, (1 - b2) * g + b2 * m

    testing.assert_trees_all_close(
        _trajectory(ft.lion(lr, weight_decay=weight_decay)),
        _reference(step, torch.zeros_like),
        rtol=1e-12,
    )


def test_lamb() -> None:
    lr, b1, b2, eps, wd = 0.05, 0.9, 0.999, 1e-6, 0.01

    def step(g, p, s, t):
        m, v = s
        m = (1 - b1) * g + b1 * m
        v = (1 - b2) * g * g + b2 * v
        a = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps) + wd * p
        ratio = p.norm() / a.norm()
        return -lr * ratio * a, (m, v)

    testing.assert_trees_all_close(
        _trajectory(ft.lamb(lr, weight_decay=wd)),
        _reference(step, lambda p: (torch.zeros_like(p), torch.zeros_like(p))),
        rtol=1e-11,
    )


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars(nesterov: bool) -> None:
    lr, wd, tc, eps, mom = 0.5, 0.01, 0.02, 1e-9, 0.9

    def step(g, p, m, t):
        a = g + wd * p
        a = tc * p.norm() / (a.norm() + eps) * a
        m = -lr * a + mom * m
        return (-lr * a + mom * m if nesterov else m), m

    tx = ft.lars(lr, weight_decay=wd, trust_coefficient=tc, eps=eps, nesterov=nesterov)
    testing.assert_trees_all_close(_trajectory(tx), _reference(step, torch.zeros_like), rtol=1e-12)


def test_amsgrad() -> None:
    lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-8

    def step(g, p, s, t):
        m, v, v_max = s
        m = (1 - b1) * g + b1 * m
        v = (1 - b2) * g * g + b2 * v
        v_max = torch.maximum(v_max, v / (1 - b2**t))
        return -lr * (m / (1 - b1**t)) / (torch.sqrt(v_max) + eps), (m, v, v_max)

    testing.assert_trees_all_close(
        _trajectory(ft.amsgrad(lr, b2=b2)),
        _reference(step, lambda p: (torch.zeros_like(p),) * 3),
        rtol=1e-12,
    )


def test_adafactor_full_chain_on_unfactored_leaves() -> None:
    lr, clip, mom, wd, eps = 0.1, 1.0, 0.5, 0.01, 1e-30

    def step(g, p, s, t):
        v, m = s
        decay = float(1.0 - torch.tensor(float(t), dtype=torch.float32) ** -0.8)
        v = decay * v + (1 - decay) * (g * g + eps)
        u = g / torch.sqrt(v)
        u = u / max(1.0, float(u.square().mean().sqrt()) / clip)
        u = lr * u * max(float(p.square().mean().sqrt()), 1e-3)
        m = (1 - mom) * u + mom * m
        return -(m + wd * p), (v, m)

    tx = ft.adafactor(lr, momentum=mom, dtype_momentum=torch.float64, weight_decay_rate=wd)
    testing.assert_trees_all_close(
        _trajectory(tx),
        _reference(step, lambda p: (torch.zeros_like(p), torch.zeros_like(p))),
        rtol=1e-12,  # the reference evaluates the decay schedule in float32 too, as optax
    )


def test_adafactor_minimal_chain() -> None:
    tx = ft.adafactor(
        learning_rate=None, multiply_by_parameter_scale=False, clipping_threshold=None
    )
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    u, _ = tx.update(
        {"w": torch.tensor([2.0, -3.0, 0.5], dtype=torch.float64)}, tx.init(params), params
    )
    testing.assert_trees_all_close(u["w"], torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64))


def test_noisy_sgd_adds_noise_before_the_learning_rate() -> None:
    lr, eta, gamma = 0.1, 0.04, 0.55
    params = {"w": torch.zeros(5000)}
    noise_tx = ft.add_noise(eta, gamma, key=11)
    noise, _ = noise_tx.update({"w": torch.zeros(5000)}, noise_tx.init(params))
    g = {"w": torch.linspace(-1, 1, 5000)}
    tx = ft.noisy_sgd(lr, eta, gamma, key=11)
    u, _ = tx.update(g, tx.init(params), params)
    testing.assert_trees_all_close(u["w"], -lr * (g["w"] + noise["w"]), rtol=1e-6, atol=1e-7)
    assert float((noise["w"]).std()) == pytest.approx(math.sqrt(eta), rel=0.05)


def test_rmsprop_and_adagrad_closed_form_first_step() -> None:
    g = {"w": torch.tensor([2.0, -1.0], dtype=torch.float64)}
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    tx = ft.rmsprop(0.1, decay=0.9, eps=1e-8)  # optax default: eps inside the root
    u, _ = tx.update(g, tx.init(params), params)
    testing.assert_trees_all_close(u["w"], -0.1 * g["w"] / torch.sqrt(0.1 * g["w"] ** 2 + 1e-8))
    tx = ft.adagrad(0.1)
    u, _ = tx.update(g, tx.init(params), params)
    testing.assert_trees_all_close(u["w"], -0.1 * g["w"] / torch.sqrt(0.1 + g["w"] ** 2 + 1e-7))


def test_weight_decay_masks() -> None:
    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    grads = ft.tree.zeros_like(params)
    mask = {"w": True, "b": False}
    for tx in (
        ft.adamw(0.1, weight_decay=0.5, mask=mask),
        ft.lion(0.1, weight_decay=0.5, mask=mask),
        ft.lamb(0.1, weight_decay=0.5, mask=mask),
    ):
        u, _ = tx.update(grads, tx.init(params), params)
        assert bool((u["w"] < 0).all()) and bool((u["b"] == 0).all())
    tx = ft.lars(0.1, weight_decay=0.5, weight_decay_mask=mask, trust_ratio_mask=mask)
    u, _ = tx.update(grads, tx.init(params), params)
    assert bool((u["w"] < 0).all()) and bool((u["b"] == 0).all())


def test_tensor_learning_rate_changes_take_effect() -> None:
    lr = torch.tensor(0.1)
    tx = ft.adamax(lr)
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    u1, state = tx.update({"w": torch.ones(2)}, state, params)
    lr.fill_(0.0)
    u2, state = tx.update({"w": torch.ones(2)}, state, params)
    assert bool((u1["w"] != 0).all()) and bool((u2["w"] == 0).all())


@pytest.mark.parametrize("name", sorted(OPTAX_SIGNATURES))
def test_invalid_learning_rates_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        getattr(ft, name)(float("nan"))
    with pytest.raises(TypeError, match="learning_rate"):
        getattr(ft, name)("0.1")


def test_invalid_hyperparameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="b1"):
        ft.lion(0.1, b1=-0.5)
    with pytest.raises(ValueError, match="decay"):
        ft.rmsprop(0.1, decay=2.0)
    with pytest.raises(ValueError, match="eta"):
        ft.noisy_sgd(0.1, eta=-1.0)
    with pytest.raises(ValueError, match="b2"):
        ft.nadamw(0.1, b2=1.0)


def test_nadam_without_nesterov_is_adam() -> None:
    params, grads = {"w": torch.tensor([0.5, -1.0])}, {"w": torch.tensor([0.3, 0.2])}
    for plain, nadam in [
        (ft.adam(0.1), ft.nadam(0.1, nesterov=False)),
        (ft.adamw(0.1), ft.nadamw(0.1, nesterov=False)),
    ]:
        a, _ = plain.update(grads, plain.init(params), params)
        b, _ = nadam.update(grads, nadam.init(params), params)
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [lambda: ft.sgd(True), lambda: ft.adamw(1e-3, weight_decay=False), lambda: ft.adam(True)],
)
def test_bool_hyperparameters_are_refused(make):
    """``True`` is an int to Python: as a learning rate it would silently mean 1."""
    with pytest.raises(TypeError, match=r"got (True|False)"):
        make()
