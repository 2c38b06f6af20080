"""per_sample_gram over several chunks with random draws (dropout): every block sees the same
per-sample gradients, so the matrix equals the Gram matrix of the gradients one chunked pass of
``per_sample_grads`` gives from the same generator state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft

N, D = 7, 5


def _problem() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(6, D, generator=gen, dtype=torch.float64),
        "w2": torch.randn(1, 6, generator=gen, dtype=torch.float64),
    }
    batch = {
        "x": torch.randn(N, D, generator=gen, dtype=torch.float64),
        "y": torch.randn(N, generator=gen, dtype=torch.float64),
    }
    return params, batch


def _loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    # Linear calls: the layer rules cover them, so method="layers" applies.
    h = F.dropout(torch.tanh(F.linear(b["x"], p["w1"])), 0.5, training=True)
    return ((F.linear(h, p["w2"]).squeeze(-1) - b["y"]) ** 2).mean()


def _reference(randomness: str, chunk_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gram matrix of one chunked pass of per-sample gradients, and the generator after."""
    params, batch = _problem()
    torch.manual_seed(seed)
    grads = ft.per_sample_grads(
        _loss, params, batch, chunk_size=chunk_size, randomness=randomness, method="vmap"
    )
    rows = torch.cat([g.reshape(N, -1) for g in grads.values()], dim=1)
    return rows @ rows.T, torch.get_rng_state()


@settings(max_examples=12, deadline=None)
@given(
    chunk_size=st.integers(1, N - 1),
    randomness=st.sampled_from(["different", "same"]),
    method=st.sampled_from(["vmap", "auto"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunked_gram_with_draws_is_the_gram_of_one_pass(chunk_size, randomness, method, seed):
    want, rng_after = _reference(randomness, chunk_size, seed)
    params, batch = _problem()
    torch.manual_seed(seed)
    got = ft.per_sample_gram(
        _loss, params, batch, chunk_size=chunk_size, randomness=randomness, method=method
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The generators end where one pass over the chunks leaves them.
    assert torch.equal(torch.get_rng_state(), rng_after)


def test_chunked_gram_with_draws_is_positive_semidefinite_and_matches_cosine():
    params, batch = _problem()
    torch.manual_seed(3)
    g = ft.per_sample_gram(_loss, params, batch, chunk_size=2, randomness="different")
    assert torch.linalg.eigvalsh(g).min() > -1e-10 * g.abs().max()
    torch.manual_seed(3)
    cos = ft.per_sample_gram(
        _loss, params, batch, chunk_size=2, randomness="different", cosine=True
    )
    norms = g.diagonal().sqrt()
    torch.testing.assert_close(cos, g / norms[:, None] / norms[None, :], rtol=1e-12, atol=1e-12)


def test_loop_method_replays_too():
    params, batch = _problem()
    torch.manual_seed(5)
    rows = []
    for i in range(0, N, 3):  # the loop draws example by example: per chunk, in order
        part = {k: v[i : i + 3] for k, v in batch.items()}
        grads = ft.per_sample_grads(_loss, params, part, randomness="different", method="loop")
        rows.append(torch.cat([x.reshape(x.shape[0], -1) for x in grads.values()], dim=1))
    rows = torch.cat(rows)
    torch.manual_seed(5)
    got = ft.per_sample_gram(
        _loss, params, batch, chunk_size=3, randomness="different", method="loop"
    )
    torch.testing.assert_close(got, rows @ rows.T, rtol=1e-12, atol=1e-12)


def test_layers_with_draws_over_several_chunks_is_refused_by_name():
    params, batch = _problem()
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"method='layers', randomness='different'.*method='vmap'"):
        ft.per_sample_gram(
            _loss, params, batch, chunk_size=3, randomness="different", method="layers"
        )
    assert torch.equal(torch.get_rng_state(), before)  # refused before drawing anything


def test_layers_with_draws_in_one_chunk_still_runs():
    params, batch = _problem()
    torch.manual_seed(1)
    got = ft.per_sample_gram(_loss, params, batch, randomness="different", method="layers")
    want, _ = _reference("different", N, 1)
    assert got.shape == (N, N)
    # One pass, as vmap draws it: the layer rules' vmapped forward draws the same numbers.
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
