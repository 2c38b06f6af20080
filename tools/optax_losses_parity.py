"""Differential check of ``ft.losses`` against the real ``optax.losses``, in float64.

Every loss of ``optax.losses`` 0.2.8 is run in both libraries on the same random inputs
(float64 through JAX's x64 mode), with the settings that matter (axes, ``where`` masks,
integer labels out of range, ``-inf`` logits, paddings, reductions...). The table gives, for
each case, the largest relative error of the values (``max|a - b| / max|b|``, NaNs and
infinities must coincide) and of the gradients with respect to every floating input (of the
sum of the outputs: ``jax.grad`` against ``torch.autograd``), then the same cases in float32
(values only, where both libraries round differently).

``tools/optax_parity.py`` compares transforms, schedules and ``ft.tree`` on gradient pytrees;
losses take integer labels, masks and paddings, hence this separate script.

Needs ``jax`` and ``optax`` (not project dependencies): run it from a separate environment,
``pip install torch "jax[cpu]" optax && pip install -e .``, then
``python tools/optax_losses_parity.py [name filters]``. Exits 0 (with a message) when optax is
missing, 1 when a case fails. Not part of the test suite.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError:
    print("optax_losses_parity: jax/optax are not installed; skipping.")
    sys.exit(0)

import functrain as ft

jax.config.update("jax_enable_x64", True)

TOL = 1e-12  # float64 values and gradients
TOL32 = 2e-5  # float32 values


@dataclass(frozen=True)
class Case:
    """``name(*args, **kwargs)`` in both libraries; ``grads``: the floating args to compare."""

    name: str
    settings: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    grads: tuple[int, ...] = ()
    tol: float = TOL
    why: str = ""


class Lib:
    """A marker resolved per library: ``Lib(ft=..., ox=...)``."""

    def __init__(self, ft: Any, ox: Any) -> None:
        self.values = {"ft": ft, "ox": ox}


def _convert(lib: str, x: Any, dtype: str) -> Any:
    if isinstance(x, Lib):
        return x.values[lib]
    if not isinstance(x, np.ndarray):
        return x
    if x.dtype.kind == "f":
        x = x.astype(dtype)
    return torch.tensor(x) if lib == "ft" else jnp.asarray(x)


def _fn(lib: str, name: str) -> Callable[..., Any]:
    return getattr(ft.losses, name) if lib == "ft" else getattr(optax.losses, name)


def _outputs(out: Any) -> list[Any]:
    return list(out) if isinstance(out, tuple) else [out]


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def run(case: Case, dtype: str = "float64") -> tuple[float, float]:
    """(value error, gradient error) of ``case``."""
    ft_args = [_convert("ft", a, dtype) for a in case.args]
    ox_args = [_convert("ox", a, dtype) for a in case.args]
    ft_kw = {k: _convert("ft", v, dtype) for k, v in case.kwargs.items()}
    ox_kw = {k: _convert("ox", v, dtype) for k, v in case.kwargs.items()}
    grads = case.grads if dtype == "float64" else ()
    for i in grads:
        ft_args[i] = ft_args[i].clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optax.convex_kl_divergence warns when called
        ft_out = _fn("ft", case.name)(*ft_args, **ft_kw)
        ox_out = _fn("ox", case.name)(*ox_args, **ox_kw)
    # float32 inputs: functrain's results are float32; optax's are too, except where its
    # constants take JAX's default float dtype, which x64 mode makes float64 (one_hot, ctc).
    value_err = rel_err(ft_out, ox_out, check_dtype=dtype == "float64")
    if dtype != "float64" and any(x.dtype != torch.float32 for x in _outputs(ft_out)):
        value_err = float("inf")
    if not grads:
        return value_err, 0.0
    ft_grads = torch.autograd.grad(_first(ft_out).sum(), [ft_args[i] for i in grads])

    def total(*xs: Any) -> Any:
        args = list(ox_args)
        for i, x in zip(grads, xs):
            args[i] = x
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _first(_fn("ox", case.name)(*args, **ox_kw)).sum()

    ox_grads = jax.grad(total, argnums=tuple(range(len(grads))))(*[ox_args[i] for i in grads])
    return value_err, rel_err(list(ft_grads), list(ox_grads))


def rel_err(a: Any, b: Any, check_dtype: bool = False) -> float:
    """Max over outputs of ``max|a - b| / max|b|``; NaN and ±inf positions must coincide."""
    a = list(a) if isinstance(a, tuple | list) else [a]
    b = list(b) if isinstance(b, tuple | list) else [b]
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x.detach()), np.asarray(y)
        if x.shape != y.shape or (check_dtype and str(x.dtype) != str(y.dtype)):
            return float("inf")
        x, y = x.astype(np.float64), y.astype(np.float64)
        if not np.array_equal(np.isnan(x), np.isnan(y)):
            return float("inf")
        inf = np.isinf(x) | np.isinf(y)
        if not np.array_equal(x[inf], y[inf]):
            return float("inf")
        ok = ~np.isnan(x) & ~inf
        if ok.any():
            diff = np.abs(x[ok] - y[ok]).max()
            worst = max(worst, diff / max(np.abs(y[ok]).max(), 1e-30))
    return worst


def cases() -> list[Case]:
    rng = np.random.default_rng(0)

    def n(*shape: int, scale: float = 1.0) -> np.ndarray:
        return scale * rng.standard_normal(shape)

    def probs(*shape: int, axis: int = -1) -> np.ndarray:
        e = np.exp(n(*shape))
        return e / e.sum(axis, keepdims=True)

    def ints(high: int, *shape: int, low: int = 0) -> np.ndarray:
        return rng.integers(low, high, shape)

    def mask(*shape: int, p: float = 0.7) -> np.ndarray:
        return rng.random(shape) < p

    logits, onehot = n(6, 5, scale=2.0), np.eye(5)[ints(5, 6)]
    x3 = n(4, 3, 5)
    blocked = n(4, 5)
    blocked[:, 1] = -np.inf
    hard = np.eye(5)[np.array([0, 2, 3, 4])]
    labels_oob = np.array([0, -1, 4, 5, -6, 2])
    full_where = mask(6, 5)
    full_where[0] = False  # one example with no included class
    out = []
    add = out.append
    # -- classification ------------------------------------------------------------------
    sbce = "sigmoid_binary_cross_entropy"
    add(Case(sbce, "binary labels", (n(4, 5, scale=3), ints(2, 4, 5).astype(float)), grads=(0, 1)))
    add(Case(sbce, "soft labels, broadcast (5,)", (n(4, 5, scale=3), rng.random(5)), grads=(0, 1)))
    add(Case(sbce, "extreme logits ±60", (n(4, 5, scale=60), rng.random((4, 5))), grads=(0,)))
    add(Case(sbce, "integer labels", (n(4, 5), ints(2, 4, 5)), grads=(0,)))
    focal = "sigmoid_focal_loss"
    add(Case(focal, "default", (n(4, 5, scale=3), ints(2, 4, 5).astype(float)), grads=(0,)))
    add(Case(focal, "alpha=0.25, gamma=2", (n(4, 5, scale=3), ints(2, 4, 5).astype(float)),
             {"alpha": 0.25}, grads=(0,)))  # fmt: skip
    add(Case(focal, "soft labels, gamma=0.5", (n(4, 5, scale=3), rng.random((4, 5))),
             {"gamma": 0.5}, grads=(0, 1)))  # fmt: skip
    add(Case(focal, "extreme logits ±40, gamma=1.5",
             (n(4, 5, scale=40), ints(2, 4, 5).astype(float)), {"gamma": 1.5}, grads=(0,)))  # fmt: skip
    sce = "softmax_cross_entropy"
    add(Case(sce, "one-hot", (logits, onehot), grads=(0, 1)))
    add(Case(sce, "probabilities", (logits, probs(6, 5)), grads=(0, 1)))
    add(Case(sce, "axis=0", (logits, probs(6, 5, axis=0)), {"axis": 0}, grads=(0, 1)))
    add(Case(sce, "axis=(1, 2)", (x3, probs(4, 15).reshape(4, 3, 5)), {"axis": (1, 2)},
             grads=(0, 1)))  # fmt: skip
    add(Case(sce, "axis=None", (x3, probs(60).reshape(4, 3, 5)), {"axis": None}, grads=(0,)))
    add(Case(sce, "where (logits shape)", (logits, probs(6, 5)), {"where": full_where},
             grads=(0,)))  # fmt: skip
    add(Case(sce, "where (batch shape)", (logits, probs(6, 5)), {"where": mask(6)}, grads=(0,)))
    add(Case(sce, "-inf logit, label 0 (NaN, as optax)", (blocked, hard)))
    add(Case("safe_softmax_cross_entropy", "-inf logit, label 0", (blocked, hard), grads=(0,)))
    add(Case("safe_softmax_cross_entropy", "probabilities", (logits, probs(6, 5)), grads=(0, 1)))
    sci = "softmax_cross_entropy_with_integer_labels"
    add(Case(sci, "labels", (logits, ints(5, 6)), grads=(0,)))
    add(Case(sci, "labels -1, -6, 5 (wrap, NaN)", (logits, labels_oob), grads=(0,)))
    add(Case(sci, "axis=0", (logits, ints(6, 5)), {"axis": 0}, grads=(0,)))
    add(Case(sci, "axis=(2, 1) flat labels", (n(2, 3, 4, 2), ints(8, 2, 2)), {"axis": (2, 1)},
             grads=(0,)))  # fmt: skip
    add(Case(sci, "where (logits shape)", (logits, ints(5, 6)), {"where": full_where},
             grads=(0,)))  # fmt: skip
    add(Case(sci, "where (batch shape)", (logits, ints(5, 6)), {"where": mask(6)}, grads=(0,)))
    add(Case(sci, "logits ~1e4", (n(6, 5, scale=1e4), ints(5, 6)), grads=(0,)))
    poly = "poly_loss_cross_entropy"
    add(Case(poly, "epsilon=2", (logits, onehot), grads=(0, 1)))
    add(Case(poly, "epsilon=-1, probabilities", (logits, probs(6, 5)), {"epsilon": -1.0},
             grads=(0, 1)))  # fmt: skip
    add(Case(poly, "axis=0", (logits, probs(6, 5, axis=0)), {"axis": 0}, grads=(0,)))
    add(Case(poly, "where (logits shape)", (logits, probs(6, 5)), {"where": full_where},
             grads=(0,)))  # fmt: skip
    # -- margin --------------------------------------------------------------------------
    pm = rng.choice([-1.0, 1.0], (4, 5))
    add(Case("hinge_loss", "", (n(4, 5, scale=2), pm), grads=(0, 1)))
    add(Case("perceptron_loss", "", (n(4, 5, scale=2), pm), grads=(0, 1)))
    add(Case("sparsemax_loss", "", (n(4, 5, scale=2), ints(2, 4, 5)), grads=(0,)))
    add(Case("multiclass_hinge_loss", "", (logits, ints(5, 6)), grads=(0,)))
    add(Case("multiclass_hinge_loss", "labels out of range", (logits, labels_oob % 7), grads=(0,)))
    add(Case("multiclass_perceptron_loss", "", (logits, ints(5, 6)), grads=(0,)))
    add(Case("multiclass_sparsemax_loss", "", (logits, ints(5, 6)), grads=(0,)))
    add(Case("multiclass_sparsemax_loss", "peaked scores", (n(6, 5, scale=10), ints(5, 6)),
             grads=(0,)))  # fmt: skip
    # -- divergences ---------------------------------------------------------------------
    log_p = np.log(probs(6, 5))
    t = probs(6, 5)
    t0 = t.copy()
    t0[:, 2] = 0.0
    for name in ("kl_divergence", "generalized_kl_divergence", "convex_kl_divergence"):
        add(Case(name, "", (log_p, t), grads=(0, 1)))
        add(Case(name, "zero targets", (log_p, t0), grads=(0,)))
        add(Case(name, "axis=0, where", (log_p, t), {"axis": 0, "where": mask(6, 5)}, grads=(0,)))
        add(Case(name, "axis=None", (log_p, t), {"axis": None}, grads=(0, 1)))
    add(Case("kl_divergence_with_log_targets", "", (log_p, np.log(t)), grads=(0, 1)))
    add(Case("kl_divergence_with_log_targets", "where", (log_p, np.log(t)),
             {"where": mask(6, 5)}, grads=(0, 1)))  # fmt: skip
    # -- regression ----------------------------------------------------------------------
    a, b = n(4, 5, scale=3), n(4, 5, scale=3)
    for name in ("squared_error", "l2_loss", "huber_loss", "log_cosh"):
        add(Case(name, "", (a, b), grads=(0, 1)))
        add(Case(name, "targets=None", (a,), grads=(0,)))
    add(Case("huber_loss", "delta=0.5, broadcast targets", (a, b[0]), {"delta": 0.5},
             grads=(0, 1)))  # fmt: skip
    add(Case("log_cosh", "errors ~100", (n(4, 5, scale=100),), grads=(0,)))
    for name in ("cosine_similarity", "cosine_distance"):
        add(Case(name, "", (a, b), grads=(0, 1)))
        add(Case(name, "epsilon=1e-3, small vectors", (a * 1e-3, b), {"epsilon": 1e-3},
                 grads=(0, 1)))  # fmt: skip
        add(Case(name, "axis=(1, 2), where", (x3, n(4, 3, 5)),
                 {"axis": (1, 2), "where": mask(4, 3, 5)}, grads=(0, 1)))  # fmt: skip
    add(Case("smooth_labels", "alpha=0.1", (onehot, 0.1), grads=(0,)))
    add(Case("smooth_labels", "axis=0", (onehot, 0.2), {"axis": 0}))
    add(Case("smooth_labels", "axis=None", (onehot, 0.2), {"axis": None}))
    add(Case("smooth_labels", "where", (onehot, 0.3), {"where": mask(6, 5)}))
    # -- ranking -------------------------------------------------------------------------
    rl = rng.integers(0, 3, (6, 5)).astype(float)
    rwhere = mask(6, 5)
    rwhere[2] = False  # a list with no valid item
    mean, total = Lib(torch.mean, jnp.mean), Lib(torch.sum, jnp.sum)
    rank = "ranking_softmax_loss"
    add(Case(rank, "mean", (logits, rl), grads=(0,)))
    add(Case(rank, "where (an empty list), mean", (logits, rl), {"where": rwhere}, grads=(0,)))
    add(Case(rank, "weights, sum", (logits, rl), {"weights": rng.random((6, 5)),
             "reduce_fn": total}, grads=(0,)))  # fmt: skip
    add(Case(rank, "where, reduce_fn=None", (logits, rl), {"where": rwhere, "reduce_fn": None},
             grads=(0,)))  # fmt: skip
    add(Case(rank, "all masked, mean (0)", (logits, rl), {"where": np.zeros((6, 5), bool),
             "reduce_fn": mean}, grads=(0,)))  # fmt: skip
    # -- self-supervised -----------------------------------------------------------------
    emb = n(8, 4)
    pairs = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    add(Case("ntxent", "pairs", (emb, pairs), grads=(0,)))
    add(Case("ntxent", "groups of 4, temperature 0.5", (emb, pairs // 2), {"temperature": 0.5},
             grads=(0,)))  # fmt: skip
    anchors, pos, neg = n(6, 4), n(6, 4), n(6, 4)
    add(Case("triplet_margin_loss", "", (anchors, pos, neg), grads=(0, 1, 2)))
    add(Case("triplet_margin_loss", "norm_degree=4, margin=3", (anchors, pos, neg),
             {"norm_degree": 4, "margin": 3.0}, grads=(0, 1, 2)))  # fmt: skip
    add(Case("triplet_margin_loss", "axis=0", (anchors, pos, neg), {"axis": 0}, grads=(0,)))
    # -- ctc -----------------------------------------------------------------------------
    ctc_logits = n(3, 12, 5, scale=2)
    logit_pad = np.zeros((3, 12))
    logit_pad[1, 9:] = 1.0
    logit_pad[2, 6:] = 1.0
    ctc_labels = np.array([[1, 2, 2, 3], [4, 4, 1, 0], [3, 1, 0, 0]])
    label_pad = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]], float)
    ctc_args = (ctc_logits, logit_pad, ctc_labels, label_pad)
    for name in ("ctc_loss", "ctc_loss_with_forward_probs"):
        add(Case(name, "paddings, repeats", ctc_args, grads=(0,)))
    add(Case("ctc_loss", "blank_id=2", (ctc_logits, logit_pad, ctc_labels + (ctc_labels >= 2),
             label_pad), {"blank_id": 2}, grads=(0,)))  # fmt: skip
    add(Case("ctc_loss", "unalignable (T < N)", (n(2, 2, 5), np.zeros((2, 2)),
             np.array([[1, 2, 3], [1, 1, 1]]), np.zeros((2, 3))), grads=(0,), tol=1e-10,
             why="losses ~2e5 (log_epsilon terms): gradients agree to 1e-11 of them"))  # fmt: skip
    # -- segmentation --------------------------------------------------------------------
    seg = n(2, 4, 4, 3)
    seg_t = np.eye(3)[ints(3, 2, 4, 4)]
    dice = "dice_loss"
    add(Case(dice, "multiclass", (seg, seg_t), grads=(0,)))
    add(Case(dice, "alpha=0.3, beta=0.7, class weights", (seg, seg_t),
             {"alpha": 0.3, "beta": 0.7, "class_weights": rng.random(3)}, grads=(0,)))  # fmt: skip
    add(Case(dice, "sum, ignore background", (seg, seg_t),
             {"reduction": "sum", "ignore_background": True}, grads=(0,)))  # fmt: skip
    add(Case(dice, "none, axis=(1,)", (seg, seg_t), {"reduction": "none", "axis": (1,)},
             grads=(0,)))  # fmt: skip
    add(Case(dice, "probabilities (apply_softmax=False)", (probs(2, 4, 4, 3), seg_t),
             {"apply_softmax": False}, grads=(0,)))  # fmt: skip
    add(Case(dice, "binary [B, H, W] vs [B, H, W, 1]", (n(2, 4, 4), ints(2, 2, 4, 4, 1)
             .astype(float)), grads=(0,)))  # fmt: skip
    add(Case("multiclass_generalized_dice_loss", "", (seg, seg_t), grads=(0,)))
    add(Case("multiclass_generalized_dice_loss", "ignore background", (seg, seg_t),
             {"ignore_background": True, "smooth": 0.5}, grads=(0,)))  # fmt: skip
    add(Case("binary_dice_loss", "", (n(2, 4, 4), ints(2, 2, 4, 4).astype(float)), grads=(0,)))
    # apply_sigmoid=False: optax checks (on the host) that the single channel "sums to 1", so
    # it raises for any probability but 1; functrain does not check (documented).
    add(Case("binary_dice_loss", "probabilities all 1", (np.ones((3, 6)),
             ints(2, 3, 6).astype(float)), {"apply_sigmoid": False}, grads=(0,)))  # fmt: skip
    return out


def fenchel_young_case() -> tuple[float, float]:
    """``make_fenchel_young_loss(logsumexp)`` (values and score gradients)."""
    rng = np.random.default_rng(1)
    scores, targets = rng.standard_normal((4, 3, 5)), rng.dirichlet(np.ones(5), (4, 3))
    ft_fy = ft.losses.make_fenchel_young_loss(lambda s: torch.logsumexp(s, 0))
    ox_fy = optax.losses.make_fenchel_young_loss(jax.scipy.special.logsumexp)
    s_t = torch.tensor(scores, requires_grad=True)
    ft_out = ft_fy(s_t, torch.tensor(targets))
    ox_out = ox_fy(jnp.asarray(scores), jnp.asarray(targets))
    (g_t,) = torch.autograd.grad(ft_out.sum(), [s_t])
    g_o = jax.grad(lambda s: ox_fy(s, jnp.asarray(targets)).sum())(jnp.asarray(scores))
    return rel_err(ft_out, ox_out, check_dtype=True), rel_err(g_t, g_o)


def main() -> int:
    only = sys.argv[1:]
    rows = []

    def record(name: str, settings: str, fn: Callable[[], tuple[float, float]], tol: float):
        if only and not any(k in name for k in only):
            return
        try:
            (value, grad), note = fn(), ""
        except Exception as exc:  # a crash is a failed comparison
            value = grad = float("inf")
            note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        rows.append((name, settings, value, grad, tol, note))

    all_cases = cases()
    for case in all_cases:
        settings = f"{case.settings} (tol {case.tol:g}: {case.why})" if case.why else case.settings
        record(case.name, settings, lambda case=case: run(case), case.tol)
    record("make_fenchel_young_loss", "logsumexp (softmax CE)", fenchel_young_case, TOL)
    for case in all_cases:
        record(
            case.name, f"float32: {case.settings}", lambda case=case: run(case, "float32"), TOL32
        )

    print(
        "| loss | settings | value rel. error | grad rel. error | result |\n|---|---|---|---|---|"
    )
    failed = 0
    for name, settings, value, grad, tol, note in rows:
        ok = value <= tol and grad <= tol
        failed += not ok
        print(
            f"| {name} | {settings} | {value:.1e} | {grad:.1e} | {'PASS' if ok else 'FAIL'} {note} |"
        )
    names = {r[0] for r in rows}
    public = [n for n in dir(optax.losses) if not n.startswith("_")]
    missing = sorted(set(public) - names)
    print(
        f"\n{len(rows)} comparisons, {failed} failed (float64 tolerance {TOL:g}, float32 {TOL32:g})."
    )
    if missing and not only:
        print(f"optax.losses names without a case: {', '.join(missing)}")
    return 1 if failed or (missing and not only) else 0


if __name__ == "__main__":
    sys.exit(main())
