"""Derivatives through updates that disagreed with ``jax.grad`` through optax (found by
``tools/optax_grad_parity.py``), checked against central finite differences in float64 or a
hand computation, never against the code under test.

- The loss passed as ``value=`` (Polyak, MoMo) is differentiated: it was detached.
- ``apply_if_finite``: a skipped non-finite step gave NaN derivatives (0·NaN through the
  discarded inner update); optax's ``lax.cond`` differentiates the branch taken only.
- ``scale_by_param_block_rms`` at a zero parameter: NaN (``clamp_min`` over ``sqrt(0)``).
- ``scale_by_lbfgs``'s first step: ``‖u‖`` is a constant, as optax's ``stop_gradient``.
- ``lbfgs`` after a step that did not move and ``radam`` before rectification: NaN (the branch
  not taken divided by 0 / took the root of a negative number); optax is NaN there too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft

D = torch.float64
SHAPES = {"w": (2, 3), "b": (3,)}
H = 1e-6  # central differences: O(H²) truncation, ~1e-10 rounding on an O(1) loss


def _data(seed: int) -> tuple[dict[str, torch.Tensor], ...]:
    g = torch.Generator().manual_seed(seed)
    a, b, w, p0 = (
        {k: torch.randn(s, generator=g, dtype=D) for k, s in SHAPES.items()} for _ in range(4)
    )
    b = {k: 0.5 + v.abs() for k, v in b.items()}
    return a, b, w, p0


def _objective(a: dict, b: dict) -> tuple[Callable, Callable]:
    """A loss ``Σ sin(p)·a + ½·b·p² + 3`` (positive) and its gradient ``cos(p)·a + b·p``."""

    def loss(p: dict) -> torch.Tensor:
        return sum((torch.sin(p[k]) * a[k] + 0.5 * b[k] * p[k] ** 2).sum() for k in p) + 3.0

    def grad(p: dict) -> dict:
        return {k: torch.cos(p[k]) * a[k] + b[k] * p[k] for k in p}

    return loss, grad


def _final(
    make: Callable[[], ft.GradientTransformation],
    p0: dict,
    seed: int,
    steps: int,
    *,
    value: bool = False,
    bad_step: int | None = None,
) -> torch.Tensor:
    """``Σ w·p_N`` after ``steps`` updates from ``p0``; ``value=`` the loss when asked, and a
    NaN (and an inf) in the gradient of step ``bad_step``."""
    a, b, w, _ = _data(seed)
    loss, grad = _objective(a, b)
    tx = make()
    p, state = p0, tx.init(p0)
    for i in range(steps):
        g = grad(p)
        if i == bad_step:
            g = {"w": g["w"] + torch.tensor(float("nan"), dtype=D), "b": g["b"]}
            g["b"] = g["b"] + torch.tensor([0.0, float("inf"), 0.0], dtype=D)
        kw = {"value": loss(p)} if value else {}
        u, state = tx.update(g, state, p, **kw)
        p = ft.apply_updates(p, u)
    return sum((p[k] * w[k]).sum() for k in p)


def _fd(f: Callable[[dict], torch.Tensor], p0: dict) -> dict:
    """Central differences of ``f`` w.r.t. every entry of ``p0``."""
    out = {}
    for k, v in p0.items():
        d = torch.zeros_like(v).reshape(-1)
        for i in range(v.numel()):
            e = torch.zeros(v.numel(), dtype=D)
            e[i] = H
            hi = {**p0, k: v + e.reshape(v.shape)}
            lo = {**p0, k: v - e.reshape(v.shape)}
            d[i] = (f(hi) - f(lo)) / (2 * H)
        out[k] = d.reshape(v.shape)
    return out


def _assert_matches_fd(f: Callable[[dict], torch.Tensor], p0: dict) -> None:
    got = torch.func.grad(f)(p0)
    want = _fd(f, p0)
    for k in p0:
        assert torch.isfinite(got[k]).all(), f"{k}: {got[k]}"
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


# ------------------------------------------------------------------ the loss passed as value=

VALUE_TXS = {
    "scale_by_polyak": lambda: ft.chain(ft.scale_by_polyak(max_learning_rate=10.0), ft.scale(-1)),
    "polyak_sgd": lambda: ft.polyak_sgd(max_learning_rate=10.0, scaling=0.5),
    "momo": lambda: ft.momo(learning_rate=10.0),
    "momo[beta=0.5]": lambda: ft.momo(learning_rate=10.0, beta=0.5, lower_bound=-1.0),
    "momo_adam": lambda: ft.momo_adam(learning_rate=10.0),
}


@pytest.mark.parametrize("name", VALUE_TXS)
@pytest.mark.parametrize("seed", [0, 1])
def test_the_loss_passed_as_value_is_differentiated(name: str, seed: int) -> None:
    p0 = _data(seed)[3]
    _assert_matches_fd(lambda p: _final(VALUE_TXS[name], p, seed, 3, value=True), p0)


def test_a_python_number_value_still_works() -> None:
    # Not a tensor: no path to differentiate, and the step is value / ‖g‖² as before.
    tx = ft.scale_by_polyak()
    g = [torch.tensor([2.0, 0.0], dtype=D)]
    u, _ = tx.update(g, tx.init(g), value=1.0)
    torch.testing.assert_close(u[0], torch.tensor([0.5, 0.0], dtype=D))


def test_value_derivative_of_polyak_by_hand() -> None:
    # One step u = (f − f_min)/‖g‖² · g with g fixed: du/df = g/‖g‖².
    g = torch.tensor([3.0, 4.0], dtype=D)
    tx = ft.scale_by_polyak(max_learning_rate=10.0)
    d = torch.func.grad(lambda f: tx.update([g], tx.init([g]), value=f)[0][0].sum())(
        torch.tensor(2.0, dtype=D)
    )
    torch.testing.assert_close(d, g.sum() / 25.0)


# --------------------------------------------------------------------------- apply_if_finite


@pytest.mark.parametrize("bad_step", [0, 1])
def test_apply_if_finite_skipped_step_has_finite_derivatives(bad_step: int) -> None:
    seed = 3
    make = lambda: ft.apply_if_finite(ft.adam(0.05), max_consecutive_errors=2)  # noqa: E731
    p0 = _data(seed)[3]
    _assert_matches_fd(lambda p: _final(make, p, seed, 3, bad_step=bad_step), p0)


def _of_lr(lr: torch.Tensor, bad_step: int) -> torch.Tensor:
    p0 = _data(4)[3]
    make = lambda: ft.apply_if_finite(ft.adam(lr), max_consecutive_errors=2)  # noqa: E731
    return _final(make, p0, 4, 3, bad_step=bad_step)


@pytest.mark.parametrize("backend", ["func", "autograd"])
@pytest.mark.parametrize("bad_step", [0, 1])
def test_apply_if_finite_learning_rate_derivative(backend: str, bad_step: int) -> None:
    lr = torch.tensor(0.05, dtype=D)
    if backend == "func":
        got = torch.func.grad(lambda x: _of_lr(x, bad_step))(lr)
    else:  # only the closure's lr is tracked at step 0: the inner outputs reveal it
        x = lr.clone().requires_grad_()
        (got,) = torch.autograd.grad(_of_lr(x, bad_step), x)
    h = 1e-7
    want = (_of_lr(lr + h, bad_step) - _of_lr(lr - h, bad_step)) / (2 * h)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_apply_if_finite_tracked_values_are_a_skipped_step() -> None:
    # Reference: the bare inner loop that leaves out the non-finite step (params and state
    # kept), run on the same (differentiated) path; the values must agree bit for bit.
    seed = 5
    a, b, w, p0 = _data(seed)
    _, grad = _objective(a, b)

    def skipping(p: dict) -> torch.Tensor:
        tx = ft.adam(0.05)
        state = tx.init(p)
        for i in range(4):
            if i != 1:
                u, state = tx.update(grad(p), state, p)
                p = ft.apply_updates(p, u)
        return sum((p[k] * w[k]).sum() for k in p)

    make = lambda: ft.apply_if_finite(ft.adam(0.05), max_consecutive_errors=1)  # noqa: E731
    d, got = torch.func.grad_and_value(lambda p: _final(make, p, seed, 4, bad_step=1))(p0)
    d_want, want = torch.func.grad_and_value(skipping)(p0)
    assert torch.equal(got, want)
    for k in p0:  # the skipped step's gradient depends on p but is unused
        torch.testing.assert_close(d[k], d_want[k], rtol=1e-12, atol=1e-14)
    # A step applied although non-finite (the limit reached) still gives NaN, as in optax.
    forced = lambda: ft.apply_if_finite(ft.adam(0.05), max_consecutive_errors=0)  # noqa: E731
    with torch.no_grad():
        assert torch.isnan(_final(forced, p0, seed, 3, bad_step=1))


# ---------------------------------------------------------------- scale_by_param_block_rms


def test_param_block_rms_at_a_zero_parameter() -> None:
    seed = 6
    p0 = {"w": _data(seed)[3]["w"], "b": torch.zeros(3, dtype=D)}  # rms(b) = 0 < min_scale
    make = lambda: ft.chain(ft.scale_by_param_block_rms(), ft.scale(-0.1))  # noqa: E731
    _assert_matches_fd(lambda p: _final(make, p, seed, 2), p0)


# ----------------------------------------------------------------------------------- L-BFGS


@pytest.mark.parametrize("u", [[3.0, 4.0], [0.3, -0.4]])
def test_lbfgs_first_step_norm_is_a_constant(u: list[float]) -> None:
    # optax: γ = min(1, 1/‖stop_gradient(u)‖), so d(γu)/du = γ·I (not the derivative of u/‖u‖).
    x = torch.tensor(u, dtype=D)
    p = torch.zeros(2, dtype=D)
    tx = ft.scale_by_lbfgs()
    jac = torch.func.jacrev(lambda v: tx.update([v], tx.init([p]), [p])[0][0])(x)
    gamma = min(1.0, 1.0 / float(torch.linalg.vector_norm(x)))
    torch.testing.assert_close(jac, gamma * torch.eye(2, dtype=D))


def test_lbfgs_after_a_step_that_did_not_move() -> None:
    # A schedule starting at 0: δw = δu = 0 at the second step (ρ = 0, γ = 1 for every p0).
    seed = 7
    sched = ft.linear_schedule(0.0, 0.1, 4)
    make = lambda: ft.lbfgs(sched, memory_size=4, linesearch=None)  # noqa: E731
    _assert_matches_fd(lambda p: _final(make, p, seed, 4), _data(seed)[3])


# ------------------------------------------------------------------------------------ RAdam


@pytest.mark.parametrize("steps", [3, 7])  # ρₜ ≥ 5 from t = 6: unrectified, then both
@pytest.mark.parametrize("name", ["radam", "scale_by_radam"])
def test_radam_derivatives_are_finite_and_right(name: str, steps: int) -> None:
    seed = 8
    make = {
        "radam": lambda: ft.radam(0.05),
        "scale_by_radam": lambda: ft.chain(ft.scale_by_radam(eps_root=1e-8), ft.scale(-0.05)),
    }[name]
    _assert_matches_fd(lambda p: _final(make, p, seed, steps), _data(seed)[3])


def test_radam_hyperparameter_derivative() -> None:
    p0 = _data(9)[3]

    def of_b2(b2: torch.Tensor) -> Any:
        return _final(lambda: ft.radam(0.05, b2=b2), p0, 9, 7)

    b2 = torch.tensor(0.999, dtype=D)
    got = torch.func.grad(of_b2)(b2)
    h = 1e-8
    want = (of_b2(b2 + h) - of_b2(b2 - h)) / (2 * h)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["polyak_sgd", "momo", "momo_adam", "reduce_on_plateau"])
def test_a_loss_with_its_graph_does_not_leak_into_untracked_updates(name):
    """A torch-style loop passes ``value=loss`` with its graph and untracked gradients: the
    updates and the state stay graph-free (a loss average in the state would otherwise chain
    every step's graph, activations included, for the whole run)."""
    tx = {
        "polyak_sgd": lambda: ft.polyak_sgd(),
        "momo": lambda: ft.momo(),
        "momo_adam": lambda: ft.momo_adam(),
        "reduce_on_plateau": lambda: ft.chain(ft.sgd(0.1), ft.reduce_on_plateau()),
    }[name]()
    params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    state = tx.init(params)
    for _ in range(3):
        leaf = params["w"].clone().requires_grad_()
        loss = (leaf**2).sum()
        (grad,) = torch.autograd.grad(loss, [leaf], retain_graph=True)
        updates, state = tx.update({"w": grad}, state, params, value=loss)
        params = ft.apply_updates(params, updates)
    tensors = [x for x in ft.tree.leaves((updates, state, params)) if isinstance(x, torch.Tensor)]
    assert not any(x.requires_grad for x in tensors)


# A large eps keeps the update smooth near a zero gradient (with 1e-8 it is ≈ −lr·sign(g) a
# hair away from 0), so that finite differences resolve its derivative there.
ZERO_GRAD_CASES = {
    "adam": lambda: ft.adam(0.1, eps=0.5),
    "nadam": lambda: ft.nadam(0.1, eps=0.5),
    "amsgrad": lambda: ft.amsgrad(0.1, eps=0.5),
    "rmsprop": lambda: ft.rmsprop(0.1, eps=0.5),
    "adagrad": lambda: ft.adagrad(0.1, eps=0.5),
    "adabelief": lambda: ft.adabelief(0.1, eps=0.5),
    "yogi": lambda: ft.yogi(0.1, eps=0.5),
    "lamb": lambda: ft.lamb(0.1, eps=0.5),
    "adafactor": lambda: ft.adafactor(0.1, eps=0.5),
}


@pytest.mark.parametrize("name", list(ZERO_GRAD_CASES))
def test_zero_gradients_keep_derivatives_finite(name):
    """Exactly zero moments: ``z`` sits at the minimum of ``z²`` (a gradient ``2z`` that is 0
    but still a function of ``z``), ``unused`` is not in the loss. √0's infinite slope (or a
    trust ratio over a zero norm) times a zero made every derivative through the update NaN
    (optax's too), e.g. in MAML-style loops over models with unused leaves."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, generator=gen, dtype=torch.float64)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((x @ p["w"] - y) ** 2).mean() + (p["z"] ** 2).sum() + 0 * p["unused"].sum()

    def after(w: torch.Tensor, z: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        tx = ZERO_GRAD_CASES[name]()
        p = {"w": w, "z": z, "unused": unused}
        state = tx.init(p)
        for _ in range(3):
            updates, state = tx.update(torch.func.grad(loss)(p), state, p)
            p = ft.apply_updates(p, updates)
        return (p["w"] ** 2).sum() + p["z"].sum() + p["unused"].sum()

    w = torch.randn(3, generator=gen, dtype=torch.float64)
    z = torch.zeros(2, dtype=torch.float64)
    unused = torch.randn(2, generator=gen, dtype=torch.float64)
    d_w, d_z, d_unused = torch.func.grad(after, argnums=(0, 1, 2))(w, z, unused)
    # The unused leaf never moves (zero gradients, no decay): its derivative is exactly 1.
    torch.testing.assert_close(d_unused, torch.ones(2, dtype=torch.float64))

    def fd(f: Callable[[torch.Tensor], torch.Tensor], at: torch.Tensor) -> torch.Tensor:
        steps = torch.eye(at.numel(), dtype=torch.float64) * 1e-6
        return torch.stack([(f(at + e) - f(at - e)) / 2e-6 for e in steps])

    torch.testing.assert_close(d_w, fd(lambda v: after(v, z, unused), w), rtol=1e-6, atol=1e-8)
    if name == "lamb":
        return  # its trust ratio is 1 at exactly p = 0 and ‖p‖/‖u‖ beside it: a jump there
    # √(z²) = |z| at the minimum: central differences there carry an O(h) error.
    torch.testing.assert_close(d_z, fd(lambda v: after(w, v, unused), z), rtol=1e-3, atol=1e-6)
