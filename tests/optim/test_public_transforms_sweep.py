"""Every public transform (``_public_transforms.CASES``), in float32 and float64, over three
steps on a matrix, a vector and a 0-d scalar:

a. ``update`` and ``init`` leave their inputs bit for bit unchanged;
b. the updates share no storage with the new state (an in-place op on the updates, what a
   PyTorch user does, must not corrupt the optimizer), and the new state shares none with
   the params and gradients it was given;
c. a gradient of the wrong shape is refused with an error naming its path or its shape, and
   a gradient tree with a missing key with one naming the structure mismatch, before any
   input changes;
d. two runs from the same init give bit-identical updates and states.

Then focused regressions for what the sweep found (an in-place op on the updates of
trace/ema/rprop/adopt/sm3 changed their state; flatten, sam, galore, zero_nans and
schedule_free let a bad gradient through or named it wrongly), and a check that the checks
catch a planted defect.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from _public_transforms import (
    CASES,
    SKIP,
    Case,
    base_name,
    example_grads,
    example_params,
    public_names,
    public_transform_names,
)

import functrain as ft
import functrain.contrib
from functrain import testing

STEPS = 3
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])

# Known failures in files owned by other helpers at the time of the sweep: name -> reason.
XFAIL_PURITY: dict[str, str] = {}
XFAIL_ALIASING: dict[str, str] = {}
XFAIL_BAD_INPUT: dict[str, str] = {}

# Documented: these states keep (views of) the params or gradients they were given.
STATE_HOLDS_INPUTS: dict[str, str] = {}

# These neither keep per-leaf state nor read params leaf by leaf (elementwise or global maps,
# measures of the updates, noise from a key): a gradient of another shape, or a tree without
# one of the keys, is a valid input for them.
STRUCTURE_FREE = {
    "add_noise",
    "centralize",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "dp_noisy_mean",
    "identity",
    "measure_with_ema",  # its state is the average of a scalar measure
    "monitor",
    "noisy_sgd",
    "normalize",
    "normalize_by_update_norm",
    "polyak_sgd",
    "polyak_sgd[sps+]",
    "reduce_on_plateau",
    "scale",
    "scale_by_learning_rate",
    "scale_by_polyak",
    "scale_by_schedule",
    "scale_by_sign",
    "set_to_zero",
    "sgd",
    "sign_sgd",
    "snapshot",
    "stateless",
    "stateless_with_tree_map",
    # Ignores the incoming updates altogether (its output is a tree like the params).
    "hutchinson_estimator_diag_hessian",
}

# Keep one flag per leaf (so a missing key is refused) but read no shape: a frozen leaf or
# a "did it hold a NaN" flag does not depend on it.
SHAPE_FREE = {"freeze", "zero_nans"}

# Factored second moments are per-axis means, the same for a matrix and its transpose, and
# the transform reads no params: a transposed gradient gives the transposed update, which
# apply_updates then refuses naming the path. Another shape is refused.
TRANSPOSE_FREE = {
    "scale_by_factored_rms[factored]": "factored statistics are transposition-invariant"
}


def _params(case: Case, dtype: torch.dtype) -> Any:
    params = example_params(dtype)
    return params if case.lift_params is None else case.lift_params(params)


def _clone(tree: Any) -> Any:
    return ft.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _run(case: Case, dtype: torch.dtype, before_update: Any = None) -> Iterator[tuple[Any, ...]]:
    """Yields ``(grads, state, params, extra, updates, new_state)`` of each step.

    ``before_update(grads, state, params, extra)``, if given, runs just before each update
    and returns a function that ``_run`` calls right after it (to compare the inputs).
    """
    tx = case.build()
    params = _params(case, dtype)
    state = tx.init(params)
    for grads in example_grads(STEPS, dtype):
        extra = case.update_kwargs(params, grads)
        after = before_update(grads, state, params, extra) if before_update else None
        updates, new_state = tx.update(grads, state, params, **extra)
        if after is not None:
            after()
        yield grads, state, params, extra, updates, new_state
        if ft.tree.structure(updates) == ft.tree.structure(params):
            params = ft.apply_updates(params, updates)
        state = new_state


def _cases(xfail: dict[str, str], names: set[str] | None = None) -> list[Any]:
    chosen = sorted(CASES if names is None else names)
    return [
        pytest.param(n, marks=pytest.mark.xfail(reason=xfail[n], strict=True)) if n in xfail else n
        for n in chosen
    ]


def test_every_public_transform_is_built_or_skipped() -> None:
    names = public_transform_names()
    assert {base_name(n) for n in CASES} | set(SKIP) == names
    assert not set(CASES) & set(SKIP)
    for table in (XFAIL_PURITY, XFAIL_ALIASING, XFAIL_BAD_INPUT, STATE_HOLDS_INPUTS):
        assert set(table) <= set(CASES)
    assert STRUCTURE_FREE | SHAPE_FREE | set(TRANSPOSE_FREE) <= set(CASES)


def test_every_public_function_declares_its_return_type() -> None:
    # public_transform_names() reads return annotations: a missing one would hide a name.
    for name in public_names():
        obj = getattr(ft, name, None) or getattr(functrain.contrib, name)
        if inspect.isfunction(obj):
            annotation = inspect.signature(obj).return_annotation
            assert annotation is not inspect.Signature.empty, name


def _unchanged_by_the_call(*inputs: Any) -> Any:
    snapshot = _clone(inputs)
    return lambda: testing.assert_trees_all_equal(inputs, snapshot, bitwise=True)


def _assert_pure(case: Case, dtype: torch.dtype) -> None:
    params = _params(case, dtype)
    check = _unchanged_by_the_call(params)
    case.build().init(params)
    check()
    for _ in _run(case, dtype, before_update=_unchanged_by_the_call):
        pass


@DTYPES
@pytest.mark.parametrize("name", _cases(XFAIL_PURITY))
def test_update_and_init_leave_their_inputs_unchanged(name: str, dtype: torch.dtype) -> None:
    _assert_pure(CASES[name], dtype)


def _storages(tree: Any) -> list[tuple[str, int, int]]:
    paths, leaves, _ = ft.tree.flatten_with_paths(tree)
    out = []
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().nbytes() > 0:
            lo = leaf.untyped_storage().data_ptr()
            out.append((ft.tree.path_str(path), lo, lo + leaf.untyped_storage().nbytes()))
    return out


def _shared(a: Any, b: Any) -> list[tuple[str, str]]:
    """Pairs of paths of ``a`` and ``b`` whose tensors' storages overlap."""
    return [
        (pa, pb)
        for pa, lo_a, hi_a in _storages(a)
        for pb, lo_b, hi_b in _storages(b)
        if lo_a < hi_b and lo_b < hi_a
    ]


def _assert_unaliased(case: Case, dtype: torch.dtype) -> None:
    for grads, _, params, _, updates, new_state in _run(case, dtype):
        shared = _shared(updates, new_state)
        assert not shared, f"(updates, new state) paths sharing storage: {shared}"
        if case.name not in STATE_HOLDS_INPUTS:
            shared = _shared(new_state, {"params": params, "grads": grads})
            assert not shared, f"(new state, inputs) paths sharing storage: {shared}"


@DTYPES
@pytest.mark.parametrize("name", _cases(XFAIL_ALIASING))
def test_updates_and_new_state_share_no_storage(name: str, dtype: torch.dtype) -> None:
    _assert_unaliased(CASES[name], dtype)


def _second_step_inputs(case: Case, dtype: torch.dtype) -> tuple[Any, ...]:
    """The inputs of the second update (after one good step, so the state is not fresh)."""
    steps = _run(case, dtype)
    _, _, _, _, updates, state = next(steps)
    params = _params(case, dtype)
    if ft.tree.structure(updates) == ft.tree.structure(params):
        params = ft.apply_updates(params, updates)
    grads = example_grads(STEPS, dtype)[1]
    return case.build(), grads, state, params, case.update_kwargs(params, grads)


BAD_SHAPES = {
    "transposed": (4, 3),  # as many elements: a reshape or a flat layout would not notice
    "wider": (3, 5),
}


@DTYPES
@pytest.mark.parametrize("bad", sorted(BAD_SHAPES))
@pytest.mark.parametrize("name", _cases(XFAIL_BAD_INPUT, set(CASES) - STRUCTURE_FREE - SHAPE_FREE))
def test_a_gradient_of_the_wrong_shape_is_refused(name: str, bad: str, dtype: torch.dtype) -> None:
    if bad == "transposed" and name in TRANSPOSE_FREE:
        pytest.skip(TRANSPOSE_FREE[name])
    tx, grads, state, params, extra = _second_step_inputs(CASES[name], dtype)
    shape = BAD_SHAPES[bad]
    bad_grads = dict(grads, w=torch.linspace(-1.0, 1.0, 15, dtype=dtype)[: math.prod(shape)])
    bad_grads["w"] = bad_grads["w"].reshape(shape)
    check = _unchanged_by_the_call(bad_grads, state, params, extra)
    # Every transform names the path (and the shapes); the brief's minimum was the shape.
    with pytest.raises(ft.tree.TreeMismatchError, match=rf"\['w'\].*\({shape[0]}, {shape[1]}\)"):
        tx.update(bad_grads, state, params, **extra)
    check()


@DTYPES
@pytest.mark.parametrize("name", _cases(XFAIL_BAD_INPUT, set(CASES) - STRUCTURE_FREE))
def test_a_gradient_tree_with_a_missing_key_is_refused(name: str, dtype: torch.dtype) -> None:
    tx, grads, state, params, extra = _second_step_inputs(CASES[name], dtype)
    bad = {"w": grads["w"], "b": grads["b"]}
    check = _unchanged_by_the_call(bad, state, params, extra)
    with pytest.raises(ft.tree.TreeMismatchError, match=r"\['s'\]"):
        tx.update(bad, state, params, **extra)
    check()


@DTYPES
@pytest.mark.parametrize("name", sorted(CASES))
def test_two_runs_from_the_same_init_are_bit_identical(name: str, dtype: torch.dtype) -> None:
    first = [(u, s) for *_, u, s in _run(CASES[name], dtype)]
    second = [(u, s) for *_, u, s in _run(CASES[name], dtype)]
    testing.assert_trees_all_equal(first, second, bitwise=True)


# --- Focused regressions for the bugs the sweep found -------------------------------------


def _three_steps(tx: ft.GradientTransformation, dtype: torch.dtype, mutate: bool) -> Any:
    """Three steps; with ``mutate`` the caller changes every update in place (``u *= -1``,
    then ``p += u`` by hand), as PyTorch code does. Returns the final params and state."""
    params = example_params(dtype)
    state = tx.init(params)
    for grads in example_grads(STEPS, dtype):
        updates, state = tx.update(grads, state, params)
        if mutate:
            for u in ft.tree.leaves(updates):
                u.mul_(-1.0)
            params = {k: p - updates[k] for k, p in params.items()}
        else:
            params = ft.apply_updates(params, updates)
    return params, state


@DTYPES
@pytest.mark.parametrize(
    "build",
    [
        lambda: ft.trace(0.9),
        lambda: ft.ema(0.9, debias=False),
        lambda: ft.scale_by_rprop(0.1),
        lambda: ft.scale_by_adopt(),
        lambda: ft.scale_by_sm3(),
        lambda: ft.lars(0.1),
        lambda: ft.rmsprop(0.1, momentum=0.9),
    ],
    ids=[
        "trace",
        "ema_no_debias",
        "scale_by_rprop",
        "scale_by_adopt",
        "scale_by_sm3",
        "lars",
        "rmsprop_momentum",
    ],
)
def test_an_in_place_op_on_the_updates_does_not_change_the_state(build, dtype) -> None:
    # The reference: the same steps without touching the updates (p − (−u) = p + u).
    expected = _three_steps(build(), dtype, mutate=False)
    testing.assert_trees_all_equal(_three_steps(build(), dtype, mutate=True), expected)


@pytest.mark.parametrize("with_params", [True, False])
def test_flatten_refuses_a_transposed_gradient_naming_it(with_params: bool) -> None:
    tx = ft.flatten(ft.adam(0.1))
    params = example_params(torch.float32)
    state = tx.init(params)
    grads = dict(example_grads(1, torch.float32)[0])
    grads["w"] = grads["w"].mT.contiguous()  # 12 elements either way
    if with_params:
        with pytest.raises(ft.tree.TreeMismatchError, match=r"updates\['w'\]: shape \(4, 3\)"):
            tx.update(grads, state, params)
    else:
        # Without params the flat vector has no layout to compare with: a same-size leaf
        # cannot be told apart (documented limitation), and the update keeps its shape.
        updates, _ = tx.update(grads, state)
        assert updates["w"].shape == (4, 3)


def test_flatten_names_a_missing_key() -> None:
    tx = ft.flatten(ft.adam(0.1))
    params = example_params(torch.float32)
    grads = example_grads(1, torch.float32)[0]
    with pytest.raises(ft.tree.TreeMismatchError, match=r"structures differ.*'s'"):
        tx.update({"w": grads["w"], "b": grads["b"]}, tx.init(params), params)


@pytest.mark.parametrize("sync_period", [1, 2])
def test_sam_refuses_a_gradient_of_the_wrong_shape_naming_it(sync_period: int) -> None:
    tx = ft.sam(ft.sgd(0.1), ft.sgd(0.05), sync_period=sync_period)
    params = example_params(torch.float32)
    state = tx.init(params)
    grads = dict(example_grads(1, torch.float32)[0], b=torch.ones(1))  # would broadcast
    with pytest.raises(ft.tree.TreeMismatchError, match=r"updates\['b'\]: shape \(1,\)"):
        tx.update(grads, state, params)


def test_sam_refuses_params_unlike_its_cache() -> None:
    tx = ft.sam(ft.sgd(0.1), ft.sgd(0.05))
    params = example_params(torch.float32)
    state = tx.init(params)
    other = dict(params, b=torch.ones(1))
    grads = dict(example_grads(1, torch.float32)[0], b=torch.ones(1))
    with pytest.raises(ft.tree.TreeMismatchError, match=r"state.cache\['b'\] shape \(4,\)"):
        tx.update(grads, state, other)


def test_zero_nans_refuses_updates_of_another_structure() -> None:
    tx = ft.zero_nans()
    params = example_params(torch.float32)
    state = tx.init(params)
    grads = example_grads(1, torch.float32)[0]
    with pytest.raises(ft.tree.TreeMismatchError, match=r"structures differ.*'s'"):
        tx.update({"w": grads["w"], "b": grads["b"]}, state, params)
    # The matching structure still works and records the NaN of its leaf.
    out, new_state = tx.update(dict(grads, b=torch.full((4,), float("nan"))), state, params)
    assert bool(new_state.found_nan["b"]) and not bool(new_state.found_nan["w"])
    assert torch.equal(out["b"], torch.zeros(4))


@pytest.mark.parametrize("name", ["schedule_free", "schedule_free_sgd"])
def test_schedule_free_names_params_in_a_mismatch(name: str) -> None:
    # The base optimizer (sgd) reads no state: the mismatch used to be reported as
    # "updates['s'] has no counterpart in updates".
    tx, grads, state, params, _ = _second_step_inputs(CASES[name], torch.float32)
    with pytest.raises(ft.tree.TreeMismatchError, match=r"params\['s'\] has no counterpart"):
        tx.update({"w": grads["w"], "b": grads["b"]}, state, params)
    with pytest.raises(ft.tree.TreeMismatchError, match=r"match params\['w'\] shape \(3, 4\)"):
        tx.update(dict(grads, w=grads["w"].mT), state, params)


@pytest.mark.parametrize(
    ("name", "with_params"),
    [("galore", True), ("scale_by_galore", True), ("scale_by_galore", False)],
)
def test_galore_refuses_a_matrix_of_another_width_naming_it(name: str, with_params: bool) -> None:
    tx = CASES[name].build()
    params = example_params(torch.float32)
    state = tx.init(params)
    grads = dict(example_grads(1, torch.float32)[0], w=torch.ones(3, 5))
    # With params: compared with them; without: with the projector, (5, 2) against (4, 2).
    expected = r"params\['w'\] shape \(3, 4\)" if with_params else r"state.projector\['w'\]"
    with pytest.raises(
        ft.tree.TreeMismatchError, match=rf"updates\['w'\]: shape \(3, 5\).*{expected}"
    ):
        tx.update(grads, state, params if with_params else None)


# --- The checks themselves catch what they are for -------------------------------------------


def _rogue(kind: str) -> ft.GradientTransformation:
    """A momentum transform with one planted defect."""

    def init(params: Any) -> Any:
        return ft.tree.zeros_like(params)

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        new = ft.tree.map(lambda m, g: 0.9 * m + g, state, updates)
        if kind == "mutates":
            ft.tree.map(lambda m: m.mul_(0.5), state)
        if kind == "aliases":
            return new, new
        if kind == "keeps_grads":
            return ft.tree.map(torch.clone, new), updates
        return ft.tree.map(torch.clone, new), new

    return ft.GradientTransformation(init, update)


@pytest.mark.parametrize("kind", ["mutates", "aliases", "keeps_grads"])
def test_the_sweep_catches_a_planted_defect(kind: str) -> None:
    check = _assert_pure if kind == "mutates" else _assert_unaliased
    with pytest.raises(AssertionError):
        check(Case(kind, lambda: _rogue(kind)), torch.float32)
    # The honest version passes both.
    honest = Case("honest", lambda: _rogue("honest"))
    _assert_pure(honest, torch.float32)
    _assert_unaliased(honest, torch.float32)
