"""Differential check of functrain against the real optax, in float64.

For every functrain transform, alias, wrapper, schedule and ``ft.tree`` function whose name also
exists in optax, this builds both with the same hyperparameters (each case in ``CASES`` is
written once, with :class:`C` standing for "this name, called in either library"), runs 20
steps on the same random float64 gradients and compares updates, parameters and schedule
values. It prints a markdown table and the names it could not compare.

Needs ``jax`` and ``optax`` (not project dependencies): run it from a separate environment, e.g.
``pip install torch "jax[cpu]" optax && pip install -e .`` then ``python tools/optax_parity.py``.
Exits 0 (with a message) when optax is missing, 1 when a case fails. Not part of the test suite.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optree
import torch

try:
    import jax
    import jax.numpy as jnp
    import optax
    import optax.contrib._sophia
except ImportError:
    print("optax_parity: jax/optax are not installed; skipping (pip install 'jax[cpu]' optax).")
    sys.exit(0)

import functrain as ft

jax.config.update("jax_enable_x64", True)
# Schedules of an integer tensor count compute in the default dtype: make it float64, as
# jax's with x64, so the comparison measures the formulas rather than float32 rounding.
torch.set_default_dtype(torch.float64)

TOL = 1e-12
STEPS = 20
SHAPES = {"w": (4, 3), "b": (3,), "s": (), "k": (2, 3, 2)}
MASK = {"w": True, "b": False, "s": False, "k": True}
LABELS = {"w": "a", "b": "b", "s": "b", "k": "a"}
# optax.contrib._sophia: scale_by_sophia is not exported by optax.contrib 0.2.8
OPTAX_NAMESPACES = (optax, optax.transforms, optax.schedules, optax.contrib, optax.contrib._sophia)


# Names whose cases are in tools/optax_parity_namespaces.py (optax 0.2.8's newer namespaces).
_MOMENTS = (
    "bias_correction",
    "update_infinity_moment",
    "update_moment",
    "update_moment_per_elem_norm",
)
_TREE_RANDOM = ("random_like", "split_key_like", "unwrap_random_key_data")
_TOP = ("WrappedSchedule", "inject_stateful_hyperparams", "matrix_inverse_pth_root", "microbatch")
_TOP += ("multi_normal", "nnls", "power_iteration", "scale_gradient", *_MOMENTS)
_TOP += ("init_empty_state", "lookahead", "tree_map_params", "value_and_grad_from_state")
_TREE_REST = ("allclose", "batch_shape", "cast", "cast_like", "conj", "dtype", "get")
_TREE_REST += ("get_all_with_path", "map_params", "min", "real", "set", "size", "where")
NAMESPACES_TOOL = (*_TOP, *(f"tree.{n}" for n in (*_MOMENTS, *_TREE_RANDOM, *_TREE_REST)))


@dataclass(frozen=True)
class C:
    """``fn(*args, **kwargs)`` with ``fn`` (a name, or another ``C``) taken from either library."""

    fn: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def c(fn: Any, *args: Any, **kwargs: Any) -> C:
    return C(fn, args, kwargs)


@dataclass(frozen=True)
class R:
    """A reference to a library object (``R("adam")``) or to the run's data (``R("@g")``)."""

    name: str


def every_k(step: Any) -> Any:
    return 1 + 2 * (step >= 4)  # an int schedule written once for torch and jax counts


def ndim_mask(p: Any) -> dict[str, bool]:
    # Written with .ndim only, so the same callable works on torch and jax pytrees.
    return {k: v.ndim > 1 for k, v in p.items()}


def muon_in_out(p: Any) -> dict[str, Any]:
    """Muon axes given as optax's ``(in, out)`` layout, in either library's class (``k`` is a
    stack of two matrices); ``None`` (AdamW) for the other leaves. A masked-out leaf (``None``,
    optax's ``MaskedNode``) stays as it is: optax's tree maps need the update's own node there."""

    def axes(v: Any) -> Any:
        if not hasattr(v, "ndim"):
            return v
        if v.ndim < 2:
            return None
        lib = ft if isinstance(v, torch.Tensor) else optax.contrib
        return lib.MuonDimensionNumbers(0, 1) if v.ndim == 2 else lib.MuonDimensionNumbers(1, 2)

    return {k: axes(v) for k, v in p.items()}


def double_plus_param(u: Any, p: Any) -> dict[str, Any]:
    return {k: 2 * u[k] + 0.5 * p[k] for k in u}


def galore_dims(p: Any) -> dict[str, Any]:
    """GaLore axes in either library's class: ``w`` transposed, ``k`` as (k2, k0·k1)."""

    def axes(v: Any) -> Any:
        lib = ft if isinstance(v, torch.Tensor) else optax.contrib
        if v.ndim == 2:
            return lib.GaLoreDimensionNumbers(-1, 0)
        return lib.GaLoreDimensionNumbers(2, (0, 1)) if v.ndim == 3 else None

    return {k: axes(v) for k, v in p.items()}


def sophia_diag(u: Any, p: Any) -> dict[str, Any]:
    """A deterministic stand-in for a Hessian diagonal, of either sign (Hutchinson's can be
    negative), written once for torch and jax dict trees."""
    return {k: u[k] * p[k] + 0.3 * u[k] ** 2 for k in u}


def fixed_probe_hvp() -> Any:
    """Hutchinson's ``z * (H z)`` with a fixed alternating probe (no RNG), from the line-search
    runner's ``value_fn=``: torch's reverse-over-reverse product against JAX's jvp."""

    def probe(x: Any) -> Any:
        z = (-1.0) ** np.arange(int(np.prod(x.shape))).reshape(x.shape)
        return torch.tensor(z) if isinstance(x, torch.Tensor) else jnp.asarray(z)

    def update(u: Any, s: Any, params: Any = None, value_fn: Any = None, **kw: Any) -> Any:
        z = {k: probe(v) for k, v in params.items()}
        if isinstance(params["w"], torch.Tensor):
            hz = torch.func.vjp(torch.func.grad(value_fn), params)[1](z)[0]
        else:
            hz = jax.jvp(jax.grad(value_fn), (params,), (z,))[1]
        return {k: z[k] * hz[k] for k in z}, s

    return optax.GradientTransformationExtraArgs(lambda p: (), update)


def lookup(lib: str, name: str) -> Any:
    if lib == "ft":
        obj = ft
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    for ns in OPTAX_NAMESPACES:
        obj = ns
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AttributeError(f"optax has no {name}")


WIDE_COUNTS = True  # off for the float32 pass, where float64 schedule values would promote


def _count_as_int64(schedule: Callable[[Any], Any], count: Any) -> Any:
    # optax divides its int32 count in float32 even with x64 on; an int64 count gives the
    # float64 value of its formula, which is what functrain's float64 run computes.
    return schedule(jnp.asarray(count, jnp.int64))


def resolve(lib: str, x: Any, data: dict[str, Any]) -> Any:
    if isinstance(x, C):
        fn = lookup(lib, x.fn) if isinstance(x.fn, str) else resolve(lib, x.fn, data)
        fn = resolve(lib, fn, data) if isinstance(fn, R) else fn
        args = [resolve(lib, a, data) for a in x.args]
        out = fn(*args, **{k: resolve(lib, v, data) for k, v in x.kwargs.items()})
        if lib == "ox" and x.fn in ft.optim.schedules.__all__ and WIDE_COUNTS:
            return functools.partial(_count_as_int64, out)
        return out
    if isinstance(x, R):
        return data[x.name[1:]] if x.name.startswith("@") else lookup(lib, x.name)
    if isinstance(x, dict):
        return {k: resolve(lib, v, data) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(resolve(lib, v, data) for v in x)
    if x is np.float64:
        return torch.float64 if lib == "ft" else jnp.float64
    return x


def convert(lib: str, tree: Any, dtype: str = "float64") -> Any:
    if lib == "ft":
        return optree.tree_map(lambda a: torch.tensor(a, dtype=getattr(torch, dtype)), tree)
    return optree.tree_map(lambda a: jnp.asarray(a, dtype=dtype), tree)


def leaves(tree: Any) -> list[np.ndarray]:
    out = optree.tree_leaves(tree, namespace="functrain")
    return [np.asarray(x.detach() if isinstance(x, torch.Tensor) else x) for x in out]


def same_structure(a: Any, b: Any) -> bool:
    """Same number of leaves, and the same shape and floating dtype leaf by leaf."""
    la, lb = leaves(a), [np.asarray(v) for v in jax.tree.leaves(b)]
    return len(la) == len(lb) and all(
        x.shape == y.shape and (x.dtype.kind != "f" or x.dtype == y.dtype) for x, y in zip(la, lb)
    )


def rel_err(a: Any, b: Any) -> float:
    """Max over leaves of ``max|a − b| / max|b|``; NaNs must coincide; shapes must match."""
    if not same_structure(a, b):
        return float("inf")
    worst = 0.0
    for x, y in zip(leaves(a), (np.asarray(v) for v in jax.tree.leaves(b))):
        x, y = x.astype(np.float64), y.astype(np.float64)
        if not np.array_equal(np.isnan(x), np.isnan(y)):
            return float("inf")
        ok = ~np.isnan(x)
        if not ok.any():
            continue
        diff = np.abs(x[ok] - y[ok]).max(initial=0.0)
        worst = max(worst, diff / max(np.abs(y[ok]).max(initial=0.0), 1e-30))
    return worst


def make_data(kind: str, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def tree(scale: float = 1.0) -> dict[str, np.ndarray]:
        return {k: scale * rng.standard_normal(s) for k, s in SHAPES.items()}

    grads = [tree() for _ in range(STEPS)]
    if kind == "nan":  # three non-finite steps in a row, then finite ones
        for i in (3, 4, 5, 9):
            grads[i]["b"] = grads[i]["b"] * np.nan
        grads[4]["w"][0, 0] = np.inf
    elif kind == "large":
        for i in (2, 7, 8):
            grads[i] = {k: 1e3 * v for k, v in grads[i].items()}
    elif kind == "zeros":  # exact zeros: Adagrad's 0/0 and trust ratios' zero norms
        for g in grads[:5]:
            g["b"][:] = 0.0
    elif kind == "per_example":
        grads = [{k: rng.standard_normal((5, *s)) for k, s in SHAPES.items()} for _ in grads]
    params = tree()
    values = None
    if kind == "plateau":  # a loss sequence with plateaus, small and large improvements
        values = [3.0, 2.0, 2.0, 1.99999, 2.0, 1.5, 1.49, 1.5, 1.5, 1.0, 0.99, 0.98]
        values += [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5][: STEPS - len(values)]
    if kind == "zeros":
        params["s"] = np.zeros(())
    data = {"grads": grads, "params": params, "g": grads[0], "h": tree(), "p": params}
    return data if values is None else {**data, "values": values}


def run_transform(spec: C, data: dict[str, Any], dtype: str = "float64") -> float:
    """Max error of updates and params over the run; float32 runs check dtypes/shapes only."""
    txs = {lib: resolve(lib, spec, {}) for lib in ("ft", "ox")}
    p0 = data["params"]
    if data["grads"][0]["w"].ndim == 3:  # per-example gradients: params have no batch axis
        p0 = {k: v[0] for k, v in data["grads"][0].items()}
    params = {lib: convert(lib, p0, dtype) for lib in txs}
    states = {lib: txs[lib].init(params[lib]) for lib in txs}
    apply = {"ft": ft.apply_updates, "ox": optax.apply_updates}
    worst = 0.0
    values = data.get("values")  # per-step ``value=`` (e.g. the loss for reduce_on_plateau)
    for i, g in enumerate(data["grads"]):
        out = {}
        kw = {} if values is None else {"value": values[i]}
        for lib, tx in txs.items():
            out[lib], states[lib] = tx.update(
                convert(lib, g, dtype), states[lib], params[lib], **kw
            )
            params[lib] = apply[lib](params[lib], out[lib])
        if dtype != "float64":
            ok = same_structure(out["ft"], out["ox"]) and same_structure(*params.values())
            worst = max(worst, 0.0 if ok else float("inf"))
            continue
        worst = max(worst, rel_err(out["ft"], out["ox"]), rel_err(params["ft"], params["ox"]))
    return worst


def _problem(kind: str) -> Callable[[Any], Any]:
    """A deterministic objective written once for torch and jax dict params (SHAPES)."""
    rng = np.random.default_rng(1)
    scales = {k: 0.5 + rng.random(s) for k, s in SHAPES.items()}
    targets = {k: rng.standard_normal(s) for k, s in SHAPES.items()}

    def f(p: Any) -> Any:
        lib_ft = isinstance(p["w"], torch.Tensor)
        conv = (lambda a: torch.tensor(a)) if lib_ft else jnp.asarray
        if kind == "ls_quad":
            return sum((conv(scales[k]) * (p[k] - conv(targets[k])) ** 2).sum() for k in p)
        x = p["w"].reshape(-1)
        rosen = (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()
        return rosen + sum((p[k] ** 2).sum() for k in ("b", "s", "k"))

    return f


def run_linesearch(spec: C, kind: str) -> float:
    """20 steps of ``value, grad = ...; tx.update(grad, state, params, value=, grad=, value_fn=)``
    on a quadratic or Rosenbrock objective; max error of updates and params."""
    txs = {lib: resolve(lib, spec, {}) for lib in ("ft", "ox")}
    f = _problem(kind)
    rng = np.random.default_rng(2)
    p0 = {k: 0.5 * rng.standard_normal(s) for k, s in SHAPES.items()}
    params = {lib: convert(lib, p0) for lib in txs}
    states = {lib: txs[lib].init(params[lib]) for lib in txs}
    vg = {"ft": lambda p: torch.func.grad_and_value(f)(p)[::-1], "ox": jax.value_and_grad(f)}
    apply = {"ft": ft.apply_updates, "ox": optax.apply_updates}
    worst = 0.0
    for _ in range(STEPS):
        out = {}
        for lib, tx in txs.items():
            value, grad = vg[lib](params[lib])
            out[lib], states[lib] = tx.update(
                grad, states[lib], params[lib], value=value, grad=grad, value_fn=f
            )
            params[lib] = apply[lib](params[lib], out[lib])
        worst = max(worst, rel_err(out["ft"], out["ox"]), rel_err(params["ft"], params["ox"]))
    return worst


def run_schedule(spec: C, counts: list[int]) -> float:
    fts, oxs = resolve("ft", spec, {}), resolve("ox", spec, {})
    ox = np.array([np.asarray(oxs(jnp.asarray(n, jnp.int32)), np.float64) for n in counts])
    as_int = np.array([fts(n) for n in counts], np.float64)
    as_tensor = fts(torch.tensor(counts, dtype=torch.int32)).numpy()
    return max(rel_err(as_int, ox), rel_err(as_tensor, ox))


def run_function(spec: C, data: dict[str, Any]) -> float:
    ft_out = resolve("ft", spec, {k: convert("ft", v) for k, v in data.items() if k != "grads"})
    ox_out = resolve("ox", spec, {k: convert("ox", v) for k, v in data.items() if k != "grads"})
    return rel_err(ft_out, ox_out)


def run_with_state(spec: C, data: dict[str, Any], compare_init: bool = True) -> float:
    """Like run_transform, but also compares the whole optimizer state every step (monitoring
    transforms record their measures there and leave the updates unchanged)."""
    txs = {lib: resolve(lib, spec, {}) for lib in ("ft", "ox")}
    params = {lib: convert(lib, data["params"]) for lib in txs}
    states = {lib: txs[lib].init(params[lib]) for lib in txs}
    worst = rel_err(states["ft"], states["ox"]) if compare_init else 0.0
    for g in data["grads"]:
        out = {}
        for lib, tx in txs.items():
            out[lib], states[lib] = tx.update(convert(lib, g), states[lib], params[lib])
        params["ft"] = ft.apply_updates(params["ft"], out["ft"])
        params["ox"] = optax.apply_updates(params["ox"], out["ox"])
        worst = max(worst, rel_err(out["ft"], out["ox"]), rel_err(states["ft"], states["ox"]))
    return worst


def run_complex(spec: C, data: dict[str, Any]) -> float:
    """20 steps on complex128 leaves built from two real data sets; real and imaginary parts
    of updates and parameters are compared (the real leaf ``s`` stays real)."""
    txs = {lib: resolve(lib, spec, {}) for lib in ("ft", "ox")}
    h = data["h"]

    def cplx(lib: str, t: dict[str, Any]) -> dict[str, Any]:
        z = {k: t[k] + 1j * h[k] if k != "s" else t[k] for k in t}
        if lib == "ft":
            return {k: torch.tensor(v) for k, v in z.items()}
        return {k: jnp.asarray(v) for k, v in z.items()}

    params = {lib: cplx(lib, data["params"]) for lib in txs}
    states = {lib: txs[lib].init(params[lib]) for lib in txs}
    apply = {"ft": ft.apply_updates, "ox": optax.apply_updates}
    worst = 0.0
    for g in data["grads"]:
        out = {}
        for lib, tx in txs.items():
            out[lib], states[lib] = tx.update(cplx(lib, g), states[lib], params[lib])
            params[lib] = apply[lib](params[lib], out[lib])
        for a, b in ((out["ft"], out["ox"]), (params["ft"], params["ox"])):
            pa = [np.asarray(x.detach()) for x in optree.tree_leaves(a, namespace="functrain")]
            pb = [np.asarray(x) for x in jax.tree.leaves(b)]
            if [x.dtype for x in pa] != [x.dtype for x in pb]:
                return float("inf")
            worst = max(
                worst,
                rel_err(
                    [x.real for x in pa] + [x.imag for x in pa],
                    [x.real for x in pb] + [x.imag for x in pb],
                ),
            )
    return worst


def extra_cases() -> list[tuple[str, str, C, Callable[..., float]]]:
    ema_norm = c("measure_with_ema", R("tree.norm"), 0.9)
    return [
        (
            "snapshot",
            "norm before clip",
            c(
                "chain",
                c("sgd", 0.1, 0.9),
                c("snapshot", "n", R("tree.norm")),
                c("clip_by_global_norm", 0.5),
            ),
            run_with_state,
        ),
        (
            "snapshot",
            "tree measure |u|",
            c("snapshot", "abs", lambda u: {k: abs(v) for k, v in u.items()}),
            run_with_state,
        ),
        (
            "monitor",
            "norm + ema norm, then clip",
            c(
                "chain",
                c("monitor", {"n": R("tree.norm"), "e": ema_norm}),
                c("clip_by_global_norm", 4.0),
            ),
            functools.partial(run_with_state, compare_init=False),
        ),
        # monitor's init fills its measurements (optax: {}), so monitor rows skip the init state.
        # optax's ema state of a boolean measure starts as bool and becomes float at step 1; functrain's is float from init (stable state dtypes), so the init state is not compared
        (
            "measure_with_ema",
            "ema(norm(w) > 4) in monitor, after init",
            c("monitor", {"f": c("measure_with_ema", lambda u: (u["w"] ** 2).sum() > 16.0, 0.8)}),
            functools.partial(run_with_state, compare_init=False),
        ),
        (
            "measure_with_ema",
            "no debias, float64 accumulator",
            c("monitor", {"e": c("measure_with_ema", R("tree.norm"), 0.7, False, np.float64)}),
            functools.partial(run_with_state, compare_init=False),
        ),
        (
            "split_real_and_imaginary",
            "adam",
            c("split_real_and_imaginary", c("adam", 0.05)),
            run_complex,
        ),
        (
            "split_real_and_imaginary",
            "sgd momentum, lr schedule",
            c("split_real_and_imaginary", c("sgd", lr_sched(), 0.9)),
            run_complex,
        ),
    ]


@dataclass(frozen=True)
class Case:
    """One comparison; ``tol`` and ``why`` for known rounding gaps, ``doc`` for documented ones."""

    name: str
    settings: str
    spec: C
    kind: str = "normal"
    tol: float = TOL
    why: str = ""
    doc: bool = False  # an intentional difference stated in the docstring: expected to differ
    doc32: str = ""  # the same, for the float32 dtype check only


def f64_decay_rate(i: Any, exponent: float) -> Any:
    """Adafactor's ``1 − (i + 1)^(−exponent)`` in float64 in either library."""
    x = i.double() if isinstance(i, torch.Tensor) else jnp.asarray(i, jnp.float64)
    return 1.0 - (x + 1.0) ** (-exponent)


F32_POW = "both compute optax's decay 1-(t+1)^-0.8 in float32; float32 pow differs by 1 ulp"
WIDER = "updates keep their dtype (optax: promoted to a wider accumulator's)"
SF_WARMUP = "optax builds the warmup inside the alias: its int32 count divides in float32"
SF_WIDER = "updates keep the params' dtype (optax: promoted to state_dtype's)"
RPROP_STALE = "optax 0.2.8 returns the previous step's update (one step stale, optax PR 1725); functrain the current one, as torch.optim.Rprop"
DOG_WIDER = "updates keep the leaf's dtype (optax: promoted by its float64 state: G in x64's default float, or param_dtype)"
RHO = "RAdam's rho-4 cancels: optax's b2**t (integer power) is 1 ulp off at t=6, torch's is not"
MADGRAD_F32 = "optax computes lambda=(lr+eps)*sqrt(k+1) in float32 from its int32 count even with x64; functrain in float64 (as the madgrad package). With lambda in float32 too they agree to 2e-12"
GALORE_SVD = "optax rounds float64 gradients to float32 for the SVD (functrain keeps float64): the projectors agree to float32 precision; their signs differ freely, which an odd base optimizer cancels while the projector is unchanged (cases refresh it only under a stateless base: a stateful one mixes states of bases with different signs)"
MECH_CANCEL = "the update is x0 - sum(s)*delta - x: O(1) parameters minus O(1) parameters leave steps ~1e-3 of them, so the base sgd-momentum's last-bit differences grow ~1e3 times (mechanize(adam) agrees exactly)"


def lr_sched() -> C:
    return c("warmup_cosine_decay_schedule", 0.0, 0.1, 4, 15, end_value=0.01)


def tx_cases() -> list[Case]:
    """Every case builds the same spec in both libraries and runs it on one data set."""
    sched = lr_sched()
    sf_warm = c("warmup_constant_schedule", 0.0, 0.05, 5)  # float64 in both (see resolve)
    # fmt: off
    return [Case(*row) if isinstance(row, tuple) else row for row in [
        ("scale_by_lbfgs", "defaults", c("scale_by_lbfgs"), "normal", 1e-10, "random gradients give indefinite curvature pairs (rho < 0); the 10-pair recursion amplifies last-bit differences of BLAS dot products (summation order)"),
        ("scale_by_lbfgs", "memory_size=3, no init scaling", c("scale_by_lbfgs", 3, False), "normal"),
        ("lbfgs", "lr=0.1, no linesearch", c("lbfgs", 0.1, linesearch=None), "normal"),
        ("lbfgs", "lr schedule, memory 4, no linesearch", c("lbfgs", sched, 4, linesearch=None), "zeros"),
        ("lbfgs", "defaults (zoom), quadratic", c("lbfgs"), "ls_quad"),
        ("lbfgs", "defaults (zoom), rosenbrock", c("lbfgs"), "ls_rosen"),
        ("lbfgs", "memory 3, backtracking, rosenbrock", c("lbfgs", None, 3, linesearch=c("scale_by_backtracking_linesearch", 25)), "ls_rosen"),
        ("scale_by_zoom_linesearch", "sgd, keep, rosenbrock", c("chain", c("sgd", 1.0), c("scale_by_zoom_linesearch", 15)), "ls_rosen"),
        ("scale_by_zoom_linesearch", "sgd, max_lr=0.5, curv 0.5, rosen", c("chain", c("sgd", 1.0), c("scale_by_zoom_linesearch", 8, 0.5, curv_rtol=0.5, approx_dec_rtol=None)), "ls_rosen"),
        ("scale_by_zoom_linesearch", "sgd, few steps (fails), quadratic", c("chain", c("sgd", 3.0), c("scale_by_zoom_linesearch", 2, initial_guess_strategy="one")), "ls_quad"),
        ("scale_by_backtracking_linesearch", "sgd, rosenbrock", c("chain", c("sgd", 1.0), c("scale_by_backtracking_linesearch", 20)), "ls_rosen"),
        ("scale_by_backtracking_linesearch", "store_grad, rtol, quad", c("chain", c("sgd", 2.0), c("scale_by_backtracking_linesearch", 10, 0.3, 0.5, 2.0, 4.0, 0.0, 1e-3, store_grad=True)), "ls_quad"),
        ("scale_by_sophia", "stateless diag, defaults", c("scale_by_sophia", hessian_diagonal_fn=c("stateless", sophia_diag)), "normal"),
        Case("scale_by_sophia", "interval 3, no clip, f64 mu", c("scale_by_sophia", 0.9, 0.8, 1e-3, 0.5, None, 3, c("stateless", sophia_diag), np.float64), "zeros", doc32=WIDER),
        ("scale_by_sophia", "large grads, clip 0.5, interval 1", c("scale_by_sophia", 0.5, 0.5, 1e-2, 2.0, 0.5, 1, c("stateless", sophia_diag)), "large"),
        ("sophia", "lr sched, wd mask, interval 2", c("sophia", sched, weight_decay=0.1, weight_decay_mask=MASK, gamma=0.05, update_interval=2, hessian_diagonal_fn=c("stateless", sophia_diag)), "normal"),
        ("sophia", "fixed-probe hvp, quadratic", c("sophia", 0.1, 0.5, 0.5, gamma=1.0, update_interval=1, hessian_diagonal_fn=c(fixed_probe_hvp)), "ls_quad"),
        ("sophia", "fixed-probe hvp, rosenbrock, interval 3", c("sophia", 0.01, update_interval=3, hessian_diagonal_fn=c(fixed_probe_hvp)), "ls_rosen"),
        Case("galore", "rank 3 (full), adam", c("galore", 0.01, rank=3), "normal", 1e-5, GALORE_SVD),
        Case("galore", "rank 1, gap 4, plain sgd base, wd mask, lr sched", c("galore", sched, 1, 4, base_optimizer=c("sgd", 1.0), weight_decay=0.1, mask=MASK), "normal", 1e-5, GALORE_SVD),
        Case("scale_by_galore", "rank 2, dims tree, sgd momentum", c("scale_by_galore", 2, 200, 0.5, c("sgd", 1.0, 0.9), {"w": c("GaLoreDimensionNumbers", 1, 0), "b": None, "s": None, "k": c("GaLoreDimensionNumbers", (0, 1), 2)}), "normal", 1e-5, GALORE_SVD),
        Case("scale_by_galore", "callable dims, adam b1=0.5", c("scale_by_galore", 2, 200, 1.0, c("scale_by_adam", 0.5), galore_dims), "zeros", 1e-5, GALORE_SVD),
        Case("scale_by_galore", "callable dims, gap 2, identity base", c("scale_by_galore", 1, 2, 3.0, c("identity"), galore_dims), "normal", 1e-5, GALORE_SVD),
        ("sgd", "lr=0.1", c("sgd", 0.1), "normal"),
        ("sgd", "momentum=0.9, nesterov", c("sgd", 0.05, momentum=0.9, nesterov=True), "normal"),
        ("sgd", "momentum, lr schedule", c("sgd", sched, momentum=0.5), "normal"),
        ("adam", "defaults", c("adam", 1e-2), "normal"),
        ("adam", "eps_root, nesterov", c("adam", 1e-2, 0.8, 0.95, 1e-3, 1e-4, nesterov=True), ""),
        ("adam", "lr schedule", c("adam", sched, b1=0.5), "normal"),
        ("adamw", "wd=0.1, mask", c("adamw", 1e-2, weight_decay=0.1, mask=MASK), "normal"),
        ("adamw", "callable mask, wd sched", c("adamw", sched, weight_decay=sched, mask=ndim_mask), ""),
        ("adamw", "nesterov", c("adamw", 1e-2, weight_decay=0.3, nesterov=True), "normal"),
        ("nadam", "defaults", c("nadam", 1e-2), "normal"),
        ("nadamw", "wd=0.2, mask", c("nadamw", 1e-2, eps_root=1e-6, weight_decay=0.2, mask=MASK), ""),
        Case("radam", "defaults", c("radam", 1e-2), tol=1e-10, why=RHO),
        ("radam", "threshold=3, nesterov", c("radam", 1e-2, 0.8, 0.9, threshold=3.0, nesterov=True), ""),
        ("amsgrad", "defaults", c("amsgrad", 1e-2), "normal"),
        ("amsgrad", "b2=0.5, eps_root", c("amsgrad", 1e-2, b2=0.5, eps_root=1e-5), "normal"),
        ("adamax", "b1=0.5, eps=1e-3", c("adamax", 1e-2, b1=0.5, eps=1e-3), "normal"),
        ("rmsprop", "defaults", c("rmsprop", 1e-2), "normal"),
        ("rmsprop", "centered, momentum, nesterov", c("rmsprop", 1e-2, 0.8, 1e-4, 0.5, False, True, 0.9, True), ""),
        ("rmsprop", "bias_correction", c("rmsprop", sched, eps_in_sqrt=False, bias_correction=True), ""),
        ("rmsprop", "centered, bias_correction", c("rmsprop", 1e-2, initial_scale=0.5, centered=True, bias_correction=True), ""),
        ("adagrad", "defaults", c("adagrad", 0.1), "normal"),
        ("adagrad", "zero grads, init=0", c("adagrad", 0.1, 0.0, eps=0.0), "zeros"),
        Case("adafactor", "defaults", c("adafactor", 0.1), tol=1e-6, why=F32_POW),
        Case("adafactor", "factored, momentum, wd", c("adafactor", 0.1, 2, 0.7, 3, momentum=0.9, dtype_momentum=np.float64, weight_decay_rate=0.1, weight_decay_mask=MASK), doc32=WIDER),
        Case("adafactor", "lr=None, no clip/scale", c("adafactor", None, multiply_by_parameter_scale=False, clipping_threshold=None, factored=False), tol=1e-6, why=F32_POW),
        ("lion", "defaults", c("lion", 1e-3), "normal"),
        ("lion", "b1=0.5, wd sched, mask", c("lion", 1e-3, 0.5, 0.9, weight_decay=sched, mask=MASK), ""),
        ("lamb", "wd=0.1, mask", c("lamb", 1e-2, weight_decay=0.1, mask=MASK), "normal"),
        ("lamb", "zero grads/params", c("lamb", 1e-2, eps=0.0, weight_decay=0.0), "zeros"),
        ("lars", "defaults", c("lars", 0.1), "normal"),
        ("lars", "wd, masks, nesterov", c("lars", 0.1, 0.1, MASK, 0.01, 1e-6, ndim_mask, 0.5, True), ""),
        ("lars", "zero grads/params", c("lars", 0.1, trust_coefficient=1.0), "zeros"),
        ("sign_sgd", "lr=0.1", c("sign_sgd", 0.1), "normal"),
        ("noisy_sgd", "eta=0 (RNGs differ)", c("noisy_sgd", 0.1, eta=0.0), "normal"),
        ("scale", "-0.3", c("scale", -0.3), "normal"),
        ("scale_by_learning_rate", "schedule, flip_sign=False", c("scale_by_learning_rate", sched, flip_sign=False), ""),
        ("scale_by_schedule", "piecewise", c("scale_by_schedule", c("piecewise_constant_schedule", 1.0, {3: 0.5, 7: 0.1})), ""),
        Case("scale_by_adam", "mu_dtype=float64, b1=0", c("scale_by_adam", 0.0, 0.5, mu_dtype=np.float64), doc32=WIDER),
        ("scale_by_amsgrad", "no bias correction", c("scale_by_amsgrad", bias_correction_mu=False, bias_correction_nu=False), ""),
        Case("scale_by_radam", "eps_root", c("scale_by_radam", eps_root=1e-6), tol=1e-10, why=RHO ),
        ("scale_by_adamax", "defaults", c("scale_by_adamax"), "normal"),
        ("scale_by_rms", "initial_scale=1", c("scale_by_rms", 0.7, 1e-3, 1.0), "normal"),
        ("scale_by_rms", "eps outside, bias corr.", c("scale_by_rms", 0.7, 1e-3, 0.0, False, True), ""),
        ("scale_by_stddev", "initial_scale=1", c("scale_by_stddev", 0.7, 1e-3, 1.0), "normal"),
        ("scale_by_stddev", "eps outside, bias corr.", c("scale_by_stddev", 0.6, 1e-3, 0.5, False, True), ""),
        ("scale_by_rss", "init=0, eps=0", c("scale_by_rss", 0.0, 0.0), "zeros"),
        ("scale_by_lion", "b1=0.8, b2=0.95", c("scale_by_lion", 0.8, 0.95), "normal"),
        ("scale_by_factored_rms", "min_dim=2, offset", c("scale_by_factored_rms", True, 0.6, 2, 2, 1e-20), ""),
        ("scale_by_factored_rms", "float64 decay_rate_fn", c("scale_by_factored_rms", min_dim_size_to_factor=3, decay_rate_fn=f64_decay_rate), ""),
        ("scale_by_sign", "", c("scale_by_sign"), "zeros"),
        ("scale_by_trust_ratio", "min_norm, coeff, eps", c("scale_by_trust_ratio", 0.5, 0.1, 1e-3), ""),
        ("scale_by_trust_ratio", "zero grads/params", c("scale_by_trust_ratio"), "zeros"),
        ("scale_by_param_block_norm", "min_scale=1", c("scale_by_param_block_norm", 1.0), "zeros"),
        ("scale_by_param_block_rms", "defaults", c("scale_by_param_block_rms"), "zeros"),
        ("trace", "decay=0.9, nesterov", c("trace", 0.9, True), "normal"),
        Case("trace", "accumulator_dtype", c("trace", 0.5, False, np.float64), doc32=WIDER),
        ("ema", "debias", c("ema", 0.8), "normal"),
        Case("ema", "no debias", c("ema", 0.8, False, np.float64), doc32=WIDER),
        ("add_decayed_weights", "wd=0.1, mask", c("add_decayed_weights", 0.1, MASK), "normal"),
        ("add_decayed_weights", "wd schedule", c("add_decayed_weights", sched, ndim_mask), ""),
        ("add_noise", "eta=0 (RNGs differ)", c("add_noise", 0.0, 0.55, 0), "normal"),
        ("clip", "max_delta=0.5", c("clip", 0.5), "normal"),
        ("clip_by_global_norm", "1.0", c("clip_by_global_norm", 1.0), "large"),
        ("clip_by_block_rms", "0.5", c("clip_by_block_rms", 0.5), "large"),
        ("adaptive_grad_clip", "axis=0 (0-d leaf masked out)", c("masked", c("adaptive_grad_clip", 0.05, axis=0), {"w": True, "b": True, "s": False, "k": True}), ""),
        Case("adaptive_grad_clip", "default axis on matrices", c("adaptive_grad_clip", 0.05), doc=True, why="unit = output row (torch layout) vs optax's last axis"),
        ("adaptive_grad_clip", "1-d/0-d leaves only", c("masked", c("adaptive_grad_clip", 0.05), {"w": False, "b": True, "s": True, "k": False}), ""),
        ("identity", "", c("identity"), "normal"),
        ("set_to_zero", "", c("set_to_zero"), "normal"),
        ("stateless", "2u + p/2", c("stateless", double_plus_param), "normal"),
        ("chain", "clip, adam, wd", c("chain", c("clip_by_global_norm", 1.0), c("adam", 0.01), c("add_decayed_weights", 0.1)), ""),
        ("named_chain", "clip, sgd", c("named_chain", ("clip", c("clip", 0.3)), ("opt", c("sgd", 0.1, 0.9))), ""),
        ("masked", "adam on a mask", c("masked", c("adam", 0.01), MASK), "normal"),
        ("masked", "callable mask", c("masked", c("trace", 0.9), ndim_mask), "normal"),
        ("partition", "adam / sgd", c("partition", {"a": c("adam", 0.01), "b": c("sgd", 0.1, 0.5)}, LABELS), ""),
        ("multi_transform", "adam / zero", c("multi_transform", {"a": c("adam", 0.01), "b": c("set_to_zero")}, LABELS), ""),
        ("freeze", "mask", c("freeze", MASK), "normal"),
        ("selective_transform", "adam, freeze mask", c("selective_transform", c("adam", 0.01), freeze_mask=MASK), ""),
        ("inject_hyperparams", "adam(lr sched)", c(c("inject_hyperparams", R("adam")), learning_rate=sched, b1=0.8), ""),
        ("inject_hyperparams", "adamw static nesterov", c(c("inject_hyperparams", R("adamw"), static_args="nesterov"), learning_rate=0.01, weight_decay=sched, nesterov=True), ""),
        ("apply_if_finite", "adam, max errors 2", c("apply_if_finite", c("adam", 0.01), 2), "nan"),
        ("zero_nans", "", c("chain", c("zero_nans"), c("sgd", 0.1, 0.9)), "nan"),
        ("MultiSteps", "k=3, adam", c("MultiSteps", c("adam", 0.01), 3, accumulator_dtype=np.float64), ""),
        Case("MultiSteps", "default accumulator_dtype", c("MultiSteps", c("adam", 0.01), 3), doc=True, why="float64 grads accumulate in float64 (optax: float32)"),
        ("MultiSteps", "k schedule, sum", c("MultiSteps", c("sgd", 0.1, 0.9), every_k, False, accumulator_dtype=np.float64), ""),
        ("MultiSteps", "skip_not_finite", c("MultiSteps", c("adam", 0.01), 2, should_skip_update_fn=R("skip_not_finite"), accumulator_dtype=np.float64), "nan"),
        ("skip_large_updates", "via MultiSteps", c("MultiSteps", c("sgd", 0.1), 1, should_skip_update_fn=c(functools.partial, R("skip_large_updates"), max_squared_norm=100.0 ), accumulator_dtype=np.float64), "large"),
        ("muon", "optax's (in, out) axes, wd", c("muon", 0.05, weight_decay=0.1, adam_weight_decay=0.01, muon_weight_dimension_numbers=muon_in_out), "normal"),
        ("muon", "adaptive, consistent_rms, lr sched", c("muon", sched, beta=0.9, adaptive=True, consistent_rms=0.2, nesterov=False), "normal"),
        ("muon", "preconditioning=spectral, (in, out) axes", c("muon", 0.05, preconditioning="spectral", muon_weight_dimension_numbers=muon_in_out), "normal"),
        ("muon", "preconditioning=aol, wd, adam_learning_rate, (in, out) axes", c("muon", 0.05, weight_decay=0.1, preconditioning="aol", adam_learning_rate=0.003, muon_weight_dimension_numbers=muon_in_out), "normal"),
        ("muon", "preconditioning=schatten, adaptive, (in, out) axes", c("muon", 0.05, adaptive=True, preconditioning="schatten", muon_weight_dimension_numbers=muon_in_out), "normal"),
        ("muon", "dion preset, aol, adam_learning_rate sched, (in, out) axes", c("muon", 0.05, "dion", preconditioning="aol", adam_learning_rate=sched, nesterov=False, muon_weight_dimension_numbers=muon_in_out), "normal"),
        ("scale_by_muon", "schatten, per-step coefficients, masked", c("masked", c("scale_by_muon", ((4.0, -4.5, 1.5), (3.4, -4.7, 2.0)), preconditioning="schatten", weight_dimension_numbers=muon_in_out), MASK), "normal"),
        ("scale_by_muon", "aol, 3 steps, (in, out) axes", c("masked", c("scale_by_muon", ns_steps=3, beta=0.9, preconditioning="aol", weight_dimension_numbers=muon_in_out), MASK), "normal"),
        ("differentially_private_aggregate", "noise 0, key=3", c("differentially_private_aggregate", 0.5, 0.0, key=3), "per_example"),
        ("differentially_private_aggregate", "noise 0, seed=4", c("differentially_private_aggregate", 2.0, 0.0, seed=4), "per_example"),
        ("scale_by_muon", "per-step coefficients, masked", c("masked", c("scale_by_muon", ((4.0, -4.5, 1.5), (3.4, -4.7, 2.0)), weight_dimension_numbers=muon_in_out), MASK), "normal"),
        ("schedule_free_adamw", "defaults", c("schedule_free_adamw"), "normal"),
        ("schedule_free_adamw", "wd, b1, b2, eps, power", c("schedule_free_adamw", 0.05, None, 0.8, 0.99, 1e-6, 0.1, 1.5), "normal"),
        Case("schedule_free_adamw", "warmup_steps=5, wd", c("schedule_free_adamw", 0.05, 5, weight_decay=0.1), tol=1e-6, why=SF_WARMUP),
        ("schedule_free_sgd", "lr=0.1", c("schedule_free_sgd", 0.1), "normal"),
        ("schedule_free_sgd", "wd, b1=0.5, power 3", c("schedule_free_sgd", 0.1, None, 0.5, 0.05, 3.0), "normal"),
        Case("schedule_free_sgd", "warmup_steps=4, wd", c("schedule_free_sgd", 0.1, 4, weight_decay=0.05), tol=1e-6, why=SF_WARMUP),
        ("schedule_free", "adamw chain, float64 warmup, wd", c("schedule_free", c("chain", c("scale_by_rms", 0.99, 1e-6, eps_in_sqrt=False, bias_correction=True), c("add_decayed_weights", 0.1), c("scale_by_learning_rate", sf_warm)), sf_warm, 0.8, 1.5), "normal"),
        Case("schedule_free", "sgd + lr schedule, state_dtype", c("schedule_free", c("sgd", sched), sched, 0.7, 2.0, np.float64), doc32=SF_WIDER),
        ("dpsgd", "noise_multiplier=0", c("dpsgd", 0.1, 1.0, 0.0, 0, 0.9, True), "per_example"),
        ("differentially_private_aggregate", "noise 0", c("differentially_private_aggregate", 1.0, 0.0, 0), "per_example"),
        ("reduce_on_plateau", "adam chain, patience=2", c("chain", c("adam", 1e-2), c("reduce_on_plateau", 0.5, 2)), "plateau"),
        ("reduce_on_plateau", "atol, cooldown=2, min_scale", c("reduce_on_plateau", 0.3, 1, 0.0, 0.05, 2, min_scale=0.05), "plateau"),
        ("reduce_on_plateau", "accumulation_size=3, rtol", c("reduce_on_plateau", 0.5, 1, 1e-2, 0.0, 1, 3), "plateau"),
        ("reduce_on_plateau", "masked in sgd chain", c("chain", c("sgd", 0.1), c("masked", c("reduce_on_plateau", 0.5, 1), MASK)), "plateau"),
        # AdaBelief, Yogi, Adadelta, Adan, AdamaxW
        ("adabelief", "defaults", c("adabelief", 1e-2), "normal"),
        ("adabelief", "nesterov, lr schedule", c("adabelief", sched, 0.8, 0.95, 1e-8, 1e-10, nesterov=True), ""),
        ("adabelief", "zero grads", c("adabelief", 1e-2), "zeros"),
        ("scale_by_belief", "b1=0.5, eps_root=1e-6", c("scale_by_belief", 0.5, 0.9, 1e-6, 1e-6), "normal"),
        ("yogi", "defaults", c("yogi", 1e-2), "normal"),
        ("yogi", "lr schedule, b2=0.9", c("yogi", sched, 0.5, 0.9, 1e-4), ""),
        ("yogi", "zero grads", c("yogi", 1e-2), "zeros"),
        ("scale_by_yogi", "eps_root, init=0", c("scale_by_yogi", 0.8, 0.95, 1e-6, 1e-5, 0.0), "normal"),
        ("adadelta", "defaults (lr=None)", c("adadelta"), "normal"),
        ("adadelta", "lr=1, wd, mask", c("adadelta", 1.0, 0.5, 1e-4, weight_decay=0.1, weight_decay_mask=MASK), ""),
        ("adadelta", "lr schedule, zero grads", c("adadelta", sched, rho=0.95), "zeros"),
        ("scale_by_adadelta", "rho=0.8, eps=1e-3", c("scale_by_adadelta", 0.8, 1e-3), "normal"),
        ("adan", "defaults", c("adan", 1e-2), "normal"),
        ("adan", "wd sched, mask", c("adan", sched, 0.9, 0.8, 0.95, 1e-6, 0.0, weight_decay=sched, mask=MASK), ""),
        ("adan", "zero grads", c("adan", 1e-2, weight_decay=0.1), "zeros"),
        ("scale_by_adan", "eps_root", c("scale_by_adan", 0.9, 0.5, 0.9, 1e-6, 1e-4), "normal"),
        ("adamaxw", "defaults", c("adamaxw", 1e-2), "normal"),
        ("adamaxw", "wd sched, mask", c("adamaxw", sched, 0.5, 0.9, 1e-3, weight_decay=sched, mask=MASK), ""),
        ("adamaxw", "callable mask, zero grads", c("adamaxw", 1e-2, weight_decay=0.3, mask=ndim_mask), "zeros"),
        # Rprop, NovoGrad, Polyak, SM3 (masked: optax has no accumulator for a 0-d leaf), optimistic, Fromage
        Case("rprop", "lr=0.01", c("rprop", 0.01), "normal", why=RPROP_STALE, doc=True),
        Case("rprop", "zeros, tight bounds", c("rprop", 0.05, 0.4, 1.5, 0.01, 0.1), "zeros", why=RPROP_STALE, doc=True),
        Case("scale_by_rprop", "lr=0.1, large", c("scale_by_rprop", 0.1), "large", why=RPROP_STALE, doc=True),
        ("novograd", "defaults", c("novograd", 1e-2), "normal"),
        ("novograd", "wd, eps_root, sched", c("novograd", sched, 0.8, 0.5, 1e-3, 1e-4, 0.01), "zeros"),
        ("scale_by_novograd", "b1=0.5, large", c("scale_by_novograd", 0.5, 0.3), "large"),
        ("scale_by_novograd", "masked", c("masked", c("scale_by_novograd"), MASK), "normal"),
        ("polyak_sgd", "defaults", c("polyak_sgd"), "plateau"),
        ("polyak_sgd", "sps+, f_min, eps, sched", c("polyak_sgd", 0.5, sched, 1.2, 1e-3, "sps+"), "plateau"),
        ("scale_by_polyak", "f_min=1.0, max_lr=0.3", c("scale_by_polyak", 1.0, 0.3), "plateau"),
        ("sm3", "masked to ndim>=2", c("masked", c("sm3", 0.1), MASK), "normal"),
        ("sm3", "momentum=0.5, 1-d too", c("masked", c("sm3", 0.1, 0.5), {"w": True, "b": True, "s": False, "k": True}), "zeros"),
        ("scale_by_sm3", "b2=0.9, eps=1e-3", c("masked", c("scale_by_sm3", 0.8, 0.9, 1e-3), {"w": True, "b": True, "s": False, "k": True}), "large"),
        ("optimistic_gradient_descent", "defaults", c("optimistic_gradient_descent", 0.01), "normal"),
        ("optimistic_gradient_descent", "alpha, beta, sched", c("optimistic_gradient_descent", sched, 0.5, 2.0), "zeros"),
        ("scale_by_optimistic_gradient", "alpha=2, beta=0.3", c("scale_by_optimistic_gradient", 2.0, 0.3), "normal"),
        ("optimistic_adam", "lr=1e-2, optimism=0.5", c("optimistic_adam", 1e-2, 0.5), "normal"),
        ("optimistic_adam", "no nesterov, eps_root", c("optimistic_adam", 1e-2, None, 0.8, 0.9, 1e-6, 1e-8, nesterov=False), "zeros"),
        ("optimistic_adam_v2", "defaults", c("optimistic_adam_v2", 1e-2), "normal"),
        ("optimistic_adam_v2", "alpha, beta, lr sched, no nesterov", c("optimistic_adam_v2", sched, alpha=0.5, beta=2.0, b1=0.8, eps_root=1e-8, nesterov=False), "zeros"),
        ("fromage", "lr=0.01", c("fromage", 0.01), "normal"),
        ("fromage", "sched, min_norm, zeros", c("fromage", sched, 1e-3), "zeros"),
        # Constraints, apply_every, AdEMAMix, conditional transforms (lookahead needs LookaheadParams: its own test)
        ("keep_params_nonnegative", "sgd(1.0) then clamp", c("chain", c("sgd", 1.0), c("keep_params_nonnegative")), "normal"),
        ("centralize", "then sgd", c("chain", c("centralize"), c("sgd", 0.1)), "normal"),
        ("apply_every", "k=3", c("apply_every", 3), "normal"),
        ("apply_every", "k=1, after adam", c("chain", c("adam", 0.01), c("apply_every")), "normal"),
        # MoMo, ACProp, MADGRAD, ADOPT, simplified AdEMAMix (optax.contrib)
        ("adopt", "defaults", c("adopt", 1e-2), "normal"),
        ("adopt", "nesterov, lr sched, zeros", c("adopt", sched, 0.8, 0.9, 1e-3, nesterov=True), "zeros"),
        ("adopt", "no clipping, large", c("adopt", 1e-2, use_clipping=False), "large"),
        ("scale_by_adopt", "b2=0.5, masked", c("masked", c("scale_by_adopt", 0.5, 0.5), MASK), "normal"),
        Case("madgrad", "defaults", c("madgrad", 1e-2), "normal", tol=1e-6, why=MADGRAD_F32),
        Case("madgrad", "wd, momentum=0.5, sched, zeros", c("madgrad", sched, 0.5, 0.1, 1e-4), "zeros", tol=1e-5, why=MADGRAD_F32),
        Case("scale_by_madgrad", "momentum=0, large", c("scale_by_madgrad", 0.05, 0.0), "large", tol=1e-6, why=MADGRAD_F32),
        ("momo", "defaults", c("momo"), "ls_quad"),
        ("momo", "lr sched, wd, adapt_lower_bound", c("momo", sched, 0.8, 0.1, 0.01, True), "ls_quad"),
        ("momo", "beta=0.5, lower_bound=-1", c("momo", 0.5, 0.5, -1.0), "ls_quad"),
        ("momo_adam", "defaults", c("momo_adam"), "ls_quad"),
        ("momo_adam", "lr sched, wd, adapt_lower_bound", c("momo_adam", sched, 0.8, 0.99, 1e-6, 0.0, 0.01, True), "ls_rosen"),
        ("momo_adam", "plateau, lower_bound=0.2", c("momo_adam", 0.1, lower_bound=0.2, adapt_lower_bound=True), "plateau"),
        ("acprop", "defaults", c("acprop", 1e-2), "normal"),
        ("acprop", "wd sched, mask, zeros", c("acprop", sched, 0.8, 0.9, 1e-8, 1e-10, sched, MASK), "zeros"),
        ("scale_by_acprop", "b1=0.5, large", c("scale_by_acprop", 0.5, 0.99), "large"),
        ("simplified_ademamix", "defaults", c("simplified_ademamix", 1e-2), "normal"),
        ("simplified_ademamix", "alpha sched, wd, mask, zeros", c("simplified_ademamix", sched, 0.9, 0.8, c("linear_schedule", 0.0, 5.0, 10), 1e-6, 1e-4, 0.1, MASK), "zeros"),
        ("scale_by_simplified_ademamix", "alpha=2, large", c("scale_by_simplified_ademamix", 0.95, 0.9, 2.0), "large"),
        ("scale_by_ademamix", "defaults", c("scale_by_ademamix"), "normal"),
        ("scale_by_ademamix", "b3/alpha schedules, eps_root", c("scale_by_ademamix", 0.8, 0.95, c("linear_schedule", 0.9, 0.999, 10), c("linear_schedule", 0.0, 8.0, 10), 1e-6, 1e-4), "zeros"),
        ("ademamix", "defaults", c("ademamix", 1e-2), "normal"),
        ("ademamix", "lr sched, wd, mask", c("ademamix", sched, b3=0.99, weight_decay=0.1, mask=MASK), "normal"),
        ("flatten", "adamw", c("flatten", c("adamw", 0.01, weight_decay=0.1)), "normal"),
        ("flatten", "clip + lamb (one trust ratio)", c("flatten", c("chain", c("clip_by_global_norm", 0.5), c("lamb", 0.01))), "normal"),
        # SAM (optax.contrib): transparent mode, one call per adversarial or outer step
        ("normalize", "then sgd", c("chain", c("normalize"), c("sgd", 0.1)), "normal"),
        ("sam", "sgd, normalize + sgd", c("sam", c("sgd", 0.05), c("chain", c("normalize"), c("sgd", 0.1))), "normal"),
        ("sam", "adam, momentum adv, period 3, no reset", c("sam", c("adam", 0.05), c("sgd", 0.02, momentum=0.5), sync_period=3, reset_state=False), "normal"),
        ("sam", "adamw, period 4, reset", c("sam", c("adamw", 0.01, weight_decay=0.1), c("sgd", 0.02, momentum=0.5), sync_period=4), "zeros"),
        ("conditionally_transform", "adam on odd steps", c("conditionally_transform", c("adam", 0.01), lambda step: step % 2 == 1), "normal"),
        ("conditionally_mask", "sgd momentum from step 5", c("conditionally_mask", c("sgd", 0.1, 0.9), lambda step: step >= 5), "normal"),
        ("signum", "defaults", c("signum", 1e-2), "normal"),
        ("signum", "beta=0.5, lr schedule", c("signum", sched, 0.5), "zeros"),
        ("normalize_by_update_norm", "defaults", c("normalize_by_update_norm"), "normal"),
        ("normalize_by_update_norm", "scale=-0.1, eps=0", c("normalize_by_update_norm", -0.1, 0.0), "zeros"),
        Case("scale_by_distance_over_gradients", "defaults, mask (a 0-d leaf's optax update is (1,))", c("masked", c("scale_by_distance_over_gradients"), MASK), "normal", doc32=DOG_WIDER),
        Case("scale_by_distance_over_gradients", "float64 init params, scale -1, mask", c("masked", c("scale_by_distance_over_gradients", 1e-4, param_dtype=np.float64, global_scale=-1.0), MASK), "normal", doc32=DOG_WIDER),
        Case("scale_by_distance_over_gradients", "eps=1e-3, zeros, mask", c("masked", c("scale_by_distance_over_gradients", 1e-2, 1e-3, np.float64), MASK), "zeros", doc32=DOG_WIDER),
        # Learning-rate-free optimizers of optax.contrib (scale_by_dog/dowg are reached through dog(-1.0)/dowg(-1.0): optax.contrib does not export them)
        ("prodigy", "defaults", c("prodigy"), "normal"),
        ("prodigy", "lr sched, betas, beta3, wd, coef, d0", c("prodigy", c("linear_schedule", 1.0, 0.1, 15), (0.8, 0.95), 0.9, 1e-6, 1e-3, 2.0, 0.1), "normal"),
        ("prodigy", "warmup from 0: NaN d in both", c("prodigy", sched), "normal"),
        ("prodigy", "safeguard_warmup, zeros", c("prodigy", 1.0, estim_lr0=1e-2, safeguard_warmup=True), "zeros"),
        ("dadapt_adamw", "defaults", c("dadapt_adamw"), "normal"),
        ("dadapt_adamw", "lr sched, betas, eps, d0, wd", c("dadapt_adamw", c("linear_schedule", 1.0, 0.1, 15), (0.5, 0.9), 1e-6, 1e-2, 0.1), "zeros"),
        ("dog", "lr -1 (scale_by_dog), distance 1e-2", c("dog", -1.0, ("distance", 1e-2)), "normal"),
        ("dog", "heuristic 1e-3, eps 1e-4, zeros", c("dog", 0.5, ("heuristic", 1e-3), 1e-4), "zeros"),
        ("dog", "learning_rate 0.1", c("dog", 1.0, ("learning_rate", 0.1)), "normal"),
        ("dog", "defaults", c("dog"), "normal"),
        ("dog", "lr sched, wd, mask", c("dog", sched, ("learning_rate", 0.05), 1e-6, 0.1, MASK), "normal"),
        ("dowg", "lr -1 (scale_by_dowg), init 0.5, eps 1e-6", c("dowg", -1.0, 0.5, 1e-6), "zeros"),
        ("dowg", "defaults", c("dowg"), "normal"),
        ("dowg", "lr sched, wd, mask", c("dowg", sched, 1e-2, 1e-3, 0.1, ndim_mask), "normal"),
        ("mechanize", "adam(1.0), defaults", c("mechanize", c("adam", 1.0)), "normal"),
        Case("mechanize", "sgd momentum sched, wd 0, 3 betas", c("mechanize", c("sgd", sched, 0.9), 0.0, 1e-6, 1e-3, 3), tol=1e-10, why=MECH_CANCEL),
        ("mechanize", "lion, wd 0.1", c("mechanize", c("lion", 1.0), 0.1), "zeros"),
        ("scale_by_cocob", "defaults", c("scale_by_cocob"), "normal"),
        ("scale_by_cocob", "alpha 10, eps 1e-3", c("scale_by_cocob", 10.0, 1e-3), "zeros"),
        ("cocob", "defaults", c("cocob"), "normal"),
        ("cocob", "lr sched, wd, mask", c("cocob", sched, 50.0, 1e-6, 0.1, MASK), "normal"),
        ("stateless_with_tree_map", "2u + p/2", c("stateless_with_tree_map", lambda u, p: 2 * u + 0.5 * p), "normal"),
        ("with_extra_args_support", "sgd momentum", c("with_extra_args_support", c("sgd", 0.1, 0.9)), "normal"),
    ]]
    # fmt: on


def schedule_cases() -> list[tuple[str, str, C]]:
    return [
        ("constant_schedule", "0.3", c("constant_schedule", 0.3)),
        ("polynomial_schedule", "p=2, begin=5", c("polynomial_schedule", 1.0, 0.1, 2.0, 10, 5)),
        ("polynomial_schedule", "p=0.5, steps<=0", c("polynomial_schedule", 1.0, 0.1, 0.5, 0)),
        ("linear_schedule", "begin=3", c("linear_schedule", 0.2, 1.0, 7, 3)),
        ("cosine_decay_schedule", "alpha, exponent", c("cosine_decay_schedule", 2.0, 13, 0.1, 2.0)),
        ("exponential_decay", "begin, end_value", c("exponential_decay", 1.0, 4, 0.5, 3, False, 0.2)),
        ("exponential_decay", "staircase, growth", c("exponential_decay", 1.0, 3, 1.5, 0, True, 4.0)),
        ("piecewise_constant_schedule", "3 boundaries", c("piecewise_constant_schedule", 1.0, {10: 0.5, 3: 0.1, 20: 2.0})),
        ("piecewise_interpolate_schedule", "linear", c("piecewise_interpolate_schedule", "linear", 1.0, {5: 0.5, 12: 0.1})),
        ("piecewise_interpolate_schedule", "cosine", c("piecewise_interpolate_schedule", "cosine", 2.0, {1: 0.5, 30: 0.01})),
        ("warmup_constant_schedule", "", c("warmup_constant_schedule", 0.0, 1.0, 6)),
        ("warmup_cosine_decay_schedule", "end, exponent", c("warmup_cosine_decay_schedule", 0.1, 1.0, 5, 25, 0.05, 1.5)),
        ("warmup_exponential_decay_schedule", "staircase, end", c("warmup_exponential_decay_schedule", 0.0, 1.0, 4, 3, 0.5, 2, True, 0.1)),
        ("join_schedules", "const/linear/cos", c("join_schedules", [c("constant_schedule", 1.0), c("linear_schedule", 1.0, 0.0, 5), c("cosine_decay_schedule", 0.5, 7)], [4, 12])),
        ("linear_onecycle_schedule", "T=30", c("linear_onecycle_schedule", 30, 1.0, 0.25, 0.75, 10.0, 100.0)),
        ("cosine_onecycle_schedule", "T=33", c("cosine_onecycle_schedule", 33, 2.0, 0.2, 5.0, 50.0)),
        ("sgdr_schedule", "2 cycles", c("sgdr_schedule", [dict(init_value=0.1, peak_value=1.0, warmup_steps=2, decay_steps=9, end_value=0.01), dict(init_value=0.0, peak_value=0.5, warmup_steps=3, decay_steps=11)])),
    ]  # fmt: skip


def function_cases() -> list[tuple[str, str, C, str]]:
    g, h = R("@g"), R("@h")
    return [
        ("tree.add", "3 trees", c("tree.add", g, h, g), "normal"),
        ("tree.sub", "", c("tree.sub", g, h), "normal"),
        ("tree.mul", "", c("tree.mul", g, h), "normal"),
        ("tree.div", "", c("tree.div", g, h), "normal"),
        ("tree.scale", "", c("tree.scale", 0.3, g), "normal"),
        ("tree.add_scale", "", c("tree.add_scale", g, -0.7, h), "normal"),
        ("tree.vdot", "", c("tree.vdot", g, h), "normal"),
        ("tree.sum", "", c("tree.sum", g), "normal"),
        ("tree.max", "", c("tree.max", g), "normal"),
        ("tree.norm", "ord=2", c("tree.norm", g), "normal"),
        ("tree.norm", "squared", c("tree.norm", g, squared=True), "normal"),
        ("tree.norm", "ord=1", c("tree.norm", g, 1), "normal"),
        ("tree.norm", "ord=inf", c("tree.norm", g, float("inf")), "normal"),
        ("tree.clip", "[-0.5, 0.2]", c("tree.clip", g, -0.5, 0.2), "normal"),
        ("tree.full_like", "", c("tree.full_like", g, 0.25), "normal"),
        ("tree.zeros_like", "", c("tree.zeros_like", g), "normal"),
        ("tree.ones_like", "", c("tree.ones_like", g), "normal"),
        ("unitwise_norm", "axis=(0, 1)", c("unitwise_norm", R("@w"), (0, 1)), "normal"),
        ("unitwise_norm", "1-d", c("unitwise_norm", R("@b")), "normal"),
        (
            "per_example_global_norm_clip",
            "clip=1.5",
            c("per_example_global_norm_clip", R("@gl"), 1.5),
            "per_example",
        ),
        (
            "per_example_layer_norm_clip",
            "uniform, clip=1.5",
            c("per_example_layer_norm_clip", R("@gl"), 1.5),
            "per_example",
        ),
        (
            "per_example_layer_norm_clip",
            "by size, clip=2",
            c("per_example_layer_norm_clip", R("@gl"), 2.0, False),
            "per_example",
        ),
        ("global_norm", "", c("global_norm", g), "normal"),
        ("safe_norm", "2-norm, min 0.5", c("safe_norm", R("@b"), 0.5), "normal"),
        ("safe_norm", "min above the norm", c("safe_norm", R("@b"), 100.0), "normal"),
        (
            "safe_norm",
            "ord=1, axis=1, keepdims",
            c("safe_norm", R("@w2"), 1.0, 1, 1, True),
            "normal",
        ),
        ("safe_norm", "fro, axis=(0, 1)", c("safe_norm", R("@w"), 0.5, "fro", (0, 1)), "normal"),
        ("safe_root_mean_squares", "min 0.1", c("safe_root_mean_squares", R("@w"), 0.1), "normal"),
        (
            "safe_root_mean_squares",
            "min above",
            c("safe_root_mean_squares", R("@w"), 50.0),
            "normal",
        ),
        ("safe_increment", "float64 counts", c("safe_increment", R("@b")), "normal"),
        ("safe_int32_increment", "float64 counts", c("safe_int32_increment", R("@b")), "normal"),
        ("incremental_update", "step_size=0.3", c("incremental_update", g, h, 0.3), "normal"),
        ("periodic_update", "steps=6, period 3", c("periodic_update", g, h, 6, 3), "normal"),
        ("periodic_update", "steps=7, period 3", c("periodic_update", g, h, 7, 3), "normal"),
        (
            "projections.projection_non_negative",
            "tree",
            c("projections.projection_non_negative", g),
            "normal",
        ),
        (
            "projections.projection_box",
            "tree bounds [h, h + 1]",
            c("projections.projection_box", g, h, c("tree.add", h, c("tree.full_like", h, 1.0))),
            "normal",
        ),
        (
            "projections.projection_box",
            "array, scalar bounds",
            c("projections.projection_box", R("@w"), -0.5, 0.3),
            "normal",
        ),
        (
            "projections.projection_hypercube",
            "array, scale=0.5",
            c("projections.projection_hypercube", R("@w"), 0.5),
            "normal",
        ),
        (
            "projections.projection_linf_ball",
            "tree, scale=0.5",
            c("projections.projection_linf_ball", g, 0.5),
            "normal",
        ),
        (
            "projections.projection_simplex",
            "tree",
            c("projections.projection_simplex", g),
            "normal",
        ),
        (
            "projections.projection_simplex",
            "tree, scale=3",
            c("projections.projection_simplex", g, 3.0),
            "normal",
        ),
        (
            "projections.projection_simplex",
            "array, large",
            c("projections.projection_simplex", R("@w2"), 0.5),
            "large",
        ),
        (
            "projections.projection_l1_sphere",
            "tree, scale=2",
            c("projections.projection_l1_sphere", g, 2.0),
            "normal",
        ),
        (
            "projections.projection_l1_ball",
            "tree, outside",
            c("projections.projection_l1_ball", g),
            "normal",
        ),
        (
            "projections.projection_l1_ball",
            "tree, inside",
            c("projections.projection_l1_ball", g, 100.0),
            "normal",
        ),
        (
            "projections.projection_l2_sphere",
            "tree, scale=2",
            c("projections.projection_l2_sphere", g, 2.0),
            "normal",
        ),
        (
            "projections.projection_l2_ball",
            "tree, outside",
            c("projections.projection_l2_ball", g, 1.5),
            "normal",
        ),
        (
            "projections.projection_l2_ball",
            "tree, inside",
            c("projections.projection_l2_ball", g, 100.0),
            "normal",
        ),
        (
            "projections.projection_vector",
            "tree",
            c("projections.projection_vector", g, h),
            "normal",
        ),
        (
            "projections.projection_hyperplane",
            "tree, b=0.5",
            c("projections.projection_hyperplane", g, h, 0.5),
            "normal",
        ),
        (
            "projections.projection_halfspace",
            "tree, violated",
            c("projections.projection_halfspace", g, h, -5.0),
            "normal",
        ),
        (
            "projections.projection_halfspace",
            "tree, satisfied",
            c("projections.projection_halfspace", g, h, 50.0),
            "normal",
        ),
        ("skip_not_finite", "nan step", c("skip_not_finite", R("@g"), 3, None), "nan"),
        (
            "skip_large_updates",
            "max sq norm 10",
            c("skip_large_updates", g, 3, None, 10.0),
            "normal",
        ),
    ]


def function_data(kind: str) -> dict[str, Any]:
    data = make_data(kind)
    g = data["grads"][4] if kind == "nan" else data["g"]
    return {**data, "g": g, "w": g["k"], "w2": g["w"], "b": g["b"], "gl": [g[k] for k in sorted(g)]}


def state_field_cases() -> list[tuple[str, str]]:
    """State NamedTuples present in both libraries: their field names must agree."""
    rows = []
    for name in sorted(set(ft.__all__) & set(dir(optax))):
        a, b = getattr(ft, name), getattr(optax, name)
        if hasattr(a, "_fields") or hasattr(b, "_fields"):
            same = getattr(a, "_fields", None) == getattr(b, "_fields", None)
            rows.append((name, f"fields {getattr(a, '_fields', None)}", 0.0 if same else np.inf))
    return rows


def main() -> int:
    only = sys.argv[1:]  # optional name filters
    rows: list[tuple[str, str, float, Case | None, str]] = []

    def record(name: str, settings: str, fn: Callable[[], float], case: Case | None = None):
        if only and not any(k in name for k in only):
            return
        try:
            err, note = fn(), ""
        except Exception as exc:  # a crash is a failed comparison
            err, note = float("inf"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:70]}"
        rows.append((name, settings, err, case, note))
        # Every case jit-compiles its own executables; kept, their code mappings exhausted
        # vm.max_map_count (65530) near the end of a full run (LLVM: cannot allocate memory).
        # Dropped after every case, the recompiles took the run past 20 minutes.
        if len(rows) % 50 == 0:
            jax.clear_caches()

    datasets = {
        k: make_data(k) for k in ("normal", "nan", "large", "zeros", "per_example", "plateau")
    }
    for case in tx_cases():
        if case.kind.startswith("ls_"):
            record(
                case.name,
                case.settings,
                functools.partial(run_linesearch, case.spec, case.kind),
                case,
            )
            continue
        data = datasets[case.kind or "normal"]
        record(case.name, case.settings, functools.partial(run_transform, case.spec, data), case)
    for name, settings, spec, runner in extra_cases():
        record(name, settings, lambda spec=spec, runner=runner: runner(spec, datasets["normal"]))
    counts = [*range(41), 50, 99, 100, 101, 1000, 10**6]
    for name, settings, spec in schedule_cases():
        record(name, settings, functools.partial(run_schedule, spec, counts))
    for name, settings, spec, kind in function_cases():
        record(name, settings, lambda spec=spec, kind=kind: run_function(spec, function_data(kind)))
    for name, settings, err in state_field_cases():
        record(name, settings, lambda err=err: err)
    global WIDE_COUNTS
    WIDE_COUNTS = False
    for case in tx_cases():  # float32: every leaf keeps optax's dtype and shape
        if case.kind.startswith("ls_"):
            continue
        data = datasets[case.kind or "normal"]
        run = functools.partial(run_transform, case.spec, data, "float32")
        doc32 = Case(case.name, "", case.spec, doc=True, why=case.doc32) if case.doc32 else None
        record(case.name, f"float32 dtypes/shapes; {case.settings}", run, doc32)

    print("| name | settings | max rel. error | result |\n|---|---|---|---|")
    failed = 0
    for name, settings, err, case, note in rows:
        tol, doc = (case.tol, case.doc) if case else (TOL, False)
        ok = err <= tol
        result = "PASS" if ok else ("DIFF (documented)" if doc else "FAIL")
        failed += not ok and not doc
        why = f" tol {tol:g}: {case.why}" if case and (case.why or tol != TOL) else ""
        print(f"| {name} | {settings} | {err:.1e} | {result}{why} {note} |")
    compared = {r[0] for r in rows}
    skipped = {
        "tree": "module; its functions are compared as tree.*",
        "apply_updates": "used by every transform run",
        "GradientTransformation": "container type (fields compared)",
        "TransformInitFn": "protocol type",
        "TransformUpdateFn": "protocol type",
        "Schedule": "protocol type",
        "add_noise/noisy_sgd/dpsgd noise": "RNGs differ by design (jax threefry vs a counter hash): "
        "compared with zero noise only",
        **{
            n: "a loss: compared by tools/optax_losses_parity.py"
            for n in ft.losses.__all__
            if n in ft.__all__
        },
        **{n: "compared by tools/optax_parity_namespaces.py" for n in NAMESPACES_TOOL},
    }
    common = sorted(set(ft.__all__) & set(dir(optax)) | {"dpsgd"})
    missing = [n for n in common if n not in compared and n not in skipped]
    print(f"\n{len(rows)} comparisons, {failed} failed, default tolerance {TOL:g}.\n")
    print("Not compared:")
    for name in sorted(skipped) + missing:
        print(f"- {name}: {skipped.get(name, 'no case written')}")
    unported = sorted(
        n
        for n in dir(ft.tree)
        if not n.startswith("_")
        and callable(getattr(optax.tree, n, None))
        and inspect.isfunction(getattr(ft.tree, n))
        and f"tree.{n}" not in compared
        and f"tree.{n}" not in NAMESPACES_TOOL
    )
    if unported and not only:
        print(f"- tree.{', tree.'.join(unported)}: no case written")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
