"""An empty batch through the ``vmap`` route of a model whose batching rules fail on an empty
vmap dimension (a convolution before a cross-entropy): every function returns its empty value,
in the dtypes and shapes a non-empty batch gives, and draws no random number."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import functrain as ft


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(3, generator=gen, dtype=torch.float64),
    }


def _loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    out = F.dropout(F.conv2d(b["x"], p["w"], p["b"]), 0.5).mean((-1, -2))
    return F.cross_entropy(out, b["y"])


def _batch(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64),
        "y": torch.randint(0, 3, (n,), generator=gen),
    }


FUNCTIONS = {
    "per_sample_grads": lambda b, m: ft.per_sample_grads(
        _loss, _params(), b, method=m, randomness="different"
    ),
    "per_sample_value_and_grads": lambda b, m: ft.per_sample_value_and_grads(
        _loss, _params(), b, method=m, randomness="different"
    ),
    "per_sample_grad_norms": lambda b, m: ft.per_sample_grad_norms(
        _loss, _params(), b, method=m, randomness="different"
    ),
    "clipped_grad_sum": lambda b, m: ft.clipped_grad_sum(
        _loss, _params(), b, 1.0, method=m, randomness="different"
    ),
    "per_sample_gram": lambda b, m: ft.per_sample_gram(
        _loss, _params(), b, method=m, randomness="different"
    ),
}


def _shapes(out):
    return [(tuple(x.shape), x.dtype) for x in ft.tree.leaves(out) if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("method", ["vmap", "auto"])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_empty_batch_gives_the_empty_value(name, method):
    fn = FUNCTIONS[name]
    torch.manual_seed(0)
    full = fn(_batch(4), method)
    before = torch.get_rng_state()
    empty = fn(_batch(0), method)
    assert torch.equal(torch.get_rng_state(), before)  # an empty batch draws nothing
    for (got_shape, got_dtype), (full_shape, full_dtype) in zip(_shapes(empty), _shapes(full)):
        assert got_dtype == full_dtype
        if name == "clipped_grad_sum":
            assert got_shape == full_shape  # sums keep the parameters' shapes (counts: 0-d)
        elif name == "per_sample_gram":
            assert got_shape == (0, 0)
        else:
            assert got_shape == (0, *full_shape[1:])
    if name == "clipped_grad_sum":
        assert all(float(g.abs().sum()) == 0 for g in ft.tree.leaves(empty.grad_sum))
        assert int(empty.count) == 0 and int(empty.num_clipped) == 0


def test_empty_batch_with_aux():
    def loss(p, b):
        return _loss(p, b), {"logit_sum": b["x"].sum()}

    torch.manual_seed(0)
    grads, aux = ft.per_sample_grads(
        loss, _params(), _batch(0), method="vmap", randomness="different", has_aux=True
    )
    assert grads["w"].shape == (0, 3, 2, 3, 3)
    assert aux["logit_sum"].shape == (0,) and aux["logit_sum"].dtype == torch.float64
