"""Cases of ``tools/optax_parity_namespaces.py`` for the moment helpers (top level and
``tree.*``) and the random trees (``tree.random_like``, ``split_key_like``,
``unwrap_random_key_data``)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from _parity_ns_common import Case, both, rng, same, tree_err

import functrain as ft

NOT_COMPARED = {
    "tree.random_like (default sampler) values": "RNGs differ by design: structure, shapes and "
    "dtypes compared, values compared with a deterministic sampler",
    "tree.split_key_like key values": "functrain keys are 0-d int64 tensors, JAX keys uint32[2] "
    "by design: structure and distinctness compared",
    "tree.unwrap_random_key_data key leaves": "a functrain key is already its data (returned as "
    "is), optax returns a JAX key's uint32 data: other leaves and structure compared",
}


def _moment_data(seed: int, complex_: bool = False) -> tuple[Any, Any]:
    r = rng(seed)
    shapes = {"w": (3, 4), "b": (4,), "s": ()}

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        x = r.standard_normal(shape)
        return x + 1j * r.standard_normal(shape) if complex_ else x

    updates = {k: draw(s) for k, s in shapes.items()}
    moments = {k: np.abs(r.standard_normal(s)) for k, s in shapes.items()}
    if complex_:
        moments["w"] = draw(shapes["w"])  # a complex first moment
    return updates, moments


def _moment(ns: str, name: str, arg: Any, decay: float, complex_: bool = False) -> float:
    (ut, mt), (uj, mj) = both(_moment_data(int(decay * 10) + len(name), complex_))
    ft_fn = getattr(ft.tree if ns == "tree" else ft, name)
    ox_fn = getattr(optax.tree if ns == "tree" else optax, name)
    if name == "update_moment_per_elem_norm" and complex_:
        mt = ft.tree.map(lambda m: m.abs(), mt)
        mj = jax.tree.map(jnp.abs, mj)
    return tree_err(ft_fn(ut, mt, decay, arg), ox_fn(uj, mj, decay, arg))


def _bias_correction(ns: str, decay: float, count: int, as_tensor: bool) -> float:
    (mt,), (mj,) = both((_moment_data(3)[1],))
    ct = torch.tensor(count, dtype=torch.int32) if as_tensor else count
    cj = jnp.asarray(count, jnp.int32) if as_tensor else count
    ft_fn = (ft.tree if ns == "tree" else ft).bias_correction
    ox_fn = (optax.tree if ns == "tree" else optax).bias_correction
    return tree_err(ft_fn(mt, decay, ct), ox_fn(mj, decay, cj))


def _target() -> dict[str, Any]:
    r = rng(4)
    return {
        "w": r.standard_normal((3, 2)),
        "pair": (r.standard_normal(4).astype(np.float32), r.standard_normal(())),
        "list": [r.standard_normal((2, 2, 1))],
        "none": None,
    }


def _random_like_fixed(dtype: str | None) -> float:
    tt, tj = both(_target())

    def sampler_t(key: Any, shape: tuple[int, ...], dt: Any) -> Any:
        return torch.arange(float(np.prod(shape)), dtype=dt).reshape(shape) * 0.5 - 1

    def sampler_j(key: Any, shape: tuple[int, ...], dt: Any) -> Any:
        return jnp.arange(float(np.prod(shape)), dtype=dt).reshape(shape) * 0.5 - 1

    got = ft.tree.random_like(ft.random_key(0), tt, sampler_t, getattr(torch, dtype or "", None))
    want = optax.tree.random_like(
        jax.random.PRNGKey(0), tj, sampler_j, getattr(jnp, dtype) if dtype else None
    )
    same(ft.tree.structure(got) == ft.tree.structure(tt), "structure")
    return max(tree_err(got, want), _dtypes(got, want))


def _dtypes(got: Any, want: Any) -> float:
    dt = [str(v.dtype).removeprefix("torch.") for v in ft.tree.leaves(got)]
    dj = [str(v.dtype) for v in jax.tree.leaves(want)]
    return same(dt == dj, f"dtypes {dt} vs optax {dj}")


def _random_like_default(dtype: str | None) -> float:
    tt, tj = both(_target())
    got = ft.tree.random_like(ft.random_key(0), tt, dtype=getattr(torch, dtype or "", None))
    want = optax.tree.random_like(
        jax.random.PRNGKey(0), tj, dtype=getattr(jnp, dtype) if dtype else None
    )
    shapes_t = [tuple(v.shape) for v in ft.tree.leaves(got)]
    shapes_j = [v.shape for v in jax.tree.leaves(want)]
    same(shapes_t == shapes_j, f"shapes {shapes_t} vs optax {shapes_j}")
    same(ft.tree.structure(got) == ft.tree.structure(tt), "structure")
    return _dtypes(got, want)


def _split_key_like() -> float:
    tt, tj = both(_target())
    got = ft.tree.split_key_like(ft.random_key(5), tt)
    want = optax.tree.split_key_like(jax.random.PRNGKey(5), tj)
    kt, kj = ft.tree.leaves(got), jax.tree.leaves(want)
    same(ft.tree.structure(got) == ft.tree.structure(tt), "structure")
    same(len(kt) == len(kj) == 4, f"{len(kt)} keys vs optax {len(kj)}")
    same(len({int(k) for k in kt}) == len(kt), "distinct functrain keys")
    return same(len({tuple(np.asarray(k)) for k in kj}) == len(kj), "distinct optax keys")


def _unwrap() -> float:
    r = rng(6)
    data = {"w": r.standard_normal(3), "n": np.arange(4), "sub": [r.standard_normal((2, 2))]}
    tt, tj = both(data)
    got = ft.tree.unwrap_random_key_data({**tt, "key": ft.random_key(1)})
    want = optax.tree.unwrap_random_key_data({**tj, "key": jax.random.key(1)})
    same(want["key"].dtype == jnp.uint32 and got["key"].dtype == torch.int64, "key data dtypes")
    same(got["w"] is tt["w"], "functrain returns the leaves themselves")
    del got["key"], want["key"]
    return tree_err(got, want)


def cases() -> list[Case]:
    out = []
    for ns in ("top", "tree"):
        prefix = "tree." if ns == "tree" else ""
        for name, arg in (
            ("update_moment", 1),
            ("update_moment", 2),
            ("update_moment_per_elem_norm", 1),
            ("update_moment_per_elem_norm", 2),
            ("update_infinity_moment", 1e-8),
            ("update_infinity_moment", 0.5),
        ):
            label = "eps" if name == "update_infinity_moment" else "order"
            for decay in (0.9, 0.0, 1.0):
                out.append(
                    Case(
                        f"{prefix}{name}",
                        f"{label} {arg:g}, decay {decay:g}",
                        functools.partial(_moment, ns, name, arg, decay),
                    )
                )
            if name != "update_infinity_moment":
                out.append(
                    Case(
                        f"{prefix}{name}",
                        f"{label} {arg:g}, decay 0.9, complex updates",
                        functools.partial(_moment, ns, name, arg, 0.9, True),
                    )
                )
        for decay, count, as_tensor in (
            (0.9, 1, False),
            (0.999, 5, True),
            (0.9, 100, True),
            (0.5, 0, False),
        ):
            out.append(
                Case(
                    f"{prefix}bias_correction",
                    f"decay {decay:g}, count {count} ({'int32 tensor' if as_tensor else 'int'})",
                    functools.partial(_bias_correction, ns, decay, count, as_tensor),
                )
            )
    for dtype in (None, "float32"):
        out.append(
            Case(
                "tree.random_like",
                f"deterministic sampler fed to both, dtype {dtype}; nested tree with None",
                functools.partial(_random_like_fixed, dtype),
            )
        )
        out.append(
            Case(
                "tree.random_like",
                f"default sampler, dtype {dtype}: structure/shapes/dtypes",
                functools.partial(_random_like_default, dtype),
            )
        )
    out.append(
        Case(
            "tree.split_key_like",
            "nested tree with None: structure, distinct keys",
            _split_key_like,
        )
    )
    out.append(
        Case("tree.unwrap_random_key_data", "tree with a key: other leaves, structure", _unwrap)
    )
    return out
