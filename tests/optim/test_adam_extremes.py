"""Adam at the edges of each dtype's range: every functrain path against ``torch.optim``.

functrain's paths: the pure update member by member (``_pure_fused`` off), the pure update as
shipped (through the fused kernel where the chain is recognised), and the in-place engines
``"kernel"`` and ``"foreach"``. References: ``torch.optim.Adam``/``AdamW`` with ``fused=True``
and with ``foreach=True``, wherever torch's own numbers are finite (torch's foreach Adam adds
``eps = 1e-8`` in float16, where it is 0, and divides by 0 on small gradients).

The gradients are fixed per step (not functions of the parameters), so every path sees the
same moments; the parameters differ only by the rounding of the update.
"""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain.optim import _pure_fused, fused

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
LR, WD = 1e-2, 0.1
STEP_FACTORS = (1.0, -0.5, 2.0, 0.25)

# Parameters: the member-by-member path rounds the update, ``lr·u`` and ``p + u`` (three
# roundings in the leaf's dtype) where the kernels round ``p`` once. As the differential fuzz.
TOL = {
    F64: {"rtol": 1e-12, "atol": 1e-14},
    F32: {"rtol": 1e-5, "atol": 1e-6},
    F16: {"rtol": 1e-2, "atol": 2e-3},
    BF16: {"rtol": 5e-2, "atol": 2e-2},
}

# Gradient magnitudes per case (each step multiplies them by one of STEP_FACTORS).
CASES = {
    # (1 − b2)·g² is finite, but ν / (1 − b2ᵗ) overflows float32 at t = 1 (g ≈ 3.7e19);
    # from ~6e20 the second moment itself is inf in every implementation (u = m / inf = 0).
    "float32_huge": (F32, [3.7e19, -1.0, 1e20, -5e20, 1e25, 1e-3]),
    # g² underflows to 0 (u = m̂ / eps), also through float32 subnormals.
    "float32_tiny": (F32, [1e-30, -1e-20, 1e-40, 3e-39, 1e-3, 0.0]),
    # In float16 eps = 1e-8 is 0 and (1 − b2)·g² underflows below |g| ≈ 8e-3: m / 0.
    "float16_small": (F16, [1e-5, -3e-7, 1e-3, -0.5, 0.0, 300.0]),
    # ν stored in float16 overflows (the kernels use the unrounded float32 value for the step).
    "float16_large": (F16, [3e4, -2e4, 1.0, -2e-2]),
    "bfloat16_mixed": (BF16, [1e-30, -3e30, 1e19, 1e-3, -2.0, 0.0]),
    # ν / (1 − b2ᵗ) overflows float64 (optax's formula gives u = 0 here, the limit gives ±1).
    "float64_huge": (F64, [1.5e154, -1.0, 1e-160, 3e-3]),
}


def _params(dtype: torch.dtype, n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": (torch.rand(n, generator=gen, dtype=F64) + 0.5).to(dtype),
        "s": torch.tensor(-0.75, dtype=dtype),  # 0-d: type promotion's corner
    }


def _grads(dtype: torch.dtype, values: list[float]) -> list[dict[str, torch.Tensor]]:
    base = torch.tensor(values, dtype=F64)
    return [
        {"w": (f * base).to(dtype), "s": torch.tensor(f * values[0], dtype=F64).to(dtype)}
        for f in STEP_FACTORS
    ]


OPTIMIZERS = {
    "adam": (
        lambda: ft.adam(LR, b1=0.8, b2=0.95),
        lambda ps, **kw: torch.optim.Adam(ps, lr=LR, betas=(0.8, 0.95), **kw),
    ),
    "adamw": (
        lambda: ft.adamw(LR, weight_decay=WD),
        lambda ps, **kw: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, **kw),
    ),
    # Tensor hyperparameters (float32: decays exact in float32, so torch's doubles are equal).
    "inject_adam": (
        lambda: ft.inject_hyperparams(ft.adam)(learning_rate=LR, b1=0.75, b2=0.9375),
        lambda ps, **kw: torch.optim.Adam(ps, lr=LR, betas=(0.75, 0.9375), **kw),
    ),
}


def _moments(state) -> tuple[dict, dict]:
    """``mu`` and ``nu`` of the (single) Adam state inside ``state``."""
    found = []

    def visit(x) -> None:
        if isinstance(x, ft.ScaleByAdamState):
            found.append(x)
        elif isinstance(x, tuple):  # chains' tuples and wrappers' NamedTuples
            for y in x:
                visit(y)

    visit(state)
    assert len(found) == 1
    return found[0].mu, found[0].nu


def _run_pure(tx, params, grads, *, member: bool):
    state = tx.init(params)
    before, _pure_fused.ENABLED = _pure_fused.ENABLED, not member
    try:
        for g in grads:
            u, state = tx.update(g, state, params)
            params = ft.apply_updates(params, u)
    finally:
        _pure_fused.ENABLED = before
    return params, _moments(state)


def _run_engine(tx, params, grads, engine: str):
    params = ft.tree.map(torch.clone, params)
    state = tx.init(params)
    for g in grads:
        done = fused.update_in_place(tx, g, state, params, engines=(engine,))
        assert done is not None and done.engine == engine
        state = done.opt_state
    return params, _moments(state)


def _run_torch(make, params, grads, impl: str):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = make(list(leaves.values()), **{impl: True})
    for g in grads:
        for k, v in leaves.items():
            v.grad = g[k].clone()
        opt.step()
    states = [opt.state[v] for v in leaves.values()]
    mu = {k: s["exp_avg"] for k, s in zip(leaves, states)}
    nu = {k: s["exp_avg_sq"] for k, s in zip(leaves, states)}
    return {k: v.detach() for k, v in leaves.items()}, (mu, nu)


def _all_paths(name: str, case: str):
    dtype, values = CASES[case]
    make_ft, _ = OPTIMIZERS[name]
    params, grads = _params(dtype, len(values)), _grads(dtype, values)
    return {
        "member": _run_pure(make_ft(), params, grads, member=True),
        "pure": _run_pure(make_ft(), params, grads, member=False),
        "kernel": _run_engine(make_ft(), params, grads, "kernel"),
        "foreach": _run_engine(make_ft(), params, grads, "foreach"),
    }


def _state_atol(dtype: torch.dtype) -> float:
    """A few units of the dtype's smallest subnormal: moments of tiny gradients live there."""
    info = torch.finfo(dtype)
    return 8 * info.smallest_normal * info.eps


def _close(got, want, dtype: torch.dtype, *, where_finite: bool = False) -> None:
    """``got`` close to ``want`` (params, (mu, nu)); infinities and NaNs must match, unless
    ``where_finite``: then only the elements where ``want`` is finite are compared."""
    (p, (mu, nu)), (p_ref, (mu_ref, nu_ref)) = got, want
    for a, b, tol in (
        (p, p_ref, TOL[dtype]),
        (mu, mu_ref, {"rtol": TOL[dtype]["rtol"], "atol": _state_atol(dtype)}),
        (nu, nu_ref, {"rtol": TOL[dtype]["rtol"], "atol": _state_atol(dtype)}),
    ):
        assert a.keys() == b.keys()
        for k in a:
            x, y = a[k], b[k]
            assert x.dtype == y.dtype == dtype
            if where_finite:
                keep = torch.isfinite(y)
                x, y = x[keep], y[keep]
            torch.testing.assert_close(x, y, equal_nan=True, **tol)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_path_matches_torch_fused(name: str, case: str) -> None:
    dtype = CASES[case][0]
    _, make_torch = OPTIMIZERS[name]
    params, grads = _params(dtype, len(CASES[case][1])), _grads(dtype, CASES[case][1])
    want = _run_torch(make_torch, params, grads, "fused")
    assert all(bool(torch.isfinite(v).all()) for v in want[0].values())
    for path, got in _all_paths(name, case).items():
        try:
            _close(got, want, dtype)
        except AssertionError as err:
            raise AssertionError(f"{path} vs torch fused: {err}") from None


# torch's foreach Adam rounds ν to float16 before its square root: once (1 − b2)·g² passes
# 65504 its step is 0 where the fused kernel (and functrain) step by about lr. A different
# computation, not a rounding: compared with fused=True only.
FOREACH_CASES = sorted(set(CASES) - {"float16_large"})


@pytest.mark.parametrize("case", FOREACH_CASES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_path_matches_torch_foreach_where_finite(name: str, case: str) -> None:
    dtype = CASES[case][0]
    _, make_torch = OPTIMIZERS[name]
    params, grads = _params(dtype, len(CASES[case][1])), _grads(dtype, CASES[case][1])
    want = _run_torch(make_torch, params, grads, "foreach")
    if dtype != F16:  # only float16's eps = 0 sends torch's foreach Adam to m / 0
        assert all(bool(torch.isfinite(v).all()) for v in want[0].values())
    for path, got in _all_paths(name, case).items():
        assert all(bool(torch.isfinite(v).all()) for v in got[0].values()), path
        try:
            _close(got, want, dtype, where_finite=True)
        except AssertionError as err:
            raise AssertionError(f"{path} vs torch foreach: {err}") from None


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_foreach_engine_is_bitwise_the_member_path(name: str, case: str) -> None:
    paths = _all_paths(name, case)
    ft.testing.assert_trees_all_equal(paths["foreach"], paths["member"])


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["float16", "bfloat16", "float32"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.adam(LR, eps_root=1e-12),
        lambda: ft.nadamw(LR, weight_decay=WD),
        lambda: ft.adam(LR, mu_dtype=torch.bfloat16),
        lambda: ft.adam(LR, mu_dtype=torch.float32),
    ],
    ids=["eps_root", "nadamw", "mu_bf16", "mu_f32"],
)
def test_foreach_only_variants_are_bitwise_the_member_path(make, dtype: torch.dtype) -> None:
    values = [1e-5, -3e-7, 1e-3, -0.5, 0.0, 300.0]
    params, grads = _params(dtype, len(values)), _grads(dtype, values)
    want = _run_pure(make(), params, grads, member=True)
    got = _run_engine(make(), params, grads, "foreach")
    ft.testing.assert_trees_all_equal(got, want)
    assert all(bool(torch.isfinite(v).all()) for v in got[0].values())


def test_half_precision_update_is_rounded_once_from_float32() -> None:
    """One step in float16 and bfloat16: the update is the float32 update, rounded once."""
    for dtype in (F16, BF16):
        g = torch.tensor([1e-5, -3e-7, 1e-3, -0.5, 0.0, 300.0], dtype=dtype)
        tx = ft.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
        u, state = tx.update([g], tx.init([torch.zeros_like(g)]))
        g64 = g.double()
        mu, nu = 0.1 * g64, 0.001 * g64 * g64
        want = (mu / 0.1) / ((nu / 0.001).sqrt() + 1e-8)
        torch.testing.assert_close(u[0], want.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(state.mu[0], mu.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(state.nu[0], nu.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("eps_root", [0.0, 1e-8])
def test_float64_overflowing_bias_correction_has_the_limit(eps_root: float) -> None:
    """ν / (1 − b2) overflows float64 at |g| ≈ 1.4e154; √ν / √(1 − b2) does not. The first
    step's exact update is ``g / (√(g² + eps_root) + eps)``: ±1 here."""
    g = torch.tensor([1.5e154, -1e155, 2.0], dtype=F64)
    tx = ft.scale_by_adam(eps_root=eps_root)
    u, _ = tx.update([g], tx.init([torch.zeros_like(g)]))
    want = g / ((g.square() + eps_root).sqrt() + 1e-8)
    want[:2] = g[:2].sign()  # g² itself overflows in the reference
    torch.testing.assert_close(u[0], want, rtol=1e-15, atol=0)


def test_float64_matches_optax_formula_to_1e12() -> None:
    """Away from the overflow, the reordering keeps optax's numbers:
    ``m̂ / (√(v̂ + eps_root) + eps)`` written literally, in float64, over 20 steps."""
    gen = torch.Generator().manual_seed(3)
    b1, b2, eps = 0.8, 0.95, 1e-6
    for eps_root in (0.0, 1e-4):
        tx = ft.scale_by_adam(b1, b2, eps, eps_root)
        state = tx.init([torch.zeros(50, dtype=F64)])
        m = v = torch.zeros(50, dtype=F64)
        for t in range(1, 21):
            g = torch.randn(50, generator=gen, dtype=F64) * 10.0 ** float(t % 7 - 3)
            u, state = tx.update([g], state)
            m, v = (1 - b1) * g + b1 * m, (1 - b2) * g * g + b2 * v
            want = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t) + eps_root) + eps)
            torch.testing.assert_close(u[0], want, rtol=1e-12, atol=0)
