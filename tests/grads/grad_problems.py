"""Small float64 models for per-sample gradient tests, and a naive per-example reference.

A module of its own (not ``conftest``) so that test files can import it by a unique name even
when several test directories are collected in one run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from functrain import tree

Problem = tuple[Callable[..., Any], Any, Any]


def naive_per_sample(loss_fn: Callable[..., Any], params: Any, batch: Any, **extra: Any) -> Any:
    """One autograd call per example on a batch of one, stacked: the honest reference.

    ``ft.LossSum`` counts as its own mean and ``ft.LossOutput`` as its loss, as in
    ``per_sample_grads``; parameters the loss does not use get zeros, as ``torch.func.grad``.
    """
    from functrain.train.loss import LossOutput, LossSum

    leaves, spec = tree.flatten(params)
    n = tree.leaves(batch)[0].shape[0]
    per_example = []
    for i in range(n):
        example = tree.map(lambda x, i=i: x[i : i + 1], batch)
        p = [x.detach().clone().requires_grad_(True) for x in leaves]
        loss = loss_fn(tree.unflatten(spec, p), example, **extra)
        if isinstance(loss, LossOutput):
            loss = loss.loss
        if isinstance(loss, LossSum):
            loss = loss.total / loss.count
        grads = torch.autograd.grad(loss, p, allow_unused=True) if loss.requires_grad else None
        grads = grads or [None] * len(p)
        per_example.append([torch.zeros_like(q) if g is None else g for g, q in zip(grads, p)])
    return tree.unflatten(spec, [torch.stack(gs) for gs in zip(*per_example)])


def _module_problem(model: torch.nn.Module, batch: Any, loss: Callable[..., Any]) -> Problem:
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return loss(torch.func.functional_call(model, p, (b["x"],)), b["y"])

    return loss_fn, params, batch


def mlp_problem(n: int = 7) -> Problem:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    batch = {
        "x": torch.randn(n, 5, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (n,), generator=g),
    }
    return _module_problem(model, batch, F.cross_entropy)


def cnn_problem(n: int = 6) -> Problem:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    batch = {
        "x": torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 2, (n,), generator=g),
    }
    return _module_problem(model, batch, F.cross_entropy)


def tied_problem(n: int = 5) -> Problem:
    """Embedding and output projection share one matrix: its gradient has two terms."""
    g = torch.Generator().manual_seed(2)
    vocab, dim, seq = 7, 4, 3
    params = {
        "emb": torch.randn(vocab, dim, generator=g, dtype=torch.float64),
        "w": torch.randn(dim, dim, generator=g, dtype=torch.float64) / 2,
    }
    batch = {
        "x": torch.randint(0, vocab, (n, seq), generator=g),
        "y": torch.randint(0, vocab, (n, seq), generator=g),
    }

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        h = torch.tanh(p["emb"][b["x"]] @ p["w"])
        logits = h @ p["emb"].T
        return F.cross_entropy(logits.reshape(-1, vocab), b["y"].reshape(-1))

    return loss_fn, params, batch


def transformer_problem(n: int = 4) -> Problem:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    layer = torch.nn.TransformerEncoderLayer(
        d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
    ).eval()
    batch = {
        "x": torch.randn(n, 5, 8, generator=g, dtype=torch.float64),
        "y": torch.randn(n, 8, generator=g, dtype=torch.float64),
    }
    loss_fn, params, batch = _module_problem(
        layer, batch, lambda out, y: F.mse_loss(out.mean(1), y)
    )

    def math_attention_loss(p: Any, b: Any) -> torch.Tensor:
        # vmap has no CPU batching rule for the fused attention kernel (it warns and loops);
        # the math backend is made of batchable ops.
        with sdpa_kernel(SDPBackend.MATH):
            return loss_fn(p, b)

    return math_attention_loss, params, batch


def lm_problem(n: int = 5) -> Problem:
    """Embeddings (one with ``padding_idx``, one fed positions shared by every example), layer
    norms, a 3-D linear input and an output layer tied to the token embedding."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    vocab, dim, seq = 9, 6, 4
    tok = torch.nn.Embedding(vocab, dim, padding_idx=0).double()
    pos = torch.nn.Embedding(seq, dim).double()
    norm = torch.nn.LayerNorm(dim).double()
    norm_no_bias = torch.nn.LayerNorm(dim, bias=False).double()
    fc = torch.nn.Linear(dim, dim).double()
    params = {
        "tok": tok.weight.detach(),
        "pos": pos.weight.detach(),
        "norm.weight": norm.weight.detach() + 0.1,
        "norm.bias": norm.bias.detach() + 0.1,
        "norm2.weight": norm_no_bias.weight.detach() - 0.2,
        "fc.weight": fc.weight.detach(),
        "fc.bias": fc.bias.detach(),
    }
    x = torch.randint(0, vocab, (n, seq), generator=g)
    x[0, 1] = x[0, 2] = 0  # padding tokens, and a token repeated within an example
    x[1, 0] = x[1, 3]
    batch = {"x": x, "y": torch.randint(0, vocab, (n, seq), generator=g)}

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        h = F.embedding(b["x"], p["tok"], padding_idx=0)
        h = h + F.embedding(torch.arange(seq, device=b["x"].device), p["pos"])
        h = F.layer_norm(h, (dim,), p["norm.weight"], p["norm.bias"])
        h = h + torch.tanh(F.linear(h, p["fc.weight"], p["fc.bias"]))
        h = F.layer_norm(h, (dim,), p["norm2.weight"])
        logits = F.linear(h, p["tok"])
        return F.cross_entropy(logits.reshape(-1, vocab), b["y"].reshape(-1))

    return loss_fn, params, batch


def conv_problem(n: int = 4) -> Problem:
    """Convolutions in 1, 2 and 3 dimensions with strides, dilation, ``"same"``/``"valid"`` and
    reflect padding, and a bias-free layer."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    nn = torch.nn
    conv1 = nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2).double()
    conv2 = nn.Conv2d(3, 4, (3, 5), padding="same", dilation=(1, 2)).double()
    conv2b = nn.Conv2d(4, 2, 2, stride=(2, 1), padding=(1, 0), bias=False).double()
    conv2c = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect").double()
    conv3 = nn.Conv3d(1, 2, 2, padding="valid").double()
    modules = {"c1": conv1, "c2": conv2, "c2b": conv2b, "c2c": conv2c, "c3": conv3}
    params = {f"{k}.{n_}": v.detach() for k, m in modules.items() for n_, v in m.named_parameters()}
    batch = {
        "x": torch.randn(n, 2, 9, generator=g, dtype=torch.float64),
        "v": torch.randn(n, 1, 3, 4, 4, generator=g, dtype=torch.float64),
    }

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        def call(name: str, x: torch.Tensor) -> torch.Tensor:
            sub = {k.split(".", 1)[1]: v for k, v in p.items() if k.split(".")[0] == name}
            return torch.func.functional_call(modules[name], sub, (x,))

        h = torch.tanh(call("c1", b["x"]))  # (N, 3, 4)
        h = torch.tanh(call("c2", h.unsqueeze(-1).expand(-1, -1, -1, 5)))  # (N, 4, 4, 5)
        h = torch.tanh(call("c2c", call("c2b", h)))
        return h.square().mean() + call("c3", b["v"]).sin().mean()

    return loss_fn, params, batch


PROBLEMS = {
    "mlp": mlp_problem,
    "cnn": cnn_problem,
    "tied": tied_problem,
    "transformer": transformer_problem,
    "lm": lm_problem,
    "conv": conv_problem,
}

# The problems whose every parameter is a weight or bias of a linear, convolution, layer-norm or
# embedding call: ``method="layers"`` applies to them.
LAYER_PROBLEMS = ("mlp", "cnn", "lm", "conv")


def naive_per_example(loss_fn: Callable[..., Any], params: dict, batch: dict, **kw: Any) -> tuple:
    """Per-example gradients (a list of dicts) and losses, one autograd pass per example."""
    from functrain.train.loss import LossSum

    grads, losses = [], []
    for i in range(tree.leaves(batch)[0].shape[0]):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        out = loss_fn(p, tree.map(lambda v, i=i: v[i : i + 1], batch), **kw)
        if isinstance(out, LossSum):  # the count held in at least float32, as documented
            wide = torch.promote_types(out.total.dtype, torch.float32)
            count = torch.as_tensor(out.count, dtype=wide)
            scale = 1 / count if float(count) else torch.zeros((), dtype=wide)
            out = (out.total.to(wide) * scale).to(out.total.dtype)
        g = torch.autograd.grad(out, list(p.values()), allow_unused=True, materialize_grads=True)
        grads.append(dict(zip(p, g)))
        losses.append(out.detach())
    return grads, torch.stack(losses)


def stacked_examples(grads: list[dict]) -> dict:
    """:func:`naive_per_example`'s gradients stacked per parameter (a leading batch dim)."""
    return {k: torch.stack([g[k] for g in grads]) for k in grads[0]}


def example_rows(grads: list[dict]) -> torch.Tensor:
    """One flat row per example: the rows of a Gram matrix or of per-example norms."""
    return torch.stack([torch.cat([v.flatten() for v in g.values()]) for g in grads])


def check_layer_reductions(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    chunk_size: int | None = None,
    every_used: bool = True,
    gram: bool = False,
    tol: dict[str, float] | None = None,
) -> None:
    """``method="layers"`` per-sample grads, norms, clipped sum (and with ``gram`` the Gram
    matrix) against :func:`naive_per_sample` (float64 problems)."""
    import functrain as ft  # the problems above need only functrain.tree
    from functrain.testing import assert_trees_all_close

    tol = tol or {"rtol": 1e-10, "atol": 1e-12}
    expected = naive_per_sample(loss_fn, params, batch)
    if every_used:  # (a drawn geometry may see only padding: a zero gradient)
        assert all(g.abs().sum() > 0 for g in tree.leaves(expected))
    kw = {"method": "layers", "chunk_size": chunk_size}
    got = ft.per_sample_grads(loss_fn, params, batch, **kw)
    assert_trees_all_close(got, expected, **tol)
    leaf_sq = tree.map(lambda g: g.reshape(g.shape[0], -1).square().sum(1), expected)
    norms = ft.per_sample_grad_norms(loss_fn, params, batch, **kw)
    assert_trees_all_close(norms.leaf_norms, tree.map(torch.sqrt, leaf_sq), **tol)
    total = torch.stack(tree.leaves(leaf_sq)).sum(0).sqrt()
    assert_trees_all_close(norms.global_norm, total, **tol)
    # Halfway across the widest gap between sorted norms: some examples clipped, none at the
    # boundary (two norms can tie, and rounding then decided the count). All equal: half the
    # smallest, so every example is clipped.
    ordered = total.sort().values
    gaps = ordered[1:] - ordered[:-1]
    if len(gaps) and float(gaps.max()) > 1e-6 * float(ordered[-1]):
        i = int(gaps.argmax())
        clip = float(ordered[i : i + 2].mean())
    else:
        clip = float(ordered[0]) / 2
    out = ft.clipped_grad_sum(loss_fn, params, batch, clip, **kw)
    factors = (clip / total).clamp(max=1.0)
    by_hand = tree.map(lambda g: torch.einsum("i,i...->...", factors, g), expected)
    assert_trees_all_close(out.grad_sum, by_hand, **tol)
    assert int(out.num_clipped) == int((total > clip).sum()) > 0
    if gram:
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in tree.leaves(expected)], 1)
        matrix = ft.per_sample_gram(loss_fn, params, batch, **kw)
        assert_trees_all_close(matrix, flat @ flat.T, **tol)


def spy_layer_route(monkeypatch: Any) -> list[str]:
    """Records ``"layers"`` each time the per-sample layer rules run (``_routes``' entry)."""
    from functrain.grads import _routes

    calls: list[str] = []
    original = _routes.per_sample_by_layers

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        calls.append("layers")
        return out

    monkeypatch.setattr(_routes, "per_sample_by_layers", spy)
    return calls
