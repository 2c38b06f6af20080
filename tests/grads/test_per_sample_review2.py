"""Second review of ``per_sample_grads``: the ``LossSum`` protocol shared with the train step.

References are float64 loops that differentiate each example alone with
``torch.autograd.grad`` and divide its summed loss by its own count by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft

TOL = {"rtol": 0.0, "atol": 1e-12}


def _padded_problem(counts: list[int]) -> tuple[Any, Any, Any]:
    """A masked token loss: example ``i`` counts ``counts[i]`` tokens (0: padding only)."""
    g = torch.Generator().manual_seed(len(counts))
    params = {"w": torch.randn(3, dtype=torch.float64, generator=g)}
    x = torch.randn(len(counts), 4, 3, dtype=torch.float64, generator=g)
    mask = (torch.arange(4) < torch.tensor(counts)[:, None]).to(torch.float64)

    def loss_fn(p: Any, b: Any) -> ft.LossSum:
        # The padded tokens are multiplied out, so their 1 / count factor reaches the backward.
        per_token = (b["x"] @ p["w"] - 1.0).square()
        return ft.LossSum((per_token * b["mask"]).sum(), b["mask"].sum())

    return loss_fn, params, {"x": x, "mask": mask}


def _naive(counts: list[int], params: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``(loss, grad)``: ``Σ masked / count``, and 0 for an example of no token."""
    losses, grads = [], []
    for i, count in enumerate(counts):
        w = params["w"].detach().clone().requires_grad_(True)
        total = (((batch["x"][i] @ w - 1.0).square()) * batch["mask"][i]).sum()
        if count == 0:
            losses.append(torch.zeros((), dtype=torch.float64))
            grads.append(torch.zeros_like(w))
            continue
        loss = total / count
        (grad,) = torch.autograd.grad(loss, w)
        losses.append(loss.detach())
        grads.append(grad)
    return torch.stack(losses), torch.stack(grads)


@pytest.mark.parametrize("method", ["vmap", "layers"])
def test_an_example_of_padding_only_has_zero_gradient_not_nan(method):
    """Old code: ``total / 0`` gave the padded example a NaN loss and gradient, and the NaN
    poisoned ``clipped_grad_sum`` (the DP sum of the whole batch)."""
    counts = [4, 0, 2]
    loss_fn, params, batch = _padded_problem(counts)
    ref_losses, ref_grads = _naive(counts, params, batch)
    if method == "layers":  # the layer rules need a linear call: same maths, a (1, 3) weight

        def loss_fn(p: Any, b: Any) -> ft.LossSum:
            per_token = (torch.nn.functional.linear(b["x"], p["w"])[..., 0] - 1.0).square()
            return ft.LossSum((per_token * b["mask"]).sum(), b["mask"].sum())

        params = {"w": params["w"][None]}
        ref_grads = ref_grads[:, None]
    losses, grads = ft.per_sample_value_and_grads(loss_fn, params, batch, method=method)
    torch.testing.assert_close(losses, ref_losses, **TOL)
    torch.testing.assert_close(grads["w"], ref_grads, **TOL)
    clipped = ft.clipped_grad_sum(loss_fn, params, batch, 1.0, method=method)
    flat = ref_grads.flatten(1)
    factor = torch.clamp(1.0 / flat.norm(dim=1), max=1.0).nan_to_num(1.0)  # 1 for a zero grad
    ref_sum = (ref_grads * factor.view(-1, *[1] * (ref_grads.dim() - 1))).sum(0)
    torch.testing.assert_close(clipped.grad_sum["w"], ref_sum, **TOL)


def test_a_python_int_count_of_zero():
    params = {"w": torch.ones(2, dtype=torch.float64)}
    batch = torch.ones(3, 2, dtype=torch.float64)
    losses, grads = ft.per_sample_value_and_grads(
        lambda p, b: ft.LossSum((b @ p["w"]).sum() * 0.0, 0), params, batch
    )
    assert torch.equal(losses, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(grads["w"], torch.zeros(3, 2, dtype=torch.float64))


def test_bfloat16_count_is_not_rounded():
    """Old code: ``bf16_total / count`` cast the count 257 to bfloat16 (256): the loss and
    gradient ``258 / 257`` (1.0 in bfloat16) came back as ``258 / 256`` = 1.0078."""
    params = {"w": torch.ones(1, dtype=torch.bfloat16)}
    batch = torch.ones(2, 1, dtype=torch.bfloat16)

    def loss_fn(p: Any, b: Any) -> ft.LossSum:
        return ft.LossSum((b * p["w"]).sum() * 258, torch.tensor(257))

    losses, grads = ft.per_sample_value_and_grads(loss_fn, params, batch)
    expected = torch.tensor(258 / 257, dtype=torch.float64).to(torch.bfloat16)
    assert losses.dtype == grads["w"].dtype == torch.bfloat16
    assert torch.equal(losses, expected.expand(2))
    assert torch.equal(grads["w"], expected.expand(2, 1))


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(0, 4), min_size=1, max_size=7),
    chunk_size=st.one_of(st.none(), st.integers(1, 9)),
)
def test_loss_sum_per_example_against_a_naive_loop(counts, chunk_size):
    """Any counts (zeros included), any chunk size (dividing the batch or not, larger than
    it): each example's loss is its own ``total / count``, to 1e-12 in float64."""
    loss_fn, params, batch = _padded_problem(counts)
    ref_losses, ref_grads = _naive(counts, params, batch)
    wrapped = lambda p, b: ft.LossOutput(loss_fn(p, b), aux={"n": b["mask"].sum()})  # noqa: E731
    (losses, aux), grads = ft.per_sample_value_and_grads(
        wrapped, params, batch, chunk_size=chunk_size, has_aux=True
    )
    torch.testing.assert_close(losses, ref_losses, **TOL)
    torch.testing.assert_close(grads["w"], ref_grads, **TOL)
    assert aux["n"].tolist() == [float(c) for c in counts]
    assert not grads["w"].requires_grad and not losses.requires_grad


def test_parameters_straight_from_a_module():
    """``nn.Parameter`` leaves (requires_grad) give plain tensors without autograd history,
    of the parameters' dtype and shape, matching the naive loop."""
    model = torch.nn.Linear(3, 2).double()
    params = dict(model.named_parameters())
    x = torch.randn(5, 3, dtype=torch.float64)
    targets = torch.randint(0, 2, (5,))

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        logits = torch.func.functional_call(model, p, (b[0],))
        return torch.nn.functional.cross_entropy(logits, b[1])

    got = ft.per_sample_grads(loss_fn, params, (x, targets), chunk_size=2)
    for name, param in params.items():
        assert got[name].shape == (5, *param.shape)
        assert got[name].dtype == param.dtype and not got[name].requires_grad
        for i in range(5):
            (ref,) = torch.autograd.grad(loss_fn(params, (x[i : i + 1], targets[i : i + 1])), param)
            torch.testing.assert_close(got[name][i], ref, **TOL)
    assert model.weight.grad is None  # nothing accumulated into the module
