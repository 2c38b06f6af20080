"""Derivatives through train steps (``torch.func.grad``/``jvp`` of a function of the state after
some steps: MAML-style inner loops, hypergradients of a learning rate), as ``jax.grad`` through
an optax training loop.

References: the same loop written by hand with ``torch.autograd.grad(create_graph=True)`` and
hand-written optimizer updates (exact, float64), and central finite differences of the step
itself for the configurations a hand loop would not reproduce (accumulation splits, clipping,
DP clipping, hooks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft

STEPS = 3
D = torch.float64


def _loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = torch.tanh(b["x"] @ p["w1"])
    return ((hidden @ p["w2"] - b["y"]) ** 2).mean()


def _problem() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(4, 3, generator=gen, dtype=D) * 0.5,
        "w2": torch.randn(3, generator=gen, dtype=D),
    }

    def batch(n: int) -> dict[str, torch.Tensor]:
        return {
            "x": torch.randn(n, 4, generator=gen, dtype=D),
            "y": torch.randn(n, generator=gen, dtype=D),
        }

    return params, batch(12), batch(7)


def _after_steps(
    tx: ft.GradientTransformation, options: dict[str, Any], params: Any, batch: Any
) -> Any:
    step = ft.make_train_step(_loss, tx, **options)
    state = ft.TrainState.create(params=params, tx=tx)
    for _ in range(STEPS):
        state, _ = step(state, batch)
    return state.params


def _hand_loop(update: Callable[..., Any], params: Any, batch: Any) -> Any:
    """The steps by hand: autograd gradients with a graph, ``update(g, slots, t)`` per leaf."""
    slots: dict[str, dict[str, torch.Tensor]] = {k: {} for k in params}
    for t in range(1, STEPS + 1):
        grads = torch.autograd.grad(_loss(params, batch), list(params.values()), create_graph=True)
        params = {
            k: p + update(g, slots[k], t) for (k, p), g in zip(params.items(), grads, strict=True)
        }
    return params


def _sgd(lr: Any, momentum: float = 0.0) -> Callable[..., torch.Tensor]:
    def update(g: torch.Tensor, slot: dict[str, torch.Tensor], t: int) -> torch.Tensor:
        if momentum:
            slot["m"] = g if t == 1 else momentum * slot["m"] + g
            g = slot["m"]
        return -lr * g

    return update


def _adam(lr: Any, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    def update(g: torch.Tensor, slot: dict[str, torch.Tensor], t: int) -> torch.Tensor:
        slot["m"] = (1 - b1) * g + (b1 * slot["m"] if t > 1 else 0)
        slot["v"] = (1 - b2) * g * g + (b2 * slot["v"] if t > 1 else 0)
        m_hat, v_hat = slot["m"] / (1 - b1**t), slot["v"] / (1 - b2**t)
        return -lr * m_hat / (v_hat.sqrt() + eps)

    return update


HAND = {
    "sgd": (lambda lr: ft.sgd(lr), lambda lr: _sgd(lr)),
    "sgd momentum": (lambda lr: ft.sgd(lr, momentum=0.9), lambda lr: _sgd(lr, 0.9)),
    "adam": (lambda lr: ft.adam(lr), lambda lr: _adam(lr)),
}


def _val_loss_by_hand(update: Callable[..., Any], params: Any, batch: Any, val: Any):
    return _loss(_hand_loop(update, params, batch), val)


@pytest.mark.parametrize("name", list(HAND))
@pytest.mark.parametrize("micro_batches", [1, 3, [5, 7]], ids=["K=1", "K=3", "K=[5,7]"])
def test_grad_wrt_initial_params_equals_the_hand_loop(name, micro_batches):
    params, batch, val = _problem()
    make_tx, make_update = HAND[name]
    got = torch.func.grad(
        lambda p: _loss(
            _after_steps(make_tx(0.1), dict(micro_batches=micro_batches), p, batch), val
        )
    )(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    value = _val_loss_by_hand(make_update(0.1), leaves, batch, val)
    want = dict(zip(leaves, torch.autograd.grad(value, list(leaves.values())), strict=True))
    ft.testing.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(HAND))
def test_hypergradient_of_the_learning_rate_equals_the_hand_loop(name):
    """d(validation loss after the steps) / d(learning rate), optax's meta-learning example."""
    params, batch, val = _problem()
    make_tx, make_update = HAND[name]
    got = torch.func.grad(
        lambda lr: _loss(_after_steps(make_tx(lr), dict(micro_batches=2), params, batch), val)
    )(torch.tensor(0.1, dtype=D))
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    (want,) = torch.autograd.grad(_val_loss_by_hand(make_update(lr), leaves, batch, val), [lr])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _finite_difference(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps=1e-6):
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for i in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[i] = eps
        out[i] = (f((flat + step).view_as(x)) - f((flat - step).view_as(x))) / (2 * eps)
    return out.view_as(x)


def _dp_tx() -> ft.GradientTransformation:
    return ft.chain(ft.dp_noisy_mean(1.0, 0.0, 12, seed=0), ft.sgd(0.1))


CASES = {
    "adamw + clip, K=3": (
        dict(micro_batches=3),
        lambda: ft.chain(ft.clip_by_global_norm(0.5), ft.adamw(0.05, weight_decay=0.1)),
    ),
    "vmap strategy, K=4, lamb": (dict(strategy="vmap", micro_batches=4), lambda: ft.lamb(0.01)),
    "no donation, nonfinite='ignore', adam": (
        dict(donate=False, nonfinite="ignore"),
        lambda: ft.adam(0.05),
    ),
    "schedule, K=2": (
        dict(micro_batches=2),
        lambda: ft.adam(ft.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10)),
    ),
    "noise-scale hook, K=2": (
        dict(micro_batches=2, grad_stats=ft.noise_scale_hook()),
        lambda: ft.sgd(0.1, momentum=0.9),
    ),
    "DP-SGD clipping, K=3": (dict(micro_batches=3, per_example_clip=1.0), _dp_tx),
    "MultiSteps(every 2)": (dict(), lambda: ft.MultiSteps(ft.adam(0.05), 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grad_wrt_initial_params_equals_finite_differences(case):
    options, make_tx = CASES[case]
    params, batch, val = _problem()

    def val_loss(w1: torch.Tensor) -> torch.Tensor:
        return _loss(_after_steps(make_tx(), options, {**params, "w1": w1}, batch), val)

    got = torch.func.grad(val_loss)(params["w1"])
    torch.testing.assert_close(
        got, _finite_difference(val_loss, params["w1"]), rtol=1e-6, atol=1e-8
    )


# torch.func.jvp's first use imports a module that calls the deprecated torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("case", ["adamw + clip, K=3", "DP-SGD clipping, K=3"])
def test_forward_mode_agrees_with_reverse_mode(case):
    options, make_tx = CASES[case]
    params, batch, val = _problem()

    def val_loss(w1: torch.Tensor) -> torch.Tensor:
        return _loss(_after_steps(make_tx(), options, {**params, "w1": w1}, batch), val)

    tangent = torch.randn(params["w1"].shape, generator=torch.Generator().manual_seed(1), dtype=D)
    _, directional = torch.func.jvp(val_loss, (params["w1"],), (tangent,))
    reverse = torch.func.grad(val_loss)(params["w1"])
    torch.testing.assert_close(directional, (reverse * tangent).sum(), rtol=1e-10, atol=1e-12)


def test_the_state_built_inside_the_transform_is_not_detached():
    """``TrainState.create`` detaches autograd graphs, not the transform's own inputs: the
    derivative of the created state's params is the identity (it was silently 0)."""
    params, _, _ = _problem()

    def created(w2: torch.Tensor) -> torch.Tensor:
        return ft.TrainState.create(params={**params, "w2": w2}, tx=ft.sgd(0.1)).params["w2"].sum()

    torch.testing.assert_close(torch.func.grad(created)(params["w2"]), torch.ones(3, dtype=D))
    outside = ft.TrainState.create(
        params={k: v.clone().requires_grad_() for k, v in params.items()}, tx=ft.sgd(0.1)
    )
    assert not any(p.requires_grad for p in outside.params.values())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(grad_backend="autograd"), "grad_backend='autograd'"),
        (dict(compile=True), "compile="),
        (dict(max_consecutive_skips=3), "max_consecutive_skips"),
    ],
)
def test_what_cannot_be_differentiated_is_refused_by_name(options, match):
    params, batch, val = _problem()
    with warnings.catch_warnings(), pytest.raises(ValueError, match=match):
        torch.func.grad(
            lambda w2: _loss(_after_steps(ft.sgd(0.1), options, {**params, "w2": w2}, batch), val)
        )(params["w2"])


def test_meta_gradients_of_an_ensemble_by_vmap_equal_each_members_own():
    """``vmap(grad(...))``: one meta-gradient per task or member, as ``jax.vmap(jax.grad(...))``."""
    params, batch, val = _problem()
    stacked = torch.stack([params["w1"], 2 * params["w1"], -params["w1"]])
    options = dict(micro_batches=[5, 7])

    def val_loss(w1: torch.Tensor) -> torch.Tensor:
        return _loss(
            _after_steps(ft.sgd(0.1, momentum=0.9), options, {**params, "w1": w1}, batch), val
        )

    together = torch.func.vmap(torch.func.grad(val_loss))(stacked)
    alone = torch.stack([torch.func.grad(val_loss)(w1) for w1 in stacked])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)


def _with_aux(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> ft.LossOutput:
    return ft.LossOutput(_loss(p, b), aux={"w2_sq": (p["w2"] ** 2).sum()})


def _token_sum(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> ft.LossSum:
    hidden = torch.tanh(b["x"] @ p["w1"])
    return ft.LossSum(((hidden @ p["w2"] - b["y"]) ** 2).sum(), torch.tensor(b["y"].shape[0]))


@pytest.mark.parametrize("loss_fn", [_loss, _with_aux, _token_sum])
@pytest.mark.parametrize("micro_batches", [1, [5, 7]], ids=["K=1", "K=[5,7]"])
def test_the_loss_metrics_of_train_and_eval_steps_are_differentiable(loss_fn, micro_batches):
    """The ``loss`` metric (the loss at the state's params) and the aux metrics keep their
    derivatives, as a ``jax.grad`` of a train step's loss; they were detached (silently 0)."""
    params, batch, _ = _problem()
    tx = ft.sgd(0.1)
    train = ft.make_train_step(loss_fn, tx, micro_batches=micro_batches)
    evaluate = ft.make_eval_step(loss_fn, micro_batches=micro_batches)

    def metrics_of(p: Any, run: Callable[..., Any]) -> Any:
        return run(ft.TrainState.create(params=p, tx=tx))

    want = torch.func.grad(_loss)(params, batch)
    for run in (lambda s: train(s, batch)[1], lambda s: evaluate(s, batch)):
        got = torch.func.grad(lambda p: metrics_of(p, run)["loss"])(params)
        ft.testing.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
        if loss_fn is _with_aux:
            aux = torch.func.grad(lambda p: metrics_of(p, run)["w2_sq"])(params)
            torch.testing.assert_close(aux["w2"], 2 * params["w2"])


def test_replace_inside_the_transform_differentiates_the_new_fields():
    """``state.replace(opt_state=...)`` with a tracked learning rate (the learned-lr example's
    move) gives the same hypergradient as building the optimizer with it; ``replace`` read the
    storages of the transform's wrapped tensors ("Cannot access storage of TensorWrapper")."""
    params, batch, val = _problem()
    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=0.1, momentum=0.9)

    def by_replace(lr: torch.Tensor) -> torch.Tensor:
        state = ft.TrainState.create(params=params, tx=tx)
        hyperparams = {**state.opt_state.hyperparams, "learning_rate": lr}
        state = state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))
        step = ft.make_train_step(_loss, tx)
        for _ in range(STEPS):
            state, _ = step(state, batch)
        return _loss(state.params, val)

    lr = torch.tensor(0.1, dtype=D)
    got = torch.func.grad(by_replace)(lr)
    want = torch.func.grad(
        lambda r: _loss(_after_steps(ft.sgd(r, momentum=0.9), {}, params, batch), val)
    )(lr)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    members = torch.func.vmap(by_replace)(torch.tensor([0.05, 0.1], dtype=D))
    torch.testing.assert_close(members[1], by_replace(lr))
