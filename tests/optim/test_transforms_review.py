"""Review regressions for the core transforms and aliases: complex leaves and argument checks.

Complex references are float64 transcriptions of optax's rules, in which every second moment
uses ``numerics.abs_sq(g) = (conj(g)·g).real`` (``update_moment_per_elem_norm``), ``jnp.sign``
of a complex number is its phase and ``jax.random.normal`` of a complex dtype has real and
imaginary parts of variance ½ each.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

STEPS = 20
B1, B2, EPS = 0.8, 0.95, 1e-3


def _complex_grads(steps: int = STEPS, n: int = 5, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen, dtype=torch.complex128) for _ in range(steps)]


def _run(tx: ft.GradientTransformation, grads: list[torch.Tensor], param: torch.Tensor):
    state = tx.init([param])
    out = []
    for g in grads:
        g_before = g.clone()
        u, state = tx.update([g], state, [param])
        assert torch.equal(g, g_before)  # never mutated
        out.append(u[0])
    return out, state


def _abs_sq(g: torch.Tensor) -> torch.Tensor:
    return (g.conj() * g).real


def _adam_family(kind: str, nesterov: bool = False) -> Callable[[list[torch.Tensor]], list]:
    """optax's scale_by_adam / amsgrad / adamax / radam, leaf by leaf, in complex128."""

    def run(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        m = torch.zeros_like(grads[0])
        v = torch.zeros(grads[0].shape, dtype=torch.float64)
        v_max = torch.zeros_like(v)
        out = []
        for t, g in enumerate(grads, start=1):
            m = (1 - B1) * g + B1 * m
            if kind == "adamax":
                v = torch.maximum(g.abs() + EPS, B2 * v)
                out.append(m / (1 - B1**t) / v)
                continue
            v = (1 - B2) * _abs_sq(g) + B2 * v
            if nesterov:
                m_hat = B1 * m / (1 - B1 ** (t + 1)) + (1 - B1) * g / (1 - B1**t)
            else:
                m_hat = m / (1 - B1**t)
            v_hat = v / (1 - B2**t)
            if kind == "amsgrad":
                v_max = torch.maximum(v_max, v_hat)
                v_hat = v_max
            u = m_hat / (v_hat.sqrt() + EPS)
            if kind == "radam":
                ro_inf = 2 / (1 - B2) - 1
                ro = ro_inf - 2 * t * B2**t / (1 - B2**t)
                r = math.sqrt(
                    max((ro - 4) * (ro - 2) * ro_inf / ((ro_inf - 4) * (ro_inf - 2) * ro), 0)
                )
                u = r * u if ro >= 5 else m_hat
            out.append(u)
        return out

    return run


ADAM_FAMILY = {
    "adam": (lambda: ft.scale_by_adam(B1, B2, EPS), _adam_family("adam")),
    "nadam": (
        lambda: ft.scale_by_adam(B1, B2, EPS, nesterov=True),
        _adam_family("adam", nesterov=True),
    ),
    "amsgrad": (lambda: ft.scale_by_amsgrad(B1, B2, EPS), _adam_family("amsgrad")),
    "adamax": (lambda: ft.scale_by_adamax(B1, B2, EPS), _adam_family("adamax")),
    "radam": (lambda: ft.scale_by_radam(B1, B2, EPS), _adam_family("radam")),
    "radam_nesterov": (
        lambda: ft.scale_by_radam(B1, B2, EPS, nesterov=True),
        _adam_family("radam", nesterov=True),
    ),
}


@pytest.mark.parametrize("name", sorted(ADAM_FAMILY))
def test_complex_adam_family_uses_abs_squared(name: str) -> None:
    """Old code squared ``g·g`` (complex) instead of ``|g|²``: adam was off by O(1) and
    amsgrad/adamax raised "maximum not implemented for ComplexDouble"."""
    make, reference = ADAM_FAMILY[name]
    grads = _complex_grads()
    got, state = _run(make(), grads, torch.zeros(5, dtype=torch.complex128))
    testing.assert_trees_all_close(got, reference(grads), rtol=1e-12, atol=1e-14)
    for leaf in ft.tree.leaves(state)[1:]:  # moments keep the params' complex dtype
        assert leaf.dtype == torch.complex128


def test_complex_second_moment_is_real_and_equals_the_modulus() -> None:
    g = torch.tensor([3 + 4j, -1j, 0j], dtype=torch.complex128)
    _, state = ft.scale_by_adam(b2=0.5).update([g], ft.scale_by_adam(b2=0.5).init([g]))
    nu = state.nu[0]
    assert torch.equal(nu.imag, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(nu.real, torch.tensor([12.5, 0.5, 0.0], dtype=torch.float64))


def _rms_reference(centered: bool, eps_in_sqrt: bool, decay: float = 0.9):
    def run(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        mu = torch.zeros_like(grads[0])
        nu = torch.zeros(grads[0].shape, dtype=torch.float64)
        out = []
        for g in grads:
            mu = (1 - decay) * g + decay * mu
            nu = (1 - decay) * _abs_sq(g) + decay * nu
            var = nu - _abs_sq(mu) if centered else nu
            out.append(g / ((var + EPS).sqrt() if eps_in_sqrt else var.sqrt() + EPS))
        return out

    return run


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("centered", [False, True])
def test_complex_rms_and_stddev(centered: bool, eps_in_sqrt: bool) -> None:
    make = ft.scale_by_stddev if centered else ft.scale_by_rms
    grads = _complex_grads(seed=1)
    got, _ = _run(
        make(0.9, EPS, eps_in_sqrt=eps_in_sqrt), grads, torch.zeros(5, dtype=grads[0].dtype)
    )
    testing.assert_trees_all_close(
        got, _rms_reference(centered, eps_in_sqrt)(grads), rtol=1e-12, atol=1e-14
    )


def test_complex_rss_matches_adagrad_formula() -> None:
    grads = _complex_grads(seed=2)
    grads[0] = torch.zeros_like(grads[0])  # a zero sum gives a zero update
    total = torch.zeros(5, dtype=torch.float64)
    want = []
    for g in grads:
        total = total + _abs_sq(g)
        safe = torch.where(total > 0, (total + EPS).rsqrt(), torch.zeros_like(total))
        want.append(g * safe)
    tx = ft.scale_by_rss(initial_accumulator_value=0.0, eps=EPS)
    got, _ = _run(tx, grads, torch.zeros(5, dtype=torch.complex128))
    testing.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)


@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=STEPS, max_size=STEPS))
def test_complex_leaf_with_zero_imaginary_part_equals_the_real_leaf(values: list[float]) -> None:
    """Property: on the real axis every second-moment transform is the real one, bit for bit
    up to rounding, and a real leaf beside a complex one is untouched by its presence."""
    real = [torch.tensor([v, -v], dtype=torch.float64) for v in values]
    for make in (
        lambda: ft.scale_by_adam(B1, B2, EPS),
        lambda: ft.scale_by_amsgrad(B1, B2, EPS),
        lambda: ft.scale_by_stddev(0.9, EPS),
        lambda: ft.scale_by_rss(0.1, EPS),
    ):
        tx = make()
        params = [torch.zeros(2, dtype=torch.complex128), torch.zeros(2, dtype=torch.float64)]
        state, ref_state = tx.init(params), tx.init(params[1:])
        for g in real:
            (uc, ur), state = tx.update([g.to(torch.complex128), g], state)
            (ref,), ref_state = tx.update([g], ref_state)
            # atol: stddev cancels to near 0 in some steps, where the two roundings differ
            torch.testing.assert_close(uc.real, ref, rtol=1e-12, atol=1e-12)
            assert torch.equal(uc.imag, torch.zeros_like(ref))
            assert torch.equal(ur, ref)


def test_complex_sign_is_the_phase() -> None:
    g = torch.tensor([3 + 4j, -2j, 0j], dtype=torch.complex64)
    want = torch.tensor([0.6 + 0.8j, -1j, 0j], dtype=torch.complex64)
    u, _ = ft.scale_by_sign().update([g], ft.scale_by_sign().init(None))
    torch.testing.assert_close(u[0], want)
    lion = ft.scale_by_lion(b1=0.0)  # c = g at the first step
    u, _ = lion.update([g], lion.init([g]))
    torch.testing.assert_close(u[0], want)


def test_complex_trust_ratio_lamb_and_param_block_rms() -> None:
    """Old code cast the (real) norms to the complex dtype and clamped: "clamp is not
    supported for complex types"; the block RMS squared p instead of |p|²."""
    p = torch.tensor([3 + 4j, 0j], dtype=torch.complex128)  # ‖p‖ = 5, rms = √12.5
    u = torch.tensor([1j, 0j], dtype=torch.complex128)  # ‖u‖ = 1
    tx = ft.scale_by_trust_ratio()
    got, _ = tx.update([u], tx.init([p]), [p])
    torch.testing.assert_close(got[0], 5 * u)
    tx = ft.scale_by_param_block_rms()
    got, _ = tx.update([u], tx.init([p]), [p])
    torch.testing.assert_close(got[0], math.sqrt(12.5) * u)
    # lamb's first step: adam's direction g/|g| (eps=0), rescaled to ‖p‖ per leaf.
    got, _ = ft.lamb(0.1, eps=0.0).update([u + 2], ft.lamb(0.1).init([p]), [p])
    direction = (u + 2) / (u + 2).abs()
    torch.testing.assert_close(got[0], -0.1 * 5 * direction / direction.norm())


def test_complex_noise_has_unit_variance_in_both_parts() -> None:
    """Old code cast a real draw to complex: no noise at all in the imaginary part."""
    tx = ft.add_noise(eta=1.0, gamma=0.0, key=5)
    zeros = torch.zeros(40_000, dtype=torch.complex64)
    (noise,), _ = tx.update([zeros], tx.init([zeros]))
    assert noise.dtype == torch.complex64
    for part in (noise.real, noise.imag):
        assert abs(float(part.var()) - 0.5) < 0.02
        assert abs(float(part.mean())) < 0.02
    assert abs(float((noise.real * noise.imag).mean())) < 0.02  # independent parts
    real = ft.add_noise(eta=1.0, gamma=0.0, key=5)
    (noise,), _ = real.update([torch.zeros(3)], real.init([torch.zeros(3)]))
    assert noise.dtype == torch.float32  # real leaves unchanged


STATE_DTYPE_CASES = {
    "adam": lambda d: ft.adam(0.1, mu_dtype=d),
    "scale_by_adam": lambda d: ft.scale_by_adam(mu_dtype=d),
    "amsgrad": lambda d: ft.amsgrad(0.1, mu_dtype=d),
    "lion": lambda d: ft.lion(0.1, mu_dtype=d),
    "sgd": lambda d: ft.sgd(0.1, momentum=0.9, accumulator_dtype=d),
    "adafactor": lambda d: ft.adafactor(0.1, momentum=0.9, dtype_momentum=d),
}
STATE_DTYPE_NAMES = {"sgd": "accumulator_dtype", "adafactor": "dtype_momentum"}


@pytest.mark.parametrize("name", sorted(STATE_DTYPE_CASES))
def test_integer_state_dtypes_are_refused(name: str) -> None:
    """Old code accepted ``torch.int32`` and truncated the moment: ``sgd(momentum=0.9,
    accumulator_dtype=int32)`` silently had no momentum at all."""
    arg = STATE_DTYPE_NAMES.get(name, "mu_dtype")
    with pytest.raises(ValueError, match=f"{arg} must be a floating-point dtype"):
        STATE_DTYPE_CASES[name](torch.int32)
    with pytest.raises(TypeError, match=f"{arg} must be a torch.dtype"):
        STATE_DTYPE_CASES[name]("bfloat16")
    STATE_DTYPE_CASES[name](torch.bfloat16)  # floating dtypes still pass


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda v: ft.adam(0.1, b1=v), "b1"),
        (lambda v: ft.scale_by_rms(decay=v), "decay"),
        (lambda v: ft.scale_by_adam(eps=v), "eps"),
        (lambda v: ft.scale_by_amsgrad(eps_root=v), "eps_root"),
        (lambda v: ft.scale_by_radam(threshold=v), "threshold"),
    ],
)
def test_shaped_tensor_hyperparameters_are_refused(make, name: str) -> None:
    """A 1-d hyperparameter used to broadcast into the leaves or fail deep in an update with
    "The size of tensor a (3) must match the size of tensor b (2)"."""
    with pytest.raises(ValueError, match=f"{name} must be a number or a 0-d tensor.*\\(2,\\)"):
        make(torch.tensor([0.5, 0.5]))
    make(torch.tensor(0.5))  # a 0-d tensor is fine


def test_adafactor_errors_name_its_own_arguments() -> None:
    with pytest.raises(ValueError, match="clipping_threshold must be >= 0"):
        ft.adafactor(0.1, clipping_threshold=-1.0)
    with pytest.raises(ValueError, match="momentum must be in"):
        ft.adafactor(0.1, momentum=2.0)


def test_lion_smooth_beta_must_be_finite() -> None:
    with pytest.raises(ValueError, match="smooth_beta must be finite"):
        ft.scale_by_lion(mode="smooth", smooth_beta=math.nan)


MOMENT_CASES = {
    "adam": lambda: ft.scale_by_adam(B1, B2, EPS),
    "adam_mu_dtype": lambda: ft.scale_by_adam(B1, B2, EPS, mu_dtype=torch.float64),
    "amsgrad": lambda: ft.scale_by_amsgrad(B1, B2, EPS),
    "adamax": lambda: ft.scale_by_adamax(B1, B2, EPS),
    "radam": lambda: ft.scale_by_radam(B1, B2, EPS),
    "lion": lambda: ft.scale_by_lion(B1, B2),
}


@pytest.mark.parametrize("name", sorted(MOMENT_CASES))
def test_bfloat16_gradients_do_not_narrow_float32_moments(name: str) -> None:
    """bfloat16 gradients of float32 params: old code returned the first moment (and for
    amsgrad/adamax/radam/lion every moment) in bfloat16, so the state changed dtype after one
    step (a recompile) and the moments lost 16 bits. Reference: the float64 EMA of the
    bfloat16 gradients, which a float32 state holds to float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.zeros(6)]
    grads = [torch.randn(6, generator=gen).bfloat16() for _ in range(STEPS)]
    tx = MOMENT_CASES[name]()
    state = tx.init(params)
    dtypes = [x.dtype for x in ft.tree.leaves(state)]
    for g in grads:
        u, state = tx.update([g], state, params)
        assert u[0].dtype == torch.bfloat16
    assert [x.dtype for x in ft.tree.leaves(state)] == dtypes
    mu = torch.zeros(6, dtype=torch.float64)
    decay = B2 if name == "lion" else B1  # lion's momentum decays by b2
    for g in grads:
        mu = (1 - decay) * g.double() + decay * mu
    torch.testing.assert_close(state.mu[0].double(), mu, rtol=1e-6, atol=1e-7)


def test_float16_amsgrad_is_computed_in_float32() -> None:
    """In float16, eps = 1e-8 is 0 and (1 − b2)·g² underflows for |g| = 1e-3: old code's
    first amsgrad step was m̂ / 0 = inf. Now as adam: float32 arithmetic, rounded once."""
    g = torch.full((3,), 1e-3, dtype=torch.float16)
    tx = ft.scale_by_amsgrad()
    (u,), state = tx.update([g], tx.init([g]))
    gd = float(g[0])
    want = gd / (math.sqrt(0.001 * gd * gd / 0.001) + 1e-8)  # m̂ = g, v̂ = g²
    assert u.dtype == torch.float16
    assert torch.equal(u, torch.full((3,), want, dtype=torch.float64).half())  # one rounding
    assert all(x.dtype == torch.float16 for x in (state.mu[0], state.nu[0], state.nu_max[0]))


# --- the train step's in-place engines follow the pure path ---------------------------------


@pytest.mark.parametrize("tx_fn", [lambda: ft.adam(0.1), lambda: ft.adam(0.1, nesterov=True)])
@pytest.mark.parametrize("engines", [("foreach",), ("kernel", "foreach")])
def test_in_place_update_of_bfloat16_grads_keeps_float32_moments(tx_fn, engines):
    # The foreach engine narrowed mu to the gradients' bfloat16 while the pure path keeps it.
    from functrain.optim import fused

    torch.manual_seed(0)
    params = {"a": torch.randn(5), "b": torch.randn(3, 2)}
    grads = {k: torch.randn_like(v).to(torch.bfloat16) for k, v in params.items()}
    tx = tx_fn()
    expected_updates, expected_state = tx.update(grads, tx.init(params), params)
    in_place = {k: v.clone() for k, v in params.items()}
    result = fused.update_in_place(tx, grads, tx.init(params), in_place, engines=engines)
    assert result is not None
    testing.assert_trees_all_equal(result.opt_state, expected_state)  # dtypes included
    testing.assert_trees_all_equal(in_place, ft.apply_updates(params, expected_updates))


def test_in_place_update_of_complex_params_is_the_pure_update():
    # Adam's second moment of a complex leaf is |g|²; the foreach engine's g·g was wrong.
    from functrain.optim import fused

    torch.manual_seed(0)
    params = {"z": torch.randn(4, dtype=torch.complex128)}
    grads = {"z": torch.randn(4, dtype=torch.complex128)}
    tx = ft.adam(0.1)
    expected_updates, _ = tx.update(grads, tx.init(params), params)
    in_place = {"z": params["z"].clone()}
    result = fused.update_in_place(tx, grads, tx.init(params), in_place)
    if result is not None:  # an engine took it: it must give the pure numbers
        testing.assert_trees_all_close(
            in_place, ft.apply_updates(params, expected_updates), rtol=1e-12
        )
    step = ft.make_train_step(
        lambda p, b: (p["z"] * b).abs().square().sum(), tx, norm_metrics=False
    )
    batch = torch.randn(3, 4, dtype=torch.complex128)
    state = ft.TrainState.create(params=params, tx=tx, seed=None)
    new_state, _ = step(state, batch)
    grad = {"z": 2 * (batch.conj() * batch).sum(0) * params["z"]}  # d/d conj(z) convention
    by_hand, _ = tx.update(grad, tx.init(params), params)
    testing.assert_trees_all_close(new_state.params, ft.apply_updates(params, by_hand), rtol=1e-10)


def test_float64_mu_of_float32_gradients_is_accumulated_in_float64():
    # mu_dtype=float64 stored float64 moments computed in float32 (0.1·(1 + 2⁻²⁰) came out as
    # 0.10000009834766388); optax promotes the float32 gradient to the moment's float64.
    from functrain.optim import fused

    torch.manual_seed(0)
    params = [torch.zeros(6)]
    grads = [torch.randn(6) * (1 + 2**-20) for _ in range(5)]
    tx = ft.scale_by_adam(b1=0.9, mu_dtype=torch.float64)
    state = tx.init(params)
    mu = torch.zeros(6, dtype=torch.float64)
    for g in grads:
        mu = 0.9 * mu + (1 - 0.9) * g.double()
        _, state = tx.update([g], state)
        assert state.mu[0].dtype == torch.float64
        torch.testing.assert_close(state.mu[0], mu, rtol=1e-12, atol=1e-15)  # float32: 1e-8
    # The train step's in-place engine gives the same state and parameters.
    chain = ft.chain(tx, ft.scale(-0.1))
    pure_state, in_place_state = chain.init(params), chain.init(params)
    pure_params, in_place_params = [params[0].clone()], [params[0].clone()]
    for g in grads:
        updates, pure_state = chain.update([g], pure_state)
        pure_params = ft.apply_updates(pure_params, updates)
        done = fused.update_in_place(chain, [g], in_place_state, in_place_params)
        assert done is not None
        in_place_state = done.opt_state
    testing.assert_trees_all_equal(in_place_params, pure_params)
    testing.assert_trees_all_equal(in_place_state, pure_state)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.adam(0.1, mu_dtype=torch.float64),
        lambda: ft.amsgrad(0.1, mu_dtype=torch.float64),
        lambda: ft.lion(0.1, mu_dtype=torch.float64),
    ],
)
def test_real_mu_dtype_for_complex_params_is_refused_naming_the_leaf(make):
    # mu kept only the real parts of the complex moments (0.1 instead of 0.1+0.1j), silently.
    params = {"a": torch.ones(2), "z": torch.tensor([1 + 2j], dtype=torch.complex64)}
    with pytest.raises(ValueError, match=r"mu_dtype=torch.float64 is real but params\['z'\]"):
        make().init(params)


def test_complex_mu_dtype_keeps_complex_moments():
    params = {"z": torch.tensor([1 + 2j], dtype=torch.complex64)}
    tx = ft.scale_by_adam(b1=0.9, mu_dtype=torch.complex128)
    g = torch.tensor([1 + 1j], dtype=torch.complex64)
    _, state = tx.update({"z": g}, tx.init(params))
    want = (1 - 0.9) * g.to(torch.complex128)
    torch.testing.assert_close(state.mu["z"], want, rtol=1e-7, atol=0)
