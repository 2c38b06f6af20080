"""ft.flatten (optax's): the inner transform runs on one concatenated vector."""

from __future__ import annotations

from typing import Any

import torch

import functrain as ft
from functrain import testing

F64 = torch.float64


def _tree(seed: int, dtype: torch.dtype = F64) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=gen, dtype=F64).to(dtype),
        "b": torch.randn(4, generator=gen, dtype=F64).to(dtype),
        "s": torch.randn((), generator=gen, dtype=F64).to(dtype),
    }


def _run(tx: ft.GradientTransformation, steps: int = 5) -> Any:
    p = _tree(0)
    s = tx.init(p)
    for i in range(steps):
        u, s = tx.update(_tree(i + 1), s, p)
        p = ft.apply_updates(p, u)
    return p


def test_elementwise_inner_gives_the_same_numbers() -> None:
    testing.assert_trees_all_close(_run(ft.flatten(ft.adamw(0.1))), _run(ft.adamw(0.1)), rtol=1e-15)


def test_global_clip_is_unchanged_by_the_layout() -> None:
    inner = ft.chain(ft.clip_by_global_norm(0.5), ft.sgd(0.1, momentum=0.9))
    testing.assert_trees_all_close(_run(ft.flatten(inner)), _run(inner), rtol=1e-15)


def test_per_tensor_statistics_become_global() -> None:
    """LAMB's trust ratio is taken over the whole vector: one ratio for the model."""
    p, g = _tree(0), _tree(1)
    u, _ = ft.flatten(ft.lamb(0.1, weight_decay=0.0)).update(g, ft.flatten(ft.lamb(0.1)).init(p), p)
    flat_p = torch.cat([p[k].reshape(-1) for k in ("b", "s", "w")])
    flat_g = torch.cat([g[k].reshape(-1) for k in ("b", "s", "w")])
    adam_dir = flat_g / (flat_g.abs() + 1e-6)  # first Adam step: m̂ = g, v̂ = g²
    ratio = flat_p.norm() / adam_dir.norm()
    expected = -0.1 * ratio * adam_dir
    got = torch.cat([u[k].reshape(-1) for k in ("b", "s", "w")])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_updates_keep_each_leafs_dtype_and_none_leaves_are_skipped() -> None:
    tx = ft.flatten(ft.sgd(0.5))
    p = {"a": torch.ones(2, dtype=torch.float32), "b": torch.ones(3, dtype=F64), "c": None}
    g = {"a": torch.ones(2, dtype=torch.float32), "b": torch.full((3,), 2.0, dtype=F64), "c": None}
    u, _ = tx.update(g, tx.init(p), p)
    assert u["a"].dtype == torch.float32 and u["b"].dtype == F64 and u["c"] is None
    torch.testing.assert_close(u["b"], torch.full((3,), -1.0, dtype=F64))


def test_empty_tree_and_purity() -> None:
    tx = ft.flatten(ft.adam(0.1))
    u, _ = tx.update({}, tx.init({}), {})
    assert u == {}
    p, g = _tree(0), _tree(1)
    state = tx.init(p)
    before = ft.tree.map(torch.clone, (p, g, state))
    tx.update(g, state, p)
    testing.assert_trees_all_equal((p, g, state), before, bitwise=True)


def test_compiles_once_and_trains_in_a_step() -> None:
    tx = ft.flatten(ft.adam(ft.linear_schedule(0.1, 0.01, 5)))
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    p = _tree(0, torch.float32)
    s = tx.init(p)
    with testing.assert_max_compiles(1):
        for i in range(4):
            _, s = compiled(_tree(i + 1, torch.float32), s, p)
    x = torch.randn(32, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)

    def loss_fn(params: Any, b: Any) -> torch.Tensor:
        return ((b[0] @ params["w"] + params["b"] - b[1]) ** 2).mean()

    tx = ft.flatten(ft.adam(0.1))
    params = {"w": torch.zeros(4, dtype=F64), "b": torch.zeros((), dtype=F64)}
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = ft.TrainState.create(params=params, tx=tx)
    first = None
    for _ in range(20):
        state, metrics = step(state, (x, y))
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.2 * first
