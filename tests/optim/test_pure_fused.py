"""The fused pure path of AdamW chains (``functrain.optim._pure_fused``).

References: the same chain run member by member (each transform's own ops, the optax
arithmetic) and ``torch.optim.AdamW``. The fused path must equal them to rounding, leave every
input untouched, and return tensors that share no memory with its inputs.
"""

import pytest
import torch

import functrain as ft
from functrain.optim import _pure_fused, fused
from tests.optim.test_fused import KERNEL_CASES, _clone, _grads, _layouts, _params

FUSED = ["adam", "adamw", "adamw_mask_tree", "adamw_mask_fn", "adamw_schedule"]
FUSED += ["adamw_tensor_lr", "adamw_decay_schedule", "clip_adamw", "inject_adamw", "clip_inject"]
FUSED += ["coupled_adam", "named", "tensor_b1"]  # an inner adam(lr) chain is recognised
NOT_FUSED = ["sgd", "momentum", "nesterov", "sgd_coupled_clip", "inject_sgd"]


def _run(tx, params, grads, enabled):
    before, _pure_fused.ENABLED = _pure_fused.ENABLED, enabled
    try:
        state, out = tx.init(params), []
        for g in grads:
            u, state = tx.update(g, state, params)
            params = ft.apply_updates(params, u)
            out.append(u)
        return params, state, out
    finally:
        _pure_fused.ENABLED = before


def _spy(monkeypatch):
    calls = []
    real = _pure_fused._updates

    def spy(ops, ctx):
        got = real(ops, ctx)
        calls.append(got is not None)
        return got

    monkeypatch.setattr(_pure_fused, "_updates", spy)
    return calls


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_member_by_member_to_rounding(name, dtype, monkeypatch):
    calls = _spy(monkeypatch)
    params, grads = _params(dtype), _grads(dtype, steps=6)
    got = _run(KERNEL_CASES[name](), params, grads, True)
    assert any(calls), "the fused pure path was not taken"
    calls.clear()
    ref = _run(KERNEL_CASES[name](), params, grads, False)
    assert not any(calls)
    rtol, atol = (1e-12, 1e-15) if dtype == torch.float64 else (2e-5, 1e-7)
    ft.testing.assert_trees_all_close(got, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", NOT_FUSED)
def test_other_chains_run_their_members(name, monkeypatch):
    calls = _spy(monkeypatch)
    _run(KERNEL_CASES[name](), _params(torch.float32), _grads(torch.float32, 2), True)
    assert not any(calls)


@pytest.mark.parametrize("name", ["adamw", "clip_adamw", "adamw_mask_tree"])
def test_inputs_untouched_and_outputs_fresh(name, monkeypatch):
    calls = _spy(monkeypatch)
    tx = KERNEL_CASES[name]()
    params, grads = _params(torch.float32), _grads(torch.float32, 2)
    state = tx.init(params)
    _, state = tx.update(grads[0], state, params)
    inputs = (grads[1], state, params)
    copies = _clone(inputs)
    u, new_state = tx.update(*inputs)
    assert all(calls)
    ft.testing.assert_trees_all_equal(inputs, copies)
    seen = {x.untyped_storage().data_ptr() for x in ft.tree.leaves(inputs) if x.numel()}
    for x in ft.tree.leaves((u, new_state)):
        if x.numel() > 1:
            assert x.untyped_storage().data_ptr() not in seen


def test_follows_torch_adamw_in_float64():
    params, grads = _params(torch.float64), _grads(torch.float64, 8)
    tx = ft.adamw(1e-2, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1)
    got, _, _ = _run(tx, params, grads, True)
    mine = [torch.nn.Parameter(p.clone()) for p in ft.tree.leaves(params)]
    opt = torch.optim.AdamW(mine, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for g in grads:
        for p, gi in zip(mine, ft.tree.leaves(g)):
            p.grad = gi.clone()
        opt.step()
    for a, b in zip(ft.tree.leaves(got), mine):
        torch.testing.assert_close(a, b.detach(), rtol=1e-13, atol=1e-14)


def test_mismatched_gradient_shapes_still_name_the_leaf():
    tx = ft.adamw(1e-2)
    params = _params(torch.float32)
    bad = dict(_grads(torch.float32, 1)[0], b=torch.zeros(5))
    with pytest.raises(ft.tree.TreeMismatchError, match=r"\['b'\]"):
        tx.update(bad, tx.init(params), params)


def test_differentiable_updates_run_the_members(monkeypatch):
    calls = _spy(monkeypatch)
    tx = ft.adamw(1e-2, weight_decay=0.1)
    params = {"w": torch.ones(3, requires_grad=True)}
    grads = {"w": torch.tensor([1.0, -2.0, 0.5])}
    u, _ = tx.update(grads, tx.init(params), params)
    u["w"].sum().backward()  # the decay term reaches the parameters
    assert not calls
    torch.testing.assert_close(params["w"].grad, torch.full((3,), -1e-3))


def _transposed(dtype):
    gen = torch.Generator().manual_seed(3)
    params = {
        "w": torch.randn(6, 5, generator=gen, dtype=dtype).t(),
        "b": torch.ones(3, dtype=dtype),
    }
    grads = [
        {"w": torch.randn(5, 6, generator=gen, dtype=dtype), "b": torch.ones(3, dtype=dtype)}
        for _ in range(3)
    ]
    return params, grads


def test_transposed_params_with_contiguous_grads():
    params, grads = _transposed(torch.float64)
    tx = ft.adamw(0.1, weight_decay=0.3)
    got, ref = _run(tx, params, grads, True), _run(tx, params, grads, False)
    ft.testing.assert_trees_all_close(got, ref, rtol=1e-12, atol=1e-15)


def test_in_place_engines_pair_transposed_params_with_their_grads():
    # Regression: the CPU kernels index all of a leaf's tensors alike; a transposed parameter
    # with a contiguous gradient must not reach them (it paired the wrong elements).
    params, grads = _transposed(torch.float64)
    tx = ft.adamw(0.1, weight_decay=0.3)
    ref, _, _ = _run(tx, params, grads, False)
    mine, state = _clone(params), tx.init(params)
    mine["w"] = params["w"].t().clone().t()  # same transposed layout, own memory
    for g in grads:
        state = fused.update_in_place(tx, g, state, mine).opt_state
    ft.testing.assert_trees_all_close(mine, ref, rtol=1e-12, atol=1e-15)


def test_each_call_is_planned_for_its_own_leaves(monkeypatch):
    # One optimizer object across dtypes, strides and structures: each call takes the path
    # its own leaves allow (a float64 leaf among float32 ones or a transposed parameter with
    # contiguous gradients cannot be fused) and gives the member-by-member numbers.
    calls = _spy(monkeypatch)
    tx = ft.adamw(1e-2, weight_decay=0.1, mask=lambda p: ft.tree.map(lambda x: x.ndim > 1, p))
    for name, params, grads, engines in _layouts():
        calls.clear()
        got = _run(tx, params, [grads], True)
        assert calls == [engines == {"kernel"}], name
        ref = _run(tx, params, [grads], False)
        exact = engines == {"foreach"}  # not fused: the members themselves ran
        tol = {"rtol": 1e-12, "atol": 1e-15} if exact else {"rtol": 2e-5, "atol": 1e-7}
        ft.testing.assert_trees_all_close(got, ref, **tol)


def test_clipped_adamw_with_mixed_dtype_scalar_params():
    """Found by tests/test_fuzz.py: the clip factor of float32 and float64 0-d gradients is
    float64, and ``0-d float32 × 0-d float64`` is float64, which the fused kernel refused."""
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(0.01, weight_decay=1e-4))
    params = {"a": torch.tensor(0.5), "b": torch.tensor(-0.25, dtype=torch.float64)}
    grads = {"a": torch.tensor(-0.9676), "b": torch.tensor(2.0, dtype=torch.float64)}
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    assert {k: v.dtype for k, v in updates.items()} == {"a": torch.float32, "b": torch.float64}
    _pure_fused.ENABLED = False
    try:
        reference, _ = tx.update(grads, state, params)
    finally:
        _pure_fused.ENABLED = True
    for k in params:
        torch.testing.assert_close(updates[k], reference[k].to(updates[k].dtype), rtol=1e-6, atol=0)
