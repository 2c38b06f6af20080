"""Review of the per-sample functions under an outer ``torch.func`` transform.

* Under ``torch.func.grad``/``jvp`` the per-example losses (``per_sample_value_and_grads``,
  ``clipped_grad_sum(...).loss_sum``) are results like the gradients: differentiated, not
  detached to a silent zero. References: per-example autograd in float64.
* A recurrent model under an outer transform: the error does not advise ``method='loop'``,
  which the transform refuses too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft

N, D = 5, 3


def _data(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(2, D, generator=gen, dtype=torch.float64)
    batch = {
        "x": torch.randn(N, D, generator=gen, dtype=torch.float64),
        "y": torch.randn(N, generator=gen, dtype=torch.float64),
    }
    return w, batch


def _loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    # A linear call: outside a transform "auto" would take the layer rules.
    return ((torch.tanh(F.linear(b["x"], p["w"])).sum(-1) - b["y"]) ** 2).mean()


def _naive_losses(w: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's loss on a batch of one, by plain autograd (differentiable)."""
    return torch.stack(
        [_loss({"w": w}, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(N)]
    )


def _losses(w: torch.Tensor, batch: dict[str, torch.Tensor], **kw: object) -> torch.Tensor:
    return ft.per_sample_value_and_grads(_loss, {"w": w}, batch, **kw)[0]


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    chunk_size=st.sampled_from([None, 1, 2, 4]),
    method=st.sampled_from(["auto", "vmap"]),
)
def test_per_example_losses_are_differentiated_under_torch_func_grad(seed, chunk_size, method):
    w, batch = _data(seed)
    kw = {"chunk_size": chunk_size, "method": method}
    got = torch.func.grad(lambda w: (_losses(w, batch, **kw) ** 2).sum())(w)
    w_ = w.clone().requires_grad_()
    (want,) = torch.autograd.grad((_naive_losses(w_, batch) ** 2).sum(), w_)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# Forward-mode AD loads decompositions through torch.jit.script, deprecated in torch 2.13.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_per_example_losses_are_differentiated_under_jvp_and_hessian():
    w, batch = _data(1)
    tangent = torch.randn(w.shape, generator=torch.Generator().manual_seed(2), dtype=w.dtype)
    _, got = torch.func.jvp(lambda w: _losses(w, batch, chunk_size=2), (w,), (tangent,))
    jacobian = torch.autograd.functional.jacobian(lambda w: _naive_losses(w, batch), w)
    want = torch.einsum("nij,ij->n", jacobian, tangent)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    got_h = torch.func.hessian(lambda w: (_losses(w, batch, chunk_size=3) ** 2).sum())(w)
    want_h = torch.autograd.functional.hessian(lambda w: (_naive_losses(w, batch) ** 2).sum(), w)
    torch.testing.assert_close(got_h, want_h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_clipped_grad_sum_loss_sum_is_differentiated_under_torch_func_grad(chunk_size):
    w, batch = _data(3)

    def loss_sum(w: torch.Tensor) -> torch.Tensor:
        return ft.clipped_grad_sum(_loss, {"w": w}, batch, 0.5, chunk_size=chunk_size).loss_sum

    got = torch.func.grad(loss_sum)(w)
    w_ = w.clone().requires_grad_()
    (want,) = torch.autograd.grad(_naive_losses(w_, batch).sum(), w_)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_losses_stay_detached_outside_torch_func():
    """The autograd path still gives values without a graph (nothing kept alive)."""
    w, batch = _data()
    w = w.clone().requires_grad_()
    for method in ("auto", "vmap", "layers", "loop"):
        losses, grads = ft.per_sample_value_and_grads(_loss, {"w": w}, batch, method=method)
        assert not losses.requires_grad and not grads["w"].requires_grad, method
        torch.testing.assert_close(losses, _naive_losses(w, batch).detach(), rtol=1e-12, atol=0)


def test_recurrent_model_under_an_outer_vmap_names_no_circular_way_out():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(D, 4, batch_first=True).double()
    params = {k: v.detach() for k, v in lstm.named_parameters()}
    members = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    batch = torch.randn(3, 5, D, dtype=torch.float64)

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out, _ = torch.func.functional_call(lstm, p, (x,))
        return out[:, -1].square().mean()

    for method in ("auto", "vmap"):
        with pytest.raises(RuntimeError, match="recurrent module") as info:
            torch.func.vmap(lambda p: ft.per_sample_grads(loss_fn, p, batch, method=method))(
                members
            )
        message = str(info.value)
        # method='loop' is refused under the transform: the error must not send the user there.
        assert "Use method='loop'" not in message
        assert "outside the transform" in message
    with pytest.raises(ValueError, match=r"method='loop' cannot run under a torch\.func"):
        torch.func.vmap(lambda p: ft.per_sample_grads(loss_fn, p, batch, method="loop"))(members)
