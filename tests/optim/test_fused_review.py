"""Review of the in-place optimizer fast paths (``functrain.optim.fused``).

The ``"foreach"`` engine promises the pure path's numbers bit for bit: ``tx.update`` member by
member (``_pure_fused`` off) then ``ft.apply_updates``. These tests hold it to that where the
leaves are float16 or bfloat16, or the gradients have another dtype than the parameters
(bfloat16 gradients of float32 parameters, as autocast gives), where it used to round
differently; hand references use plain torch ops in the updates' dtype. The ``"kernel"``
engine is checked against float64 maths on leaves longer than a SIMD vector, and both against
inputs they must leave to the pure path (mis-shaped gradients, zero momentum, ...).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain.optim import _pure_fused, fused

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
FLOATS = [F16, BF16, F32, F64]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaNs compare equal, -0.0 differs from 0.0)."""
    return t.detach().flatten().clone(memory_format=torch.contiguous_format).view(torch.uint8)


def _assert_same_bits(got, want, what: str) -> None:
    ft.testing.assert_trees_all_equal_structs(got, want)
    for i, (a, b) in enumerate(zip(ft.tree.leaves(got), ft.tree.leaves(want))):
        assert a.dtype == b.dtype, f"{what} leaf {i}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{what} leaf {i}: shape {a.shape} != {b.shape}"
        if not torch.equal(_bits(a), _bits(b)):
            diff = (a.double() - b.double()).abs().nan_to_num(0).max()
            raise AssertionError(f"{what} leaf {i} ({a.dtype}) differs by up to {diff}")


def _member_by_member(tx, grads, state, params):
    before, _pure_fused.ENABLED = _pure_fused.ENABLED, False
    try:
        return tx.update(grads, state, params)
    finally:
        _pure_fused.ENABLED = before


def _run_both(tx, params, grad_list, engines=("foreach",)):
    """Runs the pure path and ``update_in_place`` side by side; checks each step bit for bit
    (params, state, update norm) and that the gradients are never written."""
    ref_p, mine = copy.deepcopy(params), copy.deepcopy(params)
    ref_s, state = tx.init(ref_p), tx.init(mine)
    init_dtypes = [x.dtype for x in ft.tree.leaves(state)]
    for step, grads in enumerate(grad_list):
        u, ref_s = _member_by_member(tx, grads, ref_s, ref_p)
        ref_p = ft.apply_updates(ref_p, u)
        grads_before = [_bits(g) for g in ft.tree.leaves(grads)]
        done = fused.update_in_place(tx, grads, state, mine, engines=engines, update_norm=True)
        assert done is not None and done.engine == engines[0]
        state = done.opt_state
        assert all(torch.equal(_bits(g), b) for g, b in zip(ft.tree.leaves(grads), grads_before))
        _assert_same_bits(mine, ref_p, f"step {step} params")
        _assert_same_bits(state, ref_s, f"step {step} state")
        assert [x.dtype for x in ft.tree.leaves(state)] == init_dtypes
        _assert_same_bits(done.update_norm, ft.tree.norm(u), f"step {step} update norm")
    return mine, state


def _r(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One rounding to ``dtype``, back in float32 for the next operation."""
    return x.to(dtype).float()


# ---------------------------------------------------------------------------- regressions


def test_bfloat16_gradients_of_float32_params_adamw_bitwise():
    """The known case: the engine multiplied by the learning rate in place, and the in-place
    ``torch._foreach_mul_`` rounds a Python scalar to bfloat16 first (``x · bf16(−0.1)``, not
    ``x · −0.1``): the parameters moved by one bfloat16 ulp of the update more or less."""
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(64, generator=gen), "m": torch.randn(8, 8, generator=gen)}
    grads = [
        ft.tree.map(lambda p: torch.randn(p.shape, generator=gen).to(BF16), params)
        for _ in range(3)
    ]
    tx = ft.adamw(0.1, weight_decay=0.1)
    mine, _ = _run_both(tx, params, grads)
    # Hand reference for step 1 in plain torch ops on the updates' dtype: Adam's first
    # direction is sign(g) (g / (|g| + eps) in float32, rounded to bfloat16), then
    # u = −0.1 · (d + 0.1 · bf16(p)) out of place in bfloat16, and p + u in float32.
    want = {}
    for k, p in params.items():
        decayed = torch.sign(grads[0][k]).add(p.to(BF16), alpha=0.1)
        want[k] = p + decayed * -0.1
    one = copy.deepcopy(params)
    fused.update_in_place(tx, grads[0], tx.init(one), one, engines=("foreach",))
    _assert_same_bits(one, want, "hand reference")
    assert mine["w"].dtype == F32


def test_bfloat16_nesterov_momentum_scales_out_of_place():
    """All-bfloat16 leaves: the Nesterov output is a temporary of the engine's, so the learning
    rate was multiplied in place, with the rounded scalar."""
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(300, generator=gen).to(BF16)}
    grads = [{"w": torch.randn(300, generator=gen).to(BF16)} for _ in range(3)]
    tx = ft.sgd(0.1, momentum=0.9, nesterov=True)
    _run_both(tx, params, grads)
    # Step 1 in plain bfloat16 torch ops: trace t = g; out = g + 0.9·t; u = −0.1·out.
    g = grads[0]["w"]
    want = params["w"] + g.add(g, alpha=0.9) * -0.1
    one = copy.deepcopy(params)
    fused.update_in_place(tx, grads[0], tx.init(one), one, engines=("foreach",))
    _assert_same_bits(one["w"], want, "hand reference")


def test_float16_schedule_returning_a_number():
    """A schedule that returns a Python number scales float16 temporaries: out of place too."""
    params = [torch.linspace(-2, 2, 257, dtype=F16)]
    grads = [[torch.linspace(3, -1, 257, dtype=F16)] for _ in range(2)]
    tx = ft.chain(ft.trace(0.5, nesterov=True), ft.scale_by_schedule(lambda count: -0.03))
    _run_both(tx, params, grads)


def test_momentum_trace_keeps_its_float32_dtype_with_bfloat16_gradients():
    """The engine computed the trace in the gradients' bfloat16 and stored it so: the state's
    float32 trace became bfloat16 after one step (the pure trace keeps its init dtype)."""
    params = {"w": torch.tensor([1.0, -2.0, 3.0])}
    g = torch.tensor([0.1, 0.2, -0.3]).to(BF16)
    tx = ft.sgd(0.5, momentum=0.9)
    state = tx.init(params)
    for _ in range(2):
        state = fused.update_in_place(tx, {"w": g}, state, params, engines=("foreach",)).opt_state
    trace = ft.tree.leaves(state)[0]
    assert trace.dtype == F32
    # t₁ = g, t₂ = g + 0.9·t₁ in float32 (the wider of the update's and the trace's dtypes).
    want = g.float().add(g.float(), alpha=0.9)
    _assert_same_bits(trace, want, "trace")
    _run_both(tx, {"w": torch.tensor([1.0, -2.0, 3.0])}, [{"w": g}] * 3)


def test_dtype_reading_mask_sees_the_updates_dtypes():
    """``masked`` calls its mask function on the updates (optax's ``mask(updates)``); the
    planner called it on the parameters, so a mask that reads dtypes picked other leaves when
    the gradients are bfloat16 and the parameters float32 (weight decay applied to no leaf on
    the pure path, to every float32 leaf in place)."""

    def float32_only(tree):
        return ft.tree.map(lambda x: x.dtype == F32, tree)

    params = {"w": torch.ones(3), "h": torch.ones(2, dtype=BF16)}
    grads = {"w": torch.ones(3, dtype=BF16), "h": torch.ones(2, dtype=BF16)}
    tx = ft.chain(ft.add_decayed_weights(0.5, float32_only), ft.sgd(0.1))
    mine = copy.deepcopy(params)
    assert fused.update_in_place(tx, grads, tx.init(mine), mine) is not None
    # No update leaf is float32, so nothing decays: p − 0.1·g, rounded to bfloat16 first.
    step = _r(torch.tensor(-0.1) * 1.0, BF16)
    _assert_same_bits(mine["w"], torch.full((3,), 1.0 + float(step)), "w")
    _run_both(tx, params, [grads])
    nested = ft.chain(ft.masked(ft.chain(ft.add_decayed_weights(0.5, float32_only)), _vectors))
    _run_both(ft.chain(nested, ft.sgd(0.1)), params, [grads])


def _vectors(tree):
    return ft.tree.map(lambda x: x.ndim == 1, tree)


# ---------------------------------------------------------------------------- property


SHAPES = [(), (0,), (1,), (7,), (3, 4), (4, 3)]
SCHED = ft.warmup_cosine_decay_schedule(0.0, 0.05, 2, 8)


def _lr(kind: str):
    return {
        "float": 0.03,
        "sched": SCHED,
        "f32": torch.tensor(0.02),
        "f64": torch.tensor(0.02, dtype=F64),
        "number_sched": lambda count: 0.01,
    }[kind]


def _optimizer(core: str, lr, mask, clip: str, decay: str):
    """An optimizer the foreach engine recognises (every primitive it knows)."""
    if core == "adamw":
        tx = ft.adamw(lr, b1=0.8, b2=0.95, weight_decay=0.1, mask=mask)
    elif core == "nadamw":
        tx = ft.nadamw(lr, weight_decay=0.05, mask=mask)
    elif core == "eps_root":
        tx = ft.adam(lr, eps_root=1e-10)
    elif core == "mu_bf16":
        tx = ft.adam(lr, mu_dtype=BF16)
    elif core == "momentum":
        tx = ft.sgd(lr, momentum=0.9)
    elif core == "nesterov":
        tx = ft.sgd(lr, momentum=0.8, nesterov=True)
    elif core == "acc64":
        tx = ft.sgd(lr, momentum=0.9, accumulator_dtype=F64)
    elif core == "inject":
        tx = ft.inject_hyperparams(ft.adamw, static_args="mask")(
            learning_rate=lr, weight_decay=torch.tensor(0.1), mask=mask
        )
    elif core == "named":
        tx = ft.named_chain(("adam", ft.scale_by_adam()), ("lr", ft.scale_by_learning_rate(lr)))
    else:
        raise AssertionError(core)
    parts = []
    if clip == "first":
        parts.append(ft.clip_by_global_norm(0.5))
    if decay == "masked":
        parts.append(ft.add_decayed_weights(0.01, _vectors))
    elif decay == "sched":
        parts.append(ft.add_decayed_weights(lambda count: 0.02))
    elif decay == "tensor":
        parts.append(ft.add_decayed_weights(torch.tensor(0.02, dtype=F64)))
    if parts:
        tx = ft.chain(*parts, tx)
    if clip == "after":  # a clip of the final updates
        tx = ft.chain(tx, ft.masked(ft.clip_by_global_norm(1e-3), _vectors))
    return tx


@st.composite
def _leaves(draw):
    out = []
    for _ in range(draw(st.integers(1, 4))):
        p_dtype = draw(st.sampled_from(FLOATS))
        g_dtype = draw(st.sampled_from([p_dtype, p_dtype, *FLOATS]))
        shape = draw(st.sampled_from(SHAPES))
        out.append((p_dtype, g_dtype, shape, draw(st.booleans())))
    return out


CORES = [
    "adamw",
    "nadamw",
    "eps_root",
    "mu_bf16",
    "momentum",
    "nesterov",
    "acc64",
    "inject",
    "named",
]
GRAD_KINDS = ["normal", "normal", "zeros", "tiny", "huge"]


def _grad(p: torch.Tensor, dtype: torch.dtype, kind: str, gen: torch.Generator):
    g = torch.randn(p.shape, generator=gen, dtype=F64)
    if kind == "zeros":
        g = torch.zeros_like(g)
    elif kind == "tiny":
        g = g * 1e-6
    elif kind == "huge":
        g = g * math.sqrt(torch.finfo(dtype).max)
    return g.to(dtype)


@given(
    leaves=_leaves(),
    core=st.sampled_from(CORES),
    lr=st.sampled_from(["float", "sched", "f32", "f64", "number_sched"]),
    mask=st.booleans(),
    clip=st.sampled_from(["none", "first", "after"]),
    decay=st.sampled_from(["none", "masked", "sched", "tensor"]),
    kinds=st.lists(st.sampled_from(GRAD_KINDS), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_foreach_engine_is_bitwise_the_pure_path_for_any_dtypes(
    leaves, core, lr, mask, clip, decay, kinds, seed
):
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for i, (p_dtype, _, shape, transposed) in enumerate(leaves):
        values = torch.randn(shape, generator=gen, dtype=F64).to(p_dtype)
        if transposed and len(shape) == 2:
            values = values.t().contiguous().t()  # a non-contiguous parameter
        params[f"k{i}"] = values
    grads = [
        {
            f"k{i}": _grad(params[f"k{i}"], g_dtype, kind, gen)
            for i, (_, g_dtype, _, _) in enumerate(leaves)
        }
        for kind in kinds
    ]
    tx = _optimizer(core, _lr(lr), _vectors if mask else None, clip, decay)
    _run_both(tx, params, grads)


def test_writable_gradients_shared_by_two_leaves_are_unscaled_once():
    """With ``grads_writable`` the kernels unscale each gradient in place (the clipping factor
    folded into ``grad_scale``); one tensor given as the gradient of two leaves was unscaled
    twice, so the second leaf moved by ``factor²·g`` instead of ``factor·g``."""
    for dtype in (F32, F64):
        g = torch.tensor([3.0, 4.0], dtype=dtype)
        params = {"a": torch.zeros(2, dtype=dtype), "b": torch.zeros(2, dtype=dtype)}
        tx = ft.chain(ft.clip_by_global_norm(1.0), ft.sgd(1.0))
        done = fused.update_in_place(
            tx, {"a": g, "b": g}, tx.init(params), params, grads_writable=True
        )
        assert done is not None
        # ‖(g, g)‖ = √50, so each leaf moves by −g/√50.
        want = -torch.tensor([3.0, 4.0], dtype=F64) / math.sqrt(50.0)
        for leaf in params.values():
            torch.testing.assert_close(leaf.double(), want, rtol=1e-6, atol=0)


def test_zero_momentum_sgd_is_not_given_to_the_kernel():
    """``sgd(lr, momentum=0.0)`` keeps a trace; ``torch._fused_sgd_`` raises for momentum
    buffers with momentum 0, so the default engines crashed instead of taking foreach."""
    for nesterov in (False, True):
        params = [torch.tensor([1.0, -2.0])]
        tx = ft.sgd(0.5, momentum=0.0, nesterov=nesterov)
        state = tx.init(params)
        for _ in range(2):
            done = fused.update_in_place(tx, [torch.tensor([0.25, 1.0])], state, params)
            assert done is not None and done.engine == "foreach"
            state = done.opt_state
        # Two plain SGD steps of −0.5·g; the trace holds the last gradient (0·t + g).
        _assert_same_bits(params[0], torch.tensor([0.75, -3.0]), "params")
        _assert_same_bits(ft.tree.leaves(state)[0], torch.tensor([0.25, 1.0]), "trace")


def test_donating_step_with_zero_momentum_sgd():
    """The user-visible form of the crash: a donating train step with ``sgd(lr, momentum=0.0)``
    raised inside the kernel and consumed the state."""

    def loss(p, batch):
        return (p["w"] * batch).sum() ** 2

    tx = ft.sgd(0.1, momentum=0.0)
    step = ft.make_train_step(loss, tx, donate=True)
    state = ft.TrainState.create(params={"w": torch.ones(3)}, tx=tx, seed=None)
    state, _ = step(state, torch.ones(2, 3))
    # Loss S² with S = Σ_rows Σ_j w_j = 6 over two rows of ones: d/dw_j = 2·S·2 = 24.
    torch.testing.assert_close(state.params["w"], torch.full((3,), 1 - 0.1 * 24.0))


def test_empty_tree_keeps_the_clip_state():
    """With no parameter leaves the kernel engine returned ``None`` as a leading clip's state
    (the pure path's is ``EmptyState()``): the state's structure changed after one step."""
    for tx in (
        ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(0.1)),
        ft.chain(ft.clip_by_global_norm(1.0), ft.sgd(0.1, 0.9)),
    ):
        for engine in ("kernel", "foreach"):
            done = fused.update_in_place(tx, {}, tx.init({}), {}, engines=(engine,))
            assert done is not None and done.engine == engine
            assert done.opt_state[0] == ft.EmptyState()
            ft.testing.assert_trees_all_equal_structs(done.opt_state, tx.init({}))


def test_foreach_engine_updates_params_that_require_grad():
    """The kernels update parameters that require grad (the caller owns them); the foreach
    engine raised at its final in-place add, after it had written the moments (a torn state)."""
    tx = ft.nadamw(0.1, weight_decay=0.1)  # foreach only
    grads = {"w": torch.tensor([0.5, -1.0, 2.0])}
    plain = {"w": torch.tensor([1.0, 2.0, 3.0])}
    u, want_state = _member_by_member(tx, grads, tx.init(plain), plain)
    params = {"w": plain["w"].clone().requires_grad_()}
    done = fused.update_in_place(tx, grads, tx.init(params), params)
    assert done is not None and done.engine == "foreach"
    _assert_same_bits(params["w"].detach(), plain["w"] + u["w"], "params")
    _assert_same_bits(done.opt_state, want_state, "state")


def test_half_precision_sgd_is_not_given_to_the_cpu_kernel():
    """``torch._fused_sgd_`` on CPU updates only the last ``numel % 16`` elements of a float16
    or bfloat16 tensor (torch 2.13); the kernel engine used it, so SGD did not move most
    half-precision weights. Reference: one step from 0 with g = 1 moves by −lr (Nesterov:
    −lr·(1 + momentum)), exact in every dtype here."""
    for dtype in (F16, BF16):
        for tx, move in (
            (ft.sgd(0.5), -0.5),
            (ft.sgd(0.5, momentum=0.5), -0.5),
            (ft.sgd(0.5, momentum=0.5, nesterov=True), -0.75),
        ):
            params = {"w": torch.zeros(40, dtype=dtype), "b": torch.zeros(3, dtype=dtype)}
            grads = {"w": torch.ones(40, dtype=dtype), "b": torch.ones(3, dtype=dtype)}
            done = fused.update_in_place(tx, grads, tx.init(params), params, update_norm=True)
            assert done is not None
            for leaf in params.values():
                assert bool((leaf == move).all()), (dtype, done.engine, leaf)
            want = torch.tensor(abs(move) * math.sqrt(43.0), dtype=F64)
            torch.testing.assert_close(done.update_norm.double(), want, rtol=1e-2, atol=0)


def test_kernel_update_norm_of_half_precision_params_neither_underflows_nor_overflows():
    """The kernel engine reports ‖p_new − p_old‖; it squared and summed float16 changes in
    float16: a step of 1e-4 per element (square 1e-8, below float16's smallest subnormal)
    gave 0, a step of 1 over 1e5 elements (sum 1e5 > 65504) gave inf. Reference: the float64
    norm of the actual change."""
    gen = torch.Generator().manual_seed(2)
    cases = [(1e-4, 40, 2000), (1e-4, 1, 100_000), (1.0, 1, 100_000)]  # many small, one big
    for dtype in (F16, BF16):
        for lr, leaves, size in cases:
            params = {f"w{i}": torch.randn(size, generator=gen).to(dtype) for i in range(leaves)}
            grads = ft.tree.map(lambda p: torch.randn(p.shape, generator=gen).to(dtype), params)
            before = copy.deepcopy(params)
            tx = ft.adamw(lr)
            done = fused.update_in_place(
                tx, grads, tx.init(params), params, update_norm=True, engines=("kernel",)
            )
            assert done is not None and done.update_norm.dtype == dtype
            change = [(params[k].double() - before[k].double()).square().sum() for k in params]
            want = torch.stack(change).sum().sqrt()
            assert 0 < float(want) < 1e4
            torch.testing.assert_close(done.update_norm.double(), want, rtol=1e-2, atol=0)


def test_gradients_of_the_wrong_shape_are_left_to_the_pure_path():
    """A gradient whose shape is not its parameter's: the kernel engine paired elements by
    flat index (reading past the end of a smaller gradient) and the foreach engine broadcast a
    (3, 1) or (1, 4) gradient, both silently; the pure path raises a TreeMismatchError naming
    the leaf."""
    for shape in [(12,), (4, 3), (3, 1), (1, 4), (2, 4)]:
        for engine in ("kernel", "foreach"):
            params = {"w": torch.zeros(3, 4)}
            tx = ft.adamw(0.1)
            state = tx.init(params)
            grads = {"w": torch.ones(shape)}
            assert fused.update_in_place(tx, grads, state, params, engines=(engine,)) is None
            assert not any(bool(x.any()) for x in ft.tree.leaves((params, state)))
        with pytest.raises(ft.tree.TreeMismatchError, match=r"updates\['w'\]"):
            tx.update(grads, tx.init(params), params)


# ---------------------------------------------------------------------------- kernels, float64


def _reference_step(core: str, clip: float | None, params: dict, grads: dict) -> dict:
    """One step of ``_kernel_case(core, clip)`` from fresh state, in float64 by hand."""
    lr, wd, b1, b2, eps, mom = 0.05, 0.1, 0.8, 0.95, 1e-8, 0.5
    p = {k: v.double() for k, v in params.items()}
    g = {k: v.double() for k, v in grads.items()}
    if clip is not None:
        total = math.sqrt(sum(float((x * x).sum()) for x in g.values()))
        factor = 1.0 if total < clip else clip / total
        g = {k: x * factor for k, x in g.items()}
    out = {}
    for k in p:
        x, d = p[k], g[k]
        if core in ("sgd", "momentum", "nesterov", "coupled_adam"):
            d = d + wd * x  # coupled decay
        if core == "nesterov":
            d = d + mom * d  # trace t = d on the first step; u = d + mom·t
        if core in ("adamw", "coupled_adam"):
            m, v = (1 - b1) * d, (1 - b2) * d * d
            d = (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
            if core == "adamw":
                d = d + wd * x
        out[k] = x - lr * d
    return out


def _kernel_case(core: str, clip: float | None):
    tx = {
        "sgd": lambda: ft.chain(ft.add_decayed_weights(0.1), ft.sgd(0.05)),
        "momentum": lambda: ft.chain(ft.add_decayed_weights(0.1), ft.sgd(0.05, 0.5)),
        "nesterov": lambda: ft.chain(ft.add_decayed_weights(0.1), ft.sgd(0.05, 0.5, True)),
        "adamw": lambda: ft.adamw(torch.tensor(0.05), b1=0.8, b2=0.95, weight_decay=0.1),
        "coupled_adam": lambda: ft.chain(ft.add_decayed_weights(0.1), ft.adam(0.05, 0.8, 0.95)),
    }[core]()
    return tx if clip is None else ft.chain(ft.clip_by_global_norm(clip), tx)


@given(
    dtype=st.sampled_from(FLOATS),
    shapes=st.lists(st.sampled_from([(), (0,), (17,), (3, 11), (40,)]), min_size=1, max_size=3),
    core=st.sampled_from(["sgd", "momentum", "nesterov", "adamw", "coupled_adam"]),
    clip=st.sampled_from([None, 0.5]),
    writable=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_default_engines_match_float64_maths_beyond_one_vector_width(
    dtype, shapes, core, clip, writable, seed
):
    """Against float64 maths, with leaves longer than a SIMD vector (the existing fuzz used
    at most 12 elements, where the broken CPU half-precision SGD kernel happened to work)."""
    gen = torch.Generator().manual_seed(seed)
    params = {f"k{i}": torch.randn(s, generator=gen).to(dtype) for i, s in enumerate(shapes)}
    grads = ft.tree.map(lambda p: torch.randn(p.shape, generator=gen).to(dtype), params)
    want = _reference_step(core, clip, params, grads)
    tx = _kernel_case(core, clip)
    mine = copy.deepcopy(params)
    done = fused.update_in_place(tx, grads, tx.init(mine), mine, grads_writable=writable)
    assert done is not None
    eps = torch.finfo(dtype).eps
    for k in params:
        scale = float(want[k].abs().max()) if want[k].numel() else 0.0
        # The result's own rounding, and float32 arithmetic (or float16 gradients) before it.
        atol = 2 * max(eps, 1e-6) * (scale + 1)
        torch.testing.assert_close(mine[k].double(), want[k], rtol=0, atol=atol)
