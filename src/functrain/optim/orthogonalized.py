"""Muon: momentum orthogonalized by Newton–Schulz iterations (optax's ``contrib.muon``).

Matrix parameters get the orthogonalized momentum; every other parameter goes to AdamW through
:func:`~functrain.optim.partition`, as in optax.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import optree
import torch

from functrain import tree
from functrain.optim import _ops, _utils, additive, aliases, base, scaling, wrappers
from functrain.optim._adam_ops import Hyper, _bias, _operands
from functrain.optim._utils import ScalarOrSchedule

__all__ = [
    "MuonDimensionNumbers",
    "MuonState",
    "muon",
    "orthogonalize_via_newton_schulz",
    "scale_by_muon",
]

DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
# optax's named coefficient sets (``muon(ns_coeffs="dion")``): Ahn et al. (2025), one row a step.
NS_COEFFS_PRESETS: dict[str, Any] = {
    "standard": DEFAULT_NS_COEFFS,
    "dion": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
}
Preconditioning = Literal["frobenius", "spectral", "aol", "schatten"]
PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")
# The floor of the AOL row sums and of ‖XXᴴ‖_F in the first 'aol'/'schatten' step: a fixed
# constant in optax (its ``eps`` argument is not passed there), kept for the same numbers.
_FIRST_STEP_FLOOR = 1e-8


class MuonDimensionNumbers(NamedTuple):
    """Which axes of a weight are its input (reduction) and output axes.

    Muon orthogonalizes the ``(fan_in, fan_out)`` matrix of every weight; any axis that is
    neither is a batch axis (each slice is orthogonalized on its own, e.g. stacked experts).

    Difference from optax: the defaults follow PyTorch's layout. ``nn.Linear.weight`` is
    ``(out, in)``, so the reduction axis is the last one and the output axis the one before it
    (optax's ``(in, out)`` kernels have ``reduction_axis=0, output_axis=1``). For an
    ``nn.Conv2d`` weight ``(out, in, kh, kw)`` use ``MuonDimensionNumbers((1, 2, 3), 0)``.

    Example:
        >>> import functrain as ft
        >>> ft.MuonDimensionNumbers()
        MuonDimensionNumbers(reduction_axis=-1, output_axis=-2)
    """

    reduction_axis: Sequence[int] | int = -1
    output_axis: Sequence[int] | int = -2


class MuonState(NamedTuple):
    """State of :func:`scale_by_muon`: the int32 step ``count`` and the momentum ``mu``.

    optax's also holds the Newton–Schulz coefficients; here they stay arguments of the
    transform (Python numbers, which the fused matrix products take).
    """

    count: torch.Tensor
    mu: Any


def _axes(x: torch.Tensor, dims: MuonDimensionNumbers) -> tuple[tuple[int, ...], tuple[int, ...]]:
    def normal(axes: Sequence[int] | int) -> tuple[int, ...]:
        return tuple(a % x.dim() for a in ((axes,) if isinstance(axes, int) else axes))

    if x.dim() < 2:
        raise ValueError(f"Muon needs parameters of rank >= 2, got shape {tuple(x.shape)}")
    reduction, output = normal(dims.reduction_axis), normal(dims.output_axis)
    if set(reduction) & set(output) or not reduction or not output:
        raise ValueError(
            f"{dims} for shape {tuple(x.shape)}: the reduction axes {reduction} and output axes "
            f"{output} must be non-empty and disjoint"
        )
    return reduction, output


def _fans(x: torch.Tensor, dims: MuonDimensionNumbers) -> tuple[int, int]:
    reduction, output = _axes(x, dims)
    # Lists, not generators: torch.compile(fullgraph=True) cannot pass a generator to math.prod.
    return math.prod([x.shape[a] for a in reduction]), math.prod([x.shape[a] for a in output])


Rows = tuple[tuple[float, float, float], ...]


def _check_preconditioning(preconditioning: Any) -> None:
    if not isinstance(preconditioning, str) or preconditioning not in PRECONDITIONINGS:
        raise ValueError(
            f"preconditioning must be one of {PRECONDITIONINGS}, got {preconditioning!r}"
        )


def _spectral_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``X / (σ_max(X) + eps)`` per matrix; the SVD in float32 at least (none for half types)."""
    wide = (
        x
        if x.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128)
        else x.float()
    )
    return (wide / (torch.linalg.matrix_norm(wide, ord=2, keepdim=True) + eps)).to(x.dtype)


def _first_step_gram(
    x: torch.Tensor, a: torch.Tensor, preconditioning: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescales ``X`` and ``A = XXᴴ`` before the first step of the AOL and Schatten-4 variants.

    AOL (Boissin et al., 2025): ``D = diag(1/√max(Σⱼ|Aᵢⱼ|, floor))``, ``X ← DX``, ``A ← DAD``
    (each row's bound on ``σ_max`` makes ``DX`` a contraction). Schatten-4 (Grishina et al.,
    2025): ``s = 1/√max(‖A‖_F, floor)`` (``‖A‖_F = ‖X‖²_S4 ≥ σ_max²``), ``X ← sX``, ``A ← s²A``.
    Reusing the rescaled ``A`` saves one product over recomputing it.
    """
    if preconditioning == "aol":
        s = torch.rsqrt(a.abs().sum(-1, keepdim=True).clamp(min=_FIRST_STEP_FLOOR))
        return x * s, a * s * s.mT
    norm = torch.linalg.vector_norm(a, dim=(-2, -1), keepdim=True)
    s = torch.rsqrt(norm.clamp(min=_FIRST_STEP_FLOOR))
    return x * s, a * (s * s)


def _newton_schulz(
    x: torch.Tensor, rows: Rows, eps: float, preconditioning: str = "frobenius"
) -> torch.Tensor:
    """Orthogonalizes each ``(m, n)`` matrix of a ``(batch, m, n)`` tensor, one step per row.

    The coefficients are Python numbers, so each step is two fused ``baddbmm`` (the scalings
    ride in the matrix product: 13% faster than separate products in float32 on the CPU, and
    half the time in bfloat16, whose element-wise ops are slow there).
    """
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # f(Xᵀ) = f(X)ᵀ: iterate on the smaller Gram matrix
        x = x.mT
    if preconditioning == "frobenius":
        norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
        x = x / (norm + eps)  # spectral norm at most 1
    elif preconditioning == "spectral":
        x = _spectral_normalize(x, eps)
    # 'aol' and 'schatten' rescale inside the first step instead (as optax: no eps division).
    single = x.shape[0] == 1  # one matrix: 2-D products (bfloat16's batched XXᵀ is 2× slower)
    if single:
        x = x[0]
    for step, (c0, c1, c2) in enumerate(rows):
        a = x @ x.mT.conj()
        if step == 0 and preconditioning in ("aol", "schatten"):
            x, a = _first_step_gram(x, a, preconditioning)
        if single:
            b = torch.addmm(a, a, a, beta=c1, alpha=c2)  # c₁A + c₂A²
            x = torch.addmm(x, b, x, beta=c0)  # c₀X + BX
        else:
            b = torch.baddbmm(a, a, a, beta=c1, alpha=c2)
            x = torch.baddbmm(x, b, x, beta=c0)
    if single:
        x = x[None]
    return x.mT if transposed else x


def orthogonalize_via_newton_schulz(
    x: torch.Tensor,
    ns_coeffs: torch.Tensor | Sequence[float] | Sequence[Sequence[float]] = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    preconditioning: Preconditioning = "frobenius",
    eps: float = 1e-8,
    dimension_numbers: MuonDimensionNumbers | None = None,
) -> torch.Tensor:
    """Approximately orthogonalizes ``x`` with a quintic Newton–Schulz iteration.

    Each step maps ``X ← c₀X + (c₁A + c₂A²)X`` with ``A = XXᴴ`` (``X`` the wide orientation of
    the matrix), after scaling ``X`` so that its singular values are at most about 1, as
    ``preconditioning`` says:

    * ``"frobenius"``: ``X ← X / (‖X‖_F + eps)`` (the default);
    * ``"spectral"``: ``X ← X / (σ_max(X) + eps)``, an SVD per matrix: costly, but the
      singular values start as large as they can;
    * ``"aol"``: in the first step ``X ← DX``, ``A ← DAD`` with ``D = diag(1/√Σⱼ|Aᵢⱼ|)`` (the
      row sums floored at ``1e-8``), Boissin et al. (2025);
    * ``"schatten"``: in the first step ``X ← X/√‖A‖_F`` (``‖A‖_F`` floored at ``1e-8``), the
      Schatten-4 norm of ``X``, Grishina et al. (2025).

    With ``"aol"`` and ``"schatten"`` ``eps`` is not used (optax's fixed floor instead), and
    with ``ns_steps=0`` they return ``x`` unscaled, as optax does. Difference from optax: for
    complex ``x`` the Schatten step uses ``A = XXᴴ`` like every other step (optax's ``XXᵀ`` is
    not a Gram matrix there); real inputs are unaffected.

    The default coefficients (Keller Jordan's) push the singular values towards 1 quickly but
    not exactly (to about ``[0.7, 1.2]``); ``ns_coeffs=(1.5, -0.5, 0.0)`` with many steps
    converges to the polar factor ``UVᴴ`` of ``x = UΣVᴴ``.

    Args:
        x: a matrix, or a tensor whose matrix is named by ``dimension_numbers``.
        ns_coeffs: ``(c₀, c₁, c₂)``, or one row per step (shape ``(steps, 3)``).
        ns_steps: the number of steps (ignored when ``ns_coeffs`` has one row per step).
        preconditioning: ``"frobenius"``, ``"spectral"``, ``"aol"`` or ``"schatten"`` (above).
            Positional before ``eps``, as in optax.
        eps: added to the Frobenius or spectral norm before dividing.
        dimension_numbers: the reduction and output axes; default: those of
            :class:`MuonDimensionNumbers` (a 2-D ``x`` as it is).

    Returns:
        A tensor of ``x``'s shape and dtype: each matrix's approximate polar factor.

    Example:
        >>> import torch, functrain as ft
        >>> x = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
        >>> polar = ft.orthogonalize_via_newton_schulz(x, (1.5, -0.5, 0.0), ns_steps=30)
        >>> torch.allclose(polar, torch.eye(2, dtype=torch.float64))
        True
    """
    _check_preconditioning(preconditioning)
    rows = _rows(ns_coeffs, ns_steps)
    dims = dimension_numbers or MuonDimensionNumbers()
    return _orthogonalize(x, rows, eps, dims, None, preconditioning)


def _orthogonalize(
    x: torch.Tensor,
    rows: Rows,
    eps: float,
    dims: MuonDimensionNumbers,
    dtype: torch.dtype | None,
    preconditioning: str = "frobenius",
) -> torch.Tensor:
    reduction, output = _axes(x, dims)
    batch = [a for a in range(x.dim()) if a not in reduction and a not in output]
    order = [*batch, *reduction, *output]
    moved = x.permute(order)
    if dtype is not None:  # cast and lay out the matrices in one pass, not a copy then a cast
        moved = moved.to(dtype, memory_format=torch.contiguous_format)
    matrices = moved.reshape(-1, *_fans(x, dims))
    result = _newton_schulz(matrices, rows, eps, preconditioning).to(x.dtype).reshape(moved.shape)
    return result.permute(sorted(range(x.dim()), key=order.__getitem__))


def _rows(ns_coeffs: Any, steps: int) -> Rows:
    """The coefficients of each step as Python numbers (checked: shape ``(3,)`` or ``(n, 3)``)."""
    coeffs = torch.as_tensor(ns_coeffs, dtype=torch.float64)
    if coeffs.dim() not in (1, 2) or coeffs.shape[-1] != 3:
        raise ValueError(f"ns_coeffs must have shape (3,) or (steps, 3), got {tuple(coeffs.shape)}")
    listed = coeffs.tolist()
    return tuple(map(tuple, listed)) if coeffs.dim() == 2 else (tuple(listed),) * steps


DimensionNumbers = MuonDimensionNumbers | Any | Callable[[Any], Any] | None


def _leaf_dims(dims: DimensionNumbers, updates: Any) -> list[MuonDimensionNumbers]:
    """One :class:`MuonDimensionNumbers` per tensor leaf of ``updates``, in flattening order.

    A pytree of them is matched by path, so that masked-out leaves (``None``, or ``MaskedNode``
    under ``vmap``) need nothing and a ``None`` there is fine.
    """
    resolved = dims(updates) if callable(dims) else dims
    paths, leaves, _ = tree.flatten_with_paths(updates)
    if resolved is None or isinstance(resolved, MuonDimensionNumbers):
        return [resolved or MuonDimensionNumbers()] * len(leaves)
    found = optree.tree_flatten_with_path(
        resolved, is_leaf=lambda x: isinstance(x, MuonDimensionNumbers)
    )
    table = dict(zip(found[0], found[1]))
    out = []
    for path in paths:
        chosen = table.get(path)
        if not isinstance(chosen, MuonDimensionNumbers):
            raise TypeError(
                f"{tree.path_str(path, 'weight_dimension_numbers')} must be a "
                f"MuonDimensionNumbers for the update at that path, got {type(chosen).__name__}"
            )
        out.append(chosen)
    return out


def scale_by_muon(
    ns_coeffs: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    beta: Hyper = 0.95,
    eps: float = 1e-8,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: Preconditioning = "frobenius",
    weight_dimension_numbers: DimensionNumbers = None,
    ns_dtype: torch.dtype | None = None,
) -> base.GradientTransformation:
    """Rescales updates by Muon: the orthogonalized, bias-corrected momentum (optax semantics).

    Update rule (``t`` the new count)::

        mu ← beta · mu + (1 − beta) · g
        m̂ = beta · mu / (1 − betaᵗ⁺¹) + (1 − beta) · g / (1 − betaᵗ)   (nesterov; else mu / (1 − betaᵗ))
        u = NS(m̂)                     (:func:`orthogonalize_via_newton_schulz`, per matrix)
        u ← ⟨m̂, u⟩ · u                (adaptive only)

    Differences from ``torch.optim.Muon``: PyTorch keeps the same average without bias
    correction. Without Nesterov the direction is then the same (the iteration normalizes its
    input); with Nesterov, PyTorch's ``(1 − β)·g + β·mu`` weighs the two terms differently in
    the first steps (the gap fades as ``βᵗ``). The iteration runs in the gradient's precision
    (float32 for float16/bfloat16 gradients) where PyTorch always casts to bfloat16:
    ``ns_dtype=torch.bfloat16`` does the same, about 3× faster on a CPU with bfloat16 support,
    at bfloat16's accuracy. ``eps`` is added to the norm where PyTorch clamps the norm. The
    width scaling and weight decay belong to :func:`muon`.

    Args:
        ns_coeffs: the Newton–Schulz coefficients ``(c₀, c₁, c₂)`` or one row per step.
        ns_steps: the number of Newton–Schulz steps (ignored with per-step rows).
        beta: the momentum decay, in ``[0, 1)``.
        eps: added to each matrix's Frobenius norm before dividing.
        mu_dtype: optional dtype in which the momentum is stored.
        nesterov: use the Nesterov look-ahead (the default, as in optax).
        adaptive: scale each orthogonalized update by ``⟨m̂, u⟩`` (Bernstein et al., 2024).
        preconditioning: how each matrix is scaled before the iteration: ``"frobenius"`` (the
            default), ``"spectral"``, ``"aol"`` or ``"schatten"`` (see
            :func:`orthogonalize_via_newton_schulz`).
        weight_dimension_numbers: ``None`` (every leaf is ``(out, in)``-like, see
            :class:`MuonDimensionNumbers`), one :class:`MuonDimensionNumbers` for every leaf, a
            pytree of them like the updates, or a callable ``updates -> such a pytree``.
        ns_dtype: the dtype of the Newton–Schulz iteration (``None``: the gradient's, at
            least float32); an extension of optax's signature.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_muon()
        >>> params = {"w": torch.zeros(2, 3)}
        >>> u, state = tx.update({"w": torch.ones(2, 3)}, tx.init(params))
        >>> torch.linalg.matrix_norm(u["w"], ord=2) > 0.5   # singular values pushed towards 1
        tensor(True)
    """
    _ops.check_decay("beta", beta)
    _ops.check_dtype("mu_dtype", mu_dtype)
    _utils.check_finite_number("eps", eps, minimum=0.0)
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 0:
        raise ValueError(f"ns_steps must be a non-negative int, got {ns_steps!r}")
    _ops.check_dtype("ns_dtype", ns_dtype)
    _check_preconditioning(preconditioning)
    rows = _rows(ns_coeffs, ns_steps)

    def init_fn(params: Any) -> MuonState:
        return MuonState(_utils.zero_count(params), _ops.state_zeros(params, mu_dtype, "mu_dtype"))

    def update_fn(
        updates: Any, state: MuonState, params: Any = None, **extra: Any
    ) -> tuple[Any, MuonState]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu})
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, state._replace(count=count)
        dims = _leaf_dims(weight_dimension_numbers, updates)
        g, given = _operands(g, s["state.mu"]), g
        mu = _ops.moment(g, s["state.mu"], beta)
        dtype = _ops.scalar_dtype(g)
        if nesterov:
            # β·mu/(1 − βᵗ⁺¹) + (1 − β)·g/(1 − βᵗ) in two passes (the scalars first), not five.
            ahead = _ops.on_device(beta / _bias(beta, _utils.safe_increment(count), dtype), g[0])
            now = _ops.on_device((1 - beta) / _bias(beta, count, dtype), g[0])
            mu_hat = [torch.addcmul(m * ahead, x, now) for m, x in zip(mu, g)]
        else:
            mu_hat = _ops.div(mu, _bias(beta, count, dtype))
        out = [
            _orthogonalize(m, rows, eps, d, ns_dtype, preconditioning) for m, d in zip(mu_hat, dims)
        ]
        if adaptive:
            out = [(m.conj() * u).sum() * u for m, u in zip(mu_hat, out)]
        out = _ops.cast_like(out, given)
        mu = _ops.cast_like(mu, s["state.mu"])
        return tree.unflatten(spec, out), MuonState(count, tree.unflatten(spec, mu))

    return base.GradientTransformation(init_fn, update_fn)


def _scale_by_shape(
    dims: DimensionNumbers, consistent_rms: float | None
) -> base.GradientTransformation:
    """Muon's width scaling: ``√max(1, fan_out / fan_in)``, or with ``consistent_rms``
    ``√max(fan_in, fan_out) · consistent_rms``."""

    def scale(x: torch.Tensor, d: MuonDimensionNumbers) -> torch.Tensor:
        fan_in, fan_out = _fans(x, d)
        if consistent_rms is None:
            return x * math.sqrt(max(1.0, fan_out / fan_in))
        return x * (math.sqrt(max(fan_in, fan_out)) * consistent_rms)

    def scale_all(updates: Any, params: Any) -> Any:
        del params
        leaves, spec = tree.flatten(updates)
        return tree.unflatten(spec, list(map(scale, leaves, _leaf_dims(dims, updates))))

    return base.stateless(scale_all)


def _labels(dims: DimensionNumbers) -> Callable[[Any], Any]:
    def labels(params: Any) -> Any:
        if dims is None:
            return tree.map(lambda p: "muon" if p.dim() == 2 else "adam", params)
        resolved = dims(params) if callable(dims) else dims
        if isinstance(resolved, MuonDimensionNumbers):
            return tree.map(lambda p: "muon", params)
        spec = tree.structure(params)
        chosen = tree.flatten_up_to(spec, resolved, ("params", "muon_weight_dimension_numbers"))
        return tree.unflatten(spec, ["adam" if d is None else "muon" for d in chosen])

    return labels


def muon(
    learning_rate: ScalarOrSchedule,
    ns_coeffs: Sequence[float] | Sequence[Sequence[float]] | str = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    beta: Hyper = 0.95,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: Preconditioning = "frobenius",
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps_root: float = 0.0,
    adam_weight_decay: ScalarOrSchedule = 0.0,
    adam_learning_rate: ScalarOrSchedule | None = None,
    muon_weight_dimension_numbers: DimensionNumbers = None,
    consistent_rms: float | None = None,
    ns_dtype: torch.dtype | None = None,
) -> base.GradientTransformation:
    """Muon (Jordan et al., 2024) for matrices, AdamW for everything else (optax's alias).

    Update rule for a Muon parameter ``p``::

        u = −lr · (scale · scale_by_muon(g) + weight_decay · p)
        scale = √max(1, fan_out / fan_in)      (or √max(fan_in, fan_out) · consistent_rms)

    and for the others ``adamw(adam_lr, adam_b1, adam_b2, eps, adam_eps_root, mu_dtype,
    adam_weight_decay, nesterov=nesterov)`` (``adam_lr``: ``adam_learning_rate``, by default
    ``learning_rate``). By default the Muon parameters are the 2-D ones;
    ``muon_weight_dimension_numbers`` (a :class:`MuonDimensionNumbers` for all, a pytree like
    the params with ``None`` for AdamW leaves, or a callable ``params -> pytree``) chooses
    them and names their axes, e.g. to include convolutions. A callable is also called on the
    Muon group's updates, whose AdamW leaves are ``None``: write it leaf-wise with
    :func:`functrain.tree.map` (which skips ``None``), as optax's is called on updates holding
    ``MaskedNode`` leaves.

    Differences from ``torch.optim.Muon``: see :func:`scale_by_muon` for the momentum and the
    iteration; PyTorch's ``adjust_lr_fn=None`` is the same width scaling (its
    ``"match_rms_adamw"`` is ``consistent_rms=0.2``), its default ``weight_decay`` is 0.1
    (optax's 0.0), and it refuses non-matrix parameters where this alias hands them to AdamW.

    Args:
        learning_rate: the step size: a number, a 0-d tensor or a schedule.
        ns_coeffs: Newton–Schulz coefficients ``(c₀, c₁, c₂)`` or one row per step, or the
            name of a preset: ``"standard"`` (the default's) or ``"dion"`` (Ahn et al., 2025).
        ns_steps: the number of Newton–Schulz steps.
        beta: the momentum decay of the Muon parameters.
        eps: Muon's norm ``eps`` and AdamW's ``eps``.
        weight_decay: decoupled weight decay of the Muon parameters (times the learning rate).
        weight_decay_mask: which Muon parameters decay (a pytree of booleans or a callable).
        mu_dtype: optional dtype of both optimizers' first moments.
        nesterov: Nesterov momentum, for Muon and AdamW alike.
        adaptive: see :func:`scale_by_muon`.
        preconditioning: the scaling before the iteration, see
            :func:`orthogonalize_via_newton_schulz`.
        adam_b1: AdamW's ``b1``.
        adam_b2: AdamW's ``b2``.
        adam_eps_root: AdamW's ``eps_root``.
        adam_weight_decay: AdamW's weight decay.
        adam_learning_rate: AdamW's step size (a number, a 0-d tensor or a schedule);
            ``None``: ``learning_rate``.
        muon_weight_dimension_numbers: which parameters use Muon and their axes (see above).
        consistent_rms: use the shape-independent update RMS of Liu et al. (2025) (``0.2``
            matches AdamW's typical RMS) instead of the width scaling.
        ns_dtype: the dtype of the Newton–Schulz iteration, as in :func:`scale_by_muon`
            (``torch.bfloat16``: PyTorch's choice, faster, less accurate).

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(4, 2), "b": torch.zeros(4)}
        >>> tx = ft.muon(learning_rate=0.1)
        >>> grads = {"w": torch.ones(4, 2), "b": torch.ones(4)}
        >>> updates, state = tx.update(grads, tx.init(params), params)
        >>> updates["b"]   # Nesterov AdamW: −lr · (0.9 · 0.1 / (1 − 0.9²) + 1)
        tensor([-0.1474, -0.1474, -0.1474, -0.1474])
        >>> sorted(state.inner_states)   # the Muon and the AdamW groups
        ['adam', 'muon']
    """
    if consistent_rms is not None:
        _utils.check_finite_number("consistent_rms", consistent_rms, minimum=0.0)
    if isinstance(ns_coeffs, str):
        if ns_coeffs not in NS_COEFFS_PRESETS:
            raise ValueError(
                f"ns_coeffs preset must be one of {tuple(NS_COEFFS_PRESETS)}, got {ns_coeffs!r}"
            )
        ns_coeffs = NS_COEFFS_PRESETS[ns_coeffs]
    if adam_learning_rate is None:
        adam_learning_rate = learning_rate
    inner = muon_weight_dimension_numbers
    muon_group = base.chain(
        scale_by_muon(
            ns_coeffs,
            ns_steps,
            beta,
            eps,
            mu_dtype,
            nesterov=nesterov,
            adaptive=adaptive,
            preconditioning=preconditioning,
            weight_dimension_numbers=inner,
            ns_dtype=ns_dtype,
        ),
        _scale_by_shape(inner, consistent_rms),
        additive.add_decayed_weights(weight_decay, weight_decay_mask),
        scaling.scale_by_learning_rate(learning_rate),
    )
    adam_group = aliases.adamw(
        adam_learning_rate,
        b1=adam_b1,
        b2=adam_b2,
        eps=eps,
        eps_root=adam_eps_root,
        mu_dtype=mu_dtype,
        weight_decay=adam_weight_decay,
        nesterov=nesterov,
    )
    return wrappers.partition({"muon": muon_group, "adam": adam_group}, _labels(inner))
