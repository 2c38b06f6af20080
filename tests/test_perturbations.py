"""functrain.perturbations against hand-written Monte Carlo estimators over the same samples.

A recording noise wraps Gumbel/Normal and keeps what ``sample`` returned; the references then
average ``f(x + σ z_i)`` and the score-function terms ``(f_i − b) (−∇ log μ(z_i)) / σ`` in
float64 by hand, from those draws. Statistical checks (Gumbel-max → softmax, sample moments,
Kolmogorov-Smirnov) use fixed keys, so they are deterministic, with bounds of several standard
errors.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import functrain as ft
import functrain.perturbations as perturbations

D = torch.float64


class Recording:
    """A noise that delegates to ``base`` and records every draw."""

    def __init__(self, base):
        self.base, self.draws = base, []

    def sample(self, key, sample_shape=(), dtype=float):
        z = self.base.sample(key, sample_shape, dtype)
        self.draws.append(z.clone())
        return z

    def log_prob(self, inputs):
        return self.base.log_prob(inputs)


def one_hot_argmax(x):
    return (
        torch.nn.functional.one_hot(x.reshape(-1).argmax(), x.numel()).reshape(x.shape).to(x.dtype)
    )


def score(noise_name, z):
    """``∇_z log μ(z)`` by hand."""
    return -z if noise_name == "normal" else -1 + torch.exp(-z)


NOISES = {"normal": perturbations.Normal, "gumbel": perturbations.Gumbel}
X = torch.tensor([0.3, -0.2, 0.5, 0.1, 0.45], dtype=D)


@pytest.mark.parametrize("noise_name", NOISES)
@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_value_is_the_average_over_the_same_samples(noise_name, sigma):
    noise = Recording(NOISES[noise_name]())
    fn = perturbations.make_perturbed_fun(one_hot_argmax, 500, sigma, noise)
    out = fn(ft.random_key(0), X)
    (z,) = noise.draws
    assert z.shape == (500, 5)
    expected = torch.stack([one_hot_argmax(X + sigma * zi) for zi in z]).mean(0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("noise_name", NOISES)
@pytest.mark.parametrize("use_baseline", [True, False])
def test_gradient_is_the_score_function_estimator(noise_name, use_baseline):
    sigma, n = 0.7, 400
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=D)

    def f(x):  # piecewise constant: its own gradient is zero almost everywhere
        return (one_hot_argmax(x) * w).sum()

    noise = Recording(NOISES[noise_name]())
    fn = perturbations.make_perturbed_fun(f, n, sigma, noise, use_baseline)
    x = X.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(ft.random_key(3), x), x)
    (z,) = noise.draws
    values = torch.stack([f(X + sigma * zi) for zi in z])
    baseline = f(X) if use_baseline else 0.0
    expected = ((values - baseline)[:, None] * (-score(noise_name, z)) / sigma).mean(0)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)
    # torch.func.grad gives the same estimate for the same key
    noise.draws.clear()
    torch.testing.assert_close(torch.func.grad(fn, argnums=1)(ft.random_key(3), X), grad)


def test_jacobian_of_a_vector_output_by_every_autodiff_route():
    sigma, n = 0.5, 300
    noise = Recording(perturbations.Normal())
    fn = perturbations.make_perturbed_fun(one_hot_argmax, n, sigma, noise)
    key = ft.random_key(5)
    jac = torch.func.jacrev(fn, argnums=1)(key, X)
    (z,) = noise.draws
    values = torch.stack([one_hot_argmax(X + sigma * zi) for zi in z])
    expected = ((values - one_hot_argmax(X))[:, :, None] * (z / sigma)[:, None, :]).mean(0)
    torch.testing.assert_close(jac, expected, rtol=1e-9, atol=1e-12)
    x = X.clone().requires_grad_(True)
    out = fn(key, x)
    rows = [torch.autograd.grad(out[k], x, retain_graph=True)[0] for k in range(5)]
    torch.testing.assert_close(torch.stack(rows), expected, rtol=1e-9, atol=1e-12)


def test_second_derivative_is_the_gaussian_smoothing_hessian_estimator():
    # The magic box is differentiable twice: for normal noise the Hessian estimate is
    # mean_i (f_i − f(x)) (z_i z_iᵀ − I) / σ².
    sigma, n = 0.6, 300
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=D)

    def f(x):
        return (one_hot_argmax(x) * w).sum()

    noise = Recording(perturbations.Normal())
    fn = perturbations.make_perturbed_fun(f, n, sigma, noise)
    hessian = torch.func.jacrev(torch.func.grad(fn, argnums=1), argnums=1)(ft.random_key(9), X)
    z = noise.draws[0]
    values = torch.stack([f(X + sigma * zi) for zi in z]) - f(X)
    outer = z[:, :, None] * z[:, None, :] - torch.eye(5, dtype=D)
    expected = (values[:, None, None] * outer).mean(0) / sigma**2
    torch.testing.assert_close(hessian, expected, rtol=1e-8, atol=1e-10)


def test_pytree_inputs_perturb_every_leaf_with_one_log_density():
    sigma, n = 0.8, 300
    x = (
        torch.tensor([0.1, 0.4, -0.3], dtype=D),
        {"k1": torch.tensor([[0.2, 0.0], [0.5, -0.1]], dtype=D), "k2": torch.tensor(0.3, dtype=D)},
    )

    def f(tree):  # argmax one-hot per leaf, weighted
        a, b = tree
        return {"a": one_hot_argmax(a), "b": (one_hot_argmax(b["k1"]) * 2).sum() + b["k2"]}

    noise = Recording(perturbations.Gumbel())
    fn = perturbations.make_perturbed_fun(f, n, sigma, noise)
    key = ft.random_key(11)
    out = fn(key, x)
    # leaves in flatten order: x[0], x[1]['k1'], x[1]['k2']; one draw per leaf
    z0, z1, z2 = noise.draws
    assert (z0.shape, z1.shape, z2.shape) == ((n, 3), (n, 2, 2), (n,))
    samples = [
        f(
            (
                x[0] + sigma * z0[i],
                {"k1": x[1]["k1"] + sigma * z1[i], "k2": x[1]["k2"] + sigma * z2[i]},
            )
        )
        for i in range(n)
    ]
    torch.testing.assert_close(
        out["a"], torch.stack([s["a"] for s in samples]).mean(0), rtol=0, atol=1e-15
    )
    b_values = torch.stack([s["b"] for s in samples])
    torch.testing.assert_close(out["b"], b_values.mean(0), rtol=1e-12, atol=1e-12)
    # d out["b"] / d x: the log density sums over every leaf, so each leaf's gradient weighs
    # the same (f_i − b) by its own score
    x_req = ft.tree.map(lambda t: t.clone().requires_grad_(True), x)
    noise.draws.clear()
    grads = torch.autograd.grad(fn(key, x_req)["b"], ft.tree.leaves(x_req))
    diff = (b_values - f(x)["b"]) / sigma
    for got, z in zip(grads, (z0, z1, z2)):
        weight = diff.reshape(n, *([1] * (z.dim() - 1)))
        expected = (weight * -score("gumbel", z)).mean(0)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_gumbel_perturbed_argmax_tends_to_softmax():
    # Gumbel-max trick: P(argmax(x + σG) = k) = softmax(x/σ)_k, and the gradient of the
    # expectation is the softmax Jacobian (diag(p) − p pᵀ)/σ.
    n, sigma = 100_000, 0.5
    x = torch.tensor([0.2, -0.4, 0.6, 0.0], dtype=D)
    noise = Recording(perturbations.Gumbel())
    fn = perturbations.make_perturbed_fun(one_hot_argmax, n, sigma, noise)
    jac = torch.func.jacrev(fn, argnums=1)(ft.random_key(2), x)
    noise.draws.clear()
    value = fn(ft.random_key(2), x)
    p = torch.softmax(x / sigma, 0)
    se = torch.sqrt(p * (1 - p) / n)
    assert ((value - p).abs() < 5 * se).all(), (value, p)
    # the gradient estimate's own per-sample terms give its standard error
    z = noise.draws[0]
    onehots = torch.nn.functional.one_hot((x + sigma * z).argmax(1), 4).to(D)
    terms = (onehots - one_hot_argmax(x))[:, :, None] * (-score("gumbel", z) / sigma)[:, None, :]
    jac_se = terms.std(0) / math.sqrt(n)
    expected = (torch.diag(p) - p[:, None] * p[None, :]) / sigma
    torch.testing.assert_close(jac, terms.mean(0), rtol=1e-9, atol=1e-12)
    assert ((jac - expected).abs() < 5 * jac_se).all(), (jac, expected)


def test_same_key_same_result_other_key_other_result():
    fn = perturbations.make_perturbed_fun(one_hot_argmax, 200, 0.5)
    a = fn(ft.random_key(0), X)
    assert torch.equal(a, fn(ft.random_key(0), X))
    assert torch.equal(a, fn(0, X))  # an int seed means ft.random_key(seed)
    assert not torch.equal(a, fn(ft.random_key(1), X))
    # keys that differ only in their high 32 bits draw differently
    high = torch.tensor(1 << 40, dtype=torch.int64)
    z1 = perturbations.Normal().sample(high, (50,))
    z2 = perturbations.Normal().sample(torch.tensor(0, dtype=torch.int64), (50,))
    assert not torch.equal(z1, z2)


@pytest.mark.parametrize("noise_name", NOISES)
def test_samples_have_the_distribution(noise_name):
    dist = NOISES[noise_name]()
    z = dist.sample(ft.random_key(4), (200_000,), D)
    assert z.dtype == D and z.shape == (200_000,)
    ref = stats.norm if noise_name == "normal" else stats.gumbel_r
    mean, var = ref.stats(moments="mv")
    n = z.numel()
    assert abs(z.mean().item() - mean) < 5 * math.sqrt(var / n)
    # the variance's standard error from the fourth central moment
    m4 = ((z - z.mean()) ** 4).mean().item()
    assert abs(z.var().item() - var) < 5 * math.sqrt((m4 - var**2) / n)
    assert stats.kstest(z.numpy(), ref.cdf).pvalue > 1e-3


@pytest.mark.parametrize("noise_name", NOISES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, float])
def test_samples_are_finite_in_every_dtype(noise_name, dtype):
    z = NOISES[noise_name]().sample(ft.random_key(6), (2, 50_000), dtype)
    assert z.dtype == (torch.get_default_dtype() if dtype is float else dtype)
    assert z.shape == (2, 50_000) and torch.isfinite(z).all()
    # the same draw as the float64 one, rounded
    z64 = NOISES[noise_name]().sample(ft.random_key(6), (2, 50_000), D)
    torch.testing.assert_close(z.double(), z64, rtol=1e-2, atol=1e-2)


def test_gumbel_tails_are_finite_and_exact():
    # u = (b + ½)/2³² at the extreme 32-bit values: float64 closed forms via log1p.
    bits = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 256, 2**32 - 2, 2**32 - 1])

    def reference(b):
        u, one_minus_u = (b + 0.5) / 2**32, (2**32 - b - 0.5) / 2**32
        neg_log_u = -math.log(u) if u < 0.5 else -math.log1p(-one_minus_u)
        return -math.log(neg_log_u)

    expected = torch.tensor([reference(int(b)) for b in bits], dtype=D)
    for compute, tol in [(torch.float32, 1e-6), (D, 1e-14)]:
        got = perturbations._gumbel_from_bits(bits, compute)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    assert 22.8 < expected[-1] < 22.9 and -3.2 < expected[0] < -3.1


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(0, 4), max_size=3), seed=st.integers(0, 2**20))
def test_sample_shape_and_determinism(shape, seed):
    for dist in (perturbations.Normal(), perturbations.Gumbel()):
        a = dist.sample(ft.random_key(seed), tuple(shape), torch.float32)
        assert a.shape == tuple(shape)
        assert torch.equal(a, dist.sample(ft.random_key(seed), shape, torch.float32))


def test_log_probs_are_optax_s():
    x = torch.linspace(-3, 3, 13, dtype=D)
    torch.testing.assert_close(perturbations.Normal().log_prob(x), -0.5 * x**2)
    torch.testing.assert_close(perturbations.Gumbel().log_prob(x), -x - torch.exp(-x))
    # log_prob plus the normalizer is the log density
    torch.testing.assert_close(
        perturbations.Gumbel().log_prob(x), torch.tensor(stats.gumbel_r.logpdf(x.numpy()))
    )
    torch.testing.assert_close(
        perturbations.Normal().log_prob(x) - 0.5 * math.log(2 * math.pi),
        torch.tensor(stats.norm.logpdf(x.numpy())),
    )


def test_noise_with_a_device_keyword_draws_on_the_input_device():
    seen = []

    class DeviceNoise(perturbations.Normal):
        def sample(self, key, sample_shape=(), dtype=float, *, device=None):
            seen.append(device)
            return super().sample(key, sample_shape, dtype, device=device)

    fn = perturbations.make_perturbed_fun(lambda x: x.sum(), 10, 0.1, DeviceNoise())
    fn(0, torch.zeros(3))
    assert seen == [torch.device("cpu")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws():
    x = torch.randn(5, dtype=D)
    fn = perturbations.make_perturbed_fun(one_hot_argmax, 300, 0.5)
    cpu = fn(ft.random_key(0), x)
    cuda = fn(ft.random_key(0), x.cuda())
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu)
    for dist in NOISES.values():
        a = dist().sample(ft.random_key(1), (1000,), D)
        b = dist().sample(ft.random_key(1), (1000,), D, device="cuda")
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-12)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        perturbations.make_perturbed_fun(one_hot_argmax, 0)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        perturbations.make_perturbed_fun(one_hot_argmax, 10.0)
    with pytest.raises(TypeError, match=r"noise must have sample and log_prob.*log_prob"):
        perturbations.make_perturbed_fun(one_hot_argmax, noise=type("N", (), {"sample": print})())
    fn = perturbations.make_perturbed_fun(one_hot_argmax, 10)
    with pytest.raises(
        TypeError, match=r"inputs\['a'\] must be a floating tensor, got torch.int64"
    ):
        fn(0, {"a": torch.ones(2, dtype=torch.int64)})
    with pytest.raises(TypeError, match="dtype must be a floating"):
        perturbations.Gumbel().sample(0, (2,), torch.int32)
    with pytest.raises(ValueError, match="0-d integer tensor"):
        perturbations.Normal().sample(torch.zeros(2, dtype=torch.int64), (2,))


def test_signatures_are_optax_s():
    sig = inspect.signature(perturbations.make_perturbed_fun)
    assert list(sig.parameters) == ["fun", "num_samples", "sigma", "noise", "use_baseline"]
    defaults = [p.default for p in sig.parameters.values()][1:]
    assert defaults[:2] == [1000, 0.1] and defaults[3] is True
    assert isinstance(defaults[2], perturbations.Gumbel)
    for cls in (perturbations.Normal, perturbations.Gumbel):
        params = inspect.signature(cls.sample).parameters
        assert list(params)[:4] == ["self", "key", "sample_shape", "dtype"]
        assert params["sample_shape"].default == () and params["dtype"].default is float
        assert list(inspect.signature(cls.log_prob).parameters) == ["self", "inputs"]
