"""Review tests of functrain.microbatching: reductions of per-example integer and bool outputs.

optax's ``micro_vmap`` reduces the mapped axis with ``jnp.sum`` / ``jnp.mean`` before any
micro-batch accumulation, so a ``SUM`` of per-example booleans is a count (not their ``any``),
narrow integers do not wrap around, and ``MEAN`` / ``RUNNING_MEAN`` average integers in float.
References: Python integer counts and numpy float64 means of the same values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain.microbatching as mb

AT = mb.AccumulationType


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    size=st.integers(1, 4),
    chunked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sum_of_per_example_bools_counts_them(n: int, size: int, chunked: bool, seed: int):
    # A typical accuracy count: per-example "prediction == label", summed over the batch.
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n * size, 3, generator=gen)
    labels = torch.randint(0, 3, (n * size,), generator=gen)
    fn = mb.micro_vmap(
        lambda x, y: x.argmax() == y,
        in_axes=(0, 0),
        microbatch_size=size if chunked else None,
        accumulator=AT.SUM,
    )
    expected = sum(int(row.argmax()) == int(y) for row, y in zip(logits, labels))
    out = fn(logits, labels)
    assert out.dtype == torch.int32
    assert int(out) == expected


@pytest.mark.parametrize("microbatch_size", [None, 2, 5])
def test_sum_of_uint8_rows_does_not_wrap(microbatch_size: int | None):
    pixels = torch.full((10, 2), 200, dtype=torch.uint8)
    out = mb.micro_vmap(lambda p: p, microbatch_size=microbatch_size, accumulator=AT.SUM)(pixels)
    assert out.tolist() == [2000, 2000]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_sum_of_integer_rows_is_exact(dtype: torch.dtype):
    x = torch.arange(-6, 6, dtype=dtype).reshape(6, 2) * 20
    out = mb.micro_vmap(lambda v: v, microbatch_size=3, accumulator=AT.SUM)(x)
    expected = [sum(int(r[j]) for r in x) for j in range(2)]
    assert out.tolist() == expected
    # int32 and int64 keep their dtype (jnp.sum keeps int32 rather than torch's int64).
    assert out.dtype == (torch.int32 if dtype != torch.int64 else torch.int64)


@pytest.mark.parametrize("kind", [AT.MEAN, AT.RUNNING_MEAN])
@pytest.mark.parametrize("microbatch_size", [None, 1, 2, 4])
@pytest.mark.parametrize("as_bool", [False, True])
def test_mean_of_integer_and_bool_rows_is_a_float_mean(
    kind: AT, microbatch_size: int | None, as_bool: bool
):
    values = torch.tensor([[3, -1], [0, 4], [7, 2], [5, 5]])
    fun = (lambda v: v > 2) if as_bool else (lambda v: v * 2)
    out = mb.micro_vmap(fun, microbatch_size=microbatch_size, accumulator=kind)(values)
    ref = np.asarray(values.numpy() > 2 if as_bool else values.numpy() * 2, dtype=np.float64)
    assert out.dtype == torch.get_default_dtype()
    np.testing.assert_allclose(out.numpy(), ref.mean(0), rtol=1e-6)


def test_mean_in_micro_grad_metrics_tree_with_integer_transform():
    # transform_fn may produce integer per-example statistics (e.g. a sign count), averaged.
    params = torch.tensor([1.0, -2.0])
    batch = torch.tensor([[1.0, 2.0], [-3.0, 1.0], [2.0, -2.0], [0.5, 0.5]])
    acc, _ = mb.micro_grad(
        lambda p, b: (b * p).sum() ** 2,
        batch_argnums=1,
        keep_batch_dim=False,
        microbatch_size=2,
        accumulator=AT.MEAN,
        transform_fn=lambda g: (g > 0).to(torch.int64),
    )(params, batch)
    per_example = [2 * (row @ params) * row for row in batch]
    ref = np.mean([(g > 0).numpy().astype(np.float64) for g in per_example], axis=0)
    np.testing.assert_allclose(acc.numpy(), ref)


def test_microbatch_mean_of_integer_outputs_still_raises():
    # Without vmap's per-row reduction, optax's MEAN rejects integer outputs: so does this.
    with pytest.raises(ValueError, match="floating-point"):
        mb.microbatch(lambda v: v.sum(), 0, 2, AT.MEAN)(torch.arange(6))
