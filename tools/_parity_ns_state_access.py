"""Cases of ``tools/optax_parity_namespaces.py`` for optax's state-access tree functions:
``tree.get``, ``tree.get_all_with_path`` and ``tree.set``, on hand-built NamedTuple/dict/list
trees and on a real ``chain(add_decayed_weights, adam)`` state."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from _parity_ns_common import Case, both, outcome, rng, same, to_numpy, tree_err

import functrain as ft

NOT_COMPARED: dict[str, str] = {}


class Inner(NamedTuple):
    count: Any
    mu: Any


class Outer(NamedTuple):
    count: Any
    inner: Any
    extra: Any


def _state_tree(kind: str) -> tuple[Any, Any]:
    """A handmade state (one NamedTuple class for both libraries) or a real optimizer state
    (chain(add_decayed_weights, adam) after two steps; its class names agree)."""
    r = rng(19)
    if kind == "handmade":
        data = Outer(
            count=np.array(3, np.int32),
            inner=Inner(np.array(5, np.int32), {"mu": r.standard_normal(2), "w": None}),
            extra={"mu": [r.standard_normal(3), Inner(np.array(1), r.standard_normal(()))]},
        )
        return both(data)
    if kind == "handmade, every match reachable":  # each match's parent holds the key
        data = Outer(
            count=np.array(3, np.int32),
            inner=Inner(np.array(5, np.int32), {"mu": r.standard_normal(2), "w": None}),
            extra={"mu": [r.standard_normal(3), None], "count": np.array([1, 2])},
        )
        return both(data)
    if kind == "nested one level deeper":  # Outer.inner is a plain tuple holding an Inner
        data = Outer(np.array(3), (Inner(np.array(5), r.standard_normal(2)), None), {"k": None})
        return both(data)
    params = {"w": r.standard_normal((2, 3)), "b": r.standard_normal(3)}
    grads = [ft.tree.map(lambda v: r.standard_normal(v.shape), params) for _ in range(2)]
    (pt, gt), (pj, gj) = both((params, grads))
    out = []
    for lib, p, gs in ((ft, pt, gt), (optax, pj, gj)):
        tx = lib.chain(lib.add_decayed_weights(0.01), lib.adam(0.1))
        state = tx.init(p)
        for g in gs:
            state = tx.update(g, state, p)[1]
        out.append(state)
    return out[0], out[1]


def _key(k: Any) -> Any:
    """A path entry of either library as a plain value (functrain keeps plain optree keys)."""
    if hasattr(k, "tuple_name"):
        return ("NamedTupleKey", k.tuple_name, k.name)
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _inner_only(path: Any, _: Any) -> bool:
    return getattr(path[-1], "tuple_name", None) == "Inner"


def _get_all(kind: str, key: str, filtered: bool) -> float:
    tt, tj = _state_tree(kind)
    flt = _inner_only if filtered else None
    got = ft.tree.get_all_with_path(tt, key, flt)
    want = optax.tree.get_all_with_path(tj, key, flt)
    paths_t = [tuple(map(_key, p)) for p, _ in got]
    paths_j = [tuple(map(_key, p)) for p, _ in want]
    same(paths_t == paths_j, f"paths {paths_t} vs optax {paths_j}")
    return tree_err([v for _, v in got], [v for _, v in want])


def _get(kind: str, key: str, filtered: bool) -> float:
    tt, tj = _state_tree(kind)
    flt = _inner_only if filtered else None
    got = outcome(ft.tree.get, tt, key, "absent", flt)
    want = outcome(optax.tree.get, tj, key, "absent", flt)
    same(got[0] == want[0], f"{got[0]} vs optax {want[0]}")
    if got[1] == "absent" or want[1] == "absent":
        return same(got[1] == want[1] == "absent", "the default returned")
    return tree_err(got[1], want[1])


# The matches optax.tree.set leaves as they are: below a node that does not hold the key.
_SKIPPED = {
    ("nested one level deeper", "count"): [("inner", 0, "count")],
    ("handmade", "count"): [("extra", "mu", 1, "count")],
}


def _at(tree: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        tree = getattr(tree, k) if hasattr(tree, "_fields") else tree[k]
    return tree


def _put(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of ``tree`` with ``value`` at ``path`` (NamedTuples, dicts, lists, tuples)."""
    if not path:
        return value
    k, rest = path[0], path[1:]
    if hasattr(tree, "_fields"):
        return tree._replace(**{k: _put(getattr(tree, k), rest, value)})
    if isinstance(tree, dict):
        return {**tree, k: _put(tree[k], rest, value)}
    return type(tree)(_put(v, rest, value) if i == k else v for i, v in enumerate(tree))


def _set(kind: str, filtered: bool, **values: Any) -> float:
    tt, tj = _state_tree(kind)
    flt = _inner_only if filtered else None
    vt, vj = both(values)
    got, want = ft.tree.set(tt, flt, **vt), optax.tree.set(tj, flt, **vj)
    for key in values:
        for path in _SKIPPED.get((kind, key), []):
            # functrain replaces every match get_all_with_path finds (documented): checked,
            # then the old value is put back to compare the rest.
            new_here = np.array_equal(to_numpy(_at(got, path)), values[key])
            old_there = np.array_equal(np.asarray(_at(want, path)), to_numpy(_at(tt, path)))
            same(new_here and old_there, f"{path}: functrain replaced, optax kept")
            got = _put(got, path, _at(tt, path))
    # The structures must agree too (a replaced subtree may change it): compared as NumPy
    # trees, by their printed form (NamedTuple classes of one name are each library's own).
    st = str(jax.tree.structure(ft.tree.map(to_numpy, got)))
    sj = str(jax.tree.structure(jax.tree.map(np.asarray, want)))
    same(st == sj, f"structure {st} vs optax {sj}")
    return tree_err(got, want)


# ---------------------------------------------------------------- the cases


def _state_access_cases() -> list[Case]:
    out = []
    for kind, key, filtered in (
        ("handmade", "count", False),
        ("handmade", "count", True),
        ("handmade", "mu", False),
        ("handmade", "Inner", False),
        ("handmade", "absent", False),
        ("handmade, every match reachable", "count", False),
        ("handmade, every match reachable", "count", True),
        ("handmade, every match reachable", "mu", True),
        ("optimizer state", "count", False),
        ("optimizer state", "nu", False),
        ("optimizer state", "ScaleByAdamState", False),
        ("optimizer state", "EmptyState", False),
    ):
        settings = f"{kind}, key {key!r}{', filtering: Inner fields' if filtered else ''}"
        why = "paths compared with optax's DictKey/SequenceKey as plain keys (documented)"
        run = functools.partial(_get_all, kind, key, filtered)
        out.append(Case("tree.get_all_with_path", settings, run, why=why))
        out.append(Case("tree.get", settings, functools.partial(_get, kind, key, filtered)))
    w = np.array([9.0, 8.0])
    reach = "handmade, every match reachable"
    for kind, filtered, values in (
        ("handmade", False, {"mu": w}),
        (reach, False, {"count": np.array(9)}),
        (reach, True, {"count": np.array(9)}),
        (reach, False, {"mu": w, "count": np.array(9)}),
        ("handmade", False, {"Inner": w, "extra": None}),
        ("optimizer state", False, {"count": np.array(9, np.int32), "mu": {"w": w, "b": w}}),
        ("handmade", False, {"count": np.array(9)}),
        ("handmade", True, {"count": np.array(9)}),
        ("nested one level deeper", False, {"count": np.array(9)}),
    ):
        skipped = any((kind, k) in _SKIPPED for k in values)
        why = (
            "optax skips a match below a node without the key, functrain replaces it "
            "(documented): checked, then compared with it restored"
            if skipped
            else ""
        )
        settings = f"{kind}, {sorted(values)}{', filtering: Inner fields' if filtered else ''}"
        run = functools.partial(_set, kind, filtered, **values)
        out.append(Case("tree.set", settings, run, why=why))
    return out


def cases() -> list[Case]:
    return _state_access_cases()
