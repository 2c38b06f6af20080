"""The eager step's shortcuts agree with the general code they stand in for.

The autograd loop checks its gradients for NaN/inf with one fused in-place kernel (multiplying
by 1), calls the autograd engine directly for plain scalar losses, and remembers optimizer
states without a learning rate; each is compared here with the path it replaces.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.train import faults, gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf"])
def test_fused_finite_check_matches_all_finite_and_keeps_every_bit(dtype, bad):
    gen = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(5, 3, generator=gen).to(dtype), "b": torch.zeros(0, dtype=dtype)}
    grads["c"] = torch.tensor([-0.0, 0.0, 1e-30, torch.finfo(dtype).max], dtype=dtype)
    if bad is not None:
        grads["a"][2, 1] = float(bad)
    before = {k: v.clone() for k, v in grads.items()}
    policy = faults.StepFaults("skip", None, None)
    policy.grads_writable = True
    for loss_value in (1.5, float("nan"), float("inf")):
        loss = torch.tensor(loss_value, dtype=dtype)
        got = policy._finite(grads, loss)
        assert got.shape == () and got.dtype == torch.bool
        expected = bool(ft.all_finite(grads) & torch.isfinite(loss))
        assert bool(got) == expected == (bad is None and loss_value == 1.5)
        # NaN payloads and -0.0 included:
        ft.testing.assert_trees_all_equal(grads, before, bitwise=True)
        ft.testing.assert_trees_all_equal(loss, torch.tensor(loss_value, dtype=dtype), bitwise=True)


def test_fused_finite_check_falls_back_for_mixed_dtypes():
    grads = [torch.ones(2), torch.tensor([float("nan")], dtype=torch.float64)]
    policy = faults.StepFaults("skip", None, None)
    policy.grads_writable = True
    assert not bool(policy._finite(grads, torch.tensor(1.0)))
    # A loss of another dtype than the gradients is checked on its own.
    grads = [torch.ones(2)]
    assert bool(policy._finite(grads, torch.tensor(1.0, dtype=torch.float64)))
    assert not bool(policy._finite(grads, torch.tensor(float("inf"), dtype=torch.float64)))


def _problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    model, params, _ = ft.functionalize(net)

    def loss_fn(p, batch):
        out = model(p, batch["x"]).squeeze(-1)
        # sqrt(z · w²) at z = 0: a finite loss with a NaN gradient.
        edge = torch.sqrt(batch["z"] * p["0.weight"].square().sum()).mean()
        return (out - batch["y"]).square().mean() + batch["c"].mean() + edge

    return params, loss_fn


def _batch(kind: str | None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    batch = {
        "x": torch.randn(8, 4, generator=gen),
        "y": torch.randn(8, generator=gen),
        "c": torch.zeros(8),
        "z": torch.ones(8),
    }
    if kind == "nan_input":
        batch["x"][3, 1] = float("nan")
    elif kind == "inf_loss":
        batch["c"][0] = float("inf")
    elif kind == "nan_grad":
        batch["z"] = torch.zeros(8)
    return batch


@pytest.mark.parametrize("kind", [None, "nan_input", "inf_loss", "nan_grad"])
def test_autograd_loop_skips_exactly_as_the_func_backend(kind, monkeypatch):
    calls = []
    real = faults.all_finite
    monkeypatch.setattr(faults, "all_finite", lambda g: calls.append(1) or real(g))
    results = {}
    for backend in ("autograd", "func"):
        params, loss_fn = _problem()
        tx = ft.adamw(1e-2, weight_decay=1e-2)
        step = ft.make_train_step(loss_fn, tx, micro_batches=2, grad_backend=backend)
        state = ft.TrainState.create(params=params, tx=tx, seed=None)
        state, _ = step(state, _batch(None))
        before = ft.tree.map(torch.clone, (state.params, state.opt_state))
        calls.clear()
        state, metrics = step(state, _batch(kind))
        # Both loops' gradients are their own (the autograd loop's .grad tensors, the func
        # loop's sum of two micro-batches): the fused check ran, not all_finite.
        assert not calls
        results[backend] = (int(metrics["skipped"]), state.params, before)
    assert results["autograd"][0] == results["func"][0] == (kind is not None)
    if kind is not None:
        for _, params, before in results.values():
            ft.testing.assert_trees_all_equal(params, before[0])


def test_direct_backward_keeps_autograd_errors():
    leaf = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        gradient._backward(torch.ones(()), (leaf,), True)
    for plain in (True, False):  # the engine directly, or torch.autograd.backward
        leaf.grad = None
        gradient._backward((leaf * 3).sum(), (leaf,), plain)
        assert torch.equal(leaf.grad, torch.full((2,), 3.0))


def test_learning_rate_metric_with_and_without_inject_hyperparams():
    params = {"w": torch.ones(3)}

    def loss_fn(p, b):
        return (p["w"] * b).sum()

    for tx, has_lr in ((ft.adam(0.1), False), (ft.inject_hyperparams(ft.adam)(0.1), True)):
        step = ft.make_train_step(loss_fn, tx)
        state = ft.TrainState.create(params=params, tx=tx)
        for _ in range(3):  # the remembered "no lr" answer must stay right on later steps
            state, metrics = step(state, torch.ones(2, 3))
            assert ("lr" in metrics) == has_lr


def test_a_single_func_micro_batch_is_not_written_in_place(monkeypatch):
    """One micro-batch of the func loop hands torch.func's own gradients on (they may be views
    or shared between leaves): the step checks them with all_finite and never writes them."""
    calls = []
    real = faults.all_finite
    monkeypatch.setattr(faults, "all_finite", lambda g: calls.append(1) or real(g))
    params, loss_fn = _problem()
    tx = ft.chain(ft.clip_by_global_norm(1e-3), ft.adamw(1e-2))
    step = ft.make_train_step(loss_fn, tx, micro_batches=1, grad_backend="func")
    state = ft.TrainState.create(params=params, tx=tx, seed=None)
    state, metrics = step(state, _batch(None))
    assert calls and int(metrics["skipped"]) == 0


@pytest.mark.parametrize(
    ("strategy", "backend", "micro_batches"),
    [("loop", "func", 3), ("vmap", "func", 3), ("vmap", "func", [2, 3, 3])],
)
def test_summed_gradients_are_clipped_in_place_as_the_pure_path_clips_them(
    strategy, backend, micro_batches
):
    """The func loop's and the vmap strategy's summed gradients are the step's own: the fused
    kernels clip (and check) them in place. The result equals the pure, copying path."""
    params, loss_fn = _problem()
    params = ft.tree.cast(params, torch.float64)
    batch = ft.tree.cast(_batch(None), torch.float64)
    tx = ft.chain(ft.clip_by_global_norm(1e-2), ft.adamw(1e-2, weight_decay=1e-2))
    common = dict(micro_batches=micro_batches, strategy=strategy, grad_backend=backend)
    fused_step = ft.make_train_step(loss_fn, tx, **common)
    pure_step = ft.make_train_step(loss_fn, tx, donate=False, fused=False, **common)
    given = ft.tree.map(torch.clone, batch)
    s_fused = ft.TrainState.create(params=params, tx=tx, seed=None)
    s_pure = ft.TrainState.create(params=params, tx=tx, seed=None)
    for _ in range(3):
        s_fused, m_fused = fused_step(s_fused, batch)
        s_pure, m_pure = pure_step(s_pure, batch)
    assert fused_step.apply_optimizer.last_engine == "kernel"
    ft.testing.assert_trees_all_close(s_fused.params, s_pure.params, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m_fused["grad_norm"], m_pure["grad_norm"], rtol=1e-13, atol=0)
    ft.testing.assert_trees_all_equal(batch, given)  # the inputs are never written
