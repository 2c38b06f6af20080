"""Derivatives THROUGH optimizer updates, functrain (``torch.func.grad``) against optax (``jax.grad``).

Meta-learning differentiates a loss of the parameters reached after a few optimizer steps with
respect to the initial parameters and the hyperparameters. For every transform case of
``tools/optax_parity.py`` (its ``tx_cases()``, built once for both libraries), in float64:

    g_i(p) = cos(p)·a + p·b               (the gradient of Σ sin(p)·a + ½‖p‖²·b: the derivative
    p_{i+1} = p_i + tx.update(g_i(p_i))    goes through the gradient too), N = 3 steps,
    L(p_0, lr) = Σ_leaves Σ p_N · w        (a, b, w fixed random trees)

and compares ``dL/dp_0`` and, when the case's learning rate is a plain number (given or the
default), ``dL/dlr`` with that number passed as a 0-d array/tensor. Line-search and MoMo cases
(``ls_*`` kinds) use their parity objective instead of ``g``; ``plateau`` cases pass
``value=`` the parity loss sequence plus the smooth loss (so Polyak steps depend on ``p``).
A case whose optax side cannot be differentiated (``lax.while_loop`` in line searches, ...) is
"not comparable", with optax's error. Statuses: PASS; WRONG (no error, derivatives differ, or
non-finite in functrain only; a central finite difference of ``L`` says which side is right);
ERROR (functrain raised); "NaN in optax only" (finite entries agree; not a failure).

Needs ``jax`` and ``optax`` (see ``tools/optax_parity.py``). Run from a directory other than the
repository root, e.g. ``cd /tmp && python /path/to/tools/optax_grad_parity.py [name filters]``.
Prints a markdown table and a summary (wrong derivatives first, then functrain errors grouped by
error); exits 1 when a case fails. Not part of the test suite.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optax_parity as op  # exits 0 when jax/optax are missing
from optax_parity import C, R, convert, resolve

import functrain as ft

jax, jnp, optax = op.jax, op.jnp, op.optax
# optax 0.2.8's add_noise without a key (the zero-noise cases): a deprecation, not a result.
warnings.filterwarnings("ignore", "Specifying a key will be required", UserWarning)

STEPS = 3
GRAD_TOL = 1e-9
# Derivatives of an O(1) loss: a reference below FLOOR in magnitude is compared absolutely (at
# GRAD_TOL·FLOOR), so COCOB's zero d/dlr (scale invariance) is not failed by optax's 3e-17.
FLOOR = 1e-3
FD_STEP, FD_TOL = 1e-5, 1e-6  # central differences: O(h²) ≈ 1e-10 truncation, 1e-11 rounding
LR = R("@lr")
# Cases of this check only: paths the parity cases leave inactive.
EXTRA = [
    op.Case("momo_adam", "lr=10: step not capped by lr, d/dvalue active", C("momo_adam", (10.0,)), "ls_quad"),
]  # fmt: skip


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _lr_param(fn: Any) -> tuple[int, Any] | None:
    """(positional index, default) of ``fn``'s ``learning_rate`` parameter, from optax."""
    try:
        params = list(inspect.signature(op.lookup("ox", fn)).parameters.values())
    except (AttributeError, TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.name == "learning_rate":
            return i, p.default
    return None


def with_lr_slot(x: Any) -> tuple[Any, float | None]:
    """``x`` with its first plain-number learning rate (depth first, outer first, a default
    included) replaced by ``R("@lr")``, and that number; ``(x, None)`` when there is none."""
    if isinstance(x, C):
        kwargs = dict(x.kwargs)
        if _is_number(kwargs.get("learning_rate")):
            lr, kwargs["learning_rate"] = kwargs["learning_rate"], LR
            return C(x.fn, x.args, kwargs), float(lr)
        slot = _lr_param(x.fn) if isinstance(x.fn, str) else None
        if slot is not None and "learning_rate" not in kwargs:
            i, default = slot
            if i < len(x.args) and _is_number(x.args[i]):
                args = (*x.args[:i], LR, *x.args[i + 1 :])
                return C(x.fn, args, kwargs), float(x.args[i])
            if i >= len(x.args) and _is_number(default):
                return C(x.fn, x.args, {**kwargs, "learning_rate": LR}), float(default)
        new_args, lr = with_lr_slot(x.args)
        if lr is not None:
            return C(x.fn, new_args, kwargs), lr
        new_kwargs, lr = with_lr_slot(kwargs)
        return (x, None) if lr is None else (C(x.fn, x.args, new_kwargs), lr)
    if isinstance(x, list | tuple | dict):
        for k in x.keys() if isinstance(x, dict) else range(len(x)):
            new, lr = with_lr_slot(x[k])
            if lr is not None:
                y = dict(x) if isinstance(x, dict) else list(x)
                y[k] = new
                return (y if isinstance(x, dict) else type(x)(y)), lr
    return x, None


class Problem:
    """The fixed inputs of one case's ``L`` (numpy), by data kind, as in ``make_data``."""

    def __init__(self, kind: str) -> None:
        rng = np.random.default_rng(7)
        shapes = op.SHAPES
        batch = (5,) if kind == "per_example" else ()
        self.kind = kind
        self.p0 = {k: rng.standard_normal(s) for k, s in shapes.items()}
        self.a = {k: rng.standard_normal((*batch, *s)) for k, s in shapes.items()}
        self.b = {k: 0.5 + rng.random((*batch, *s)) for k, s in shapes.items()}
        self.w = {k: rng.standard_normal(s) for k, s in shapes.items()}
        # Per-step additive constants and factors: a non-finite step, a large one, zero grads.
        self.add = [{k: np.zeros((*batch, *s)) for k, s in shapes.items()} for _ in range(STEPS)]
        self.mul = [1.0] * STEPS
        if kind == "nan":
            self.add[1]["b"] = self.add[1]["b"] * np.nan
            self.add[1]["w"][0, 0] = np.inf
        elif kind == "large":
            self.mul[1] = 1e3
        elif kind == "zeros":  # zero gradients for ``b``, a zero parameter ``s``
            self.b["b"] = np.zeros_like(self.b["b"])
            self.a["b"] = np.zeros_like(self.a["b"])
            self.p0["s"] = np.zeros(())
        self.values = op.make_data("plateau")["values"][:STEPS] if kind == "plateau" else None

    def loss_fn(self, lib: str, spec: C) -> Any:
        """``L(p0, lr)`` in ``lib`` ("ft" or "ox")."""
        sin, cos = (torch.sin, torch.cos) if lib == "ft" else (jnp.sin, jnp.cos)
        apply = ft.apply_updates if lib == "ft" else optax.apply_updates
        a, b, w = (convert(lib, t) for t in (self.a, self.b, self.w))
        add = [convert(lib, t) for t in self.add]
        ls = self.kind.startswith("ls_")
        f = op._problem(self.kind) if ls else None
        if ls:
            vg = (
                (lambda p: torch.func.grad_and_value(f)(p)[::-1])
                if lib == "ft"
                else jax.value_and_grad(f)
            )

        def loss(p0: Any, lr: Any = None) -> Any:
            tx = resolve(lib, spec, {"lr": lr})
            params, state = p0, tx.init(p0)
            for i in range(STEPS):
                kw: dict[str, Any] = {}
                if ls:
                    value, g = vg(params)
                    kw = {"value": value, "grad": g, "value_fn": f}
                else:
                    g = {
                        k: self.mul[i] * (cos(params[k]) * a[k] + params[k] * b[k]) + add[i][k]
                        for k in params
                    }
                    if self.values is not None:  # the plateau sequence plus the smooth loss
                        # whose gradient g is: Polyak's step differentiates through the value
                        smooth = sum(
                            (sin(params[k]) * a[k] + 0.5 * b[k] * params[k] ** 2).sum()
                            for k in params
                        )
                        kw = {"value": self.values[i] + smooth}
                u, state = tx.update(g, state, params, **kw)
                params = apply(params, u)
            return sum((params[k] * w[k]).sum() for k in params)

        return loss


def derivatives(lib: str, problem: Problem, spec: C, lr: float | None) -> tuple[Any, ...]:
    """``(L, dL/dp0, dL/dlr or None)`` as numpy/trees, computed in ``lib``."""
    loss = problem.loss_fn(lib, spec)
    p0 = convert(lib, problem.p0)
    argnums = (0,) if lr is None else (0, 1)
    args = (p0,) if lr is None else (p0, convert(lib, np.float64(lr)))
    if lib == "ft":
        grads, value = torch.func.grad_and_value(loss, argnums=argnums)(*args)
        value = value.detach().numpy()
    else:
        value, grads = jax.value_and_grad(loss, argnums=argnums)(*args)
        value = np.asarray(value)
    return value, grads[0], (grads[1] if lr is not None else None)


def _err_line(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:110]}"


def _np_leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in op.leaves(tree)]


def grad_err(ftree: Any, otree: Any) -> tuple[float, int, int, int]:
    """(max over leaves of ``max|a − b| / max(max|b|, FLOOR)`` on the entries finite in both,
    entries non-finite in functrain only, in optax only, in both). Both non-finite must be the
    same value (NaN with NaN, ``inf`` with ``inf``) or they count on both one-side counts."""
    la, lb = _np_leaves(ftree), _np_leaves(otree)
    if [x.shape for x in la] != [y.shape for y in lb]:
        return float("inf"), 0, 0, 0
    worst, ft_only, ox_only, both = 0.0, 0, 0, 0
    for x, y in zip(la, lb):
        fa, fb = np.isfinite(x), np.isfinite(y)
        both_bad = ~fa & ~fb
        differ = both_bad & ~((x == y) | (np.isnan(x) & np.isnan(y)))
        ft_only += int((~fa & fb).sum() + differ.sum())
        ox_only += int((fa & ~fb).sum() + differ.sum())
        both += int(both_bad.sum())
        ok = fa & fb
        if ok.any():
            scale = max(np.abs(y[ok]).max(), FLOOR)
            worst = max(worst, np.abs(x[ok] - y[ok]).max() / scale)
    return worst, ft_only, ox_only, both


def finite_difference(
    problem: Problem, spec: C, lr: float | None, wrt: str, mask: Any = None
) -> tuple[Any, ...]:
    """Central difference of optax's ``L`` along a fixed random direction of ``p0`` (or along
    ``lr``), and that direction: the arbiter when the two derivatives disagree."""
    loss = problem.loss_fn("ox", spec)
    rng = np.random.default_rng(11)
    v = {k: rng.standard_normal(np.shape(x)) for k, x in problem.p0.items()}
    if mask is not None:  # only along entries where functrain's derivative is finite
        v = {k: np.where(mask[k], v[k], 0.0) for k in v}

    def at(t: float) -> float:
        if wrt == "p":
            p = {k: problem.p0[k] + t * v[k] for k in v}
            return float(loss(convert("ox", p), None if lr is None else jnp.float64(lr)))
        return float(loss(convert("ox", problem.p0), jnp.float64(lr + t)))

    h = FD_STEP * (1.0 if wrt == "p" else max(abs(lr), 1e-3))
    return (at(h) - at(-h)) / (2 * h), v


def arbiter(
    problem: Problem, spec: C, lr: float | None, wrt: str, ftg: Any, oxg: Any, skip_bad: bool
) -> tuple[str, str]:
    """(which side the finite difference of ``L`` agrees with, a note); ``skip_bad``: along
    the entries where functrain's derivative is finite only."""
    try:
        mask = None
        if wrt == "p" and skip_bad:
            mask = {k: np.isfinite(np.asarray(x.detach())) for k, x in ftg.items()}
        fd, v = finite_difference(problem, spec, lr, wrt, mask)
    except Exception as exc:
        return "unknown", f"finite difference failed ({_err_line(exc)})"
    if wrt == "p":
        # functrain's non-finite entries are off the direction (v = 0 there): drop them
        ftl = [np.where(np.isfinite(x) | (not skip_bad), x, 0.0) for x in _np_leaves(ftg)]
        dirs = [sum(float((x * y).sum()) for x, y in zip(g, _np_leaves(v))) for g in (ftl, _np_leaves(oxg))]  # fmt: skip
    else:
        dirs = [float(np.asarray(g.detach() if isinstance(g, torch.Tensor) else g)) for g in (ftg, oxg)]  # fmt: skip
    ok = [abs(d - fd) <= FD_TOL * max(abs(fd), 1.0) for d in dirs]
    who = {(True, False): "functrain", (False, True): "optax", (True, True): "both"}.get(
        tuple(ok), "neither"
    )
    note = f"d/d{wrt} finite difference {fd:.6g} agrees with {who}"
    return who, f"{note} (ft {dirs[0]:.6g}, optax {dirs[1]:.6g})"


# Cases evaluated exactly at a jump of the update, where no derivative exists (finite
# differences blow up, optax gives NaN): functrain's derivative there is the branch taken's.
_JUMP = "the trust ratio is 1 at ‖p‖ = 0 exactly and ‖p‖/‖u‖ beside it: the update jumps there"
NO_DERIVATIVE = {
    ("scale_by_trust_ratio", "zero grads/params"): _JUMP,
    ("lars", "zero grads/params"): _JUMP,
}


# Cases where the update kinks at the point compared, so central differences do not settle a
# disagreement: they are reported without that arbitration, with the reason.
FD_UNSTABLE = {
    ("scale_by_galore", "callable dims, adam b1=0.5"): "Adam on a leaf whose gradient is "
    "exactly 0 (zeros data): √v = |cε| kinks there; central differences range from -11.6 to "
    "-13.4 over h = 1e-7 to 1e-3",
}


def compare(case: op.Case) -> dict[str, Any]:
    """One case's row: errors, status and a note."""
    problem = Problem(case.kind or "normal")
    spec_lr, lr = with_lr_slot(case.spec)
    row: dict[str, Any] = {"dp": None, "dlr": None, "note": "", "lr": lr, "error": ""}
    if (case.name, case.settings) in NO_DERIVATIVE:
        return {**row, "status": "not comparable", "note": NO_DERIVATIVE[case.name, case.settings]}
    # optax first: what it cannot differentiate is not comparable.
    try:
        ox = derivatives("ox", problem, spec_lr, lr)
    except Exception as exc:
        if lr is None:
            return {**row, "status": "not comparable", "note": "optax: " + _err_line(exc)}
        row["note"] = f"d/dlr n/a (optax with an array lr: {_err_line(exc)}); "
        lr, row["lr"], spec_lr = None, None, case.spec
        try:
            ox = derivatives("ox", problem, spec_lr, None)
        except Exception as exc2:
            return {**row, "status": "not comparable", "note": "optax: " + _err_line(exc2)}
    try:
        ftd = derivatives("ft", problem, spec_lr, lr)
    except Exception as exc:
        row["error"] = _err_line(exc)
        if lr is not None:  # tell a learning-rate-only failure from a whole-update one
            try:
                ftd = derivatives("ft", problem, case.spec, None)
                row["dp"] = grad_err(ftd[1], derivatives("ox", problem, case.spec, None)[1])[0]
                row["error"] = "with an array lr only: " + row["error"]
            except Exception:
                pass
        return {**row, "status": "ERROR", "note": row["note"] + row["error"]}
    dp, dp_ft_bad, dp_ox_bad, dp_both = grad_err(ftd[1], ox[1])
    dlr, lr_ft_bad, lr_ox_bad, lr_both = (0.0, 0, 0, 0) if lr is None else grad_err(ftd[2], ox[2])
    row["dp"], row["dlr"] = dp, (None if lr is None else dlr)
    dL = grad_err(ftd[0], ox[0])
    tol = GRAD_TOL if case.tol == op.TOL else max(GRAD_TOL, 100 * case.tol)
    if dp_ox_bad or lr_ox_bad:
        row["note"] += f"non-finite in optax only: {dp_ox_bad} of d/dp, {lr_ox_bad} of d/dlr; "
    if dp_both or lr_both:  # parity, but no use to a meta-learner
        row["note"] += f"non-finite in both: {dp_both} of d/dp, {lr_both} of d/dlr; "
    if dp_ft_bad or lr_ft_bad:
        row["note"] += f"non-finite in functrain only: {dp_ft_bad} of d/dp, {lr_ft_bad} of d/dlr; "
    if max(dp, dlr) <= tol and not (dp_ft_bad or lr_ft_bad):
        row["status"] = "PASS" if not (dp_ox_bad or lr_ox_bad) else "NaN in optax only"
    else:
        row["status"] = "DIFF (documented)" if case.doc else "WRONG"
        if dL[0] > max(tol, 1e-12) or dL[1] or dL[2]:
            row["note"] += f"L itself differs by {dL[0]:.1e} (a value mismatch); "
    unstable = FD_UNSTABLE.get((case.name, case.settings))
    if unstable is not None and row["status"] == "NaN in optax only":
        row["note"] += f"no finite-difference check: {unstable}; "
    elif row["status"] != "PASS":  # the finite difference tells which side is right
        checks = (("p", dp > tol or dp_ft_bad or dp_ox_bad), ("lr", dlr > tol or lr_ft_bad or lr_ox_bad))  # fmt: skip
        for g, (wrt, bad) in enumerate(checks, 1):
            if bad:
                skip = row["status"] == "NaN in optax only"
                who, note = arbiter(problem, spec_lr, lr, wrt, ftd[g], ox[g], skip)
                row["note"] += note + "; "
                if row["status"] == "NaN in optax only" and who not in ("functrain", "both"):
                    row["status"] = "WRONG"  # functrain's finite value is not the derivative
    if tol != GRAD_TOL:
        row["note"] += f"tol {tol:g}: {case.why}"
    return row


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def main() -> int:
    only = sys.argv[1:]
    cases = [c for c in op.tx_cases() + EXTRA if not only or any(k in c.name for k in only)]
    rows = []
    start = time.perf_counter()
    for n, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        row = compare(case)
        rows.append((case, row, time.perf_counter() - t0))
        if n % 50 == 0:
            jax.clear_caches()  # as tools/optax_parity.py: jit caches exhaust memory maps
    total = time.perf_counter() - start

    print("| name | settings | d/dparams rel err | d/dlr rel err | status |\n|---|---|---|---|---|")
    for case, row, _ in rows:
        status = row["status"] + (f": {row['note']}" if row["note"] else "")
        lr = "" if row["lr"] is None else f" [d/dlr at {row['lr']:g}]"
        print(
            f"| {case.name} | {case.settings}{lr} | {_fmt(row['dp'])} | {_fmt(row['dlr'])} "
            f"| {status.rstrip('; ')} |"
        )

    by_status: dict[str, list] = defaultdict(list)
    for case, row, _ in rows:
        by_status[row["status"]].append((case, row))
    print(f"\n{len(rows)} cases in {total:.0f} s (N={STEPS} steps, float64, tol {GRAD_TOL:g}): ")
    print(", ".join(f"{len(v)} {k}" for k, v in sorted(by_status.items())) + ".")
    sections = (
        ("WRONG", "Wrong derivatives (no error raised; the finite difference says which is right)"),
        ("ERROR", "functrain raised"),
        ("NaN in optax only", "NaN in optax only, functrain finite and confirmed by the finite "
         "difference (e.g. jax's max passes a NaN cotangent to the unselected side as 0·NaN)"),
        ("not comparable", "Not comparable (optax cannot differentiate these either)"),
    )  # fmt: skip
    for status, title in sections:
        print(f"\n{title}:")
        for case, row in by_status[status]:
            errs = f"d/dp {_fmt(row['dp'])}, d/dlr {_fmt(row['dlr'])}; "
            print(f"- {case.name} ({case.settings}): {errs * (status != 'not comparable')}"
                  f"{row['note'].rstrip('; ')}")  # fmt: skip
        if not by_status[status]:
            print("- none")
    errors: dict[str, list[str]] = defaultdict(list)
    for case, row in by_status["ERROR"]:
        errors[row["error"]].append(f"{case.name} ({case.settings})")
    if errors:
        print("\nfunctrain errors, grouped:")
    for err, names in sorted(errors.items(), key=lambda kv: -len(kv[1])):
        print(f"- {err}\n  {len(names)}: {'; '.join(names)}")
    slow = sorted(rows, key=lambda r: -r[2])[:5]
    print("\nSlowest: " + ", ".join(f"{c.name} ({c.settings}) {t:.1f} s" for c, _, t in slow))
    return 1 if by_status["WRONG"] or by_status["ERROR"] else 0


if __name__ == "__main__":
    sys.exit(main())
