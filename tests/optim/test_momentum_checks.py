"""Negative momentum is refused, naming the argument, as ``torch.optim.SGD`` refuses it."""

import pytest
import torch

import functrain as ft


def test_torch_refuses_negative_momentum_too():
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=-0.9)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda m: ft.sgd(0.1, momentum=m), "momentum"),
        (lambda m: ft.rmsprop(0.1, momentum=m), "momentum"),
        (lambda m: ft.lars(0.1, momentum=m), "momentum"),
        (lambda m: ft.trace(m), "decay"),
    ],
)
def test_negative_momentum_is_refused_naming_it(make, name):
    with pytest.raises(ValueError, match=f"{name} must be >= 0"):
        make(-0.5)
    make(0.0)  # no momentum at all is fine


def test_zero_momentum_is_plain_sgd():
    params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    grads = {"w": torch.tensor([0.5, 0.25], dtype=torch.float64)}
    tx = ft.sgd(0.1, momentum=0.0)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        torch.testing.assert_close(updates["w"], -0.1 * grads["w"], rtol=0, atol=0)
