"""Review of the step-owned summed gradients (``GradResult.owned``).

The func loop (after two micro-batches) and the vmap strategy hand the step gradients it alone
holds, so the non-finite check and the fused kernels write into them. Checked here against
by-hand float64 references: the update, the skip of a non-finite step (bit for bit), and that
the batch, the previous state and a hook's inputs are never written.
"""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain.train import microbatch

LR = 0.1
MAX_NORM = 0.05


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "b": torch.randn(4, generator=gen, dtype=torch.float64),
        "unused": torch.randn(2, generator=gen, dtype=torch.float64),
        "empty": torch.zeros(0, 2, dtype=torch.float64),
    }


def _batch(n: int, bad: float | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    batch = {
        "x": torch.randn(n, 3, generator=gen, dtype=torch.float64),
        "y": torch.randn(n, 4, generator=gen, dtype=torch.float64),
        "t": (torch.rand(n, generator=gen) > 0.3).to(torch.float64),
    }
    if bad is not None:
        batch["x"][n - 1, 0] = bad
    return batch


def _per_example(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    out = b["x"] @ p["w"] + p["b"] + p["empty"].sum()
    return (out - b["y"]).square().sum(-1)


def _mean_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return _per_example(p, b).mean()


def _sum_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> ft.LossSum:
    return ft.LossSum((_per_example(p, b) * b["t"]).sum(), b["t"].sum())


def _reference_grads(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], kind: str):
    """The full-batch gradient by plain autograd (no micro-batches)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    per = _per_example(leaves, batch)
    loss = per.mean() if kind == "mean" else (per * batch["t"]).sum() / batch["t"].sum()
    got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), got)}


def _clipped_sgd(params, grads):
    norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
    factor = torch.clamp(MAX_NORM / norm, max=1.0)
    return {k: params[k] - LR * factor * grads[k] for k in params}


def _hook(seen: list[torch.Tensor]) -> ft.GradStatsHook:
    """A hook that records clones of what it sees and accumulates the micro-batch gradients."""

    def per_micro_batch(g, size):
        seen.append(g["w"].clone())
        return {"sq": ft.tree.norm(g, squared=True)}

    return ft.GradStatsHook(
        init=lambda params: torch.zeros((), dtype=torch.float64),
        per_micro_batch=per_micro_batch,
        update=lambda stats, grads, s: ({"n_sq": ft.tree.norm(grads, squared=True)}, s + 1),
        accumulator_init=lambda params: ft.tree.map(torch.zeros_like, params),
        accumulate=lambda acc, g, size: ft.tree.map(lambda a, x: a + x, acc, g),
    )


CASES = [
    ("loop", "func", 2, None),
    ("loop", "func", [2, 3, 3], None),
    ("loop", "autograd", 3, None),
    ("vmap", "func", 1, None),
    ("vmap", "func", [2, 3, 3], None),
    ("vmap", "func", 4, 3),
]


@pytest.mark.parametrize(("strategy", "backend", "micro_batches", "chunk_size"), CASES)
@pytest.mark.parametrize("kind", ["mean", "sum"])
@pytest.mark.parametrize("hooked", [False, True])
def test_in_place_clip_matches_a_by_hand_clipped_full_batch_step(
    strategy, backend, micro_batches, chunk_size, kind, hooked
):
    """Clipped (tensor max_norm) in place = the full-batch gradient clipped by hand (float64)."""
    n = sum(micro_batches) if isinstance(micro_batches, list) else 8
    batch, params = _batch(n), _params()
    given = ft.tree.map(torch.clone, batch)
    seen: list[torch.Tensor] = []
    tx = ft.chain(ft.clip_by_global_norm(torch.tensor(MAX_NORM, dtype=torch.float64)), ft.sgd(LR))
    step = ft.make_train_step(
        _mean_loss if kind == "mean" else _sum_loss,
        tx,
        micro_batches=micro_batches,
        strategy=strategy,
        grad_backend=backend,
        chunk_size=chunk_size,
        grad_stats=_hook(seen) if hooked else None,
    )
    state = ft.TrainState.create(params=params, tx=tx, seed=None)
    new, metrics = step(state, batch)
    grads = _reference_grads(params, batch, kind)
    expected = _clipped_sgd(params, grads)
    ft.testing.assert_trees_all_close(new.params, expected, rtol=1e-12, atol=1e-15)
    norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
    torch.testing.assert_close(metrics["grad_norm"], norm, rtol=1e-12, atol=0)
    if hooked:  # the hook saw the gradient before anything was clipped
        torch.testing.assert_close(metrics["n_sq"], norm.square(), rtol=1e-12, atol=0)
        assert seen
    ft.testing.assert_trees_all_equal(batch, given, bitwise=True)


@pytest.mark.parametrize(("strategy", "backend", "micro_batches", "chunk_size"), CASES)
@pytest.mark.parametrize("loss_scale", [False, True])
def test_a_non_finite_micro_batch_skips_bit_for_bit(
    strategy, backend, micro_batches, chunk_size, loss_scale
):
    n = sum(micro_batches) if isinstance(micro_batches, list) else 8
    tx = ft.chain(ft.clip_by_global_norm(MAX_NORM), ft.adamw(1e-2, weight_decay=1e-2))
    step = ft.make_train_step(
        _mean_loss,
        tx,
        micro_batches=micro_batches,
        strategy=strategy,
        grad_backend=backend,
        chunk_size=chunk_size,
        loss_scale=ft.DynamicLossScale() if loss_scale else None,
    )
    state = ft.TrainState.create(params=_params(), tx=tx, seed=None)
    state, _ = step(state, _batch(n))  # a finite step first: the Adam moments are non-zero
    before = ft.tree.map(torch.clone, (state.params, state.opt_state))
    state, metrics = step(state, _batch(n, bad=float("nan")))
    assert int(metrics["skipped"]) == 1
    ft.testing.assert_trees_all_equal((state.params, state.opt_state), before, bitwise=True)


@pytest.mark.parametrize(
    ("strategy", "micro_batches", "kind", "owned"),
    [
        ("loop", 1, "mean", False),  # torch.func's own gradients: maybe views or shared
        ("loop", 1, "sum", True),  # divided by the count into new tensors
        ("loop", 2, "mean", True),
        ("vmap", 1, "mean", True),  # a chunk's sums are new
        ("vmap", [2, 3, 3], "sum", True),
    ],
)
def test_owned_says_whether_the_gradients_are_new_tensors(strategy, micro_batches, kind, owned):
    n = sum(micro_batches) if isinstance(micro_batches, list) else 8
    step = ft.make_train_step(
        _mean_loss if kind == "mean" else _sum_loss,
        ft.sgd(LR),
        micro_batches=micro_batches,
        strategy=strategy,
        grad_backend="func",
    )
    params, batch = _params(), _batch(n)
    split = microbatch.split_batch(batch, micro_batches)
    result = step.grad_stage(params, batch, split, None, None, [])
    assert result.owned is owned
    leaves = ft.tree.leaves(result.grads)
    ptrs = [g.data_ptr() for g in leaves if g.numel()]
    assert len(set(ptrs)) == len(ptrs)  # no two leaves share memory
    held = [*ft.tree.leaves(params), *ft.tree.leaves(batch)]
    if owned:  # nothing the caller holds is among them
        assert not any(
            g.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
            for g in leaves
            if g.numel()
            for h in held
        )
    ft.testing.assert_trees_all_close(
        result.grads, _reference_grads(params, batch, kind), rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("weights", [[1.0], [0.25], [1.0, 1.0], [0.3, 0.7], [0.5, 0.25, 0.25]])
def test_grad_sum_weights_and_ownership(fresh, weights):
    """``_GradSum``: Σ wᵢ·gᵢ in float64, and ``owned`` exactly when the result is made of
    tensors it allocated or was given as fresh; lists not given as fresh are never written."""
    from functrain.train.combine import _GradSum

    gen = torch.Generator().manual_seed(0)
    lists = [[torch.randn(3, 2, generator=gen, dtype=torch.float64)] for _ in weights]
    given = [[t.clone() for t in leaves] for leaves in lists]
    acc = _GradSum()
    for leaves, w in zip(lists, weights):
        acc.add(leaves, w, fresh=fresh)
    (got,) = acc.result(None)
    expected = sum(w * leaves[0] for w, leaves in zip(weights, given))
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=1e-15)
    assert acc.owned == (fresh or len(weights) > 1 or weights[0] != 1.0)
    if not fresh:
        assert all(torch.equal(a[0], b[0]) for a, b in zip(lists, given))
        if acc.owned:
            assert all(got.data_ptr() != leaves[0].data_ptr() for leaves in lists)
