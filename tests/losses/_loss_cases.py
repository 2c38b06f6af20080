"""One small call of every ``ft.losses`` function, for the tests that sweep all of them.

``CASES[name](seed, dtype)`` returns ``(fn, args)``: ``fn(*args)`` calls the loss (fixed
masks and options are closed over), ``args`` are tensors whose floating ones are the
differentiable inputs, in ``dtype``. Different seeds give different values of the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import functrain as ft

L = ft.losses
Case = Callable[[int, torch.dtype], tuple[Callable[..., Any], tuple[torch.Tensor, ...]]]


def _n(seed: int, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _p(seed: int, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.softmax(_n(seed + 100, *shape, dtype=torch.float64), -1).to(dtype)


def _i(seed: int, high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed + 200))


_WHERE = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
_LOGIT_PAD = torch.tensor([[0.0] * 5, [0.0] * 4 + [1.0]])
_LABEL_PAD = torch.tensor([[0.0, 0.0], [0.0, 1.0]])


def _binary(fn: Callable[..., Any]) -> Case:
    return lambda s, d: (fn, (_n(s, 3, 4, dtype=d, scale=2), torch.rand(3, 4).round().to(d)))


def _pair(fn: Callable[..., Any]) -> Case:
    return lambda s, d: (fn, (_n(s, 3, 4, dtype=d), _n(s + 1, 3, 4, dtype=d)))


def _dist(fn: Callable[..., Any]) -> Case:
    return lambda s, d: (fn, (torch.log(_p(s, 3, 4, dtype=d)), _p(s + 1, 3, 4, dtype=d)))


CASES: dict[str, Case] = {
    "sigmoid_binary_cross_entropy": _binary(L.sigmoid_binary_cross_entropy),
    "sigmoid_focal_loss": _binary(lambda x, y: L.sigmoid_focal_loss(x, y, alpha=0.25)),
    "softmax_cross_entropy": lambda s, d: (
        lambda x, y: L.softmax_cross_entropy(x, y, where=_WHERE.to(x.device)),
        (_n(s, 3, 4, dtype=d), _p(s, 3, 4, dtype=d)),
    ),
    "safe_softmax_cross_entropy": lambda s, d: (
        L.safe_softmax_cross_entropy,
        (_n(s, 3, 4, dtype=d), _p(s, 3, 4, dtype=d)),
    ),
    "softmax_cross_entropy_with_integer_labels": lambda s, d: (
        lambda x, y: L.softmax_cross_entropy_with_integer_labels(x, y, where=_WHERE.to(x.device)),
        (_n(s, 3, 4, dtype=d, scale=3), _i(s, 4, 3)),
    ),
    "poly_loss_cross_entropy": lambda s, d: (
        L.poly_loss_cross_entropy,
        (_n(s, 3, 4, dtype=d), _p(s, 3, 4, dtype=d)),
    ),
    "hinge_loss": _pair(L.hinge_loss),
    "perceptron_loss": _pair(L.perceptron_loss),
    "sparsemax_loss": _binary(L.sparsemax_loss),
    "multiclass_hinge_loss": lambda s, d: (
        L.multiclass_hinge_loss,
        (_n(s, 3, 4, dtype=d), _i(s, 4, 3)),
    ),
    "multiclass_perceptron_loss": lambda s, d: (
        L.multiclass_perceptron_loss,
        (_n(s, 3, 4, dtype=d), _i(s, 4, 3)),
    ),
    "multiclass_sparsemax_loss": lambda s, d: (
        L.multiclass_sparsemax_loss,
        (_n(s, 3, 4, dtype=d, scale=2), _i(s, 4, 3)),
    ),
    "kl_divergence": _dist(L.kl_divergence),
    "kl_divergence_with_log_targets": lambda s, d: (
        L.kl_divergence_with_log_targets,
        (torch.log(_p(s, 3, 4, dtype=d)), torch.log(_p(s + 1, 3, 4, dtype=d))),
    ),
    "generalized_kl_divergence": _dist(L.generalized_kl_divergence),
    "convex_kl_divergence": _dist(L.convex_kl_divergence),
    "squared_error": _pair(L.squared_error),
    "l2_loss": _pair(L.l2_loss),
    "huber_loss": _pair(lambda a, b: L.huber_loss(a, b, delta=0.5)),
    "log_cosh": _pair(L.log_cosh),
    "cosine_similarity": _pair(lambda a, b: L.cosine_similarity(a, b, where=_WHERE.to(a.device))),
    "cosine_distance": _pair(L.cosine_distance),
    "smooth_labels": lambda s, d: (lambda y: L.smooth_labels(y, 0.1), (_p(s, 3, 4, dtype=d),)),
    "ranking_softmax_loss": lambda s, d: (
        lambda x, y: L.ranking_softmax_loss(x, y, where=_WHERE.to(x.device)),
        (_n(s, 3, 4, dtype=d), _i(s, 3, 3, 4).to(d)),
    ),
    "ntxent": lambda s, d: (
        lambda e: L.ntxent(e, torch.tensor([0, 0, 1, 1], device=e.device), 0.5),
        (_n(s, 4, 3, dtype=d),),
    ),
    "triplet_margin_loss": lambda s, d: (
        L.triplet_margin_loss,
        (_n(s, 3, 4, dtype=d), _n(s + 1, 3, 4, dtype=d), _n(s + 2, 3, 4, dtype=d)),
    ),
    "ctc_loss": lambda s, d: (
        lambda x, y: L.ctc_loss(x, _LOGIT_PAD.to(x.device), y, _LABEL_PAD.to(x.device)),
        (_n(s, 2, 5, 4, dtype=d), _i(s, 3, 2, 2) + 1),
    ),
    "ctc_loss_with_forward_probs": lambda s, d: (
        lambda x, y: L.ctc_loss_with_forward_probs(
            x, _LOGIT_PAD.to(x.device), y, _LABEL_PAD.to(x.device), blank_id=3
        ),
        (_n(s, 2, 5, 4, dtype=d), _i(s, 3, 2, 2)),
    ),
    "dice_loss": lambda s, d: (
        lambda x, t: L.dice_loss(x, t, alpha=0.3, beta=0.7),
        (_n(s, 2, 3, 3, dtype=d), torch.nn.functional.one_hot(_i(s, 3, 2, 3), 3).to(d)),
    ),
    "multiclass_generalized_dice_loss": lambda s, d: (
        L.multiclass_generalized_dice_loss,
        (_n(s, 2, 3, 3, dtype=d), torch.nn.functional.one_hot(_i(s, 3, 2, 3), 3).to(d)),
    ),
    "binary_dice_loss": lambda s, d: (
        L.binary_dice_loss,
        (_n(s, 2, 4, dtype=d), _i(s, 2, 2, 4).to(d)),
    ),
    "make_fenchel_young_loss": lambda s, d: (
        L.make_fenchel_young_loss(lambda v: torch.logsumexp(v, 0)),
        (_n(s, 3, 4, dtype=d), _p(s, 3, 4, dtype=d)),
    ),
}
