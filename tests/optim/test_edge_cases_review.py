"""Edge cases of NovoGrad, lookahead and MoMo left open by earlier reviews.

* NovoGrad in float16: the per-leaf ``nu = ‖g‖²`` overflowed float16 once ``‖g‖ > 256``.
* ``lookahead`` inside ``masked``/``partition`` ran, and left the slow weights of the leaves
  it did not see behind their fast ones.
* ``momo``/``momo_adam`` without ``value=`` raised ValueError (optax, and the other
  loss-driven transforms here: TypeError).

References are float64 loops written from the papers' (optax's) formulas, never runs of the
code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

F64 = torch.float64


# ---- NovoGrad: float16 leaves keep nu in float32 ----


def _novograd_ref(grads, b1, b2, eps, eps_root):
    """optax's NovoGrad on one leaf, in float64: no (1 − b1), no bias correction."""
    mu = nu = None
    outs = []
    for t, g in enumerate(grads, 1):
        g = g.to(F64)
        n = float((g * g).sum())
        nu = n if t == 1 else b2 * nu + (1 - b2) * n
        a = g / (math.sqrt(nu + eps_root) + eps)
        mu = a if t == 1 else b1 * mu + a
        outs.append(mu)
    return outs


def _half_grads(seed: int, scale: float, steps: int = 8) -> list[torch.Tensor]:
    """float16-representable gradients of 16 elements; ``scale`` 100 gives norms near 400."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, generator=gen, dtype=F64) * scale).half() for _ in range(steps)]


@pytest.mark.parametrize(("mu_dtype", "rtol"), [(torch.float32, 2e-3), (None, 1e-2)])
def test_novograd_float16_large_norms_match_float64_reference(mu_dtype, rtol) -> None:
    # ‖g‖ ≈ 400: ‖g‖² ≈ 1.6e5 > 65504. The old float16 nu was inf from step 1 on, so every
    # later a = g / inf was 0 and the updates decayed as b1ᵗ.
    grads = _half_grads(0, 100.0)
    tx = ft.scale_by_novograd(b1=0.9, b2=0.25, mu_dtype=mu_dtype)
    state = tx.init([torch.zeros(16, dtype=torch.float16)])
    for g, want in zip(grads, _novograd_ref(grads, 0.9, 0.25, 1e-8, 0.0)):
        (u,), state = tx.update([g], state)
        assert u.dtype == torch.float16
        torch.testing.assert_close(u.to(F64), want, rtol=rtol, atol=1e-4)
    assert state.nu[0].dtype == torch.float32 and torch.isfinite(state.nu[0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 1000.0))
def test_novograd_float16_any_gradient_scale(seed: int, scale: float) -> None:
    """Whatever the layer norm (up to ~2e4 here), a float16 run follows the float64 formulas
    to float16 precision (mu kept in float32, so only the output is rounded)."""
    grads = _half_grads(seed, scale, steps=5)
    tx = ft.scale_by_novograd(mu_dtype=torch.float32)
    state = tx.init([torch.zeros(16, dtype=torch.float16)])
    for g, want in zip(grads, _novograd_ref(grads, 0.9, 0.25, 1e-8, 0.0)):
        (u,), state = tx.update([g], state)
        torch.testing.assert_close(u.to(F64), want, rtol=2e-3, atol=1e-4)


def test_novograd_alias_float16_training_keeps_moving() -> None:
    """``novograd`` with weight decay on float16 params: same steps as the float64 formulas
    on the same params, including the steps after ‖g‖ crossed 256."""
    grads = _half_grads(3, 150.0, steps=6)
    params = torch.linspace(-1, 1, 16, dtype=F64).half()
    tx = ft.novograd(0.1, weight_decay=0.01)
    state = tx.init([params])
    mu = nu = None
    for t, g in enumerate(grads, 1):
        (u,), state = tx.update([g], state, [params])
        g64, p64 = g.to(F64), params.to(F64)
        n = float((g64 * g64).sum())
        nu = n if t == 1 else 0.25 * nu + 0.75 * n
        a = g64 / (math.sqrt(nu) + 1e-6) + 0.01 * p64
        mu = a if t == 1 else 0.9 * mu + a
        torch.testing.assert_close(u.to(F64), -0.1 * mu, rtol=1e-2, atol=1e-4)


def test_novograd_nu_dtypes() -> None:
    """float16 → float32 (its range); bfloat16 (float32's range), float32, float64 unchanged."""
    want = {
        torch.float16: torch.float32,
        torch.bfloat16: torch.bfloat16,
        torch.float32: torch.float32,
        torch.float64: torch.float64,
    }
    params = {str(d): torch.zeros(3, dtype=d) for d in want}
    nu = ft.scale_by_novograd().init(params).nu
    assert {k: v.dtype for k, v in nu.items()} == {str(d): w for d, w in want.items()}


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_novograd_updates_do_not_alias_the_state(dtype) -> None:
    """An in-place op on the updates must not change the new state's mu (it was mu itself)."""
    tx = ft.scale_by_novograd()
    g = [torch.tensor([3.0, 4.0], dtype=dtype)]
    (u,), state = tx.update(g, tx.init([torch.zeros(2, dtype=dtype)]))
    kept = state.mu[0].clone()
    u.mul_(-7.0)
    assert torch.equal(state.mu[0], kept)


# ---- lookahead inside masked / partition ----


def _base():
    return {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}


def _lp_grads(scale: float = 1.0):
    """Gradients as make_train_step gives them for a loss written on params.fast."""
    fast = {"w": torch.tensor([1.0, -0.5]) * scale, "b": torch.tensor([2.0]) * scale}
    return ft.LookaheadParams(fast, ft.tree.map(torch.zeros_like, fast))


def _by_size(p):
    return ft.tree.map(lambda x: x.numel() > 1, p)


@pytest.mark.parametrize("mask", [_by_size, False], ids=["callable", "all-false"])
def test_masked_lookahead_with_masked_out_leaves_is_refused_at_init(mask) -> None:
    # Old code: it ran; 'b' got the raw gradient added to fast, nothing to slow.
    tx = ft.masked(ft.lookahead(ft.sgd(0.5), 2, 0.5), mask)
    with pytest.raises(ValueError, match=r"masked: .*lookahead.*lookahead\(masked\(opt, mask\)"):
        tx.init(ft.LookaheadParams.init_synced(_base()))


def test_masked_lookahead_with_a_mask_of_plain_params_hints_at_the_fix() -> None:
    tx = ft.masked(ft.lookahead(ft.sgd(0.5), 2, 0.5), {"w": True, "b": False})
    with pytest.raises(ft.tree.TreeMismatchError, match=r"LookaheadParams.*lookahead\(masked"):
        tx.init(ft.LookaheadParams.init_synced(_base()))


def test_partition_lookahead_beside_a_plain_optimizer_is_refused_at_init() -> None:
    # Old code: 'b' (sgd) moved fast['b'] and left slow['b'] at its initial value.
    labels = ft.tree.map(
        lambda x: "a" if x.numel() > 1 else "b", ft.LookaheadParams(*[_base()] * 2)
    )
    tx = ft.partition({"a": ft.lookahead(ft.sgd(0.5), 2, 0.5), "b": ft.sgd(0.1)}, labels)
    with pytest.raises(ValueError, match=r"transforms\['a'\].*transforms\['b'\].*\['b'\]"):
        tx.init(ft.LookaheadParams.init_synced(_base()))


def _run_lp(tx, params, steps=5):
    state = tx.init(params)
    for i in range(steps):
        u, state = tx.update(_lp_grads(1.0 + i), state, params)
        params = ft.apply_updates(params, u)
    return params


def _lookahead_ref(p0: float, grads: list[float], lr: float, k: int, alpha: float):
    """Lookahead over SGD on one scalar, in Python floats: (fast, slow) after the steps."""
    fast = slow = p0
    for t, g in enumerate(grads, 1):
        fast -= lr * g
        if t % k == 0:
            slow += alpha * (fast - slow)
            fast = slow
    return fast, slow


def test_lookahead_compositions_that_keep_fast_and_slow_in_step_still_work() -> None:
    lp = ft.LookaheadParams.init_synced(_base())
    steps = [1.0 + i for i in range(5)]
    w_g, b_g = [1.0, -0.5], 2.0
    # masked with an all-True mask is lookahead itself.
    got = _run_lp(ft.masked(ft.lookahead(ft.sgd(0.5), 2, 0.5), True), lp)
    for j, p0 in enumerate([1.0, 2.0]):
        fast, slow = _lookahead_ref(p0, [w_g[j] * s for s in steps], 0.5, 2, 0.5)
        assert math.isclose(float(got.fast["w"][j]), fast, rel_tol=1e-6)
        assert math.isclose(float(got.slow["w"][j]), slow, rel_tol=1e-6)
    # A lookahead per group: each group synchronises on its own period.
    labels = ft.LookaheadParams(*[{"w": "a", "b": "b"}] * 2)
    txs = {"a": ft.lookahead(ft.sgd(0.5), 2, 0.5), "b": ft.lookahead(ft.sgd(0.1), 3, 0.25)}
    got = _run_lp(ft.partition(txs, labels), lp)
    fast, slow = _lookahead_ref(3.0, [b_g * s for s in steps], 0.1, 3, 0.25)
    assert math.isclose(float(got.fast["b"][0]), fast, rel_tol=1e-6)
    assert math.isclose(float(got.slow["b"][0]), slow, rel_tol=1e-6)
    # selective_transform: frozen leaves keep their fast and slow weights.
    tx = ft.selective_transform(
        ft.lookahead(ft.sgd(0.5), 2, 0.5),
        freeze_mask=lambda p: ft.tree.map(lambda x: x.numel() == 1, p),
    )
    got = _run_lp(tx, lp)
    assert float(got.fast["b"][0]) == 3.0 and float(got.slow["b"][0]) == 3.0
    fast, slow = _lookahead_ref(1.0, [w_g[0] * s for s in steps], 0.5, 2, 0.5)
    assert math.isclose(float(got.slow["w"][0]), slow, rel_tol=1e-6)
    # An unused label beside the lookahead, and masked weight decay before it.
    _run_lp(ft.partition({"a": ft.lookahead(ft.sgd(0.5), 2, 0.5), "b": ft.sgd(0.1)}, "a"), lp)
    _run_lp(
        ft.chain(
            ft.masked(ft.add_decayed_weights(0.1), _by_size), ft.lookahead(ft.sgd(0.5), 2, 0.5)
        ),
        lp,
    )
    # The recommended form: the mask inside.
    _run_lp(ft.lookahead(ft.masked(ft.sgd(0.5), {"w": True, "b": False}), 2, 0.5), lp)


# ---- MoMo and the other loss-driven transforms: a missing loss is a TypeError ----


def _quad(p):
    return sum((x * x).sum() for x in ft.tree.leaves(p))


LOSS_DRIVEN = {
    "momo": lambda: ft.momo(),
    "momo_adam": lambda: ft.momo_adam(),
    "polyak_sgd": lambda: ft.polyak_sgd(),
    "scale_by_polyak": lambda: ft.scale_by_polyak(),
    "reduce_on_plateau": lambda: ft.reduce_on_plateau(),
    "scale_by_backtracking_linesearch": lambda: ft.scale_by_backtracking_linesearch(5),
    "scale_by_zoom_linesearch": lambda: ft.scale_by_zoom_linesearch(5),
}


@pytest.mark.parametrize("name", sorted(LOSS_DRIVEN))
@pytest.mark.parametrize("how", ["left out", "None"])
def test_missing_loss_is_a_type_error_naming_value(name: str, how: str) -> None:
    tx = LOSS_DRIVEN[name]()
    params = [torch.tensor([1.0, -2.0])]
    grad = [2 * params[0]]
    state = tx.init(params)
    before = ft.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)
    kw = {"grad": grad, "value_fn": _quad} if "linesearch" in name else {}
    if how == "None":
        kw["value"] = None
    with pytest.raises(TypeError, match="value"):
        tx.update(grad, state, params, **kw)
    testing.assert_trees_all_equal(state, before)  # refused before any state changed


@pytest.mark.parametrize("name", ["momo", "momo_adam"])
def test_momo_missing_loss_message(name: str) -> None:
    tx = getattr(ft, name)()
    p = [torch.ones(2)]
    with pytest.raises(TypeError, match=rf"^{name} needs the loss: call tx.update\(.*value=loss\)"):
        tx.update(p, tx.init(p), p)
