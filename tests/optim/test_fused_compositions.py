"""Differential fuzz of the in-place fused engines over recursive optimizer compositions.

``fused.update_in_place`` promises the numbers of ``tx.update`` + ``ft.apply_updates`` for every
optimizer it accepts, and must decline (return ``None``, touching nothing) for one it does not
recognise. ``test_fused_differential`` draws flat recipes; here hypothesis draws *trees* of
transforms: chains, ``partition`` with one to three groups (some owning no leaf), nested
partitions, ``masked``, ``selective_transform``, one transform object used twice in a chain,
and the wrappers the engines cannot fuse (``apply_if_finite``, ``MultiSteps``), over leaves
from ``adamw`` to ``freeze``. Each engine ("kernel", "foreach", or both in turn) is compared
against the member-by-member pure path, step by step, for parameters and state; leaves that
the composition freezes keep every bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_fused_differential import (
    SCHED,
    _batch,
    _clone,
    _close,
    _grads,
    _loss,
    _magnitude,
    _make_leaves,
    _same_bits,
    _snapshot,
    _tol,
)

import functrain as ft
from functrain.optim import _pure_fused, fused

F32, F64 = torch.float32, torch.float64
Tx = ft.GradientTransformation
Drawn = tuple[str, Tx]  # a readable recipe (shown when hypothesis reports) and its transform


# ---------------------------------------------------------------------------- parameters

# 0-d, empty, vector, matrix (possibly transposed or a strided slice) leaves.
SHAPES = [(), (0,), (1,), (5,), (3, 4), (4, 1), (0, 3), (2, 3)]


@st.composite
def param_trees(draw) -> list[tuple[torch.dtype, tuple[int, ...], str]]:
    """Recipes for 2 to 6 float32/float64 leaves (``_make_leaves`` builds them)."""
    mixed = draw(st.booleans())
    base = draw(st.sampled_from([F32, F64]))
    out = []
    for _ in range(draw(st.integers(2, 6))):
        dtype = draw(st.sampled_from([F32, F64])) if mixed else base
        shape = draw(st.sampled_from(SHAPES))
        layout = draw(st.sampled_from(["plain", "plain", "plain", "transpose", "slice", "shared"]))
        out.append((dtype, shape, layout))
    return out


# ---------------------------------------------------------------------------- masks, labels


def _matrices(x: torch.Tensor) -> bool:
    return x.ndim > 1


def _even(x: torch.Tensor) -> bool:
    return x.numel() % 2 == 0


MASKS: dict[str, Any] = {
    "matrices": lambda p: ft.tree.map(_matrices, p),
    "even": lambda p: ft.tree.map(_even, p),
    "all": True,
    "none": False,
}


def _labeller(names: list[str], salt: int) -> Callable[[Any], Any]:
    """A labels function using the first ``len(names)`` labels; a partition may declare more
    (groups that own no leaf)."""

    def labels(tree_: Any) -> Any:
        return ft.tree.map(lambda x: names[(x.numel() + salt * x.ndim) % len(names)], tree_)

    return labels


# ---------------------------------------------------------------------------- transforms


def _lr(kind: str) -> Any:
    return {"float": 0.03, "sched": SCHED, "tensor": torch.tensor(0.02)}[kind]


LEAF_NAMES = ["adamw", "adamw", "adam", "sgd", "sgd", "lion", "nadamw", "adam_scale"]
LEAF_NAMES += ["identity", "zero", "clip", "decay", "inject", "freeze"]


@st.composite
def leaves(draw) -> Drawn:
    """One optimizer or primitive (kernel-friendly ones drawn more often)."""
    name = draw(st.sampled_from(LEAF_NAMES))
    lr_kind = draw(st.sampled_from(["float", "float", "sched", "tensor"]))
    lr = _lr(lr_kind)
    mask_name = draw(st.sampled_from([None, "matrices", "even"]))
    mask = None if mask_name is None else MASKS[mask_name]
    desc = f"{name}(lr={lr_kind}, mask={mask_name})"
    if name == "adamw":
        return desc, ft.adamw(lr, weight_decay=0.1, mask=mask)
    if name == "adam":
        return desc, ft.adam(lr, b1=0.8, b2=0.95)
    if name == "sgd":
        momentum = draw(st.sampled_from([None, 0.0, 0.9]))
        nesterov = bool(momentum) and draw(st.booleans())
        return f"sgd({lr_kind}, {momentum}, {nesterov})", ft.sgd(
            lr, momentum=momentum, nesterov=nesterov
        )
    if name == "lion":
        return desc, ft.lion(lr)
    if name == "nadamw":
        return desc, ft.nadamw(lr, weight_decay=0.05, mask=mask)
    if name == "adam_scale":
        return "scale_by_adam+scale", ft.chain(ft.scale_by_adam(), ft.scale(-0.03))
    if name == "identity":
        return "identity", ft.identity()
    if name == "zero":
        return "set_to_zero", ft.set_to_zero()
    if name == "clip":
        c = draw(st.sampled_from([0.5, 1e3]))
        return f"clip({c})", ft.clip_by_global_norm(c)
    if name == "decay":
        return f"decay(mask={mask_name})", ft.add_decayed_weights(0.01, mask)
    if name == "inject":
        return desc, ft.inject_hyperparams(ft.adamw, static_args="mask")(
            learning_rate=lr, weight_decay=0.1, mask=mask
        )
    mask_name = draw(st.sampled_from(["matrices", "even", "all"]))
    return f"freeze({mask_name})", ft.freeze(MASKS[mask_name])


COMBINATORS = ["chain", "partition", "partition", "masked", "twice", "selective"]
COMBINATORS += ["if_finite", "multi_steps"]


@st.composite
def transforms(draw, depth: int = 3) -> Drawn:
    """A composition of depth at most ``depth`` (leaves at 0)."""
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(leaves())
    kind = draw(st.sampled_from(COMBINATORS))
    sub = transforms(depth=depth - 1)
    if kind == "chain":
        (da, a), (db, b) = draw(sub), draw(sub)
        return f"chain({da}, {db})", ft.chain(a, b)
    if kind == "partition":
        k = draw(st.integers(1, 3))
        names = [f"g{i}" for i in range(k)]
        used = draw(st.integers(1, k))
        salt = draw(st.integers(0, 2))
        groups = {n: draw(sub) for n in names}
        desc = ", ".join(f"{n}: {d}" for n, (d, _) in groups.items())
        tx = ft.partition({n: t for n, (_, t) in groups.items()}, _labeller(names[:used], salt))
        return f"partition({{{desc}}}, used={used}, salt={salt})", tx
    if kind == "masked":
        mask_name = draw(st.sampled_from(list(MASKS)))
        d, t = draw(sub)
        return f"masked({d}, {mask_name})", ft.masked(t, MASKS[mask_name])
    if kind == "twice":
        d, t = draw(sub)
        return f"twice({d})", ft.chain(t, t)
    if kind == "selective":
        mask_name = draw(st.sampled_from(list(MASKS)))
        d, t = draw(sub)
        return f"selective({d}, {mask_name})", ft.selective_transform(
            t, freeze_mask=MASKS[mask_name]
        )
    d, t = draw(sub)
    if kind == "if_finite":
        return f"apply_if_finite({d})", ft.apply_if_finite(t, 2)
    return f"multi_steps({d})", ft.MultiSteps(t, 2).gradient_transformation()


@st.composite
def _kernel_flat(draw) -> Drawn:
    """An optimizer of one of the kernel engine's flat shapes."""
    name = draw(st.sampled_from(["adamw", "adam", "sgd", "inject", "clip_adamw", "decay_sgd"]))
    mask_name = draw(st.sampled_from([None, "matrices", "even"]))
    mask = None if mask_name is None else MASKS[mask_name]
    lr = _lr(draw(st.sampled_from(["float", "sched", "tensor"])))
    desc = f"{name}(mask={mask_name})"
    if name == "adamw":
        return desc, ft.adamw(lr, weight_decay=0.1, mask=mask)
    if name == "adam":
        return desc, ft.adam(lr, b1=0.8, b2=0.95)
    if name == "sgd":
        nesterov = draw(st.booleans())
        return f"sgd(0.9, {nesterov})", ft.sgd(lr, momentum=0.9, nesterov=nesterov)
    if name == "inject":
        return desc, ft.inject_hyperparams(ft.adamw, static_args="mask")(
            learning_rate=lr, weight_decay=0.1, mask=mask
        )
    if name == "clip_adamw":
        return desc, ft.chain(ft.clip_by_global_norm(0.5), ft.adamw(lr, weight_decay=0.1))
    return desc, ft.chain(ft.add_decayed_weights(0.01, mask), ft.sgd(lr, momentum=0.9))


@st.composite
def kernel_shaped(draw, depth: int = 2) -> Drawn:
    """Compositions the kernel engine runs group by group: partitions (nested too, possibly
    after a global clip) of flat optimizers and frozen groups, ``selective_transform``."""
    kind = draw(st.sampled_from(["flat", "zero", "partition", "partition", "selective", "clip"]))
    if depth == 0 or kind == "flat":
        return draw(_kernel_flat())
    if kind == "zero":
        return "set_to_zero", ft.set_to_zero()
    if kind == "selective":
        mask_name = draw(st.sampled_from(["matrices", "even"]))
        d, t = draw(_kernel_flat())
        return f"selective({d}, {mask_name})", ft.selective_transform(
            t, freeze_mask=MASKS[mask_name]
        )
    k = draw(st.integers(1, 3))
    names = [f"g{i}" for i in range(k)]
    used, salt = draw(st.integers(1, k)), draw(st.integers(0, 2))
    groups = {n: draw(kernel_shaped(depth=depth - 1)) for n in names}
    desc = ", ".join(f"{n}: {d}" for n, (d, _) in groups.items())
    tx = ft.partition({n: t for n, (_, t) in groups.items()}, _labeller(names[:used], salt))
    desc = f"partition({{{desc}}}, used={used}, salt={salt})"
    if kind == "clip":
        return f"chain(clip, {desc})", ft.chain(ft.clip_by_global_norm(0.5), tx)
    return desc, tx


# ---------------------------------------------------------------------------- references


def _pure_update(tx: Tx, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    """``tx.update`` member by member (no ``_pure_fused`` kernel anywhere in the tree)."""
    _pure_fused.ENABLED = False
    try:
        return tx.update(grads, state, params)
    finally:
        _pure_fused.ENABLED = True


def _frozen(tx: Tx, params: Any, gen: torch.Generator) -> list[bool]:
    """Per leaf: whether two pure steps with large random gradients leave it exactly in place
    (a frozen leaf: ``set_to_zero``, ``freeze``, a ``selective_transform``'s frozen side)."""
    ref = _clone(params)
    state = tx.init(ref)
    frozen = [True] * len(ft.tree.leaves(ref))
    for _ in range(2):
        g = ft.tree.map(lambda p: 100 * torch.randn(p.shape, generator=gen, dtype=p.dtype), ref)
        u, state = _pure_update(tx, g, state, ref)
        for i, x in enumerate(ft.tree.leaves(u)):
            frozen[i] = frozen[i] and bool((x == 0).all())
    return frozen


GRAD_KINDS = ["normal", "normal", "normal", "zeros", "nan", "inf"]
ENGINES = [("kernel",), ("foreach",), ("kernel", "foreach")]


def _run_in_place(
    desc: str,
    tx: Tx,
    params: Any,
    state: Any,
    ref_params: Any,
    ref_state: Any,
    kinds: list[str],
    opts: tuple[bool, tuple[str, ...], bool, bool],
    gen: torch.Generator,
) -> tuple[Any, Any]:
    """Steps both paths through ``kinds`` of gradients, comparing after each step; ``opts``:
    (found_inf flag, engines, update_norm, grads_writable)."""
    flag, engines, want_norm, writable = opts
    mine, scale = params, 0.0
    for kind in kinds:
        grads = _grads(mine, kind, gen)
        kept = _clone(grads)  # the reference's: writable gradients may be unscaled in place
        found = ~ft.all_finite(grads) if flag else None
        before = _snapshot((mine, state, grads))
        done = fused.update_in_place(
            tx,
            grads,
            state,
            mine,
            found_inf=found,
            update_norm=want_norm,
            grads_writable=writable,
            engines=engines,
        )
        event(f"engine: {None if done is None else done.engine}")
        if done is not None and "partition(" in desc:
            event(f"{done.engine} ran a partition")
        if done is None:
            assert _same_bits((mine, state, grads), before), "None, yet something was written"
            return mine, ref_params
        if not writable:
            assert _same_bits(grads, before[len(ft.tree.leaves((mine, state))) :])
        ref_u = None  # a skipped step: nothing moves, counters included
        if found is None or not bool(found):
            member = _pure_update(tx, kept, ref_state, ref_params)
            ref_u, ref_state = tx.update(kept, ref_state, ref_params)  # _pure_fused may run
            scale = max(scale, _magnitude(ref_params, ref_u))
            _close(ref_u, member[0], scale)
            _close(ref_state, member[1], scale)
            ref_u, ref_state = member
            ref_params = ft.apply_updates(ref_params, ref_u)
        state = done.opt_state
        _close(mine, ref_params, scale)
        _close(state, ref_state, scale)
        if want_norm:
            _check_norm(done.update_norm, ref_u, ref_params)
    return mine, ref_params


def _check_norm(got: torch.Tensor, ref_u: Any, ref_params: Any) -> None:
    """The reported update norm against ``‖ref_u‖`` (0 for a skipped step), where finite."""
    if ref_u is None:
        assert float(got) == 0.0
        return
    want = ft.tree.norm(ref_u)
    if not (bool(torch.isfinite(want)) and bool(ft.all_finite(ref_params))):
        return
    # The kernels measure ‖p_new − p_old‖: the update up to the rounding of p + u.
    step_norm = float(ft.tree.norm(ft.tree.map(lambda x: x.abs() + 1, ref_params)))
    eps = max((torch.finfo(x.dtype).eps for x in ft.tree.leaves(ref_params)), default=0.0)
    _close(got, want, rtol=1e-3, atol=4 * eps * step_norm)


@settings(max_examples=3 * settings.default.max_examples)
@given(
    recipe=param_trees(),
    opt=st.one_of(transforms(), kernel_shaped()),
    kinds=st.lists(st.sampled_from(GRAD_KINDS), min_size=1, max_size=4),
    opts=st.tuples(st.booleans(), st.sampled_from(ENGINES), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_update_in_place_matches_pure_path(recipe, opt, kinds, opts, seed):
    desc, tx = opt
    event(f"outermost: {desc.split('(')[0]}")
    gen = torch.Generator().manual_seed(seed)
    params = {f"k{i}": x for i, x in enumerate(_make_leaves(recipe, gen))}
    frozen = _frozen(tx, params, gen)
    original = _snapshot(params)
    ref_params = _clone(params)
    state, ref_state = tx.init(params), tx.init(ref_params)
    mine, ref_params = _run_in_place(
        desc, tx, params, state, ref_params, ref_state, kinds, opts, gen
    )
    # A leaf the composition freezes, which the pure path left bit for bit, keeps every bit.
    now, ref = _snapshot(mine), _snapshot(ref_params)
    for i, is_frozen in enumerate(frozen):
        if is_frozen and torch.equal(ref[i][3], original[i][3]):
            event("frozen leaf")
            assert torch.equal(now[i][3], original[i][3]), f"frozen leaf k{i} moved"


@settings(max_examples=settings.default.max_examples // 2)
@given(
    recipe=param_trees(),
    opt=st.one_of(transforms(depth=2), kernel_shaped()),
    kinds=st.lists(st.sampled_from(["normal", "normal", "zeros", "nan"]), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_donating_step_matches_pure_step(recipe, opt, kinds, seed):
    _, tx = opt
    gen = torch.Generator().manual_seed(seed)
    params = _make_leaves(recipe, gen)
    steps = {d: ft.make_train_step(_loss, tx, donate=d) for d in (True, False)}
    states = {d: ft.TrainState.create(params=_clone(params), tx=tx, seed=None) for d in steps}
    for kind in kinds:
        batch = _batch(params, kind, gen)
        fast, pure = (steps[d](states[d], batch) for d in (True, False))
        event(f"stage: {getattr(steps[True].apply_optimizer, 'last_engine', '?')}")
        states = {True: fast[0], False: pure[0]}
        _close(fast[0].params, pure[0].params)
        _close(fast[0].opt_state, pure[0].opt_state)
        for name in ("skipped", "skipped_total"):
            if name in pure[1]:
                _close(fast[1][name], pure[1][name], rtol=0, atol=0)
        if bool(pure[1]["loss"].isfinite()):
            _close(fast[1]["loss"], pure[1]["loss"], **_tol(params))


# ---------------------------------------------------------------------------- regressions


def _step_loss(p: Any, batch: Any) -> torch.Tensor:
    return sum(((x - b) ** 2).sum() for x, b in zip(p.values(), batch)) / 2


def test_optimizer_without_ops_is_not_taken_for_a_frozen_one():
    """Found by this fuzz: ``identity()`` (or a chain of them) plans no op, and the kernel
    engine took the empty op list for a frozen group: it reported success and left the
    parameters, where the pure path adds the gradient."""
    g = {"w": torch.tensor([0.5, -0.25]), "b": torch.tensor(2.0, dtype=F64)}
    for tx in (ft.identity(), ft.chain(ft.identity(), ft.identity())):
        for engines in (("kernel",), ("kernel", "foreach")):
            mine = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(-1.0, dtype=F64)}
            done = fused.update_in_place(tx, g, tx.init(mine), mine, engines=engines)
            if done is not None:  # declining is allowed; running means p + g exactly
                assert done.engine == "foreach"
                ft.testing.assert_trees_all_equal(
                    mine, {"w": torch.tensor([1.5, 1.75]), "b": torch.tensor(1.0, dtype=F64)}
                )
    # Through the donating train step: u = ∇loss = p − b (identity adds the gradient).
    tx = ft.identity()
    params = {"w": torch.tensor([1.0, 2.0])}
    step = ft.make_train_step(_step_loss, tx, donate=True)
    new, _ = step(ft.TrainState.create(params=params, tx=tx, seed=None), [torch.zeros(2)])
    ft.testing.assert_trees_all_equal(new.params, {"w": torch.tensor([2.0, 4.0])})


def test_update_norm_of_an_all_frozen_step_has_the_leaves_promoted_dtype():
    """Found by this fuzz: with only frozen groups the kernel engine reported the update norm
    in the first leaf's dtype (float32), the pure path in the promoted one (float64)."""
    tx = ft.selective_transform(ft.adamw(0.1), freeze_mask=True)
    params = {"a": torch.ones(2), "b": torch.ones(3, dtype=F64)}
    grads = ft.tree.map(torch.ones_like, params)
    done = fused.update_in_place(
        tx, grads, tx.init(params), params, update_norm=True, engines=("kernel",)
    )
    assert done is not None and done.engine == "kernel"
    assert done.update_norm.dtype == F64 and float(done.update_norm) == 0.0
    assert ft.tree.norm(grads).dtype == F64  # what the pure path's ``tree.norm(updates)`` gives
