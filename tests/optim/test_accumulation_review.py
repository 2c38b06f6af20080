"""Review regressions for ``trace``, ``ema``, ``inject_hyperparams`` and adafactor.

References are float64 transcriptions of optax's rules: ``trace`` (``t ← g + decay·t``, the
Nesterov update ``g + decay·t_new``), ``ema`` (``e ← (1 − decay)·g + decay·e``, debiased by
``1 − decayᵗ`` with ``t`` the count after increment), ``scale_by_factored_rms`` and the
adafactor chain of ``optax/_src/alias.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

STEPS = 12


def _grads(dtype: torch.dtype, shape=(6,), steps: int = STEPS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(steps)]


def _dtypes(state) -> list[torch.dtype]:
    return [x.dtype for x in ft.tree.leaves(state)]


# --- trace and ema: the state keeps its init dtype -----------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
def test_trace_of_bfloat16_grads_keeps_a_float32_trace(nesterov: bool) -> None:
    """Old code returned a bfloat16 trace after one step (a recompile, 16 bits lost): the
    float64 recurrence of the bfloat16 gradients is what a float32 trace holds."""
    decay = 0.9
    params = [torch.zeros(6)]
    tx = ft.trace(decay, nesterov)
    state = tx.init(params)
    t = torch.zeros(6, dtype=torch.float64)
    for g in _grads(torch.bfloat16):
        (u,), state = tx.update([g], state)
        t = g.double() + decay * t
        want = g.double() + decay * t if nesterov else t
        assert u.dtype == torch.bfloat16
        # One rounding of the float32 result to bfloat16.
        torch.testing.assert_close(u.double(), want, rtol=2**-8, atol=1e-6)
    assert _dtypes(state) == [torch.float32]
    torch.testing.assert_close(state.trace[0].double(), t, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("debias", [False, True])
def test_ema_of_bfloat16_grads_keeps_a_float32_average(debias: bool) -> None:
    decay = 0.8
    params = [torch.zeros(6)]
    tx = ft.ema(decay, debias=debias)
    state = tx.init(params)
    e = torch.zeros(6, dtype=torch.float64)
    for step, g in enumerate(_grads(torch.bfloat16), start=1):
        (u,), state = tx.update([g], state)
        e = (1 - decay) * g.double() + decay * e
        want = e / (1 - decay**step) if debias else e
        assert u.dtype == torch.bfloat16
        torch.testing.assert_close(u.double(), want, rtol=2**-8, atol=1e-6)
    assert _dtypes(state) == [torch.int32, torch.float32]
    torch.testing.assert_close(state.ema[0].double(), e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [lambda: ft.trace(0.9, accumulator_dtype=torch.float64), lambda: ft.ema(0.9, debias=False)],
    ids=["trace", "ema"],
)
def test_wide_accumulator_of_float32_grads_accumulates_in_its_own_precision(make) -> None:
    """A float64 accumulator of float32 gradients (float64 ``accumulator_dtype`` for trace,
    float64 params for ema): old code rounded the stored value to float32 every step."""
    tx = make()
    is_trace = isinstance(tx.init([torch.zeros(1)]), ft.TraceState)
    state = tx.init([torch.zeros(6, dtype=torch.float32 if is_trace else torch.float64)])
    acc = torch.zeros(6, dtype=torch.float64)
    for g in _grads(torch.float32, seed=1):
        (u,), state = tx.update([g], state)
        acc = g.double() + 0.9 * acc if is_trace else 0.1 * g.double() + 0.9 * acc
        assert u.dtype == torch.float32
        torch.testing.assert_close(u, acc.float(), rtol=0, atol=0)  # one rounding of acc
    stored = state.trace[0] if is_trace else state.ema[0]
    assert stored.dtype == torch.float64
    torch.testing.assert_close(stored, acc, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("make", [ft.trace, ft.ema], ids=["trace", "ema"])
def test_integer_or_non_dtype_accumulator_dtype_is_refused(make) -> None:
    """Old code accepted ``torch.int32``: ``trace(0.9, accumulator_dtype=int32)`` stored
    ``0.5`` as 0 and silently had no momentum."""
    with pytest.raises(ValueError, match="accumulator_dtype must be a floating-point dtype"):
        make(0.9, accumulator_dtype=torch.int32)
    with pytest.raises(TypeError, match=r"accumulator_dtype must be a torch\.dtype"):
        make(0.9, accumulator_dtype="float32")


def test_trace_refuses_a_shaped_decay() -> None:
    """Old code broadcast a 1-d decay into the leaves (or failed deep in the update)."""
    with pytest.raises(ValueError, match=r"decay must be a number or a 0-d tensor.*\(2,\)"):
        ft.trace(torch.tensor([0.5, 0.5]))


@settings(max_examples=30, deadline=None)
@given(
    decay=st.floats(0.0, 0.99),
    nesterov=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_trace_tensor_and_float_decay_give_the_reference(
    decay: float, nesterov: bool, seed: int
) -> None:
    grads = _grads(torch.float64, (3, 2), steps=5, seed=seed)
    runs = []
    for d in (decay, torch.tensor(decay, dtype=torch.float64)):
        tx = ft.trace(d, nesterov)
        state = tx.init([torch.zeros(3, 2, dtype=torch.float64)])
        outs = []
        for g in grads:
            before = g.clone()
            (u,), state = tx.update([g], state)
            assert torch.equal(g, before)  # never mutated
            outs.append(u)
        runs.append(outs)
    t = torch.zeros(3, 2, dtype=torch.float64)
    for i, g in enumerate(grads):
        t = g + decay * t
        want = g + decay * t if nesterov else t
        for outs in runs:
            torch.testing.assert_close(outs[i], want, rtol=1e-13, atol=1e-15)


# --- scale_by_factored_rms: the statistics keep the params' dtypes ------------------------


def test_factored_state_of_float64_params_stays_float64_under_bfloat16_grads() -> None:
    """Old code made the (1,) placeholders float32 (from the gradients) after one step, so the
    state's dtypes changed between steps."""
    params = {"w": torch.zeros(4, 5, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}
    tx = ft.scale_by_factored_rms(min_dim_size_to_factor=2)
    state = tx.init(params)
    dtypes = _dtypes(state)
    gen = torch.Generator().manual_seed(0)
    v = torch.zeros(5, dtype=torch.float64)
    for step in range(4):
        grads = {k: torch.randn(p.shape, generator=gen).bfloat16() for k, p in params.items()}
        u, state = tx.update(grads, state, params)
        b = 1 - (step + 1.0) ** -0.8
        v = b * v + (1 - b) * (grads["b"].double() ** 2 + 1e-30)
        assert u["b"].dtype == torch.bfloat16
    assert _dtypes(state) == dtypes
    torch.testing.assert_close(state.v["b"], v, rtol=1e-6, atol=0)  # the decay is float32


def test_factored_state_of_float32_params_stays_float32_under_float64_grads() -> None:
    """Old code widened the statistics to the gradients' float64."""
    params = {"w": torch.zeros(4, 5), "b": torch.zeros(5)}
    tx = ft.scale_by_factored_rms(min_dim_size_to_factor=2)
    state = tx.init(params)
    grads = {k: torch.randn(p.shape, dtype=torch.float64) for k, p in params.items()}
    u, state = tx.update(grads, state, params)
    assert _dtypes(state) == [torch.int32] + [torch.float32] * 6
    assert all(x.dtype == torch.float64 for x in ft.tree.leaves(u))


# --- adafactor against a float64 transcription of optax's chain ---------------------------


def _adafactor_reference(params, grads, *, lr, min_dim, decay_rate, offset, clip, momentum, wd):
    """optax.adafactor: factored rms → clip_by_block_rms → ×lr → ×max(rms(p), 1e-3) →
    ema(momentum, debias=False) → + wd·p → ×(−1), by hand in float64, parameters fixed."""
    eps = 1e-30
    stats: dict = {}
    mom = {k: torch.zeros_like(p) for k, p in params.items()}
    outs = []
    for step, g in enumerate(grads):
        t = torch.tensor(step - offset, dtype=torch.float32) + 1.0
        beta = float(1.0 - t ** (-decay_rate))  # optax's float32 schedule
        out = {}
        for k, p in params.items():
            x = g[k]
            shape = tuple(x.shape)
            order = sorted(range(len(shape)), key=lambda d: shape[d])
            factored = len(shape) >= 2 and shape[order[-2]] >= min_dim
            sq = x * x + eps
            if factored:
                d1, d0 = order[-2], order[-1]
                row, col = stats.get(k, (0.0, 0.0))
                row = beta * row + (1 - beta) * sq.mean(d0)
                col = beta * col + (1 - beta) * sq.mean(d1)
                stats[k] = (row, col)
                red = d1 - 1 if d1 > d0 else d1
                rf = (row / row.mean(red, keepdim=True)) ** -0.5
                u = x * rf.unsqueeze(d0) * (col**-0.5).unsqueeze(d1)
            else:
                v = beta * stats.get(k, 0.0) + (1 - beta) * sq
                stats[k] = v
                u = x * v**-0.5
            u = u / max(1.0, math.sqrt(float((u * u).mean())) / clip)
            u = u * lr * max(math.sqrt(float((p * p).mean())), 1e-3)
            mom[k] = (1 - momentum) * u + momentum * mom[k]
            out[k] = -(mom[k] + wd * p)
        outs.append(out)
    return outs


@pytest.mark.parametrize("min_dim, offset", [(3, 0), (5, 2), (128, 0)])
def test_adafactor_matches_optax_chain_by_hand(min_dim: int, offset: int) -> None:
    gen = torch.Generator().manual_seed(7)
    shapes = {"mat": (4, 6), "tall": (7, 3), "cube": (3, 5, 4), "vec": (6,), "tiny": (3,)}
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    params["tiny"] = params["tiny"] * 1e-6  # below min_scale: the 1e-3 floor applies
    grads = [
        {k: 3 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
        for _ in range(6)
    ]
    kw = dict(lr=0.05, decay_rate=0.8, clip=1.0, momentum=0.7, wd=0.01)
    tx = ft.adafactor(
        kw["lr"],
        min_dim_size_to_factor=min_dim,
        decay_offset=offset,
        clipping_threshold=kw["clip"],
        momentum=kw["momentum"],
        dtype_momentum=torch.float64,
        weight_decay_rate=kw["wd"],
    )
    want = _adafactor_reference(params, grads, min_dim=min_dim, offset=offset, **kw)
    state = tx.init(params)
    for g, expected in zip(grads, want):
        u, state = tx.update(g, state, params)
        testing.assert_trees_all_close(u, expected, rtol=1e-6, atol=1e-14)


# --- inject_hyperparams ------------------------------------------------------------------


def test_inject_hyperparams_refuses_an_integer_hyperparam_dtype() -> None:
    """Old code stored ``learning_rate=0.1`` as int32 0: training silently did nothing."""
    with pytest.raises(ValueError, match="hyperparam_dtype must be a floating-point dtype"):
        ft.inject_hyperparams(ft.sgd, hyperparam_dtype=torch.int32)
    with pytest.raises(TypeError, match=r"hyperparam_dtype must be a torch\.dtype"):
        ft.inject_hyperparams(ft.sgd, hyperparam_dtype="float32")


def test_inject_hyperparams_unknown_argument_names_it_and_the_factory() -> None:
    """Old code said only "got an unexpected keyword argument 'lr'", naming no factory."""
    with pytest.raises(
        TypeError, match=r"inject_hyperparams\(sgd\).*'lr'.*takes \['learning_rate'"
    ):
        ft.inject_hyperparams(ft.sgd)(learning_rate=0.1, lr=0.1)


def test_inject_hyperparams_schedule_keeps_its_init_dtype_without_params() -> None:
    """float64 params, float32 updates given without params: old code recorded the schedule's
    value as float32 after one step (float64 at init), changing the state's dtypes."""
    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=lambda c: 0.1 / (c + 1))
    state = tx.init([torch.zeros(3, dtype=torch.float64)])
    assert state.hyperparams["learning_rate"].dtype == torch.float64
    for step in range(3):
        (u,), state = tx.update([torch.ones(3)], state)
        assert state.hyperparams["learning_rate"].dtype == torch.float64
        # Evaluated at the count before the increment, as optax.
        torch.testing.assert_close(u, torch.full((3,), -0.1 / (step + 1)))


@pytest.mark.parametrize("factory", [ft.adam, ft.sgd, ft.rmsprop, ft.lion])
def test_inject_hyperparams_float_and_tensor_arguments_agree(factory) -> None:
    """A Python float and a 0-d tensor of the params' dtype are one hyperparameter."""
    params = {"w": torch.zeros(4, dtype=torch.float64)}
    kw = {"learning_rate": 0.03}
    if factory is ft.sgd:
        kw["momentum"] = 0.9
    tx_f = ft.inject_hyperparams(factory)(**kw)
    tx_t = ft.inject_hyperparams(factory)(
        **{k: torch.tensor(v, dtype=torch.float64) for k, v in kw.items()}
    )
    plain = factory(**kw)
    states = [tx.init(params) for tx in (tx_f, tx_t, plain)]
    for g in _grads(torch.float64, (4,), steps=5, seed=2):
        outs = []
        for i, tx in enumerate((tx_f, tx_t, plain)):
            u, states[i] = tx.update({"w": g}, states[i], params)
            outs.append(u)
        testing.assert_trees_all_close(outs[0], outs[1], rtol=0, atol=0)
        testing.assert_trees_all_close(outs[0], outs[2], rtol=1e-14, atol=1e-16)
