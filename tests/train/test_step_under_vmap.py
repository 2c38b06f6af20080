"""A train step under ``torch.func.vmap`` (an ensemble, as ``jax.vmap`` of a train step): each
member's new parameters, optimizer state and metrics equal a call of its own; what cannot run
under a transform is refused by name."""

from __future__ import annotations

import warnings

import pytest
import torch

import functrain as ft

MEMBERS, STEPS = 3, 3


def _loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = torch.tanh(b["x"] @ p["w1"])
    return ((hidden @ p["w2"] - b["y"]) ** 2).mean()


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


def _dp_tx() -> ft.GradientTransformation:
    return ft.chain(ft.dp_noisy_mean(1.0, 0.0, 12, seed=0), ft.sgd(0.1))


CASES = {
    "defaults, adam": (dict(), lambda: ft.adam(0.05)),
    "K=3 loop, adamw + clip": (
        dict(micro_batches=3),
        lambda: ft.chain(ft.clip_by_global_norm(0.5), ft.adamw(0.05, weight_decay=0.1)),
    ),
    "K=[5, 4, 3] loop, sgd momentum": (dict(micro_batches=[5, 4, 3]), lambda: ft.sgd(0.1, 0.9)),
    "K=4 vmap strategy, lamb": (dict(strategy="vmap", micro_batches=4), lambda: ft.lamb(0.01)),
    "nonfinite='ignore', no donation": (
        dict(nonfinite="ignore", donate=False),
        lambda: ft.adam(0.05),
    ),
    "grad_backend='func', schedule": (
        dict(grad_backend="func", micro_batches=2),
        lambda: ft.adam(ft.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10)),
    ),
    "noise-scale hook, K=2": (
        dict(micro_batches=2, grad_stats=ft.noise_scale_hook()),
        lambda: ft.adam(0.05),
    ),
    "DP-SGD, K=3": (dict(micro_batches=3, per_example_clip=1.0), _dp_tx),
}


def _run(member: dict[str, torch.Tensor], batch, options, make_tx):
    tx = make_tx()
    step = ft.make_train_step(_loss, tx, **options)
    state = ft.TrainState.create(params=member, tx=tx, seed=None)
    for _ in range(STEPS):
        state, metrics = step(state, batch)
    return state.params, state.opt_state, metrics


@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_over_an_ensemble_equals_each_member_alone(name):
    options, make_tx = CASES[name]
    members, batch = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DP-SGD's "noise_multiplier=0" notice
        got = torch.func.vmap(lambda m: _run(m, batch, options, make_tx))(members)
        for i in range(MEMBERS):
            alone = _run({k: v[i].clone() for k, v in members.items()}, batch, options, make_tx)
            mine = ft.tree.map(lambda x, i=i: x[i] if x.dim() else x, got)
            ft.testing.assert_trees_all_close(mine, alone, rtol=1e-10, atol=1e-12)


def test_vmapped_members_differ_and_learn():
    members, batch = _data()
    params, _, metrics = torch.func.vmap(
        lambda m: _run(m, batch, dict(micro_batches=2), lambda: ft.adam(0.05))
    )(members)
    assert metrics["loss"].shape == (MEMBERS,)
    assert not torch.allclose(params["w1"][0], params["w1"][1])
    first = torch.stack([_loss({k: v[i] for k, v in members.items()}, batch) for i in range(3)])
    assert (metrics["loss"] <= first).all()  # the third step's loss is below the initial one


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(grad_backend="autograd"), "grad_backend='autograd'"),
        (dict(compile=True), "compile="),
    ],
)
def test_what_cannot_run_under_vmap_is_refused_by_name(options, match):
    members, batch = _data()
    with pytest.raises(ValueError, match=rf"torch.func transform.*{match}"):
        torch.func.vmap(lambda m: _run(m, batch, options, lambda: ft.adam(0.05)))(members)


def _dropout_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = torch.nn.functional.dropout(torch.tanh(b["x"] @ p["w1"]), 0.5)
    return ((hidden @ p["w2"] - b["y"]) ** 2).mean()


def _keyed_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], key: torch.Tensor):
    # A loss that uses its micro-batch key (a batched tensor under vmap) as a value.
    jitter = (key % 7).to(b["x"].dtype) * 1e-3
    return _loss(p, b) + jitter * p["w2"].sum()


@pytest.mark.parametrize("loss_fn", [_loss, _keyed_loss])
def test_a_key_per_member_without_seeding(loss_fn):
    """Per-member keys fold as tensors under vmap: the new keys and the loss_fn keys equal
    each member's own, bit for bit."""
    members, batch = _data()
    keys = torch.stack([ft.random_key(i) for i in range(MEMBERS)])
    tx = ft.adam(0.05)
    step = ft.make_train_step(loss_fn, tx, micro_batches=3, seed_rng=False)

    def run(member, key):
        state = ft.TrainState.create(params=member, tx=tx, key=key)
        for _ in range(STEPS):
            state, _ = step(state, batch)
        return state.params, state.key

    got = torch.func.vmap(run)(members, keys)
    for i in range(MEMBERS):
        params, key = run({k: v[i].clone() for k, v in members.items()}, keys[i])
        assert torch.equal(got[1][i], key)
        ft.testing.assert_trees_all_close(
            ft.tree.map(lambda x, i=i: x[i], got[0]), params, rtol=1e-10, atol=1e-12
        )


def test_a_key_per_member_with_seeding_is_refused_by_name():
    members, batch = _data()
    keys = torch.stack([ft.random_key(i) for i in range(MEMBERS)])
    tx = ft.adam(0.05)
    step = ft.make_train_step(_dropout_loss, tx)

    def run(member, key):
        return step(ft.TrainState.create(params=member, tx=tx, key=key), batch)[0].params

    with pytest.raises(ValueError, match=r"batched state.key\) with seed_rng=True"):
        torch.func.vmap(run, randomness="different")(members, keys)


def test_a_shared_key_seeds_every_member_alike():
    """One key for all members: with vmap's randomness='same' each member draws the dropout
    masks a call of its own draws."""
    members, batch = _data()
    tx = ft.sgd(0.1)
    step = ft.make_train_step(_dropout_loss, tx, micro_batches=2)

    def run(member):
        state = ft.TrainState.create(params=member, tx=tx, seed=3)
        for _ in range(STEPS):
            state, _ = step(state, batch)
        return state.params

    got = torch.func.vmap(run, randomness="same")(members)
    for i in range(MEMBERS):
        alone = run({k: v[i].clone() for k, v in members.items()})
        ft.testing.assert_trees_all_close(
            ft.tree.map(lambda x, i=i: x[i], got), alone, rtol=1e-10, atol=1e-12
        )


def test_stacked_states_in_and_out_of_vmap():
    """``jax.vmap(train_step)(states, batch)``'s form: states made by one vmap, stepped by
    another; their ``None`` key and buffers are empty subtrees, not leaves vmap refuses."""
    members, batch = _data()
    tx = ft.adam(0.05)
    step = ft.make_train_step(_loss, tx, micro_batches=2)
    states = torch.func.vmap(lambda m: ft.TrainState.create(params=m, tx=tx, seed=None))(members)
    assert states.key is None and states.buffers is None
    assert states.params["w1"].shape == (MEMBERS, 4, 5)
    for _ in range(STEPS):
        states, metrics = torch.func.vmap(lambda s: step(s, batch))(states)
    assert int(states.step[0]) == STEPS and metrics["loss"].shape == (MEMBERS,)
    for i in range(MEMBERS):
        params, opt_state, _ = _run(
            {k: v[i].clone() for k, v in members.items()}, batch, dict(micro_batches=2), lambda: tx
        )
        ft.testing.assert_trees_all_close(
            ft.tree.map(lambda x, i=i: x[i], (states.params, states.opt_state)),
            (params, opt_state),
            rtol=1e-10,
            atol=1e-12,
        )
