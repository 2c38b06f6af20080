"""Review of train steps under ``torch.func.vmap`` (ensembles): options beyond the basic cases.

Each member's new state and metrics equal a call of its own (float64, tight tolerance), or the
step refuses by name what cannot run under the transform.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch

import functrain as ft
from functrain.optim._masking import MaskedNode

MEMBERS, STEPS = 3, 3


def _loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((torch.tanh(b["x"] @ p["w1"]) @ p["w2"] - b["y"]) ** 2).mean()


def _nan_for_large_w2(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """``_loss``, NaN for a member whose ``w2[0]`` is above 100 (a per-member fault)."""
    bad = torch.where(p["w2"][0] > 100, torch.tensor(float("nan"), dtype=torch.float64), 1.0)
    return _loss(p, b) * bad


def _token_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> ft.LossSum:
    sq = (torch.tanh(b["x"] @ p["w1"]) @ p["w2"] - b["y"]) ** 2
    mask = (b["y"] > -0.5).to(sq.dtype)
    return ft.LossSum((sq * mask).sum(), mask.sum())


def _aux_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> ft.LossOutput:
    loss = _loss(p, b)
    return ft.LossOutput(loss, aux={"w2_sum": p["w2"].sum(), "twice": 2 * loss})


def _data() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    members = {
        "w1": torch.randn(MEMBERS, 4, 5, generator=gen, dtype=torch.float64),
        "w2": torch.randn(MEMBERS, 5, generator=gen, dtype=torch.float64),
    }
    batch = {
        "x": torch.randn(12, 4, generator=gen, dtype=torch.float64),
        "y": torch.randn(12, generator=gen, dtype=torch.float64),
    }
    return members, batch


def _one_member_faulty(members: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    w2 = members["w2"].clone()
    w2[1, 0] = 1000.0
    return {**members, "w2": w2}


def _unmask(tree: Any) -> Any:
    """Masked-out subtrees as a call outside vmap keeps them (``None``, not ``MaskedNode``)."""
    return optree.tree_map(
        lambda x: None if isinstance(x, MaskedNode) else x,
        tree,
        is_leaf=lambda x: isinstance(x, MaskedNode),
        none_is_leaf=True,
    )


def _run(member, batch, options, make_tx, loss_fn):
    tx = make_tx()
    step = ft.make_train_step(loss_fn, tx, **options)
    state = ft.TrainState.create(params=member, tx=tx, seed=None)
    for _ in range(STEPS):
        state, metrics = step(state, batch)
    return state.params, state.opt_state, metrics, state.extra


def _assert_members_alone(
    options: dict[str, Any],
    make_tx: Callable[[], ft.GradientTransformation],
    loss_fn: Callable[..., Any] = _loss,
    members: dict[str, torch.Tensor] | None = None,
) -> Any:
    data, batch = _data()
    members = data if members is None else members
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DP-SGD's small-batch notices
        got = torch.func.vmap(lambda m: _run(m, batch, options, make_tx, loss_fn))(members)
        got = _unmask(got)
        for i in range(MEMBERS):
            member = {k: v[i].clone() for k, v in members.items()}
            alone = _run(member, batch, options, make_tx, loss_fn)
            mine = ft.tree.map(lambda x, i=i: x[i] if x.dim() else x, got)
            ft.testing.assert_trees_all_close(mine, alone, rtol=1e-10, atol=1e-12)
    return got


CASES = {
    "loss scale": (dict(loss_scale=ft.DynamicLossScale()), lambda: ft.adam(0.05)),
    "LossSum, K=[5, 4, 3] loop": (dict(micro_batches=[5, 4, 3]), lambda: ft.adam(0.05)),
    "LossSum, K=3 vmap": (dict(micro_batches=3, strategy="vmap"), lambda: ft.adam(0.05)),
    "vmap strategy, chunk_size": (
        dict(micro_batches=4, strategy="vmap", chunk_size=2),
        lambda: ft.adam(0.05),
    ),
    "norm_metrics": (dict(norm_metrics=True, micro_batches=2), lambda: ft.adam(0.05)),
    "inject_hyperparams": (dict(), lambda: ft.inject_hyperparams(ft.adam)(learning_rate=0.05)),
    "masked": (dict(), lambda: ft.masked(ft.adam(0.05), {"w1": True, "w2": False})),
    "partition": (
        dict(),
        lambda: ft.partition({"a": ft.adam(0.05), "b": ft.sgd(0.1)}, {"w1": "a", "w2": "b"}),
    ),
    "MultiSteps": (dict(), lambda: ft.MultiSteps(ft.adam(0.05), 2)),
    "reduce_on_plateau": (
        dict(),
        lambda: ft.chain(ft.adam(0.05), ft.reduce_on_plateau(patience=0, factor=0.5)),
    ),
    "DP-SGD with noise": (
        dict(micro_batches=2, per_example_clip=1.0),
        lambda: ft.chain(ft.dp_noisy_mean(1.0, 1.0, 12, seed=0), ft.sgd(0.1)),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_member_equals_a_call_of_its_own(name):
    options, make_tx = CASES[name]
    _assert_members_alone(options, make_tx, _token_loss if "LossSum" in name else _loss)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_aux_metrics_per_member(strategy):
    got = _assert_members_alone(
        dict(micro_batches=2, strategy=strategy), lambda: ft.adam(0.05), _aux_loss
    )
    assert got[2]["w2_sum"].shape == (MEMBERS,)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(micro_batches=2), dict(loss_scale=ft.DynamicLossScale())],
    ids=["K=1", "K=2", "loss scale"],
)
def test_only_the_faulty_member_is_skipped(options):
    members = _one_member_faulty(_data()[0])
    got = _assert_members_alone(options, lambda: ft.sgd(0.1, 0.9), _nan_for_large_w2, members)
    params, _, metrics, _ = got
    assert metrics["skipped"].tolist() == [0, 1, 0]
    assert torch.equal(params["w1"][1], members["w1"][1])  # skipped every step: unchanged
    assert not torch.equal(params["w1"][0], members["w1"][0])


def test_max_consecutive_skips_is_refused_by_name():
    """Raising NonFiniteError reads the skip count on the host: the second call under vmap
    failed with vmap's '.item()' error (the first, with fresh counters, ran)."""
    members, batch = _data()
    options = dict(max_consecutive_skips=2)
    with pytest.raises(ValueError, match=r"torch.func transform.*max_consecutive_skips"):
        torch.func.vmap(lambda m: _run(m, batch, options, lambda: ft.adam(0.05), _loss))(members)


def test_max_consecutive_skips_refused_before_the_state_is_touched():
    members, batch = _data()
    tx = ft.sgd(0.1)
    step = ft.make_train_step(_loss, tx, max_consecutive_skips=0)
    states = {}

    def one(member):
        states["in"] = ft.TrainState.create(params=member, tx=tx)
        return step(states["in"], batch)[0].params

    with pytest.raises(ValueError, match="max_consecutive_skips"):
        torch.func.vmap(one)(members)
    assert states["in"].step.item() == 0  # not consumed, readable


@pytest.mark.parametrize("options", [dict(), dict(micro_batches=2, strategy="vmap")])
def test_batchnorm_buffers_per_member(options):
    """Training-mode BatchNorm: each member's running statistics and parameters as alone."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(4, 5, bias=False), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 1)
    ).double()
    model, params, buffers = ft.functionalize(module)
    members = {k: torch.stack([v + 0.1 * i for i in range(MEMBERS)]) for k, v in params.items()}
    stacked = {k: torch.stack([v.clone()] * MEMBERS) for k, v in buffers.items()}
    _, batch = _data()
    # Vmapped micro-batches cannot update running statistics: eval mode, buffers only read.
    evaluating = options.get("strategy") == "vmap"
    model = model.eval() if evaluating else model

    def loss_fn(p, b, buffers):
        out, new = model.apply(p, buffers, b["x"])
        loss = ((out.squeeze(-1) - b["y"]) ** 2).mean()
        return ft.LossOutput(
            loss, aux={"out_mean": out.mean()}, buffers=None if evaluating else new
        )

    def run(member, member_buffers):
        tx = ft.sgd(0.05, 0.9)
        step = ft.make_train_step(loss_fn, tx, **options)
        state = ft.TrainState.create(params=member, tx=tx, buffers=member_buffers)
        for _ in range(STEPS):
            state, metrics = step(state, batch)
        return state.params, state.buffers, state.opt_state, metrics

    got = torch.func.vmap(run)(members, stacked)
    for i in range(MEMBERS):
        alone = run(
            {k: v[i].clone() for k, v in members.items()}, {k: v[i] for k, v in stacked.items()}
        )
        mine = ft.tree.map(lambda x, i=i: x[i] if x.dim() else x, got)
        ft.testing.assert_trees_all_close(mine, alone, rtol=1e-10, atol=1e-12)


def test_nested_vmap():
    members, batch = _data()
    grid = {k: torch.stack([v, 0.5 * v]) for k, v in members.items()}
    options = dict(micro_batches=2)

    def run(m):
        return _run(m, batch, options, lambda: ft.adam(0.05), _loss)[:3]

    got = torch.func.vmap(torch.func.vmap(run))(grid)
    for j in range(2):
        for i in range(MEMBERS):
            alone = run({k: v[j, i].clone() for k, v in grid.items()})
            mine = ft.tree.map(lambda x, i=i, j=j: x[j, i] if x.dim() else x, got)
            ft.testing.assert_trees_all_close(mine, alone, rtol=1e-10, atol=1e-12)


def test_noise_scale_hook_with_cosine():
    # Failed with "Batching rule not implemented for aten::_foreach_addcdiv_" (grads/cosine.py).
    _assert_members_alone(
        dict(micro_batches=3, grad_stats=ft.noise_scale_hook(cosine=True)), lambda: ft.adam(0.05)
    )
