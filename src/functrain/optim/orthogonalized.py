"""Muon: momentum orthogonalized by Newton–Schulz iterations (optax's ``contrib.muon``).

Matrix parameters get the orthogonalized momentum; every other parameter goes to AdamW through
:func:`~functrain.optim.partition`, as in optax.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optree
import torch

from functrain import tree
from functrain.optim import _ops, _utils, additive, aliases, base, scaling, wrappers
from functrain.optim._adam_ops import Hyper, _bias, _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.newton_schulz import (
    DEFAULT_NS_COEFFS,
    NS_COEFFS_PRESETS,
    MuonDimensionNumbers,
    Preconditioning,
    _check_preconditioning,
    _fans,
    _orthogonalize,
    _rows,
)

__all__ = ["MuonState", "muon", "scale_by_muon"]


class MuonState(NamedTuple):
    """State of :func:`scale_by_muon`: the int32 step ``count`` and the momentum ``mu``.

    optax's also holds the Newton–Schulz coefficients; here they stay arguments of the
    transform (Python numbers, which the fused matrix products take).
    """

    count: torch.Tensor
    mu: Any


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
    # First a tree_map over the updates' structure: torch.compile traces it, where optree's
    # ``is_leaf`` flattening below breaks ``fullgraph`` (a pytree or callable of dims failed
    # to compile). The path matching handles masked-out leaves whose dims are not ``None``.
    picked: list[Any] = []
    try:
        optree.tree_map(lambda u, d: picked.append(d), updates, resolved)
    except ValueError:
        picked = []
    if len(picked) == len(leaves) and all(isinstance(d, MuonDimensionNumbers) for d in picked):
        return picked
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
        # optree's tree_map, not ``PyTreeSpec.flatten_up_to``: under torch.compile the latter
        # mis-handles the MuonDimensionNumbers (NamedTuples) and the Nones, so a pytree or
        # callable ``dims`` broke ``make_train_step(compile=...)`` ("length mismatch").
        try:
            return optree.tree_map(lambda p, d: "adam" if d is None else "muon", params, resolved)
        except ValueError:  # a structure mismatch: raise the path-named error instead
            tree.flatten_up_to(
                tree.structure(params), resolved, ("params", "muon_weight_dimension_numbers")
            )
            raise

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
