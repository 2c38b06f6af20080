"""Ghost norms of half-precision gradients: squared norms above 65504 must clip, not drop."""

import pytest
import torch

import functrain as ft


def _problem(dtype):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 8, generator=g).to(dtype)}
    batch = (torch.randn(3, 8, generator=g) * 30).to(dtype)

    def loss(p, b):  # per-example gradient norms of about 7e3 to 3e4: squares overflow float16
        return (torch.nn.functional.linear(b, p["w"]) * 100).sum()

    return params, batch, loss


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layers_clipped_sum_and_norms_match_float32_by_hand(dtype):
    params, batch, loss = _problem(dtype)
    wide = {"w": params["w"].float()}
    grads = [torch.func.grad(loss)(wide, batch[i : i + 1].float())["w"] for i in range(3)]
    norms = torch.stack([g.norm() for g in grads])
    clipped = sum(g * min(1.0, 1.0 / float(n)) for g, n in zip(grads, norms))
    out = ft.clipped_grad_sum(loss, params, batch, 1.0, method="layers")
    assert out.grad_sum["w"].dtype == dtype
    torch.testing.assert_close(out.grad_sum["w"].float(), clipped, rtol=2e-2, atol=2e-2)
    assert int(out.num_clipped) == 3
    got = ft.per_sample_grad_norms(loss, params, batch, method="layers")
    assert got.global_norm.dtype == dtype and got.leaf_norms["w"].dtype == dtype
    torch.testing.assert_close(got.global_norm.float(), norms, rtol=1e-2, atol=0)
