"""``method="layers"`` pools CPU feature maps of 8+ channels in channels-last layout.

The values and the routing of the gradient through each window's maximum must stay those of
ordinary (contiguous) pooling: every check compares per-sample gradients and clipped sums with
one autograd call per example in float64 (``naive_per_sample``), ties included.
"""

import pytest
import torch
import torch.nn.functional as F
from grad_problems import naive_per_sample

import functrain as ft
from functrain import tree
from functrain.grads import _layer_pool

D = torch.float64


def _randn(*shape, seed=0, dtype=D):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _flat(per_sample):
    return torch.cat([g.reshape(g.shape[0], -1) for g in tree.leaves(per_sample)], 1)


@pytest.fixture
def pool_calls(monkeypatch):
    """The physical batches pooled channels last."""
    calls = []
    original = _layer_pool.pool_channels_last

    def spy(p, options):
        calls.append(tuple(p.shape))
        return original(p, options)

    monkeypatch.setattr(_layer_pool, "pool_channels_last", spy)
    return calls


def _cnn_problem(channels, pool, *, example_dims=3, size=9, seed=0, integer=False):
    """conv(2 → channels) → relu → pool → linear, on examples ``([N,] 2, size, size)``."""
    draw = (lambda *s, seed: _randn(*s, seed=seed).mul(2).round()) if integer else _randn
    params = {
        "conv_w": draw(channels, 2, 3, 3, seed=seed),
        "conv_b": draw(channels, seed=seed + 1),
    }
    batch_shape = (4, 2, size, size) if example_dims == 3 else (4, 2, 2, size, size)
    x = draw(*batch_shape, seed=seed + 2)
    with torch.no_grad():
        flat = pool(F.conv2d(x.flatten(0, x.dim() - 4), params["conv_w"], params["conv_b"]))
    features = flat[0].numel() * (1 if example_dims == 3 else 2)
    params["fc_w"] = draw(3, features, seed=seed + 3) / features
    batch = {"x": x, "y": torch.tensor([0, 1, 2, 1])}

    def loss_fn(p, b):
        x = b["x"] if example_dims == 3 else b["x"].reshape(-1, *b["x"].shape[-3:])
        h = torch.relu(F.conv2d(x, p["conv_w"], p["conv_b"]))
        h = pool(h)
        logits = F.linear(h.flatten(-3 if example_dims == 3 else 0), p["fc_w"])
        return F.cross_entropy(logits.reshape(*b["y"].shape, 3), b["y"])

    return loss_fn, params, batch


POOLS = {
    "k2s1": lambda h: F.max_pool2d(h, 2, 1),
    "k2 default stride": lambda h: F.max_pool2d(h, 2),
    "k3s2 padded": lambda h: F.max_pool2d(h, 3, 2, padding=1),
    "dilated, ceil mode": lambda h: F.max_pool2d(h, 2, 2, dilation=2, ceil_mode=True),
    "rectangular": lambda h: F.max_pool2d(h, (2, 3), (1, 2)),
    "module": torch.nn.MaxPool2d(2, 1),
    "torch.max_pool2d": lambda h: torch.max_pool2d(h, [2, 2]),
}


def _check(loss_fn, params, batch, rtol=1e-12):
    reference = _flat(naive_per_sample(loss_fn, params, batch))
    got = _flat(ft.per_sample_grads(loss_fn, params, batch, method="layers"))
    torch.testing.assert_close(got, reference, rtol=rtol, atol=1e-14)
    clip = 0.5 * float(reference.norm(dim=1).median())
    factors = (clip / reference.norm(dim=1)).clamp(max=1.0)
    summed = ft.clipped_grad_sum(loss_fn, params, batch, clip, method="layers").grad_sum
    torch.testing.assert_close(_flat(tree.map(lambda t: t[None], summed))[0], factors @ reference)


@pytest.mark.parametrize("example_dims", [3, 4])
@pytest.mark.parametrize("name", list(POOLS))
def test_channels_last_pooling_equals_naive_loop(name, example_dims, pool_calls):
    _check(*_cnn_problem(8, POOLS[name], example_dims=example_dims))
    assert pool_calls, "the channels-last pooling was not used"


def test_ties_route_the_gradient_as_contiguous_pooling(pool_calls):
    # Integer weights and inputs: many windows hold equal maxima (and ReLU zeros); a layout
    # that picked another maximum would send the gradient to another input element.
    loss_fn, params, batch = _cnn_problem(8, POOLS["k2s1"], integer=True)
    h = torch.relu(F.conv2d(batch["x"], params["conv_w"], params["conv_b"]))
    windows = h.unfold(2, 2, 1).unfold(3, 2, 1).reshape(*h.shape[:2], -1, 4)
    top = windows.max(-1, keepdim=True).values
    positive_ties = ((windows == top).sum(-1) > 1) & (top[..., 0] > 0)
    assert positive_ties.sum() > 20, positive_ties.sum()
    # A tie routed to another element is off by O(1); float64 rounding of the convolution's
    # gradient differs between BLAS code paths (2e-14 seen on an AMD CPU), so not rtol=0.
    _check(loss_fn, params, batch)
    assert pool_calls


@pytest.mark.parametrize(
    "channels, pool, dtype",
    [
        (4, POOLS["k2s1"], D),  # too few channels for the copies to pay
        (8, lambda h: F.max_pool2d(h, 2, 1, return_indices=True)[0], D),
        (8, POOLS["k2s1"], torch.bfloat16),
    ],
)
def test_other_calls_pool_as_written(channels, pool, dtype, pool_calls):
    loss_fn, params, batch = _cnn_problem(channels, pool)
    if dtype != D:
        params = tree.map(lambda t: t.to(dtype), params)
        batch = {"x": batch["x"].to(dtype), "y": batch["y"]}
        got = ft.per_sample_grads(loss_fn, params, batch, method="layers")
        reference = naive_per_sample(loss_fn, params, batch)
        torch.testing.assert_close(
            _flat(got).double(), _flat(reference).double(), rtol=0.05, atol=0.02
        )
    else:
        _check(loss_fn, params, batch)
    assert not pool_calls


def test_empty_batch(pool_calls):
    loss_fn, params, batch = _cnn_problem(8, POOLS["k2s1"])
    batch = tree.map(lambda t: t[:0], batch)
    grads = ft.per_sample_grads(loss_fn, params, batch, method="layers")
    assert all(g.shape[0] == 0 for g in tree.leaves(grads))
