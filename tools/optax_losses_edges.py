"""Edge-case comparison of ``ft.losses`` with the real ``optax.losses`` (0.2.8).

``tools/optax_losses_parity.py`` compares ordinary inputs; this one feeds both libraries the
inputs that break losses: ``±inf`` and NaN logits (``-inf`` is how masked vocabularies are
written), rows that are all ``-inf``, huge logits, empty batches, 0-d inputs, a single class,
integer labels of every width, labels out of range, masks that are all ``False``, tuple and
empty ``axis``, broadcasting, float16/bfloat16, points where a loss has a kink (Huber at
``δ``, hinge at the margin, ties in a max), zero vectors, zero targets and impossible CTC
alignments. For each case it compares the values and the gradients (of the sum of the first
output, ``torch.autograd`` against ``jax.grad``) and reports where they differ: NaN/inf
positions, dtypes, values beyond the dtype's tolerance, or an error on one side only.

A difference that is deliberate (functrain finite where optax's gradient is NaN, an error
where optax returns a meaningless value...) is listed with its reason in ``KNOWN`` and does
not fail the run; any other one does. The run takes a few minutes (JAX compiles each case).

Needs ``jax`` and ``optax`` (not project dependencies): run it from a separate environment,
``pip install torch "jax[cpu]" optax && pip install -e .``, then
``python tools/optax_losses_edges.py [-v] [name filters]`` (``-v``: every case, not only the
differences). Exits 0 (with a message) when optax is missing, 1 when an unexplained case
differs. Not part of the test suite.
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
    import ml_dtypes
    import optax
except ImportError:
    print("optax_losses_edges: jax/optax are not installed; skipping.")
    sys.exit(0)

import functrain as ft

jax.config.update("jax_enable_x64", True)

BF16 = np.dtype(ml_dtypes.bfloat16)
TOLS = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-2, "bfloat16": 2e-2}
INF, NAN = np.inf, np.nan


@dataclass(frozen=True)
class Edge:
    """``name(*args, **kwargs)`` in both libraries; ``grads``: the floating args to compare."""

    name: str
    settings: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    grads: tuple[int, ...] = ()


class Lib:
    """A marker resolved per library: ``Lib(ft=..., ox=...)``."""

    def __init__(self, ft: Any, ox: Any) -> None:
        self.values = {"ft": ft, "ox": ox}


def _convert(lib: str, x: Any) -> Any:
    if isinstance(x, Lib):
        return x.values[lib]
    if isinstance(x, dict):
        return {k: _convert(lib, v) for k, v in x.items()}
    if not isinstance(x, np.ndarray):
        return x
    if lib == "ox":
        return jnp.asarray(x)
    if x.dtype == BF16:
        return torch.tensor(x.astype(np.float32)).to(torch.bfloat16)
    return torch.tensor(x)


def _fn(lib: str, name: str) -> Callable[..., Any]:
    if name == "make_fenchel_young_loss":
        if lib == "ft":
            return ft.losses.make_fenchel_young_loss(lambda s: torch.logsumexp(s, 0))
        return optax.losses.make_fenchel_young_loss(jax.scipy.special.logsumexp)
    return getattr(ft.losses, name) if lib == "ft" else getattr(optax.losses, name)


def _outputs(out: Any) -> list[Any]:
    return list(out) if isinstance(out, tuple) else [out]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x).astype(np.float32) if np.asarray(x).dtype == BF16 else np.asarray(x)


def _dtype(x: Any) -> str:
    return str(x.dtype).removeprefix("torch.")


def _side(lib: str, case: Edge) -> tuple[str, Any, Any]:
    """``("ok", outputs, grads)`` or ``("raise", "Type: message", None)``."""
    args = [_convert(lib, a) for a in case.args]
    kwargs = _convert(lib, case.kwargs)
    fn = _fn(lib, case.name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optax.convex_kl_divergence warns when called
            if lib == "ft":
                for i in case.grads:
                    args[i] = args[i].clone().requires_grad_(True)
                out = fn(*args, **kwargs)
                grads = None
                if case.grads:
                    grads = torch.autograd.grad(
                        _outputs(out)[0].sum(), [args[i] for i in case.grads],
                        allow_unused=True, materialize_grads=True,
                    )  # fmt: skip
                return "ok", _outputs(out), grads

            out = fn(*args, **kwargs)

            def total(*xs: Any) -> Any:
                full = list(args)
                for i, x in zip(case.grads, xs):
                    full[i] = x
                return _outputs(fn(*full, **kwargs))[0].sum()

            grads = None
            if case.grads:
                grads = jax.grad(total, argnums=tuple(range(len(case.grads))))(
                    *[args[i] for i in case.grads]
                )
            return "ok", _outputs(out), grads
    except Exception as exc:  # an error is an outcome to compare
        return "raise", f"{type(exc).__name__}: {str(exc).splitlines()[0][:110]}", None


def _diff(a: Any, b: Any, tol: float, what: str) -> list[str]:
    """The differences between one functrain and one optax array."""
    if tuple(a.shape) != tuple(b.shape):
        return [f"{what} shape {tuple(a.shape)} vs {tuple(b.shape)}"]
    out = []
    if _dtype(a) != _dtype(b):
        out.append(f"{what} dtype {_dtype(a)} vs {_dtype(b)}")
    x, y = _np(a).astype(np.float64), _np(b).astype(np.float64)
    if not np.array_equal(np.isnan(x), np.isnan(y)):
        out.append(f"{what} NaN at {np.argwhere(np.isnan(x) != np.isnan(y))[:3].tolist()}: "
                   f"ft {x[np.isnan(x) != np.isnan(y)][:3]} vs optax "
                   f"{y[np.isnan(x) != np.isnan(y)][:3]}")  # fmt: skip
    inf = (np.isinf(x) | np.isinf(y)) & ~np.isnan(x) & ~np.isnan(y)
    if not np.array_equal(x[inf], y[inf]):
        out.append(f"{what} inf: ft {x[inf][:4]} vs optax {y[inf][:4]}")
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.any():
        # relative to the largest value, with an absolute floor of a few ulps (of 1) for
        # values that are 0 up to rounding
        atol = 16 * np.finfo(np.float16 if tol >= 1e-3 else np.float64).eps
        err = np.abs(x[ok] - y[ok]).max() / max(np.abs(y[ok]).max(), atol / tol)
        if err > tol:
            out.append(f"{what} rel. error {err:.1e}: ft {x[ok][:3]} vs optax {y[ok][:3]}")
    return out


def compare(case: Edge) -> tuple[str, str, str]:
    """(status, functrain outcome, differences): status ``same``, ``known`` or ``DIFF``."""
    ft_kind, ft_out, ft_grads = _side("ft", case)
    ox_kind, ox_out, ox_grads = _side("ox", case)
    floats = [a for a in case.args if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
    floats += [a for a in case.args if isinstance(a, np.ndarray) and a.dtype == BF16]
    tol = max((TOLS.get(str(a.dtype), 1e-12) for a in floats), default=1e-12)
    if ft_kind == "raise" or ox_kind == "raise":
        ft_note = ft_out if ft_kind == "raise" else "returns"
        if ft_kind == ox_kind:
            return "same", ft_note, ""
        diffs = f"only {'functrain' if ft_kind == 'raise' else 'optax'} raises" + (
            f" (optax: {ox_out})" if ox_kind == "raise" else ""
        )
    else:
        found = []
        if len(ft_out) != len(ox_out):
            found.append(f"{len(ft_out)} outputs vs {len(ox_out)}")
        for k, (a, b) in enumerate(zip(ft_out, ox_out)):
            found += _diff(a, b, tol, f"value[{k}]" if len(ft_out) > 1 else "value")
        for i, a, b in zip(case.grads, ft_grads or (), ox_grads or ()):
            found += _diff(a, b, max(tol, 1e-10), f"grad[{i}]")
        diffs = "; ".join(found)
        v = _np(ft_out[0]).ravel()
        ft_note = (
            f"{_dtype(ft_out[0])}{list(ft_out[0].shape)} {np.array2string(v[:4], precision=4)}"
        )
    if not diffs:
        return "same", ft_note, ""
    return ("known" if known(case) else "DIFF"), ft_note, diffs


_MASK_GRAD = "masked entries get zero gradients (optax: NaN, through its where)"
_INT_LABELS = (
    "functrain requires integer labels (a TypeError naming them); optax's one_hot takes floats"
)
_WIDE = "computed in float32 (optax's float16 arithmetic overflows)"
_DTYPE = (
    "the scores' dtype is kept (optax promotes to the dtype of its one-hot, jax's default "
    "float: float64 under x64)"
)
_CAST = "optax's custom JVP fails on non-float labels (float0 tangents); functrain casts them"
_ZERO_T = (
    "optax's gradient w.r.t. a zero target is NaN (d log t at t = 0 through its where); "
    "functrain's is finite"
)
# (loss, edge) -> why functrain differs from optax there on purpose.
# fmt: off
KNOWN = {
    ("safe_softmax_cross_entropy", "-inf logits (masked vocabulary), labels 0 there"):
        "the labels' gradient at a -inf logit is 0 (optax: +inf, the derivative of 0·log 0)",
    ("safe_softmax_cross_entropy", "int64 one-hot labels"): _CAST,
    ("safe_softmax_cross_entropy", "bool one-hot labels"): _CAST,
    ("softmax_cross_entropy", "-inf logits masked by where"): _MASK_GRAD,
    ("softmax_cross_entropy", "a -inf row left out by where (batch shape)"): _MASK_GRAD,
    ("softmax_cross_entropy", "where all False"): _MASK_GRAD,
    ("softmax_cross_entropy", "where all False (batch shape)"): _MASK_GRAD,
    ("poly_loss_cross_entropy", "-inf logits masked by where"): _MASK_GRAD,
    ("poly_loss_cross_entropy", "where all False"): _MASK_GRAD,
    ("softmax_cross_entropy", "where int 0/1"):
        "a non-bool where counts non-zero as True (optax's jnp.max needs a bool mask)",
    ("softmax_cross_entropy_with_integer_labels", "no classes (4, 0)"):
        "a ValueError naming the empty class axis (optax: a loss of -inf)",
    ("multiclass_hinge_loss", "float labels"): _INT_LABELS,
    ("multiclass_perceptron_loss", "float labels"): _INT_LABELS,
    ("ctc_loss", "float labels"): _INT_LABELS,
    ("multiclass_hinge_loss", "float16"): _DTYPE,
    ("multiclass_perceptron_loss", "float16"): _DTYPE,
    ("ctc_loss", "-inf logits of unused classes"):
        "finite: the labels' log-probabilities are gathered (optax's one-hot contraction "
        "takes 0 · -inf = NaN from every masked class)",
    ("ctc_loss", "float16"):
        "float32, as optax's without x64 (its constants take jax's default float dtype)",
    ("multiclass_sparsemax_loss", "float16"):
        "optax's projection_simplex JVP fails on float16 scores under x64",
    ("cosine_similarity", "float16 ~300 (squares overflow float16)"): _WIDE,
    ("cosine_distance", "float16 ~300 (squares overflow float16)"): _WIDE,
    ("multiclass_generalized_dice_loss", "float16"): _WIDE + " (1 / 1e-7)",
    ("smooth_labels", "where (4, 1) broadcast"):
        "the classes are counted in where broadcast to the labels' shape (optax counts where's "
        "own elements: 1 for a (4, 1) mask, and the smoothed labels no longer sum to 1)",
    ("kl_divergence", "zero targets"): _ZERO_T,
    ("generalized_kl_divergence", "zero targets"): _ZERO_T,
    ("convex_kl_divergence", "zero targets"): _ZERO_T,
}
# fmt: on


def known(case: Edge) -> str:
    """Why ``case`` differs on purpose ("" when it should not)."""
    return KNOWN.get((case.name, case.settings), "")


def cases() -> list[Edge]:
    rng = np.random.default_rng(0)

    def n(*shape: int, scale: float = 1.0) -> np.ndarray:
        return scale * rng.standard_normal(shape)

    def probs(*shape: int) -> np.ndarray:
        e = np.exp(n(*shape))
        return e / e.sum(-1, keepdims=True)

    logits, onehot, labels = n(4, 5, scale=2.0), np.eye(5)[[0, 2, 3, 4]], np.array([0, 2, 3, 4])
    vocab = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 0]], bool)
    masked = np.where(vocab, logits, -INF)  # a masked vocabulary: -inf logits
    neg_row = logits.copy()
    neg_row[1] = -INF
    pos_inf, nan_logit = logits.copy(), logits.copy()
    pos_inf[0, 1], nan_logit[2, 3] = INF, NAN
    huge = n(4, 5, scale=1e30)
    out: list[Edge] = []
    add = out.append

    # -- softmax cross entropy (probability labels) --------------------------------------
    for name in ("softmax_cross_entropy", "safe_softmax_cross_entropy"):
        add(Edge(name, "-inf logits (masked vocabulary), labels 0 there", (masked, onehot),
                 grads=(0, 1)))  # fmt: skip
        add(Edge(name, "a row of -inf", (neg_row, onehot), grads=(0,)))
        add(Edge(name, "+inf logit", (pos_inf, onehot), grads=(0,)))
        add(Edge(name, "NaN logit", (nan_logit, onehot), grads=(0,)))
        add(Edge(name, "logits ~1e30", (huge, probs(4, 5)), grads=(0, 1)))
        add(Edge(name, "label 1 at a -inf logit", (masked, np.eye(5)[[3, 4, 0, 1]]), grads=(0,)))
        add(Edge(name, "empty batch (0, 5)", (n(0, 5), np.zeros((0, 5))), grads=(0, 1)))
        add(Edge(name, "one class (4, 1)", (n(4, 1), np.ones((4, 1))), grads=(0, 1)))
        add(Edge(name, "0-d logits", (np.array(1.0), np.array(1.0)), grads=(0,)))
        add(Edge(name, "labels (5,) broadcast", (logits, probs(5)), grads=(0, 1)))
        add(Edge(name, "labels (4, 1) broadcast", (logits, np.full((4, 1), 0.2)), grads=(0, 1)))
        add(Edge(name, "int64 one-hot labels", (logits, onehot.astype(np.int64)), grads=(0,)))
        add(Edge(name, "bool one-hot labels", (logits, onehot.astype(bool)), grads=(0,)))
        add(Edge(name, "float32 logits, float64 labels", (logits.astype(np.float32), onehot),
                 grads=(0, 1)))  # fmt: skip
        for dt in (np.float16, BF16):
            add(Edge(name, f"{np.dtype(dt).name}", (logits.astype(dt), onehot.astype(dt)),
                     grads=(0, 1)))  # fmt: skip
            add(Edge(name, f"{np.dtype(dt).name} -inf logits", (masked.astype(dt),
                     onehot.astype(dt)), grads=(0,)))  # fmt: skip
        add(Edge(name, "complex logits", (logits.astype(complex), onehot)))
    sce = "softmax_cross_entropy"
    add(Edge(sce, "-inf logits masked by where", (masked, onehot), {"where": vocab}, grads=(0, 1)))
    add(Edge(sce, "a -inf row left out by where (batch shape)", (neg_row, onehot),
             {"where": np.array([True, False, True, True])}, grads=(0, 1)))  # fmt: skip
    add(Edge(sce, "a -inf row, where all True", (neg_row, onehot), {"where": np.ones((4, 5),
             bool)}, grads=(0,)))  # fmt: skip
    add(Edge(sce, "where all False", (logits, onehot), {"where": np.zeros((4, 5), bool)},
             grads=(0, 1)))  # fmt: skip
    add(Edge(sce, "where all False (batch shape)", (logits, onehot),
             {"where": np.zeros(4, bool)}, grads=(0, 1)))  # fmt: skip
    add(Edge(sce, "where (5,) broadcast", (logits, onehot), {"where": vocab[0]}, grads=(0, 1)))
    add(Edge(sce, "where int 0/1", (logits, onehot), {"where": vocab.astype(np.int32)},
             grads=(0,)))  # fmt: skip
    add(Edge(sce, "axis=0", (logits, probs(5, 4).T), {"axis": 0}, grads=(0, 1)))
    add(Edge(sce, "axis=(0, 1)", (logits, probs(1, 20).reshape(4, 5)), {"axis": (0, 1)},
             grads=(0, 1)))  # fmt: skip
    add(Edge(sce, "axis=(-1, 0) (unsorted, negative)", (logits, probs(1, 20).reshape(4, 5)),
             {"axis": (-1, 0)}, grads=(0,)))  # fmt: skip
    add(Edge(sce, "axis=() (reduces nothing)", (logits, onehot), {"axis": ()}, grads=(0, 1)))
    add(Edge(sce, "axis=None", (logits, probs(1, 20).reshape(4, 5)), {"axis": None},
             grads=(0,)))  # fmt: skip
    add(Edge(sce, "axis=-2 of [2, 3, 4]", (n(2, 3, 4), probs(2, 4, 3).transpose(0, 2, 1)),
             {"axis": -2}, grads=(0,)))  # fmt: skip
    add(Edge(sce, "axis out of range", (logits, onehot), {"axis": 2}))
    add(Edge(sce, "where, 3-d, axis=1 (batch-shape where)", (n(2, 3, 4), np.eye(3)[None, :, :1]
             .repeat(2, 0).repeat(4, 2)), {"axis": 1, "where": np.array([[1, 0, 1, 1]] * 2,
             bool)}, grads=(0,)))  # fmt: skip

    # -- integer labels ------------------------------------------------------------------
    sci = "softmax_cross_entropy_with_integer_labels"
    for dt in (np.int64, np.int32, np.int16, np.int8, np.uint8):
        add(Edge(sci, f"{np.dtype(dt).name} labels", (logits, labels.astype(dt)), grads=(0,)))
    add(Edge(sci, "int8 labels -1, 200 classes", (n(2, 200), np.array([-1, 5], np.int8)),
             grads=(0,)))  # fmt: skip
    add(Edge(sci, "bool labels", (logits, labels.astype(bool))))
    add(Edge(sci, "float labels", (logits, labels.astype(float))))
    add(Edge(sci, "labels -1, -5, 5, -6", (logits, np.array([-1, -5, 5, -6])), grads=(0,)))
    add(Edge(sci, "-inf logits (masked vocabulary), valid labels", (masked, labels), grads=(0,)))
    add(Edge(sci, "label at a -inf logit", (masked, np.array([3, 4, 0, 1])), grads=(0,)))
    add(Edge(sci, "a row of -inf", (neg_row, labels), grads=(0,)))
    add(Edge(sci, "+inf logit (at and off the label)", (pos_inf, np.array([1, 0, 0, 0])),
             grads=(0,)))  # fmt: skip
    add(Edge(sci, "NaN logit", (nan_logit, labels), grads=(0,)))
    add(Edge(sci, "logits ~1e30", (huge, labels), grads=(0,)))
    add(Edge(sci, "float32 logits ~1e38", (n(4, 5, scale=1e38).astype(np.float32), labels),
             grads=(0,)))  # fmt: skip
    add(Edge(sci, "empty batch (0, 5)", (n(0, 5), np.zeros(0, np.int64)), grads=(0,)))
    add(Edge(sci, "no classes (4, 0)", (n(4, 0), labels), grads=(0,)))
    add(Edge(sci, "one class (4, 1), labels 0, -1, 1, 0", (n(4, 1), np.array([0, -1, 1, 0])),
             grads=(0,)))  # fmt: skip
    add(Edge(sci, "0-d logits", (np.array(1.0), np.array(0))))
    add(Edge(sci, "1-d logits, 0-d label", (logits[0], np.array(2)), grads=(0,)))
    add(Edge(sci, "labels (4, 1)", (logits, labels[:, None])))
    add(Edge(sci, "-inf logits masked by where", (masked, labels), {"where": vocab},
             grads=(0,)))  # fmt: skip
    add(Edge(sci, "where all False", (logits, labels), {"where": np.zeros((4, 5), bool)},
             grads=(0,)))  # fmt: skip
    add(Edge(sci, "where all False (batch shape)", (logits, labels),
             {"where": np.zeros(4, bool)}, grads=(0,)))  # fmt: skip
    add(Edge(sci, "out-of-range label left out by where", (logits, np.array([0, 9, 1, 2])),
             {"where": np.array([True, False, True, True])}, grads=(0,)))  # fmt: skip
    add(Edge(sci, "axis=(0,)", (logits, np.array([0, 3, 1, 2, 3])), {"axis": (0,)},
             grads=(0,)))  # fmt: skip
    add(Edge(sci, "axis=-2 of [2, 3, 4]", (n(2, 3, 4), np.array([[0, 1, 2, 0], [2, 2, 1, 0]])),
             {"axis": -2}, grads=(0,)))  # fmt: skip
    add(Edge(sci, "axis=(0, 1) flat labels, where (batch shape)", (n(2, 3, 4),
             np.array([0, 5, 3, 1])), {"axis": (0, 1), "where": np.array([1, 1, 0, 1], bool)},
             grads=(0,)))  # fmt: skip
    add(Edge(sci, "axis=None", (logits, labels), {"axis": None}))
    for dt in (np.float16, BF16):
        add(Edge(sci, np.dtype(dt).name, (logits.astype(dt), labels), grads=(0,)))
        add(Edge(sci, f"{np.dtype(dt).name} -inf logits", (masked.astype(dt), labels),
                 {"where": vocab}, grads=(0,)))  # fmt: skip
        add(Edge(sci, f"{np.dtype(dt).name} logits ~6e4", (n(4, 5, scale=3e4).clip(-6e4, 6e4)
                 .astype(dt), labels), grads=(0,)))  # fmt: skip

    # -- sigmoid losses ------------------------------------------------------------------
    binary = np.array([[1.0, 0.0, 1.0, 0.0, 0.5]] * 4)
    extreme = np.array([[INF, -INF, -INF, INF, 0.0], [1e30, -1e30, 50, -50, 0.0],
                        [NAN, 0.0, 1.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])  # fmt: skip
    for name in ("sigmoid_binary_cross_entropy", "sigmoid_focal_loss"):
        add(Edge(name, "±inf, ±1e30, NaN logits", (extreme, binary), grads=(0, 1)))
        add(Edge(name, "bool labels", (logits, onehot.astype(bool)), grads=(0,)))
        add(Edge(name, "int labels", (logits, onehot.astype(np.int32)), grads=(0,)))
        add(Edge(name, "labels (5,) broadcast", (logits, binary[0]), grads=(0, 1)))
        add(Edge(name, "labels 0-d", (logits, np.array(1.0)), grads=(0, 1)))
        add(Edge(name, "0-d", (np.array(0.3), np.array(1.0)), grads=(0, 1)))
        add(Edge(name, "empty", (n(0, 3), np.zeros((0, 3))), grads=(0,)))
        add(Edge(name, "int logits", (labels, labels)))
        add(Edge(name, "complex logits", (logits.astype(complex), onehot)))
        for dt in (np.float16, BF16):
            add(Edge(name, np.dtype(dt).name, (n(4, 5, scale=4).astype(dt), binary.astype(dt)),
                     grads=(0, 1)))  # fmt: skip
            add(Edge(name, f"{np.dtype(dt).name} logits ±60", (n(4, 5, scale=60).astype(dt),
                     binary.astype(dt)), grads=(0,)))  # fmt: skip
    focal = "sigmoid_focal_loss"
    add(Edge(focal, "gamma=0 (is the cross entropy)", (extreme, binary), {"gamma": 0.0},
             grads=(0,)))  # fmt: skip
    add(Edge(focal, "gamma=0.5, soft labels at logit 0", (np.zeros((2, 3)), np.full((2, 3), 0.5)),
             {"gamma": 0.5}, grads=(0, 1)))  # fmt: skip
    add(Edge(focal, "alpha=0.25, soft labels", (logits, probs(4, 5)), {"alpha": 0.25},
             grads=(0, 1)))  # fmt: skip
    add(Edge(focal, "labels outside [0, 1]", (logits, np.full((4, 5), 1.5)), grads=(0,)))

    # -- poly ----------------------------------------------------------------------------
    poly = "poly_loss_cross_entropy"
    add(Edge(poly, "-inf logits masked by where", (masked, onehot), {"where": vocab},
             grads=(0, 1)))  # fmt: skip
    add(Edge(poly, "-inf logits", (masked, onehot), grads=(0,)))
    add(Edge(poly, "where all False", (logits, onehot), {"where": np.zeros((4, 5), bool)},
             grads=(0, 1)))  # fmt: skip
    add(Edge(poly, "where (batch shape)", (logits, onehot), {"where": np.ones(4, bool)}))
    add(Edge(poly, "int labels", (logits, onehot.astype(np.int64))))
    add(Edge(poly, "one class", (n(4, 1), np.ones((4, 1))), grads=(0, 1)))
    add(Edge(poly, "axis=() (reduces nothing)", (logits, onehot), {"axis": ()}, grads=(0, 1)))
    add(Edge(poly, "empty batch", (n(0, 5), np.zeros((0, 5))), grads=(0,)))
    add(Edge(poly, "float16", (logits.astype(np.float16), onehot.astype(np.float16)),
             grads=(0, 1)))  # fmt: skip

    # -- margin --------------------------------------------------------------------------
    pm = np.array([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]])
    at_margin = np.array([[1.0, -1.0, 0.5, 2.0], [0.0, 1.0, -1.0, 0.0]])
    add(Edge("hinge_loss", "at the margin (f·y = 1) and 0", (at_margin, pm), grads=(0, 1)))
    add(Edge("perceptron_loss", "at 0", (at_margin, pm), grads=(0, 1)))
    add(Edge("hinge_loss", "±inf", (np.array([INF, -INF, INF]), np.array([1.0, 1.0, 0.0]))))
    add(Edge("hinge_loss", "int scores and targets", (np.array([2, 0, -1]), np.array([1, 1, -1]))))
    add(Edge("hinge_loss", "bool targets, broadcast", (at_margin, np.array([True, False] * 2)),
             grads=(0,)))  # fmt: skip
    add(Edge("perceptron_loss", "broadcast (refused)", (at_margin, pm[0])))
    add(Edge("sparsemax_loss", "at the kinks z = ±1", (np.array([1.0, -1.0, 1.0, -1.0, 0.0]),
             np.array([0, 0, 1, 1, 1])), grads=(0,)))  # fmt: skip
    add(Edge("sparsemax_loss", "labels 0.5 / NaN / bool", (np.array([0.3, 0.3, 0.3]),
             np.array([0.5, NAN, 0.0])), grads=(0,)))  # fmt: skip
    add(Edge("sparsemax_loss", "±inf logits", (np.array([INF, -INF, INF]), np.array([0, 0, 1])),
             grads=(0,)))  # fmt: skip
    add(Edge("sparsemax_loss", "float16", (logits.astype(np.float16), onehot), grads=(0,)))
    ties = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 0.0, 1.0]])
    for name in ("multiclass_hinge_loss", "multiclass_perceptron_loss",
                 "multiclass_sparsemax_loss"):  # fmt: skip
        add(Edge(name, "labels -1, 5, -6, 0", (logits, np.array([-1, 5, -6, 0])), grads=(0,)))
        add(Edge(name, "ties in the max", (ties, np.array([1, 0, 3])), grads=(0,)))
        add(Edge(name, "-inf scores (masked classes), label kept", (masked, labels), grads=(0,)))
        add(Edge(name, "uint8 labels", (logits, labels.astype(np.uint8)), grads=(0,)))
        add(Edge(name, "int8 labels -1", (logits, np.array([-1, 1, 2, 3], np.int8)), grads=(0,)))
        add(Edge(name, "bool labels", (logits, labels.astype(bool))))
        add(Edge(name, "float labels", (logits, labels.astype(float))))
        add(Edge(name, "empty batch", (n(0, 5), np.zeros(0, np.int64)), grads=(0,)))
        add(Edge(name, "one class", (n(4, 1), np.zeros(4, np.int64)), grads=(0,)))
        add(Edge(name, "float16", (logits.astype(np.float16), labels), grads=(0,)))
        add(Edge(name, "scores ~1e30", (huge, labels), grads=(0,)))
    mcs = "multiclass_sparsemax_loss"
    add(Edge(mcs, "labels -1, -5, 4, 9 (wrap, clamp)", (logits, np.array([-1, -5, 4, 9])),
             grads=(0,)))  # fmt: skip

    # -- divergences ---------------------------------------------------------------------
    log_p, t = np.log(probs(4, 5)), probs(4, 5)
    t0 = t.copy()
    t0[:, 1] = 0.0
    lp_inf = log_p.copy()
    lp_inf[:, 1] = -INF  # where the target is 0: 0 · inf
    lp_inf2 = log_p.copy()
    lp_inf2[:, 2] = -INF  # where the target is > 0: inf
    for name in ("kl_divergence", "generalized_kl_divergence", "convex_kl_divergence"):
        add(Edge(name, "zero targets", (log_p, t0), grads=(0, 1)))
        add(Edge(name, "zero targets at -inf log-predictions", (lp_inf, t0), grads=(0,)))
        add(Edge(name, "-inf log-prediction, target > 0", (lp_inf2, t), grads=(0,)))
        add(Edge(name, "negative targets", (log_p, -t), grads=(0,)))
        add(Edge(name, "where all False", (log_p, t), {"where": np.zeros((4, 5), bool)},
                 grads=(0, 1)))  # fmt: skip
        add(Edge(name, "axis=()", (log_p, t), {"axis": ()}, grads=(0, 1)))
        add(Edge(name, "axis=(0, 1), targets (5,) broadcast", (log_p, t[0]),
                 {"axis": (0, 1)}, grads=(0, 1)))  # fmt: skip
        add(Edge(name, "float32 / float64 mix", (log_p.astype(np.float32), t), grads=(0, 1)))
        add(Edge(name, "float16", (log_p.astype(np.float16), t.astype(np.float16)),
                 grads=(0, 1)))  # fmt: skip
        add(Edge(name, "int targets", (log_p, (t > 0.2).astype(np.int64))))
        add(Edge(name, "empty", (n(0, 5), np.zeros((0, 5))), grads=(0, 1)))
    klt = "kl_divergence_with_log_targets"
    with np.errstate(divide="ignore"):
        log_t0 = np.log(t0)  # -inf where the target is 0
    add(Edge(klt, "-inf log-targets", (log_p, log_t0), grads=(0,)))
    add(Edge(klt, "-inf log-targets and log-predictions", (lp_inf, log_t0), grads=(0,)))
    add(Edge(klt, "where all False", (log_p, np.log(t)), {"where": np.zeros((4, 5), bool)},
             grads=(0, 1)))  # fmt: skip
    add(Edge(klt, "float16", (log_p.astype(np.float16), np.log(t).astype(np.float16)),
             grads=(0, 1)))  # fmt: skip

    # -- regression ----------------------------------------------------------------------
    e = np.array([[-INF, -2.0, -1.0, -0.5, 0.0], [0.5, 1.0, 2.0, INF, NAN]])
    for name in ("squared_error", "l2_loss", "huber_loss", "log_cosh"):
        add(Edge(name, "±inf, NaN, kinks", (e, np.zeros_like(e)), grads=(0, 1)))
        add(Edge(name, "targets=None", (e,), grads=(0,)))
        add(Edge(name, "int targets", (e, np.zeros(e.shape, np.int64)), grads=(0,)))
        add(Edge(name, "int predictions", (np.zeros(3, np.int64), np.ones(3))))
        add(Edge(name, "targets (5,) broadcast", (e, np.ones(5))))
        add(Edge(name, "float16", (n(4, 5, scale=30).astype(np.float16),
                 n(4, 5).astype(np.float16)), grads=(0, 1)))  # fmt: skip
        add(Edge(name, "0-d", (np.array(3.0), np.array(1.0)), grads=(0, 1)))
    add(Edge("huber_loss", "at |e| = δ = 0.5", (np.array([0.5, -0.5, 0.25]), np.zeros(3)),
             {"delta": 0.5}, grads=(0,)))  # fmt: skip
    add(Edge("huber_loss", "delta=0", (np.array([0.5, -0.5, 0.0]), np.zeros(3)),
             {"delta": 0.0}, grads=(0,)))  # fmt: skip
    add(Edge("log_cosh", "errors ±1e4, ±1e300", (np.array([1e4, -1e4, 1e300, -1e300]),),
             grads=(0,)))  # fmt: skip
    add(Edge("log_cosh", "float16 errors ±6e4", (np.array([6e4, -6e4, 300.0]).astype(np.float16),),
             grads=(0,)))  # fmt: skip
    add(Edge("log_cosh", "float32 errors ±1e38", (np.array([1e38, -1e38, 89.0, 90.0])
             .astype(np.float32),), grads=(0,)))  # fmt: skip
    zero = n(3, 4)
    zero[1] = 0.0
    for name in ("cosine_similarity", "cosine_distance"):
        add(Edge(name, "a zero vector, epsilon=0", (zero, n(3, 4)), grads=(0, 1)))
        add(Edge(name, "a zero vector, epsilon=1e-12", (zero, n(3, 4)), {"epsilon": 1e-12},
                 grads=(0, 1)))  # fmt: skip
        add(Edge(name, "norm² exactly epsilon", (np.array([[1.0, 0.0]]), np.array([[3.0, 4.0]])),
                 {"epsilon": 1.0}, grads=(0, 1)))  # fmt: skip
        add(Edge(name, "where all False", (n(3, 4), n(3, 4)), {"where": np.zeros((3, 4), bool)},
                 grads=(0, 1)))  # fmt: skip
        add(Edge(name, "targets (4,) broadcast", (n(3, 4), n(4)), grads=(0, 1)))
        add(Edge(name, "axis=None", (n(3, 4), n(3, 4)), {"axis": None}, grads=(0, 1)))
        add(Edge(name, "axis=() (each element)", (n(3, 4), n(3, 4)), {"axis": ()},
                 grads=(0, 1)))  # fmt: skip
        add(Edge(name, "inf entries", (np.array([[INF, 1.0]]), np.array([[1.0, 1.0]])),
                 grads=(0,)))  # fmt: skip
        add(Edge(name, "vectors ~1e200 (squares overflow)", (n(3, 4, scale=1e200), n(3, 4)),
                 grads=(0,)))  # fmt: skip
        add(Edge(name, "float16", (n(3, 4).astype(np.float16), n(3, 4).astype(np.float16)),
                 grads=(0, 1)))  # fmt: skip
        add(Edge(name, "float16 ~300 (squares overflow float16)", (n(3, 4, scale=300)
                 .astype(np.float16), n(3, 4).astype(np.float16)), grads=(0,)))  # fmt: skip
        add(Edge(name, "complex", (n(3, 4).astype(complex), n(3, 4))))
        add(Edge(name, "empty", (n(0, 4), n(0, 4)), grads=(0, 1)))
    sl = "smooth_labels"
    add(Edge(sl, "where all False", (onehot, 0.1), {"where": np.zeros((4, 5), bool)}))
    add(Edge(sl, "where (5,) broadcast", (onehot, 0.1), {"where": vocab[0]}))
    add(Edge(sl, "where (4, 1) broadcast", (onehot, 0.1), {"where": vocab[:, :1]}))
    add(Edge(sl, "axis=(0, 1)", (onehot, 0.1), {"axis": (0, 1)}))
    add(Edge(sl, "axis=()", (onehot, 0.1), {"axis": ()}))
    add(Edge(sl, "float16", (onehot.astype(np.float16), 0.1)))
    add(Edge(sl, "int labels", (onehot.astype(np.int64), 0.1)))
    add(Edge(sl, "0-d labels", (np.array(1.0), 0.1)))

    # -- ranking -------------------------------------------------------------------------
    rank = "ranking_softmax_loss"
    rl = np.array([[2.0, 0.0, 1.0, 0.0, 0.0]] * 4)
    mean, total = Lib(torch.mean, jnp.mean), Lib(torch.sum, jnp.sum)
    add(Edge(rank, "-inf logits, labels 0 there", (masked, rl * vocab), grads=(0,)))
    add(Edge(rank, "-inf logits left out by where", (masked, rl), {"where": vocab}, grads=(0,)))
    add(Edge(rank, "where all False, mean", (logits, rl), {"where": np.zeros((4, 5), bool)},
             grads=(0,)))  # fmt: skip
    add(Edge(rank, "where all False, sum", (logits, rl), {"where": np.zeros((4, 5), bool),
             "reduce_fn": total}, grads=(0,)))  # fmt: skip
    add(Edge(rank, "where all False, None", (logits, rl), {"where": np.zeros((4, 5), bool),
             "reduce_fn": None}, grads=(0,)))  # fmt: skip
    add(Edge(rank, "a row of -inf, mean", (neg_row, rl), grads=(0,)))
    add(Edge(rank, "empty batch, mean", (n(0, 5), np.zeros((0, 5))), {"reduce_fn": mean}))
    add(Edge(rank, "one list, 1-d", (logits[0], rl[0]), grads=(0,)))
    add(Edge(rank, "int labels, weights (5,)", (logits, rl.astype(np.int64)),
             {"weights": np.array([1.0, 2.0, 0.0, 1.0, 1.0])}, grads=(0,)))  # fmt: skip
    add(Edge(rank, "float16", (logits.astype(np.float16), rl.astype(np.float16)), grads=(0,)))
    add(Edge(rank, "reduce_fn=max via where", (logits, rl), {"where": vocab, "reduce_fn": Lib(
             lambda x, where: torch.where(where, x, -torch.inf).amax(),
             lambda x, where: jnp.max(x, where=where, initial=-jnp.inf))}))  # fmt: skip

    # -- self-supervised -----------------------------------------------------------------
    emb = n(6, 3)
    emb0 = emb.copy()
    emb0[2] = 0.0
    pairs = np.array([0, 0, 1, 1, 2, 2])
    add(Edge("ntxent", "no positive pair", (emb, np.arange(6)), grads=(0,)))
    add(Edge("ntxent", "one group (no negatives)", (emb, np.zeros(6, np.int64)), grads=(0,)))
    add(Edge("ntxent", "a zero embedding", (emb0, pairs), grads=(0,)))
    add(Edge("ntxent", "one example", (emb[:1], pairs[:1]), grads=(0,)))
    add(Edge("ntxent", "temperature 1e-3", (emb, pairs), {"temperature": 1e-3}, grads=(0,)))
    add(Edge("ntxent", "float labels", (emb, pairs.astype(float)), grads=(0,)))
    add(Edge("ntxent", "float16", (emb.astype(np.float16), pairs), grads=(0,)))
    add(Edge("ntxent", "bfloat16", (emb.astype(BF16), pairs), grads=(0,)))
    add(Edge("ntxent", "3-d embeddings", (n(6, 2, 3), pairs)))
    tml = "triplet_margin_loss"
    a0 = np.array([[0.0, 0.0], [0.0, 0.0]])
    p0 = np.array([[0.0, 0.0], [1.0, 0.0]])
    n0 = np.array([[2.0, 0.0], [2.0, 0.0]])
    add(Edge(tml, "zero distance (eps), loss exactly 0 (eps=0)", (a0, p0, n0),
             {"eps": 0.0}, grads=(0, 1, 2)))  # fmt: skip
    add(Edge(tml, "zero distance, default eps", (a0, p0, n0), grads=(0, 1, 2)))
    add(Edge(tml, "norm_degree 1 and 3 (odd)", (n(3, 4), n(3, 4), n(3, 4)),
             {"norm_degree": 3}, grads=(0,)))  # fmt: skip
    add(Edge(tml, "1-d", (n(4), n(4), n(4)), grads=(0, 1, 2)))
    add(Edge(tml, "broadcast positives (4,)", (n(3, 4), n(4), n(3, 4)), grads=(0, 1)))
    add(Edge(tml, "float16", (n(3, 4).astype(np.float16), n(3, 4).astype(np.float16),
             n(3, 4).astype(np.float16)), grads=(0,)))  # fmt: skip
    add(Edge(tml, "inf", (np.array([[INF, 0.0]]), np.zeros((1, 2)), np.ones((1, 2))),
             grads=(0,)))  # fmt: skip

    # -- ctc -----------------------------------------------------------------------------
    ctc_logits = n(2, 6, 4, scale=2)
    zpad = np.zeros((2, 6))
    clabels = np.array([[1, 2, 3], [3, 3, 0]])
    cpad = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    for name in ("ctc_loss", "ctc_loss_with_forward_probs"):
        add(Edge(name, "impossible: repeats need a blank (T=3, [1, 1, 1])",
                 (n(2, 3, 4), np.zeros((2, 3)), np.array([[1, 1, 1], [1, 2, 1]]),
                  np.zeros((2, 3))), grads=(0,)))  # fmt: skip
    ctc = "ctc_loss"
    add(Edge(ctc, "-inf logits of unused classes", (np.where(np.arange(4) == 2, -INF,
             ctc_logits), zpad, np.array([[1, 3, 1], [3, 3, 0]]), cpad), grads=(0,)))  # fmt: skip
    add(Edge(ctc, "-inf logit of a needed class (impossible)", (np.where(np.arange(4) == 3,
             -INF, ctc_logits), zpad, clabels, cpad), grads=(0,)))  # fmt: skip
    add(Edge(ctc, "every frame padded", (ctc_logits, np.ones((2, 6)), clabels, cpad),
             grads=(0,)))  # fmt: skip
    add(Edge(ctc, "empty label sequences", (ctc_logits, zpad, clabels, np.ones((2, 3))),
             grads=(0,)))  # fmt: skip
    add(Edge(ctc, "no label axis (N=0)", (ctc_logits, zpad, np.zeros((2, 0), np.int64),
             np.zeros((2, 0))), grads=(0,)))  # fmt: skip
    add(Edge(ctc, "labels ≥ num_classes", (ctc_logits, zpad, clabels + 4, cpad), grads=(0,)))
    add(Edge(ctc, "uint8 / int32 labels, bool paddings", (ctc_logits, zpad.astype(bool),
             clabels.astype(np.uint8), cpad.astype(bool)), grads=(0,)))  # fmt: skip
    add(Edge(ctc, "blank (0) among the labels", (ctc_logits, zpad, np.array([[1, 0, 2],
             [0, 0, 0]]), np.zeros((2, 3))), grads=(0,)))  # fmt: skip
    add(Edge(ctc, "log_epsilon=-inf", (ctc_logits, zpad, clabels, cpad),
             {"log_epsilon": -INF}, grads=(0,)))  # fmt: skip
    add(Edge(ctc, "float16", (ctc_logits.astype(np.float16), zpad.astype(np.float16), clabels,
             cpad.astype(np.float16)), grads=(0,)))  # fmt: skip
    add(Edge(ctc, "no frame (T=0)", (n(2, 0, 4), np.zeros((2, 0)), clabels, cpad)))
    add(Edge(ctc, "float labels", (ctc_logits, zpad, clabels.astype(float), cpad)))

    # -- segmentation --------------------------------------------------------------------
    seg = n(2, 3, 3, 3)
    seg_t = np.eye(3)[rng.integers(0, 2, (2, 3, 3))]  # class 2 absent
    dice = "dice_loss"
    add(Edge(dice, "an absent class", (seg, seg_t), grads=(0,)))
    add(Edge(dice, "an absent class, smooth=0", (seg, seg_t), {"smooth": 0.0}, grads=(0,)))
    add(Edge(dice, "-inf / +inf logits", (np.where(seg > 1.5, INF, np.where(seg < -1, -INF,
             seg)), seg_t), grads=(0,)))  # fmt: skip
    add(Edge(dice, "[B, C] predictions (no spatial axis)", (logits, onehot), grads=(0,)))
    add(Edge(dice, "1-d predictions", (logits[0], onehot[0]), grads=(0,)))
    add(Edge(dice, "int targets", (seg, seg_t.astype(np.int64)), grads=(0,)))
    add(Edge(dice, "class_weights rank 2", (seg, seg_t), {"class_weights": np.ones((1, 3))}))
    add(Edge(dice, "reduction 'max'", (seg, seg_t), {"reduction": "max"}))
    add(Edge(dice, "float16", (seg.astype(np.float16), seg_t.astype(np.float16)), grads=(0,)))
    add(Edge(dice, "empty batch", (n(0, 3, 3), np.zeros((0, 3, 3))), grads=(0,)))
    gdl = "multiclass_generalized_dice_loss"
    add(Edge(gdl, "an absent class", (seg, seg_t), grads=(0,)))
    add(Edge(gdl, "float32, absent class", (seg.astype(np.float32), seg_t.astype(np.float32)),
             grads=(0,)))  # fmt: skip
    add(Edge(gdl, "float16", (seg.astype(np.float16), seg_t.astype(np.float16)), grads=(0,)))
    add(Edge("binary_dice_loss", "1-d predictions", (logits[0], onehot[0]), grads=(0,)))
    add(Edge("binary_dice_loss", "±inf logits", (np.array([[INF, -INF, 0.0]]),
             np.array([[1.0, 0.0, 1.0]])), grads=(0,)))  # fmt: skip

    # -- Fenchel-Young -------------------------------------------------------------------
    fy = "make_fenchel_young_loss"
    add(Edge(fy, "logsumexp, -inf scores with targets 0", (masked, onehot), grads=(0,)))
    add(Edge(fy, "1-d", (logits[0], onehot[0]), grads=(0, 1)))
    add(Edge(fy, "targets (5,) broadcast", (logits, onehot[0]), grads=(0, 1)))
    add(Edge(fy, "empty batch", (n(0, 5), np.zeros((0, 5))), grads=(0,)))
    return out


def main() -> int:
    args = sys.argv[1:]
    verbose = "-v" in args
    only = [a for a in args if a != "-v"]
    rows = []
    for case in cases():
        if only and not any(k in case.name for k in only):
            continue
        status, ft_note, diffs = compare(case)
        rows.append((case, status, ft_note, diffs))
    print("| loss | edge | status | functrain | difference (ft vs optax) |\n|---|---|---|---|---|")
    for case, status, ft_note, diffs in rows:
        if verbose or status != "same":
            why = f" — known: {known(case)}" if status == "known" else ""
            print(f"| {case.name} | {case.settings} | {status} | {ft_note} | {diffs}{why} |")
    failed = sum(status == "DIFF" for _, status, _, _ in rows)
    deliberate = sum(status == "known" for _, status, _, _ in rows)
    print(f"\n{len(rows)} edge cases: {len(rows) - failed - deliberate} same, {deliberate} known "
          f"differences, {failed} unexplained.")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
