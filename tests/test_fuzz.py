"""Fuzzing the public entry points: random trees, shapes and dtypes, matching or not.

Properties: a valid input never raises; an invalid one raises only a clear error (``ValueError``,
``TypeError`` or ``TreeMismatchError``, whose message names a pytree path or an argument); and
no input is ever mutated (every tensor compared bit for bit with a copy taken before the call).
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import functrain as ft
from functrain import checkpoint

# A clear message names a path (``updates['a'][0]``) or an argument / tree.
CLEAR = re.compile(
    r"\[|\b(updates|params|state|grads|batch|micro_batches|mask|labels|opt_state|loss_fn|tx|tree)\b"
)


def _clone(tree: Any) -> Any:
    return ft.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _assert_unchanged(before: Any, after: Any) -> None:
    """Same structure and the same bits (NaN payloads and the sign of zero included).

    Fuzzed batches may hold non-tensor leaves (a string where a tensor belongs): those compare
    with ``==``.
    """
    assert ft.tree.structure(before) == ft.tree.structure(after)
    for x, y in zip(ft.tree.leaves(before), ft.tree.leaves(after)):
        if isinstance(x, torch.Tensor):
            ft.testing.assert_trees_all_equal(x, y, bitwise=True)
        else:
            assert x == y


def _assert_clear(err: BaseException) -> None:
    assert isinstance(err, (ValueError, TypeError)), f"unclear error {type(err).__name__}: {err}"
    assert CLEAR.search(str(err)), f"the message names no path or argument: {err}"


# ----------------------------------------------------------------------------------- trees

FLOATS = [torch.float32, torch.float64]


@st.composite
def specs(draw: Any, depth: int = 0) -> Any:
    """A tree of ``(shape, dtype)`` leaves in dicts, lists and tuples (at least one leaf)."""
    if depth >= 2 or draw(st.booleans()):
        shape = tuple(draw(st.lists(st.integers(1, 3), max_size=3)))
        return ("leaf", shape, draw(st.sampled_from(FLOATS)))
    kind = draw(st.sampled_from(["dict", "list", "tuple"]))
    children = draw(st.lists(specs(depth + 1), min_size=1, max_size=3))
    if kind == "dict":
        return {f"k{i}": c for i, c in enumerate(children)}
    return list(children) if kind == "list" else tuple(children)


def _is_leaf(spec: Any) -> bool:
    return isinstance(spec, tuple) and len(spec) == 3 and spec[0] == "leaf"


def build(spec: Any, gen: torch.Generator) -> Any:
    if _is_leaf(spec):
        return torch.randn(spec[1], generator=gen, dtype=torch.float64).to(spec[2])
    if isinstance(spec, dict):
        return {k: build(v, gen) for k, v in spec.items()}
    children = [build(v, gen) for v in spec]
    return children if isinstance(spec, list) else tuple(children)


def _paths(spec: Any, prefix: tuple = ()) -> list[tuple]:
    if _is_leaf(spec):
        return [prefix]
    items = spec.items() if isinstance(spec, dict) else enumerate(spec)
    return [p for k, v in items for p in _paths(v, (*prefix, k))]


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Any, path: tuple, value: Any) -> Any:
    """A copy of the containers along ``path`` with the node at ``path`` replaced."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        out = dict(tree)
        out[head] = _set(tree[head], rest, value)
        return out
    items = list(tree)
    items[head] = _set(tree[head], rest, value)
    return items if isinstance(tree, list) else tuple(items)


MUTATIONS = ["same", "nonfinite", "shape", "extra_dim", "dtype", "int", "drop", "container"]
VALID = {"same", "nonfinite", "dtype"}


def mutate(params: Any, spec: Any, kind: str, where: int, gen: torch.Generator) -> Any:
    """Gradients for ``params``: like them (``same``...) or wrong in one place."""
    grads = ft.tree.map(lambda p: torch.randn(p.shape, generator=gen).to(p.dtype), params)
    paths = _paths(spec)
    path = paths[where % len(paths)]
    leaf = _get(grads, path)
    if kind == "nonfinite":
        flat = leaf.reshape(-1).clone()
        flat[0] = float("nan")
        flat[-1] = float("-inf")
        return _set(grads, path, flat.reshape(leaf.shape))
    if kind == "shape":
        shape = (leaf.shape[0] + 1, *leaf.shape[1:]) if leaf.dim() else (2,)
        return _set(grads, path, torch.zeros(shape, dtype=leaf.dtype))
    if kind == "extra_dim":
        return _set(grads, path, leaf.unsqueeze(0).expand(2, *leaf.shape).clone())
    if kind == "dtype":
        other = torch.float64 if leaf.dtype == torch.float32 else torch.float32
        return _set(grads, path, leaf.to(other))
    if kind == "int":
        return _set(grads, path, leaf.round().to(torch.int64))
    if kind == "drop":
        if not path:  # a single-leaf tree: wrap it instead
            return [grads]
        parent, key = _get(grads, path[:-1]), path[-1]
        if isinstance(parent, dict):
            smaller: Any = {k: v for k, v in parent.items() if k != key}
        else:
            smaller = type(parent)(v for i, v in enumerate(parent) if i != key)
        return _set(grads, path[:-1], smaller)
    if kind == "container":
        return [grads] if not isinstance(grads, list) else tuple(grads)
    return grads


# ------------------------------------------------------------------------------ transforms

TRANSFORMS = {
    "sgd": lambda: ft.sgd(0.1),
    "sgd_nesterov": lambda: ft.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: ft.adam(1e-2),
    "adamw_schedule": lambda: ft.adamw(ft.linear_schedule(1e-2, 0.0, 10), weight_decay=0.1),
    "nadam": lambda: ft.nadam(1e-2),
    "radam": lambda: ft.radam(1e-2),
    "amsgrad": lambda: ft.amsgrad(1e-2),
    "adamax": lambda: ft.adamax(1e-2),
    "rmsprop": lambda: ft.rmsprop(1e-2, momentum=0.9, centered=True),
    "adagrad": lambda: ft.adagrad(1e-2),
    "lion": lambda: ft.lion(1e-3),
    "lamb": lambda: ft.lamb(1e-3),
    "lars": lambda: ft.lars(1e-3),
    "adafactor": lambda: ft.adafactor(1e-2),
    "noisy_sgd": lambda: ft.noisy_sgd(1e-2, seed=0),
    "sign_sgd": lambda: ft.sign_sgd(1e-2),
    "chain_clip_adamw": lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-2)),
    "clip": lambda: ft.clip(0.5),
    "clip_by_block_rms": lambda: ft.clip_by_block_rms(0.5),
    "adaptive_grad_clip": lambda: ft.adaptive_grad_clip(0.1),
    "trace_ema": lambda: ft.chain(ft.trace(0.9), ft.ema(0.99)),
    "factored_rms": lambda: ft.scale_by_factored_rms(),
    "trust_ratio": lambda: ft.chain(ft.scale_by_adam(), ft.scale_by_trust_ratio()),
    "add_noise": lambda: ft.add_noise(0.1, 0.55, 0),
    "masked": lambda: ft.masked(ft.adam(1e-2), lambda p: ft.tree.map(lambda x: x.ndim > 1, p)),
    "partition": lambda: ft.partition(
        {"a": ft.adam(1e-2), "b": ft.sgd(0.1)},
        lambda p: ft.tree.map(lambda x: "a" if x.ndim > 1 else "b", p),
    ),
    "apply_if_finite": lambda: ft.apply_if_finite(ft.adam(1e-2), 3),
    "zero_nans": lambda: ft.chain(ft.zero_nans(), ft.sgd(0.1)),
    "multi_steps": lambda: ft.MultiSteps(ft.adam(1e-2), 2),
    "inject_hyperparams": lambda: ft.inject_hyperparams(ft.adamw)(learning_rate=1e-2),
}


@given(
    name=st.sampled_from(sorted(TRANSFORMS)),
    spec=specs(),
    kind=st.sampled_from(MUTATIONS),
    where=st.integers(0, 10),
    seed=st.integers(0, 2**16),
)
def test_transforms_raise_only_clear_errors_and_never_mutate(name, spec, kind, where, seed):
    gen = torch.Generator().manual_seed(seed)
    tx = TRANSFORMS[name]()
    params = build(spec, gen)
    state = tx.init(params)
    grads = mutate(params, spec, kind, where, gen)
    before = _clone((params, grads, state))
    try:
        for _ in range(2):  # a second update sees a state the first one made
            updates, state2 = tx.update(grads, state, params)
            new_params = ft.apply_updates(params, updates)
        # Valid or not, a successful update has the params' structure and shapes.
        ft.testing.assert_trees_all_equal_shapes(new_params, params)
        ft.testing.assert_trees_all_equal_structs(state2, state)
    except (AssertionError, RecursionError):
        raise
    except Exception as err:  # the point: which errors may escape
        if kind in VALID:
            raise AssertionError(f"{name} raised on a valid input ({kind}): {err!r}") from err
        _assert_clear(err)
    _assert_unchanged(before, (params, grads, state))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_each_transform_accepts_a_0d_and_a_matrix_leaf(name):
    tx = TRANSFORMS[name]()
    params = {"s": torch.tensor(0.5), "m": torch.randn(3, 2)}
    grads = {"s": torch.tensor(0.1), "m": torch.randn(3, 2)}
    updates, _ = tx.update(grads, tx.init(params), params)
    ft.testing.assert_trees_all_equal_shapes(updates, params)


# ------------------------------------------------------------------------------ train step


@st.composite
def step_cases(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(0, 6))
    case = {
        "n": n,
        "shapes": draw(st.lists(st.lists(st.integers(1, 3), max_size=2), min_size=1, max_size=3)),
        "dtypes": draw(st.lists(st.sampled_from(FLOATS), min_size=3, max_size=3)),
        "micro_batches": draw(
            st.one_of(
                st.integers(0, 7),
                st.lists(st.integers(0, 4), min_size=1, max_size=3),
                st.sampled_from(["2", 1.5, None]),
            )
        ),
        "strategy": draw(st.sampled_from(["loop", "vmap"])),
        "batch_fault": draw(
            st.sampled_from(["none", "none", "leading", "scalar", "string", "empty", "nan"])
        ),
        "state_fault": draw(st.sampled_from(["none", "none", "other_tx", "shape", "int_param"])),
        "donate": draw(st.booleans()),
        "faults": draw(st.sampled_from(["default", "loss_scale", "max_skips", "ignore"])),
        "seed": draw(st.integers(0, 2**16)),
    }
    return case


def _step_inputs(case: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    gen = torch.Generator().manual_seed(case["seed"])
    params = {
        f"p{i}": torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype)
        for i, (shape, dtype) in enumerate(zip(case["shapes"], case["dtypes"]))
    }
    n = case["n"]
    batch: dict[str, Any] = {"x": torch.randn(n, 3, generator=gen), "y": torch.randn(n)}
    fault = case["batch_fault"]
    if fault == "leading":
        batch["y"] = torch.randn(n + 1)
    elif fault == "scalar":
        batch["y"] = torch.tensor(1.0)
    elif fault == "string":
        batch["y"] = "labels"
    elif fault == "empty":
        batch = {}
    elif fault == "nan" and n:
        batch["x"][0, 0] = float("nan")

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        total = (b["x"].sum(-1) - b["y"]).square().mean()
        for leaf in p.values():
            total = total + leaf.square().mean() * b["x"].mean()
        return total

    return params, batch, loss_fn, gen


FAULT_OPTIONS = {
    "default": dict,
    "loss_scale": lambda: {"loss_scale": ft.DynamicLossScale(2.0**10)},
    "max_skips": lambda: {"max_consecutive_skips": 2},
    "ignore": lambda: {"nonfinite": "ignore"},
}


@given(case=step_cases())
def test_train_step_raises_only_clear_errors_and_never_mutates(case):
    params, batch, loss_fn, _ = _step_inputs(case)
    tx = ft.adamw(1e-2)
    valid = True
    state_tx = tx
    if case["state_fault"] == "other_tx":
        state_tx, valid = ft.sgd(0.1, momentum=0.9), False
    try:
        if case["state_fault"] == "int_param":
            params = {**params, "p0": params["p0"].round().to(torch.int64)}
            valid = False
        state = ft.TrainState.create(params=params, tx=state_tx)
        if case["state_fault"] == "shape":
            bad = {**state.params, "p0": torch.zeros(*state.params["p0"].shape, 2)}
            state, valid = state.replace(params=bad), False
        step = ft.make_train_step(
            loss_fn,
            tx,
            micro_batches=case["micro_batches"],
            strategy=case["strategy"],
            donate=case["donate"],
            **FAULT_OPTIONS[case["faults"]](),
        )
    except (ValueError, TypeError) as err:
        _assert_clear(err)
        return
    mb = case["micro_batches"]
    n = case["n"]
    sizes_ok = (isinstance(mb, int) and 1 <= mb <= n) or (
        isinstance(mb, list) and all(s >= 1 for s in mb) and sum(mb) == n
    )
    valid = valid and sizes_ok and case["batch_fault"] in ("none", "nan")
    before = _clone((state, batch))
    try:
        new_state, metrics = step(state, batch)
    except (AssertionError, RecursionError):
        raise
    except Exception as err:  # the point: which errors may escape
        if valid:
            raise AssertionError(f"a valid step raised: {err!r}") from err
        _assert_clear(err)
        assert not state.consumed  # a failing step leaves its input usable
        _assert_unchanged(before, (state, batch))
        return
    assert valid, f"an invalid step ran: {case}"
    assert int(new_state.step) == 1 and metrics["loss"].dim() == 0
    ft.testing.assert_trees_all_equal_structs(new_state.params, before[0].params)
    if case["batch_fault"] == "nan" and case["faults"] != "ignore":
        assert int(metrics["skipped"]) == 1
        _assert_unchanged(before[0].params, new_state.params)
        _assert_unchanged(before[0].opt_state, new_state.opt_state)
    _assert_unchanged(before[1], batch)
    if not case["donate"]:
        _assert_unchanged(before[0], state)


# --------------------------------------------------------------------- other entry points


@given(spec=specs(), kind=st.sampled_from(MUTATIONS), where=st.integers(0, 10))
def test_per_sample_grads_raise_only_clear_errors(spec, kind, where):
    gen = torch.Generator().manual_seed(0)
    params = build(spec, gen)
    if kind == "int":
        params = ft.tree.map(lambda p: p.round().to(torch.int64), params)
    batch = {"x": torch.randn(3, 2, generator=gen)}
    if kind in ("shape", "drop"):
        batch["y"] = torch.randn(4)  # a mismatched leading size

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        total = b["x"].sum()
        for leaf in ft.tree.leaves(p):
            total = total + leaf.sum() * b["x"].mean()
        return total

    before = _clone((params, batch))
    try:
        grads = ft.per_sample_grads(loss_fn, params, batch)
    except (ValueError, TypeError) as err:
        assert kind in ("int", "shape", "drop"), err
        _assert_clear(err)
    else:
        assert kind not in ("int", "shape", "drop")
        ft.testing.assert_trees_all_equal_structs(grads, params)
    _assert_unchanged(before, (params, batch))


@given(
    spec=specs(),
    kind=st.sampled_from(MUTATIONS),
    where=st.integers(0, 10),
    seed=st.integers(0, 2**16),
)
def test_checkpoint_restore_names_the_differing_path_and_never_mutates(spec, kind, where, seed):
    gen = torch.Generator().manual_seed(seed)
    saved = build(spec, gen)
    # The "gradients" of ``mutate`` have the tree's structure, wrong in one place or not.
    target = mutate(saved, spec, kind, where, gen)
    path = _paths(spec)[where % len(_paths(spec))]
    before = _clone((saved, target))
    with tempfile.TemporaryDirectory() as directory:
        file = os.path.join(directory, "state.safetensors")
        checkpoint.save(file, saved)
        try:
            restored = checkpoint.restore(file, target=target)
        except checkpoint.CheckpointMismatchError as err:
            assert kind not in ("same", "nonfinite"), err
            message = str(err)
            assert message.startswith(("checkpoint", "target")), message
            if kind in ("shape", "extra_dim", "dtype", "int"):  # the leaf's own path
                where_str = "checkpoint" + "".join(f"[{k!r}]" for k in path)
                assert message.startswith(where_str + " "), (message, where_str)
                assert "target has" in message
        else:
            assert kind in ("same", "nonfinite"), f"restored into a wrong target ({kind})"
            _assert_unchanged(saved, restored)
    _assert_unchanged(before, (saved, target))
