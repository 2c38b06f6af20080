"""Review tests for add_noise, the counter-based PRNG and inject_hyperparams.

References: optax's documented add_noise (``σₜ² = eta / tᵞ`` with ``t = count + 1``) and
inject_hyperparams semantics, float64 arithmetic done here by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain.optim.additive import AddNoiseState

pytestmark = pytest.mark.filterwarnings("error")


def _noise_at_step(eta: float, gamma: float, step: int, n: int, key: int) -> torch.Tensor:
    """The noise add_noise adds to ``n`` zeros at update number ``step`` (1-based), in float64."""
    tx = ft.add_noise(eta, gamma, key=key)
    params = [torch.zeros(n, dtype=torch.float64)]
    state = tx.init(params)
    state = AddNoiseState(torch.tensor(step - 1, dtype=torch.int32), state.rng_key)
    updates, _ = tx.update(params, state)
    return updates[0]


# --- add_noise: the documented formula -------------------------------------------------------


@pytest.mark.parametrize(
    ("eta", "gamma", "step"), [(0.01, 0.55, 1), (0.3, 0.55, 7), (2.0, 1.5, 40)]
)
def test_noise_std_is_within_three_standard_errors_of_the_optax_formula(eta, gamma, step):
    n = 200_000
    z = _noise_at_step(eta, gamma, step, n, key=step)
    sigma = math.sqrt(eta / step**gamma)  # optax: sqrt(eta / (count + 1) ** gamma)
    std_err = sigma / math.sqrt(2 * n)  # standard error of a normal sample's std
    assert abs(z.std().item() - sigma) < 3 * std_err
    assert abs(z.mean().item()) < 3 * sigma / math.sqrt(n)


def test_noise_at_different_steps_and_leaves_is_uncorrelated():
    n = 100_000
    tx = ft.add_noise(1.0, 0.0, key=5)
    zeros = [torch.zeros(n, dtype=torch.float64)]
    (a,), state = tx.update(zeros, tx.init(zeros))
    (b,), _ = tx.update(zeros, state)  # the next step, from the split key
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 3 / math.sqrt(n)
    tx = ft.add_noise(1.0, 0.0, key=5)
    leaves = [torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)]
    u, _ = tx.update(leaves, tx.init(leaves))
    assert abs(torch.corrcoef(torch.stack(u))[0, 1].item()) < 3 / math.sqrt(n)


@settings(max_examples=25, deadline=None)
@given(key=st.integers(-(2**70), 2**70), n=st.integers(1, 17))
def test_same_key_same_noise_and_update_never_mutates_inputs(key, n):
    tx = ft.add_noise(0.1, 0.55, key=key)
    updates = {"w": torch.arange(n, dtype=torch.float32)}
    state = tx.init(updates)
    before = (updates["w"].clone(), state.count.clone(), state.rng_key.clone())
    u1, s1 = tx.update(updates, state)
    u2, s2 = tx.update(updates, state)
    assert torch.equal(u1["w"], u2["w"]) and torch.equal(s1.rng_key, s2.rng_key)
    assert torch.equal(updates["w"], before[0])
    assert torch.equal(state.count, before[1]) and torch.equal(state.rng_key, before[2])
    u3, _ = tx.update(updates, s1)
    assert not torch.equal(u1["w"], u3["w"])  # the key advances


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
)
def test_noise_keeps_dtype_and_empty_trees_pass_through(dtype):
    tx = ft.add_noise(0.01, 0.55, key=0)
    params = {"w": torch.zeros(4, dtype=dtype)}
    u, state = tx.update(params, tx.init(params))
    assert (
        u["w"].dtype == dtype
        and torch.isfinite(torch.view_as_real(u["w"].to(torch.complex128))).all()
    )
    empty, state = tx.update({}, tx.init({}))
    assert empty == {} and state.count.item() == 1


# --- add_noise: bad arguments ----------------------------------------------------------------


def test_shaped_tensor_eta_or_gamma_is_refused_naming_it():
    # Old code: accepted, then broadcast the scale against the leaves (or crashed in update).
    with pytest.raises(ValueError, match="eta must be a number or a 0-d tensor"):
        ft.add_noise(torch.tensor([0.01, 1.0]), 0.55)
    with pytest.raises(ValueError, match="gamma must be a number or a 0-d tensor"):
        ft.add_noise(0.01, torch.tensor([0.55]))


def test_schedule_eta_is_refused_at_construction_naming_it():
    # Old code: accepted, then "must be real number, not function" at the first update.
    with pytest.raises(TypeError, match=r"eta must be a number.*inject_hyperparams"):
        ft.add_noise(lambda count: 0.1, 0.55)


def test_injected_add_noise_takes_a_schedule_for_eta():
    tx = ft.inject_hyperparams(ft.add_noise)(eta=lambda count: 0.04, gamma=0.0, key=1)
    params = [torch.zeros(50_000, dtype=torch.float64)]
    u, state = tx.update(params, tx.init(params))
    assert abs(u[0].std().item() - 0.2) < 3 * 0.2 / math.sqrt(2 * 50_000)
    assert state.hyperparams["eta"].item() == pytest.approx(0.04)


# --- inject_hyperparams ----------------------------------------------------------------------


def test_misspelt_hyperparameter_in_state_is_refused_not_ignored():
    # Old code: the entry was silently dropped and the step ran with the old learning rate.
    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=0.1)
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    state.hyperparams["lr"] = torch.tensor(0.5)
    with pytest.raises(KeyError, match=r"\['lr'\].*learning_rate"):
        tx.update({"w": torch.ones(2)}, state, params)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_python_hyperparameter_is_refused_naming_it(bad):
    # Old code: accepted (the factory only ever saw tensors) and every update was NaN.
    with pytest.raises(ValueError, match="learning_rate must be finite"):
        ft.inject_hyperparams(ft.sgd)(learning_rate=bad)


def test_out_of_range_hyperparameters_are_refused_as_by_the_plain_factory():
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ft.add_noise(-1.0, 0.55)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ft.inject_hyperparams(ft.add_noise)(eta=-1.0, gamma=0.55)


def test_complex128_params_get_float64_hyperparameters():
    # Old code: float32 hyperparameters (complex leaves were ignored), so injected adam on
    # complex128 params differed from plain adam by ~1e-9.
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, dtype=torch.complex128, generator=gen)}
    injected = ft.inject_hyperparams(ft.adam)(learning_rate=0.1)
    plain = ft.adam(learning_rate=0.1)
    si, sp = injected.init(params), plain.init(params)
    assert all(v.dtype == torch.float64 for v in si.hyperparams.values())
    for _ in range(3):
        g = {"w": torch.randn(6, dtype=torch.complex128, generator=gen)}
        ui, si = injected.update(g, si, params)
        up, sp = plain.update(g, sp, params)
        torch.testing.assert_close(ui["w"], up["w"], rtol=1e-14, atol=1e-15)


_ALIASES = [
    (ft.sgd, {"learning_rate": 0.1, "momentum": 0.9}),
    (ft.adam, {"learning_rate": 0.01, "b1": 0.8}),
    (ft.adamw, {"learning_rate": 0.01, "weight_decay": 0.1}),
    (ft.rmsprop, {"learning_rate": 0.01}),
    (ft.adagrad, {"learning_rate": 0.1}),
    (ft.lamb, {"learning_rate": 0.01}),
    (ft.lion, {"learning_rate": 0.01}),
    (ft.radam, {"learning_rate": 0.01}),
    (ft.adamax, {"learning_rate": 0.01}),
    (ft.nadam, {"learning_rate": 0.01}),
    (ft.amsgrad, {"learning_rate": 0.01}),
    (ft.lars, {"learning_rate": 0.1}),
    (ft.sign_sgd, {"learning_rate": 0.1}),
    (ft.noisy_sgd, {"learning_rate": 0.1, "eta": 0.02, "key": 3}),
]


@pytest.mark.parametrize(("factory", "kwargs"), _ALIASES, ids=lambda x: getattr(x, "__name__", ""))
def test_injected_alias_equals_plain_alias_step_for_step_in_float64(factory, kwargs):
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 4, dtype=torch.float64, generator=gen)}
    injected, plain = ft.inject_hyperparams(factory)(**kwargs), factory(**kwargs)
    si, sp = injected.init(params), plain.init(params)
    for _ in range(4):
        g = {"w": torch.randn(3, 4, dtype=torch.float64, generator=gen)}
        ui, si = injected.update(g, si, params)
        up, sp = plain.update(g, sp, params)
        torch.testing.assert_close(ui["w"], up["w"], rtol=1e-12, atol=1e-15)
        params = {"w": params["w"] + up["w"]}
