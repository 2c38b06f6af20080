"""DP-SGD (Abadi et al. 2016): per-sample clipping, Gaussian noise from an explicit key.

The DP-SGD gradient of a batch of expected size ``B`` is
``(Σᵢ clip(gᵢ, C) + σ·C·ξ) / B`` with ``clip(g, C) = g · min(1, C/‖g‖)`` and ``ξ ~ N(0, I)``.

Three ways to compute it:

* **in the train step** — ``make_train_step(loss_fn, chain(dp_noisy_mean(...), opt),
  per_example_clip=C, micro_batches=K)`` forms the clipped sum micro-batch by micro-batch and
  hands it to ``tx`` (see :mod:`functrain.train.dp_stage`); with :class:`PoissonSampler`
  batches and an :class:`RDPAccountant`, the whole DP-SGD recipe.

* **optax style** — :func:`dpsgd` / :func:`differentially_private_aggregate` take per-example
  gradients (leading batch dimension, e.g. from :func:`per_sample_grads`) as ``updates``,
  clip, sum, add noise and divide by the batch dimension, with ``optax.dpsgd``'s semantics.
* **streaming, with accumulation** — :func:`clipped_grad_sum` computes ``Σᵢ clip(gᵢ, C)`` of a
  (micro-)batch chunk by chunk without holding all per-sample gradients. Sum it over the
  micro-batches of a step, then apply :func:`dp_noisy_mean` once per step: it adds the noise
  and divides by the expected batch size (fixed, as privacy accounting under Poisson sampling
  requires).

Randomness. The noise key is a 0-d int64 tensor carried in the transform state
(``state.rng_key``, on the parameters' device); no global RNG is touched. Each update splits the
key and draws the noise with a counter-based hash of (sample key, leaf index, element index)
(the 32-bit mixer of :func:`add_noise`, with the leaf index as a separate input so that no two
(step, leaf) draws of a run repeat): plain tensor arithmetic, so the noise is a pure function
of the seed and step, the same on CPU and CUDA (up to rounding), free of host syncs and
traceable by ``torch.compile``. Like ``torch.randn`` it is not a cryptographically secure
generator (Opacus' ``secure_mode``); use it for research, not for formal guarantees against an
adversary who can exploit the generator.

What is private. Only the noisy update is: :func:`clipped_grad_sum`'s ``loss_sum`` and
``num_clipped`` and :func:`per_example_global_norm_clip`'s count are exact functions of the
examples, so logging them is outside the DP guarantee (noise them and account for it, as
Andrew et al. 2021 do for adaptive clipping). An example whose gradient holds a NaN or an inf
makes the sum NaN (as in optax), so a train step that skips non-finite updates reveals that
the batch held one.

Accumulation. Sum the clipped sums of the micro-batches and apply :func:`dp_noisy_mean` once.
In your own loop feeding one micro-batch of a batch per call, ``MultiSteps`` *averages* its
``K`` inputs, so inside it use ``dp_noisy_mean(C / K, σ, B_expected / K, seed)``:
``(mean + σ(C/K)ξ) / (B/K) = (Σ + σCξ) / B``. ``make_train_step(per_example_clip=C)`` refuses
it: there each call is a whole sampled batch; give it ``micro_batches=K`` instead.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from types import MethodType
from typing import Any, NamedTuple

import torch

from functrain import optim, tree
from functrain.grads.clipping import _check_number, per_example_global_norm_clip
from functrain.optim import _prng, _utils, fused
from functrain.optim.base import GradientTransformation

__all__ = [
    "DifferentiallyPrivateAggregateState",
    "differentially_private_aggregate",
    "dp_noisy_mean",
    "dpsgd",
]

PyTree = Any

# What each DP transform is, by its update function: how ``make_train_step(per_example_clip=C)``
# checks the ``tx`` it is given (see :func:`dp_members`).
_ROLES: weakref.WeakKeyDictionary[Any, tuple[str, Any]] = weakref.WeakKeyDictionary()


def _tag(tx: GradientTransformation, role: str, l2_norm_clip: Any) -> GradientTransformation:
    _ROLES[tx.update] = (role, l2_norm_clip)
    return tx


def dp_members(tx: Any) -> Iterator[tuple[str, Any]]:
    """The members of ``tx`` in application order (chains flattened), as ``(role, clip)``.

    ``role`` is ``"noisy_mean"`` (:func:`dp_noisy_mean`, also built by
    ``inject_hyperparams(dp_noisy_mean)``), ``"aggregate"``
    (:func:`differentially_private_aggregate`, also inside :func:`dpsgd`), ``"guard"``
    (``zero_nans``: the identity on finite updates) or ``"other"`` (anything else, including
    wrappers this cannot see through); ``clip`` is the transform's ``l2_norm_clip`` (for an
    injected one, its initial value: like a tensor, it may be changed in the state later;
    ``None`` for the other roles).

    Wrappers: chains, ``named_chain``, ``apply_if_finite`` (which skips a non-finite update
    whole) and ``inject_hyperparams`` are seen through. ``MultiSteps``, ``masked`` and
    ``partition`` around an aggregate yield ``"aggregate"``, around anything else ``"other"``.

    Args:
        tx: a gradient transformation (or a ``MultiSteps``).

    Yields:
        ``(role, clip)`` per member.

    Raises:
        ValueError: ``tx`` holds a :func:`dp_noisy_mean` where its noise is not the DP-SGD
            noise of the step's clipped sum: inside ``MultiSteps`` (noise on an average over
            ``k`` steps), ``masked`` or ``partition`` (noise on some leaves only), or under
            ``inject_hyperparams`` with a scheduled ``l2_norm_clip``. The message names the
            wrapper and what to use instead.

    Example:
        >>> import functrain as ft
        >>> from functrain.grads.privacy import dp_members
        >>> tx = ft.chain(ft.dp_noisy_mean(1.0, 1.1, expected_batch_size=64, seed=0), ft.scale(-0.1))
        >>> [role for role, _ in dp_members(tx)]
        ['noisy_mean', 'other']
    """
    try:
        role = _ROLES.get(tx.update)
    except TypeError:  # an update that cannot be weakly referenced
        role = None
    if role is not None:
        yield role
        return
    spec = fused.describe(tx)  # wrappers' opaque specs included
    if isinstance(spec, fused.Chain):
        for member in spec.members:
            yield from dp_members(member)
    elif isinstance(spec, fused.NamedChain):
        for _, member in spec.members:
            yield from dp_members(member)
    elif isinstance(spec, fused.Masked):
        yield _confined("masked", [spec.inner])
    elif isinstance(spec, fused.Injected):
        yield from _injected_members(spec)
    elif isinstance(spec, fused.ApplyIfFinite):
        # The whole update is applied or skipped (zeros, the inner state and noise key
        # kept): when applied it is the inner transform's. That a skip reveals a
        # non-finite batch is documented in the module docstring.
        yield from dp_members(spec.inner)
    elif isinstance(spec, fused.Partition):
        yield _confined("partition (multi_transform)", list(spec.transforms.values()))
    elif isinstance(spec, fused.ZeroNans):
        yield ("guard", None)
    elif isinstance(getattr(tx, "update", None), MethodType) and isinstance(
        tx.update.__self__, optim.MultiSteps
    ):  # a MultiSteps or its gradient_transformation()
        yield _confined("MultiSteps", [tx.update.__self__.inner_opt])
    else:
        yield ("other", None)


# Why a dp_noisy_mean inside each wrapper is not the DP-SGD noise of the step's clipped sum.
_CONFINED = {
    "MultiSteps": (
        "it feeds its inner transform the average of k steps' clipped sums (k "
        "separately sampled batches) and adds the noise once per k steps, so the noise does "
        "not match the sensitivity of that average and an accountant counting steps counts k "
        "releases where there is one; accumulate inside one step instead with "
        "make_train_step(..., micro_batches=k) and a k times larger batch (and "
        "expected_batch_size), dropping MultiSteps (a MultiSteps after dp_noisy_mean, around "
        "the optimizer only, is fine)"
    ),
    "masked": (
        "it noises only the leaves its mask selects and releases the others without "
        "noise; put dp_noisy_mean first, outside the mask: chain(dp_noisy_mean(...), "
        "masked(...))"
    ),
    "partition (multi_transform)": (
        "it noises only the leaves of the labels whose transform "
        "holds it, each group with its own key, and releases the others without noise; put "
        "dp_noisy_mean first, outside the partition: chain(dp_noisy_mean(...), "
        "partition({...}, labels))"
    ),
}


def _confined(wrapper: str, inners: list[Any]) -> tuple[str, Any]:
    """The role of a wrapper that runs ``inners`` on part of the updates or of the steps."""
    roles = [role for inner in inners for role, _ in dp_members(inner)]
    if "noisy_mean" in roles:
        raise ValueError(f"tx wraps dp_noisy_mean in {wrapper}: {_CONFINED[wrapper]}")
    # An aggregate there still expects per-example gradients: reported as such.
    return ("aggregate", None) if "aggregate" in roles else ("other", None)


def _injected_members(spec: fused.Injected) -> Iterator[tuple[str, Any]]:
    """The members of ``inject_hyperparams(factory)(...)``: those of the factory's transform
    built with the initial hyperparameters (schedules at step 0)."""
    factory, static = spec.factory, spec.static
    numeric, schedules = spec.numeric, spec.schedules
    if factory is None:  # registered without what it injects: cannot see inside
        return
    if factory is dp_noisy_mean and "l2_norm_clip" in schedules:
        raise ValueError(
            "tx is inject_hyperparams(dp_noisy_mean) with a scheduled l2_norm_clip, but the "
            "step clips every example to the fixed per_example_clip, the sensitivity the noise "
            "must be calibrated to; give l2_norm_clip as that number (schedule "
            "noise_multiplier instead)"
        )
    try:
        count = torch.zeros((), dtype=torch.int32)
        stand_in = {name: fn(count) for name, fn in schedules.items()}
        built = factory(**static, **numeric, **stand_in)
    except Exception:  # a factory refusing the stand-ins (or a schedule failing): opaque
        yield ("other", None)
        return
    yield from dp_members(built)


def _base_key(seed: int | torch.Tensor, name: str = "seed") -> torch.Tensor:
    return _prng.key32(seed, name)


def _key_or_seed(key: int | torch.Tensor | None, seed: int | torch.Tensor | None) -> torch.Tensor:
    """The base key from optax's ``key`` (positional) or ``seed=`` (keyword): exactly one."""
    if key is not None and seed is not None:
        raise ValueError("give only one of key and seed (both set the noise key)")
    if key is None and seed is None:
        # optax 0.2.8 warns and falls back to key 0; a fixed default key for DP noise is a
        # footgun (every run adds the same noise), so here it is required.
        raise TypeError(
            "differentially_private_aggregate needs a noise key: pass key (an int seed or a "
            "0-d integer tensor key, e.g. ft.random_key(0)) or seed=<int>"
        )
    return _base_key(seed, "seed") if key is None else _base_key(key, "key")


class DifferentiallyPrivateAggregateState(NamedTuple):
    """State of the DP noise transforms: the noise key ``rng_key`` (0-d int64 tensor).

    The key is split at every update, so the noise sequence is a pure function of the seed and
    the step; saving and restoring the state resumes it exactly.
    """

    rng_key: torch.Tensor


_STREAM_SALT = 0x6A09E667
_HIGH_SALT = 0x632BE5AB


def _bits(index: torch.Tensor, key: torch.Tensor, word: int, wide: bool) -> torch.Tensor:
    """A keyed 32-bit hash of ``(key, word, index)``, each word injected in its own round."""
    low = index & _prng.MASK32 if wide else index
    x = _prng.mix32((low + key) & _prng.MASK32)
    x = _prng.mix32(x ^ word)
    if wide:  # indices past 32 bits: the high part gets a round of its own
        x = _prng.mix32(x ^ _prng.mix32(((index >> 32) + _HIGH_SALT) & _prng.MASK32))
    return _prng.mix32(x ^ key)


def _standard_normal(
    key: torch.Tensor, like: torch.Tensor, stream: int, positions: _prng.Positions | None = None
) -> torch.Tensor:
    """``N(0, 1)`` noise shaped like ``like`` (float32, float64 for float64 leaves).

    Unlike :func:`functrain.optim._prng.normal_like`, which folds ``stream`` into a 32-bit key,
    the leaf index is a separate hash input: a step's sample key and a leaf index never share
    a 32-bit value with another (step, leaf), so two draws of the same run never repeat (with
    one folded key, ``T`` steps of ``L`` leaves repeat a leaf's noise about ``(TL)²/2³³``
    times, which lets differences of released iterates cancel the noise). Complex leaves get
    independent noise in the real and imaginary parts. With ``positions``, ``like`` is a piece
    of a leaf (a sharded optimizer's) and gets the whole leaf's noise at those positions.
    """
    if like.is_complex():
        real = torch.view_as_real(like)
        parts = None if positions is None else _prng.complex_parts(positions)
        z = _standard_normal(key, real, stream, parts)
        return torch.view_as_complex(z.contiguous())
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    key = key.to(like.device) & _prng.MASK32
    word = _prng.mix32((stream + _STREAM_SALT) & _prng.MASK32)
    n, index = _prng.pair_index(like, positions)
    wide = 2 * n > _prng.MASK32
    u1 = (_bits(index, key, word, wide).to(compute) + 1) * 2.0**-32  # in (0, 1]
    u2 = _bits(index + 1, key, word, wide).to(compute) * 2.0**-32  # in [0, 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)
    return z.reshape(like.shape)


def _noisy(
    leaves: list[torch.Tensor],
    key: torch.Tensor,
    noise_std: float | torch.Tensor,
    denominator: float | torch.Tensor,
    positions: list[_prng.Positions | None] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(x + noise_std · ξ) / denominator`` per leaf, ``ξ`` from ``key``; and the next key.

    ``positions``: per leaf, where a piece's elements sit in the whole leaf (``None``: whole).

    Computed in float32 (float64, complex64/128 for such leaves) and rounded once at the end:
    a float16 sum plus noise may overflow where the mean does not, and ``noise_std`` may
    exceed float16's range.
    """
    next_key, sample_key = _prng.split(key)
    out = []
    if positions is None:
        positions = [None] * len(leaves)
    for i, (x, pos) in enumerate(zip(leaves, positions)):
        z = _standard_normal(sample_key, x, i, pos)
        wide = x.to(z.dtype) if x.dtype != z.dtype else x
        out.append(((wide + noise_std * z) / denominator).to(x.dtype))
    return out, next_key


def differentially_private_aggregate(
    l2_norm_clip: float | torch.Tensor,
    noise_multiplier: float | torch.Tensor,
    key: int | torch.Tensor | None = None,
    *,
    seed: int | torch.Tensor | None = None,
) -> GradientTransformation:
    """DP aggregation of per-example gradients, as ``optax.differentially_private_aggregate``.

    Update rule, with per-example ``updates`` ``gᵢ`` (leading batch dimension ``B``):
    ``u = (Σᵢ gᵢ·min(1, C/‖gᵢ‖) + σ·C·ξ) / B``, ``ξ ~ N(0, I)`` drawn from the state's key.

    Like optax it must come first in a chain, since it removes the batch dimension. An empty
    batch raises ``ValueError`` (no mean of no examples); where Poisson sampling can give one,
    use :func:`clipped_grad_sum` and :func:`dp_noisy_mean`, which divides by the expected
    size. The noise comes from functrain's counter-based generator (see the module
    docstring), so the numbers differ from optax's for the same seed.

    Args:
        l2_norm_clip: ``C``, maximum L2 norm of each per-example gradient.
        noise_multiplier: ``σ``, the noise standard deviation in units of ``C``.
        key: the noise key: an int seed (Python or NumPy), or a 0-d integer tensor key (e.g.
            ``ft.random_key(0)`` or a saved state's ``rng_key``). An int here is a seed, so
            the older positional ``differentially_private_aggregate(C, σ, 42)`` is the same.
        seed: an int seed (or a key tensor), optax's older keyword; give ``key`` or ``seed``.

    Raises:
        ValueError: both ``key`` and ``seed`` are given.
        TypeError: neither is given (optax 0.2.8 warns and uses key 0; a fixed default noise
            key is refused here), or one is not an int or a 0-d integer tensor.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.differentially_private_aggregate(1.0, 0.0, key=0)
        >>> per_example = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
        >>> tx.update(per_example, tx.init(None))[0]["w"]
        tensor([0.4500, 0.6000])
    """
    _check_number("l2_norm_clip", l2_norm_clip, minimum=0.0)
    _check_number("noise_multiplier", noise_multiplier, minimum=0.0)
    base_key = _key_or_seed(key, seed)

    def init_fn(params: Any) -> DifferentiallyPrivateAggregateState:
        device = _utils.default_device(params)
        # A copy: ``.to`` returns ``base_key`` itself on its device, and an in-place change
        # of one state's key (a restore into it) would change every later init's.
        return DifferentiallyPrivateAggregateState(rng_key=base_key.to(device, copy=True))

    def update_fn(
        updates: Any, state: DifferentiallyPrivateAggregateState, params: Any = None, **extra: Any
    ) -> tuple[Any, DifferentiallyPrivateAggregateState]:
        del params, extra
        clipped, _ = per_example_global_norm_clip(updates, l2_norm_clip)
        leaves, spec = tree.flatten(clipped)
        bsize = tree.leaves(updates)[0].shape[0]
        if bsize == 0:  # a static shape: no host sync
            raise ValueError(
                "differentially_private_aggregate got an empty batch of per-example gradients "
                "and divides by the realized batch size; for Poisson sampling, where a batch "
                "may be empty, use clipped_grad_sum with dp_noisy_mean (expected batch size)"
            )
        # Read at every update: tensor hyperparameters may be changed in place between steps.
        noise_std = l2_norm_clip * noise_multiplier
        out, next_key = _noisy(leaves, state.rng_key, noise_std, bsize)
        return tree.unflatten(spec, out), DifferentiallyPrivateAggregateState(next_key)

    return _tag(GradientTransformation(init_fn, update_fn), "aggregate", l2_norm_clip)


def dp_noisy_mean(
    l2_norm_clip: float | torch.Tensor,
    noise_multiplier: float | torch.Tensor,
    expected_batch_size: float | torch.Tensor,
    seed: int | torch.Tensor,
) -> GradientTransformation:
    """Turns a clipped per-example gradient *sum* into the noisy DP-SGD mean gradient.

    Update rule: ``u = (s + σ·C·ξ) / B_expected`` where ``s = Σᵢ clip(gᵢ, C)`` is the
    ``updates`` (e.g. the ``grad_sum`` of :func:`clipped_grad_sum`, summed over micro-batches)
    and ``ξ ~ N(0, I)`` is drawn from the state's key, once per step. Dividing by the expected
    (not the realized) batch size is what DP accounting under Poisson sampling assumes.

    Args:
        l2_norm_clip: ``C``, the clipping norm used to form ``s``.
        noise_multiplier: ``σ``.
        expected_batch_size: the normalization ``B_expected`` (> 0).
        seed: an int seed, or a 0-d integer tensor used as the key.

    Sharded optimizer state: ``make_data_parallel_train_step(..., per_example_clip=C,
    shard_optimizer=True)`` passes ``update(..., shard_index=[...])``, per leaf the positions
    of this rank's piece in the whole parameter (or ``None``); each piece then gets exactly its
    slice of the whole parameter's noise: the same release as the unsharded step.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.chain(ft.dp_noisy_mean(1.0, 0.0, expected_batch_size=4, seed=0), ft.sgd(0.1))
        >>> params = {"w": torch.zeros(2)}
        >>> u, _ = tx.update({"w": torch.tensor([2.0, 4.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.0500, -0.1000])
    """
    _check_number("l2_norm_clip", l2_norm_clip, minimum=0.0)
    _check_number("noise_multiplier", noise_multiplier, minimum=0.0)
    _check_number("expected_batch_size", expected_batch_size, minimum=0.0)
    if not isinstance(expected_batch_size, torch.Tensor) and expected_batch_size == 0:
        raise ValueError("expected_batch_size must be > 0")
    key = _base_key(seed)

    def init_fn(params: Any) -> DifferentiallyPrivateAggregateState:
        device = _utils.default_device(params)  # a copy, as in the aggregate's init
        return DifferentiallyPrivateAggregateState(rng_key=key.to(device, copy=True))

    def update_fn(
        updates: Any, state: DifferentiallyPrivateAggregateState, params: Any = None, **extra: Any
    ) -> tuple[Any, DifferentiallyPrivateAggregateState]:
        del params
        leaves, spec = tree.flatten(updates)
        positions = _prng.shard_positions(extra.get("shard_index"), leaves, "dp_noisy_mean")
        if not leaves:
            return updates, state
        noise_std = l2_norm_clip * noise_multiplier
        out, next_key = _noisy(leaves, state.rng_key, noise_std, expected_batch_size, positions)
        return tree.unflatten(spec, out), DifferentiallyPrivateAggregateState(next_key)

    return _tag(GradientTransformation(init_fn, update_fn), "noisy_mean", l2_norm_clip)


def dpsgd(
    learning_rate: _utils.ScalarOrSchedule,
    l2_norm_clip: float | torch.Tensor,
    noise_multiplier: float | torch.Tensor,
    seed: int | torch.Tensor,
    momentum: float | None = None,
    nesterov: bool = False,
) -> GradientTransformation:
    """The DP-SGD optimizer, as ``optax.dpsgd``: its ``updates`` are per-example gradients.

    ``chain(differentially_private_aggregate(C, σ, seed), trace(momentum, nesterov)?,
    scale_by_learning_rate(lr))``. Feed it ``ft.per_sample_grads(loss_fn, params, batch)``.
    To accumulate micro-batches without per-example updates, chain :func:`dp_noisy_mean` with
    :func:`sgd` and feed it summed :func:`clipped_grad_sum` results instead.

    Compared with Opacus' ``DPOptimizer`` (wrapping ``torch.optim.SGD``): no module hooks,
    clipping has no ``1e-6`` in the denominator, and the noise comes from ``seed``, not the
    global RNG.

    Args:
        learning_rate: a number, tensor or schedule.
        l2_norm_clip: ``C``.
        noise_multiplier: ``σ``.
        seed: seeds the noise key.
        momentum: ``None`` for plain SGD, else the momentum decay.
        nesterov: Nesterov momentum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.dpsgd(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=0.0, seed=0)
        >>> params = {"w": torch.zeros(2)}
        >>> per_example = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
        >>> u, _ = tx.update(per_example, tx.init(params), params)
        >>> u["w"]
        tensor([-0.0450, -0.0600])
    """
    return optim.chain(
        differentially_private_aggregate(l2_norm_clip, noise_multiplier, seed),
        optim.trace(decay=momentum, nesterov=nesterov)
        if momentum is not None
        else optim.identity(),
        optim.scale_by_learning_rate(learning_rate),
    )
