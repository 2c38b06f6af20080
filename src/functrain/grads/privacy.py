"""DP-SGD (Abadi et al. 2016): per-sample clipping, Gaussian noise from an explicit key.

The DP-SGD gradient of a batch of expected size ``B`` is
``(Σᵢ clip(gᵢ, C) + σ·C·ξ) / B`` with ``clip(g, C) = g · min(1, C/‖g‖)`` and ``ξ ~ N(0, I)``.

Two ways to compute it:

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
``MultiSteps`` *averages* its ``K`` inputs, so inside it use
``dp_noisy_mean(C / K, σ, B_expected / K, seed)``: ``(mean + σ(C/K)ξ) / (B/K) = (Σ + σCξ) / B``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import optim, tree
from functrain.grads._layer_dispatch import REDUCTION_METHODS, layer_chunks, reduce_by_layers
from functrain.grads._layer_passes import clipped_sum_by_layers
from functrain.grads._per_example import _check_options, batch_size_of
from functrain.grads.per_sample import per_sample_chunks
from functrain.grads.stats import global_row_norms, leaf_row_norms, row_matrix
from functrain.optim import _prng, _utils
from functrain.optim.base import GradientTransformation

__all__ = [
    "ClippedGradSum",
    "DifferentiallyPrivateAggregateState",
    "clipped_grad_sum",
    "differentially_private_aggregate",
    "dp_noisy_mean",
    "dpsgd",
    "per_example_global_norm_clip",
]

PyTree = Any


def _base_key(seed: int | torch.Tensor) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype.is_floating_point or seed.dtype == torch.bool:
            raise ValueError(
                f"seed must be an int or a 0-d integer tensor key, got {seed.dtype} {tuple(seed.shape)}"
            )
        seed = seed.detach().to(torch.int64)
        # A 64-bit key (e.g. ``ft.random_key``) keeps its high half: folded in, not dropped, so
        # keys that differ only there give different noise. ``mix32(0) == 0``: a saved 32-bit
        # ``rng_key`` maps to itself and resumes its stream.
        return (seed & _prng.MASK32) ^ _prng.mix32((seed >> 32) & _prng.MASK32)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a 0-d integer tensor key, got {seed!r}")
    return _prng.make_key(seed)


def _check_number(name: str, value: Any, *, minimum: float, finite: bool = True) -> None:
    """A Python-number hyperparameter checked at the call (tensors pass unread: no sync).

    ``finite=False`` lets ``inf`` through (``l2_norm_clip=inf`` of the clipping functions: no
    clipping, as in optax). Bools are refused (``True`` would silently mean 1).
    """
    if finite or not (isinstance(value, float) and value == math.inf):
        _utils.check_finite_number(name, value, minimum=minimum)


def _clip_factors(leaves: list[torch.Tensor], l2_norm_clip: float | torch.Tensor) -> torch.Tensor:
    """Per-example ``min(1, C/‖gᵢ‖)`` (0/0 → 1), as optax; no epsilon (Opacus: ``‖g‖ + 1e-6``)."""
    return _factors_of(global_row_norms(leaf_row_norms(leaves)), l2_norm_clip)


def _factors_of(norms: torch.Tensor, l2_norm_clip: float | torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(torch.clamp(l2_norm_clip / norms, max=1.0), nan=1.0)


def _weighted_sum(leaves: list[torch.Tensor], weights: torch.Tensor) -> list[torch.Tensor]:
    return [(weights.to(x.dtype) @ row_matrix(x)).reshape(x.shape[1:]) for x in leaves]


def per_example_global_norm_clip(
    grads: PyTree, l2_norm_clip: float | torch.Tensor
) -> tuple[PyTree, torch.Tensor]:
    """Clips each example's gradient to global norm ``l2_norm_clip`` and sums: optax's function.

    ``Σᵢ gᵢ · min(1, C/‖gᵢ‖)`` over the leading dimension of every leaf.

    ``l2_norm_clip`` is checked as in :func:`clipped_grad_sum`.

    Returns:
        ``(clipped_sum, num_clipped)``; ``num_clipped`` counts examples whose norm exceeded
        ``C``.

    Example:
        >>> import torch, functrain as ft
        >>> g = [torch.tensor([[0.0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
        >>> ft.per_example_global_norm_clip(g, 1.25)
        ([tensor([1.7500, 1.7500, 1.7500])], tensor(3))
    """
    _check_number("l2_norm_clip", l2_norm_clip, minimum=0.0, finite=False)
    leaves, spec = tree.flatten(grads)
    if not leaves or any(x.dim() == 0 or x.shape[0] != leaves[0].shape[0] for x in leaves):
        why = ""
        try:
            batch_size_of(grads, "grads")
        except ValueError as err:  # names the first leaf at fault
            why = f": {err}"
        raise ValueError(
            "per_example_global_norm_clip expects every leaf of grads to have the same "
            f"leading batch dimension (per-example gradients){why}"
        )
    factors = _clip_factors(leaves, l2_norm_clip)
    return tree.unflatten(spec, _weighted_sum(leaves, factors)), (factors < 1).sum()


class ClippedGradSum(NamedTuple):
    """Result of :func:`clipped_grad_sum`.

    Attributes:
        grad_sum: ``Σᵢ clip(gᵢ, C)``, a pytree like ``params``.
        num_clipped: number of examples whose gradient norm exceeded ``C`` (int64 tensor).
        loss_sum: ``Σᵢ lossᵢ`` (divide by the batch size for the mean loss).
        count: number of examples (a Python int).

    Example:
        >>> import torch, functrain as ft
        >>> out = ft.clipped_grad_sum(lambda p, x: (x @ p).mean(), torch.zeros(2), torch.eye(2), 0.5)
        >>> out.grad_sum, out.num_clipped, out.count
        (tensor([0.5000, 0.5000]), tensor(2), 2)
    """

    grad_sum: PyTree
    num_clipped: torch.Tensor
    loss_sum: torch.Tensor
    count: int


def clipped_grad_sum(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    l2_norm_clip: float | torch.Tensor,
    *,
    chunk_size: int | None = None,
    buffers: PyTree | None = None,
    randomness: str = "error",
    method: str = "auto",
) -> ClippedGradSum:
    """The sum of per-sample gradients each clipped to norm ``l2_norm_clip``, chunk by chunk.

    This is the DP-SGD gradient before noise and normalization. It never holds more than
    ``chunk_size`` per-sample gradients. For micro-batch accumulation, add the ``grad_sum`` of
    each micro-batch (``ft.tree.add``) and apply :func:`dp_noisy_mean` once per step.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar mean loss``, as in :func:`per_sample_grads`.
        params: pytree of floating-point tensors to differentiate.
        batch: pytree of tensors sharing a leading batch dimension.
        l2_norm_clip: ``C``, the per-example norm bound: ``>= 0`` (``inf``: no clipping). A
            negative or NaN Python number raises ``ValueError`` (a negative ``C`` would flip
            the gradients, a NaN one turn clipping off); a tensor is used unchecked.
        chunk_size: examples per ``vmap`` call; at most this many per-sample gradients are
            held at once (``None``: the whole batch in one call, the fastest).
        buffers: non-differentiated state shared by all examples, passed as ``buffers=``.
        randomness: ``torch.func.vmap`` randomness mode: ``"error"``, ``"different"``,
            ``"same"``.
        method: ``"vmap"`` forms per-sample gradients with ``vmap(grad)``, clips and sums
            them. ``"layers"`` never forms them ("ghost clipping", Li et al. 2021): when every
            parameter is the weight or bias of a linear, convolution (``groups=1``),
            layer-norm or embedding call, one backward pass gives each example's gradient
            norm layer by layer and a second, ordinary one the weighted sum
            ``∇ Σᵢ factorᵢ·lossᵢ``; it raises ``ValueError`` naming the parameter otherwise.
            ``"auto"`` (default): ``"layers"`` when it applies and a chunk's per-sample
            gradients would take 64 MiB or more, else ``"vmap"``. Ghost clipping costs a
            second backward pass but never writes ``chunk × parameters`` numbers, so it wins
            when those are many (a 0.67M-parameter MLP at batch 64, on CPU: about 4× a plain
            gradient against 31× for ``"vmap"``) and loses on small models (a 26k-parameter
            CNN: 2.3–2.6× against 1.9–2.1×).

    Returns:
        A :class:`ClippedGradSum`: ``grad_sum`` (pytree like ``params``), ``num_clipped``,
        ``loss_sum`` and ``count``.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.zeros(2)}
        >>> batch = {"x": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
        >>> loss_fn = lambda p, b: -(b["x"] @ p["w"]).mean()
        >>> out = ft.clipped_grad_sum(loss_fn, params, batch, 1.0, chunk_size=1)
        >>> out.grad_sum["w"], out.num_clipped
        (tensor([-0.9000, -1.2000]), tensor(1))
    """
    _check_options(chunk_size, randomness, loss_fn, params, method, REDUCTION_METHODS)
    _check_number("l2_norm_clip", l2_norm_clip, minimum=0.0, finite=False)
    done = reduce_by_layers(
        method,
        params,
        batch,
        chunk_size,
        lambda: _clipped_sum_by_layers(
            loss_fn, params, batch, l2_norm_clip, chunk_size, buffers, randomness
        ),
    )
    if done is not None:
        return done
    acc: list[torch.Tensor] | None = None
    spec = None
    num_clipped = None
    loss_sum = None
    count = 0
    for c in per_sample_chunks(
        loss_fn, params, batch, chunk_size=chunk_size, buffers=buffers, randomness=randomness
    ):
        leaves, spec = tree.flatten(c.grads)
        if leaves:
            factors = _clip_factors(leaves, l2_norm_clip)
        else:  # no parameters: every gradient is zero, nothing is clipped
            factors = torch.ones(c.stop - c.start, device=c.losses.device)
        part = _weighted_sum(leaves, factors)
        clipped = (factors < 1).sum()
        if acc is None:
            acc, num_clipped, loss_sum = part, clipped, c.losses.sum()
        else:
            if acc:  # else there are no parameters
                torch._foreach_add_(acc, part)
            num_clipped = num_clipped + clipped
            loss_sum = loss_sum + c.losses.sum()
        count += c.stop - c.start
    return ClippedGradSum(tree.unflatten(spec, acc), num_clipped, loss_sum, count)


def _clipped_sum_by_layers(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    l2_norm_clip: float | torch.Tensor,
    chunk_size: int | None,
    buffers: PyTree | None,
    randomness: str,
) -> ClippedGradSum:
    """``method="layers"``: ghost norms, then one weighted backward pass per chunk."""
    setup = layer_chunks(loss_fn, params, batch, chunk_size, buffers)

    def factors_of(squared_norms: list[torch.Tensor], rows: int) -> torch.Tensor:
        if not squared_norms:  # no parameters: every gradient is zero
            return torch.ones(rows)
        return _factors_of(torch.stack(squared_norms).sum(0).sqrt(), l2_norm_clip)

    acc: list[torch.Tensor] = []
    num_clipped = loss_sum = None
    for start, stop, chunk in setup.chunks:
        losses, factors, part = clipped_sum_by_layers(
            setup.example_loss,
            setup.param_leaves,
            chunk,
            randomness,
            lambda sq, rows=stop - start: factors_of(sq, rows),
        )
        if num_clipped is None or loss_sum is None:
            acc, num_clipped, loss_sum = part, (factors < 1).sum(), losses.sum()
        else:
            if acc:  # else there are no parameters
                torch._foreach_add_(acc, part)
            num_clipped = num_clipped + (factors < 1).sum()
            loss_sum = loss_sum + losses.sum()
    assert num_clipped is not None and loss_sum is not None  # at least one chunk
    return ClippedGradSum(
        tree.unflatten(setup.param_spec, acc), num_clipped, loss_sum, batch_size_of(batch)
    )


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


def _standard_normal(key: torch.Tensor, like: torch.Tensor, stream: int) -> torch.Tensor:
    """``N(0, 1)`` noise shaped like ``like`` (float32, float64 for float64 leaves).

    Unlike :func:`functrain.optim._prng.normal_like`, which folds ``stream`` into a 32-bit key,
    the leaf index is a separate hash input: a step's sample key and a leaf index never share
    a 32-bit value with another (step, leaf), so two draws of the same run never repeat (with
    one folded key, ``T`` steps of ``L`` leaves repeat a leaf's noise about ``(TL)²/2³³``
    times, which lets differences of released iterates cancel the noise). Complex leaves get
    independent noise in the real and imaginary parts.
    """
    if like.is_complex():
        real = torch.view_as_real(like)
        z = _standard_normal(key, real, stream)
        return torch.view_as_complex(z.contiguous())
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    n = like.numel()
    key = key.to(like.device) & _prng.MASK32
    word = _prng.mix32((stream + _STREAM_SALT) & _prng.MASK32)
    index = torch.arange(n, dtype=torch.int64, device=like.device) * 2
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
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(x + noise_std · ξ) / denominator`` per leaf, ``ξ`` from ``key``; and the next key.

    Computed in float32 (float64, complex64/128 for such leaves) and rounded once at the end:
    a float16 sum plus noise may overflow where the mean does not, and ``noise_std`` may
    exceed float16's range.
    """
    next_key, sample_key = _prng.split(key)
    out = []
    for i, x in enumerate(leaves):
        z = _standard_normal(sample_key, x, i)
        wide = x.to(z.dtype) if x.dtype != z.dtype else x
        out.append(((wide + noise_std * z) / denominator).to(x.dtype))
    return out, next_key


def differentially_private_aggregate(
    l2_norm_clip: float | torch.Tensor,
    noise_multiplier: float | torch.Tensor,
    seed: int | torch.Tensor,
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
        seed: an int seed, or a 0-d integer tensor used as the key (e.g. a saved state's).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.differentially_private_aggregate(1.0, 0.0, seed=0)
        >>> per_example = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
        >>> tx.update(per_example, tx.init(None))[0]["w"]
        tensor([0.4500, 0.6000])
    """
    _check_number("l2_norm_clip", l2_norm_clip, minimum=0.0)
    _check_number("noise_multiplier", noise_multiplier, minimum=0.0)
    key = _base_key(seed)

    def init_fn(params: Any) -> DifferentiallyPrivateAggregateState:
        return DifferentiallyPrivateAggregateState(rng_key=key.to(_utils.default_device(params)))

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

    return GradientTransformation(init_fn, update_fn)


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
        return DifferentiallyPrivateAggregateState(rng_key=key.to(_utils.default_device(params)))

    def update_fn(
        updates: Any, state: DifferentiallyPrivateAggregateState, params: Any = None, **extra: Any
    ) -> tuple[Any, DifferentiallyPrivateAggregateState]:
        del params, extra
        leaves, spec = tree.flatten(updates)
        if not leaves:
            return updates, state
        noise_std = l2_norm_clip * noise_multiplier
        out, next_key = _noisy(leaves, state.rng_key, noise_std, expected_batch_size)
        return tree.unflatten(spec, out), DifferentiallyPrivateAggregateState(next_key)

    return GradientTransformation(init_fn, update_fn)


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
