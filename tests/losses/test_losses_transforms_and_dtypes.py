"""Every loss under torch.func (grad, vmap), torch.compile without graph breaks (no host
reads), in float16/bfloat16, and documented; ft.losses covers optax.losses."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from _loss_cases import CASES

import functrain as ft

NAMES = sorted(CASES)
D = torch.float64


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def test_every_public_loss_has_a_case():
    assert sorted(ft.losses.__all__) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_vmap_of_grad_gives_per_call_gradients(name):
    calls = [CASES[name](seed, D) for seed in range(3)]
    fn = calls[0][0]
    floats = [i for i, a in enumerate(calls[0][1]) if a.dtype.is_floating_point]

    def total(*args):
        return sum(o.sum() for o in _outputs(fn(*args)))

    stacked = [torch.stack([c[1][i] for c in calls]) for i in range(len(calls[0][1]))]
    # values: vmap over a new leading axis equals one call per slice
    batched = _outputs(torch.func.vmap(fn)(*stacked))
    for k, call in enumerate(calls):
        for got, want in zip(batched, _outputs(fn(*call[1]))):
            torch.testing.assert_close(got[k], want, rtol=1e-12, atol=1e-12)
    # per-call gradients with torch.func against autograd, call by call
    grads = torch.func.vmap(torch.func.grad(total, argnums=tuple(floats)))(*stacked)
    for k, call in enumerate(calls):
        args = [a.clone().requires_grad_(a.dtype.is_floating_point) for a in call[1]]
        want = torch.autograd.grad(
            total(*args), [args[i] for i in floats], allow_unused=True, materialize_grads=True
        )
        for got, w in zip(grads, want):
            torch.testing.assert_close(got[k], w, rtol=1e-10, atol=1e-12)
            assert torch.isfinite(got[k]).all()


@pytest.mark.parametrize("name", NAMES)
def test_compiles_without_graph_breaks(name):
    # fullgraph=True fails on any host read (.item(), Python branches on values) or break.
    torch._dynamo.reset()
    fn, args = CASES[name](0, torch.float32)
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    for got, want in zip(_outputs(compiled(*args)), _outputs(fn(*args))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_keeps_the_dtype_and_is_accurate(name, dtype):
    fn, args = CASES[name](0, dtype)
    got = _outputs(fn(*args))
    # the float64 value of the same (rounded) inputs
    want = _outputs(fn(*(a.double() if a.dtype.is_floating_point else a for a in args)))
    ctc = name.startswith("ctc_loss")  # float32 results (values near -1e5 overflow float16)
    for g, w in zip(got, want):
        assert g.dtype == (torch.float32 if ctc else dtype), name
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2)


def test_half_precision_cross_entropy_does_not_overflow():
    # exp(12) overflows float16: a naive softmax gives inf/NaN where these stay exact.
    x = torch.tensor([[12.0, -12.0, 0.0], [11.0, 11.0, 11.0]], dtype=torch.float16)
    got = ft.softmax_cross_entropy_with_integer_labels(x, torch.tensor([0, 2]))
    want = torch.nn.functional.cross_entropy(x.double(), torch.tensor([0, 2]), reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)
    got = ft.softmax_cross_entropy(x, torch.eye(3, dtype=torch.float16)[[0, 2]])
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", sorted(ft.losses.__all__))
def test_documented_with_formula_args_returns_and_example(name):
    doc = inspect.getdoc(getattr(ft.losses, name))
    for section in ("Args:", "Returns:", "Example:"):
        assert re.search(rf"^{section}\s*$", doc, re.MULTILINE), f"{name}: no {section}"
    assert ">>> " in doc
    assert ft.losses.__doc__ and "torch.nn.functional" in ft.losses.__doc__


def _on(device: str, args):
    return tuple(a.to(device) for a in args)


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_the_inputs_device_meta(name):
    # Meta tensors refuse to mix with CPU tensors of any size but 0-d: a constant built
    # without device=... (an arange, a one-hot, a mask) fails here.
    fn, args = CASES[name](0, torch.float32)
    cpu = _outputs(fn(*args))
    meta = _outputs(fn(*_on("meta", args)))
    assert [(m.device.type, m.shape, m.dtype) for m in meta] == [
        ("meta", c.shape, c.dtype) for c in cpu
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name):
    fn, args = CASES[name](0, D)
    for got, want in zip(_outputs(fn(*_on("cuda", args))), _outputs(fn(*args))):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
