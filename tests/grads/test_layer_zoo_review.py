"""A float64 sweep over a zoo of ``torch.nn`` layers: every route against a naive loop.

Each model of ``_layer_zoo_cases`` (linear, bilinear, convolutions of every geometry and padding
mode, transposed convolutions, embeddings and bags, every norm layer, attention, a transformer
layer, GRU/LSTM, PReLU, tied weights, a bare parameter) goes through ``per_sample_grads``,
``per_sample_grad_norms`` and ``clipped_grad_sum`` (clip norm at the median example norm, so
clipping is active) with ``method="auto"``, ``"layers"`` and ``"vmap"``, in chunks of 2 of a
batch of 5; ``"auto"`` of the reductions is also run with the layer rules tried first (as for
large models). The reference is one ``torch.autograd.grad`` per example on a batch of one. A
route that refuses a model must say so clearly, naming the layer and the parameter, never give
a wrong number; the parameters must come back unchanged.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _layer_zoo_cases import ROWS, Case, build_cases, naive
from torch import nn

import functrain as ft
from functrain.grads import _layer_dispatch

CASES = build_cases()
TOL = {"rtol": 1e-10, "atol": 1e-10}
CHUNK = 2  # does not divide the batch of 5
REDUCTIONS = ("grads", "norms", "clipped")


@contextlib.contextmanager
def _torch_warnings(case: Case) -> Iterator[None]:
    """Silences the one warning of PyTorch's own a case triggers (vmap's slow fallback)."""
    with warnings.catch_warnings():
        if case.ignore is not None:
            warnings.filterwarnings("ignore", case.ignore)
        yield


def _expected_route(case: Case, method: str, reduction: str) -> str:
    """``"layers"`` or ``"vmap"``: the route whose outcome ``method`` must give."""
    if method in ("layers", "vmap"):
        return method
    if case.layers in ("gru", "lstm"):  # fused recurrent kernels: "auto" loops over examples
        return "loop"
    # "auto" of a reduction on a small model is vmap; "auto-ghost" tries the rules first.
    if method == "auto" and reduction != "grads":
        return "vmap"
    return "layers" if case.layers is None or case.fatal else "vmap"


def _run(case: Case, method: str, reduction: str, params: Any, clip: float) -> Any:
    kw: dict[str, Any] = {"chunk_size": CHUNK, "method": method.removesuffix("-ghost")}
    if case.buffers is not None:
        kw["buffers"] = case.buffers
    with _torch_warnings(case):
        if reduction == "grads":
            return ft.per_sample_grads(case.loss_fn, params, case.batch, **kw)
        if reduction == "norms":
            return ft.per_sample_grad_norms(case.loss_fn, params, case.batch, **kw)
        return ft.clipped_grad_sum(case.loss_fn, params, case.batch, clip, **kw)


# "auto-ghost": "auto" of a reduction with the rules tried first, as for a large model
# (per_sample_grads' "auto" always tries them first).
ROUTES = [
    (method, reduction)
    for method in ("auto", "auto-ghost", "layers", "vmap")
    for reduction in REDUCTIONS
    if (method, reduction) != ("auto-ghost", "grads")
]


@pytest.mark.parametrize(("method", "reduction"), ROUTES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_zoo_matches_a_naive_loop_or_refuses_clearly(
    name: str, method: str, reduction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if method == "auto-ghost":
        monkeypatch.setattr(_layer_dispatch, "GHOST_BYTES", 0)
    case = CASES[name]()
    original = {k: v.clone() for k, v in case.params.items()}
    params = {k: v.clone() for k, v in case.params.items()}
    route = _expected_route(case, method, reduction)
    refusal = {"layers": case.layers, "vmap": case.vmap}.get(route)
    if refusal is not None:
        with pytest.raises((ValueError, RuntimeError)) as info:
            _run(case, method, reduction, params, 1.0)
        message = str(info.value)
        assert refusal in message, message
        if route == "layers":  # a ValueError naming the parameter
            assert isinstance(info.value, ValueError)
            assert re.search(r"params\['[^']+'\] is used by", message), message
        _assert_unchanged(params, original)
        return
    with _torch_warnings(case):
        grads, losses = naive(case)
    norms = torch.cat([g.reshape(g.shape[0], -1) for g in grads], 1).norm(dim=1)
    clip = _clip_between(norms)
    out = _run(case, method, reduction, params, clip)
    _assert_unchanged(params, original)
    if reduction == "grads":
        for key, want in zip(case.params, grads):
            torch.testing.assert_close(out[key], want, **TOL)
    elif reduction == "norms":
        torch.testing.assert_close(out.global_norm, norms, **TOL)
        for key, want in zip(case.params, grads):
            torch.testing.assert_close(out.leaf_norms[key], want.flatten(1).norm(dim=1), **TOL)
    else:
        factors = (clip / norms).clamp(max=1.0)
        for key, want in zip(case.params, grads):
            torch.testing.assert_close(out.grad_sum[key], torch.tensordot(factors, want, 1), **TOL)
        assert int(out.num_clipped) == int((norms > clip).sum()) > 0
        torch.testing.assert_close(out.loss_sum, losses.sum(), **TOL)
        assert out.count == len(norms)


def _clip_between(norms: torch.Tensor) -> float:
    """A clip norm strictly between two example norms: some examples clipped, some not (half
    the norm for a batch of one); never at a norm, where rounding decides."""
    s = norms.sort().values
    return float(s[0] / 2 if len(s) == 1 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)


def _assert_unchanged(params: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    for key, value in original.items():
        assert torch.equal(params[key], value), f"params[{key!r}] was changed in place"


# --- Bugs found by the sweep (fixed) -------------------------------------------------------


def test_embedding_max_norm_refusal_without_warnings_as_errors() -> None:
    """vmap failed on ``embedding_renorm_`` with an error naming only tensor sizes (after a
    warning); with the warning shown, not raised, the clear error still comes."""
    case = CASES["embedding-max-norm"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"max_norm .*renormalizes the weight in place"):
            ft.per_sample_grads(case.loss_fn, case.params, case.batch, method="vmap")


def test_embedding_max_norm_with_shared_indices_leaves_params_alone() -> None:
    """Positions looked up by every example: ``"auto"`` fell back to vmap, which renormalized
    the caller's parameters in place."""
    weight = 3 * torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    before = weight.clone()
    positions = torch.arange(3)
    x = torch.randn(4, 3, 3, dtype=torch.float64)

    def loss_fn(p: Any, b: torch.Tensor) -> torch.Tensor:
        return (F.embedding(positions, p["e"], max_norm=1.0) * b).sum()

    for method in ("auto", "layers"):
        with pytest.raises(ValueError, match=r"params\['e'\] is used by embedding with max_norm"):
            ft.per_sample_grads(loss_fn, {"e": weight}, x, method=method)
    assert torch.equal(weight, before)


def test_sparse_embedding_warning_as_error_becomes_the_clear_error() -> None:
    """Under warnings-as-errors vmap's warning about sparse tensors came first, unexplained."""
    case = CASES["embedding-sparse"]()
    with pytest.raises(ValueError, match="sparse=True"):
        ft.per_sample_grads(case.loss_fn, case.params, case.batch, method="vmap")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="sparse=True"):
            ft.per_sample_grads(case.loss_fn, case.params, case.batch, method="vmap")


@pytest.mark.parametrize("module", [nn.GRU(3, 2), nn.LSTMCell(3, 2), nn.RNN(3, 2)])
def test_recurrent_refusal_does_not_send_the_user_to_vmap(module: nn.Module) -> None:
    """``"layers"`` said "use method='vmap'", which fails on the same kernels."""
    module = module.double()
    params = {k: v.detach() for k, v in module.named_parameters()}
    x = torch.randn(ROWS, 3, dtype=torch.float64)

    def loss_fn(p: Any, b: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(module, p, (b,))
        return (out[0] if isinstance(out, tuple) else out).square().sum()

    with pytest.raises(ValueError, match="fused recurrent kernel") as info:
        ft.per_sample_grads(loss_fn, params, x, method="layers")
    assert "use method='vmap'" not in str(info.value)
    assert "params['weight_ih" in str(info.value)


W = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
W2 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
X = torch.randn(ROWS, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def _penalty_grad(p: Any, b: torch.Tensor) -> torch.Tensor:
    f = lambda z: torch.tanh(F.linear(z, p["w"])).sum()  # noqa: E731
    return f(b) + torch.func.grad(f)(b).square().sum()


def _penalty_vjp(p: Any, b: torch.Tensor) -> torch.Tensor:
    f = lambda z: torch.tanh(F.linear(z, p["w"])).sum()  # noqa: E731
    out, vjp = torch.func.vjp(f, b)
    return out + vjp(torch.ones_like(out))[0].square().sum()


def _penalty_jvp(p: Any, b: torch.Tensor) -> torch.Tensor:
    f = lambda z: torch.tanh(F.layer_norm(F.linear(z, p["w"]), (3,)))  # noqa: E731
    out, tangent = torch.func.jvp(f, (b,), (torch.ones_like(b),))
    return out.sum() + tangent.square().sum()


def _penalty_autograd(p: Any, b: torch.Tensor) -> torch.Tensor:
    h = F.linear(b, p["w"])
    out = F.linear(torch.tanh(h), p["w2"]).sum()
    (gh,) = torch.autograd.grad(out, h, create_graph=True)
    return out + gh.square().sum()


def _param_free_inner_grad(p: Any, b: torch.Tensor) -> torch.Tensor:
    z = torch.func.grad(lambda t: t.sin().square().sum())(b)
    return torch.tanh(F.linear(z, p["w"])).sum()


PENALTIES = {
    "func-grad": (_penalty_grad, r"params\['w'\] is used by linear inside a torch.func.grad"),
    "func-vjp": (_penalty_vjp, r"params\['w'\] is used by linear inside a torch.func.grad"),
    "func-jvp": (_penalty_jvp, r"params\['w'\] is used by linear inside a torch.func.grad"),
    "autograd-grad": (_penalty_autograd, r"loss_fn calls torch.autograd.grad"),
    "param-free-inner-grad": (_param_free_inner_grad, None),
}


# Forward-mode AD loads decompositions through torch.jit.script, deprecated in torch 2.13.
_JIT = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.mark.parametrize(
    "name", [pytest.param(k, marks=[_JIT] if "jvp" in k else []) for k in sorted(PENALTIES)]
)
def test_gradients_inside_loss_fn(name: str) -> None:
    """A gradient penalty (loss_fn's own torch.func.grad / vjp / jvp or torch.autograd.grad
    over the layers): ``"auto"`` crashed in torch.func's plumbing ("your tensor may have
    escaped", "element 0 of tensors does not require grad", a missing jvp) instead of using
    vmap, which handles it; ``"layers"`` now refuses clearly."""
    loss_fn, refusal = PENALTIES[name]
    params = {"w": W, "w2": W2}
    grads, _ = naive(Case(loss_fn, params, X))
    for method in ("auto", "vmap") if refusal else ("auto", "vmap", "layers"):
        out = ft.per_sample_grads(loss_fn, params, X, method=method)
        for key, want in zip(params, grads):
            torch.testing.assert_close(out[key], want, **TOL)
        clip = 0.5 * float(torch.cat([g.flatten(1) for g in grads], 1).norm(dim=1).min())
        summed = ft.clipped_grad_sum(loss_fn, params, X, clip, method=method)
        assert int(summed.num_clipped) == ROWS
    if refusal is not None:
        for run in (
            lambda: ft.per_sample_grads(loss_fn, params, X, method="layers"),
            lambda: ft.per_sample_grad_norms(loss_fn, params, X, method="layers"),
        ):
            with pytest.raises(ValueError, match=refusal):
                run()
