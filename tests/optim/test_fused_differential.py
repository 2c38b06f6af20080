"""Differential fuzz: the in-place fused optimizer path against the pure path.

``fused.update_in_place`` (and the donating train step built on it) promises the numbers of
``tx.update`` then ``ft.apply_updates`` (and of ``donate=False``) for every chain, state and
metric, to float rounding. Hypothesis draws parameter trees (mixed dtypes, empty and 0-d
leaves, transposes, slices, disjoint views of one buffer), optimizer chains the fused engines
recognise and some they do not, and gradients with zeros, huge values, NaN and inf; the two
paths are run side by side and compared member by member.
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st

import functrain as ft
from functrain.optim import _pure_fused, fused

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# Tolerances per dtype: the kernels order a few operations differently, and a one-ulp
# difference in a low-precision parameter can move a later step by about as much again.
TOL = {
    F64: {"rtol": 1e-9, "atol": 1e-12},
    F32: {"rtol": 1e-4, "atol": 1e-5},
    F16: {"rtol": 1e-2, "atol": 2e-3},
    BF16: {"rtol": 5e-2, "atol": 2e-2},
}


def _tol(trees) -> dict[str, float]:
    dtypes = {x.dtype for x in ft.tree.leaves(trees) if x.is_floating_point()}
    worst = max((TOL[d] for d in dtypes if d in TOL), key=lambda t: t["rtol"], default=TOL[F64])
    return worst


def _close(a, b, scale: float = 0.0, **tol) -> None:
    """``a`` close to ``b``; ``scale`` is the largest magnitude that met in a sum on the way
    (a sum that cancels keeps the rounding error of its terms, not of its result)."""
    ft.testing.assert_trees_all_equal_structs(a, b)
    ft.testing.assert_trees_all_equal_dtypes(a, b)
    tol = dict(tol or _tol(b))
    floats = [x for x in ft.tree.leaves(b) if x.is_floating_point()]
    eps = max((torch.finfo(x.dtype).eps for x in floats), default=0.0)
    tol["atol"] = max(tol["atol"], 8 * eps * scale)
    ft.testing.assert_trees_all_close(a, b, **tol)


def _magnitude(*trees) -> float:
    """The largest finite magnitude in ``trees`` (0 when none)."""
    leaves = [x for x in ft.tree.leaves(trees) if x.is_floating_point() and x.numel()]
    if not leaves:
        return 0.0
    return max(float(torch.nan_to_num(x.double(), 0, 0, 0).abs().max()) for x in leaves)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaNs compare equal, -0.0 differs from 0.0)."""
    return t.detach().flatten().clone(memory_format=torch.contiguous_format).view(torch.uint8)


def _snapshot(tree):
    return [(x.dtype, x.shape, x.stride(), _bits(x)) for x in ft.tree.leaves(tree)]


def _same_bits(tree, snap) -> bool:
    now = _snapshot(tree)
    return len(now) == len(snap) and all(
        a[:3] == b[:3] and torch.equal(a[3], b[3]) for a, b in zip(now, snap)
    )


def _clone(tree):
    """A copy with each leaf's own strides (``empty_like`` keeps a dense layout)."""
    return ft.tree.map(lambda x: torch.empty_like(x).copy_(x), tree)


# ---------------------------------------------------------------------------- parameters

SHAPES = [(), (0,), (1,), (5,), (3, 4), (4, 1), (0, 3)]


@st.composite
def layouts(draw):
    """Leaf recipes ``(dtype, shape, layout)``; layout is how the leaf's memory is made."""
    mixed = draw(st.booleans())
    base = draw(st.sampled_from([F32, F64, BF16, F16]))
    n = draw(st.integers(1, 5))
    out = []
    for _ in range(n):
        dtype = draw(st.sampled_from([F32, F64, BF16, F16])) if mixed else base
        shape = draw(st.sampled_from(SHAPES))
        layout = draw(st.sampled_from(["plain", "plain", "transpose", "slice", "shared"]))
        out.append((dtype, shape, layout))
    return out


def _make_leaves(recipes, gen: torch.Generator) -> list[torch.Tensor]:
    leaves: list[torch.Tensor | None] = [None] * len(recipes)
    shared: dict[torch.dtype, list[int]] = {}
    for i, (dtype, shape, layout) in enumerate(recipes):
        values = torch.randn(shape, generator=gen, dtype=F64)
        if layout == "transpose" and len(shape) == 2:
            leaves[i] = values.t().to(dtype).contiguous().t()
        elif layout == "slice" and len(shape) >= 1:
            big = torch.zeros((*shape[:-1], 2 * shape[-1] + 1), dtype=dtype)
            leaves[i] = big[..., 1::2]
            leaves[i].copy_(values)
        elif layout == "shared":
            shared.setdefault(dtype, []).append(i)
            leaves[i] = values.to(dtype)
        else:
            leaves[i] = values.to(dtype)
    for dtype, idx in shared.items():  # disjoint views of one flat buffer
        sizes = [leaves[i].numel() for i in idx]
        buf = torch.empty(sum(sizes) + 1, dtype=dtype)
        for i, piece in zip(idx, buf[1:].split(sizes)):
            leaves[i] = piece.view(recipes[i][1]).copy_(leaves[i])
    return leaves  # type: ignore[return-value]


def _nest(leaves: list, kind: int):
    """A pytree of dicts, lists and tuples holding ``leaves`` in order."""
    if kind == 0:
        return {f"k{i}": x for i, x in enumerate(leaves)}
    if kind == 1:
        return list(leaves)
    head, tail = leaves[:1], leaves[1:]
    return {"a": tuple(head), "z": [{"x": t} for t in tail] if tail else []}


# ---------------------------------------------------------------------------- optimizers


def _matrices(p):
    return ft.tree.map(lambda x: x.ndim > 1, p)


def _labels(p):
    return ft.tree.map(lambda x: "m" if x.ndim > 1 else "v", p)


SCHED = ft.warmup_cosine_decay_schedule(0.0, 0.05, 2, 8)


def _lr(kind: str):
    return {"float": 0.03, "sched": SCHED, "tensor": torch.tensor(0.02)}[kind]


def _core(name: str, lr, mask):
    if name == "adam":
        return ft.adam(lr, b1=0.8, b2=0.95)
    if name == "adamw":
        return ft.adamw(lr, weight_decay=0.1, mask=mask)
    if name == "sgd":
        return ft.sgd(lr)
    if name == "momentum":
        return ft.sgd(lr, momentum=0.9)
    if name == "nesterov":
        return ft.sgd(lr, momentum=0.8, nesterov=True)
    if name == "lion":
        return ft.lion(lr)
    if name == "nadamw":
        return ft.nadamw(lr, weight_decay=0.05, mask=mask)
    if name == "eps_root":
        return ft.adam(lr, eps_root=1e-10)
    if name == "inject_adamw":
        return ft.inject_hyperparams(ft.adamw, static_args="mask")(
            learning_rate=lr, weight_decay=torch.tensor(0.1), mask=mask
        )
    if name == "inject_sgd":
        return ft.inject_hyperparams(ft.sgd)(learning_rate=lr, momentum=0.9)
    if name == "adam_schedule":
        return ft.chain(ft.scale_by_adam(), ft.scale_by_schedule(lambda c: -0.01 / (1.0 + c)))
    if name == "scale":
        return ft.chain(ft.trace(0.5), ft.scale(-0.05))
    raise AssertionError(name)


CORES = [
    "adam",
    "adamw",
    "sgd",
    "momentum",
    "nesterov",
    "lion",
    "nadamw",
    "eps_root",
    "inject_adamw",
    "inject_sgd",
    "adam_schedule",
    "scale",
]


@st.composite
def optimizers(draw):
    """A recipe (for the failure report) and the optimizer it builds."""
    core = draw(st.sampled_from(CORES))
    lr = draw(st.sampled_from(["float", "sched", "tensor"]))
    mask = draw(st.sampled_from([None, _matrices]))
    clip = draw(st.sampled_from([None, 0.5, 1e3]))
    decay = draw(st.sampled_from([None, 0.01, "masked"]))
    wrap = draw(st.sampled_from([None, None, "masked", "partition", "if_finite", "multi_steps"]))
    tx = _core(core, _lr(lr), mask)
    parts = []
    if clip is not None:
        parts.append(ft.clip_by_global_norm(clip))
    if decay == "masked":
        parts.append(ft.add_decayed_weights(0.01, _matrices))
    elif decay is not None:
        parts.append(ft.add_decayed_weights(decay))
    if parts:
        tx = ft.chain(*parts, tx)
    if wrap == "masked":
        tx = ft.chain(ft.masked(ft.clip_by_global_norm(0.3), _matrices), tx)
    elif wrap == "partition":
        tx = ft.partition({"m": tx, "v": ft.sgd(0.01, momentum=0.5)}, _labels)
    elif wrap == "if_finite":
        tx = ft.apply_if_finite(tx, 2)
    elif wrap == "multi_steps":
        tx = ft.MultiSteps(tx, 2).gradient_transformation()
    return (core, lr, mask is not None, clip, decay, wrap), tx


# ---------------------------------------------------------------------------- gradients

GRAD_KINDS = ["normal", "normal", "normal", "zeros", "tiny", "huge", "nan", "inf"]


def _grads(params, kind: str, gen: torch.Generator, like: bool = False):
    """Gradients of ``kind``; contiguous, or with each parameter's strides if ``like``."""

    def one(p):
        g = torch.randn(p.shape, generator=gen, dtype=F64)
        if kind == "zeros":
            g = torch.zeros_like(g)
        elif kind == "tiny":
            g = g * 1e-6
        elif kind == "huge":  # squares overflow in the leaf's dtype, in every engine
            g = g * 1e4 * math.sqrt(torch.finfo(p.dtype).max)
        elif kind in ("nan", "inf") and g.numel():
            g.view(-1)[0] = float(kind)
        return torch.empty_like(p).copy_(g) if like else g.to(p.dtype)

    return ft.tree.map(one, params)


# ---------------------------------------------------------------------------- in place


@given(
    recipes=layouts(),
    nest=st.integers(0, 2),
    opt=optimizers(),
    kinds=st.lists(st.sampled_from(GRAD_KINDS), min_size=1, max_size=6),
    flag=st.sampled_from(["none", "found_inf"]),
    like=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_update_in_place_matches_tx_update(recipes, nest, opt, kinds, flag, like, seed):
    _, tx = opt
    gen = torch.Generator().manual_seed(seed)
    params = _nest(_make_leaves(recipes, gen), nest)
    ref_params, mine = _clone(params), params
    ref_state, state = tx.init(ref_params), tx.init(mine)
    scale = 0.0
    for kind in kinds:
        grads = _grads(params, kind, gen, like)
        found = ~ft.all_finite(grads) if flag == "found_inf" else None
        before = _snapshot((mine, state, grads))
        done = fused.update_in_place(tx, grads, state, mine, found_inf=found, update_norm=True)
        event(f"engine: {None if done is None else done.engine}")
        if done is None:
            assert _same_bits((mine, state, grads), before), "None, yet something was written"
            return
        assert _same_bits(grads, before[len(ft.tree.leaves((mine, state))) :])
        if found is not None and bool(found):
            ref_u = None  # a skipped step: nothing moves, counters included
        else:
            # tx.update may itself run the fused kernel (_pure_fused): member by member too.
            _pure_fused.ENABLED = False
            try:
                member = tx.update(grads, ref_state, ref_params)
            finally:
                _pure_fused.ENABLED = True
            ref_u, ref_state = tx.update(grads, ref_state, ref_params)
            scale = max(scale, _magnitude(ref_params, ref_u))
            _close(ref_u, member[0], scale)
            _close(ref_state, member[1], scale)
            ref_params = ft.apply_updates(ref_params, ref_u)
        state = done.opt_state
        _close(mine, ref_params, scale)
        _close(state, ref_state, scale)
        if ref_u is not None and ft.tree.leaves(ref_u):
            ref_norm = ft.tree.norm(ref_u)
            if bool(torch.isfinite(ref_norm)) and bool(ft.all_finite(ft.tree.leaves(ref_params))):
                # ‖p_new − p_old‖: the update up to the rounding of p + u.
                step_norm = ft.tree.norm(ft.tree.map(lambda x: x.abs() + 1, ref_params))
                eps = max(torch.finfo(x.dtype).eps for x in ft.tree.leaves(ref_params))
                _close(done.update_norm, ref_norm, rtol=1e-3, atol=4 * eps * float(step_norm))


# ---------------------------------------------------------------------------- train step


def _loss(p, batch):
    terms = [((x * b) ** 2).sum().to(F64) for x, b in zip(ft.tree.leaves(p), batch)]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=F64)


BATCH_KINDS = ["normal", "normal", "normal", "zeros", "huge", "nan", "inf"]


def _batch(params, kind: str, gen: torch.Generator) -> list[torch.Tensor]:
    """One input per leaf, with a leading batch dimension of 2 (the step splits batches)."""
    rows = [ft.tree.leaves(_grads(params, kind if r else "normal", gen)) for r in range(2)]
    return [torch.stack(pair) for pair in zip(*rows)]


@given(
    recipes=layouts(),
    nest=st.integers(0, 2),
    opt=optimizers(),
    kinds=st.lists(st.sampled_from(BATCH_KINDS), min_size=1, max_size=6),
    scaled=st.booleans(),
    skips=st.sampled_from([None, 3]),
    nonfinite=st.sampled_from(["skip", "skip", "ignore"]),
    seed=st.integers(0, 2**16),
)
def test_donating_step_matches_pure_step(recipes, nest, opt, kinds, scaled, skips, nonfinite, seed):
    assume(nonfinite == "skip" or not (scaled or skips))  # both need skipping
    _, tx = opt
    gen = torch.Generator().manual_seed(seed)
    params = _nest(_make_leaves(recipes, gen), nest)
    states, steps = {}, {}
    seen: dict[str, float] = {}  # the largest finite value of each metric so far
    for donate in (True, False):
        steps[donate] = ft.make_train_step(
            _loss,
            tx,
            donate=donate,
            loss_scale=ft.DynamicLossScale() if scaled else None,
            max_consecutive_skips=skips,
            nonfinite=nonfinite,
        )
        states[donate] = ft.TrainState.create(params=_clone(params), tx=tx, seed=None)
    for kind in kinds:
        batch = _batch(params, kind, gen)
        results = {}
        for donate in (True, False):
            snap = _snapshot((states[donate], batch))
            try:
                results[donate] = steps[donate](states[donate], batch)
            except ft.NonFiniteError as err:
                results[donate] = err
            if not donate:  # the pure step reads its inputs and writes nothing
                assert _same_bits((states[donate], batch), snap)
        fast, pure = results[True], results[False]
        event(f"stage: {getattr(steps[True].apply_optimizer, 'last_engine', '?')}")
        if isinstance(pure, Exception) or isinstance(fast, Exception):
            assert type(fast) is type(pure)
            return
        states = {True: fast[0], False: pure[0]}
        _close(fast[0].params, pure[0].params)
        _close(fast[0].opt_state, pure[0].opt_state)
        _close(fast[0].extra, pure[0].extra)
        m_fast, m_pure = fast[1], pure[1]
        assert m_fast.keys() == m_pure.keys()
        for name in ("skipped", "skipped_total", "loss_scale", "lr", "num_examples"):
            if name in m_pure:
                _close(m_fast[name], m_pure[name], rtol=0, atol=0)
        tol = _tol(params)
        for name in ("loss", "grad_norm", "param_norm"):
            if name not in m_pure:
                continue
            if bool(m_pure[name].isfinite()):
                # In low precision the two paths round differently and their trajectories
                # drift apart; a metric that has shrunk through cancellation (a gradient norm
                # near a minimum) keeps the absolute error of the larger values before it.
                seen[name] = max(seen.get(name, 0.0), _magnitude(m_pure[name]))
                _close(m_fast[name], m_pure[name], scale=seen[name], **tol)
            else:  # NaN or inf: 0·inf in one path may be x·inf in the other (x ≈ 0)
                assert not bool(m_fast[name].isfinite())
        if "update_norm" in m_pure:
            # The fast path measures ‖p_old − p_new‖: NaN where p was ±inf, where ‖u‖ is inf.
            if bool(m_pure["update_norm"].isfinite()):
                want = m_pure["update_norm"]
                _close(m_fast["update_norm"], want, rtol=1e-2, atol=tol["atol"])
            else:
                assert not bool(m_fast["update_norm"].isfinite())


# ---------------------------------------------------------------------------- regressions


def test_mask_function_is_reapplied_for_new_shapes():
    # One optimizer, two trees of one structure: the mask function selects the matrix only.
    # The fused paths (in place, and tx.update through the fused kernel) once cached the first
    # tree's selection by structure alone. Adam's first step with g = 1 moves by lr exactly.
    tx = ft.adamw(0.1, weight_decay=0.5, mask=_matrices)
    for p, decayed in (({"w": torch.ones(2, 2)}, True), ({"w": torch.ones(2)}, False)):
        g = ft.tree.map(torch.ones_like, p)
        want = ft.tree.map(lambda x: x - 0.1 * (1 + 0.5 * decayed), p)
        _close(ft.apply_updates(p, tx.update(g, tx.init(p), p)[0]), want)
        mine = _clone(p)
        assert fused.update_in_place(tx, g, tx.init(mine), mine) is not None
        _close(mine, want)


def test_skipped_step_reports_zero_update_norm_even_with_nan_params():
    # The fast path measured ‖p_old − p_new‖, NaN for a NaN parameter although nothing moved.
    tx = ft.adamw(0.1)
    norms = []
    for donate in (True, False):
        step = ft.make_train_step(_loss, tx, donate=donate)
        params = {"w": torch.tensor([float("nan"), 1.0])}
        state = ft.TrainState.create(params=params, tx=tx, seed=None)
        _, metrics = step(state, [torch.ones(2, 2)])
        assert int(metrics["skipped"]) == 1
        norms.append(metrics["update_norm"])
    assert norms[1] == 0
    _close(norms[0], norms[1], rtol=0, atol=0)


# Formerly known differences: the member-by-member Adam (``scale_by_adam``, mirrored bit for bit by
# the foreach engine) rounded differently at the edges of the dtype's range than the fused
# kernels, so the engine a chain happened to get decided the numbers. Now it forms
# ``sqrt(nu) / sqrt(1 − b2ᵗ)`` as torch.optim does, and works in float32 for float16 leaves.
# More cases, against torch.optim too: test_adam_extremes.py.


def _engines_agree(p, g, tx) -> None:
    out = []
    for engine in ("kernel", "foreach"):
        mine = _clone(p)
        assert fused.update_in_place(tx, g, tx.init(mine), mine, engines=(engine,)) is not None
        out.append(mine)
    _close(out[1], out[0])


def test_float16_adam_small_gradient_engines_agree():
    # eps = 1e-8 is 0 in float16 and (1 − b2)·g² underflows: m / 0 member by member.
    p = {"w": torch.tensor([1.5, -0.5], dtype=F16)}
    _engines_agree(p, {"w": torch.tensor([0.0, 1e-5], dtype=F16)}, ft.adam(0.03))


def test_float32_adam_huge_gradient_engines_agree():
    # (1 − b2)·g² is finite but nu / (1 − b2ᵗ) overflowed member by member: u = m / inf = 0.
    p = {"w": torch.tensor([1.5, -0.5])}
    _engines_agree(p, {"w": torch.tensor([3.7e19, -1.0])}, ft.adam(0.03))


def test_inject_hyperparams_in_half_precision_keeps_float32_hyperparameters():
    """Found by this fuzz: with all-bfloat16 params the injected numbers were bfloat16, where
    b2 = 0.999 is 1.0, so Adam's first step divided by 1 − b2 = 0 (NaN from step 1)."""
    for dtype in (torch.bfloat16, torch.float16):
        params = {"w": torch.ones(4, dtype=dtype)}
        grads = {"w": torch.full((4,), 0.5, dtype=dtype)}
        injected = ft.inject_hyperparams(ft.adamw)(learning_rate=0.1)
        state = injected.init(params)
        assert state.hyperparams["b2"].dtype == torch.float32
        got, _ = injected.update(grads, state, params)
        plain = ft.adamw(0.1)
        want, _ = plain.update(grads, plain.init(params), params)
        assert got["w"].dtype == dtype and bool(torch.isfinite(got["w"]).all())
        torch.testing.assert_close(got["w"], want["w"], rtol=0, atol=0)
