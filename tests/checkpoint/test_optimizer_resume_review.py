"""Review: checkpoint, restore into a fresh state and resume, with this month's optimizers.

A run trained N steps, saved, restored into a freshly initialised state (as the checkpoint
guide shows) and trained M more must equal the uninterrupted run bit for bit, parameters and
optimizer state; the restored state must have the target's node classes, leaf types, dtypes and
devices; a checkpoint of another optimizer is refused naming a path, leaving the file and the
target untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F

import functrain as ft
from functrain import checkpoint

N_BEFORE, M_AFTER = 3, 3
Factory = Callable[[torch.dtype], ft.GradientTransformation]


def _mlp(dtype: torch.dtype) -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    return ft.functionalize(net.to(dtype))


def _batches(dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {
            "x": torch.randn(5, 4, generator=gen, dtype=dtype),
            "y": torch.randn(5, 2, generator=gen, dtype=dtype),
        }
        for _ in range(N_BEFORE + M_AFTER)
    ]


# Each factory builds the optimizer for a parameter dtype (DoG keeps its own dtype otherwise).
OPTIMIZERS: dict[str, Factory] = {
    "adabelief": lambda d: ft.adabelief(1e-2),
    "yogi": lambda d: ft.yogi(1e-2),
    "adadelta": lambda d: ft.adadelta(1.0),
    "adan": lambda d: ft.adan(1e-2, weight_decay=1e-3),
    "adamaxw": lambda d: ft.adamaxw(1e-2),
    "rprop": lambda d: ft.rprop(1e-2),
    "novograd": lambda d: ft.novograd(1e-2),
    "polyak_sgd": lambda d: ft.polyak_sgd(0.5),
    "sm3": lambda d: ft.sm3(1e-2),
    "optimistic_gd": lambda d: ft.optimistic_gradient_descent(1e-2),
    "optimistic_adam": lambda d: ft.optimistic_adam(1e-2),
    "optimistic_adam_v2": lambda d: ft.optimistic_adam_v2(1e-2),
    "fromage": lambda d: ft.fromage(1e-2),
    "lookahead": lambda d: ft.lookahead(ft.adam(1e-2), sync_period=2, slow_step_size=0.5),
    "nonnegative": lambda d: ft.chain(ft.sgd(1e-2), ft.keep_params_nonnegative()),
    "centralize": lambda d: ft.chain(ft.centralize(), ft.adam(1e-2)),
    "apply_every": lambda d: ft.chain(ft.sgd(1e-2), ft.apply_every(2)),
    "ademamix": lambda d: ft.ademamix(1e-2),
    "cond_transform": lambda d: ft.conditionally_transform(ft.adam(1e-2), lambda s: s % 2 == 0),
    "cond_mask": lambda d: ft.conditionally_mask(ft.adam(1e-2), lambda s: s % 2 == 1),
    "lbfgs": lambda d: ft.lbfgs(1e-2, memory_size=2, linesearch=None),
    "signum": lambda d: ft.signum(1e-2),
    "dog": lambda d: ft.chain(ft.scale_by_distance_over_gradients(param_dtype=d), ft.scale(-1e-2)),
    "schedule_free_adamw": lambda d: ft.schedule_free_adamw(1e-2, warmup_steps=2),
    "muon": lambda d: ft.muon(1e-2),
    "reduce_on_plateau": lambda d: ft.chain(ft.adam(1e-2), ft.reduce_on_plateau(patience=1)),
}

# Factories whose numeric hyperparameters inject_hyperparams can turn into state.
INJECTABLE: dict[str, Callable[[], ft.GradientTransformation]] = {
    "adabelief": lambda: ft.inject_hyperparams(ft.adabelief)(learning_rate=1e-2),
    "yogi": lambda: ft.inject_hyperparams(ft.yogi)(learning_rate=1e-2),
    "adadelta": lambda: ft.inject_hyperparams(ft.adadelta)(learning_rate=1.0),
    "adan": lambda: ft.inject_hyperparams(ft.adan)(learning_rate=1e-2),
    "rprop": lambda: ft.inject_hyperparams(ft.rprop)(learning_rate=1e-2),
    "novograd": lambda: ft.inject_hyperparams(ft.novograd)(learning_rate=1e-2),
    "sm3": lambda: ft.inject_hyperparams(ft.sm3)(learning_rate=1e-2),
    "optimistic_gd": lambda: ft.inject_hyperparams(ft.optimistic_gradient_descent)(
        learning_rate=1e-2
    ),
    "optimistic_adam": lambda: ft.inject_hyperparams(ft.optimistic_adam)(learning_rate=1e-2),
    "fromage": lambda: ft.inject_hyperparams(ft.fromage)(learning_rate=1e-2),
    "ademamix": lambda: ft.inject_hyperparams(ft.ademamix)(learning_rate=1e-2),
    "signum": lambda: ft.inject_hyperparams(ft.signum)(learning_rate=1e-2),
    "schedule_free_adamw": lambda: ft.inject_hyperparams(ft.schedule_free_adamw)(
        learning_rate=1e-2
    ),
}


def _fresh(
    tx: ft.GradientTransformation, dtype: torch.dtype, lookahead: bool = False
) -> tuple[Any, ft.TrainState]:
    """A new step and a freshly initialised state, as a restarted process builds them.

    Lookahead trains ``LookaheadParams``: gradients of the fast weights, slow ones carried.
    """
    model, params, buffers = _mlp(dtype)
    if lookahead:
        params = ft.LookaheadParams.init_synced(params)

    def loss(p: Any, b: Any) -> torch.Tensor:
        return F.mse_loss(model(p.fast if lookahead else p, b["x"]), b["y"])

    step = ft.make_train_step(loss, tx)
    return step, step.prepare(ft.TrainState.create(params=params, buffers=buffers, tx=tx))


def _leaf_signature(tree: Any) -> list[tuple[type, Any, Any]]:
    """Each leaf's Python type, with a tensor's dtype and device."""
    leaves = optree.tree_leaves(tree, none_is_leaf=True)
    return [
        (type(x), x.dtype, x.device) if isinstance(x, torch.Tensor) else (type(x), None, None)
        for x in leaves
    ]


def _resume_matches(
    make_tx: Callable[[], ft.GradientTransformation],
    dtype: torch.dtype,
    path: Path,
    lookahead: bool = False,
) -> None:
    batches = _batches(dtype)
    step, state = _fresh(make_tx(), dtype, lookahead)
    for b in batches[:N_BEFORE]:
        state, _ = step(state, b)
    checkpoint.save(path, state)
    for b in batches[N_BEFORE:]:
        state, _ = step(state, b)
    reference = state

    step2, target = _fresh(make_tx(), dtype, lookahead)
    target_structure = optree.tree_structure(target, none_is_leaf=True)
    target_leaves = _leaf_signature(target)
    resumed = checkpoint.restore(path, target=target)
    # The restored state has the fresh state's classes, scalar types, dtypes and devices.
    assert optree.tree_structure(resumed, none_is_leaf=True) == target_structure
    assert _leaf_signature(resumed) == target_leaves
    for b in batches[N_BEFORE:]:
        resumed, _ = step2(resumed, b)
    assert optree.tree_structure(resumed, none_is_leaf=True) == optree.tree_structure(
        reference, none_is_leaf=True
    )
    ft.testing.assert_trees_all_equal(resumed, reference, bitwise=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_is_bit_identical(name: str, dtype: torch.dtype, tmp_path: Path) -> None:
    _resume_matches(
        lambda: OPTIMIZERS[name](dtype),
        dtype,
        tmp_path / "ckpt.safetensors",
        lookahead=name == "lookahead",
    )


@pytest.mark.parametrize("name", list(INJECTABLE))
def test_resume_under_inject_hyperparams(name: str, tmp_path: Path) -> None:
    _resume_matches(INJECTABLE[name], torch.float32, tmp_path / "ckpt.safetensors")


def _weights_only(params: Any) -> Any:
    return {k: k.endswith("weight") for k in params}


def test_resume_lookahead_over_masked_fast_optimizer(tmp_path: Path) -> None:
    """As lookahead's docstring says: mask the fast optimizer, not lookahead."""
    _resume_matches(
        lambda: ft.lookahead(
            ft.masked(ft.sm3(1e-2), _weights_only), sync_period=2, slow_step_size=0.5
        ),
        torch.float64,
        tmp_path / "ckpt.safetensors",
        lookahead=True,
    )


@pytest.mark.parametrize("name", ["sm3", "lbfgs", "dog", "rprop", "ademamix", "cond_mask"])
def test_resume_under_masked_and_partition(name: str, tmp_path: Path) -> None:
    inner = OPTIMIZERS[name]
    _resume_matches(
        lambda: ft.masked(inner(torch.float64), _weights_only),
        torch.float64,
        tmp_path / "masked.safetensors",
    )
    _resume_matches(
        lambda: ft.partition({True: inner(torch.float64), False: ft.sgd(1e-2)}, _weights_only),
        torch.float64,
        tmp_path / "partition.safetensors",
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("saved", "other"),
    [
        ("adabelief", "sm3"),
        ("adan", "ademamix"),
        ("lbfgs", "dog"),
        ("sm3", "rprop"),
        ("schedule_free_adamw", "ademamix"),
        ("optimistic_gd", "optimistic_adam"),
    ],
)
def test_other_optimizer_is_refused_naming_a_path(saved: str, other: str, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    step, state = _fresh(OPTIMIZERS[saved](torch.float32), torch.float32)
    state, _ = step(state, _batches(torch.float32)[0])
    checkpoint.save(path, state)
    before = _digest(path)
    _, target = _fresh(OPTIMIZERS[other](torch.float32), torch.float32)
    kept = optree.tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, target, none_is_leaf=True
    )
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"\['opt_state'\]"):
        checkpoint.restore(path, target=target)
    assert _digest(path) == before
    ft.testing.assert_trees_all_equal(target, kept, bitwise=True)


CHANGED_STRUCTURE: dict[str, tuple[Callable[[], Any], Callable[[], Any], str]] = {
    # inject_hyperparams adds hyperparameters to the state: a plain target must not fit it.
    "injected_vs_plain": (
        INJECTABLE["yogi"],
        lambda: ft.yogi(1e-2),
        r"checkpoint\['opt_state'\] is an InjectHyperparamsState but target has a tuple",
    ),
    "static_arg": (
        lambda: ft.inject_hyperparams(ft.adan)(learning_rate=1e-2),
        lambda: ft.inject_hyperparams(ft.adan, static_args="b1")(learning_rate=1e-2),
        r"checkpoint\['opt_state'\]\['hyperparams'\]\['b1'\] has no counterpart in target",
    ),
    "hyperparam_dtype": (
        lambda: ft.inject_hyperparams(ft.signum, hyperparam_dtype=torch.float64)(
            learning_rate=1e-2
        ),
        INJECTABLE["signum"],
        r"\['hyperparams'\]\['beta'\] has dtype float64 but target has float32",
    ),
    "lbfgs_memory": (
        lambda: ft.lbfgs(1e-2, memory_size=2, linesearch=None),
        lambda: ft.lbfgs(1e-2, memory_size=3, linesearch=None),
        r"\['diff_params_memory'\]\['0.bias'\] has shape \(2, 6\) but target has \(3, 6\)",
    ),
}


@pytest.mark.parametrize("case", list(CHANGED_STRUCTURE))
def test_changed_hyperparameter_structure_is_refused(case: str, tmp_path: Path) -> None:
    saved, other, message = CHANGED_STRUCTURE[case]
    path = tmp_path / "ckpt.safetensors"
    step, state = _fresh(saved(), torch.float32)
    state, _ = step(state, _batches(torch.float32)[0])
    checkpoint.save(path, state)
    _, target = _fresh(other(), torch.float32)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=message):
        checkpoint.restore(path, target=target)


def test_odd_leaves_round_trip_with_their_types(tmp_path: Path) -> None:
    """Python scalars, int and bool tensors, None, (), MaskedNode and functrain NamedTuples."""
    _, params, _ = _mlp(torch.float64)
    fast = ft.masked(
        ft.chain(ft.sm3(1e-2), ft.lbfgs(1e-2, memory_size=2, linesearch=None)), _weights_only
    )
    tx = ft.lookahead(fast, sync_period=2, slow_step_size=0.5)
    tree = {
        "opt": tx.init(ft.LookaheadParams.init_synced(params)),
        "dog": ft.scale_by_distance_over_gradients(param_dtype=torch.float64).init(params),
        "scalars": (3, 0.1, True, "s", None, ()),
        # The masked-out node of a state made under vmap: an empty NamedTuple.
        "masked_out": {"w": ft.MaskedNode(), "b": ft.MaskedState(inner_state=ft.MaskedNode())},
        "ints": torch.arange(3, dtype=torch.int32),
        "flags": torch.tensor([True, False]),
    }
    path = tmp_path / "odd.safetensors"
    checkpoint.save(path, tree)
    back = checkpoint.restore(path, target=tree)
    assert optree.tree_structure(back, none_is_leaf=True) == optree.tree_structure(
        tree, none_is_leaf=True
    )
    assert _leaf_signature(back) == _leaf_signature(tree)
    assert type(back["masked_out"]["w"]) is ft.MaskedNode
    assert type(back["masked_out"]["b"].inner_state) is ft.MaskedNode
    assert type(back["opt"]) is ft.LookaheadState
    assert type(back["scalars"][1]) is float and back["scalars"][4:] == (None, ())
    assert back["scalars"] == tree["scalars"]
    # ft.testing compares leaves as tensors, which a str leaf cannot become.
    rest = [k for k in tree if k != "scalars"]
    ft.testing.assert_trees_all_equal(
        {k: back[k] for k in rest}, {k: tree[k] for k in rest}, bitwise=True
    )


def test_manager_keeps_last_and_resumes_from_latest(tmp_path: Path) -> None:
    dtype = torch.float32
    batches = _batches(dtype)
    make_tx = lambda: ft.lookahead(ft.sm3(1e-2), sync_period=2, slow_step_size=0.5)  # noqa: E731
    manager = checkpoint.CheckpointManager(tmp_path, max_to_keep=2)
    step, state = _fresh(make_tx(), dtype, lookahead=True)
    for b in batches[:N_BEFORE]:
        state, _ = step(state, b)
        manager.save(state.step, state)
    for b in batches[N_BEFORE:]:
        state, _ = step(state, b)

    assert manager.all_steps() == [N_BEFORE - 1, N_BEFORE]
    step2, target = _fresh(make_tx(), dtype, lookahead=True)
    again = checkpoint.CheckpointManager(tmp_path, max_to_keep=2)
    resumed = again.restore_latest(target=target)
    assert again.restored_step == N_BEFORE == int(resumed.step)
    for b in batches[N_BEFORE:]:
        resumed, _ = step2(resumed, b)
    ft.testing.assert_trees_all_equal(resumed, state, bitwise=True)
