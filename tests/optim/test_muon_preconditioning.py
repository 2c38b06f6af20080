"""Muon's ``preconditioning`` ('frobenius', 'spectral', 'aol', 'schatten'), ``adam_learning_rate``
and the ``ns_coeffs`` presets, against optax 0.2.8's formulas written out by hand in float64."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import testing
from functrain.testing import assert_trees_all_close

F64 = torch.float64
NS = (3.4445, -4.7750, 2.0315)
DION = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
KINDS = ("frobenius", "spectral", "aol", "schatten")


def _ns_by_hand(x: torch.Tensor, coeffs: Any, steps: int, kind: str, eps: float) -> torch.Tensor:
    """optax's ``_orthogonalize`` of one ``(fan_in, fan_out)`` matrix, element by element.

    The preconditionings as in optax/contrib/_muon.py: Frobenius or spectral division before
    the loop; AOL and Schatten-4 rescale ``X`` and ``A`` inside the first step, with the
    floor ``1e-8`` (optax's default argument there, not the transform's ``eps``).
    """
    rows = [coeffs] * steps if isinstance(coeffs[0], float) else list(coeffs)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    m, n = x.shape
    if kind == "frobenius":
        x = x / (math.sqrt(sum(float(x[i, j]) ** 2 for i in range(m) for j in range(n))) + eps)
    elif kind == "spectral":
        sigma = math.sqrt(float(torch.linalg.eigvalsh(x @ x.T).max()))  # σ_max² = λ_max(XXᵀ)
        x = x / (sigma + eps)
    for step, (c0, c1, c2) in enumerate(rows):
        a = x @ x.T
        if step == 0 and kind == "aol":
            s = torch.tensor(
                [
                    1 / math.sqrt(max(sum(abs(float(a[i, j])) for j in range(m)), 1e-8))
                    for i in range(m)
                ],
                dtype=x.dtype,
            )
            x = s[:, None] * x
            a = torch.tensor(
                [[float(s[i] * a[i, j] * s[j]) for j in range(m)] for i in range(m)], dtype=x.dtype
            )
        elif step == 0 and kind == "schatten":
            fro = math.sqrt(sum(float(a[i, j]) ** 2 for i in range(m) for j in range(m)))
            s = 1 / math.sqrt(max(fro, 1e-8))
            x, a = x * s, a * s**2
        x = c0 * x + (c1 * a + c2 * (a @ a)) @ x
    return x.T if tall else x


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "up": _randn(gen, 7, 3),
        "down": _randn(gen, 2, 6),
        "sq": _randn(gen, 4, 4),
        "b": _randn(gen, 7),
    }


def _grads(steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        g = {k: _randn(gen, *v.shape) for k, v in _model().items()}
        if t == 2:  # zeros and a sign flip among the steps
            g["sq"] = torch.zeros(4, 4, dtype=F64)
            g["up"] = -g["up"]
        out.append(g)
    return out


def _muon_by_hand(
    params: dict[str, torch.Tensor],
    grads: list[dict[str, torch.Tensor]],
    kind: str,
    *,
    lr: Any = 0.05,
    adam_lr: Any = None,
    beta: float = 0.95,
    coeffs: Any = NS,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """optax.contrib.muon with Nesterov, 2-D leaves ``(out, in)`` in PyTorch's layout, the
    1-D leaf through AdamW at ``adam_lr`` (``None``: ``lr``); schedules take the count."""
    p = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    adam_lr = lr if adam_lr is None else adam_lr
    for t, g in enumerate(grads, start=1):
        rate = {"muon": lr(t - 1) if callable(lr) else lr}
        rate["adam"] = adam_lr(t - 1) if callable(adam_lr) else adam_lr
        for k in p:
            if p[k].dim() == 2:
                m[k] = (1 - beta) * g[k] + beta * m[k]
                mhat = beta * m[k] / (1 - beta ** (t + 1)) + (1 - beta) * g[k] / (1 - beta**t)
                ortho = _ns_by_hand(mhat.T, coeffs, 5, kind, eps).T  # the (in, out) matrix
                fan_out, fan_in = p[k].shape
                p[k] = p[k] - rate["muon"] * math.sqrt(max(1.0, fan_out / fan_in)) * ortho
            else:
                m[k] = (1 - b1) * g[k] + b1 * m[k]
                v2[k] = (1 - b2) * g[k] ** 2 + b2 * v2[k]
                mhat = b1 * m[k] / (1 - b1 ** (t + 1)) + (1 - b1) * g[k] / (1 - b1**t)
                p[k] = p[k] - rate["adam"] * mhat / (torch.sqrt(v2[k] / (1 - b2**t)) + eps)
    return p


def _run(tx: ft.GradientTransformation, params: Any, grads: list[Any]) -> Any:
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = ft.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)])
def test_orthogonalize_matches_optax_formulas(kind: str, shape: tuple[int, int]) -> None:
    x = _randn(torch.Generator().manual_seed(sum(shape)), *shape)
    got = ft.orthogonalize_via_newton_schulz(x, NS, 5, kind)  # positional, as in optax
    want = _ns_by_hand(x.T, NS, 5, kind, 1e-8).T  # x is (out, in): the (in, out) matrix is xᵀ
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_matrices_are_preconditioned_one_by_one(kind: str) -> None:
    gen = torch.Generator().manual_seed(3)
    x = _randn(gen, 3, 4, 6)
    x[1] *= 100.0  # one matrix far larger: a shared norm would shrink the others
    x[2] = 0.0  # and a zero one stays zero (the floors, no NaN)
    got = ft.orthogonalize_via_newton_schulz(x, DION, preconditioning=kind)
    want = torch.stack([_ns_by_hand(m.T, DION, 5, kind, 1e-8).T for m in x])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_muon_with_each_preconditioning_matches_optax_rule(kind: str) -> None:
    params, grads = _model(), _grads(6)
    got = _run(ft.muon(0.05, preconditioning=kind), params, grads)
    assert_trees_all_close(got, _muon_by_hand(params, grads, kind), rtol=1e-11, atol=1e-12)


def test_adam_learning_rate_drives_only_the_adamw_group() -> None:
    params, grads = _model(), _grads(5)
    # A float64 schedule (ft's built-in ones compute in the default float32 dtype).
    tx = ft.muon(0.05, preconditioning="aol", adam_learning_rate=lambda n: 0.01 / (1 + n.double()))
    want = _muon_by_hand(params, grads, "aol", adam_lr=lambda t: 0.01 / (1 + t))
    assert_trees_all_close(_run(tx, params, grads), want, rtol=1e-11, atol=1e-12)
    # None (the default) is the Muon learning rate.
    same = ft.muon(0.05, adam_learning_rate=None), ft.muon(0.05, adam_learning_rate=0.05)
    assert_trees_all_close(
        _run(same[0], params, grads), _run(same[1], params, grads), rtol=0, atol=0
    )


def test_injected_adam_learning_rate() -> None:
    params, grads = _model(), _grads(3)
    tx = ft.inject_hyperparams(ft.muon)(learning_rate=0.05, adam_learning_rate=0.003)
    want = _muon_by_hand(params, grads, "frobenius", adam_lr=0.003)
    assert_trees_all_close(_run(tx, params, grads), want, rtol=1e-11, atol=1e-12)


def test_dion_preset_is_its_rows() -> None:
    params, grads = _model(), _grads(4)
    got = _run(ft.muon(0.05, "dion", preconditioning="schatten"), params, grads)
    want = _muon_by_hand(params, grads, "schatten", coeffs=DION)
    assert_trees_all_close(got, want, rtol=1e-11, atol=1e-12)
    standard = _run(ft.muon(0.05, "standard"), params, grads)
    assert_trees_all_close(standard, _run(ft.muon(0.05), params, grads), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_cubic_iteration_reaches_the_polar_factor(kind: str) -> None:
    # Every preconditioning leaves the singular values in (0, 1], where the cubic map converges:
    # to the polar factor of x, or for AOL of Dx, D = diag(1/√Σⱼ|(xxᵀ)ᵢⱼ|) (a row scaling,
    # not a multiple of x, so its polar factor differs).
    x = _randn(torch.Generator().manual_seed(9), 6, 4)
    target = x
    if kind == "aol":  # the rows of the wide (in, out) = xᵀ orientation, i.e. x's columns
        gram = x.T @ x
        d = [1 / math.sqrt(sum(abs(float(gram[i, j])) for j in range(4))) for i in range(4)]
        target = x * torch.tensor(d, dtype=F64)
    u, _, vh = torch.linalg.svd(target, full_matrices=False)
    got = ft.orthogonalize_via_newton_schulz(x, (1.5, -0.5, 0.0), 80, kind, eps=0.0)
    torch.testing.assert_close(got, u @ vh, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    scale=st.floats(1e-2, 1e3),
    rows=st.integers(1, 5),
    cols=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_every_preconditioning_is_scale_invariant(
    kind: str, scale: float, rows: int, cols: int, seed: int
) -> None:
    x = _randn(torch.Generator().manual_seed(seed), rows, cols) + 0.1
    base = ft.orthogonalize_via_newton_schulz(x, NS, 5, kind, eps=0.0)
    torch.testing.assert_close(
        ft.orthogonalize_via_newton_schulz(scale * x, NS, 5, kind, eps=0.0),
        base,
        rtol=1e-9,
        atol=1e-9,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_compiles_once_over_steps(kind: str) -> None:
    params = {k: v.float() for k, v in _model().items()}
    grads = [{k: v.float() for k, v in g.items()} for g in _grads(4)]
    tx = ft.muon(ft.linear_schedule(0.05, 0.01, 3), preconditioning=kind, adam_learning_rate=0.01)
    state = tx.init(params)
    compiled = torch.compile(tx.update, fullgraph=True, backend="eager")
    eager_state = state
    with testing.assert_max_compiles(1):
        for g in grads:
            got, state = compiled(g, state, params)
            want, eager_state = tx.update(g, eager_state, params)
            assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_leaves_with_bfloat16_iteration(kind: str) -> None:
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(16, 24, generator=gen)
    exact = _ns_by_hand(g.double().T, NS, 5, kind, 1e-8).T
    tx = ft.scale_by_muon(nesterov=False, preconditioning=kind, ns_dtype=torch.bfloat16)
    gb = g.bfloat16()
    u, state = tx.update({"w": gb}, tx.init({"w": gb}))
    assert u["w"].dtype == torch.bfloat16 and state.mu["w"].dtype == torch.bfloat16
    assert torch.isfinite(u["w"]).all()
    error = float((u["w"].double() - exact).abs().max())
    assert error < 0.1, error  # bfloat16's 2⁻⁸ compounded over five steps
    # float32 leaves with a bfloat16 iteration: float32 out, the same accuracy.
    u32, _ = tx.update({"w": g}, tx.init({"w": g}))
    assert u32["w"].dtype == torch.float32 and float((u32["w"].double() - exact).abs().max()) < 0.1


def test_pure_update_and_masked_leaves() -> None:
    params = _model()
    g = _grads(1)[0]
    frozen = {k: v.clone() for k, v in g.items()}
    mask = {"up": True, "down": False, "sq": True, "b": False}
    tx = ft.masked(ft.scale_by_muon(preconditioning="aol"), mask)
    state = tx.init(params)
    u, _ = tx.update(g, state, params)
    assert all(torch.equal(g[k], frozen[k]) for k in g)
    torch.testing.assert_close(u["down"], g["down"], rtol=0, atol=0)
    want = ft.orthogonalize_via_newton_schulz(g["up"], NS, 5, "aol")
    torch.testing.assert_close(u["up"], want, rtol=1e-12, atol=1e-12)  # first step: m̂ = g


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match=r"preconditioning must be one of .*'newton'"):
        ft.scale_by_muon(preconditioning="newton")
    with pytest.raises(ValueError, match="preconditioning must be one of"):
        ft.muon(0.1, preconditioning="Spectral")
    with pytest.raises(ValueError, match=r"preconditioning must be one of .*1e-06"):
        ft.orthogonalize_via_newton_schulz(torch.ones(2, 2), NS, 5, 1e-6)  # the old eps slot
    with pytest.raises(ValueError, match=r"ns_coeffs preset must be one of \('standard', 'dion'\)"):
        ft.muon(0.1, "polar")


@pytest.mark.parametrize("kind", KINDS)
def test_vmapped_ensemble_equals_members(kind: str) -> None:
    gen = torch.Generator().manual_seed(6)
    params = {"w": _randn(gen, 3, 6, 4), "b": _randn(gen, 3, 6)}
    g = {k: _randn(gen, *v.shape) for k, v in params.items()}
    tx = ft.muon(0.05, preconditioning=kind, adam_learning_rate=0.01)
    u, _ = torch.func.vmap(tx.update)(g, torch.func.vmap(tx.init)(params), params)
    for i in range(3):
        member = {k: v[i] for k, v in params.items()}
        want, _ = tx.update({k: v[i] for k, v in g.items()}, tx.init(member), member)
        assert_trees_all_close({k: v[i] for k, v in u.items()}, want, rtol=1e-12, atol=1e-13)
