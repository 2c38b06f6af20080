"""Per-example convolution weight gradients from one grouped convolution (``"layers"``, CPU).

Where a one-channel convolution has many more output positions than output channels, the rule forms
each example's weight gradient with a ``groups=B`` convolution instead of materialising the
input patches. Every check compares with one autograd call per example in float64.
"""

import pytest
import torch
import torch.nn.functional as F
from grad_problems import naive_per_sample

import functrain as ft
from functrain import tree
from functrain.grads import _layer_grads

D = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.fixture
def grouped_calls(monkeypatch):
    calls = []
    original = _layer_grads._grouped_weight_grads

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(_layer_grads, "_grouped_weight_grads", spy)
    return calls


CONVS = {
    "conv2d stride 2 padded": (2, dict(stride=2, padding=3), (1, 13, 13), 5),
    "conv2d dilated": (2, dict(dilation=2), (1, 11, 11), 3),
    "conv2d asymmetric pad": (2, dict(padding=(1, 2), stride=(1, 2)), (1, 9, 10), 3),
    "conv1d": (1, dict(stride=1, padding=2), (1, 30), 3),
    "conv3d": (3, dict(padding=1), (1, 6, 6, 5), 3),
}


def _flat(grads):
    return torch.cat([g.reshape(g.shape[0], -1) for g in tree.leaves(grads)], 1)


@pytest.mark.parametrize("name", list(CONVS))
def test_grouped_weight_gradients_equal_the_naive_loop(name, grouped_calls):
    dims, options, example_shape, kernel = CONVS[name]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    in_ch = example_shape[0]
    params = {
        "w": _randn(2, in_ch, *([kernel] * dims), seed=1),
        "b": _randn(2, seed=2),
    }
    batch = _randn(5, *example_shape, seed=3)

    def loss_fn(p, x):
        return conv(x, p["w"], p["b"], **options).tanh().square().mean()

    reference = _flat(naive_per_sample(loss_fn, params, batch))
    got = _flat(ft.per_sample_grads(loss_fn, params, batch, method="layers"))
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-14)
    assert grouped_calls, "the grouped route was not taken"
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, method="layers").global_norm
    torch.testing.assert_close(norms, reference.norm(dim=1), rtol=1e-12, atol=1e-14)
    gram = ft.per_sample_gram(loss_fn, params, batch, method="layers")
    torch.testing.assert_close(gram, reference @ reference.T, rtol=1e-12, atol=1e-14)
    clip = 0.5 * float(reference.norm(dim=1).median())
    factors = (clip / reference.norm(dim=1)).clamp(max=1.0)
    summed = ft.clipped_grad_sum(loss_fn, params, batch, clip, method="layers").grad_sum
    torch.testing.assert_close(_flat(tree.map(lambda t: t[None], summed))[0], factors @ reference)


@pytest.mark.parametrize(
    "weight_shape, example_shape",
    [((4, 1, 3, 3), (1, 5, 5)), ((2, 2, 3, 3), (2, 12, 12))],
    ids=["few positions", "two input channels"],
)
def test_other_convolutions_keep_the_patches(weight_shape, example_shape, grouped_calls):
    params = {"w": _randn(*weight_shape, seed=1)}
    batch = _randn(3, *example_shape, seed=2)

    def loss_fn(p, x):
        return F.conv2d(x, p["w"]).square().mean()

    reference = _flat(naive_per_sample(loss_fn, params, batch))
    got = _flat(ft.per_sample_grads(loss_fn, params, batch, method="layers"))
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-14)
    assert not grouped_calls
