"""Hypergradients through updates (optax's learned-learning-rate tutorial), ``torch.func``.

Tensor hyperparameters (``adam(learning_rate=tensor)``, ``inject_hyperparams``, ``b1``,
``weight_decay``, clip bounds, a schedule's parameter) are gradchecked in float64 (finite
differences: the reference) through two updates; ``torch.func.grad``/``jvp``/``vmap(grad)``
give autograd's numbers; the fused AdamW kernel (no derivative) steps aside whenever something
is tracked, and only then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft
from functrain import _foreach
from functrain.optim import _pure_fused

D = torch.float64
# torch.func.jvp's first use imports a module that calls the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def _tree(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 2, generator=gen, dtype=D),
        "b": torch.randn(2, generator=gen, dtype=D),
    }


PARAMS, GRADS = _tree(0), [_tree(1), _tree(2)]


def _final_loss(tx: ft.GradientTransformation, params: Any, grads: list[Any]) -> torch.Tensor:
    """A scalar of the parameters after ``len(grads)`` updates (a "validation loss")."""
    state, q = tx.init(params), params
    for g in grads:
        u, state = tx.update(g, state, q)
        q = ft.apply_updates(q, u)
    return sum(((x - 0.3) ** 2).sum() for x in ft.tree.leaves(q))


# The learning rate as a tensor, in each form optax users write it.
LR_FORMS: dict[str, Callable[[torch.Tensor], ft.GradientTransformation]] = {
    "sgd": lambda lr: ft.sgd(lr),
    "sgd[momentum]": lambda lr: ft.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: ft.adam(lr),
    "adamw": lambda lr: ft.adamw(lr, weight_decay=0.1),
    "nadam": lambda lr: ft.nadam(lr),
    "radam": lambda lr: ft.radam(lr),
    "amsgrad": lambda lr: ft.amsgrad(lr),
    "adamax": lambda lr: ft.adamax(lr),
    "lamb": lambda lr: ft.lamb(lr),
    "yogi": lambda lr: ft.yogi(lr),
    "adabelief": lambda lr: ft.adabelief(lr),
    "rmsprop": lambda lr: ft.rmsprop(lr, momentum=0.5),
    "inject_hyperparams(adam)": lambda lr: ft.inject_hyperparams(ft.adam)(learning_rate=lr),
    "inject_hyperparams(adamw)": lambda lr: ft.inject_hyperparams(ft.adamw)(
        learning_rate=lr, weight_decay=0.1
    ),
    "inject_hyperparams(sgd)": lambda lr: ft.inject_hyperparams(ft.sgd)(
        learning_rate=lr, momentum=0.9
    ),
    "chain(clip, adam)": lambda lr: ft.chain(ft.clip_by_global_norm(1.0), ft.adam(lr)),
    "masked(adam)": lambda lr: ft.masked(ft.adam(lr), {"w": True, "b": False}),
    "partition": lambda lr: ft.partition({"a": ft.adam(lr), "s": ft.sgd(lr)}, {"w": "a", "b": "s"}),
    "MultiSteps(adam)": lambda lr: ft.MultiSteps(ft.adam(lr), 2).gradient_transformation(),
    "apply_if_finite(adam)": lambda lr: ft.apply_if_finite(ft.adam(lr), 2),
    "scale_by_schedule": lambda lr: ft.chain(
        ft.scale_by_adam(), ft.scale_by_schedule(lambda c: -lr / (1 + c))
    ),
}


@pytest.mark.parametrize("form", sorted(LR_FORMS))
def test_hypergradient_of_a_tensor_learning_rate(form: str) -> None:
    make = LR_FORMS[form]
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    # Each optimizer needs two gradients for MultiSteps to apply; three for the rest is slower.
    grads = [{k: v.clone().requires_grad_() for k, v in g.items()} for g in GRADS]
    leaves = [x for g in grads for x in g.values()]

    def f(lr: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        gs = [dict(zip(PARAMS, flat[i : i + 2])) for i in (0, 2)]
        return _final_loss(make(lr), PARAMS, gs)

    assert torch.autograd.gradcheck(f, (lr, *leaves))
    (d,) = torch.autograd.grad(f(lr, *leaves), lr)
    assert d != 0  # the learning rate really moves the result (not dropped on the way)


HYPERS: dict[str, Callable[[torch.Tensor], ft.GradientTransformation]] = {
    "adam b1": lambda h: ft.adam(0.1, b1=h),
    "adam b2": lambda h: ft.adam(0.1, b2=0.99 + 0.01 * h),
    "adam eps": lambda h: ft.adam(0.1, eps=h * 0.3),
    "adamw weight_decay": lambda h: ft.adamw(0.1, weight_decay=h),
    "inject_hyperparams(adamw) weight_decay": lambda h: ft.inject_hyperparams(ft.adamw)(
        learning_rate=0.1, weight_decay=h
    ),
    "inject_hyperparams(adam) b1": lambda h: ft.inject_hyperparams(ft.adam)(
        learning_rate=0.1, b1=h
    ),
    "clip_by_global_norm max_norm": lambda h: ft.chain(ft.clip_by_global_norm(h), ft.sgd(0.1)),
    "clip max_delta": lambda h: ft.chain(ft.clip(h * 0.2), ft.sgd(0.1)),
    "sgd momentum": lambda h: ft.sgd(0.1, momentum=h),
}


@pytest.mark.parametrize("name", sorted(HYPERS))
def test_tensor_hyperparameters_are_differentiable(name: str) -> None:
    make = HYPERS[name]
    h = torch.tensor(0.9, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: _final_loss(make(h), PARAMS, GRADS), (h,))


FUNC_FORMS = ["sgd[momentum]", "adam", "adamw", "inject_hyperparams(adam)", "lamb"]


def _of_lr_and_params(form: str) -> Callable[[torch.Tensor, dict], torch.Tensor]:
    return lambda lr, params: _final_loss(LR_FORMS[form](lr), params, GRADS)


@pytest.mark.parametrize("form", FUNC_FORMS)
def test_func_grad_and_jvp_give_autograds_derivatives(form: str) -> None:
    f = _of_lr_and_params(form)
    lr = torch.tensor(0.1, dtype=D)
    lr_t = lr.clone().requires_grad_()
    p_t = {k: v.clone().requires_grad_() for k, v in PARAMS.items()}
    want = torch.autograd.grad(f(lr_t, p_t), [lr_t, *p_t.values()])
    got_lr, got_p = torch.func.grad(f, argnums=(0, 1))(lr, PARAMS)
    torch.testing.assert_close(got_lr, want[0], rtol=1e-12, atol=0)
    for k, w in zip(PARAMS, want[1:]):
        torch.testing.assert_close(got_p[k], w, rtol=1e-12, atol=1e-14)
    # Forward mode: the directional derivative along (1, tangent) is the same dot product.
    tangent = {k: torch.full_like(v, 0.5) for k, v in PARAMS.items()}
    _, jvp = torch.func.jvp(f, (lr, PARAMS), (torch.ones((), dtype=D), tangent))
    dot = want[0] + sum((w * 0.5).sum() for w in want[1:])
    torch.testing.assert_close(jvp, dot, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("form", ["adam", "sgd[momentum]"])
def test_vmap_of_grad_over_learning_rates_matches_a_loop(form: str) -> None:
    f = _of_lr_and_params(form)
    lrs = torch.tensor([0.01, 0.1, 0.3], dtype=D)
    got = torch.func.vmap(torch.func.grad(f), in_dims=(0, None))(lrs, PARAMS)
    for lr, g in zip(lrs, got):
        lr_t = lr.clone().requires_grad_()
        (want,) = torch.autograd.grad(f(lr_t, PARAMS), lr_t)
        torch.testing.assert_close(g, want, rtol=1e-12, atol=0)


def _fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = _pure_fused._updates

    def spy(*a: Any) -> Any:
        out = real(*a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_pure_fused, "_updates", spy)
    return calls


def test_the_fused_kernel_serves_the_untracked_update(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fused_calls(monkeypatch)
    _final_loss(ft.adamw(torch.tensor(0.1, dtype=D), weight_decay=0.1), PARAMS, GRADS)
    _final_loss(ft.inject_hyperparams(ft.adamw)(learning_rate=0.1), PARAMS, GRADS)
    assert calls == [True] * 4  # the fast path is kept when nothing is tracked


TRACKED: dict[str, Callable[[], Any]] = {
    "closure lr": lambda: torch.autograd.grad(
        _final_loss(ft.adamw(lr := torch.tensor(0.1, dtype=D, requires_grad=True)), PARAMS, GRADS),
        lr,
    ),
    "injected lr": lambda: torch.autograd.grad(
        _final_loss(
            ft.inject_hyperparams(ft.adamw)(
                learning_rate=(lr := torch.tensor(0.1, dtype=D, requires_grad=True))
            ),
            PARAMS,
            GRADS,
        ),
        lr,
    ),
    "func.grad": lambda: torch.func.grad(lambda p: _final_loss(ft.adamw(0.1), p, GRADS))(PARAMS),
    "func.jvp": lambda: torch.func.jvp(
        lambda p: _final_loss(ft.adamw(0.1), p, GRADS), (PARAMS,), (PARAMS,)
    ),
}


@pytest.mark.parametrize("how", sorted(TRACKED))
def test_the_fused_kernel_steps_aside_when_tracked(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    calls = _fused_calls(monkeypatch)
    out = TRACKED[how]()
    assert not any(calls)
    assert all(torch.isfinite(x).all() for x in ft.tree.leaves(out))


def test_the_fused_kernel_steps_aside_for_a_tracked_state() -> None:
    """Moments of an earlier tracked step: the derivative w.r.t. the state's tensors."""
    tx = ft.adamw(0.1, weight_decay=0.1)
    state = tx.init(PARAMS)
    mu = state[0].mu
    mu_t = {k: torch.full_like(v, 0.1).requires_grad_() for k, v in mu.items()}
    state = (state[0]._replace(mu=mu_t), *state[1:])
    u, _ = tx.update(GRADS[0], state, PARAMS)
    d = torch.autograd.grad(sum(x.sum() for x in u.values()), list(mu_t.values()))
    assert all((x != 0).all() for x in d)


def test_may_write_sees_autograd_and_func_transforms() -> None:
    x = torch.ones(2)
    assert _foreach.may_write([x], torch.tensor(1.0))
    assert not _foreach.may_write([x], torch.tensor(1.0, requires_grad=True))
    with torch.no_grad():
        assert _foreach.may_write([x.requires_grad_()])
    seen: list[bool] = []

    def probe(y: torch.Tensor) -> torch.Tensor:
        seen.append(_foreach.may_write([y]))
        return y.sum()

    y = torch.ones(2)
    torch.func.grad(probe)(y)
    torch.func.jvp(probe, (y,), (y,))
    torch.func.vmap(probe)(y[:, None])
    assert seen == [False, False, True]


@pytest.mark.parametrize("op", ["mul", "div", "add_tensor"])
def test_foreach_ops_differentiate_a_tracked_tensor_scalar(op: str) -> None:
    """The kernels' derivative fails for it ("inconsistent range for TensorList output")."""
    xs = [torch.randn(3, dtype=D, requires_grad=True), torch.randn(2, dtype=D, requires_grad=True)]
    s = torch.tensor(1.7, dtype=D, requires_grad=True)
    per = {"mul": torch.mul, "div": torch.div, "add_tensor": torch.add}[op]
    got = torch.autograd.grad(sum(y.sum() for y in getattr(_foreach, op)(xs, s)), [*xs, s])
    want = torch.autograd.grad(sum(per(x, s).sum() for x in xs), [*xs, s])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
