"""Cases of ``tools/optax_parity_namespaces.py`` for the names left over by the other modules:
``lookahead``, ``init_empty_state``, ``tree_map_params`` / ``tree.map_params``,
``value_and_grad_from_state`` and the ``tree`` utilities (``allclose``, ``batch_shape``,
``cast``, ``cast_like``, ``conj``, ``dtype``, ``get``, ``get_all_with_path``, ``min``, ``real``,
``set``, ``size``, ``where``)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from _parity_ns_common import Case, both, leaf_err, outcome, rng, same, to_numpy, tree_err

import functrain as ft

NOT_COMPARED = {
    "tree.allclose on a structure or shape mismatch": "functrain returns False by design; "
    "optax's jax.tree.map raises on a structure mismatch and jnp.allclose broadcasts shapes",
    "tree.min of a tree without elements": "functrain raises ValueError (as tree.max), optax "
    "returns inf",
    "tree.where with a tree condition": "a functrain extension: compared leaf by leaf with "
    "optax.tree.where on each leaf's condition",
    "tree_map_params on masked states": "optax keeps MaskedNode placeholders where functrain "
    "keeps None: not comparable leaf by leaf",
}

# ---------------------------------------------------------------- shared helpers


def _dtypes(got: Any, want: Any) -> float:
    """The leaves' dtypes by name (``torch.float32`` and ``float32`` are the same)."""
    dt = [str(v.dtype).removeprefix("torch.") for v in ft.tree.leaves(got)]
    dj = [str(v.dtype) for v in jax.tree.leaves(want)]
    return same(dt == dj, f"dtypes {dt} vs optax {dj}")


def _wide(tree_t: Any, tree_j: Any) -> tuple[Any, Any]:
    """Both trees with float64 (or complex128) leaves: bfloat16 has no NumPy twin."""

    def t(v: Any) -> Any:
        return v.to(torch.complex128 if v.is_complex() else torch.float64)

    def j(v: Any) -> Any:
        return v.astype(jnp.complex128 if jnp.iscomplexobj(v) else jnp.float64)

    return ft.tree.map(t, tree_t), jax.tree.map(j, tree_j)


def _mixed(seed: int, complex_: bool = False) -> dict[str, Any]:
    """A nested tree: dict, tuple, list, NamedTuple-free, with None, 0-d and int leaves."""
    r = rng(seed)
    z = r.standard_normal((2, 3)) + (1j * r.standard_normal((2, 3)) if complex_ else 0)
    return {
        "w": z,
        "pair": (r.standard_normal(4).astype(np.float32), r.standard_normal(())),
        "list": [r.integers(-5, 5, (3,)), {"deep": r.standard_normal((1, 2))}],
        "none": None,
    }


# ---------------------------------------------------------------- lookahead


def _la_params(seed: int) -> dict[str, Any]:
    r = rng(seed)
    return {
        "w": r.standard_normal((3, 2)),
        "sub": (r.standard_normal(4), {"s": r.standard_normal(())}),
    }


def _lookahead(
    inner: str, sync: int, alpha: float, as_tensor: bool, reset: bool, grads: str
) -> float:
    """20 steps of lookahead over the same inner optimizer on both sides; updates, params and
    state compared at every step."""
    opt = {
        "sgd momentum": lambda lib: lib.sgd(0.1, momentum=0.9),
        "adam": lambda lib: lib.adam(0.05),
    }[inner]
    a_t = torch.tensor(alpha) if as_tensor else alpha
    a_j = jnp.asarray(alpha) if as_tensor else alpha
    tx_t = ft.lookahead(opt(ft), sync, a_t, reset_state=reset)
    tx_j = optax.lookahead(opt(optax), sync, a_j, reset_state=reset)
    (p_t, target_t), (p_j, target_j) = both((_la_params(sync), _la_params(sync + 10)))
    p_t, p_j = ft.LookaheadParams.init_synced(p_t), optax.LookaheadParams.init_synced(p_j)
    s_t, s_j = tx_t.init(p_t), tx_j.init(p_j)
    fixed = [both(_la_params(100 + i)) for i in range(20)]
    worst = tree_err(s_t, s_j)
    for i in range(20):
        if grads == "quadratic":  # the gradient of |fast - target|² / 2 at the fast weights
            g_t = ft.tree.map(torch.sub, p_t.fast, target_t)
            g_j = jax.tree.map(jnp.subtract, p_j.fast, target_j)
        else:
            g_t, g_j = fixed[i]
        if grads == "LookaheadParams":  # functrain's extension: only .fast is read
            g_t = ft.LookaheadParams(g_t, ft.tree.map(lambda v: v * np.nan, g_t))
        u_t, s_t = tx_t.update(g_t, s_t, p_t)
        u_j, s_j = tx_j.update(g_j, s_j, p_j)
        p_t, p_j = ft.apply_updates(p_t, u_t), optax.apply_updates(p_j, u_j)
        worst = max(worst, tree_err(u_t, u_j), tree_err(p_t, p_j), tree_err(s_t, s_j))
    return worst


# ---------------------------------------------------------------- init_empty_state


def _init_empty_state(params: Any) -> float:
    (pt,), (pj,) = both((params,))
    got, want = ft.init_empty_state(pt), optax.init_empty_state(pj)
    same(type(got).__name__ == type(want).__name__ == "EmptyState", "EmptyState types")
    return same(got == ft.EmptyState() and len(got) == len(want) == 0, "empty states")


# ---------------------------------------------------------------- tree_map_params


def _tx(lib: Any, name: str) -> Any:
    return {
        "adam": lambda: lib.adam(0.1),
        "chain(add_decayed_weights, sgd momentum)": lambda: lib.chain(
            lib.add_decayed_weights(0.01), lib.sgd(0.1, momentum=0.9)
        ),
        "inject_hyperparams(adam)": lambda: lib.inject_hyperparams(lib.adam)(learning_rate=0.1),
    }[name]()


def _map_params(ns: str, tx_name: str, how: str) -> float:
    """A state after three updates, mapped the same way by both libraries."""
    r = rng(len(tx_name) + len(how))
    params = {"w": r.standard_normal((3, 2)), "pair": (r.standard_normal(4), r.standard_normal(()))}
    grads = [ft.tree.map(lambda v: r.standard_normal(np.shape(v)), params) for _ in range(3)]
    rest = ft.tree.map(lambda v: r.standard_normal(np.shape(v)), params)
    (pt, gt, rt), (pj, gj, rj) = both((params, grads, rest))
    tx_t, tx_j = _tx(ft, tx_name), _tx(optax, tx_name)
    s_t, s_j = tx_t.init(pt), tx_j.init(pj)
    for g_t, g_j in zip(gt, gj):
        s_t = tx_t.update(g_t, s_t, pt)[1]
        s_j = tx_j.update(g_j, s_j, pj)[1]
    fn_t = ft.tree_map_params if ns == "top" else ft.tree.map_params
    fn_j = optax.tree_map_params if ns == "top" else optax.tree.map_params
    if how == "cast float32":
        got = fn_t(tx_t, lambda v: v.to(torch.float32), s_t)
        want = fn_j(tx_j, lambda v: v.astype(jnp.float32), s_j)
        return max(tree_err(got, want), _dtypes(got, want))
    if how == "f(v, rest), transform_non_params":
        kw_t = {"transform_non_params": lambda v: v * 3 + 1}
        got = fn_t(tx_t, lambda v, q: v * q - 2, s_t, rt, **kw_t)
        want = fn_j(tx_j, lambda v, q: v * q - 2, s_j, rj, transform_non_params=lambda v: v * 3 + 1)
        return max(tree_err(got, want), _dtypes(got, want))
    if how == "init function as initable":
        got, want = fn_t(tx_t.init, torch.neg, s_t), fn_j(tx_j.init, jnp.negative, s_j)
        return tree_err(got, want)
    # is_leaf stops at the tuple, which f receives whole and rebuilds.
    pair = lambda v: (v[0] * 2, v[1] - 1) if isinstance(v, tuple) else v * 3  # noqa: E731
    is_pair = lambda v: isinstance(v, tuple)  # noqa: E731
    return tree_err(fn_t(tx_t, pair, s_t, is_leaf=is_pair), fn_j(tx_j, pair, s_j, is_leaf=is_pair))


# ---------------------------------------------------------------- value_and_grad_from_state


def _objective(p: Any, a: Any, *, c: Any) -> Any:
    """A non-quadratic objective with an argument and a keyword, for torch or jnp."""
    coupling = (p["w"].sum() * p["b"].sum()) ** 2
    return (a * (p["w"] - c) ** 2).sum() + 0.5 * ((p["b"] ** 2 - 1) ** 2).sum() + 0.1 * coupling


def _solver(lib: Any, name: str) -> Any:
    if name == "lbfgs":
        return lib.lbfgs()
    return lib.chain(lib.sgd(1.0), lib.scale_by_backtracking_linesearch(15, store_grad=True))


def _value_and_grad(solver: str, stored: str) -> float:
    """Ten steps of ``value, grad = vg(params, a, c=c, state=state)``, then the solver's
    update with them; or two steps, then one call on a state whose stored value was set to NaN
    (recomputed) or to a finite number (returned as stored)."""
    r = rng(7)
    data = {"w": r.standard_normal((3, 2)), "b": r.standard_normal(4)}
    (pt, at, ct), (pj, aj, cj) = both((data, np.abs(r.standard_normal((3, 2))) + 0.5, 0.3))
    tx_t, tx_j = _solver(ft, solver), _solver(optax, solver)
    s_t, s_j = tx_t.init(pt), tx_j.init(pj)
    vg_t = ft.value_and_grad_from_state(_objective)
    vg_j = optax.value_and_grad_from_state(_objective)
    worst = 0.0
    for _ in range(10 if stored == "loop" else 2):
        v_t, g_t = vg_t(pt, at, c=ct, state=s_t)
        v_j, g_j = vg_j(pj, aj, c=cj, state=s_j)
        worst = max(worst, tree_err((v_t, g_t), (v_j, g_j)))
        f_t = lambda p: _objective(p, at, c=ct)  # noqa: E731
        f_j = lambda p: _objective(p, aj, c=cj)  # noqa: E731
        u_t, s_t = tx_t.update(g_t, s_t, pt, value=v_t, grad=g_t, value_fn=f_t)
        u_j, s_j = tx_j.update(g_j, s_j, pj, value=v_j, grad=g_j, value_fn=f_j)
        pt, pj = ft.apply_updates(pt, u_t), optax.apply_updates(pj, u_j)
        worst = max(worst, tree_err(pt, pj))
    if stored == "loop":
        return worst
    # A stored pair that is not the objective's: a NaN value is recomputed, a finite one kept.
    value = np.nan if stored == "NaN" else 3.25
    (gt, vt), (gj, vj) = both(({"w": np.full((3, 2), 0.5), "b": np.arange(4.0)}, value))
    s_t, s_j = ft.tree.set(s_t, value=vt, grad=gt), optax.tree.set(s_j, value=vj, grad=gj)
    return tree_err(vg_t(pt, at, c=ct, state=s_t), vg_j(pj, aj, c=cj, state=s_j))


# ---------------------------------------------------------------- tree: values and dtypes


def _allclose(pair: str, rtol: float, atol: float, equal_nan: bool) -> float:
    """The same verdict (a bool) on one pair of nested trees."""
    a = _mixed(11)
    a["list"][0] = a["list"][0].astype(np.float64)
    b = ft.tree.map(np.copy, a)
    if pair == "relative 1e-6":
        b = ft.tree.map(lambda v: v * (1 + 1e-6), a)
    elif pair == "relative 1e-3":
        b = ft.tree.map(lambda v: v * (1 + 1e-3), a)
    elif pair == "|a-b| between rtol·|a| and rtol·|b|":
        a, b = {"x": np.array([1.0, -2.0])}, {"x": np.array([1 + 1.000005e-5, -2.0])}
    elif pair == "absolute 1e-9 near 0":
        a, b = {"x": np.array([0.0, 1e-9])}, {"x": np.array([5e-10, 0.0])}
    elif pair.startswith("NaN"):
        a["w"][0, 1] = b["w"][0, 1] = np.nan
        if pair == "NaN at different places":
            b["w"][0, 1], b["w"][1, 1] = 1.0, np.nan
    elif pair == "inf at the same places":
        a["w"][1, 2] = b["w"][1, 2] = -np.inf
    elif pair == "int leaves beside float leaves":
        a = {"i": np.arange(4), "f": np.arange(4.0) + 1e-7}
        b = {"i": np.arange(4.0) + 1e-7, "f": np.arange(4)}
    elif pair == "complex leaves":
        a = {"z": np.array([1 + 2j, 3 - 1j])}
        b = {"z": np.array([1 + 2j + 1e-4, 3 - 1j])}
    (at, bt), (aj, bj) = both((a, b))
    kw = {"rtol": rtol, "atol": atol, "equal_nan": equal_nan}
    got, want = ft.tree.allclose(at, bt, **kw), bool(optax.tree.allclose(aj, bj, **kw))
    return same(isinstance(got, bool) and got == want, f"verdict {got} vs optax {want}")


def _batch_shape(shape: tuple[int, ...]) -> float:
    tt, tj = both(_mixed(12, complex_=True))
    got, want = ft.tree.batch_shape(tt, shape), optax.tree.batch_shape(tj, shape)
    return max(tree_err(got, want), _dtypes(got, want))


def _both_dtype(name: str) -> tuple[Any, Any]:
    return getattr(torch, name), getattr(jnp, name)


def _cast(dtype: str | None, ints: bool) -> float:
    """Float and complex leaves cast (or not, for None); int/bool leaves: see ``why``."""
    r = rng(13)
    tree = {"a": r.standard_normal((2, 3)), "b": (r.standard_normal(3).astype(np.float32), None)}
    if dtype in ("complex64", "complex128"):
        tree["z"] = r.standard_normal(2) + 1j * r.standard_normal(2)
    if ints:
        tree["count"], tree["flag"] = np.array(7, np.int32), np.array([True, False])
    tt, tj = both(tree)
    d_t, d_j = _both_dtype(dtype) if dtype else (None, None)
    got, want = ft.tree.cast(tt, d_t), optax.tree.cast(tj, d_j)
    if dtype is None:
        same(got is tt, "dtype None returns the tree itself")
    if ints:  # functrain keeps counters' dtypes, optax casts every leaf
        kept = (got["count"].dtype, got["flag"].dtype) == (torch.int32, torch.bool)
        same(kept or dtype is None, "functrain keeps int/bool leaves")
        same(want["count"].dtype == (d_j or jnp.int32), "optax casts int leaves")
        for k in ("count", "flag"):
            same(np.array_equal(to_numpy(got[k]).astype(complex), np.asarray(want[k], complex)), k)
        got = {k: v for k, v in got.items() if k not in ("count", "flag")}
        want = {k: v for k, v in want.items() if k not in ("count", "flag")}
    _dtypes(got, want)
    return tree_err(*_wide(got, want))


def _cast_like(others: str) -> float:
    r = rng(14)
    tree = {
        "a": r.standard_normal((2, 2)) * 3,
        "b": (r.integers(-3, 3, 3), r.standard_normal(())),
        "c": [r.standard_normal(3) + 1j * r.standard_normal(3), None],
    }
    names = {
        "float32/int32/float16/complex64": ("float32", "int32", "float16", "complex64"),
        "bfloat16/float64/bool/complex128": ("bfloat16", "float64", "bool", "complex128"),
        "int8/int64/float32, a Python float": ("int8", "int64", None, "float32"),
    }[others]
    leaf = lambda lib, n: 3.0 if n is None else lib.zeros(2, dtype=getattr(lib, n))  # noqa: E731
    other = lambda lib: {  # noqa: E731
        "a": leaf(lib, names[0]),
        "b": (leaf(lib, names[1]), leaf(lib, names[2])),
        "c": [leaf(lib, names[3]), None],
    }
    (tt,), (tj,) = both((tree,))
    if names[3] != "complex128":  # complex to real casts warn (the imaginary part is dropped)
        tt["c"][0], tj["c"][0] = tt["c"][0].real.clone(), jnp.real(tj["c"][0])
    got, want = ft.tree.cast_like(tt, other(torch)), optax.tree.cast_like(tj, other(jnp))
    _dtypes(got, want)
    return tree_err(*_wide(got, want))


def _conj_real(name: str) -> float:
    tree = _mixed(15, complex_=True)
    tree["z64"] = tree["w"].astype(np.complex64)
    tt, tj = both(tree)
    got, want = getattr(ft.tree, name)(tt), getattr(optax.tree, name)(tj)
    return max(tree_err(got, want), _dtypes(got, want))


_DTYPE_TREES = {
    "all float32": ("float32", "float32", "float32"),
    "float16/float32/int32": ("float16", "float32", "int32"),
    "bfloat16/float16": ("bfloat16", "float16", "float16"),
    "uint8/int8/bool": ("uint8", "int8", "bool"),
    "int64/float32/complex64": ("int64", "float32", "complex64"),
    "no leaves (None)": (),
}


def _tree_dtype(tree_name: str, handler: str | None) -> float:
    names = _DTYPE_TREES[tree_name]
    make = lambda lib: {  # noqa: E731
        "x": [lib.ones(2, dtype=getattr(lib, n)) for n in names],
        "n": None,
    }
    got = outcome(ft.tree.dtype, make(torch), handler)
    want = outcome(optax.tree.dtype, make(jnp), handler)
    if got[0] != "ok" or want[0] != "ok":
        return same(got[0] == want[0], f"{got[0]} vs optax {want[0]}")
    got_name, want_name = str(got[1]).removeprefix("torch."), str(np.dtype(want[1]))
    return same(got_name == want_name, f"{got_name} vs optax {want_name}")


def _min(tree_name: str) -> float:
    r = rng(16)
    trees = {
        "nested floats with None": _mixed(16),
        "with -inf and an empty leaf": {"a": np.array([1.0, -np.inf]), "e": np.zeros((0, 3))},
        "with NaN": {"a": r.standard_normal(3), "b": np.array([np.nan, -5.0])},
        "float32 and int64": {"a": r.standard_normal(3).astype(np.float32), "i": np.arange(-2, 2)},
        "float32 only": {"a": r.standard_normal(3).astype(np.float32), "b": np.float32(-7)},
        "int leaves only": {"i": np.arange(-2, 2), "j": np.array([[-9, 4]], np.int32)},
    }
    tt, tj = both(trees[tree_name])
    got, want = ft.tree.min(tt), optax.tree.min(tj)
    if tree_name == "int leaves only":  # optax's float('inf') initializer makes it a float
        same(got.dtype == torch.int64 and want.dtype == jnp.float64, "dtypes")
        return leaf_err(got.double(), want)
    return max(leaf_err(got, want), _dtypes(got, want))


def _size(tree_name: str) -> float:
    trees = {
        "nested with None and int leaves": _mixed(17),
        "0-d and empty leaves": {"s": np.float64(2.0), "e": np.zeros((0, 4)), "t": (np.ones(3),)},
        "no leaves": {"n": None, "l": []},
    }
    tt, tj = both(trees[tree_name])
    got, want = ft.tree.size(tt), optax.tree.size(tj)
    return same(type(got) is int and got == want, f"{got} vs optax {want}")


def _where(condition: str) -> float:
    r = rng(18)
    x = {"w": r.standard_normal((2, 3)), "v": (r.standard_normal(3).astype(np.float32),), "n": None}
    y = {"w": r.standard_normal((2, 3)), "v": (r.integers(-5, 5, 3),), "n": None}
    mask = r.standard_normal(3) > 0
    (xt, yt, mt), (xj, yj, mj) = both((x, y, mask))
    if condition == "tree of bool arrays":
        ct, cj = both({"w": r.standard_normal((2, 3)) > 0, "v": (mask,), "n": None})
        got = ft.tree.where(ct, xt, yt)
        want = jax.tree.map(optax.tree.where, cj, xj, yj)
        return max(tree_err(got, want), _dtypes(got, want))
    ct, cj = {
        "0-d True": (torch.tensor(True), jnp.asarray(True)),
        "0-d False": (torch.tensor(False), jnp.asarray(False)),
        "bool (3,) broadcast": (mt, mj),
    }[condition]
    got, want = ft.tree.where(ct, xt, yt), optax.tree.where(cj, xj, yj)
    return max(tree_err(got, want), _dtypes(got, want))


def _lookahead_cases() -> list[Case]:
    out = []
    for inner, sync, alpha, as_tensor, reset, grads in (
        ("sgd momentum", 1, 0.5, False, False, "fixed"),
        ("sgd momentum", 3, 0.5, False, False, "fixed"),
        ("sgd momentum", 5, 0.8, True, True, "fixed"),
        ("adam", 3, 0.5, False, False, "fixed"),
        ("adam", 4, 0.3, False, True, "fixed"),
        ("adam", 2, 1.0, False, False, "quadratic"),
        ("adam", 3, 0.0, True, False, "quadratic"),
        ("sgd momentum", 3, 0.5, False, True, "LookaheadParams"),
    ):
        grads_txt = {
            "fixed": "the same 20 drawn gradients",
            "quadratic": "gradients of |fast - t|²/2 at the fast weights",
            "LookaheadParams": "functrain fed LookaheadParams(grads, NaN) (only .fast read)",
        }[grads]
        settings = (
            f"{inner}, sync_period {sync}, slow_step_size {alpha:g}"
            f"{' (0-d tensor)' if as_tensor else ''}, reset_state {reset}, {grads_txt}; "
            "20 steps: updates, params, state"
        )
        run = functools.partial(_lookahead, inner, sync, alpha, as_tensor, reset, grads)
        out.append(Case("lookahead", settings, run))
    return out


def cases() -> list[Case]:
    out = _lookahead_cases()
    for what, params in (
        ("dict with None", {"w": np.ones(2), "n": None}),
        ("a bare array", np.ones(3)),
        ("None", None),
    ):
        out.append(Case("init_empty_state", what, functools.partial(_init_empty_state, params)))
    for ns, name in (("top", "tree_map_params"), ("tree", "tree.map_params")):
        for tx_name in (
            "adam",
            "chain(add_decayed_weights, sgd momentum)",
            "inject_hyperparams(adam)",
        ):
            for how in (
                "cast float32",
                "f(v, rest), transform_non_params",
                "init function as initable",
                "is_leaf stops at tuples",
            ):
                run = functools.partial(_map_params, ns, tx_name, how)
                out.append(Case(name, f"{tx_name} after 3 steps, {how}", run))
    for solver in ("lbfgs", "chain(sgd, backtracking store_grad)"):
        for stored, what in (
            ("loop", "10 steps, f(params, a, c=c): values, grads, params"),
            ("NaN", "stored value set to NaN: recomputed"),
            ("finite", "stored value/grad set by hand: returned as stored"),
        ):
            run = functools.partial(_value_and_grad, solver, stored)
            out.append(Case("value_and_grad_from_state", f"{solver}, {what}", run))
    for pair, rtol, atol, equal_nan in (
        ("identical nested trees with None", 1e-5, 1e-8, False),
        ("relative 1e-6", 1e-5, 1e-8, False),
        ("relative 1e-3", 1e-5, 1e-8, False),
        ("relative 1e-3", 1e-2, 0.0, False),
        ("|a-b| between rtol·|a| and rtol·|b|", 1e-5, 0.0, False),
        ("absolute 1e-9 near 0", 0.0, 1e-8, False),
        ("absolute 1e-9 near 0", 1e-5, 1e-10, False),
        ("NaN at the same places", 1e-5, 1e-8, False),
        ("NaN at the same places", 1e-5, 1e-8, True),
        ("NaN at different places", 1e-5, 1e-8, True),
        ("inf at the same places", 1e-5, 1e-8, False),
        ("int leaves beside float leaves", 1e-5, 1e-8, False),
        ("int leaves beside float leaves", 1e-9, 1e-9, False),
        ("complex leaves", 1e-5, 1e-8, False),
        ("complex leaves", 1e-3, 0.0, False),
    ):
        settings = f"{pair}, rtol {rtol:g}, atol {atol:g}, equal_nan {equal_nan}"
        run = functools.partial(_allclose, pair, rtol, atol, equal_nan)
        out.append(Case("tree.allclose", settings, run))
    for shape in ((), (2,), (2, 3)):
        run = functools.partial(_batch_shape, shape)
        out.append(Case("tree.batch_shape", f"shape {shape}; nested, None, complex, int", run))
    for dtype in (None, "float32", "float64", "float16", "bfloat16", "complex128"):
        run = functools.partial(_cast, dtype, False)
        out.append(Case("tree.cast", f"to {dtype}; nested float leaves with None", run))
    for dtype in ("float32", "complex64", None):
        why = "functrain keeps int/bool leaves' dtypes (optax casts them): values compared"
        run = functools.partial(_cast, dtype, True)
        out.append(Case("tree.cast", f"to {dtype}; with int32 and bool leaves", run, why=why))
    for others in (
        "float32/int32/float16/complex64",
        "bfloat16/float64/bool/complex128",
        "int8/int64/float32, a Python float",
    ):
        run = functools.partial(_cast_like, others)
        out.append(Case("tree.cast_like", f"like {others}; float, int, complex, None", run))
    for name in ("conj", "real"):
        settings = "complex128, complex64, float32/64, int64 leaves, None"
        out.append(Case(f"tree.{name}", settings, functools.partial(_conj_real, name)))
    for tree_name in _DTYPE_TREES:
        for handler in (None, "promote", "highest", "lowest"):
            run = functools.partial(_tree_dtype, tree_name, handler)
            settings = f"{tree_name}, mixed_dtype_handler {handler} (result or error type)"
            out.append(Case("tree.dtype", settings, run))
    for tree_name in (
        "nested floats with None",
        "with -inf and an empty leaf",
        "with NaN",
        "float32 and int64",
        "float32 only",
        "int leaves only",
    ):
        why = "optax returns float64 (inf initializer), functrain int64: values compared"
        run = functools.partial(_min, tree_name)
        out.append(Case("tree.min", tree_name, run, why=why if "int leaves" in tree_name else ""))
    for tree_name in ("nested with None and int leaves", "0-d and empty leaves", "no leaves"):
        out.append(Case("tree.size", tree_name, functools.partial(_size, tree_name)))
    for condition in ("0-d True", "0-d False", "bool (3,) broadcast", "tree of bool arrays"):
        settings = f"condition {condition}; float64 vs int64, float32 vs int64 leaves, None"
        why = "a functrain extension: optax.tree.where per leaf" if "tree" in condition else ""
        out.append(Case("tree.where", settings, functools.partial(_where, condition), why=why))
    return out
