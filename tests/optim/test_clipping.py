"""Clipping transforms against closed forms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import testing


def _tree(seed: int = 0, scale: float = 1.0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc": torch.randn(5, 3, generator=gen) * scale,
        "conv": torch.randn(4, 2, 3, 3, generator=gen) * scale,
        "bias": torch.randn(5, generator=gen) * scale,
    }


def test_clip_elementwise() -> None:
    g = _tree(scale=3.0)
    u, _ = ft.clip(1.5).update(g, ft.EmptyState())
    testing.assert_trees_all_equal(u, ft.tree.map(lambda x: x.clamp(-1.5, 1.5), g))
    u, _ = ft.clip(torch.tensor(1.5)).update(g, ft.EmptyState())
    testing.assert_trees_all_equal(u, ft.tree.map(lambda x: x.clamp(-1.5, 1.5), g))


def test_clip_by_global_norm() -> None:
    g = _tree()
    norm = float(ft.tree.norm(g))
    below, _ = ft.clip_by_global_norm(norm * 1.01).update(g, ft.EmptyState())
    testing.assert_trees_all_equal(below, g)  # bit-for-bit unchanged
    above, _ = ft.clip_by_global_norm(1.0).update(g, ft.EmptyState())
    testing.assert_trees_all_close(above, ft.tree.scale(1.0 / norm, g), rtol=1e-6)
    assert float(ft.tree.norm(above)) == pytest.approx(1.0, rel=1e-6)
    # Agrees with torch.nn.utils.clip_grad_norm_ up to its 1e-6 epsilon.
    leaves = [torch.nn.Parameter(torch.zeros_like(x)) for x in g.values()]
    for p, x in zip(leaves, g.values()):
        p.grad = x.clone()
    torch.nn.utils.clip_grad_norm_(leaves, 1.0)
    testing.assert_trees_all_close(
        list(above.values()), [p.grad for p in leaves], rtol=1e-5, atol=1e-7
    )


def test_clip_by_global_norm_keeps_each_leaf_dtype() -> None:
    """The norm of a mixed float32/float64 tree is float64; a 0-d float32 leaf times it would be
    promoted to float64 by PyTorch's rules. Like optax, each leaf keeps its dtype."""
    g = {"a": torch.tensor(3.0), "b": torch.tensor([4.0], dtype=torch.float64), "c": torch.ones(2)}
    clipped, _ = ft.clip_by_global_norm(1.0).update(g, ft.EmptyState())
    assert {k: v.dtype for k, v in clipped.items()} == {k: v.dtype for k, v in g.items()}
    norm = (9.0 + 16.0 + 2.0) ** 0.5
    for k in g:
        torch.testing.assert_close(clipped[k], (g[k].double() / norm).to(g[k].dtype))


def test_clip_by_block_rms() -> None:
    g = _tree(scale=2.0)
    u, _ = ft.clip_by_block_rms(0.5).update(g, ft.EmptyState())
    for k, x in g.items():
        rms = x.square().mean().sqrt()
        testing.assert_trees_all_close(u[k], x / torch.clamp(rms / 0.5, min=1.0), rtol=1e-6)
        assert float(u[k].square().mean().sqrt()) <= 0.5 * (1 + 1e-6)
    small, _ = ft.clip_by_block_rms(100.0).update(g, ft.EmptyState())
    testing.assert_trees_all_equal(small, g)


def test_clip_by_block_rms_names_a_non_float_leaf() -> None:
    with pytest.raises(TypeError, match=r"updates\['b'\] must be a floating-point tensor"):
        ft.clip_by_block_rms(0.5).update(
            {"a": torch.ones(2), "b": torch.ones(2, dtype=torch.int64)}, ft.EmptyState()
        )


def test_unitwise_norm_uses_torch_layouts() -> None:
    x = torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.0, 1.0]])  # Linear weight (out=3, in=2)
    testing.assert_trees_all_close(
        ft.unitwise_norm(x), torch.tensor([[5.0, 5.0], [10.0, 10.0], [1.0, 1.0]])
    )
    conv = torch.randn(4, 2, 3, 3)
    expected = conv.flatten(1).norm(dim=1).reshape(4, 1, 1, 1).expand_as(conv)
    testing.assert_trees_all_close(ft.unitwise_norm(conv), expected, rtol=1e-6)
    v = torch.tensor([3.0, 4.0])
    testing.assert_trees_all_close(ft.unitwise_norm(v), torch.tensor([5.0, 5.0]))
    row = torch.tensor([[3.0, 4.0]])  # squeezes to a vector: one unit
    testing.assert_trees_all_close(ft.unitwise_norm(row), torch.tensor([[5.0, 5.0]]))
    testing.assert_trees_all_close(
        ft.unitwise_norm(x, axis=0), x.norm(dim=0, keepdim=True).expand_as(x), rtol=1e-6
    )


def test_adaptive_grad_clip_matches_closed_form() -> None:
    g, p = _tree(0, scale=2.0), _tree(1)
    p["bias"] = torch.zeros(5)  # zero parameters: the eps floor applies
    clipping, eps = 0.3, 1e-3
    u, _ = ft.adaptive_grad_clip(clipping, eps).update(g, ft.EmptyState(), p)
    for k in g:
        gn, pn = ft.unitwise_norm(g[k]), ft.unitwise_norm(p[k])
        limit = clipping * torch.clamp(pn, min=eps)
        expected = torch.where(gn < limit, g[k], g[k] * limit / gn)
        testing.assert_trees_all_close(u[k], expected, rtol=1e-6)
        assert bool((ft.unitwise_norm(u[k]) <= limit * (1 + 1e-5)).all())
    loose, _ = ft.adaptive_grad_clip(1e6).update(g, ft.EmptyState(), p)
    testing.assert_trees_all_equal(loose, g)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        ft.clip_by_global_norm(-1.0)
    with pytest.raises(ValueError, match="threshold"):
        ft.clip_by_block_rms(float("nan"))
    with pytest.raises(ValueError, match="params"):
        ft.adaptive_grad_clip(0.1).update(_tree(), ft.EmptyState())
    g = _tree()
    bad = dict(g, bias=torch.zeros(6))
    with pytest.raises(ft.tree.TreeMismatchError, match=r"\['bias'\]"):
        ft.adaptive_grad_clip(0.1).update(g, ft.EmptyState(), bad)


def test_none_updates_pass_through() -> None:
    g = {"a": torch.ones(3), "b": None}
    for tx in (ft.clip(0.5), ft.clip_by_global_norm(0.5), ft.clip_by_block_rms(0.5)):
        u, _ = tx.update(g, tx.init(g))
        assert u["b"] is None and u["a"].shape == (3,)


@given(
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4),
    scale=st.floats(1e-3, 1e3),
    max_norm=st.floats(1e-2, 10.0),
    seed=st.integers(0, 2**16),
)
def test_global_and_block_clipping_properties(shapes, scale, max_norm, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in shapes]
    u, _ = ft.clip_by_global_norm(max_norm).update(g, ft.EmptyState())
    norm, new_norm = float(ft.tree.norm(g)), float(ft.tree.norm(u))
    assert new_norm <= max_norm * (1 + 1e-12) or new_norm == pytest.approx(norm, rel=1e-12)
    for x, y in zip(g, u):  # clipping only rescales
        assert torch.allclose(y, x * (min(1.0, max_norm / norm) if norm > 0 else 1.0), rtol=1e-12)
    u, _ = ft.clip_by_block_rms(max_norm).update(g, ft.EmptyState())
    for y in u:
        assert float(y.square().mean().sqrt()) <= max_norm * (1 + 1e-12)
