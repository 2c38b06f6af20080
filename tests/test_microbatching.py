"""Tests of functrain.microbatching (optax.microbatching) against unbatched and looped references.

References: the unbatched function on the whole batch (float64), ``torch.func.grad`` of the
full-batch loss, per-example ``torch.autograd.grad`` loops, numpy's column-major reshape and
optax's documented strided split (micro-batch ``a`` holds rows ``a, a + n, ...``).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain.microbatching as mb
from functrain import testing
from functrain import tree as _tree
from functrain.tree import TreeMismatchError

AT = mb.AccumulationType
TYPES = [AT.SUM, AT.MEAN, AT.RUNNING_MEAN, AT.CONCAT]
B = 12


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rows(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ax_a: int, ax_b: int) -> dict:
    """Per-row outputs (batch axis first) of a batch (a, b) whose batch axes are ax_a, ax_b."""
    a, b = a.movedim(ax_a, 0), b.movedim(ax_b, 0)
    return {"p": (a * b[..., None]).sum(-1) * c, "q": (torch.sin(a).sum((1, 2)), b.exp())}


def _reduce(rows: dict, kind: AT) -> dict:
    """What fun returns for one (micro-)batch: the rows, or their sum / mean over the batch."""
    if kind is AT.CONCAT:
        return rows
    op = (lambda x: x.sum(0)) if kind is AT.SUM else (lambda x: x.mean(0))
    return {"p": op(rows["p"]), "q": tuple(op(x) for x in rows["q"])}


def _data(ax_a: int, ax_b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = _randn(B, 3, 2, seed=1).movedim(0, ax_a)
    b = _randn(B, 3, seed=2).movedim(0, ax_b)
    return _randn(seed=3), a, b


# (argnums, argnames, in_axes, how fun is called): every way optax lets batch args be named.
CALLS = {
    "positional": ((1, 2), (), 0, "pos"),
    "positional_axes": ((1, 2), (), (2, -1), "pos"),
    "reversed_argnums": ((2, 1), (), (1, 2), "pos"),
    "mixed": (1, "b", (1, 0), "kw_b"),
    "names": ((), ("b", "a"), (0, 1), "kw"),
}


@pytest.mark.parametrize("kind", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("size", [1, 3, 4, 12])
def test_microbatch_equals_unbatched(kind: AT, call: str, size: int) -> None:
    argnums, argnames, in_axes, how = CALLS[call]
    names = (argnums,) if isinstance(argnums, int) else argnums
    spec = dict(
        zip(
            [*names, *((argnames,) if isinstance(argnames, str) else argnames)],
            (in_axes,) * 3 if isinstance(in_axes, int) else in_axes,
        )
    )
    # positions 1 -> "a", 2 -> "b"
    ax_a, ax_b = spec.get(1, spec.get("a", 0)), spec.get(2, spec.get("b", 0))
    c, a, b = _data(ax_a, ax_b)

    def fun(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict:
        return _reduce(_rows(c, a, b, ax_a, ax_b), kind)

    f = mb.microbatch(fun, argnums, size, kind, argnames=argnames, in_axes=in_axes)
    if how == "pos":
        got = f(c, a, b)
    elif how == "kw_b":
        got = f(c, a, b=b)
    else:
        got = f(c, b=b, a=a)
    testing.assert_trees_all_close(got, fun(c, a, b), rtol=1e-12, atol=1e-12)


def test_nondecomposable_function_uses_strided_micro_batches() -> None:
    # optax's documented split: micro-batches [0, 2, 4] and [1, 3, 5].
    x = torch.arange(6.0, dtype=torch.float64)
    got = mb.microbatch(lambda x: x[:-1] @ x[1:], argnums=0, microbatch_size=3)(x)
    assert got.item() == 0 * 2 + 2 * 4 + 1 * 3 + 3 * 5


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_reshape_batch_axis_is_column_major_view(axis: int) -> None:
    ax = axis % 3
    x = _randn(12, 5, 4).movedim(0, ax)
    got = mb.reshape_batch_axis({"x": x}, 3, axis=axis)["x"]
    # Row a + n*b of the batch lands at [a, b]: numpy's column-major reshape of the row indices.
    index = np.arange(12).reshape(4, 3, order="F")
    expected = np.moveaxis(np.moveaxis(x.numpy(), ax, 0)[index], (0, 1), (ax, ax + 1))
    np.testing.assert_array_equal(got.numpy(), expected)
    assert got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_micro_batches_reach_fun_as_views() -> None:
    x = _randn(8, 3)
    seen = []

    def fun(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.untyped_storage().data_ptr())
        return x.sum()

    mb.microbatch(fun, 0, 2)(x)
    assert seen == [x.untyped_storage().data_ptr()] * 4


def test_pytree_of_accumulators_and_prefixes() -> None:
    c, a, b = _data(0, 0)

    def fun(c, a, b):
        rows = _rows(c, a, b, 0, 0)
        return {"cat": rows, "sum": _reduce(rows, AT.SUM), "mean": _reduce(rows, AT.MEAN)}

    acc = {"cat": AT.CONCAT, "sum": AT.SUM, "mean": {"p": AT.RUNNING_MEAN, "q": AT.MEAN}}
    got = mb.microbatch(fun, (1, 2), 4, acc)(c, a, b)
    testing.assert_trees_all_close(got, fun(c, a, b), rtol=1e-12, atol=1e-12)


def test_custom_accumulator_sees_first_output_and_composes() -> None:
    x = torch.tensor([1.0, 7.0, 2.0, 3.0, 9.0, 4.0], dtype=torch.float64)
    inits = []

    def init(v: torch.Tensor) -> torch.Tensor:
        inits.append(v.clone())
        return torch.full_like(v, -torch.inf)

    maximum = mb.Accumulator(
        init, lambda c, v, i: torch.maximum(c, v), lambda c: c, lambda v: v.amax(0)
    )
    got = mb.microbatch(lambda x: (x.max(), x.sum()), 0, 2, (maximum, AT.SUM))(x)
    assert got[0].item() == 9.0 and got[1].item() == x.sum().item()
    # The first micro-batch (rows 0 and 3, strided) reached init.
    assert inits[0].item() == 3.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32])
def test_dtype_kept(dtype: torch.dtype) -> None:
    x = torch.arange(8).to(dtype)
    assert mb.microbatch(lambda x: x.sum(0, dtype=x.dtype), 0, 2)(x).dtype == dtype
    assert mb.micro_vmap(lambda x: x * 2, microbatch_size=2, accumulator=AT.SUM)(x).dtype == dtype


def test_microbatch_size_none_returns_fun() -> None:
    fun = lambda x: x  # noqa: E731
    assert mb.microbatch(fun, 0, None) is fun


# ---------------------------------------------------------------- num_real_microbatches


@pytest.mark.parametrize("kind", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("real", [0, 1, 3, 4])
def test_num_real_microbatches_counts_only_real_ones(kind: AT, as_tensor: bool, real: int) -> None:
    size, n = 3, 4
    c, a, b = _data(0, 0)
    real_rows = torch.arange(B) % n < real  # micro-batch i holds rows i, i + n, ...
    if as_tensor:
        # Padded rows are NaN: their contributions must be dropped, not multiplied by 0.
        a = torch.where(real_rows[:, None, None], a, torch.nan)

    def fun(c, a, b):
        return _reduce(_rows(c, a, b, 0, 0), kind)

    k = torch.tensor(real) if as_tensor else real
    got = mb.microbatch(fun, (1, 2), size, kind, num_real_microbatches=k)(c, a, b)
    clean = a.nan_to_num(0.0)

    def rows_where(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return t * keep.reshape(-1, *[1] * (t.dim() - 1))

    if kind is AT.CONCAT:
        expected = _tree.map(lambda t: rows_where(t, real_rows), fun(c, clean, b))
    elif real == 0:
        expected = _tree.map(torch.zeros_like, _reduce(_rows(c, clean, b, 0, 0), AT.SUM))
    else:
        expected = fun(c, a[real_rows], b[real_rows])
        if kind is AT.MEAN:  # optax's MEAN divides by all n micro-batches
            expected = _tree.map(lambda t: t * real / n, expected)
    testing.assert_trees_all_close(got, expected, rtol=1e-12, atol=1e-12)


def test_tensor_num_real_microbatches_compiles_once() -> None:
    step = torch.compile(
        lambda x, k: mb.microbatch(lambda x: x.sum(0), 0, 2, num_real_microbatches=k)(x),
        fullgraph=True,
        backend="eager",
    )
    x = _randn(8, 3)
    with testing.count_compiles() as count:
        for k in range(5):
            got = step(x, torch.tensor(k))
            testing.assert_trees_all_close(got, x[torch.arange(8) % 4 < k].sum(0), atol=1e-12)
    assert count.compiles == 1


def test_compiled_sum_matches_eager() -> None:
    f = mb.microbatch(lambda w, x: ((x @ w) ** 2).sum(0), argnums=1, microbatch_size=4)
    w, x = _randn(3, 2), _randn(12, 3, seed=5)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(w, x)
    testing.assert_trees_all_close(got, ((x @ w) ** 2).sum(0), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- micro_vmap


@pytest.mark.parametrize("kind", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("size", [None, 1, 2, 8])
def test_micro_vmap_matches_vmap(kind: AT, size: int | None) -> None:
    x, w, y = _randn(3, 8, 5), _randn(5), _randn(8, 2, seed=4)

    def fun(x, w, *, y):
        return {"s": (x @ w).sum() * y, "v": x * w}

    full = torch.func.vmap(lambda x, w, y: fun(x, w, y=y), in_dims=(1, None, 0))(x, w, y)
    reduce = {AT.CONCAT: lambda t: t, AT.SUM: lambda t: t.sum(0)}.get(kind, lambda t: t.mean(0))
    got = mb.micro_vmap(fun, in_axes=(1, None), microbatch_size=size, accumulator=kind)(x, w, y=y)
    testing.assert_trees_all_close(
        got, {k: reduce(v) for k, v in full.items()}, rtol=1e-12, atol=1e-12
    )


def test_micro_vmap_uses_vmap_fn_and_rejects_out_axes() -> None:
    calls = []

    def vmap_fn(f, in_axes, out_axes):
        calls.append((in_axes, out_axes))
        return torch.func.vmap(f, in_axes, out_axes, chunk_size=1)

    x = _randn(6, 2)
    got = mb.micro_vmap(lambda x: x.sum(), microbatch_size=3, vmap_fn=vmap_fn)(x)
    testing.assert_trees_all_close(got, x.sum(1), atol=1e-12)
    assert calls == [((0,), 0)] * 2
    with pytest.raises(NotImplementedError, match="out_axis"):
        mb.micro_vmap(lambda x: x, out_axes=1)
    p = inspect.signature(mb.micro_vmap).parameters
    assert p["vmap_fn"].default is torch.func.vmap and p["accumulator"].default is AT.CONCAT
    assert inspect.signature(mb.micro_grad).parameters["accumulator"].default is AT.SUM


# ---------------------------------------------------------------- micro_grad


def _loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error; a bare example (x: (3,)) or a batch (x: (m, 3))."""
    return ((x @ params["w"] + params["b"] - y) ** 2).mean()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    size=st.integers(1, 4),
    kind=st.sampled_from([AT.SUM, AT.MEAN, AT.RUNNING_MEAN]),
    keep=st.booleans(),
    seed=st.integers(0, 100),
)
def test_micro_grad_equals_grad_of_full_batch_loss(n, size, kind, keep, seed) -> None:
    batch = n * size
    params = {"w": _randn(3, 2, seed=seed), "b": _randn(2, seed=seed + 1)}
    x, y = _randn(batch, 3, seed=seed + 2), _randn(batch, 2, seed=seed + 3)
    grads, out = mb.micro_grad(
        _loss, batch_argnums=(1, 2), keep_batch_dim=keep, microbatch_size=size, accumulator=kind
    )(params, x, y)
    scale = batch if kind is AT.SUM else 1  # the full-batch loss is a mean over examples
    expected = torch.func.grad(lambda p: scale * _loss(p, x, y))(params)
    testing.assert_trees_all_close(grads, expected, rtol=1e-10, atol=1e-12)
    per_example = torch.stack([_loss(params, x[j], y[j]) for j in range(batch)])
    testing.assert_trees_all_close(out.values, per_example, rtol=1e-12, atol=1e-14)
    assert out.metrics is None and out.aux is None


def _hand_per_example(params: dict, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Per-example gradients by torch.autograd, one example at a time (batch of one)."""
    out = []
    for j in range(x.shape[0]):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        g = torch.autograd.grad(_loss(leaves, x[j : j + 1], y[j : j + 1]), list(leaves.values()))
        out.append(dict(zip(leaves, g)))
    return out


def test_micro_grad_transform_fn_clips_per_example_and_metrics_fn() -> None:
    params = {"w": _randn(3, 2), "b": _randn(2, seed=1)}
    x, y = _randn(8, 3, seed=2), _randn(8, 2, seed=3)
    clip = 0.5

    def norm(g: dict) -> torch.Tensor:
        return torch.sqrt(sum((v**2).sum() for v in g.values()))

    def clip_fn(g: dict) -> dict:
        factor = torch.clamp(clip / norm(g), max=1.0)
        return {k: v * factor for k, v in g.items()}

    grads, out = mb.micro_grad(
        _loss, batch_argnums=(1, 2), microbatch_size=2, transform_fn=clip_fn, metrics_fn=norm
    )(params, x, y)
    hand = _hand_per_example(params, x, y)
    norms = torch.stack([torch.sqrt(sum((v**2).sum() for v in g.values())) for g in hand])
    expected = {
        k: sum(g[k] * min(1.0, clip / nrm.item()) for g, nrm in zip(hand, norms)) for k in params
    }
    assert (norms > clip).sum() >= 2  # the clipping does something
    testing.assert_trees_all_close(grads, expected, rtol=1e-10, atol=1e-12)
    testing.assert_trees_all_close(out.metrics, norms, rtol=1e-12)


def test_micro_grad_has_aux_and_kwargs() -> None:
    params = {"w": _randn(3, 2), "b": _randn(2, seed=1)}
    x, y, s = _randn(6, 3, seed=2), _randn(6, 2, seed=3), _randn(6, seed=4)

    def fun(params, x, y, *, s):
        pred = x @ params["w"] + params["b"]
        return _loss(params, x, y) * s.sum(), {"pred": pred, "nothing": None}

    grads, out = mb.micro_grad(fun, has_aux=True, batch_argnums=(1, 2), microbatch_size=3)(
        params, x, y, s=s
    )
    expected = torch.func.grad(lambda p: sum(_loss(p, x[j], y[j]) * s[j] for j in range(6)))(params)
    testing.assert_trees_all_close(grads, expected, rtol=1e-10, atol=1e-12)
    # keep_batch_dim: each example's pred is (1, 2); concatenated: (6, 1, 2).
    testing.assert_trees_all_close(out.aux["pred"], (x @ params["w"] + params["b"])[:, None])
    assert out.aux["nothing"] is None
    assert type(out).__name__ == "Aux" and out._fields == ("values", "metrics", "aux")


@pytest.mark.parametrize("as_tensor", [False, True])
def test_micro_grad_num_real_microbatches(as_tensor: bool) -> None:
    params = {"w": _randn(3, 2), "b": _randn(2, seed=1)}
    x, y = _randn(12, 3, seed=2), _randn(12, 2, seed=3)
    real = torch.arange(12) % 4 < 3  # 4 micro-batches of 3, 3 real
    k = torch.tensor(3) if as_tensor else 3
    grads, out = mb.micro_grad(
        _loss, batch_argnums=(1, 2), microbatch_size=3, num_real_microbatches=k
    )(params, x, y)
    expected = torch.func.grad(lambda p: 9 * _loss(p, x[real], y[real]))(params)
    testing.assert_trees_all_close(grads, expected, rtol=1e-10, atol=1e-12)
    per_example = torch.stack([_loss(params, x[j], y[j]) for j in range(12)])
    testing.assert_trees_all_close(out.values, per_example * real, rtol=1e-12)


def test_micro_grad_compiles_fullgraph() -> None:
    params = {"w": _randn(3, 2), "b": _randn(2, seed=1)}
    x, y = _randn(8, 3, seed=2), _randn(8, 2, seed=3)
    f = mb.micro_grad(_loss, batch_argnums=(1, 2), microbatch_size=4)
    got, _ = torch.compile(f, fullgraph=True, backend="eager")(params, x, y)
    testing.assert_trees_all_close(
        got, torch.func.grad(lambda p: 8 * _loss(p, x, y))(params), rtol=1e-10, atol=1e-12
    )


# ---------------------------------------------------------------- errors


def _never(*args, **kwargs):
    raise AssertionError("fun must not run when the input is rejected")


@pytest.mark.parametrize(
    ("build", "call", "error", "match"),
    [
        (
            dict(argnums=(0, 1), microbatch_size=3),
            ((_randn(10, 3), _randn(10)), {}),
            ValueError,
            r"batch_size=10 must be divisible by microbatch_size=3 \(args\[0\] has shape \(10, 3\)",
        ),
        (
            dict(argnums=(0, 1), microbatch_size=2),
            ((_randn(10, 3), {"z": _randn(8)}), {}),
            ValueError,
            r"args\[0\] has 10 along axis 0 \(shape \(10, 3\)\), args\[1\]\['z'\] has 8",
        ),
        (
            dict(argnums=0, microbatch_size=2, in_axes=2),
            ((_randn(4, 3),), {}),
            ValueError,
            r"args\[0\] has shape \(4, 3\): it has no axis 2",
        ),
        (
            dict(argnums=0, microbatch_size=2),
            (({"a": [1.0]},), {}),
            TypeError,
            r"args\[0\]\['a'\]\[0\] must be a tensor",
        ),
        (
            dict(argnums=(), argnames="b", microbatch_size=2),
            ((), {"a": _randn(4)}),
            ValueError,
            "argnames contains 'b'",
        ),
        (dict(argnums=3, microbatch_size=2), ((_randn(4),), {}), ValueError, "argnums contains 3"),
        (
            dict(argnums=0, microbatch_size=2, num_real_microbatches=3),
            ((_randn(4),), {}),
            ValueError,
            "num_real_microbatches=3 is more than the 2 micro-batches",
        ),
    ],
)
def test_bad_input_raises_before_fun_runs(build, call, error, match) -> None:
    f = mb.microbatch(_never, **build)
    with pytest.raises(error, match=match):
        f(*call[0], **call[1])


def test_bad_construction_arguments() -> None:
    with pytest.raises(ValueError, match="microbatch_size"):
        mb.microbatch(_never, 0, 0)
    with pytest.raises(ValueError, match="in_axes"):
        mb.microbatch(_never, (0, 1), 2, in_axes=(0,))
    with pytest.raises(TypeError, match="num_real_microbatches"):
        mb.microbatch(_never, 0, 2, num_real_microbatches=torch.tensor(1.0))
    with pytest.raises(TypeError, match="num_real_microbatches"):
        mb.microbatch(_never, 0, 2, num_real_microbatches=-1)


def test_accumulator_errors() -> None:
    x = torch.arange(4)
    with pytest.raises(ValueError, match="floating-point"):
        mb.microbatch(lambda x: x.sum(), 0, 2, AT.MEAN)(x)
    with pytest.raises(ValueError, match="Unknown accumulator"):
        mb.microbatch(lambda x: x.sum(), 0, 2, "sum")(x)
    with pytest.raises(TreeMismatchError, match="accumulator"):
        mb.microbatch(lambda x: {"a": x.sum()}, 0, 2, {"b": AT.SUM})(x)
    with pytest.raises(TypeError, match=r"has_aux=True"):
        mb.micro_grad(lambda w, x: (w * x).sum(), has_aux=True)(torch.ones(()), _randn(2))
    with pytest.raises(TypeError, match=r"aux\['n'\] must be a tensor"):
        mb.micro_grad(lambda w, x: ((w * x).sum(), {"n": 1.0}), has_aux=True)(
            torch.ones(()), _randn(2)
        )
