"""``multi_normal``: optax's diagonal Gaussian from a log-scale, against ``torch.distributions``.

References: ``torch.distributions.Normal(loc, exp(log_scale))`` in float64 for ``log_prob``
(summed over the parameter axes), ``entropy`` and their gradients; the sample moments of a large
draw against ``loc`` and ``exp(log_scale)``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Normal
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft
from functrain.optim.random_utils import MultiNormalDiagFromLogScale, multi_normal

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}

SHAPES = [((), ()), ((3,), (3,)), ((2, 3), (2, 3)), ((1, 3), (2, 1)), ((4,), ()), ((), (2, 2))]


def _params(loc_shape, scale_shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(loc_shape, dtype=torch.float64, generator=gen)
    log_scale = 0.5 * torch.randn(scale_shape, dtype=torch.float64, generator=gen)
    return loc, log_scale


def ref_log_prob(loc, log_scale, x, param_ndim):
    per_dim = Normal(loc, log_scale.exp()).log_prob(x)
    return per_dim.sum(dim=tuple(range(-param_ndim, 0))) if param_ndim else per_dim


@pytest.mark.parametrize(("loc_shape", "scale_shape"), SHAPES)
@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
def test_log_prob_matches_torch_normal(loc_shape, scale_shape, batch):
    loc, log_scale = _params(loc_shape, scale_shape)
    dist = multi_normal(loc, log_scale)
    param_shape = torch.broadcast_shapes(loc_shape, scale_shape)
    x = torch.randn(batch + param_shape, dtype=torch.float64)
    got = dist.log_prob(x)
    assert got.shape == batch
    torch.testing.assert_close(got, ref_log_prob(loc, log_scale, x, len(param_shape)))


@given(seed=st.integers(0, 2**16), spread=st.floats(1e-3, 1e3))
def test_log_prob_and_its_gradients_property(seed, spread):
    loc, log_scale = _params((4,), (4,), seed)
    x = spread * torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def ours(loc, log_scale):
        return multi_normal(loc, log_scale).log_prob(x).sum()

    def ref(loc, log_scale):
        return ref_log_prob(loc, log_scale, x, 1).sum()

    torch.testing.assert_close(ours(loc, log_scale), ref(loc, log_scale))
    got = torch.func.grad(ours, argnums=(0, 1))(loc, log_scale)
    want = torch.func.grad(ref, argnums=(0, 1))(loc, log_scale)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("loc_shape", "scale_shape"), SHAPES)
def test_entropy_matches_torch_normal(loc_shape, scale_shape):
    loc, log_scale = _params(loc_shape, scale_shape, seed=1)
    param_shape = torch.broadcast_shapes(loc_shape, scale_shape)
    want = Normal(loc, log_scale.exp()).entropy().expand(param_shape).sum()
    got = multi_normal(loc, log_scale).entropy()
    assert got.shape == ()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_moments(dtype):
    loc = torch.tensor([[-2.0, 0.0, 3.0], [1.0, 10.0, -1.0]], dtype=dtype)
    log_scale = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype)
    n = 20_000
    samples = multi_normal(loc, log_scale).sample((n,), ft.random_key(0))
    assert samples.shape == (n, 2, 3) and samples.dtype == dtype
    scale = log_scale.exp().double()
    mean_err = (samples.double().mean(0) - loc.double()) / (scale / n**0.5)
    assert mean_err.abs().max() < 4.5  # 4.5 standard errors
    std_ratio = samples.double().std(0) / scale
    assert (std_ratio - 1).abs().max() < 0.03
    # Standardised samples are uncorrelated across parameter entries.
    z = ((samples.double() - loc.double()) / scale).reshape(n, -1)
    corr = torch.corrcoef(z.T) - torch.eye(6, dtype=torch.float64)
    assert corr.abs().max() < 0.04


def test_sample_keys_and_shapes():
    dist = multi_normal(torch.zeros(3), torch.zeros(3))
    key = ft.random_key(1)
    assert torch.equal(dist.sample([4, 2], key), dist.sample((4, 2), key))
    assert torch.equal(dist.sample((4,), 5), dist.sample(4, 5))
    assert not torch.equal(dist.sample((4,), ft.random_key(1)), dist.sample((4,), ft.random_key(2)))
    assert dist.sample((), key).shape == (3,)
    assert dist.sample((0, 2), key).shape == (0, 2, 3)
    with pytest.raises(TypeError, match="key must be an int or a 0-d integer tensor"):
        dist.sample((2,), 1.5)
    with pytest.raises(ValueError, match="key must be an int or a 0-d integer tensor"):
        dist.sample((2,), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        dist.sample("ab", key)


def test_sample_reads_no_host_value_and_compiles():
    dist = multi_normal(torch.zeros(2), torch.zeros(2))

    class NoHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in READS:
                raise AssertionError(f"host read of a tensor: {func}")
            return func(*args, **(kwargs or {}))

    key = ft.random_key(3)
    with NoHostReads():
        eager = dist.sample((3,), key)
    torch._dynamo.reset()
    compiled = torch.compile(lambda k: dist.sample((3,), k), fullgraph=True, backend="eager")
    assert torch.equal(compiled(key), eager)


def test_params_broadcasting_errors_and_inputs():
    loc, log_scale = _params((1, 2, 1, 3), (2, 1, 4, 3))
    dist = multi_normal(loc, log_scale)
    assert isinstance(dist, MultiNormalDiagFromLogScale)
    mean, ls = dist.params
    assert mean is loc and ls is log_scale and dist.log_scale is log_scale
    with pytest.raises(ValueError, match="Incompatible shapes for broadcasting"):
        multi_normal(torch.zeros(2, 4), torch.zeros(3, 4))
    from_lists = multi_normal([0.0, 1.0], [0.0, 0.0])
    torch.testing.assert_close(
        from_lists.log_prob([0.0, 1.0]), Normal(torch.zeros(2), 1.0).log_prob(torch.zeros(2)).sum()
    )
    with pytest.raises(TypeError, match="loc must be real"):
        multi_normal(torch.zeros(2, dtype=torch.complex64), torch.zeros(2))
