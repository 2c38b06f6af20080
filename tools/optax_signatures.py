"""Signature parity of functrain's public names with optax's: ``python tools/optax_signatures.py``.

For every public name of ``functrain`` (``ft.*``, ``ft.tree.*``, ``ft.contrib.*``,
``ft.projections.*``, ``ft.losses.*``, ``ft.schedules.*``, ``ft.transforms.*``,
``ft.tree_utils.*``, ``ft.second_order.*``, ``ft.perturbations.*``, ``ft.assignment.*``,
``ft.microbatching.*``, ``ft.experimental.aggregating.*``) with a same-named optax counterpart
(``optax.*``, ``optax.transforms``, ``optax.schedules``, ``optax.contrib``, ``optax.tree`` /
``optax.tree_utils.tree_*``, ``optax.projections``, ``optax.losses`` and the namespaces of the
same names; a namespace's name is looked up in optax's namespace of that name), this compares parameter names, order, kinds and defaults, NamedTuple
fields and their defaults, and the public methods of classes. It prints a markdown table of
the differences, each classified as:

* ``extra``: a functrain-only parameter with a default, after optax's (fine);
* ``deliberate``: listed, with its reason, in ``DELIBERATE`` of ``tests/test_optax_signatures.py``;
* ``DIFF``: anything else: an incompatibility for code ported from optax.

``--json PATH`` writes the optax signatures it read (every public name of those namespaces, not
only the twins) to ``PATH``; ``tests/test_optax_signatures.py`` compares functrain's live
signatures with that recorded table, so CI needs no optax. Regenerate it after an optax upgrade:
``python tools/optax_signatures.py --json tests/_optax_signatures.json``.

Needs ``jax`` and ``optax`` (not project dependencies): run it from a separate environment
(``pip install torch "jax[cpu]" optax && pip install -e .``). Exits 0 (with a message) when optax
is missing, 1 when a difference is neither ``extra`` nor ``deliberate``. The functions that
describe and compare signatures need only the standard library and torch; the test imports them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import math
import sys
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEST_FILE = ROOT / "tests" / "test_optax_signatures.py"

# functrain namespace prefix -> the optax namespaces searched, in order, for a same-named twin.
TWIN_NAMESPACES: dict[str, tuple[str, ...]] = {
    "": ("optax", "optax.transforms", "optax.schedules", "optax.contrib"),
    "tree.": ("optax.tree", "optax.tree_utils"),
    "contrib.": ("optax.contrib",),
    "projections.": ("optax.projections",),
    "losses.": ("optax.losses",),
    "schedules.": ("optax.schedules",),
    "transforms.": ("optax.transforms",),
    "tree_utils.": ("optax.tree_utils",),
    "second_order.": ("optax.second_order",),
    "perturbations.": ("optax.perturbations",),
    "assignment.": ("optax.assignment",),
    "microbatching.": ("optax.microbatching",),
    "experimental.aggregating.": ("optax.experimental.aggregating",),
}
# Private optax modules holding the only optax spelling of a name that functrain exports at its
# top level (optax.contrib does not export scale_by_sophia, scale_by_dog, ...; optax's
# scale_by_rms(bias_correction=True) returns a ScaleByRmsWithCountState that optax does not
# export); searched last, and only for the names those modules define.
PRIVATE_NAMESPACES = (
    "optax._src.transform",
    "optax._src.utils",
    "optax.contrib._dog",
    "optax.contrib._muon",
    "optax.contrib._sophia",
)
TWIN_NAMESPACES[""] += PRIVATE_NAMESPACES
OPTAX_NAMESPACES = tuple(dict.fromkeys(ns for v in TWIN_NAMESPACES.values() for ns in v))
# Integer inputs at which a callable default (a schedule-like function) is evaluated.
SAMPLE_POINTS = (0, 1, 2, 3, 10, 100)
SAMPLE_RTOL = 1e-6  # optax evaluates in float32


# -- describing a signature as JSON data ----------------------------------------------------


def _dtype_name(value: Any) -> str | None:
    """``"float32"`` for ``torch.float32``, ``jnp.float32``, ``np.float32`` or a numpy dtype."""
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value).removeprefix("torch.")
    if type(value).__module__.startswith("numpy") and type(value).__name__.endswith("DType"):
        return str(value)  # np.dtype("float32")
    dtype = getattr(value, "dtype", None)  # jnp.float32 and np.float32 are classes with a dtype
    if isinstance(value, type) and type(dtype).__module__.startswith("numpy"):
        return str(dtype)
    return None


def _is_transform(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "init") and hasattr(value, "update")


def _factory_name(fn: Any) -> str:
    """The function that built a closure: ``"scale_by_zoom_linesearch"`` for its ``init_fn``."""
    return getattr(fn, "__qualname__", type(fn).__name__).split(".<locals>")[0]


def _samples(fn: Callable[[Any], Any], call: Callable[[Callable, int], Any]) -> list[Any] | None:
    """``fn`` at :data:`SAMPLE_POINTS` as floats, or ``None`` if it is not a function of a count."""
    try:
        return [float(call(fn, x)) for x in SAMPLE_POINTS]
    except Exception:
        return None


def encode(value: Any, call: Callable[[Callable, int], Any] | None = None) -> Any:
    """A JSON value standing for a default ``value``, equal for equal defaults in either library.

    Numbers keep their type (``1`` and ``1.0`` differ: ``inject_hyperparams`` keeps ``int``
    parameters static); dtypes become their names; a gradient transformation becomes the name
    of the factory that built it; a callable its name and, when ``call`` can evaluate it at
    integer counts, its values there (compared numerically, names aside).
    """
    if value is None:
        return None
    for kind in (bool, int, float, str):  # bool first: it is an int
        if isinstance(value, kind):
            return {kind.__name__: repr(value) if kind is float else value}
    if isinstance(value, tuple | list) and not _is_transform(value):
        return {"tuple": [encode(v, call) for v in value]}
    dtype = _dtype_name(value)
    if dtype is not None:
        return {"dtype": dtype}
    if _is_transform(value):
        return {"transform": _factory_name(value.init)}
    if callable(value):
        out: dict[str, Any] = {"callable": _factory_name(value)}
        values = _samples(value, call) if call is not None else None
        if values is not None:
            out["values"] = values
        return out
    return {"object": type(value).__name__}


def _params(signature: inspect.Signature, call: Any, skip_self: bool = False) -> list[dict]:
    out = []
    for i, p in enumerate(signature.parameters.values()):
        if skip_self and i == 0 and p.name in ("self", "cls"):
            continue
        entry: dict[str, Any] = {"name": p.name, "kind": p.kind.name}
        if p.default is not p.empty:
            entry["default"] = encode(p.default, call)
        out.append(entry)
    return out


def _signature(obj: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def describe(obj: Any, call: Callable[[Callable, int], Any] | None = None) -> dict[str, Any]:
    """The comparable parts of a public object: a JSON-serialisable dict.

    ``{"kind": "namedtuple", "fields": [...], "field_defaults": {...}}`` for NamedTuple classes;
    ``{"kind": "protocol", "params": [...]}`` for ``typing.Protocol`` classes (their
    ``__call__``); ``{"kind": "class", "params": [...], "methods": {...}}`` for other classes
    (``__init__`` and the public methods they define); ``{"kind": "callable", "params": [...]}``
    for functions; ``{"kind": "other"}`` for what has no signature (type aliases, modules).
    """
    if _is_namedtuple(obj):
        return {
            "kind": "namedtuple",
            "fields": list(obj._fields),
            "field_defaults": {k: encode(v, call) for k, v in obj._field_defaults.items()},
        }
    if isinstance(obj, type) and getattr(obj, "_is_protocol", False):
        sig = _signature(obj.__call__)
        return {"kind": "protocol", "params": _params(sig, call, skip_self=True) if sig else []}
    if isinstance(obj, type):
        sig = _signature(obj)
        methods = {}
        for name, member in vars(obj).items():
            if name.startswith("_") or not callable(member) or isinstance(member, type):
                continue
            msig = _signature(member)
            if msig is not None:
                methods[name] = _params(msig, call, skip_self=True)
        fields = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        out = {"kind": "class", "params": _params(sig, call) if sig else [], "methods": methods}
        if fields:
            out["fields"] = fields
        return out
    if callable(obj) and not isinstance(obj, typing._GenericAlias | type(typing.Union)):
        sig = _signature(obj)
        if sig is not None:
            return {"kind": "callable", "params": _params(sig, call)}
    return {"kind": "other"}


# -- comparing two descriptions ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Difference:
    """One way ``ft_name`` differs from optax; ``key`` identifies it in ``DELIBERATE``."""

    ft_name: str
    what: str
    optax: str
    functrain: str
    # A functrain-only parameter with a default after optax's, or a default optax lacks.
    extra: bool = False

    @property
    def key(self) -> str:
        return f"{self.ft_name}: {self.what}"


def _same_default(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict) and "callable" in a and "callable" in b:
        va, vb = a.get("values"), b.get("values")
        if va is None and vb is None:
            return True  # neither is a function of a count; numerics are optax_parity.py's
        if va is None or vb is None:
            return False
        return len(va) == len(vb) and all(
            math.isclose(x, y, rel_tol=SAMPLE_RTOL, abs_tol=SAMPLE_RTOL) or (x != x and y != y)
            for x, y in zip(va, vb)
        )
    if isinstance(a, dict) and isinstance(b, dict) and "float" in a and "float" in b:
        x, y = float(a["float"]), float(b["float"])
        return x == y or (x != x and y != y)
    if isinstance(a, dict) and isinstance(b, dict) and "tuple" in a and "tuple" in b:
        return len(a["tuple"]) == len(b["tuple"]) and all(
            _same_default(x, y) for x, y in zip(a["tuple"], b["tuple"])
        )
    return a == b


def show(value: Any) -> str:
    """A short human form of an :func:`encode` result."""
    if value is None:
        return "None"
    if not isinstance(value, dict):
        return repr(value)
    kind, v = next(iter(value.items()))
    if kind == "tuple":
        return "(" + ", ".join(show(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if kind in ("int", "float", "bool"):
        return str(v)
    if kind == "str":
        return repr(v)
    return f"<{kind} {v}>"


_VAR = ("VAR_POSITIONAL", "VAR_KEYWORD")
_POSITIONAL = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")


def _compare_params(name: str, ref: list[dict], live: list[dict]) -> Iterator[Difference]:
    # *args / **kwargs are matched by kind: their names cannot be passed by a caller.
    def key(p: dict) -> str:
        return f"*{p['kind']}" if p["kind"] in _VAR else p["name"]

    by_name = {key(p): p for p in live}
    ref_keys = [key(p) for p in ref]
    for p in ref:
        q = by_name.get(key(p))
        label = "*args" if p["kind"] == "VAR_POSITIONAL" else p["name"]
        label = "**kwargs" if p["kind"] == "VAR_KEYWORD" else label
        if q is None:
            yield Difference(name, f"{label} missing", _param_str(p), "-")
            continue
        if p["kind"] != q["kind"]:
            yield Difference(name, f"{label} kind", p["kind"], q["kind"])
        if "default" in p or "default" in q:
            if "default" not in p or "default" not in q:
                yield Difference(
                    name,
                    f"{label} default",
                    show(p["default"]) if "default" in p else "required",
                    show(q["default"]) if "default" in q else "required",
                    # A default optax lacks breaks no ported call.
                    extra="default" not in p,
                )
            elif not _same_default(p["default"], q["default"]):
                yield Difference(name, f"{label} default", show(p["default"]), show(q["default"]))
    ref_pos = [p["name"] for p in ref if p["kind"] in _POSITIONAL]
    live_pos = [p["name"] for p in live if p["kind"] in _POSITIONAL]
    if live_pos[: len(ref_pos)] != ref_pos and all(n in live_pos for n in ref_pos):
        yield Difference(name, "positional order", ", ".join(ref_pos), ", ".join(live_pos))
    last_ref_pos = max((live_pos.index(n) for n in ref_pos if n in live_pos), default=-1)
    for q in live:
        if key(q) in ref_keys:
            continue
        # Fine when it cannot shift a positional optax argument and need not be given.
        optional = "default" in q or q["kind"] in _VAR
        after = q["kind"] not in _POSITIONAL or live_pos.index(q["name"]) > last_ref_pos
        yield Difference(name, f"{q['name']} extra", "-", _param_str(q), extra=optional and after)


def _param_str(p: dict) -> str:
    prefix = {"VAR_POSITIONAL": "*", "VAR_KEYWORD": "**"}.get(p["kind"], "")
    suffix = " (keyword-only)" if p["kind"] == "KEYWORD_ONLY" else ""
    default = f"={show(p['default'])}" if "default" in p else ""
    return f"{prefix}{p['name']}{default}{suffix}"


def compare(name: str, ref: dict[str, Any], live: dict[str, Any]) -> list[Difference]:
    """The differences of functrain's ``live`` description from optax's ``ref``, for ``name``."""
    if ref["kind"] != live["kind"]:
        return [Difference(name, "kind", ref["kind"], live["kind"])]
    out: list[Difference] = []
    if ref["kind"] == "namedtuple":
        if ref["fields"] != live["fields"]:
            out.append(
                Difference(name, "fields", ", ".join(ref["fields"]), ", ".join(live["fields"]))
            )
        for field in ref["fields"]:
            a, b = ref["field_defaults"], live["field_defaults"]
            if field in live["fields"] and (field in a) != (field in b):
                out.append(
                    Difference(
                        name,
                        f"{field} default",
                        show(a[field]) if field in a else "required",
                        show(b[field]) if field in b else "required",
                    )
                )
            elif field in a and field in b and not _same_default(a[field], b[field]):
                out.append(Difference(name, f"{field} default", show(a[field]), show(b[field])))
        return out
    if ref.get("fields", []) != live.get("fields", []):
        out.append(Difference(name, "fields", ", ".join(ref["fields"]), ", ".join(live["fields"])))
    out.extend(_compare_params(name, ref.get("params", []), live.get("params", [])))
    for method, params in ref.get("methods", {}).items():
        if method not in live.get("methods", {}):
            out.append(Difference(name, f".{method} missing", method, "-"))
        else:
            out.extend(_compare_params(f"{name}.{method}", params, live["methods"][method]))
    return out


# -- the twins: functrain's public names and optax's records -------------------------------


def functrain_names() -> dict[str, Any]:
    """Every public functrain name that could have an optax twin: ``{"tree.add": obj, ...}``."""
    import functrain as ft

    out = {}
    for prefix in TWIN_NAMESPACES:
        module = ft
        for part in prefix.strip(".").split(".") if prefix else ():
            module = getattr(module, part)
        for name in module.__all__:
            out[prefix + name] = getattr(module, name)
    return out


def resolve(table: dict[str, dict], namespace: str, name: str) -> dict | None:
    """The record of ``namespace.name`` in a recorded table, following ``same_as`` links."""
    record = table.get(namespace, {}).get(name)
    while record is not None and "same_as" in record:
        ns, _, short = record["same_as"].rpartition(".")
        record = table.get(ns, {}).get(short)
    return record


def twin(table: dict[str, dict], ft_name: str) -> tuple[str, dict] | None:
    """``(optax qualified name, record)`` of the optax twin of ``ft_name``, or ``None``."""
    prefix, _, short = ft_name.rpartition(".")
    prefix = f"{prefix}." if prefix else ""
    for namespace in TWIN_NAMESPACES.get(prefix, ()):
        for candidate in (short, f"tree_{short}") if namespace == "optax.tree_utils" else (short,):
            record = resolve(table, namespace, candidate)
            if record is not None:
                return f"{namespace}.{candidate}", record
    return None


def torch_call(fn: Callable, x: int) -> Any:
    """Calls a functrain callable default at count ``x``: an int32 tensor, else a Python int,
    else a float tensor (``torch.mean``, the default of a reduction, takes no integers; JAX's
    ``jnp.mean`` does)."""
    import torch

    try:
        return fn(torch.tensor(x, dtype=torch.int32))
    except Exception:
        pass
    try:
        return fn(x)
    except Exception:
        return fn(torch.tensor(float(x)))


def _jax_call(fn: Callable, x: int) -> Any:
    import jax.numpy as jnp

    return fn(jnp.asarray(x, jnp.int32))


def _import(namespace: str) -> Any:
    """A module by dotted name, also where it is only an attribute of its parent
    (``optax.experimental.aggregating`` is ``optax.experimental._aggregating``)."""
    try:
        return importlib.import_module(namespace)
    except ModuleNotFoundError:
        parent, _, name = namespace.rpartition(".")
        return getattr(importlib.import_module(parent), name)


def read_optax() -> dict[str, Any]:
    """Every public name of :data:`OPTAX_NAMESPACES`, described; repeats as ``same_as`` links."""
    import optax

    table: dict[str, dict] = {}
    seen: dict[int, str] = {}
    for namespace in OPTAX_NAMESPACES:
        module = _import(namespace)
        # dir(), not __all__: optax exports names (optax.scale_by_distance_over_gradients,
        # optax.transforms.unitwise_norm) that its __all__ lists do not name.
        names = [n for n in dir(module) if n[0] != "_"]
        if namespace in PRIVATE_NAMESPACES:
            names = [n for n in names if getattr(getattr(module, n), "__module__", "") == namespace]
        table[namespace] = {}
        for name in sorted(names):
            with warnings.catch_warnings():  # deprecated names warn when read
                warnings.simplefilter("ignore")
                obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            if id(obj) in seen and not isinstance(obj, int | float | str):
                table[namespace][name] = {"same_as": seen[id(obj)]}
                continue
            seen[id(obj)] = f"{namespace}.{name}"
            table[namespace][name] = describe(obj, _jax_call)
    return {"optax_version": optax.__version__, "namespaces": table}


def dump(recorded: dict[str, Any]) -> str:
    """The recorded table as JSON with one name per line, so that a diff shows what changed."""
    lines = ["{", f' "optax_version": {json.dumps(recorded["optax_version"])},', ' "namespaces": {']
    spaces = sorted(recorded["namespaces"].items())
    for i, (namespace, names) in enumerate(spaces):
        lines.append(f"  {json.dumps(namespace)}: {{")
        items = sorted(names.items())
        for j, (name, record) in enumerate(items):
            comma = "," if j < len(items) - 1 else ""
            lines.append(f"   {json.dumps(name)}: {json.dumps(record, sort_keys=True)}{comma}")
        lines.append("  }" + ("," if i < len(spaces) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def all_differences(table: dict[str, dict]) -> tuple[list[tuple[str, str]], list[Difference]]:
    """The twins ``[(ft_name, optax_name)]`` and every difference of theirs."""
    pairs, diffs, seen = [], [], set()
    for ft_name, obj in functrain_names().items():
        found = twin(table, ft_name)
        if found is None:
            continue
        optax_name, record = found
        pairs.append((ft_name, optax_name))
        if (id(obj), id(record)) not in seen:  # ft.contrib.x is ft.x: reported once, as ft.x
            seen.add((id(obj), id(record)))
            diffs.extend(compare(ft_name, record, describe(obj, torch_call)))
    return pairs, diffs


def deliberate() -> dict[str, str]:
    """``DELIBERATE`` from the test file (read with ``ast``: no pytest import here)."""
    if not TEST_FILE.exists():
        return {}
    for node in ast.parse(TEST_FILE.read_text()).body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "DELIBERATE" and node.value is not None:
            listed = ast.literal_eval(node.value)  # key -> (reason, documenting phrase)
            return {k: v[0] if isinstance(v, tuple) else v for k, v in listed.items()}
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the optax signatures read to this file")
    args = parser.parse_args(argv)
    try:
        import jax  # noqa: F401
        import optax  # noqa: F401
    except ImportError:
        print("optax_signatures: jax/optax are not installed; skipping.")
        return 0
    recorded = read_optax()
    if args.json:
        args.json.write_text(dump(recorded))
        print(f"wrote {args.json} (optax {recorded['optax_version']})")
    pairs, diffs = all_differences(recorded["namespaces"])
    reasons = deliberate()
    print("| functrain | difference | optax | functrain | class |\n|---|---|---|---|---|")
    failed = 0
    for d in diffs:
        cls = "extra" if d.extra else ("deliberate" if d.key in reasons else "DIFF")
        failed += cls == "DIFF"
        why = f": {reasons[d.key]}" if cls == "deliberate" else ""
        cell = (d.functrain if len(d.functrain) < 80 else d.functrain[:77] + "...").replace(
            "|", "\\|"
        )
        print(f"| {d.ft_name} | {d.what} | {d.optax.replace('|', '/')} | {cell} | {cls}{why} |")
    stale = sorted(set(reasons) - {d.key for d in diffs})
    print(f"\n{len(pairs)} twins compared, {len(diffs)} differences, {failed} unclassified.")
    if stale:
        print("DELIBERATE entries that no longer differ: " + "; ".join(stale))
    return 1 if failed or stale else 0


if __name__ == "__main__":
    sys.exit(main())
