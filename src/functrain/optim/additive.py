"""Additive transforms: decoupled weight decay and annealed Gaussian gradient noise."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _ops, _prng, _utils, fused
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import EmptyState, GradientTransformation

__all__ = [
    "AddDecayedWeightsState",
    "AddNoiseState",
    "WeightDecayScheduleState",
    "add_decayed_weights",
    "add_noise",
]

AddDecayedWeightsState = EmptyState


class WeightDecayScheduleState(NamedTuple):
    """State of :func:`add_decayed_weights` with a scheduled decay: the int32 step ``count``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.add_decayed_weights(lambda n: 1e-4).init([torch.ones(1)])
        WeightDecayScheduleState(count=tensor(0, dtype=torch.int32))
    """

    count: torch.Tensor


def _apply_mask(tx: GradientTransformation, mask: Any) -> GradientTransformation:
    if mask is None:
        return tx
    from functrain.optim.wrappers import masked  # imported late: wrappers build on transforms

    return masked(tx, mask)


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[Any], Any] | None = None,
) -> GradientTransformation:
    """Adds ``weight_decay · params`` to the updates (decoupled weight decay, as in AdamW).

    Update rule: ``u ← u + weight_decay · p``. Placed before the learning-rate scaling (as in
    :func:`adamw`) this is multiplied by the learning rate, like ``torch.optim.AdamW``; placed
    before :func:`sgd` it equals the coupled ``torch.optim.SGD(weight_decay=...)``.

    Args:
        weight_decay: the coefficient: a number, a 0-d tensor, or a schedule of the step
            count (then the state counts steps, as optax's does).
        mask: optional pytree of booleans like ``params`` (or a callable ``params -> mask``);
            decay applies where it is ``True``. Uses :func:`functrain.optim.masked`.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.add_decayed_weights(0.1)
        >>> params = [torch.tensor([2.0])]
        >>> tx.update([torch.zeros(1)], tx.init(params), params)[0]
        [tensor([0.2000])]
    """
    _utils.check_finite_number("weight_decay", weight_decay)
    scheduled = callable(weight_decay)

    def init_fn(params: Any) -> EmptyState | WeightDecayScheduleState:
        if scheduled:
            return WeightDecayScheduleState(count=_utils.zero_count(params))
        return EmptyState()

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        del extra
        if params is None:
            raise ValueError(
                "add_decayed_weights needs params: call update(updates, state, params)"
            )
        g, spec, other = _utils.flat(updates, {"params": params})
        if scheduled:
            rate = weight_decay(state.count)
            state = WeightDecayScheduleState(count=_utils.safe_increment(state.count))
        else:
            rate = weight_decay
        p = other["params"]
        idx = [i for i, (u, w) in enumerate(zip(g, p)) if u is not None and w is not None]
        out = list(g)
        if idx:
            summed = _ops.add_scaled(
                [g[i] for i in idx], rate, _ops.cast_like([p[i] for i in idx], [g[i] for i in idx])
            )
            for i, s in zip(idx, summed):
                out[i] = s
        return tree.unflatten(spec, out), state

    tx = GradientTransformation(init_fn, update_fn)
    return _apply_mask(fused.register(tx, fused.AddDecayedWeights(weight_decay)), mask)


class AddNoiseState(NamedTuple):
    """State of :func:`add_noise`: the int32 step ``count`` and the generator key ``rng_key``.

    ``rng_key`` is a 0-d int64 tensor; it is split at every update, so the noise sequence is a
    pure function of the initial key (saving and restoring the state resumes it exactly).

    Example:
        >>> import torch, functrain as ft
        >>> state = ft.add_noise(0.01, 0.55, key=0).init([torch.zeros(1)])
        >>> state.count, state.rng_key.dtype
        (tensor(0, dtype=torch.int32), torch.int64)
    """

    count: torch.Tensor
    rng_key: torch.Tensor


def add_noise(
    eta: float | torch.Tensor,
    gamma: float | torch.Tensor,
    key: int | torch.Tensor | None = None,
    *,
    seed: int | None = None,
) -> GradientTransformation:
    """Adds annealed Gaussian noise: ``u ← u + σₜ · N(0, 1)`` with ``σₜ² = eta / tᵞ``.

    ``t`` is the step count after increment (1 at the first update), as in optax and
    Neelakantan et al. (2015).

    Randomness: there is no global RNG. The state holds an integer key (from ``key`` or
    ``seed``, default 0); every update splits it and draws the noise from a counter-based hash
    of (key, leaf, element) with ordinary tensor ops. The noise therefore depends only on the
    key and the step, is the same on CPU and CUDA (up to rounding of ``log``/``cos``), never
    synchronises with the device and compiles with ``torch.compile``. The numbers differ from
    optax's (JAX's threefry) for the same seed.

    Sharded optimizer state (``shard_optimizer=True``): the data-parallel step passes
    ``update(..., shard_index=[...])``, per leaf the positions of this rank's piece in the
    whole parameter (:class:`functrain.optim._prng.Positions`, or ``None`` for a whole leaf);
    each piece then gets exactly its slice of the whole parameter's noise, so the sharded
    run adds the very noise the unsharded one does.

    Args:
        eta: base variance of the noise.
        gamma: decay exponent of the variance.
        key: an int seed or a 0-d integer tensor key (e.g. from a previous state).
        seed: alternative spelling of an int seed (optax's deprecated argument).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.add_noise(eta=0.01, gamma=0.55, key=42)
        >>> params = {"w": torch.zeros(3)}
        >>> u1, _ = tx.update({"w": torch.zeros(3)}, tx.init(params))
        >>> u2, _ = tx.update({"w": torch.zeros(3)}, tx.init(params))
        >>> bool(torch.equal(u1["w"], u2["w"]))  # same key, same noise
        True
    """
    for name, value in (("eta", eta), ("gamma", gamma)):
        if callable(value):
            # Not a schedule argument (as in optax): it would fail at the first update with an
            # unrelated message. inject_hyperparams evaluates schedules for any argument.
            raise TypeError(
                f"{name} must be a number or a 0-d tensor, got a callable; for a schedule use "
                f"ft.inject_hyperparams(ft.add_noise)({name}=schedule, ...)"
            )
        # A shaped tensor would broadcast the noise scale against the leaves (or fail there).
        _ops.check_scalar_tensor(name, value)
    _utils.check_finite_number("eta", eta, minimum=0.0)
    _utils.check_finite_number("gamma", gamma)
    if seed is not None and key is not None:
        raise ValueError("give only one of key and seed")
    if seed is not None:
        key = seed
    if key is None:
        key = 0
    if isinstance(key, torch.Tensor):
        if key.dim() != 0 or key.dtype.is_floating_point or key.dtype == torch.bool:
            raise ValueError(f"key must be a 0-d integer tensor, got {key.dtype} {key.shape}")
        base_key = key.to(torch.int64) & _prng.MASK32
    else:
        base_key = _prng.make_key(key)

    def init_fn(params: Any) -> AddNoiseState:
        device = _utils.default_device(params)
        return AddNoiseState(count=_utils.zero_count(params), rng_key=base_key.to(device))

    def update_fn(
        updates: Any, state: AddNoiseState, params: Any = None, **extra: Any
    ) -> tuple[Any, AddNoiseState]:
        del params
        count = _utils.safe_increment(state.count)
        next_key, sample_key = _prng.split(state.rng_key)
        leaves, spec = tree.flatten(updates)
        positions = _prng.shard_positions(extra.get("shard_index"), leaves, "add_noise")
        if not leaves:
            return updates, AddNoiseState(count, next_key)
        dtype = _ops.scalar_dtype(leaves)
        variance = _ops.scalar(eta, count.to(dtype)) / torch.pow(
            count.to(dtype), _ops.scalar(gamma, count.to(dtype))
        )
        std = torch.sqrt(variance)
        out = [
            u + std.to(device=u.device, dtype=u.dtype) * _standard_normal(sample_key, u, i, pos)
            for i, (u, pos) in enumerate(zip(leaves, positions))
        ]
        return tree.unflatten(spec, out), AddNoiseState(count, next_key)

    return GradientTransformation(init_fn, update_fn)


def _standard_normal(
    key: torch.Tensor, like: torch.Tensor, stream: int, positions: _prng.Positions | None = None
) -> torch.Tensor:
    """Standard-normal noise like ``like``; complex noise has ``E|z|² = 1``, as JAX's.

    A complex leaf draws its real and imaginary parts (each of variance ½) from one real
    stream of twice the size: cast from a real draw, the noise would have no imaginary part.
    With ``positions``, ``like`` is a piece of the leaf and gets the whole leaf's noise there.
    """
    if not like.is_complex():
        return _prng.normal_like(key, like, stream, positions)
    parts = torch.empty((*like.shape, 2), dtype=_ops.real_dtype(like.dtype), device=like.device)
    if positions is not None:
        positions = _prng.complex_parts(positions)
    return torch.view_as_complex(_prng.normal_like(key, parts, stream, positions) * math.sqrt(0.5))
