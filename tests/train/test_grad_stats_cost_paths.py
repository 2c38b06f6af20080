"""The cheaper paths of ``grad_stats`` hooks: a mean loss differentiated unweighted (and weighted
in the sum) when a hook needs the unweighted micro-batch gradients, the cosine accumulator
updated in place inside the step, and one foreach call for the hook's squared norms. Each must
give what the plain path gives: the same update as a step without a hook, and hook inputs equal
to the micro-batch gradients computed by hand."""

from __future__ import annotations

import pytest
import torch
from micro_batch_reference import micro_batch_grads

import functrain as ft
from functrain.grads import cosine
from functrain.grads._noise_estimates import _sq_norm_vmappable


def _problem(dtype):
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 3, generator=gen, dtype=dtype), "b": torch.zeros(3, dtype=dtype)}
    x = torch.randn(11, 5, generator=gen, dtype=dtype)  # K=4: sizes 3, 3, 3, 2
    y = torch.randn(11, 3, generator=gen, dtype=dtype)

    def loss_fn(p, batch):
        return ((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2).mean()

    return loss_fn, params, {"x": x, "y": y}


def _recording_hook(seen):
    def per_micro_batch(grads, size):
        seen.append((ft.tree.map(torch.clone, grads), size.clone()))
        return {"sq": ft.tree.norm(grads, squared=True)}

    return ft.GradStatsHook(
        init=lambda params: None,
        per_micro_batch=per_micro_batch,
        update=lambda stats, grads, state: ({}, state),
    )


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_hook_leaves_the_update_as_without_it(backend, dtype):
    loss_fn, params, batch = _problem(dtype)
    tx = ft.adam(0.1)
    seen: list = []
    common = dict(micro_batches=4, grad_backend=backend, norm_metrics=False)
    plain = ft.make_train_step(loss_fn, tx, **common)
    hooked = ft.make_train_step(loss_fn, tx, grad_stats=_recording_hook(seen), **common)
    s_plain = ft.TrainState.create(params=params, tx=tx)
    s_hooked = ft.TrainState.create(params=params, tx=tx)
    for _ in range(3):
        s_plain, m_plain = plain(s_plain, batch)
        s_hooked, m_hooked = hooked(s_hooked, batch)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 0, "atol": 0}
    for a, b in zip(ft.tree.leaves(s_plain.params), ft.tree.leaves(s_hooked.params)):
        torch.testing.assert_close(a, b, **tol)  # half precision keeps the weighted path
    torch.testing.assert_close(m_plain["loss"], m_hooked["loss"], **tol)
    assert len(seen) == 12 and [int(b) for _, b in seen[:4]] == [3, 3, 3, 2]


def test_hook_inputs_equal_micro_batch_gradients_by_hand():
    loss_fn, params, batch = _problem(torch.float64)
    seen: list = []
    tx = ft.sgd(0.0)  # the parameters stay put: the hook's inputs are gradients at `params`
    step = ft.make_train_step(loss_fn, tx, micro_batches=4, grad_stats=_recording_hook(seen))
    step(ft.TrainState.create(params=params, tx=tx), batch)
    sizes = [int(size) for _, size in seen]
    assert sizes == [3, 3, 3, 2]
    for (grads, _), expected in zip(seen, micro_batch_grads(loss_fn, params, batch, sizes)):
        for got, want in zip(ft.tree.leaves(grads), expected):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_in_place_cosine_accumulation_equals_the_pure_one_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(1)
    shapes = [(4, 3), (7,), (2, 2, 2)]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(3)]
    grads.append([torch.zeros(s, dtype=dtype) for s in shapes])  # a zero gradient adds nothing
    pure = cosine.cosine_accumulator_init(grads[0])
    mine = cosine.cosine_accumulator_init(grads[0])
    for g in grads:
        before = [t.clone() for t in g]
        pure = cosine.cosine_accumulator_add(pure, g)
        mine = cosine._add_in_place(mine, g)
        assert all(torch.equal(a, b) for a, b in zip(g, before))  # the gradient is untouched
    assert all(torch.equal(a, b) for a, b in zip(pure.unit_sum, mine.unit_sum))
    assert torch.equal(pure.unit_sq_sum, mine.unit_sq_sum) and pure.count == mine.count == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_squared_norm_fast_path_equals_per_leaf_norms_in_float64(dtype):
    gen = torch.Generator().manual_seed(2)
    leaves = [torch.randn(s, generator=gen).to(dtype) for s in [(30, 7), (5,), (2, 3, 4), ()]]
    expected = sum(float(t.double().square().sum()) for t in leaves)
    got = _sq_norm_vmappable(leaves)
    assert got.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    assert abs(float(got) - expected) <= 1e-5 * expected
    # Under vmap (no foreach batching rule) the per-leaf route gives the same numbers.
    stacked = [torch.stack([t, 2 * t]) for t in leaves]
    batched = torch.func.vmap(lambda *xs: _sq_norm_vmappable(list(xs)))(*stacked)
    torch.testing.assert_close(batched[0], got)
    torch.testing.assert_close(batched[1], 4 * got)
