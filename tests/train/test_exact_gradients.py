"""Both strategies give the full-batch gradient for any split (property test, float64)."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import functrain as ft


def _mlp(widths, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def _sgd_gradient(loss_fn, params, batch, **kw):
    """The gradient a step applies: with sgd(1) the update is -grad (no decay, no clipping)."""
    tx = ft.sgd(1.0)
    step = ft.make_train_step(loss_fn, tx, donate=False, **kw)
    state = ft.TrainState.create(params=params, tx=tx)
    new, metrics = step(state, batch)
    return ft.tree.sub(state.params, new.params), metrics


@st.composite
def _cases(draw):
    widths = draw(st.lists(st.integers(1, 5), min_size=2, max_size=4))
    n = draw(st.integers(1, 12))
    if draw(st.booleans()):
        k = draw(st.integers(1, n))
    else:  # explicit, arbitrary (uneven) sizes
        cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
        bounds = [0, *cuts, n]
        k = tuple(b - a for a, b in itertools.pairwise(bounds))
    strategy = draw(st.sampled_from(["loop", "vmap"]))
    chunk = draw(st.sampled_from([None, 1, 2, 3])) if strategy == "vmap" else None
    backend = draw(st.sampled_from(["func", "autograd"]))
    return widths, n, k, strategy, chunk, backend, draw(st.integers(0, 2**16))


@given(_cases())
def test_mean_loss_gives_the_full_batch_gradient(case):
    widths, n, k, strategy, chunk, backend, seed = case
    model, params, _ = ft.functionalize(_mlp(widths, seed))
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "x": torch.randn(n, widths[0], generator=gen, dtype=torch.float64),
        "y": torch.randn(n, widths[-1], generator=gen, dtype=torch.float64),
    }

    def loss_fn(p, b):
        return (model(p, b["x"]) - b["y"]).square().mean()

    full = torch.func.grad(loss_fn)(params, batch)
    grads, metrics = _sgd_gradient(
        loss_fn,
        params,
        batch,
        micro_batches=k,
        strategy=strategy,
        chunk_size=chunk,
        grad_backend=backend,
    )
    ft.testing.assert_trees_all_close(grads, full, rtol=1e-10, atol=1e-13)
    ft.testing.assert_trees_all_close(metrics["loss"], loss_fn(params, batch), rtol=1e-12)
    assert int(metrics["num_examples"]) == n


@given(_cases())
def test_loss_sum_gives_the_full_batch_weighted_gradient(case):
    widths, n, k, strategy, chunk, backend, seed = case
    model, params, _ = ft.functionalize(_mlp(widths, seed))
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "x": torch.randn(n, widths[0], generator=gen, dtype=torch.float64),
        "y": torch.randn(n, widths[-1], generator=gen, dtype=torch.float64),
        "w": torch.randint(0, 3, (n,), generator=gen).double(),  # per-example weight / count
    }
    batch["w"][0] = 1.0  # at least one unit overall

    def per_example(p, b):
        return (model(p, b["x"]) - b["y"]).square().sum(-1) * b["w"]

    def loss_fn(p, b):
        return ft.LossSum(per_example(p, b).sum(), b["w"].sum())

    def full_loss(p):
        return per_example(p, batch).sum() / batch["w"].sum()

    grads, metrics = _sgd_gradient(
        loss_fn,
        params,
        batch,
        micro_batches=k,
        strategy=strategy,
        chunk_size=chunk,
        grad_backend=backend,
    )
    ft.testing.assert_trees_all_close(
        grads, torch.func.grad(full_loss)(params), rtol=1e-10, atol=1e-13
    )
    ft.testing.assert_trees_all_close(metrics["loss"], full_loss(params), rtol=1e-12)
    ft.testing.assert_trees_all_close(metrics["num_tokens"], batch["w"].sum())


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_uneven_ten_by_four(strategy):
    model, params, _ = ft.functionalize(_mlp([3, 4, 2], 0))
    x = torch.randn(10, 3, dtype=torch.float64)

    def loss_fn(p, b):
        return model(p, b).sin().mean()

    full = torch.func.grad(loss_fn)(params, x)
    grads, _ = _sgd_gradient(loss_fn, params, x, micro_batches=4, strategy=strategy)
    ft.testing.assert_trees_all_close(grads, full, rtol=1e-12, atol=1e-15)
    # The classic loss/K accumulation is not the full-batch gradient for sizes 3, 3, 2, 2.
    naive = ft.tree.scale(
        0.25, ft.tree.add(*[torch.func.grad(loss_fn)(params, c) for c in torch.tensor_split(x, 4)])
    )
    assert not ft.tree.allclose(naive, full, rtol=1e-6)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("backend", ["func", "autograd"])
@pytest.mark.parametrize("as_sum", [False, True])
def test_gradients_that_alias_or_are_expanded_are_not_corrupted(strategy, backend, as_sum):
    # d/da and d/db of (a + b).sum() can be one shared, expanded tensor of ones.
    params = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}

    def loss_fn(p, x):
        total = (p["a"] + p["b"]).sum() * x.shape[0] + x.sum() * 0
        return ft.LossSum(total, x.shape[0]) if as_sum else total / x.shape[0]

    x = torch.ones(7, dtype=torch.float64)
    for k in (1, 3):
        grads, _ = _sgd_gradient(
            loss_fn,
            params,
            x,
            micro_batches=k,
            strategy=strategy,
            grad_backend=backend if strategy == "loop" else "func",
        )
        ft.testing.assert_trees_all_close(grads, ft.tree.ones_like(params), rtol=1e-14)
