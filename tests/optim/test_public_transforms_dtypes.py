"""dtype stability of every public transform (``_public_transforms.CASES``), over three steps on
a matrix, a vector and a 0-d scalar.

The rule (optax's, and functrain's): updates come back in the dtype of the incoming gradients,
leaf by leaf; the state follows the params (or an explicit ``*_dtype``), with float32 allowed
for half-precision params where the transform documents it; counters are integers, flags bool;
nothing silently becomes float64.

a. float32, bfloat16 and float16 params and gradients;
b. float32 runs under ``torch.set_default_dtype(float64)`` (and float16/bfloat16, which torch
   2.x also accepts): the same dtypes, and bit for bit the numbers of a float32-default run;
c. trees mixing float32, bfloat16 and float16 leaves;
d. float16/bfloat16 runs stay finite for gradients of about 100 (squares fit float16, their sums
   do not) and about 1e-4 (their squares underflow float16);
e. gradients of another dtype than the params (bfloat16 of float32, float32 of float64).

Then focused regressions for what the sweep found, each against a float64 or float32 reference,
and a check that the checks catch planted defects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from _public_transforms import CASES, Case, base_name, example_grads, example_params
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
import functrain.contrib

STEPS = 3
HALF = (torch.bfloat16, torch.float16)
INTEGERS = {torch.int32, torch.int64, torch.uint8, torch.bool}

# Public names (base names of the cases) that keep float32 state leaves for half-precision
# params, and the public names whose docstrings document it.
HALF_STATE_FLOAT32: dict[str, tuple[str, ...]] = {
    "MultiSteps": ("MultiSteps",),  # acc_grads: at least float32
    "acprop": ("scale_by_acprop",),  # float16 nu
    "scale_by_acprop": ("scale_by_acprop",),
    "adafactor": ("scale_by_factored_rms",),
    "scale_by_factored_rms": ("scale_by_factored_rms",),
    "dadapt_adamw": ("dadapt_adamw",),
    "prodigy": ("prodigy",),
    "dog": ("scale_by_dog",),
    "scale_by_dog": ("scale_by_dog",),
    "dowg": ("scale_by_dog",),  # "Differences from optax: as scale_by_dog"
    "scale_by_dowg": ("scale_by_dog",),
    "scale_by_distance_over_gradients": ("scale_by_distance_over_gradients",),
    "inject_hyperparams": ("inject_hyperparams",),
    "inject_stateful_hyperparams": ("inject_stateful_hyperparams",),
    "lbfgs": ("scale_by_lbfgs", "scale_by_zoom_linesearch"),
    "scale_by_lbfgs": ("scale_by_lbfgs",),
    "scale_by_zoom_linesearch": ("scale_by_zoom_linesearch",),
    "scale_by_backtracking_linesearch": ("scale_by_backtracking_linesearch",),
    "mechanize": ("mechanize",),
    "novograd": ("scale_by_novograd",),
    "scale_by_novograd": ("scale_by_novograd",),
}

# (e) Updates that are not in the gradients' dtype when the params have another one.
UPDATES_IN_PARAMS_DTYPE = {
    "hutchinson_estimator_diag_hessian": "ignores the incoming updates: its output is a "
    "Hessian diagonal at the params, in their dtype",
    "sam": "the outer step's update is cache − params + u, a difference of params (in their "
    "dtype, as optax's; rounded to the gradients' dtype it would not restore the weights)",
    "schedule_free": "the update is new_params − params (optax's form), in the params' dtype",
    "schedule_free_adamw": "schedule_free: the update is new_params − params",
    "schedule_free_sgd": "schedule_free: the update is new_params − params",
}
# (e) State leaves in the gradients' dtype.
STATE_IN_UPDATES_DTYPE = {
    "monitor": "the state holds measures of the updates, in their dtype",
    "snapshot": "the state holds a measure of the updates, in its dtype",
}
# (e) State leaves in an explicit ``*_dtype`` argument whose default is float32 (optax's).
FLOAT32_DTYPE_ARGUMENT = {
    "adafactor": "dtype_momentum=float32: the momentum buffer",
    "scale_by_distance_over_gradients": "param_dtype=float32: the initial params",
}
# (d) Non-finite updates that are the algorithm's own value, out of float16's range.
NOT_FINITE_FLOAT16 = {
    "scale_by_stddev[bias_correction]": "the first bias-corrected step divides by √eps "
    "exactly (the variance of one sample is 0): 1e4·g, above 65504 for |g| > 6.5",
}
# (d) Non-finite state leaves that hold the test loss's own overflow.
LOSS_OVERFLOWS_FLOAT16 = {
    "scale_by_backtracking_linesearch": "tries steps of about 100, where the float16 quadratic "
    "loss (evaluated by value_fn) overflows: its value and decrease_error are inf",
}
# (b) Values that depend on the default dtype, by design.
DEFAULT_DTYPE_VALUES = {
    "inject_stateful_hyperparams": "its wrapped schedule computes in the default dtype, as "
    "every schedule does for an integer count (functrain.optim.schedules)",
    "schedule_free_adamw[warmup]": "its warmup schedule computes in the default dtype, as "
    "every schedule does for an integer count (functrain.optim.schedules)",
}


def _public(name: str) -> Any:
    return getattr(ft, name) if hasattr(ft, name) else getattr(functrain.contrib, name)


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    paths, leaves, _ = ft.tree.flatten_with_paths(tree)
    return [(ft.tree.path_str(p), x) for p, x in zip(paths, leaves) if isinstance(x, torch.Tensor)]


def _grads_dtypes(grads: dict[str, torch.Tensor], path: str) -> set[torch.dtype]:
    """The dtype of the gradient a path of the updates belongs to (lookahead's are under
    ``.fast``); any gradient's for an update that is not per leaf (measure_with_ema's)."""
    keys = [k for k in grads if path.endswith(f"[{k!r}]")] or list(grads)
    return {grads[k].dtype for k in keys}


def _tree(values: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
    return {k: v.to(dtypes[k]) for k, v in values.items()}


def _steps(
    case: Case,
    dtypes: dict[str, torch.dtype],
    grad_dtypes: dict[str, torch.dtype] | None = None,
    grad_scale: float | None = None,
) -> Iterator[tuple[Any, Any, Any, Any]]:
    """Yields ``(params, grads, updates, new_state)`` of each step; ``grad_scale`` gives
    gradients ``±scale·(1 + 0.1·noise)`` (all about that magnitude) and params about 1, which
    the updates then do not move (those of the transforms without a learning rate are about
    ``scale`` too: applied, they would take the params out of range)."""
    tx = case.build()
    params = example_params(torch.float32)
    raw = example_grads(STEPS, torch.float32)
    if grad_scale is not None:
        params = {k: torch.sign(v) + 0.1 * v for k, v in params.items()}
        raw = [{k: grad_scale * (torch.sign(v) + 0.1 * v) for k, v in g.items()} for g in raw]
    params = _tree(params, dtypes)
    if case.lift_params is not None:
        params = case.lift_params(params)
    state = tx.init(params)
    for g in raw:
        grads = _tree(g, grad_dtypes or dtypes)
        updates, state = tx.update(grads, state, params, **case.update_kwargs(params, grads))
        yield params, grads, updates, state
        if grad_scale is None and ft.tree.structure(updates) == ft.tree.structure(params):
            params = ft.apply_updates(params, updates)


def _update_dtype_errors(grads: Any, updates: Any) -> list[str]:
    return [
        f"update {p}: {u.dtype}, gradients {_grads_dtypes(grads, p)}"
        for p, u in _leaves(updates)
        if u.dtype not in _grads_dtypes(grads, p)
    ]


def _state_dtype_errors(
    state: Any, dtypes: dict[str, torch.dtype], extra: set[torch.dtype]
) -> list[str]:
    """A state leaf under a params key (``[0].mu['b']``) in that leaf's dtype, one under none
    (a count, a global scalar, a flat buffer) in any of them; ``extra`` and integers allowed."""
    errors = []
    for p, x in _leaves(state):
        own = {d for k, d in dtypes.items() if f"[{k!r}]" in p} or set(dtypes.values())
        if x.dtype not in own | extra | INTEGERS:
            errors.append(f"state {p}: {x.dtype}, params {own}")
    return errors


def _check_dtypes(
    case: Case, dtypes: dict[str, torch.dtype], extra_state: set[torch.dtype] = frozenset()
) -> None:
    for _, grads, updates, state in _steps(case, dtypes):
        errors = _update_dtype_errors(grads, updates)
        errors += _state_dtype_errors(state, dtypes, set(extra_state))
        assert not errors, errors


def _same(dtype: torch.dtype) -> dict[str, torch.dtype]:
    return dict.fromkeys(("w", "b", "s"), dtype)


def _float32_state_leaves(case: Case, dtype: torch.dtype) -> list[str]:
    return [
        p
        for _, _, _, state in _steps(case, _same(dtype))
        for p, x in _leaves(state)
        if x.dtype == torch.float32
    ]


NAMES = sorted(CASES)


# ---- a. float32, bfloat16, float16 ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("name", NAMES)
def test_updates_in_the_gradients_dtype_and_state_in_the_params(
    name: str, dtype: torch.dtype
) -> None:
    documented = dtype in HALF and base_name(name) in HALF_STATE_FLOAT32
    _check_dtypes(CASES[name], _same(dtype), {torch.float32} if documented else set())


def test_float32_state_of_half_params_is_listed_exactly() -> None:
    seen = {base_name(n) for n in NAMES for d in HALF if _float32_state_leaves(CASES[n], d)}
    assert seen == set(HALF_STATE_FLOAT32), (
        seen - set(HALF_STATE_FLOAT32),
        set(HALF_STATE_FLOAT32) - seen,
    )


@pytest.mark.parametrize("name", sorted(HALF_STATE_FLOAT32))
def test_float32_state_of_half_params_is_documented(name: str) -> None:
    for documenting in HALF_STATE_FLOAT32[name]:
        assert "float32" in (_public(documenting).__doc__ or ""), documenting


# ---- b. the default dtype -------------------------------------------------------------------


def _run_float32(case: Case, default: torch.dtype) -> list[tuple[Any, Any]]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        return [(u, s) for _, _, u, s in _steps(case, _same(torch.float32))]
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize(
    "default", [torch.float64, *HALF], ids=["default-f64", "default-bf16", "default-f16"]
)
@pytest.mark.parametrize("name", NAMES)
def test_the_default_dtype_changes_nothing(name: str, default: torch.dtype) -> None:
    # ``torch.tensor(0.1)`` or ``torch.zeros(())`` made in the default dtype would promote a
    # float32 state or update to float64 (or round a hyperparameter to float16).
    _assert_default_dtype_changes_nothing(CASES[name], default, name not in DEFAULT_DTYPE_VALUES)


def _assert_default_dtype_changes_nothing(
    case: Case, default: torch.dtype, same_values: bool = True
) -> None:
    expected = _run_float32(case, torch.float32)
    got = _run_float32(case, default)
    for (u0, s0), (u1, s1) in zip(expected, got, strict=True):
        for (p, a), (_, b) in zip(_leaves((u0, s0)), _leaves((u1, s1)), strict=True):
            assert a.dtype == b.dtype, (p, a.dtype, b.dtype)
            if same_values:
                assert torch.equal(a, b) or (
                    torch.equal(a.isnan(), b.isnan())
                    and torch.equal(a.nan_to_num(), b.nan_to_num())
                ), p


def test_a_schedule_under_a_float64_default_keeps_float32_updates() -> None:
    # Schedules give default-dtype values for an integer count (documented): float64 here.
    schedule = ft.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10)
    builds = {
        "adam": lambda: ft.adam(schedule),
        "inject_hyperparams": lambda: ft.inject_hyperparams(ft.sgd)(
            learning_rate=schedule, momentum=0.9
        ),
        "scale_by_schedule": lambda: ft.scale_by_schedule(schedule),
        "add_decayed_weights": lambda: ft.add_decayed_weights(schedule),
    }
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert schedule(torch.tensor(1)).dtype == torch.float64
        for name, build in builds.items():
            _check_dtypes(Case(name, build), _same(torch.float32))
    finally:
        torch.set_default_dtype(previous)


# ---- c. mixed trees -------------------------------------------------------------------------

MIXED = {"w": torch.float32, "b": torch.bfloat16, "s": torch.float16}


@pytest.mark.parametrize("name", NAMES)
def test_mixed_trees_keep_each_leafs_dtype(name: str) -> None:
    documented = base_name(name) in HALF_STATE_FLOAT32
    _check_dtypes(CASES[name], MIXED, {torch.float32} if documented else set())


# ---- d. finite half-precision runs ----------------------------------------------------------


@pytest.mark.parametrize("scale", [100.0, 1e-4], ids=["large", "small"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_runs_stay_finite(name: str, dtype: torch.dtype, scale: float) -> None:
    if name in NOT_FINITE_FLOAT16 and dtype == torch.float16 and scale > 1:
        pytest.skip(NOT_FINITE_FLOAT16[name])
    _assert_finite(CASES[name], dtype, scale, with_state=name not in LOSS_OVERFLOWS_FLOAT16)


def _assert_finite(case: Case, dtype: torch.dtype, scale: float, with_state: bool = True) -> None:
    for _, _, updates, state in _steps(case, _same(dtype), grad_scale=scale):
        leaves = _leaves((updates, state) if with_state else updates)
        bad = [p for p, x in leaves if x.is_floating_point() and not x.isfinite().all()]
        assert not bad, bad


# ---- e. gradients of another dtype than the params ------------------------------------------


@pytest.mark.parametrize(
    ("params_dtype", "grads_dtype"),
    [(torch.float32, torch.bfloat16), (torch.float64, torch.float32)],
    ids=["f32-params-bf16-grads", "f64-params-f32-grads"],
)
@pytest.mark.parametrize("name", NAMES)
def test_gradients_of_another_dtype(
    name: str, params_dtype: torch.dtype, grads_dtype: torch.dtype
) -> None:
    base = base_name(name)
    extra = {grads_dtype} if base in STATE_IN_UPDATES_DTYPE else set()
    extra |= {torch.float32} if base in FLOAT32_DTYPE_ARGUMENT else set()
    for params, grads, updates, state in _steps(
        CASES[name], _same(params_dtype), _same(grads_dtype)
    ):
        errors = _state_dtype_errors(state, _same(params_dtype), extra)
        if base in UPDATES_IN_PARAMS_DTYPE:
            errors += [
                f"update {p}: {u.dtype}" for p, u in _leaves(updates) if u.dtype != params_dtype
            ]
        else:
            errors += _update_dtype_errors(grads, updates)
        assert not errors, errors


def test_exemptions_name_cases() -> None:
    bases = {base_name(n) for n in CASES}
    for table in (
        HALF_STATE_FLOAT32,
        UPDATES_IN_PARAMS_DTYPE,
        STATE_IN_UPDATES_DTYPE,
        FLOAT32_DTYPE_ARGUMENT,
    ):
        assert set(table) <= bases
    for table in (NOT_FINITE_FLOAT16, LOSS_OVERFLOWS_FLOAT16, DEFAULT_DTYPE_VALUES):
        assert set(table) <= set(CASES)


# ---- regressions: what the sweep found -------------------------------------------------------


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_first_bias_corrected_stddev_step_is_not_nan(eps_in_sqrt: bool) -> None:
    # ν̂ − μ̂² = g² − g² rounded to −1 ulp for some leaves: the update was NaN (as optax's).
    g = example_grads(1, torch.float32)[0]["w"]
    eps = 1e-8
    for tx in (
        ft.scale_by_stddev(eps=eps, eps_in_sqrt=eps_in_sqrt, bias_correction=True),
        ft.rmsprop(-1.0, eps=eps, eps_in_sqrt=eps_in_sqrt, centered=True, bias_correction=True),
    ):
        (u,), _ = tx.update([g], tx.init([torch.zeros_like(g)]), [torch.zeros_like(g)])
        # The exact variance is 0, so u = g / √eps (or g / eps); rounding only adds to it.
        exact = _f64(g) / (eps**0.5 if eps_in_sqrt else eps)
        assert u.isfinite().all()
        assert torch.equal(u.sign(), g.sign())
        assert (_f64(u).abs() <= exact.abs() * (1 + 1e-6)).all()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=6),
    st.integers(1, 4),
)
def test_a_centred_rms_is_never_nan(values: list[float], repeats: int) -> None:
    # The variance of a constant gradient tends to 0 and rounds to either side of it.
    g = torch.tensor(values, dtype=torch.float32)
    tx = ft.scale_by_stddev(bias_correction=True)
    state = tx.init([g])
    for _ in range(repeats):
        (u,), state = tx.update([g], state)
        assert not u.isnan().any()


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_rms_of_small_float16_gradients(centered: bool, bias_correction: bool) -> None:
    # In float16 eps = 1e-8 is 0 and (1 − decay)·g² of g = 1e-4 is 0: the update was g / 0.
    g = torch.tensor([1e-4, -3e-4, 2e-5, 0.0], dtype=torch.float16)
    make = ft.scale_by_stddev if centered else ft.scale_by_rms
    tx = make(decay=0.9, eps=1e-8, bias_correction=bias_correction)
    (u,), state = tx.update([g], tx.init([torch.zeros_like(g)]))
    x, c = _f64(g), 0.1 if bias_correction else 1.0
    nu, mu = 0.1 * x**2 / c, 0.1 * x / c
    expected = x / torch.sqrt((nu - mu**2 if centered else nu) + 1e-8)
    assert u.dtype == torch.float16 and state.nu[0].dtype == torch.float16
    torch.testing.assert_close(_f64(u), expected, rtol=1e-3, atol=0)


def test_acprop_of_small_float16_gradients() -> None:
    # nu = 0.001·g² underflowed float16 and the next step divided by eps = 1e-16: inf.
    g1 = torch.tensor([1e-3, -2e-3, 5e-4], dtype=torch.float16)
    g2 = torch.tensor([2e-3, 1e-3, -1e-3], dtype=torch.float16)
    tx = ft.scale_by_acprop()
    state = tx.init([torch.zeros_like(g1)])
    (u1,), state = tx.update([g1], state)
    (u2,), state = tx.update([g2], state)
    # The docstring's rule in float64: v̂ = 1 first, then nu / (1 − b2) of the first step.
    nu = 0.001 * _f64(g1) ** 2 + 1e-16
    expected2 = _f64(g2) / (torch.sqrt(nu / 0.001) + 1e-16)
    torch.testing.assert_close(_f64(u1), _f64(g1) / (1 + 1e-16), rtol=1e-3, atol=0)
    torch.testing.assert_close(_f64(u2), expected2, rtol=1e-3, atol=0)
    assert u2.dtype == torch.float16 and state.nu[0].dtype == torch.float32
    bf16 = ft.scale_by_acprop().init([torch.zeros(2, dtype=torch.bfloat16)])
    assert bf16.nu[0].dtype == torch.bfloat16  # bfloat16 has float32's range


@pytest.mark.parametrize("name", ["scale_by_trust_ratio", "fromage"])
def test_trust_ratio_above_float16s_range(name: str) -> None:
    # ‖p‖ / ‖g‖ = 5 / 5e-5 = 1e5 was inf in float16, and so was the update.
    p = torch.tensor([3.0, 4.0], dtype=torch.float16)
    g = torch.tensor([3e-5, -4e-5], dtype=torch.float16)
    tx = ft.scale_by_trust_ratio() if name == "scale_by_trust_ratio" else ft.fromage(0.5)
    (u,), _ = tx.update([g], tx.init([p]), [p])
    ratio = _f64(g) * torch.linalg.vector_norm(_f64(p)) / torch.linalg.vector_norm(_f64(g))
    if name == "fromage":  # −lr·m·ratio·g + (m − 1)·p with m = 1/√(1 + lr²)
        m = 1 / (1 + 0.5**2) ** 0.5
        ratio = -0.5 * m * ratio + (m - 1) * _f64(p)
    assert u.dtype == torch.float16
    torch.testing.assert_close(_f64(u), ratio, rtol=2e-3, atol=0)


@pytest.mark.parametrize("block", ["norm", "rms"])
def test_param_block_statistics_of_large_float16_params(block: str) -> None:
    # |p|² of a float16 entry above 256 was inf: rms(p) and the update were inf.
    p = torch.tensor([300.0, -300.0, 400.0, 0.0], dtype=torch.float16)
    g = torch.tensor([0.01, -0.02, 0.5, 1.0], dtype=torch.float16)
    tx = ft.scale_by_param_block_norm() if block == "norm" else ft.scale_by_param_block_rms()
    (u,), _ = tx.update([g], tx.init([p]), [p])
    x = _f64(p)
    stat = torch.linalg.vector_norm(x) if block == "norm" else (x**2).mean().sqrt()
    torch.testing.assert_close(_f64(u), _f64(g) * stat, rtol=1e-3, atol=0)
    if block == "rms":  # adafactor's multiply_by_parameter_scale
        tx = ft.adafactor(1e-2)
        (u,), _ = tx.update([g], tx.init([p]), [p])
        assert u.isfinite().all()


def _trajectory(
    tx: ft.GradientTransformation, params: Any, grads: list[Any], applied: torch.dtype
) -> list[Any]:
    """``(updates, state)`` of each step; the params move by the updates rounded to
    ``applied`` (so that a run and its reference see the same params)."""
    state, out = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params)
        out.append((u, state))
        params = ft.apply_updates(
            params, ft.tree.map(lambda x, p: x.to(applied).to(p.dtype), u, params)
        )
    return out


def test_lbfgs_with_bfloat16_gradients_of_float32_params() -> None:
    # Its memories were kept in float32 and bfloat16 differences copied in: index_copy failed.
    params = example_params(torch.float32)
    grads = example_grads(STEPS, torch.bfloat16)
    got = _trajectory(ft.scale_by_lbfgs(memory_size=2), params, grads, torch.bfloat16)
    widened = [ft.tree.map(lambda x: x.float(), g) for g in grads]
    expected = _trajectory(ft.scale_by_lbfgs(memory_size=2), params, widened, torch.bfloat16)
    for (u, state), (u_ref, state_ref) in zip(got, expected, strict=True):
        # The same float32 computation: the update rounded once, the state the same.
        ft.testing.assert_trees_all_equal(u, ft.tree.map(lambda x: x.bfloat16(), u_ref))
        ft.testing.assert_trees_all_equal(state, state_ref)


def test_mechanize_with_float32_gradients_of_float64_params() -> None:
    # vdot of a float32 gradient and a float64 parameter difference raised.
    params = example_params(torch.float64)
    grads = example_grads(STEPS, torch.float32)
    build = lambda: ft.mechanize(ft.sgd(0.1, momentum=0.9))  # noqa: E731
    got = _trajectory(build(), params, grads, torch.float32)
    widened = [ft.tree.map(_f64, g) for g in grads]
    expected = _trajectory(build(), params, widened, torch.float32)
    for (u, state), (u_ref, state_ref) in zip(got, expected, strict=True):
        assert {x.dtype for x in ft.tree.leaves(u)} == {torch.float32}
        torch.testing.assert_close(ft.tree.map(_f64, u), u_ref, rtol=1e-5, atol=1e-12)
        assert state.s.dtype == torch.float64
        torch.testing.assert_close(state.s, state_ref.s, rtol=1e-5, atol=1e-12)


# ---- the checks catch planted defects -------------------------------------------------------


def _planted(init: Callable[[Any], Any], update: Callable[..., Any]) -> Case:
    return Case("planted", lambda: ft.GradientTransformation(init, update))


def test_the_checks_catch_planted_defects() -> None:
    widening = _planted(lambda p: (), lambda u, s, p=None: (ft.tree.map(_f64, u), s))
    with pytest.raises(AssertionError, match="update"):
        _check_dtypes(widening, _same(torch.float32))
    narrowing_state = _planted(
        lambda p: ft.tree.map(lambda x: torch.zeros_like(x, dtype=torch.float16), p),
        lambda u, s, p=None: (u, s),
    )
    with pytest.raises(AssertionError, match="state"):
        _check_dtypes(narrowing_state, _same(torch.float32))
    one_dtype_state = _planted(
        lambda p: ft.tree.map(lambda x: torch.zeros_like(x, dtype=torch.bfloat16), p),
        lambda u, s, p=None: (u, s),
    )
    with pytest.raises(AssertionError, match=r"state \['w'\]"):  # bfloat16 is in the tree
        _check_dtypes(one_dtype_state, MIXED)

    # A 0-d accumulator made with the default dtype: float64 under a float64 default.
    def update(u: Any, s: Any, p: Any = None) -> Any:
        total = s + ft.tree.norm(u)
        return ft.tree.map(lambda g: g * (1 + 0 * total), u), total

    default_made = _planted(lambda p: torch.zeros(()), update)
    _check_dtypes(default_made, _same(torch.float32))  # passes under a float32 default
    with pytest.raises(AssertionError):
        _assert_default_dtype_changes_nothing(default_made, torch.float64)
    overflowing = _planted(lambda p: (), lambda u, s, p=None: (ft.tree.map(lambda g: g * g, u), s))
    with pytest.raises(AssertionError, match="w"):
        _assert_finite(overflowing, torch.float16, 300.0)
