"""Review of clipping and MultiSteps edges: half-precision overflow, complex leaves, 0-d leaves
with tensor hyperparameters, optax's select rules, and MultiSteps resumed with a smaller k.

References are float64 formulas written out here (optax's documented rules) or naive loops.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

E = ft.EmptyState()
_BACKEND = os.environ.get("FUNCTRAIN_TEST_COMPILE_BACKEND", "inductor")


def _global_clip_ref(leaves: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """optax: ``t`` if ‖g‖ < max_norm else ``t / ‖g‖ · max_norm``, in float64."""
    wide = [x.double() for x in leaves]
    norm = torch.cat([x.reshape(-1) for x in wide]).norm()
    return [x if norm < max_norm else x / norm * max_norm for x in wide]


def _abs_sq64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.complex128).abs().square() if x.is_complex() else x.double().square()


# --- clip_by_global_norm ------------------------------------------------------------------------


def test_global_norm_of_float16_above_65504_still_rescales():
    # The norm (1e5) was rounded to float16 (inf) and every update became 0.
    g = {"w": torch.full((10_000,), 1000.0, dtype=torch.float16), "b": torch.ones(3).half()}
    out, _ = ft.clip_by_global_norm(1.0).update(g, E)
    ref = _global_clip_ref([g["b"], g["w"]], 1.0)
    for got, want in zip((out["b"], out["w"]), ref):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-7)  # b: subnormal


@given(
    values=st.lists(st.floats(-300.0, 300.0, width=16), min_size=1, max_size=8),
    max_norm=st.floats(0.0625, 64.0, width=16),  # exact in every float dtype
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
@settings(deadline=None)
def test_global_norm_tensor_and_float_max_norm_give_identical_numbers(values, max_norm, dtype):
    # Both spellings of one max_norm agree to a few ulps, keep each leaf's dtype and match optax's
    # rule in float64.
    g = [torch.tensor(values).to(dtype), torch.tensor(values[0]).to(dtype)]  # incl. a 0-d leaf
    a, _ = ft.clip_by_global_norm(max_norm).update(g, E)
    b, _ = ft.clip_by_global_norm(torch.tensor(max_norm)).update(g, E)
    # ``number / tensor`` is ``reciprocal · number`` in PyTorch: the factors may differ by an
    # ulp of the float32 (or wider) norm, never by a float16 rounding of it.
    info = torch.finfo(dtype)  # atol: two steps between subnormals
    ft.testing.assert_trees_all_close(a, b, rtol=4 * info.eps, atol=2 * info.tiny * info.eps)
    assert [x.dtype for x in b] == [dtype, dtype]
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-6)
    for got, want in zip(a, _global_clip_ref(g, max_norm)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=1e-6)


def test_global_norm_follows_optax_select_on_edges():
    x = torch.tensor([3.0, 4.0])
    same, _ = ft.clip_by_global_norm(5.0).update([x], E)  # norm == max_norm: t / 5 * 5
    torch.testing.assert_close(same[0], x)
    zero, _ = ft.clip_by_global_norm(1.0).update([torch.zeros(2)], E)  # 0 < 1: unchanged
    assert zero[0].tolist() == [0.0, 0.0]
    nan0, _ = ft.clip_by_global_norm(0.0).update([torch.zeros(2)], E)  # optax: 0 / 0 · 0
    assert torch.isnan(nan0[0]).all()
    inf, _ = ft.clip_by_global_norm(1.0).update([torch.tensor([float("inf"), 2.0])], E)
    assert torch.isnan(inf[0][0]) and inf[0][1] == 0.0  # t / inf · 1


# --- clip -----------------------------------------------------------------------------------


def test_clip_refuses_complex_leaves_naming_the_path():
    with pytest.raises(TypeError, match=r"updates\['a'\]\[1\] is complex"):
        ft.clip(1.0).update({"a": [torch.ones(2), torch.ones(2, dtype=torch.complex64)]}, E)


# --- 0-d leaves with tensor hyperparameters keep their dtype ------------------------------------


@pytest.mark.parametrize("name", ["clip", "clip_by_block_rms", "adaptive_grad_clip"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_dim_leaves_keep_their_dtype_with_tensor_hyperparameters(name, dtype):
    # Type promotion treats a 0-d leaf and a 0-d float64 hyperparameter alike.
    tx = getattr(ft, name)(torch.tensor(0.5, dtype=torch.float64))
    g = [torch.tensor(3.0, dtype=dtype), torch.full((2,), 3.0, dtype=dtype)]
    params = [torch.tensor(1.0, dtype=dtype), torch.ones(2, dtype=dtype)]
    out, _ = tx.update(g, tx.init(params), params)
    assert [x.dtype for x in out] == [dtype, dtype]
    want = {"clip": 0.5, "clip_by_block_rms": 0.5, "adaptive_grad_clip": 0.5}[name]
    assert float(out[0]) == pytest.approx(want, rel=1e-2)


# --- clip_by_block_rms ----------------------------------------------------------------------


def _block_rms_ref(u: torch.Tensor, threshold: float) -> torch.Tensor:
    rms = _abs_sq64(u).mean().sqrt()
    return u.to(torch.complex128 if u.is_complex() else torch.float64) / max(1.0, rms / threshold)


def test_block_rms_of_float16_above_256_is_not_zeroed():
    u = torch.tensor([300.0, -300.0, 1.0, 0.0], dtype=torch.float16)  # u² overflows float16
    out, _ = ft.clip_by_block_rms(1.0).update([u], E)
    assert out[0].dtype == torch.float16
    torch.testing.assert_close(out[0].double(), _block_rms_ref(u, 1.0), rtol=1e-3, atol=1e-4)


def test_block_rms_of_a_complex_leaf_uses_the_modulus():
    # u·u of 3+4i is -7+24i; optax's abs_sq gives 25.
    u = torch.tensor([3 + 4j, 0j, 1j], dtype=torch.complex64)
    out, _ = ft.clip_by_block_rms(1.0).update([u], E)
    assert out[0].dtype == torch.complex64
    torch.testing.assert_close(out[0].to(torch.complex128), _block_rms_ref(u, 1.0))


# --- unitwise_norm and adaptive_grad_clip -----------------------------------------------------


def test_unitwise_norm_of_complex_is_the_real_modulus():
    x = torch.tensor([[3 + 4j, 0j], [1j, 1 + 0j]], dtype=torch.complex64)
    got = ft.unitwise_norm(x)
    assert got.dtype == torch.float32
    want = _abs_sq64(x).sum(1, keepdim=True).sqrt().expand(2, 2)
    torch.testing.assert_close(got.double(), want)


def _agc_ref(u: torch.Tensor, p: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """optax's unitwise_clip in float64 with the PyTorch-layout units (all dims but the 0th)."""
    dims = tuple(range(1, u.dim()))
    g_norm = _abs_sq64(u).sum(dims, keepdim=True).sqrt()
    p_norm = _abs_sq64(p).sum(dims, keepdim=True).sqrt()
    limit = clipping * torch.clamp_min(p_norm, eps)
    wide = u.to(torch.complex128 if u.is_complex() else torch.float64)
    return torch.where(g_norm < limit, wide, wide * (limit / torch.clamp_min(g_norm, 1e-6)))


def test_adaptive_grad_clip_of_float16_units_above_65504_is_finite_and_right():
    # Unit norms 31623·√... overflowed to inf in float16 and inf/inf made the update NaN.
    gen = torch.Generator().manual_seed(0)
    u = (torch.rand(3, 2000, generator=gen) * 2000).half()
    p = (torch.rand(3, 2000, generator=gen) * 1000).half()
    out, _ = ft.adaptive_grad_clip(0.01).update([u], E, [p])
    assert out[0].dtype == torch.float16
    torch.testing.assert_close(out[0].double(), _agc_ref(u, p, 0.01, 1e-3), rtol=2e-3, atol=1e-3)


def test_adaptive_grad_clip_of_complex_leaves_uses_moduli():
    u = torch.tensor([[3 + 4j, 1j], [0.1j, 0j]], dtype=torch.complex128)
    p = torch.tensor([[1 + 0j, 0j], [10 + 0j, 0j]], dtype=torch.complex128)
    out, _ = ft.adaptive_grad_clip(0.1).update([u], E, [p])
    torch.testing.assert_close(out[0], _agc_ref(u, p, 0.1, 1e-3))


# --- MultiSteps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True])
def test_multisteps_resumed_past_k_updates_once_then_runs_full_cycles(compiled):
    # Saved after 2 of 4 mini-steps, resumed with k=2: the third mini-step must update (mean of
    # 3) and the next cycle must hold 2 gradients. ``(mini_step + 1) % k`` left mini_step at 1,
    # so the next cycle held a single gradient and has_updated was False after the update.
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    grads = [{"w": torch.tensor([1.0, -2.0], dtype=torch.float64) * (i + 1)} for i in range(5)]
    four = ft.MultiSteps(ft.sgd(1.0), every_k_schedule=4)
    state = four.init(params)
    for g in grads[:2]:
        _, state = four.update(g, state, params)
    two = ft.MultiSteps(ft.sgd(1.0), every_k_schedule=2)
    update = torch.compile(two.update, fullgraph=True, backend=_BACKEND) if compiled else two.update
    outs = []
    for g in grads[2:]:
        u, state = update(g, state, params)
        outs.append(u["w"])
        if len(outs) == 1:
            assert int(state.mini_step) == 0 and bool(two.has_updated(state))
    mean = [-sum(g["w"] for g in grads[a:b]) / (b - a) for a, b in ((0, 3), (3, 5))]
    torch.testing.assert_close(outs[0], mean[0])
    torch.testing.assert_close(outs[1], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(outs[2], mean[1])
    assert (int(state.mini_step), int(state.gradient_step)) == (0, 2)


def test_multisteps_refuses_an_integer_accumulator_dtype():
    # An int32 accumulator truncated each gradient (0.5 → 0) before averaging.
    with pytest.raises(ValueError, match="accumulator_dtype must be a floating-point dtype"):
        ft.MultiSteps(ft.sgd(1.0), 2, accumulator_dtype=torch.int32)


@pytest.mark.parametrize("engines", [("foreach",), ("kernel",), ("kernel", "foreach")])
@pytest.mark.parametrize("opt", [lambda: ft.sgd(1.0, momentum=0.9), lambda: ft.adam(1e-3)])
def test_in_place_engines_rescale_a_float16_norm_above_65504(engines, opt):
    # The engines' clip used the float16 norm (inf) and zeroed every update, as the pure path did.
    import copy

    from functrain.optim import fused

    tx = ft.chain(ft.clip_by_global_norm(1.0), opt())
    params = {"w": torch.zeros(10000, dtype=torch.float16)}
    grads = {"w": torch.full((10000,), 1000.0, dtype=torch.float16)}
    state = tx.init(params)
    updates, _ = tx.update(grads, copy.deepcopy(state), params)
    expected = ft.apply_updates(params, updates)
    assert (expected["w"] != 0).all()
    in_place = {"w": params["w"].clone()}
    done = fused.update_in_place(tx, grads, state, in_place, engines=engines)
    if done is None:
        return  # declined (the CPU SGD kernel takes no half precision): the pure path runs
    if done.engine == "foreach":
        testing.assert_trees_all_equal(in_place, expected)
    else:  # the kernel orders a few operations differently
        testing.assert_trees_all_close(in_place, expected, rtol=1e-3, atol=0)
