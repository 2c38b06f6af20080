"""Schedule-free SGD/AdamW (optax.contrib.schedule_free): float64 against optax's rule written
out by hand, purity, vmap ensembles, compile, training, checkpoints and argument errors.

Real optax is compared by ``tools/optax_parity.py schedule_free`` (needs jax; not in CI)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from _ensembles import assert_members_match, random_ensemble, run_vmapped

import functrain as ft

SHAPES = {"w": (3, 2), "b": (2,)}


def _data(seed: int, steps: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)

    def tree() -> dict[str, torch.Tensor]:
        return {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}

    return tree(), [tree() for _ in range(steps)]


def _reference(
    params: dict[str, torch.Tensor],
    grads: list[dict[str, torch.Tensor]],
    *,
    adam: bool,
    lr: Any,
    b1: float,
    wd: float,
    power: float,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """optax's schedule_free rule in float64 Python maths, independent of the code under test.

    ``lr(t)`` is the learning-rate schedule: the base optimizer reads it at its own count
    (0, 1, …), the averaging weight at the wrapper's ``step_count`` (1, 2, …)."""
    y = {k: v.clone() for k, v in params.items()}
    z = {k: v.clone() for k, v in params.items()}
    nu = {k: torch.zeros_like(v) for k, v in params.items()}
    max_lr, weight_sum, ys = 0.0, 0.0, []
    for t, g in enumerate(grads, start=1):
        max_lr = max(max_lr, lr(t))
        weight = max_lr**power
        weight_sum += weight
        c = weight / weight_sum if weight_sum > 0 else 0.0
        for k in y:
            if adam:
                nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
                step = g[k] / ((nu[k] / (1 - b2**t)).sqrt() + eps) + wd * y[k]
            else:
                step = g[k] + wd * y[k]
            x_prev = (y[k] - (1 - b1) * z[k]) / b1
            z[k] = z[k] - lr(t - 1) * step
            x = (1 - c) * x_prev + c * z[k]
            y[k] = b1 * x + (1 - b1) * z[k]
        ys.append({k: v.clone() for k, v in y.items()})
    x_eval = {k: (y[k] - (1 - b1) * z[k]) / b1 for k in y}
    return ys, x_eval


def _run(tx: ft.GradientTransformation, params: Any, grads: list[Any]) -> tuple[list, Any]:
    state, out = tx.init(params), []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = ft.apply_updates(params, updates)
        out.append(params)
    return out, state


def _close(got: Any, want: Any) -> None:
    for a, b in zip(ft.tree.leaves(got), ft.tree.leaves(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.fixture
def float64_default() -> Any:
    # ft's schedules of an int32 count compute in the default dtype: float64 here, so that the
    # comparison measures the formulas rather than float32 rounding of the warmup.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_adamw_with_warmup_matches_the_rule_by_hand(float64_default: None) -> None:
    params, grads = _data(0, 20)
    tx = ft.schedule_free_adamw(0.05, warmup_steps=4, b1=0.8, weight_decay=0.1, weight_lr_power=1.5)
    got, state = _run(tx, params, grads)
    want, x_eval = _reference(
        params, grads, adam=True, lr=lambda t: 0.05 * min(t, 4) / 4, b1=0.8, wd=0.1, power=1.5
    )
    _close(got, want)
    _close(ft.schedule_free_eval_params(state, got[-1]), x_eval)
    assert state.step_count.dtype == torch.int32 and int(state.step_count) == 21


def test_sgd_with_a_schedule_matches_the_rule_by_hand() -> None:
    params, grads = _data(1, 20)

    def sched(n: Any) -> Any:  # float64 for a tensor count too
        return 0.1 / (1 + 0.2 * (n.double() if isinstance(n, torch.Tensor) else n))

    base = ft.chain(ft.add_decayed_weights(0.05), ft.sgd(sched))
    tx = ft.schedule_free(base, sched, b1=0.6, weight_lr_power=3.0)
    got, state = _run(tx, params, grads)
    want, x_eval = _reference(
        params, grads, adam=False, lr=lambda t: sched(float(t)), b1=0.6, wd=0.05, power=3.0
    )
    _close(got, want)
    _close(ft.schedule_free_eval_params(state, got[-1]), x_eval)


def test_update_is_pure() -> None:
    params, grads = _data(2, 2)
    tx = ft.schedule_free_adamw(0.1, warmup_steps=2, weight_decay=0.1)
    state = tx.init(params)
    assert all(z is not p for z, p in zip(ft.tree.leaves(state.z), ft.tree.leaves(params)))
    _, state = tx.update(grads[0], state, params)
    before = [x.clone() for x in ft.tree.leaves((grads[1], state, params))]
    tx.update(grads[1], state, params)
    ft.schedule_free_eval_params(state, params)
    for a, b in zip(ft.tree.leaves((grads[1], state, params)), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_vmap_ensemble_equals_members(name: str) -> None:
    def make() -> ft.GradientTransformation:
        if name == "adamw":
            return ft.schedule_free_adamw(0.05, warmup_steps=2, weight_decay=0.1)
        return ft.schedule_free_sgd(0.1, warmup_steps=2, weight_decay=0.1)

    params, grads = random_ensemble(3, SHAPES)
    got_params, got_state = run_vmapped(make(), params, grads)
    assert_members_match(got_params, got_state, make, params, grads)


def test_compiled_fullgraph_update_matches_eager() -> None:
    params, grads = _data(3, 3)
    tx = ft.schedule_free_adamw(0.05, warmup_steps=2, weight_decay=0.1)
    eager, _ = _run(tx, params, grads)
    update = torch.compile(tx.update, fullgraph=True, backend="eager")
    state, p = tx.init(params), params
    for g in grads:
        updates, state = update(g, state, p)
        p = ft.apply_updates(p, updates)
    _close(p, eager[-1])


def test_train_step_trains_and_eval_params_evaluate() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(64, 4)
    y = x[:, :1] - 2 * x[:, 1:2]

    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (batch[0],))
        return torch.nn.functional.mse_loss(out, batch[1])

    tx = ft.schedule_free_adamw(0.02, warmup_steps=5)
    step = ft.make_train_step(loss_fn, tx)
    state = ft.TrainState.create(params=params, tx=tx)
    state, metrics = step(state, (x, y))
    first = float(metrics["loss"])
    for _ in range(60):
        state, metrics = step(state, (x, y))
    eval_params = ft.schedule_free_eval_params(state.opt_state, state.params)
    assert float(loss_fn(eval_params, (x, y))) < 0.2 * first


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    params, grads = _data(4, 2)
    tx = ft.schedule_free_sgd(0.1, warmup_steps=3, weight_decay=0.01)
    _, state = _run(tx, params, grads)
    ft.checkpoint.save(tmp_path / "ckpt", state)
    back = ft.checkpoint.restore(tmp_path / "ckpt", tx.init(params))
    assert isinstance(back, ft.ScheduleFreeState)
    assert optree.tree_structure(back) == optree.tree_structure(state)
    for a, b in zip(ft.tree.leaves(back), ft.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_state_dtype_and_scalars() -> None:
    params = {"w": torch.ones(2), "h": torch.ones(2, dtype=torch.float64)}
    state = ft.schedule_free_sgd(state_dtype=torch.float64).init(params)
    assert state.z["w"].dtype == torch.float64
    # optax's scalars take the narrowest parameter dtype
    assert state.b1.dtype == state.max_lr.dtype == torch.float32
    updates, state = ft.schedule_free_sgd(0.1).update(params, state, params)
    assert updates["w"].dtype == torch.float32 and math.isfinite(float(updates["w"][0]))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ft.schedule_free_sgd(b1=0.0), r"b1 must be in \(0, 1\]"),
        (lambda: ft.schedule_free_adamw(b1=1.5), r"b1 must be in \(0, 1\]"),
        (lambda: ft.schedule_free_sgd(learning_rate=math.nan), "learning_rate must be finite"),
        (lambda: ft.schedule_free_adamw(b2=1.0), r"b2 must be in \[0, 1\)"),
        (lambda: ft.schedule_free_adamw(eps=-1.0), "eps must be >= 0"),
        (lambda: ft.schedule_free_sgd(weight_lr_power=-1.0), "weight_lr_power must be >= 0"),
        (lambda: ft.schedule_free_sgd(warmup_steps=0), "warmup_steps must be a positive"),
        (lambda: ft.schedule_free_adamw(warmup_steps=2.5), "warmup_steps must be a positive"),
        (lambda: ft.schedule_free_sgd(state_dtype=torch.int32), "state_dtype must be a float"),
        (lambda: ft.schedule_free(ft.sgd(0.1), torch.ones(2)), "learning_rate must be a number"),
    ],
)
def test_bad_hyperparameters_name_the_argument(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_type_errors_and_missing_params() -> None:
    with pytest.raises(TypeError, match="base_optimizer must be a GradientTransformation"):
        ft.schedule_free(lambda g: g, 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="weight_decay must be a number"):
        ft.schedule_free_adamw(weight_decay="0.1")  # type: ignore[arg-type]
    tx = ft.schedule_free_sgd()
    params = [torch.ones(2)]
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="needs a ScheduleFreeState"):
        ft.schedule_free_eval_params(ft.sgd(0.1).init(params), params)


def test_warmup_steps_with_a_schedule_learning_rate_is_refused() -> None:
    for make in (ft.schedule_free_adamw, ft.schedule_free_sgd):
        with pytest.raises(ValueError, match="warmup_steps needs a number learning_rate"):
            make(ft.cosine_decay_schedule(0.1, 10), warmup_steps=2)
