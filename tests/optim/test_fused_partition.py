"""``partition`` (torch.optim's parameter groups) on the in-place fused path.

Each label's transform runs on its own leaves; when every group has a shape the fused kernels
take (adam/adamw/sgd, masked decay, schedules, ...) the kernel engine runs them group by group,
as ``torch.optim`` runs its groups, the found_inf skip included. References: the pure path's
``tx.update`` + ``apply_updates`` on copies (float64: the kernels order a few operations
differently, nothing more), and ``torch.optim.AdamW``/``SGD`` with two parameter groups.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.optim import fused

LABELS = {"w1": "body", "b1": "head", "w2": "body", "b2": "head", "w3": "head"}


def _by_ndim(p):
    return ft.tree.map(lambda x: "body" if x.dim() > 1 else "head", p)


def _params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w1": (6, 4), "b1": (6,), "w2": (3, 6), "b2": (3,), "w3": (2, 3)}
    return {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}


def _grads(seed, dtype=torch.float64):
    return _params(dtype, seed=100 + seed)


def _clone(tree):
    return ft.tree.map(lambda x: x.clone(), tree)


def _sched(peak):
    return ft.warmup_cosine_decay_schedule(0.0, peak, 2, 10)


OPTIMIZERS = {
    "adamw_adam": (
        lambda: ft.partition(
            {"body": ft.adamw(1e-2, weight_decay=0.1), "head": ft.adam(3e-3)}, LABELS
        ),
        "kernel",
    ),
    "adamw_sgd_momentum_fn_labels": (
        lambda: ft.multi_transform(
            {"body": ft.adamw(1e-2), "head": ft.sgd(0.1, momentum=0.9, nesterov=True)},
            _by_ndim,
        ),
        "kernel",
    ),
    "schedules_and_masked_decay": (
        lambda: ft.partition(
            {
                "body": ft.adamw(
                    _sched(1e-2),
                    weight_decay=0.05,
                    mask=lambda p: ft.tree.map(lambda x: x.shape[0] > 4, p),
                ),
                "head": ft.adamw(_sched(1e-3), weight_decay=0.0),
            },
            LABELS,
        ),
        "kernel",
    ),
    "global_clip_then_groups": (
        lambda: ft.chain(
            ft.clip_by_global_norm(0.3),
            ft.partition({"body": ft.adamw(1e-2), "head": ft.sgd(0.05, momentum=0.5)}, LABELS),
        ),
        "kernel",
    ),
    "clip_inside_one_group": (
        lambda: ft.partition(
            {
                "body": ft.chain(ft.clip_by_global_norm(0.2), ft.adamw(1e-2)),
                "head": ft.adam(1e-3),
            },
            LABELS,
        ),
        "kernel",
    ),
    "inject_hyperparams_per_group": (
        lambda: ft.partition(
            {
                "body": ft.inject_hyperparams(ft.adamw)(learning_rate=1e-2, weight_decay=0.1),
                "head": ft.inject_hyperparams(ft.sgd)(learning_rate=0.1, momentum=0.9),
            },
            LABELS,
        ),
        None,  # whichever engine applies: the numbers are what is checked
    ),
    "unused_label": (
        lambda: ft.partition(
            {"body": ft.adamw(1e-2), "head": ft.adam(1e-3), "frozen": ft.adamw(1.0)}, LABELS
        ),
        "kernel",
    ),
    "nested_partition": (
        lambda: ft.partition(
            {
                "body": ft.partition(
                    {"a": ft.adamw(1e-2), "b": ft.adam(1e-3)},
                    {"w1": "a", "b1": "a", "w2": "b", "b2": "b", "w3": "b"},
                ),
                "head": ft.sgd(0.1, momentum=0.9),
            },
            LABELS,
        ),
        "kernel",
    ),
    "selective_transform_frozen_group": (
        lambda: ft.selective_transform(
            ft.adamw(1e-2, weight_decay=0.1),
            freeze_mask={"w1": False, "b1": True, "w2": False, "b2": True, "w3": True},
        ),
        "kernel",
    ),
    "partition_with_set_to_zero": (
        lambda: ft.partition({"body": ft.sgd(0.1, momentum=0.9), "head": ft.set_to_zero()}, LABELS),
        "kernel",
    ),
    "freeze_after_adamw_takes_foreach": (
        lambda: ft.chain(
            ft.adamw(1e-2),
            ft.freeze({"w1": False, "b1": True, "w2": False, "b2": True, "w3": False}),
        ),
        "foreach",
    ),
    "nesterov_adam_group_takes_foreach": (
        lambda: ft.partition(
            {"body": ft.adamw(1e-2), "head": ft.adam(1e-3, nesterov=True)}, LABELS
        ),
        "foreach",
    ),
    "op_after_the_partition_takes_foreach": (
        lambda: ft.chain(
            ft.partition({"body": ft.scale_by_adam(), "head": ft.trace(0.9)}, LABELS),
            ft.scale_by_learning_rate(1e-2),
        ),
        "foreach",
    ),
}


@pytest.mark.parametrize("update_norm", [False, True])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_in_place_equals_pure_path_over_steps(name, update_norm):
    make, engine = OPTIMIZERS[name]
    tx = make()
    pure_p, fast_p = _params(), _params()
    pure_s, fast_s = tx.init(pure_p), tx.init(fast_p)
    for step in range(4):
        grads = _grads(step)
        updates, pure_s = tx.update(grads, pure_s, pure_p)
        new_pure_p = ft.apply_updates(pure_p, updates)
        done = fused.update_in_place(tx, _clone(grads), fast_s, fast_p, update_norm=update_norm)
        assert done is not None
        if engine is not None:
            assert done.engine == engine
        fast_s = done.opt_state
        ft.testing.assert_trees_all_close(fast_p, new_pure_p, rtol=1e-12, atol=1e-13)
        ft.testing.assert_trees_all_equal_structs(fast_s, pure_s)
        ft.testing.assert_trees_all_close(fast_s, pure_s, rtol=1e-12, atol=1e-13)
        if update_norm:
            want = ft.tree.norm(ft.tree.sub(new_pure_p, pure_p))
            torch.testing.assert_close(done.update_norm, want, rtol=1e-10, atol=1e-14)
        pure_p = new_pure_p


def test_group_clip_uses_the_groups_norm_not_the_steps():
    # The step hands the kernels the global norm; a clip inside one group must not use it.
    tx = OPTIMIZERS["clip_inside_one_group"][0]()
    params, grads = _params(), _grads(0)
    updates, _ = tx.update(grads, tx.init(params), params)
    want = ft.apply_updates(params, updates)
    fast = _params()
    done = fused.update_in_place(
        tx, _clone(grads), tx.init(fast), fast, grad_norm=ft.tree.norm(grads)
    )
    assert done is not None and done.engine == "kernel"
    ft.testing.assert_trees_all_close(fast, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["adamw_adam", "global_clip_then_groups", "unused_label"])
def test_found_inf_leaves_everything_bit_for_bit(name):
    tx = OPTIMIZERS[name][0]()
    params = _params()
    state = tx.init(params)
    fused.update_in_place(tx, _grads(0), state, params)  # a real step first: non-zero moments
    before_p, before_s = _clone(params), _clone(state)
    bad = _grads(1)
    bad["w2"][1, 2] = float("nan")
    done = fused.update_in_place(tx, bad, state, params, found_inf=torch.tensor(True))
    assert done is not None and done.engine == "kernel"
    ft.testing.assert_trees_all_equal(params, before_p, bitwise=True)
    ft.testing.assert_trees_all_equal(done.opt_state, before_s, bitwise=True)


def test_unrecognised_group_touches_nothing_and_pure_path_names_bad_labels():
    tx = ft.partition({"body": ft.adamw(1e-2), "head": ft.lion(1e-3)}, LABELS)
    params, grads = _params(), _grads(0)
    state = tx.init(params)
    before_p, before_s = _clone(params), _clone(state)
    flag = torch.tensor(False)
    assert fused.update_in_place(tx, grads, state, params, found_inf=flag) is None
    ft.testing.assert_trees_all_equal(params, before_p, bitwise=True)
    ft.testing.assert_trees_all_equal(state, before_s, bitwise=True)

    # A label function that gives an unknown label: not planned, the pure path names it.
    bad = ft.partition({"body": ft.adamw(1e-2)}, lambda p: ft.tree.map(lambda x: "nope", p))
    good = ft.partition({"body": ft.adamw(1e-2)}, lambda p: ft.tree.map(lambda x: "body", p))
    state = good.init(params)
    assert fused.update_in_place(bad, grads, state, params) is None
    ft.testing.assert_trees_all_equal(params, before_p, bitwise=True)
    with pytest.raises(ValueError, match="'nope'"):
        bad.update(grads, state, params)


def _torch_groups_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    return net, x, y


@pytest.mark.parametrize("donate", [True, False])
def test_train_step_matches_torch_optim_parameter_groups(donate):
    """Two AdamW groups (matrices lr 1e-2 wd 0.1, vectors lr 3e-3 wd 0) against
    ``torch.optim.AdamW`` with the same two parameter groups, in float64."""
    net, x, y = _torch_groups_problem()
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    ref.load_state_dict(net.state_dict())
    matrices = [p for p in ref.parameters() if p.dim() > 1]
    vectors = [p for p in ref.parameters() if p.dim() == 1]
    opt = torch.optim.AdamW(
        [
            {"params": matrices, "lr": 1e-2, "weight_decay": 0.1},
            {"params": vectors, "lr": 3e-3, "weight_decay": 0.0},
        ]
    )
    model, params, _ = ft.functionalize(net, copy=True)
    tx = ft.partition(
        {"body": ft.adamw(1e-2, weight_decay=0.1), "head": ft.adamw(3e-3, weight_decay=0.0)},
        _by_ndim,
    )

    def loss_fn(p, b):
        return nn.functional.cross_entropy(model(p, b[0]), b[1])

    step = ft.make_train_step(loss_fn, tx, micro_batches=2, donate=donate)
    state = ft.TrainState.create(params=params, tx=tx, seed=None)
    for i in range(5):
        xb, yb = x[i : i + 12], y[i : i + 12]
        state, _ = step(state, (xb, yb))
        opt.zero_grad()
        nn.functional.cross_entropy(ref(xb), yb).backward()
        opt.step()
    if donate:
        assert step.apply_optimizer.last_engine == "kernel"
    for name, q in ref.named_parameters():
        torch.testing.assert_close(state.params[name], q.detach(), rtol=1e-12, atol=1e-13)


def test_frozen_group_is_left_bit_for_bit():
    """A ``set_to_zero`` group is not written at all: its leaves keep every bit (a ``-0.0``
    included, which the pure path's ``p + 0.0`` turns into ``+0.0``: equal, not identical)."""
    tx = ft.partition({"body": ft.adamw(1e-2), "head": ft.set_to_zero()}, LABELS)
    params = _params()
    params["b1"][0] = -0.0
    params["w3"][0, 0] = float("nan")  # a frozen NaN stays NaN, untouched
    before = _clone(params)
    state = tx.init(params)
    for step in range(3):
        done = fused.update_in_place(tx, _grads(step), state, params, update_norm=True)
        assert done is not None and done.engine == "kernel"
        state = done.opt_state
    for name in ("b1", "b2", "w3"):
        ft.testing.assert_trees_all_equal(params[name], before[name], bitwise=True)
    assert not torch.equal(params["w1"], before["w1"])
    updates, _ = tx.update(_grads(0), tx.init(before), before)
    assert float(ft.tree.norm({k: updates[k] for k in ("b1", "b2", "w3")})) == 0.0


@pytest.mark.parametrize("wrap", ["partition", "masked"])
def test_injected_hyperparameters_take_their_groups_dtype(wrap):
    """``inject_hyperparams`` inside a group casts its hyperparameters to the promoted dtype of
    the leaves it sees (float32 here, beside a float64 group), on both paths."""
    params = {"w": torch.randn(3, 2), "v": torch.randn(2, dtype=torch.float64)}
    grads = {"w": torch.randn(3, 2), "v": torch.randn(2, dtype=torch.float64)}
    injected = ft.inject_hyperparams(ft.adamw)(learning_rate=1e-2, weight_decay=0.1)
    if wrap == "partition":
        tx = ft.partition({"a": injected, "b": ft.adam(1e-3)}, {"w": "a", "v": "b"})
    else:
        tx = ft.masked(injected, {"w": True, "v": False})

    def with_python_lr(state):
        # A hyperparameter set by hand as a Python number: cast at the next update.
        inner = state.inner_states["a"] if wrap == "partition" else state
        hp = dict(inner.inner_state.hyperparams, learning_rate=0.02)
        new_inner = inner._replace(inner_state=inner.inner_state._replace(hyperparams=hp))
        if wrap == "partition":
            return state._replace(inner_states={**state.inner_states, "a": new_inner})
        return new_inner

    updates, pure_state = tx.update(grads, with_python_lr(tx.init(params)), params)
    fast = _clone(params)
    done = fused.update_in_place(tx, _clone(grads), with_python_lr(tx.init(fast)), fast)
    assert done is not None
    ft.testing.assert_trees_all_equal_dtypes(done.opt_state, pure_state)
    ft.testing.assert_trees_all_close(done.opt_state, pure_state, rtol=1e-6, atol=1e-7)
    ft.testing.assert_trees_all_close(fast, ft.apply_updates(params, updates), rtol=1e-6, atol=1e-7)
