"""Second review of the in-place fast paths: ``fused.update_in_place``, ``_pure_fused`` and the
donating train step's ``fast`` helpers, against the member-by-member pure path and float64
maths done by hand.

The property test draws chains from the primitives (``clip_by_global_norm``, ``clip``,
``scale_by_adam`` with nesterov / ``eps_root`` / ``mu_dtype``, ``add_decayed_weights`` with
dict or callable masks and scheduled rates, ``scale_by_learning_rate`` with numbers, 0-d
tensors and schedules, ``trace`` with an accumulator dtype), the aliases, and the wrappers
(``masked`` with dict and callable masks, ``partition``, ``inject_hyperparams``,
``MultiSteps``, ``apply_if_finite``) over trees of mixed float32 / float64 / bfloat16 /
complex64 leaves (transposed, strided slices, zero-size and 0-d), with NaN gradients.
"""

from __future__ import annotations

import math
import warnings

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain.optim import _pure_fused, fused
from functrain.train import fast

F32, F64, BF16, C64 = torch.float32, torch.float64, torch.bfloat16, torch.complex64
TOL = {
    F64: {"rtol": 1e-9, "atol": 1e-12},
    F32: {"rtol": 1e-4, "atol": 1e-5},
    C64: {"rtol": 1e-4, "atol": 1e-5},
    BF16: {"rtol": 5e-2, "atol": 2e-2},
}


def _close(a, b) -> None:
    ft.testing.assert_trees_all_equal_structs(a, b)
    ft.testing.assert_trees_all_equal_dtypes(a, b)
    dtypes = {x.dtype for x in ft.tree.leaves(b) if x.is_floating_point() or x.is_complex()}
    tol = max((TOL[d] for d in dtypes), key=lambda t: t["rtol"], default=TOL[F64])
    ft.testing.assert_trees_all_close(a, b, **tol)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().flatten().clone(memory_format=torch.contiguous_format).view(torch.uint8)


def _snapshot(tree) -> list[torch.Tensor]:
    return [_bits(x) for x in ft.tree.leaves(tree)]


def _unchanged(tree, snap) -> bool:
    return all(torch.equal(_bits(x), s) for x, s in zip(ft.tree.leaves(tree), snap))


def _clone(tree):
    return ft.tree.map(lambda x: torch.empty_like(x).copy_(x), tree)


# ------------------------------------------------------------------------------- regressions


def test_global_norm_of_half_precision_leaves_is_tree_norm():
    # fast.global_norm summed float16 squares in float16: two leaves of norm 200 gave inf
    # (the norm is 282.8), and bfloat16 rounded every square.
    for dtype in (torch.float16, torch.bfloat16):
        leaves = {"a": torch.full((4,), 100.0, dtype=dtype), "b": torch.full((4,), 100.0)}
        leaves["b"] = leaves["b"].to(dtype)
        want = math.sqrt(8 * 100.0**2)
        got = fast.global_norm(leaves)
        assert got.dtype == dtype
        assert abs(float(got) - want) <= 2 * torch.finfo(dtype).eps * want
        gen = torch.Generator().manual_seed(0)
        many = [torch.randn(37, generator=gen).to(dtype) for _ in range(5)]
        exact = torch.linalg.vector_norm(torch.cat([x.double() for x in many]))
        assert torch.equal(fast.global_norm(many), ft.tree.norm(many))
        assert abs(float(fast.global_norm(many)) - float(exact)) <= torch.finfo(dtype).eps * 20


def _sum_loss(p, batch):
    return sum((x.float() * b.float()).sum() for x, b in zip(ft.tree.leaves(p), batch))


def test_step_grad_norm_metric_of_a_float16_model_is_finite():
    # The step's grad_norm metric (fast.global_norm) came out inf for float16 gradients whose
    # norm is 282.8, in both the donating and the pure step.
    for donate in (True, False):
        tx = ft.sgd(1e-4)
        step = ft.make_train_step(_sum_loss, tx, donate=donate)
        params = {"a": torch.ones(4, dtype=torch.float16), "b": torch.ones(4, dtype=torch.float16)}
        state = ft.TrainState.create(params=params, tx=tx, seed=None)
        batch = [torch.full((2, 4), 50.0), torch.full((2, 4), 50.0)]
        _, metrics = step(state, batch)
        want = math.sqrt(8 * 100.0**2)  # every gradient element is 2 · 50
        assert abs(float(metrics["grad_norm"]) - want) <= 1e-3 * want


def test_kernel_engine_update_norm_with_params_that_require_grad():
    # The kernel wrote the update, then its update-norm pass raised ("a view was created in
    # no_grad mode ...") on parameters that require grad: the state was left half-written.
    lr, wd = 0.1, 0.01
    p0 = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    g = torch.tensor([0.5, -0.25, 2.0], dtype=F64)
    for tx, u in (
        # Adam's first step: m̂ = g, v̂ = g², so u = −lr·(g / (|g| + eps) + wd·p).
        (ft.adamw(lr, weight_decay=wd), -lr * (g / (g.abs() + 1e-8) + wd * p0)),
        (ft.sgd(lr, momentum=0.9), -lr * g),  # the first trace is g
    ):
        params = {"w": p0.clone().requires_grad_()}
        done = fused.update_in_place(
            tx, {"w": g.clone()}, tx.init(params), params, update_norm=True
        )
        assert done is not None and done.engine == "kernel"
        torch.testing.assert_close(params["w"].detach(), p0 + u, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(done.update_norm, torch.linalg.vector_norm(u))
        assert not done.update_norm.requires_grad


def test_float64_learning_rate_tensor_the_kernel_cannot_read_is_not_rounded(monkeypatch):
    # On an accelerator a tensor learning rate is not read on the host: the kernel got it as
    # a float32 tensor, so float64 parameters stepped by lr rounded to float32 (0.1 → 0.1 +
    # 1.5e-9). Simulated on the CPU by making the engine treat tensors as unreadable.
    from functrain.optim import _fused_engines

    number = _fused_engines._number
    monkeypatch.setattr(
        _fused_engines, "_number", lambda v: None if isinstance(v, torch.Tensor) else number(v)
    )
    lr = torch.tensor(0.1, dtype=F64)
    p0 = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    g = torch.tensor([0.5, -0.25, 2.0], dtype=F64)
    for tx, u in (
        (ft.adamw(lr, weight_decay=0.0), -0.1 * g / (g.abs() + 1e-8)),
        (ft.sgd(lr, momentum=0.9), -0.1 * g),
    ):
        params = {"w": p0.clone()}
        assert fused.update_in_place(tx, {"w": g}, tx.init(params), params) is not None
        torch.testing.assert_close(params["w"], p0 + u, rtol=1e-15, atol=1e-15)


# ----------------------------------------------------------------------- differential fuzz

SHAPES = [(), (0,), (3,), (2, 3), (3, 1)]
SCHEDULE = ft.warmup_cosine_decay_schedule(0.0, 0.05, 2, 8)


def _matrices(p):
    return ft.tree.map(lambda x: x.ndim > 1, p)


@st.composite
def _leaf_recipes(draw):
    mixed = draw(st.sampled_from([False, False, True]))
    base = draw(st.sampled_from([F64, F64, F32, BF16]))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from([F64, F64, F32, F32, BF16, C64])) if mixed else base
        layout = draw(st.sampled_from(["plain", "plain", "transpose", "slice"]))
        out.append((dtype, draw(st.sampled_from(SHAPES)), layout))
    return out


def _make(recipes, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for i, (dtype, shape, layout) in enumerate(recipes):
        v = torch.randn(shape, generator=gen, dtype=F64)
        if dtype.is_complex:
            v = torch.complex(v, torch.randn(shape, generator=gen, dtype=F64))
        if layout == "transpose" and len(shape) == 2:
            x = v.t().to(dtype).contiguous().t()
        elif layout == "slice" and shape:
            x = torch.zeros((*shape[:-1], 2 * shape[-1] + 1), dtype=dtype)[..., 1::2]
            x.copy_(v)
        else:
            x = v.to(dtype)
        out[f"k{i}"] = x
    return out


def _lr(kind: str):
    return {
        "float": 0.03,
        "tensor": torch.tensor(0.02),
        "tensor64": torch.tensor(0.02, dtype=F64),
        "schedule": SCHEDULE,
        "number_schedule": lambda count: 0.01,
    }[kind]


@st.composite
def _member(draw, keys):
    kind = draw(st.sampled_from(["clip_norm", "clip", "adam", "decay", "lr", "trace", "scale"]))
    if kind == "clip_norm":
        return ft.clip_by_global_norm(draw(st.sampled_from([0.5, 1e3, torch.tensor(0.5)])))
    if kind == "clip":
        return ft.clip(draw(st.sampled_from([0.1, 1.0])))
    if kind == "adam":
        return ft.scale_by_adam(
            b1=0.8,
            b2=0.95,
            eps_root=draw(st.sampled_from([0.0, 1e-10])),
            mu_dtype=draw(st.sampled_from([None, None, F64, F32, BF16])),
            nesterov=draw(st.booleans()),
        )
    if kind == "decay":
        which = draw(st.sampled_from(["none", "callable", "dict"]))
        mask = {"none": None, "callable": _matrices}.get(which)
        if which == "dict":
            mask = {k: draw(st.booleans()) for k in keys}
        rate = draw(st.sampled_from([0.1, torch.tensor(0.1), lambda c: 0.1 / (1 + c)]))
        return ft.add_decayed_weights(rate, mask)
    if kind == "lr":
        kinds = ["float", "tensor", "tensor64", "schedule", "number_schedule"]
        return ft.scale_by_learning_rate(_lr(draw(st.sampled_from(kinds))))
    if kind == "trace":
        return ft.trace(
            draw(st.sampled_from([0.0, 0.9])),
            draw(st.booleans()),
            draw(st.sampled_from([None, F64, F32])),
        )
    return ft.scale(draw(st.sampled_from([-0.05, torch.tensor(-0.05)])))


ALIASES = {
    "sgd": lambda lr: ft.sgd(lr),
    "nesterov": lambda lr: ft.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: ft.adam(lr, nesterov=True),
    "adamw": lambda lr: ft.adamw(lr, weight_decay=0.1, mask=_matrices),
    "adamw_mu": lambda lr: ft.adamw(lr, mu_dtype=BF16),
    "nadamw": lambda lr: ft.nadamw(lr),
    "lion": lambda lr: ft.lion(lr),
    "rmsprop": lambda lr: ft.rmsprop(lr, momentum=0.9),
    "inject": lambda lr: ft.inject_hyperparams(ft.adamw)(learning_rate=lr, weight_decay=0.1),
}


@st.composite
def _optimizer(draw, keys):
    if draw(st.booleans()):
        tx = ft.chain(*draw(st.lists(_member(keys), min_size=1, max_size=4)))
    else:
        lr = _lr(draw(st.sampled_from(["float", "tensor", "schedule"])))
        tx = ALIASES[draw(st.sampled_from(sorted(ALIASES)))](lr)
    wrap = draw(st.sampled_from([None, None, "masked", "dict", "partition", "finite", "multi"]))
    if wrap == "masked":
        tx = ft.masked(tx, _matrices)
    elif wrap == "dict":
        tx = ft.masked(tx, {k: draw(st.booleans()) for k in keys})
    elif wrap == "partition":
        labels = lambda p: ft.tree.map(lambda x: "a" if x.ndim != 1 else "b", p)  # noqa: E731
        tx = ft.partition({"a": tx, "b": ft.adamw(0.01)}, labels)
    elif wrap == "finite":
        tx = ft.apply_if_finite(tx, 2)
    elif wrap == "multi":
        tx = ft.MultiSteps(tx, 2).gradient_transformation()
    return tx


def _member_by_member(tx, grads, state, params):
    _pure_fused.ENABLED = False
    try:
        return tx.update(grads, state, params)
    finally:
        _pure_fused.ENABLED = True


@settings(max_examples=300, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**16), writable=st.booleans(), flag=st.booleans())
def test_fast_paths_follow_the_members_over_several_steps(data, seed, writable, flag):
    gen = torch.Generator().manual_seed(seed)
    params = _make(data.draw(_leaf_recipes()), gen)
    tx = data.draw(_optimizer(list(params)))
    try:
        ref_state = tx.init(params)
    except (TypeError, ValueError):  # e.g. a bfloat16 mu_dtype for a complex leaf
        return
    ref, mine, pf = _clone(params), _clone(params), _clone(params)
    state, pf_state = tx.init(mine), tx.init(pf)
    for _ in range(data.draw(st.integers(1, 4))):
        grads = ft.tree.map(lambda p: torch.randn(p.shape, generator=gen, dtype=p.dtype), params)
        if data.draw(st.sampled_from([0, 0, 0, 1])) and grads["k0"].numel():
            grads["k0"].view(-1)[0] = float("nan")
        before = _snapshot(grads)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ref_u, ref_new = _member_by_member(tx, grads, ref_state, ref)
        except (TypeError, UserWarning):  # clip of complex updates, a real trace dtype of a
            return  # complex leaf: the members name it (not the fast paths' concern)
        # The pure path through the fused kernel: the members' numbers, inputs untouched.
        pf_snap = _snapshot((pf, pf_state))
        pf_u, pf_new = tx.update(grads, pf_state, pf)
        assert _unchanged(grads, before) and _unchanged((pf, pf_state), pf_snap)
        _close(pf_u, ref_u)
        _close(pf_new, ref_new)
        found = ~ft.all_finite(grads) if flag else None
        given_grads = _clone(grads) if writable else grads
        snap = _snapshot((mine, state))
        done = fused.update_in_place(
            tx, given_grads, state, mine, found_inf=found, grads_writable=writable
        )
        event(f"engine: {None if done is None else done.engine}")
        assert _unchanged(grads, before)
        if done is None:  # falls back having touched nothing
            assert _unchanged((mine, state), snap)
            return
        state = done.opt_state
        if found is not None and bool(found):  # skipped: nothing moves, counters included
            _close(mine, ref)
            _close(state, ref_state)
            continue
        ref, ref_state = ft.apply_updates(ref, ref_u), ref_new
        pf, pf_state = ft.apply_updates(pf, pf_u), pf_new
        _close(mine, ref)
        _close(state, ref_state)
