"""Shared pieces of ``tools/optax_parity_namespaces.py``: cases, data and the error measure.

Imported only once jax and optax are known to be importable (the main script checks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

import functrain as ft

TOL = 1e-12


@dataclass(frozen=True)
class Case:
    """One comparison: ``run()`` returns the largest relative error (``inf`` on a mismatch of
    structure, shape, dtype kind or NaN/inf positions); ``doc`` marks a documented difference
    (a DIFF above ``tol`` is then not a failure)."""

    name: str
    settings: str
    run: Callable[[], float]
    tol: float = TOL
    why: str = ""
    doc: bool = False


class Mismatch(AssertionError):
    """The two results differ in structure, shape or dtype kind (not only in values)."""


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def both(tree: Any) -> tuple[Any, Any]:
    """A NumPy pytree (dicts, lists, tuples, None) as a torch tree and a jax tree (copies)."""
    as_t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    as_j = lambda a: jnp.asarray(np.array(a))  # noqa: E731
    return ft.tree.map(as_t, tree), jax.tree.map(as_j, tree)


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().resolve_conj().numpy()
    return np.asarray(x)


def _kind(a: np.ndarray) -> str:
    # int64 (PyTorch's index dtype) against int32 counts or uint32 is not a difference of kind.
    return {"u": "i", "b": "b", "i": "i", "f": "f", "c": "c"}.get(a.dtype.kind, a.dtype.kind)


def leaf_err(a: Any, b: Any, where: str = "") -> float:
    """``max|a - b| / max|b|`` of two arrays of one shape and dtype kind; NaNs and infinities
    must sit at the same places (else ``inf``)."""
    a, b = to_numpy(a), to_numpy(b)
    if a.shape != b.shape:
        raise Mismatch(f"{where}shape {a.shape} vs optax {b.shape}")
    if _kind(a) != _kind(b):
        raise Mismatch(f"{where}dtype {a.dtype} vs optax {b.dtype}")
    if a.dtype.kind in "biu":
        return 0.0 if np.array_equal(a, b) else float("inf")
    a, b = a.astype(np.complex128), b.astype(np.complex128)
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(finite_a, finite_b):
        return float("inf")
    odd_a, odd_b = a[~finite_a], b[~finite_b]  # NaN where NaN, the same infinities elsewhere
    nan_a, nan_b = np.isnan(odd_a), np.isnan(odd_b)
    if not np.array_equal(nan_a, nan_b) or not np.array_equal(odd_a[~nan_a], odd_b[~nan_b]):
        return float("inf")
    diff = np.abs(a[finite_a] - b[finite_b]).max(initial=0.0)
    if diff == 0.0:
        return 0.0
    return float(diff / max(np.abs(b[finite_b]).max(initial=0.0), 1e-300))


def tree_err(t: Any, j: Any) -> float:
    """The largest :func:`leaf_err` over two pytrees (torch: ``ft.tree`` leaves; jax: its own),
    which must have as many leaves."""
    tl, jl = ft.tree.leaves(t), jax.tree.leaves(j)
    if len(tl) != len(jl):
        raise Mismatch(f"{len(tl)} leaves vs optax {len(jl)}")
    return max((leaf_err(a, b, f"leaf {i}: ") for i, (a, b) in enumerate(zip(tl, jl))), default=0)


def same(condition: bool, what: str) -> float:
    """0 when ``condition`` holds, else a :class:`Mismatch` naming ``what``."""
    if not condition:
        raise Mismatch(what)
    return 0.0


def quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with optax's deprecation warnings silenced (second_order and
    inject_stateful_hyperparams warn in 0.2.8; the comparison is the point here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return fn(*args, **kwargs)


def spd(seed: int, n: int, cond: float = 50.0) -> np.ndarray:
    """A random symmetric positive definite ``n × n`` matrix with eigenvalues in [1, cond]."""
    q, _ = np.linalg.qr(rng(seed).standard_normal((n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


def outcome(fn: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """``("ok", fn(...))``, or the name of the ValueError/KeyError/TypeError it raised."""
    try:
        return "ok", fn(*args, **kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        return type(exc).__name__, None
