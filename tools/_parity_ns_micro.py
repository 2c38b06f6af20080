"""Cases of ``tools/optax_parity_namespaces.py`` for ``microbatching``: ``reshape_batch_axis``,
``microbatch``, ``micro_vmap``, ``micro_grad``, ``AccumulationType`` and ``Accumulator``."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax.microbatching as ox_mb
import torch
from _parity_ns_common import Case, both, rng, same, tree_err

import functrain.microbatching as ft_mb

NOT_COMPARED = {
    "microbatching (explicit sharding)": "optax's sharding-preserving reshapes have no "
    "functrain counterpart (one device; functrain loops in Python where optax uses "
    "lax.fori_loop): values compared on one CPU device",
}


def _lib(xp: Any) -> Any:
    return ft_mb if xp is torch else ox_mb


def _acc(xp: Any, spec: Any) -> Any:
    """An accumulator spec (a name, a tuple/dict of names, or "max") in either library."""
    lib = _lib(xp)
    if spec == "max":
        if xp is torch:
            init = lambda v: torch.full_like(v, -torch.inf)  # noqa: E731
        else:
            init = lambda v: jnp.full(v.shape, -jnp.inf, v.dtype)  # noqa: E731
        return lib.Accumulator(
            init=init,
            update=lambda c, v, i: xp.maximum(c, v),
            finalize=lambda c: c * 2,
            aggregate=lambda v: v.max(0),
        )
    if isinstance(spec, str):
        return lib.AccumulationType[spec]
    if isinstance(spec, dict):
        return {k: _acc(xp, v) for k, v in spec.items()}
    return tuple(_acc(xp, v) for v in spec)


def _reshape(shape: tuple[int, ...], size: int, axis: int) -> float:
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    xt, xj = both({"x": x, "y": [x * 2]})
    # optax's reshape uses x.shape[axis + 1:], so a negative axis is given to it as ndim + axis.
    want = ox_mb.reshape_batch_axis(xj, size, axis % len(shape))
    return tree_err(ft_mb.reshape_batch_axis(xt, size, axis), want)


def _fun(xp: Any) -> Any:
    """A function of two batch arguments (``x`` rows on axis 0, ``y`` on ``in_axes[1]``) and a
    plain one, with a dict of outputs of several kinds."""

    def fun(x: Any, y: Any, scale: Any, *, z: Any = None) -> Any:
        s = (x * scale).sum(0) + y.sum(-1 if y.ndim > 1 else 0)
        out = {"s": s, "sq": (x**2).sum(), "rows": x * scale, "i": (x > 0).sum()}
        if z is not None:
            out["z"] = z.sum(0)
        return out

    return fun


def _microbatch(acc: Any, size: int, in_axes: Any, num_real: Any, with_kw: bool) -> float:
    r = rng(30)
    b = 12
    x, scale, z = r.standard_normal((b, 3)), r.standard_normal(3), r.standard_normal((b, 2))
    y = r.standard_normal((3, b)) if in_axes == (0, 1) else r.standard_normal(b)
    (xt, yt, st, zt), (xj, yj, sj, zj) = both((x, y, scale, z))
    kw = {"argnames": "z"} if with_kw else {}
    results = []
    for xp, args in ((torch, (xt, yt, st)), (jnp, (xj, yj, sj))):
        axes = in_axes + ((0,) if with_kw else ()) if isinstance(in_axes, tuple) else in_axes
        options = dict(kw, in_axes=axes)
        if num_real is not None:
            n = num_real[1]
            options["num_real_microbatches"] = (
                n if num_real[0] == "int" else (torch.tensor(n) if xp is torch else jnp.asarray(n))
            )
        accumulator = _acc(xp, acc)
        fn = _lib(xp).microbatch(_fun(xp), (0, 1), size, accumulator, **options)
        fn = fn if xp is torch else jax.jit(fn)
        results.append(fn(*args, **({"z": zt if xp is torch else zj} if with_kw else {})))
    return tree_err(*results)


def _micro_vmap(acc: Any, size: Any, in_axes: Any, num_real: int | None) -> float:
    r = rng(31)
    x, w = r.standard_normal((8, 3)), r.standard_normal(3)
    (xt, wt), (xj, wj) = both((x, w))
    results = []
    for xp, args in ((torch, (xt, wt)), (jnp, (xj, wj))):
        fun = lambda a, v, *, c: {"dot": (a * v).sum() + c.sum(), "sq": a**2}  # noqa: E731
        kw = {} if num_real is None else {"num_real_microbatches": num_real}
        fn = _lib(xp).micro_vmap(
            fun, in_axes, microbatch_size=size, accumulator=_acc(xp, acc), **kw
        )
        fn = fn if xp is torch else jax.jit(fn)
        results.append(fn(*args, c=args[0][:, :2] * 3))
    return tree_err(*results)


def _loss(xp: Any, aux: bool) -> Any:
    def loss(p: Any, x: Any, y: Any) -> Any:
        pred = xp.tanh(x @ p["w"]) + p["b"]
        value = ((pred - y) ** 2).mean()
        return (value, {"pred": pred.sum()}) if aux else value

    return loss


def _clip(xp: Any) -> Any:
    """Per-example clipping to global norm 0.5, and the squared gradient (a tuple output)."""

    def clip(g: Any) -> Any:
        leaves = list(g.values())
        norm = sum((v**2).sum() for v in leaves) ** 0.5
        factor = xp.minimum(norm * 0 + 1.0, 0.5 / norm)
        return {k: v * factor for k, v in g.items()}, {k: v**2 for k, v in g.items()}

    return clip


def _micro_grad(acc: str, keep: bool, size: Any, aux: bool, clip: bool, num_real: Any) -> float:
    r = rng(32)
    params = {"w": r.standard_normal((3, 2)), "b": r.standard_normal(2)}
    x, y = r.standard_normal((8, 3)), r.standard_normal((8, 2))
    (pt, xt, yt), (pj, xj, yj) = both((params, x, y))
    results = []
    for xp, args in ((torch, (pt, xt, yt)), (jnp, (pj, xj, yj))):
        kw: dict[str, Any] = {"accumulator": _acc(xp, acc)}
        if clip:
            kw["transform_fn"] = _clip(xp)
            kw["metrics_fn"] = lambda g: sum((v**2).sum() for v in g.values())
        if num_real is not None:
            kw["num_real_microbatches"] = (
                torch.tensor(num_real) if xp is torch else jnp.asarray(num_real)
            )
        fn = _lib(xp).micro_grad(
            _loss(xp, aux),
            aux,
            0,
            batch_argnums=(1, 2),
            keep_batch_dim=keep,
            microbatch_size=size,
            **kw,
        )
        grads, extra = fn(*args) if xp is torch else jax.jit(fn)(*args)
        results.append((grads, tuple(extra)))
        same(type(extra).__name__ == "Aux", f"aux type {type(extra).__name__}")
    return tree_err(*results)


def _enum() -> float:
    names_t = [m.name for m in ft_mb.AccumulationType]
    names_j = [m.name for m in ox_mb.AccumulationType]
    same(names_t == names_j, f"members {names_t} vs optax {names_j}")
    fields_t = [f.name for f in dataclasses.fields(ft_mb.Accumulator)]
    fields_j = [f.name for f in dataclasses.fields(ox_mb.Accumulator)]
    return same(fields_t == fields_j, f"Accumulator fields {fields_t} vs optax {fields_j}")


def cases() -> list[Case]:
    out = [Case("microbatching.AccumulationType", "member names; Accumulator field names", _enum)]
    for shape, size, axis in (((12, 3), 4, 0), ((3, 12, 2), 3, 1), ((2, 12), 6, -1), ((8,), 8, 0)):
        out.append(
            Case(
                "microbatching.reshape_batch_axis",
                f"shape {shape}, microbatch_size {size}, axis {axis}"
                + (" (optax given ndim + axis)" if axis < 0 else ""),
                functools.partial(_reshape, shape, size, axis),
            )
        )
    tree_acc = {"s": "SUM", "sq": "MEAN", "rows": "CONCAT", "i": "SUM"}
    running = {"s": "RUNNING_MEAN", "sq": "MEAN", "rows": "CONCAT", "i": "SUM"}
    custom = {"s": "max", "sq": "RUNNING_MEAN", "rows": "CONCAT", "i": "SUM"}
    for acc, label in (
        (tree_acc, "SUM/MEAN/CONCAT/SUM(int) tree"),
        (running, "RUNNING_MEAN/MEAN/CONCAT/SUM tree"),
        (custom, "custom max Accumulator/RUNNING_MEAN/CONCAT/SUM"),
    ):
        for size, in_axes in ((3, 0), (4, (0, 1)), (12, 0), (1, 0)):
            out.append(
                Case(
                    "microbatching.microbatch",
                    f"{label}, microbatch_size {size}, in_axes {in_axes}",
                    functools.partial(_microbatch, acc, size, in_axes, None, False),
                )
            )
        for num_real in (("int", 2), ("tensor", 3)):
            out.append(
                Case(
                    "microbatching.microbatch",
                    f"{label}, microbatch_size 3, num_real_microbatches {num_real[1]} "
                    f"({num_real[0]})",
                    functools.partial(_microbatch, acc, 3, 0, num_real, False),
                )
            )
    with_z = {**tree_acc, "z": "CONCAT"}
    out.append(
        Case(
            "microbatching.microbatch",
            "argnames='z' (CONCAT), microbatch_size 4",
            functools.partial(_microbatch, with_z, 4, 0, None, True),
        )
    )
    for acc in ("CONCAT", "SUM", "MEAN", "RUNNING_MEAN", {"dot": "SUM", "sq": "CONCAT"}):
        for size, num_real in ((None, None), (2, None), (4, None), (2, 3)):
            out.append(
                Case(
                    "microbatching.micro_vmap",
                    f"accumulator {acc}, in_axes (0, None), kwarg mapped, microbatch_size {size}"
                    + (f", num_real_microbatches {num_real}" if num_real else ""),
                    functools.partial(_micro_vmap, acc, size, (0, None), num_real),
                )
            )
    for acc, keep, size, aux, clip, num_real in (
        ("SUM", True, None, False, False, None),
        ("MEAN", True, 2, True, False, None),
        ("SUM", False, 4, False, True, None),
        ("MEAN", False, 2, True, True, None),
        ("RUNNING_MEAN", True, 2, False, True, 3),
        ("SUM", True, 2, True, False, 2),
    ):
        out.append(
            Case(
                "microbatching.micro_grad",
                f"{acc}, keep_batch_dim {keep}, microbatch_size {size}, has_aux {aux}"
                + (", clip transform_fn + norm metrics_fn" if clip else "")
                + (f", num_real_microbatches {num_real} (tensor)" if num_real else ""),
                functools.partial(_micro_grad, acc, keep, size, aux, clip, num_real),
            )
        )
    return out
