"""Statistics of a materialized pytree of per-sample gradients (leading batch dimension).

:func:`per_sample_norms`, :func:`grad_moments` (with :func:`merge_grad_moments`,
:func:`grad_variance`, :func:`grad_snr`) and :func:`grad_gram` take the gradients of
:func:`per_sample_grads`; :func:`tree_gram` gives the Gram / cosine matrix of a list of gradient
pytrees, e.g. the micro-batch gradients of one step. The same statistics streamed from
``loss_fn``, without holding ``batch × parameters``, are in :mod:`functrain.grads.streaming`.

The Gram matrices live in :mod:`functrain.grads._gram` and the per-example row helpers shared
with clipping in :mod:`functrain.grads._rows`; both are re-exported here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain._precision import HALF as _HALF
from functrain._precision import widen, widen_all
from functrain.grads._gram import _cross_gram as _cross_gram
from functrain.grads._gram import _flat_rows as _flat_rows
from functrain.grads._gram import _gram_dtype as _gram_dtype
from functrain.grads._gram import _to_cosine as _to_cosine
from functrain.grads._gram import grad_gram, tree_gram
from functrain.grads._rows import _check_rows, row_matrix
from functrain.grads._rows import global_row_norms as global_row_norms
from functrain.grads._rows import leaf_row_norms as leaf_row_norms

__all__ = [
    "GradMoments",
    "GradNorms",
    "grad_gram",
    "grad_moments",
    "grad_snr",
    "grad_variance",
    "merge_grad_moments",
    "per_sample_norms",
    "tree_gram",
]

PyTree = Any


class GradNorms(NamedTuple):
    """Per-sample gradient L2 norms.

    Attributes:
        global_norm: shape ``(batch,)``, the norm of each example's whole gradient.
        leaf_norms: pytree like ``params``, each leaf of shape ``(batch,)``: the norm of each
            example's gradient for that parameter (per layer: weight and bias separately).

    Example:
        >>> import torch, functrain as ft
        >>> norms = ft.per_sample_norms({"w": torch.tensor([[3.0, 4.0]]), "b": torch.zeros(1, 1)})
        >>> norms.global_norm, norms.leaf_norms["w"]
        (tensor([5.]), tensor([5.]))
    """

    global_norm: torch.Tensor
    leaf_norms: PyTree


class GradMoments(NamedTuple):
    """First and second moments of per-sample gradients, per parameter element.

    Attributes:
        count: number of examples (a Python int: batch shapes are static).
        mean: pytree like ``params``, the mean gradient (the batch gradient of a mean loss).
        m2: pytree like ``params``, the sum of squared deviations ``Σᵢ (gᵢ − mean)²``.

    The sum of squares is ``m2 + count · mean²`` and the mean of squares ``m2 / count + mean²``;
    see :func:`grad_variance` and :func:`grad_snr`. Moments of two groups of examples merge
    exactly with :func:`merge_grad_moments`.

    Dtypes: ``mean`` has the gradients' dtype. ``m2``, a sum over examples, has their
    accumulation dtype: float32 for float16 and bfloat16 gradients (the gradients' dtype
    otherwise). A float16 ``m2`` overflowed to ``inf`` for a variance that fits float16
    (64 examples with a spread of 50 sum to 1.6e5 > 65504), and a bfloat16 one lost bits at
    every merge. Per-example results (``mean_square``, :func:`grad_variance`,
    :func:`grad_snr`) are computed in float32 and rounded once to ``mean``'s dtype;
    ``sum_of_squares`` is a sum and keeps ``m2``'s dtype.

    Example:
        >>> import torch, functrain as ft
        >>> m = ft.grad_moments({"w": torch.tensor([[1.0], [3.0]])})
        >>> m.count, m.mean["w"], m.m2["w"], m.sum_of_squares()["w"]
        (2, tensor([2.]), tensor([2.]), tensor([10.]))
    """

    count: int
    mean: PyTree
    m2: PyTree

    def mean_square(self) -> PyTree:
        """``(1/n) Σᵢ gᵢ²`` per element, in ``mean``'s dtype (computed in at least float32)."""

        def mean_square(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            w = widen(m)
            return _narrow_like(widen(s) / self.count + w * w, m)

        return tree.map(mean_square, self.mean, self.m2)

    def sum_of_squares(self) -> PyTree:
        """``Σᵢ gᵢ²`` per element, in ``m2``'s dtype (float32 for half-precision gradients)."""

        def sum_of_squares(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            w = widen(m)  # a float16 mean of 300 squares to inf
            return widen(s) + self.count * (w * w)

        return tree.map(sum_of_squares, self.mean, self.m2)


def _narrow_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` (widened for the arithmetic) rounded back to ``like``'s dtype if that is half."""
    return x.to(like.dtype) if like.dtype in _HALF else x


def per_sample_norms(grads: PyTree) -> GradNorms:
    """Global and per-leaf L2 norms of each example's gradient.

    Args:
        grads: per-sample gradients, every leaf with the same leading batch dimension (real
            floating-point or complex).

    Returns:
        A :class:`GradNorms`: each leaf norm in its leaf's real dtype (half precision computed
        in float32 and rounded once), the global norm in the leaf norms' promoted dtype.

    Raises:
        ValueError: no leaves, or leaves whose leading dimensions differ (naming the leaf).
        TypeError: a leaf that is not floating-point or complex.

    Example:
        >>> import torch, functrain as ft
        >>> g = {"a": torch.tensor([[3.0], [0.0]]), "b": torch.tensor([[4.0, 0.0], [0.0, 1.0]])}
        >>> ft.per_sample_norms(g).global_norm
        tensor([5., 1.])
    """
    leaves, spec = tree.flatten(grads)
    if not leaves:
        raise ValueError("per_sample_norms needs at least one gradient leaf")
    _check_rows(leaves, grads, complex_ok=True)
    if not any(x.dtype in _HALF for x in leaves):
        norms = leaf_row_norms(leaves)
        return GradNorms(global_row_norms(norms), tree.unflatten(spec, norms))
    # Half-precision norms in float32, each rounded once: the global norm of rounded leaf norms
    # was off by an ulp of its own.
    wide = [
        torch.linalg.vector_norm(row_matrix(x), dim=1, dtype=torch.float32)
        if x.dtype in _HALF
        else torch.linalg.vector_norm(row_matrix(x), dim=1)
        for x in leaves
    ]
    norms = [w.to(x.dtype) if x.dtype in _HALF else w for w, x in zip(wide, leaves)]
    dtype = _gram_dtype(norms)  # what the global norm of these leaf norms would have
    return GradNorms(global_row_norms(wide).to(dtype), tree.unflatten(spec, norms))


# Rows of deviations squared per block on CPU: ~1 MiB of float32 temporaries, which stay in cache,
# where one batch-sized temporary (tens of MB for a chunk of per-sample gradients) is a fresh
# allocation that page-faults on every call. Measured 5-7x faster for (256, 32768) leaves.
_CPU_BLOCK_ELEMENTS = 1 << 18


def _centred_sums(rows: torch.Tensor, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σᵢ dᵢ, Σᵢ dᵢ²)`` with ``dᵢ = rowsᵢ − centre``, as ``(1, d)`` rows in ``centre``'s dtype.

    A float32 ``centre`` for half-precision ``rows`` widens each block as it is subtracted:
    the sums are kept in float32 (bfloat16 sums over a batch were off by percents).
    """
    n = rows.shape[0]
    block = max(1, _CPU_BLOCK_ELEMENTS // max(1, rows.shape[1])) if rows.is_cpu else n
    s1 = torch.zeros_like(centre)
    s2 = torch.zeros_like(centre)
    ones = torch.ones((1, min(block, n)), dtype=centre.dtype, device=rows.device)
    # In-place addmm_ has no vmap batching rule (torch warns and loops): out of place there.
    batched = torch._C._are_functorch_transforms_active()
    for part in rows.split(max(block, 1)):
        dev = part - centre  # type promotion widens half rows without a converted copy
        w = ones[:, : part.shape[0]]
        if batched:
            s1, s2 = s1 + w @ dev, s2 + w @ (dev * dev)
            continue
        s1.addmm_(w, dev)  # matrix-vector products: faster than sum(0)
        dev.mul_(dev)
        s2.addmm_(w, dev)
    return s1, s2


def _leaf_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, Σᵢ (xᵢ − mean)²)`` over the leading dimension: the corrected two-pass formula.

    A mean summed in the gradients' dtype is off by a few of its ulps; when the spread is only
    some thousands of ulps of the mean, ``Σ (xᵢ − mean)²`` then carries ``n·error²`` (float32
    gradients with mean/std = 1e5 had 6e-4 relative error in the variance). Subtracting
    ``(Σ dᵢ)²/n`` removes that to first order, and ``Σ dᵢ / n`` refines the mean.
    Half-precision leaves are reduced in float32; the mean is rounded once to their dtype and
    ``m2`` stays float32 (see :class:`GradMoments`: a float16 ``m2`` overflows).
    """
    n = x.shape[0]
    rows = row_matrix(x)
    # No examples: zeros, which merge_grad_moments treats as the empty group.
    weights = torch.full((1, n), 1.0 / max(n, 1), dtype=x.dtype, device=x.device)
    mean = widen(weights @ rows)  # a matrix-vector product: faster than ``sum(0)`` on CPU
    s1, s2 = _centred_sums(rows, mean)
    correction = s1 / max(n, 1)
    m2 = (s2 - s1 * correction).clamp_min_(0)
    mean = mean + correction
    return mean.reshape(x.shape[1:]).to(x.dtype), m2.reshape(x.shape[1:])


def grad_moments(grads: PyTree) -> GradMoments:
    """Mean and sum of squared deviations of per-sample gradients, per parameter element.

    With no examples (a leading dimension of 0), ``count`` is 0 and ``mean`` and ``m2`` are
    zeros: :func:`merge_grad_moments` treats them as the empty group and
    :func:`grad_variance` refuses them.

    Args:
        grads: per-sample gradients, real floating-point leaves sharing a leading dimension
            ``n`` (not modified).

    Returns:
        A :class:`GradMoments` with ``count = n`` and ``mean``, ``m2`` shaped like one
        example's gradient. ``mean`` has the leaves' dtype; ``m2`` is float32 for half-precision
        leaves (summed in float32), else the leaves' dtype. One example gives ``m2`` zeros.

    Raises:
        ValueError: no leaves, or leaves whose leading dimensions differ (naming the leaf).
        TypeError: a leaf that is not real floating-point.

    Example:
        >>> import torch, functrain as ft
        >>> m = ft.grad_moments({"w": torch.tensor([[1.0], [3.0]])})
        >>> m.mean["w"], ft.grad_variance(m)["w"]
        (tensor([2.]), tensor([2.]))
    """
    leaves, spec = tree.flatten(grads)
    if not leaves:
        raise ValueError("grad_moments needs at least one gradient leaf")
    _check_rows(leaves, grads)
    count = leaves[0].shape[0]
    means, m2 = zip(*(_leaf_moments(x) for x in leaves))
    return GradMoments(count, tree.unflatten(spec, list(means)), tree.unflatten(spec, list(m2)))


def merge_grad_moments(a: GradMoments, b: GradMoments) -> GradMoments:
    """Moments of the union of two groups of examples (Chan et al.'s parallel update).

    Exact and numerically stable: ``mean = mean_a + δ·n_b/n``, ``m2 = m2_a + m2_b + δ²·n_a·n_b/n``
    with ``δ = mean_b − mean_a``. Each mean carries its dtype's rounding, which enters ``δ``:
    the merged variance has a relative error of about ``ε·|mean|/std`` (float32 gradients with
    mean/std = 1e3 merged one example at a time: about 1e-4).
    :func:`per_sample_grad_moments` accumulates around a fixed centre instead.
    Half-precision moments are merged in float32: the merged mean is rounded once to the
    means' dtype and ``m2`` stays float32 (a half-precision ``m2`` given here is widened).
    A mean merged from ``k`` parts has been rounded ``k − 1`` times; ``m2`` is not rounded.

    Args:
        a: moments of one group (not modified).
        b: moments of the other group, with ``a``'s structure and shapes.

    Returns:
        The :class:`GradMoments` of both groups (``count = a.count + b.count``), with tensors
        of its own: never ``a``'s or ``b``'s, also when one group is empty (``count`` 0; its
        values are then ignored, its structure and shapes still checked), so a caller may
        update the result in place without touching an input.

    Raises:
        TreeMismatchError: (a ``ValueError``) the structures or leaf shapes differ.

    Example:
        >>> import torch, functrain as ft
        >>> g = {"w": torch.tensor([[1.0], [2.0], [6.0]])}
        >>> a, b = ft.grad_moments({"w": g["w"][:1]}), ft.grad_moments({"w": g["w"][1:]})
        >>> m = ft.merge_grad_moments(a, b)
        >>> m.count, m.mean["w"], ft.grad_variance(m)["w"]
        (3, tensor([3.]), tensor([7.]))
    """
    n = a.count + b.count
    tree.check_shapes(a.mean, b.mean, ("a.mean", "b.mean"))  # _foreach ops would broadcast
    mean_a, spec = tree.flatten(a.mean)
    mean_b = tree.flatten_up_to(spec, b.mean, ("a.mean", "b.mean"), a.mean)
    m2_a = tree.flatten_up_to(spec, a.m2, ("a.mean", "a.m2"), a.mean)
    m2_b = tree.flatten_up_to(spec, b.m2, ("a.mean", "b.m2"), a.mean)
    dtypes = [torch.promote_types(x.dtype, y.dtype) for x, y in zip(mean_a, mean_b)]
    if a.count == 0 or b.count == 0:
        # Copies in the dtypes of the general case: returning the other group itself let an
        # in-place update of the result (e.g. of an accumulator started empty) change it, and
        # kept a half-precision m2 that the general case widens.
        mean, m2 = (mean_b, m2_b) if a.count == 0 else (mean_a, m2_a)
        m2_dtypes = [
            torch.promote_types(widen(x).dtype, widen(y).dtype) for x, y in zip(m2_a, m2_b)
        ]
        mean = [x.to(d, copy=True) for x, d in zip(mean, dtypes)]
        m2 = [x.to(d, copy=True) for x, d in zip(m2, m2_dtypes)]
        return GradMoments(n, tree.unflatten(spec, mean), tree.unflatten(spec, m2))
    # Half-precision leaves in float32 (widen_all returns the same lists when there are none):
    # ``δ²·n_a·n_b/n`` and the sum of the m2s overflowed float16.
    wide_a = widen_all(mean_a)
    delta = _foreach.sub(widen_all(mean_b), wide_a)
    mean = _foreach.add(wide_a, delta, alpha=b.count / n)
    m2 = _foreach.add(widen_all(m2_a), widen_all(m2_b))
    _foreach.addcmul_(m2, delta, delta, value=a.count * b.count / n)
    mean = [x.to(d) if d in _HALF else x for x, d in zip(mean, dtypes)]
    return GradMoments(n, tree.unflatten(spec, mean), tree.unflatten(spec, m2))


def grad_variance(m: GradMoments, ddof: int = 1) -> PyTree:
    """Per-element variance of the per-sample gradients, ``m2 / (n − ddof)``.

    Half-precision moments give the variance in ``mean``'s dtype, divided in float32 and
    rounded once (``inf`` in float16 only where the variance itself exceeds 65504).

    Args:
        m: the moments (:func:`grad_moments`).
        ddof: ``1`` (default) for the unbiased sample variance, ``0`` for the biased one
            (``m2 / n``).

    Returns:
        A pytree like ``m.mean`` of per-element variances, in ``mean``'s dtype.

    Raises:
        ValueError: ``n ≤ ddof`` (e.g. one example with ``ddof=1``, or none).

    Example:
        >>> import torch, functrain as ft
        >>> ft.grad_variance(ft.grad_moments([torch.tensor([[0.0], [2.0]])]), ddof=0)
        [tensor([1.])]
    """
    scale = _variance_scale(m, ddof)
    return tree.map(lambda mu, s: _narrow_like(widen(s) * scale, mu), m.mean, m.m2)


def _variance_scale(m: GradMoments, ddof: int) -> float:
    """``1 / (n − ddof)``, refusing ``n ≤ ddof``."""
    if m.count - ddof <= 0:
        raise ValueError(
            f"variance with ddof={ddof} needs more than {ddof} examples, got {m.count}"
        )
    return 1.0 / (m.count - ddof)


def grad_snr(m: GradMoments, ddof: int = 1, eps: float = 1e-30) -> PyTree:
    """Gradient signal-to-noise ratio per parameter element: ``mean² / variance``.

    The GSNR of Liu et al. 2020 ("Understanding why neural networks generalize well through
    GSNR of parameters"): large when examples agree on a coordinate's gradient. ``eps`` floors
    the variance: a coordinate with zero variance gets ``mean² / eps`` (0 where its mean is 0,
    ``inf`` where ``mean² / eps`` overflows the dtype, as it does for any nonzero mean in
    float16). Half-precision moments are divided in float32 and rounded once.

    Args:
        m: the moments (:func:`grad_moments`).
        ddof: the variance's ``ddof``, as in :func:`grad_variance` (1: unbiased).
        eps: floor on the variance.

    Returns:
        A pytree like ``m.mean`` of per-element ratios, in ``mean``'s dtype.

    Raises:
        ValueError: ``n ≤ ddof``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.grad_snr(ft.grad_moments([torch.tensor([[1.0], [3.0]])]))
        [tensor([2.])]
    """
    scale = _variance_scale(m, ddof)

    def snr(mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # In float16 ``eps`` rounds to 0 and a zero-variance, zero-mean coordinate gave NaN.
        # The variance is not rounded to half first: the ratio is rounded once.
        mu_w, v_w = widen(mu), widen(s) * scale
        return (mu_w * mu_w / v_w.clamp_min(eps)).to(mu.dtype)

    return tree.map(snr, m.mean, m.m2)
