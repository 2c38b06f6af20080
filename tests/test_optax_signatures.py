"""Signature parity with optax 0.2.8, checked without optax.

DESIGN: "names, signatures, defaults and numerics follow optax exactly (a user porting optax code
changes only the import)". ``tests/_optax_signatures.json`` holds the signatures of every public
name of optax 0.2.8's namespaces (``optax``, ``optax.transforms``, ``optax.schedules``,
``optax.contrib``, ``optax.tree``, ``optax.tree_utils``, ``optax.projections``,
``optax.losses``, ``optax.second_order``, ``optax.perturbations``, ``optax.assignment``,
``optax.microbatching``, ``optax.experimental.aggregating``, plus the few private modules that
hold the only optax spelling of a name functrain exports), as read from optax by
``tools/optax_signatures.py --json``. functrain's namespaces of optax's names (``ft.contrib``,
``ft.schedules``, ``ft.tree_utils``, ``ft.second_order``, ...) are compared with optax's
namespace of the same name. The tests here compare functrain's live signatures with it:
parameter names, order, kinds and defaults, NamedTuple fields and their defaults, public
methods. Regenerate the table after an optax upgrade (see the tool's header).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import sys
import typing
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "optax_signatures", ROOT / "tools" / "optax_signatures.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being built
    spec.loader.exec_module(module)
    return module


TOOL = _load_tool()
RECORDED = json.loads((Path(__file__).parent / "_optax_signatures.json").read_text())
TABLE = RECORDED["namespaces"]

# (c) Deliberate differences: "<functrain name>: <difference>" -> (reason, a phrase of the
# docstring that documents it). tools/optax_signatures.py reads this dict (with ast).
DELIBERATE = {
    "MultiSteps: accumulator_dtype default": (
        "None accumulates each leaf in its own dtype promoted to at least float32 (optax: "
        "always float32), so float64 training keeps float64 accumulators",
        "Differences from optax: ``accumulator_dtype=None``",
    ),
    "MuonDimensionNumbers: reduction_axis default": (
        "PyTorch layout: nn.Linear.weight is (out, in), so the reduction axis is -1 (optax's "
        "(in, out) kernels: 0)",
        "Difference from optax: the defaults follow PyTorch's layout",
    ),
    "MuonDimensionNumbers: output_axis default": (
        "PyTorch layout: the output axis of an (out, in) weight is -2 (optax's: 1)",
        "Difference from optax: the defaults follow PyTorch's layout",
    ),
    "MuonState: fields": (
        "no ns_coeffs: the Newton-Schulz coefficients stay arguments of the transform (Python "
        "numbers, which the fused matrix products take)",
        "optax's also holds the Newton–Schulz coefficients",
    ),
    "tree.random_like: sampler default": (
        "functrain keys: the default draws standard normals with functrain's counter-based "
        "generator from a functrain key (optax: jax.random.normal on a JAX key)",
        "Differences from optax: keys are functrain keys",
    ),
    "Schedule: kind": (
        "a typing.Protocol with the call of optax's Callable alias: both are annotations only",
        "Difference from optax: ``optax.Schedule`` is a ``Callable[[Numeric], Numeric]`` alias",
    ),
}

# (b) functrain-only extras: optional parameters after optax's (or a default optax lacks), so
# every optax call still works. Listed so that the parity report stays complete.
EXTRAS = {
    "TransformUpdateFn: extra extra": "**extra: updates take extra keyword arguments",
    "scale_by_backtracking_linesearch: early_exit extra": "stop the loop early (host read)",
    "scale_by_zoom_linesearch: early_exit extra": "stop the loop early (host read)",
    "scale_by_sophia: refresh_on_host extra": "Hessian estimates on refresh steps only",
    "sophia: refresh_on_host extra": "Hessian estimates on refresh steps only",
    "scale_by_galore: refresh_on_host extra": "SVDs on refresh steps only",
    "galore: refresh_on_host extra": "SVDs on refresh steps only",
    "scale_by_muon: ns_dtype extra": "dtype of the Newton-Schulz iteration",
    "muon: ns_dtype extra": "dtype of the Newton-Schulz iteration",
    "orthogonalize_via_newton_schulz: ns_coeffs default": "Muon's coefficients by default",
    "perturbations.Gumbel.sample: device extra": "sample() draws on a given device",
    "perturbations.Normal.sample: device extra": "sample() draws on a given device",
}

# The guard: public names of ft.optim, ft.tree, ft.contrib and ft.projections that optax 0.2.8
# does not have. A new public name must either have its optax twin in the table (and then it
# is compared) or be listed here.
FUNCTRAIN_ONLY = {
    "WeightDecayScheduleState": "state of add_decayed_weights with a scheduled rate",
    "DynamicLossScale": "torch.amp.GradScaler's loss scaling",
    "LossScaleState": "state of DynamicLossScale",
    "all_finite": "a 0-d bool of a tree's finiteness",
    "tree.TreeMismatchError": "functrain's structure error",
    "tree.flatten": "optree/jax.tree spelling",
    "tree.flatten_with_paths": "optree/jax.tree spelling",
    "tree.leaves": "optree/jax.tree spelling",
    "tree.map": "optree/jax.tree spelling",
    "tree.map_with_path": "optree/jax.tree spelling",
    "tree.path_str": "names a path in error messages",
    "tree.structure": "optree/jax.tree spelling",
    "tree.unflatten": "optree/jax.tree spelling",
}


def _twins() -> dict[str, tuple[str, dict]]:
    out = {}
    for name in TOOL.functrain_names():
        found = TOOL.twin(TABLE, name)
        if found is not None:
            out[name] = found
    return out


TWINS = _twins()
LIVE = TOOL.functrain_names()


# functrain namespaces that spell an optax namespace of the same name with the same objects.
MIRRORS = ("contrib", "schedules", "transforms", "tree_utils", "losses")


def _canonical(name: str) -> str:
    """The top-level spelling of a mirrored name: ``x`` for ``schedules.x``, ``tree.add`` for
    ``tree_utils.tree_add`` (and ``tree.NamedTupleKey`` for ``tree_utils.NamedTupleKey``)."""
    prefix, _, short = name.rpartition(".")
    if prefix == "tree_utils":
        return f"tree.{short.removeprefix('tree_')}"
    return short if prefix in MIRRORS else name


def _key_name(name: str) -> str:
    """``x`` for ``contrib.x`` when both are one object with one twin: listed once, as ``x``."""
    short = _canonical(name)
    same = short in TWINS and LIVE[short] is LIVE[name] and TWINS[short][1] is TWINS[name][1]
    return short if same else name


def _differences(name: str) -> list:
    live = TOOL.describe(LIVE[name], TOOL.torch_call)
    return TOOL.compare(_key_name(name), TWINS[name][1], live)


def test_reference_was_read_from_optax_0_2_8():
    assert RECORDED["optax_version"] == "0.2.8"
    assert set(TABLE) == set(TOOL.OPTAX_NAMESPACES)
    # Sentinels in each namespace, as optax 0.2.8 spells them (not functrain).
    params = [p["name"] for p in TOOL.resolve(TABLE, "optax", "adam")["params"]]
    assert params == ["learning_rate", "b1", "b2", "eps", "eps_root", "mu_dtype", "nesterov"]
    assert TOOL.resolve(TABLE, "optax.tree", "add")["params"][0]["name"] == "tree_x"
    assert TOOL.resolve(TABLE, "optax.tree_utils", "tree_add") is not None
    assert TOOL.resolve(TABLE, "optax.contrib", "prodigy") is not None
    assert TOOL.resolve(TABLE, "optax.projections", "projection_simplex") is not None
    assert TOOL.resolve(TABLE, "optax.schedules", "cosine_decay_schedule") is not None
    assert TOOL.resolve(TABLE, "optax.transforms", "masked") is not None
    params = TOOL.resolve(TABLE, "optax.losses", "softmax_cross_entropy_with_integer_labels")
    assert [p["name"] for p in params["params"]] == ["logits", "labels", "axis", "where"]
    assert TABLE["optax.losses"]["l2_loss"] == {"same_as": "optax.l2_loss"}
    assert "dice_loss" in TABLE["optax.losses"] and "dice_loss" not in TABLE["optax"]


def test_every_contract_name_has_a_recorded_twin():
    # The DESIGN's public optimizer contract, plus the namespaces that claim to mirror optax's.
    contract = [
        "GradientTransformation", "chain", "named_chain", "identity", "set_to_zero",
        "stateless", "apply_updates", "EmptyState", "scale", "scale_by_learning_rate",
        "scale_by_schedule", "scale_by_adam", "scale_by_rms", "scale_by_stddev",
        "scale_by_amsgrad", "scale_by_lion", "scale_by_radam", "scale_by_adamax",
        "scale_by_factored_rms", "scale_by_trust_ratio", "trace", "ema",
        "add_decayed_weights", "add_noise", "clip", "clip_by_global_norm",
        "clip_by_block_rms", "adaptive_grad_clip", "masked", "partition", "multi_transform",
        "freeze", "inject_hyperparams", "apply_if_finite", "zero_nans", "MultiSteps", "sgd",
        "adam", "adamw", "nadam", "nadamw", "radam", "amsgrad", "adamax", "rmsprop",
        "adagrad", "lion", "lamb", "lars", "adafactor", "noisy_sgd", "sign_sgd",
        "constant_schedule", "linear_schedule", "polynomial_schedule",
        "cosine_decay_schedule", "exponential_decay", "piecewise_constant_schedule",
        "piecewise_interpolate_schedule", "warmup_constant_schedule",
        "warmup_cosine_decay_schedule", "warmup_exponential_decay_schedule",
        "join_schedules", "linear_onecycle_schedule", "cosine_onecycle_schedule",
        "sgdr_schedule", "tree.add", "tree.sub", "tree.scale", "tree.add_scale",
        "tree.vdot", "tree.norm", "tree.zeros_like", "tree.ones_like", "tree.cast",
        "tree.where", "tree.allclose",
    ]  # fmt: skip
    contract += [f"{ns}.{n}" for ns in MIRRORS for n in getattr(ft, ns).__all__]
    contract += [f"projections.{n}" for n in ft.projections.__all__]
    contract += [n for n in ft.__all__ if n in ft.losses.__all__]
    assert [n for n in contract if n not in TWINS] == []


def test_guard_new_public_names_have_a_twin_or_are_listed():
    names = [*ft.optim.__all__, *(f"tree.{n}" for n in ft.tree.__all__)]
    names += [f"{ns}.{n}" for ns in MIRRORS for n in getattr(ft, ns).__all__]
    names += [f"projections.{n}" for n in ft.projections.__all__]
    names += [n for n in ft.__all__ if n in ft.losses.__all__]
    unlisted = sorted(n for n in names if n not in TWINS and n not in FUNCTRAIN_ONLY)
    assert unlisted == [], (
        f"{unlisted}: public names without an optax 0.2.8 twin in tests/_optax_signatures.json;"
        " if optax has one, regenerate the table with tools/optax_signatures.py --json, else "
        "list the name in FUNCTRAIN_ONLY"
    )
    stale = sorted(n for n in FUNCTRAIN_ONLY if n in TWINS or n not in names)
    assert stale == [], f"{stale}: in FUNCTRAIN_ONLY but compared or no longer public"


@pytest.mark.parametrize("name", sorted(TWINS))
def test_signature_matches_optax(name):
    found = {d.key: d for d in _differences(name)}
    unexpected = [
        f"{d.what}: optax {d.optax}, functrain {d.functrain}"
        for key, d in found.items()
        if key not in DELIBERATE and key not in EXTRAS
    ]
    assert unexpected == [], f"{name} differs from {TWINS[name][0]}"
    # Every listed difference of this name still exists and is classified as listed.
    own = _key_name(name)
    for key in (*DELIBERATE, *EXTRAS):
        listed = key.split(": ")[0]
        if listed == own or listed.startswith(f"{own}."):  # the name or one of its methods
            assert key in found, f"{key} is listed but no longer differs: remove it"
            assert found[key].extra == (key in EXTRAS), key


def test_listed_differences_name_compared_twins():
    for key in (*DELIBERATE, *EXTRAS):
        name = key.split(": ")[0]
        assert name in TWINS or name.rpartition(".")[0] in TWINS, key


@pytest.mark.parametrize("key", sorted(DELIBERATE))
def test_deliberate_differences_are_documented(key):
    name = key.split(": ")[0]
    reason, phrase = DELIBERATE[key]
    assert reason
    assert phrase in inspect.getdoc(LIVE[name]), f"{name}'s docstring no longer documents {key}"


def test_callable_defaults_match_optax_values():
    # adopt's clip_value_fn (optax: lambda x: x ** 0.25) and scale_by_factored_rms's
    # decay_rate_fn were evaluated by optax at integer counts; functrain's give the same.
    checked = 0
    for name, (_, record) in TWINS.items():
        for p in record.get("params", []):
            values = (p.get("default") or {}).get("values") if "default" in p else None
            if values is None:
                continue
            fn = inspect.signature(LIVE[name]).parameters[p["name"]].default
            ours = [float(TOOL.torch_call(fn, x)) for x in TOOL.SAMPLE_POINTS]
            assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(ours, values)), name
            checked += 1
    assert checked >= 3  # adopt, scale_by_adopt, scale_by_factored_rms (and contrib spellings)


def test_inject_hyperparams_state_has_the_fields_of_optaxs_class():
    # optax >= 0.1.9 returns InjectStatefulHyperparamsState (with hyperparams_states); the
    # class functrain returns has the fields of optax's InjectHyperparamsState (documented).
    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=ft.linear_schedule(1.0, 0.0, 4))
    state = tx.init({"w": torch.zeros(2)})
    assert type(state) is ft.InjectHyperparamsState
    assert list(state._fields) == TOOL.resolve(TABLE, "optax", "InjectHyperparamsState")["fields"]
    stateful = TOOL.resolve(TABLE, "optax", "InjectStatefulHyperparamsState")["fields"]
    assert stateful == ["count", "hyperparams", "hyperparams_states", "inner_state"]


# -- ft.schedules / ft.transforms / ft.tree_utils / ft.losses mirror optax's namespaces -----


@pytest.mark.parametrize("namespace", MIRRORS)
def test_mirrored_namespace_reexports_the_same_objects(namespace):
    module = getattr(ft, namespace)
    for name in module.__all__:
        canonical = _canonical(f"{namespace}.{name}")
        if canonical in LIVE:  # a top-level (or ft.tree) object: the very same, not a copy
            assert LIVE[f"{namespace}.{name}"] is LIVE[canonical], f"{namespace}.{name}"
        else:
            assert namespace == "losses", f"{namespace}.{name} is not a top-level name"


@pytest.mark.parametrize("namespace", MIRRORS)
def test_mirrored_namespace_lists_the_optax_names_it_leaves_out(namespace):
    module = getattr(ft, namespace)
    left_out = sorted(set(TABLE[f"optax.{namespace}"]) - set(module.__all__))
    undocumented = [n for n in left_out if f"``{n}``" not in module.__doc__]
    assert undocumented == [], f"ft.{namespace}'s docstring does not list {undocumented}"
    provided = [n for n in module.__all__ if n not in TABLE[f"optax.{namespace}"]]
    assert provided == [], f"ft.{namespace} exports names optax.{namespace} lacks: {provided}"


# functrain namespaces that implement an optax namespace of the same name with their own objects.
OWN_NAMESPACES = (
    "second_order",
    "perturbations",
    "assignment",
    "microbatching",
    "experimental.aggregating",
)


@pytest.mark.parametrize("namespace", OWN_NAMESPACES)
def test_own_namespace_provides_every_optax_name(namespace):
    module = ft
    for part in namespace.split("."):
        module = getattr(module, part)
    # optax's modules also hold their typing imports (Any, NamedTuple, ...): not API names
    optax_names = {n for n in TABLE[f"optax.{namespace}"] if not hasattr(typing, n)}
    # typing aliases of optax (annotations only) may stay module attributes outside __all__
    missing = sorted(n for n in optax_names - set(module.__all__) if not hasattr(module, n))
    assert missing == [], f"ft.{namespace} lacks optax.{namespace}'s {missing}"
    provided = sorted(set(module.__all__) - optax_names)
    assert provided == [], f"ft.{namespace} exports names optax.{namespace} lacks: {provided}"


def test_top_level_losses_are_optax_top_level_losses():
    # optax exports some losses at its top level (optax.l2_loss): the recorded table links
    # optax.losses.<name> to optax.<name> for exactly those.
    table = TABLE["optax.losses"]
    optax_top = {n for n, r in table.items() if r.get("same_as") == f"optax.{n}"}
    ours = {n for n in ft.__all__ if n in ft.losses.__all__}
    assert ours == optax_top
    assert all(getattr(ft, n) is getattr(ft.losses, n) for n in ours)
    assert sorted(ft.losses.__all__) == sorted(table)  # every optax.losses name is provided


# -- the optax keyword spellings of ft.tree, against naive loops ---------------------------

finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)
vectors = st.lists(finite, min_size=1, max_size=4)


@given(vectors, vectors, st.lists(finite, min_size=1, max_size=4), finite)
def test_tree_functions_take_optax_keywords(x, y, extra, scalar):
    n = min(len(x), len(y), len(extra))
    x, y, extra = x[:n], y[:n], extra[:n]
    tx = {"a": torch.tensor(x, dtype=torch.float64)}
    ty = {"a": torch.tensor(y, dtype=torch.float64)}
    tz = {"a": torch.tensor(extra, dtype=torch.float64)}
    expect = {
        "add": [a + b + c for a, b, c in zip(x, y, extra)],
        "sub": [a - b for a, b in zip(x, y)],
        "mul": [a * b for a, b in zip(x, y)],
        "add_scale": [a + scalar * b for a, b in zip(x, y)],
        "where": list(y),
    }
    got = {
        "add": ft.tree.add(tx, ty, tz),
        "sub": ft.tree.sub(tree_x=tx, tree_y=ty),
        "mul": ft.tree.mul(tree_x=tx, tree_y=ty),
        "add_scale": ft.tree.add_scale(tree_x=tx, scalar=scalar, tree_y=ty),
        "where": ft.tree.where(condition=torch.tensor(False), tree_x=tx, tree_y=ty),
    }
    for key, values in expect.items():
        for a, b in zip(got[key]["a"].tolist(), values):
            assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9), key
    two = ft.tree.add(tree_x=tx, tree_y=ty)["a"].tolist()
    assert all(math.isclose(a, b + c, abs_tol=1e-9) for a, b, c in zip(two, x, y))
    dot = float(ft.tree.vdot(tree_x=tx, tree_y=ty))
    assert math.isclose(dot, sum(a * b for a, b in zip(x, y)), rel_tol=1e-9, abs_tol=1e-6)
    nonzero = {"a": ty["a"].abs() + 1.0}
    quotients = ft.tree.div(tree_x=tx, tree_y=nonzero)["a"].tolist()
    assert all(
        math.isclose(q, a / (abs(b) + 1.0), rel_tol=1e-12) for q, a, b in zip(quotients, x, y)
    )


@given(vectors, st.booleans())
def test_tree_sum_takes_associative_reduction(x, associative):
    tree = {
        "a": torch.tensor(x, dtype=torch.float64),
        "b": torch.tensor(x[::-1], dtype=torch.float64),
    }
    got = float(ft.tree.sum(tree, associative_reduction=associative))
    assert math.isclose(got, 2 * math.fsum(x), rel_tol=1e-12, abs_tol=1e-9)


def test_tree_keyword_errors():
    a = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match="associative_reduction must be a bool"):
        ft.tree.sum(a, associative_reduction="yes")
    like = ft.tree.cast_like(tree=a, other_tree={"w": torch.zeros(2, dtype=torch.float64)})
    assert like["w"].dtype == torch.float64
    with pytest.raises(TypeError):
        ft.tree.add(a)  # optax's tree.add needs two trees too
    with pytest.raises(ft.tree.TreeMismatchError, match=r"tree_y\['w'\] is None"):
        ft.tree.sub(a, {"w": None})


# -- the comparator itself finds what it should --------------------------------------------


def _ref(tree_x, tree_y, scale=1.0, *, mask=None):  # an "optax" signature
    pass


def _renamed(a, tree_y, scale=1.0, *, mask=None):
    pass


def _reordered(tree_y, tree_x, scale=1.0, *, mask=None):
    pass


def _int_default(tree_x, tree_y, scale=1, *, mask=None):
    pass


def _positional_mask(tree_x, tree_y, scale=1.0, mask=None):
    pass


def _with_extras(tree_x, tree_y, scale=1.0, *, mask=None, fast=False):
    pass


def _required_extra(tree_x, tree_y, fast, scale=1.0, *, mask=None):
    pass


class _Fields(NamedTuple):
    count: int
    mu: float = 0.0


class _FewerFields(NamedTuple):
    count: int


@pytest.mark.parametrize(
    ("live", "expected"),
    [
        (_ref, set()),
        (_renamed, {"f: tree_x missing", "f: a extra"}),
        (_reordered, {"f: positional order"}),
        (_int_default, {"f: scale default"}),
        (_positional_mask, {"f: mask kind"}),
        (_with_extras, {"f: fast extra"}),
        (_required_extra, {"f: fast extra", "f: positional order"}),
    ],
)
def test_compare_finds_each_kind_of_difference(live, expected):
    diffs = TOOL.compare("f", TOOL.describe(_ref), TOOL.describe(live))
    assert {d.key for d in diffs} == expected
    extras = {d.key for d in diffs if d.extra}
    assert extras == ({"f: fast extra"} if live is _with_extras else set())


def test_compare_namedtuple_fields_and_encodings():
    diffs = TOOL.compare("S", TOOL.describe(_Fields), TOOL.describe(_FewerFields))
    assert [d.key for d in diffs] == ["S: fields"]
    # Defaults keep their type and dtypes compare by name across libraries.
    assert TOOL.encode(1) != TOOL.encode(1.0) and TOOL.encode(None) != TOOL.encode(0)
    assert TOOL.encode(torch.float32) == {"dtype": "float32"}
    assert TOOL.encode(ft.scale_by_adam()) == {"transform": "scale_by_adam"}
