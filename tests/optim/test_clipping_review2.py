"""Second review of the clipping transforms (the first is ``test_clipping_review.py``).

Covers float16 norms too small for a float16 reciprocal, tensor hyperparameters of the wrong
shape or dtype, integer input to ``unitwise_norm``, AGC's ``axis`` checks, parity with
``torch.nn.utils``, scale invariance (hypothesis), zero parameters in AGC, purity, empty trees
and recompile-free tensor hyperparameters under ``torch.compile``. References are float64
formulas written out here (optax's documented rules) or PyTorch's own clipping utilities.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

E = ft.EmptyState()


def _global_ref(leaves: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """optax's clip_by_global_norm in float64: ``t`` if ‖g‖ < max_norm else ``t / ‖g‖ · max_norm``."""
    wide = [x.double() for x in leaves]
    norm = torch.cat([x.reshape(-1) for x in wide]).norm()
    return [x if norm < max_norm else x / norm * max_norm for x in wide]


def _agc_ref(u: torch.Tensor, p: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """optax's unitwise_clip in float64, units = all dimensions but the first."""
    u, p = u.double(), p.double()
    dims = tuple(range(1, u.dim()))
    g_norm = u.square().sum(dims, keepdim=True).sqrt()
    limit = clipping * torch.clamp_min(p.square().sum(dims, keepdim=True).sqrt(), eps)
    return torch.where(g_norm < limit, u, u * (limit / torch.clamp_min(g_norm, 1e-6)))


# --- float16 norms below 1/65504 ------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [1e-8, 1e-7, 3e-6])
def test_float16_tree_with_a_tiny_norm_is_clipped_not_made_inf(max_norm):
    # ``1e-8 / norm`` ran as ``norm.reciprocal() * 1e-8`` in float16: 1/1.4e-6 overflows to inf.
    g = {"a": torch.tensor([1e-5, -1e-5], dtype=torch.float16), "b": torch.tensor(0.0).half()}
    out, _ = ft.clip_by_global_norm(max_norm).update(g, E)
    ref = _global_ref([g["a"], g["b"]], max_norm)
    assert out["a"].dtype == torch.float16 and torch.isfinite(out["a"]).all()
    # One float16 subnormal step (6e-8) of absolute error, as any float16 result may carry.
    torch.testing.assert_close(out["a"].double(), ref[0], rtol=1e-2, atol=6e-8)


def test_in_place_foreach_engine_matches_the_fixed_tiny_norm_factor():
    from functrain.optim import fused

    tx = ft.chain(ft.clip_by_global_norm(1e-8), ft.sgd(1.0))
    params = {"w": torch.zeros(4, dtype=torch.float16)}
    grads = {"w": torch.full((4,), 1e-6, dtype=torch.float16)}  # norm 2e-6 < 1/65504
    state = tx.init(params)
    updates, _ = tx.update(grads, copy.deepcopy(state), params)
    expected = ft.apply_updates(params, updates)
    assert torch.isfinite(expected["w"]).all()
    in_place = {"w": params["w"].clone()}
    done = fused.update_in_place(tx, grads, state, in_place, engines=("foreach",))
    if done is not None:
        testing.assert_trees_all_equal(in_place, expected)


# --- bad hyperparameters --------------------------------------------------------------------


def _make(name: str, value: object) -> ft.GradientTransformation:
    if name == "eps":
        return ft.adaptive_grad_clip(0.1, eps=value)
    factory = {
        "max_delta": ft.clip,
        "max_norm": ft.clip_by_global_norm,
        "threshold": ft.clip_by_block_rms,
        "clipping": ft.adaptive_grad_clip,
    }[name]
    return factory(value)


_NAMES = ["max_delta", "max_norm", "threshold", "clipping", "eps"]


@pytest.mark.parametrize("name", _NAMES)
@pytest.mark.parametrize("shape", [(1,), (3,), (2, 2)])
def test_non_scalar_tensor_hyperparameters_are_refused_by_name(name, shape):
    # (1,) failed in _foreach_mul ("scalar tensor expected to be 0 dim"), (2,) was broadcast
    # into a per-element bound by clip; neither named the argument.
    with pytest.raises(ValueError, match=rf"{name} must be a 0-d tensor, got shape"):
        _make(name, torch.ones(shape))


@pytest.mark.parametrize("name", _NAMES)
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_number_hyperparameters_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        _make(name, value)


@pytest.mark.parametrize("name", _NAMES)
def test_complex_tensor_hyperparameters_are_refused_by_name(name):
    with pytest.raises(TypeError, match=rf"{name} must be a real number"):
        _make(name, torch.tensor(1 + 0j))


@pytest.mark.parametrize("axis", ["1", 1.0, (), (1, "2"), True])
def test_adaptive_grad_clip_refuses_a_bad_axis_at_construction(axis):
    with pytest.raises(TypeError, match="axis must be None, an int"):
        ft.adaptive_grad_clip(0.1, axis=axis)


def test_unitwise_norm_refuses_integer_input():
    # The norms were cast back to int64: unitwise_norm([1, 1]) was [1, 1], not [√2, √2].
    with pytest.raises(TypeError, match=r"floating-point or complex x, got torch\.int64"):
        ft.unitwise_norm(torch.tensor([1, 1]))


# --- references -----------------------------------------------------------------------------


@given(
    scale=st.floats(1e-3, 1e3),
    max_norm=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
@settings(deadline=None, max_examples=40)
def test_global_norm_matches_torch_clip_grad_norm_up_to_its_epsilon(scale, max_norm, seed):
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(5, generator=gen, dtype=torch.float64) * scale, torch.randn((), generator=gen)]
    g[1] = g[1].double() * scale
    out, _ = ft.clip_by_global_norm(max_norm).update(g, E)
    ref = [x.clone().requires_grad_() for x in g]
    for r, x in zip(ref, g):
        r.grad = x.clone()
    norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    # PyTorch divides by ‖g‖ + 1e-6; functrain (optax) by ‖g‖.
    rtol = 1e-6 / float(norm) + 1e-12
    for got, r in zip(out, ref):
        torch.testing.assert_close(got, r.grad, rtol=rtol, atol=0)


def test_clip_matches_torch_clip_grad_value():
    g = torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0, float("nan")])
    out, _ = ft.clip(0.5).update([g, torch.tensor(-7.0)], E)
    p = [torch.zeros(6, requires_grad=True), torch.zeros((), requires_grad=True)]
    p[0].grad, p[1].grad = g.clone(), torch.tensor(-7.0)
    torch.nn.utils.clip_grad_value_(p, 0.5)
    torch.testing.assert_close(out, [p[0].grad, p[1].grad], equal_nan=True)


def test_adaptive_grad_clip_with_zero_params_uses_eps():
    # optax: max(‖p‖, eps); zero-initialised weights still get clipping · eps.
    u = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-9, 0.0]], dtype=torch.float64)
    p = torch.zeros(3, 2, dtype=torch.float64)
    out, _ = ft.adaptive_grad_clip(0.5, eps=1e-3).update([u], E, [p])
    torch.testing.assert_close(out[0], _agc_ref(u, p, 0.5, 1e-3), rtol=1e-12, atol=0)
    assert out[0][0].norm().item() == pytest.approx(0.5e-3, rel=1e-12)


_POW2 = st.integers(-20, 20).map(lambda k: 2.0**k)  # exact scalings in float64


@given(c=_POW2, max_norm=st.floats(0.1, 10.0), seed=st.integers(0, 2**16))
@settings(deadline=None, max_examples=40)
def test_global_norm_and_block_rms_are_scale_equivariant(c, max_norm, seed):
    # clip(c·bound)(c·g) = c · clip(bound)(g), bitwise for power-of-two c.
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(2).double()]
    for factory in (ft.clip_by_global_norm, ft.clip_by_block_rms, ft.clip):
        base, _ = factory(max_norm).update(g, E)
        scaled, _ = factory(c * max_norm).update([c * x for x in g], E)
        torch.testing.assert_close(scaled, [c * x for x in base], rtol=1e-15, atol=0)


@given(c=_POW2, clipping=st.floats(0.01, 2.0), seed=st.integers(0, 2**16))
@settings(deadline=None, max_examples=40)
def test_adaptive_grad_clip_is_equivariant_to_a_joint_scale(c, clipping, seed):
    # Scaling u and p together scales the output when no norm meets eps or the 1e-6 floor.
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(3, 4, generator=gen, dtype=torch.float64) * 10
    p = torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.5
    tx = ft.adaptive_grad_clip(clipping, eps=0.0)
    base, _ = tx.update([u], E, [p])
    scaled, _ = tx.update([c * u], E, [c * p])
    torch.testing.assert_close(scaled[0], c * base[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(base[0], _agc_ref(u, p, clipping, 0.0), rtol=1e-14, atol=0)


# --- purity, empty trees, compile -----------------------------------------------------------


def _all_txs() -> list[tuple[str, ft.GradientTransformation]]:
    return [
        ("clip", ft.clip(0.1)),
        ("global", ft.clip_by_global_norm(0.1)),
        ("rms", ft.clip_by_block_rms(0.1)),
        ("agc", ft.adaptive_grad_clip(0.01)),
    ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_inputs_are_never_mutated(dtype):
    g = {"w": torch.randn(3, 4).to(dtype), "b": torch.tensor(5.0).to(dtype)}
    p = {"w": torch.randn(3, 4).to(dtype), "b": torch.tensor(1.0).to(dtype)}
    g0, p0 = copy.deepcopy(g), copy.deepcopy(p)
    for _, tx in _all_txs():
        out, _ = tx.update(g, tx.init(p), p)
        testing.assert_trees_all_equal(g, g0)
        testing.assert_trees_all_equal(p, p0)
        assert all(o is not x for o, x in zip(out.values(), g.values()))


@pytest.mark.parametrize("empty", [{}, [], ()])
def test_empty_trees_pass_through(empty):
    for _, tx in _all_txs():
        out, state = tx.update(empty, tx.init(empty), empty)
        assert out == empty and state == E


def test_tensor_max_norm_changes_without_recompiling():
    max_norm = torch.tensor(1.0)
    tx = ft.clip_by_global_norm(max_norm)
    step = torch.compile(lambda g: tx.update(g, E)[0], fullgraph=True, backend="eager")
    g = [torch.tensor([3.0, 4.0])]
    with testing.count_compiles() as count:
        for value in (1.0, 2.0, 10.0, 0.5):
            max_norm.fill_(value)
            torch.testing.assert_close(step(g)[0], _global_ref(g, value)[0].float())
    assert count.compiles == 1, count.reasons
