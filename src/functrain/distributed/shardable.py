"""Which optimizers give the same numbers on a sharded (ZeRO-1) optimizer state.

With ``shard_optimizer=True`` every rank runs the optimizer on its *piece* of each parameter
(a block of rows; see :mod:`functrain.distributed.zero`). That is exact for transforms that
treat every element on its own (Adam, SGD with momentum, weight decay, …), and wrong for those
that need information about a whole parameter or the whole gradient. :func:`check_shardable`
looks inside a transform (``chain``, ``masked``, ``partition``, ``inject_hyperparams``,
``MultiSteps`` …) and raises :class:`~functrain.distributed.ShardingError` naming every
transform that would give different numbers, instead of training silently differently.

**Supported (exact):** ``sgd`` (momentum, nesterov), ``adam``, ``adamw``, ``nadam``,
``nadamw``, ``radam``, ``amsgrad``, ``adamax``, ``rmsprop``, ``adagrad``, ``lion``,
``sign_sgd``, ``schedule_free_adamw``, ``schedule_free_sgd`` (and ``schedule_free`` around a
supported optimizer), ``reduce_on_plateau`` (it reads the global mean loss) and their building
blocks ``scale``, ``scale_by_learning_rate``,
``scale_by_schedule``, ``scale_by_sign``, ``scale_by_adam``, ``scale_by_amsgrad``,
``scale_by_adamax``, ``scale_by_radam``, ``scale_by_lion``, ``scale_by_rms``,
``scale_by_rss``, ``scale_by_stddev``, ``trace``, ``ema``, ``add_decayed_weights``, ``clip``,
``identity``, ``set_to_zero``; the wrappers ``chain``, ``named_chain``, ``masked``,
``partition``/``multi_transform``, ``freeze``, ``selective_transform``,
``inject_hyperparams`` and ``MultiSteps`` (without ``should_skip_update_fn``) around them.
Masks and labels given as functions of the parameters see each rank's pieces: those pieces
keep the number of dimensions and all but one size of the parameter (a 0-d parameter is
replicated, not cut), so masks such as ``p.ndim > 1`` work; functions of exact shapes or
element counts may not: the step evaluates every such function on every rank's pieces (on
shapes only, at its first call: :func:`check_masks_agree`) and raises
:class:`~functrain.distributed.ShardingError` where a piece would get another mask or label
than its parameter.

**Supported through the step:** ``clip_by_global_norm`` as the *first* transform of the chain
(as in ``chain(clip_by_global_norm(1.0), adamw(...))``): the step computes the global gradient
norm with one extra all-reduce of a scalar and clips before the optimizer, after which the
in-chain clip leaves the (already clipped) pieces unchanged.

**Supported through the step (noise):** ``add_noise`` (``noisy_sgd``) and ``dp_noisy_mean``
(with ``per_example_clip``, DP-SGD). Their noise is drawn by each element's position in its
parameter; the step passes their ``update`` the positions of this rank's pieces
(``shard_index``), so every piece gets exactly its slice of the whole parameter's noise and the
sharded step adds the very noise of the unsharded one. They must see the whole update tree:
not inside ``masked``, ``partition``, ``freeze`` or ``selective_transform``.

**Not supported (raise):** ``clip_by_global_norm`` anywhere else; ``scale_by_trust_ratio``
(``lamb``, ``lars``: per-parameter norms); ``clip_by_block_rms``,
``scale_by_param_block_norm``/``_rms``, ``adaptive_grad_clip`` (per-parameter or per-unit
norms); ``scale_by_factored_rms`` (``adafactor``: row and column statistics);
``differentially_private_aggregate`` (``dpsgd``: per-example gradients); ``add_noise`` or
``dp_noisy_mean`` inside the wrappers above; ``apply_if_finite`` (one decision for the whole
gradient); ``zero_nans`` (per-parameter flags in its state);
``MultiSteps(should_skip_update_fn=...)``. Use them with ``shard_optimizer=False``.

**Your own transforms** are refused unless you declare them elementwise with
:func:`elementwise` (your own noise transforms stay refused: they are not told where the
pieces sit).

The walk through a transform's structure lives in :mod:`functrain.distributed._shardable_walk`
(with ``mask_functions``) and the check of masks on pieces in
:mod:`functrain.distributed._mask_agree` (``check_masks_agree``); both are re-exported here.

Example:
    >>> import functrain as ft
    >>> from functrain import distributed as dist
    >>> dist.check_shardable(ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-3))).leading_clip
    1.0
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.distributed._mask_agree import check_masks_agree as check_masks_agree
from functrain.distributed._shardable_walk import _MARK, _NOISE, _Walk
from functrain.distributed._shardable_walk import mask_functions as mask_functions
from functrain.distributed.errors import ShardingError
from functrain.optim.base import GradientTransformation, _accepts_extra

__all__ = ["ShardingReport", "check_shardable", "elementwise"]


class ShardingReport(NamedTuple):
    """What :func:`check_shardable` found.

    Attributes:
        leading_clip: ``max_norm`` of a ``clip_by_global_norm`` that is the first transform
            (the step then clips with the global norm), else ``None``.
        transforms: the names of the transforms found, in the order visited.

    Example:
        >>> import functrain as ft
        >>> from functrain import distributed as dist
        >>> dist.check_shardable(ft.sgd(0.1)).leading_clip is None
        True
    """

    leading_clip: float | torch.Tensor | None
    transforms: tuple[str, ...]


def elementwise(tx: GradientTransformation) -> GradientTransformation:
    """Declares a custom transform elementwise, so a sharded optimizer state accepts it.

    "Elementwise" means: each output element depends only on the same element of the updates,
    the parameters and the state (scalars such as step counts aside), and ``init`` gives state
    leaves that are either independent of the parameters or have each parameter's shape. Such
    a transform gives the same numbers on a parameter's piece as on the whole parameter.
    :func:`check_shardable` trusts the declaration and does not look inside.

    Args:
        tx: the transform to declare (anything with ``init`` and ``update``); not modified.

    Returns:
        A new ``GradientTransformation`` with ``tx.init`` and an ``update`` that calls
        ``tx.update`` unchanged, marked as elementwise.

    Raises:
        TypeError: ``tx`` lacks ``init`` or ``update``.
        ValueError: ``tx`` contains a noise transform (``add_noise``, ``dp_noisy_mean``,
            ``differentially_private_aggregate``), whose noise would differ on shards (use
            ``add_noise`` and ``dp_noisy_mean`` unwrapped: the step tells them their positions).

    Example:
        >>> import torch, functrain as ft
        >>> from functrain import distributed as dist
        >>> halve = dist.elementwise(ft.stateless(lambda u, p: ft.tree.scale(0.5, u)))
        >>> dist.check_shardable(halve).transforms
        ('elementwise',)
    """
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"expected a GradientTransformation, got {type(tx).__name__}")
    walk = _Walk()
    walk.visit(tx, "", head=False)
    noisy = sorted(set(walk.names) & _NOISE)
    if noisy:
        raise ValueError(
            f"elementwise(tx): tx contains {', '.join(noisy)}, whose noise is tied to positions "
            "inside each parameter; on shards it would not be the whole tree's noise (for DP, "
            "correlated noise weakens the guarantee). Use add_noise / dp_noisy_mean without "
            "elementwise() (the sharded step tells them where each piece sits), or "
            "shard_optimizer=False"
        )
    inner = tx.update
    passes_extra = _accepts_extra(inner)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        # Keywords reach an inner update that accepts them, as chain does (a sharded step's
        # shard_index, meant for its noise transforms, included).
        if passes_extra:
            return inner(updates, state, params, **extra)
        return inner(updates, state, params)

    setattr(update_fn, _MARK, True)
    return GradientTransformation(tx.init, update_fn)


def check_shardable(tx: GradientTransformation) -> ShardingReport:
    """Checks that ``tx`` gives the same numbers on a sharded optimizer state.

    See the module documentation for the exact list of supported transforms. The check reads
    the structure of ``tx`` (the transforms it was built from), not its numbers.

    Args:
        tx: the optimizer.

    Returns:
        A :class:`ShardingReport`.

    Raises:
        ShardingError: listing every transform that cannot run sharded, and why.

    Example:
        >>> import functrain as ft
        >>> from functrain import distributed as dist
        >>> dist.check_shardable(ft.adamw(1e-3)).transforms
        ('chain', 'scale_by_adam', 'add_decayed_weights', 'scale')
        >>> try:
        ...     dist.check_shardable(ft.lamb(1e-3))
        ... except dist.ShardingError as err:
        ...     print(str(err).splitlines()[1])
          chain/scale_by_trust_ratio: needs each parameter's whole norm (trust ratios of lamb / lars)
    """
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"tx must be a GradientTransformation, got {type(tx).__name__}")
    walk = _Walk()
    walk.visit(tx, "", head=True)
    if walk.problems:
        raise ShardingError(
            "this optimizer cannot run on a sharded optimizer state (shard_optimizer=True) "
            "with the same numbers:\n"
            + "\n".join(f"  {p}" for p in walk.problems)
            + "\nUse shard_optimizer=False (each rank keeps the whole optimizer state)."
        )
    return ShardingReport(walk.leading_clip, tuple(walk.names))
