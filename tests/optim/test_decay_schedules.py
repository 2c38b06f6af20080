"""Decay rates take numbers and 0-d tensors; a schedule is refused where it is built, by name.

Before, a schedule given for ``b1``, ``b2``, ``decay``, ``momentum``, ``rho`` or ``beta`` was
accepted and failed at the first update inside torch's arithmetic ("unsupported operand
type(s) for -: 'int' and 'function'"), naming nothing. Only AdEMAMix's ``b3`` is a schedule in
optax; ``inject_hyperparams`` schedules any of them.
"""

import pytest
import torch

import functrain as ft

SCHED = ft.linear_schedule(0.9, 0.5, 10)

FACTORIES = {
    "b1": [ft.adam, ft.adamw, ft.nadam, ft.lion, ft.adan, ft.adabelief, ft.yogi, ft.novograd],
    "b2": [ft.adam, ft.amsgrad, ft.lion, ft.adabelief, ft.schedule_free_adamw],
    "decay": [ft.rmsprop, ft.ema],
    "momentum": [ft.sgd],
    "rho": [ft.adadelta],
    "beta": [ft.muon, ft.signum],
}
CASES = [(name, f) for name, fs in FACTORIES.items() for f in fs]


def _build(factory, name, value):
    return factory(value) if factory is ft.ema else factory(1e-3, **{name: value})


@pytest.mark.parametrize(("name", "factory"), CASES, ids=[f"{f.__name__}-{n}" for n, f in CASES])
def test_schedule_for_a_decay_is_refused_naming_it(name, factory):
    with pytest.raises(
        TypeError, match=rf"^{name} must be a number or a 0-d tensor, not a schedule"
    ):
        _build(factory, name, SCHED)
    # A number and a 0-d tensor are still fine, and inject_hyperparams schedules it.
    params = {"w": torch.ones(3, 2)}
    for value in (0.5, torch.tensor(0.5)):
        tx = _build(factory, name, value)
        tx.update(params, tx.init(params), params)
    if factory is not ft.ema:
        tx = ft.inject_hyperparams(factory)(learning_rate=1e-3, **{name: SCHED})
        _, state = tx.update(params, tx.init(params), params)
        assert float(state.hyperparams[name]) == pytest.approx(0.9)


def test_ademamix_b3_takes_a_schedule():
    params = {"w": torch.ones(3, 2)}
    tx = ft.ademamix(1e-3, b3=SCHED)
    updates, _ = tx.update(params, tx.init(params), params)
    assert torch.isfinite(updates["w"]).all()
