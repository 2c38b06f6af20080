"""Wrappers: transforms that route, mask or guard other transforms (optax's wrappers).

A masked-out part of a pytree travels through the inner transform as ``None`` (an empty subtree),
so the inner transform neither sees those leaves nor keeps state for them. A tree masked out as a
whole travels as ``()`` instead (optax's ``MaskedNode``), so that it still counts as given params.
Under ``torch.func.vmap`` (an ensemble: ``vmap(tx.init)``, ``vmap(tx.update)``), whose pytrees
refuse ``None`` leaves, the states hold ``_masking.MaskedNode()`` where eager states hold
``None``; eager states are unchanged, and ``update`` takes either.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _utils, fused, slow_weights
from functrain.optim._masking import (
    Mask,
    MaskedNode,
    apply_mask,
    label_masks,
    make_mask,
    masked_update,
    vmappable,
)
from functrain.optim.base import (
    GradientTransformation,
    _accepts_extra,
    _call_update,
    _check_transform,
    set_to_zero,
)
from functrain.optim.loss_scale import all_finite
from functrain.optim.param_map import is_params_placeholder

__all__ = [
    "ApplyIfFiniteState",
    "MaskedNode",
    "MaskedState",
    "MultiTransformState",
    "PartitionState",
    "ZeroNansState",
    "apply_if_finite",
    "freeze",
    "masked",
    "multi_transform",
    "partition",
    "selective_transform",
    "zero_nans",
]


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner transform's state (over the unmasked leaves only)."""

    inner_state: Any


def masked(
    inner: GradientTransformation,
    mask: Any | Callable[[Any], Any],
    *,
    mask_compatible_extra_args: bool = False,
) -> GradientTransformation:
    """Applies ``inner`` only where ``mask`` is ``True``; other updates pass through unchanged.

    ``mask`` is a pytree of booleans with the structure of the params (or a prefix of it: a
    boolean covers a whole subtree), or a callable ``params -> mask`` (called on the params in
    ``init`` and on the updates in ``update``; ``torch.compile`` traces it, so build it from
    ``ft.tree.map`` or plain Python on shapes and dtypes). The inner transform sees ``None``
    for masked-out leaves, so its state only covers the unmasked ones. A typical use is weight
    decay on matrices only:
    ``masked(add_decayed_weights(1e-4), lambda p: tree.map(lambda x: x.ndim > 1, p))``.

    PyTorch: like giving parameter groups different options in ``torch.optim``; here the rest
    of the chain still sees the masked-out updates.

    Args:
        inner: the transform to apply to the unmasked leaves.
        mask: static booleans (``True``: transform), or a callable returning them. The mask
            must not depend on tensor values.
        mask_compatible_extra_args: also mask keyword arguments of ``update`` whose structure
            equals the updates'.

    Raises:
        TreeMismatchError: (at ``init``/``update``) if the mask is not a prefix of the params or
            updates; the message names the path.
        TypeError: if a mask leaf is not a boolean.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.masked(ft.scale(-0.1), {"w": True, "b": False})
        >>> params = {"w": torch.ones(2), "b": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(2), "b": torch.ones(1)}, tx.init(params))
        >>> u
        {'w': tensor([-0.1000, -0.1000]), 'b': tensor([1.])}
    """
    inner = _check_transform(inner, "masked inner")
    passes_extra = _accepts_extra(inner.update)
    if not callable(mask):
        make_mask(mask)  # fail early on bad leaves

    def get_mask(tree_: Any) -> Mask:
        # Rebuilt at each call (cheap): torch.compile cannot use a treespec made outside it.
        return make_mask(mask(tree_) if callable(mask) else mask)

    def init_fn(params: Any) -> MaskedState:
        if is_params_placeholder(params):
            # tree_map_params: the placeholder stands for any params tree, so it has no mask
            # to apply; the inner state over it marks the params-shaped parts (as in optax).
            return MaskedState(inner_state=inner.init(params))
        mask_ = get_mask(params)
        inner_state = inner.init(_masked_params(mask_, params))
        # A lookahead inside would leave the masked-out leaves' fast and slow weights apart.
        out = next((p for p, flag in mask_.flags.items() if not flag), None)
        slow_weights._refuse_masked(
            inner_state, None if out is None else tree.path_str(out, "params")
        )
        return MaskedState(inner_state=vmappable(inner_state))

    def update_fn(
        updates: Any, state: MaskedState, params: Any = None, **extra: Any
    ) -> tuple[Any, MaskedState]:
        if not isinstance(state, MaskedState):
            raise TypeError(f"masked expects a MaskedState, got {type(state).__name__}")
        new_updates, inner_state = masked_update(
            inner,
            passes_extra,
            get_mask(updates),
            mask_compatible_extra_args,
            updates,
            state.inner_state,
            params,
            extra,
        )
        return new_updates, MaskedState(inner_state=inner_state)

    return fused.register(GradientTransformation(init_fn, update_fn), fused.Masked(inner, mask))


class PartitionState(NamedTuple):
    """State of :func:`partition`: ``{label: MaskedState}`` for each transform."""

    inner_states: dict[Hashable, Any]


MultiTransformState = PartitionState


def partition(
    transforms: Mapping[Hashable, GradientTransformation],
    param_labels: Any | Callable[[Any], Any],
    *,
    mask_compatible_extra_args: bool = False,
) -> GradientTransformation:
    """Applies a different transform to each group of parameters (optax's ``multi_transform``).

    ``param_labels`` gives each leaf (or subtree: it may be a prefix of the params) a label, a
    key of ``transforms``; each transform then runs, as with :func:`masked`, on its own leaves
    only and keeps state only for them. A label with no transform is an error naming the path;
    a transform whose label is not used is allowed (its state is empty), as in optax.

    PyTorch: the equivalent of optimizer parameter groups with different optimizers.

    Args:
        transforms: ``{label: transform}``.
        param_labels: a pytree of labels like the params (or a prefix), or a callable
            ``params -> labels`` (called on the updates in ``update``).
        mask_compatible_extra_args: see :func:`masked`.

    Raises:
        ValueError: a label has no transform (the message names the path and the label).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.partition(
        ...     {"fast": ft.scale(-1.0), "slow": ft.scale(-0.01)}, {"w": "fast", "b": "slow"})
        >>> params = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> u, state = tx.update({"w": torch.ones(1), "b": torch.ones(1)}, tx.init(params))
        >>> u
        {'w': tensor([-1.]), 'b': tensor([-0.0100])}
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError("partition needs a non-empty mapping {label: transform}")
    txs = {k: _check_transform(v, f"partition transforms[{k!r}]") for k, v in transforms.items()}
    extras = {k: _accepts_extra(v.update) for k, v in txs.items()}
    if not callable(param_labels):
        label_masks(param_labels, txs)  # fail early on unknown labels

    def get_masks(tree_: Any) -> dict[Hashable, Mask]:
        labels = param_labels(tree_) if callable(param_labels) else param_labels
        return label_masks(labels, txs)

    def init_fn(params: Any) -> PartitionState:
        if is_params_placeholder(params):  # tree_map_params; see masked's init
            return PartitionState({g: MaskedState(tx.init(params)) for g, tx in txs.items()})
        masks = get_masks(params)
        parts = {g: _masked_params(masks[g], params) for g in txs}
        states = {g: tx.init(parts[g]) for g, tx in txs.items()}
        # A lookahead group beside one that moves only the fast weights (see slow_weights).
        zeroes = {g: isinstance(fused.spec_of(tx), fused.SetToZero) for g, tx in txs.items()}
        slow_weights._refuse_partitioned(states, parts, zeroes)
        return PartitionState({g: MaskedState(vmappable(st)) for g, st in states.items()})

    def update_fn(
        updates: Any, state: PartitionState, params: Any = None, **extra: Any
    ) -> tuple[Any, PartitionState]:
        inner_states = getattr(state, "inner_states", None)
        if not isinstance(inner_states, Mapping):
            raise TypeError(f"partition expects a PartitionState, got {type(state).__name__}")
        missing = [g for g in txs if g not in inner_states]
        if missing:
            raise ValueError(f"partition state has no entry for labels {missing}")
        masks = get_masks(updates)
        new_states = {}
        for g, tx in txs.items():
            updates, inner = masked_update(
                tx,
                extras[g],
                masks[g],
                mask_compatible_extra_args,
                updates,
                inner_states[g].inner_state,
                params,
                extra,
            )
            new_states[g] = MaskedState(inner)
        return updates, PartitionState(new_states)

    # Planned by the in-place engines: parameter groups on the fused kernels (``fused``).
    return fused.register(
        GradientTransformation(init_fn, update_fn), fused.Partition(txs, param_labels)
    )


multi_transform = partition


def _masked_params(mask: Mask, params: Any) -> Any:
    """``apply_mask`` on the params at ``init``, hinting at the fix for lookahead's params."""
    try:
        return apply_mask(mask, params, "params")
    except tree.TreeMismatchError as err:
        if isinstance(params, slow_weights.LookaheadParams):
            raise tree.TreeMismatchError(f"{err}{slow_weights._PAIR_HINT}") from err
        raise


def freeze(mask: bool | Any) -> GradientTransformation:
    """Zeroes the updates where ``mask`` is ``True`` (freezes those parameters).

    ``masked(set_to_zero(), mask)``, as in optax: frozen leaves get zero updates, the others
    pass through unchanged. ``mask`` is a single boolean or a pytree (prefix) of booleans.

    PyTorch: like ``p.requires_grad_(False)``, but without changing the model; frozen
    parameters still receive gradients, which are discarded here. It zeroes what reaches it, so
    a transform after it that adds to the updates (``add_decayed_weights``, the decay inside
    ``adamw``) still moves frozen parameters: put ``freeze`` last in such a chain, or use
    :func:`selective_transform`.

    Args:
        mask: ``True`` for the leaves (or subtrees) to freeze.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.chain(ft.freeze({"w": True, "b": False}), ft.sgd(0.1))
        >>> params = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1), "b": torch.ones(1)}, tx.init(params), params)
        >>> u
        {'w': tensor([-0.]), 'b': tensor([-0.1000])}
    """
    return masked(set_to_zero(), mask)


def selective_transform(
    optimizer: GradientTransformation, *, freeze_mask: bool | Any
) -> GradientTransformation:
    """Runs ``optimizer`` on the leaves where ``freeze_mask`` is ``False`` and zeroes the rest.

    Unlike ``chain(freeze(mask), optimizer)``, the optimizer keeps no state for frozen leaves.
    As with :func:`freeze`, the mask may also be a callable ``params -> mask`` (optax takes
    only a static tree there).

    Args:
        optimizer: the transform for the trainable leaves.
        freeze_mask: a boolean or a pytree (prefix) of booleans, ``True`` freezes; or a
            callable returning one.

    Raises:
        TypeError: a mask leaf is not a boolean (the message names its path).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.selective_transform(ft.sgd(0.1), freeze_mask={"w": True, "b": False})
        >>> params = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1), "b": torch.ones(1)}, tx.init(params), params)
        >>> u
        {'w': tensor([0.]), 'b': tensor([-0.1000])}
    """

    def labels_of(mask_tree: Any) -> Any:
        make_mask(mask_tree, "freeze_mask")  # only booleans: 0/1 or strings would pass as truthy
        return tree.map(lambda m: "freeze" if m else "train", mask_tree)

    # A callable is a leaf to tree.map, and a truthy one: it froze every parameter.
    labels = (
        (lambda params: labels_of(freeze_mask(params)))
        if callable(freeze_mask)
        else labels_of(freeze_mask)
    )
    return partition({"train": optimizer, "freeze": set_to_zero()}, labels)


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    Attributes:
        notfinite_count: consecutive updates with a NaN or inf (int32; reset by a finite one).
        last_finite: whether the last update was finite (bool).
        total_notfinite: all updates with a NaN or inf so far (int32; never reset).
        inner_state: the inner transform's state.
    """

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: Any


def _select(condition: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``condition`` else ``old``, leaf-wise, in ``old``'s dtype."""

    def pick(n: Any, o: Any) -> Any:
        if isinstance(n, torch.Tensor) and isinstance(o, torch.Tensor):
            return torch.where(condition, n.to(o.dtype), o)
        return n

    return tree.map(pick, new, old)


def _stand_in(apply: torch.Tensor, updates: Any) -> Any:
    """``updates`` where the step is applied, ones where it is skipped.

    Derivatives only: the inner results of a skipped step are discarded by a ``torch.where``,
    whose backward sends them a zero cotangent, but that zero times the inf or NaN derivatives
    of an update computed from non-finite gradients is NaN (optax's ``lax.cond`` differentiates
    the branch taken only). Ones, not zeros: a zero stand-in would put ``sqrt(0)``, ``x/‖x‖``
    and the like, whose derivatives are infinite, in the discarded branch. The outer
    ``torch.where`` gives the non-finite gradients themselves a zero derivative, as optax.
    """

    def pick(u: Any) -> Any:
        if isinstance(u, torch.Tensor) and (u.is_floating_point() or u.is_complex()):
            return torch.where(apply.to(u.device), u, torch.ones_like(u))
        return u

    return tree.map(pick, updates)


def _tracked(*trees: Any) -> bool:
    """Whether anything among ``trees``' leaves may be differentiated (``may_write`` false);
    the leaves are only listed where that depends on them (grad mode on, no ``torch.func``)."""
    if not _foreach.may_write():  # a torch.func grad/jvp is active
        return True
    if not torch.is_grad_enabled():
        return False
    return not _foreach.may_write(*(tree.leaves(t) for t in trees))


def _any_requires_grad(trees: Any) -> bool:
    """Whether autograd records any tensor leaf of ``trees`` (grad mode on and requires_grad)."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in tree.leaves(trees))


def apply_if_finite(
    inner: GradientTransformation, max_consecutive_errors: int
) -> GradientTransformation:
    """Skips updates that contain a NaN or inf, unless too many came in a row.

    If every update leaf is finite, ``inner`` is applied. Otherwise the output is zeros and the
    inner state is kept bit-for-bit, until ``max_consecutive_errors`` consecutive non-finite
    updates have been skipped: the next one is then applied anyway (as in optax). Counters are
    kept in :class:`ApplyIfFiniteState`.

    Without host syncs there is no branch: ``inner`` is evaluated at every step and
    ``torch.where`` keeps its results or the old ones (optax's ``lax.cond`` does the same under
    ``vmap``). PyTorch's ``GradScaler`` skips steps in a similar way. When the update is
    differentiated (``torch.func.grad``, autograd tracking an input or a hyperparameter), a
    skipped step feeds ``inner`` a finite stand-in instead of the non-finite updates, so that
    derivatives stay finite, as through optax's ``lax.cond``; the values are the same.

    Args:
        inner: the transform to guard.
        max_consecutive_errors: how many consecutive non-finite updates to skip.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.apply_if_finite(ft.sgd(0.1), max_consecutive_errors=2)
        >>> params = [torch.ones(2)]
        >>> u, state = tx.update([torch.tensor([1.0, float("nan")])], tx.init(params))
        >>> u, int(state.notfinite_count)
        ([tensor([0., 0.])], 1)
    """
    inner = _check_transform(inner, "apply_if_finite inner")
    if isinstance(max_consecutive_errors, bool) or not isinstance(
        max_consecutive_errors, numbers.Integral
    ):
        raise TypeError(f"max_consecutive_errors must be an int, got {max_consecutive_errors!r}")
    max_consecutive_errors = int(max_consecutive_errors)  # a NumPy integer counts too, as in optax
    if max_consecutive_errors < 0:
        raise ValueError(f"max_consecutive_errors must be >= 0, got {max_consecutive_errors}")
    # The int32 counter saturates at its maximum, so a larger limit means "never"; compared
    # as given, torch would wrap it (2**31 to -2**31) and apply every non-finite update.
    max_consecutive_errors = min(max_consecutive_errors, _utils.INT32_MAX)
    passes_extra = _accepts_extra(inner.update)

    def init_fn(params: Any) -> ApplyIfFiniteState:
        device = _utils.default_device(params)
        return ApplyIfFiniteState(
            notfinite_count=_utils.zero_count(params),
            last_finite=torch.ones((), dtype=torch.bool, device=device),
            total_notfinite=_utils.zero_count(params),
            inner_state=inner.init(params),
        )

    def update_fn(
        updates: Any, state: ApplyIfFiniteState, params: Any = None, **extra: Any
    ) -> tuple[Any, ApplyIfFiniteState]:
        isfinite = all_finite(updates).to(state.notfinite_count.device)
        notfinite_count = torch.where(
            isfinite,
            torch.zeros_like(state.notfinite_count),
            _utils.safe_increment(state.notfinite_count),
        )
        apply = isfinite | (notfinite_count > max_consecutive_errors)

        def run(inner_updates: Any) -> tuple[Any, Any]:
            return _call_update(
                inner, passes_extra, inner_updates, state.inner_state, params, extra
            )

        tracked = _tracked(updates, state.inner_state, params, extra)
        new_updates, new_inner = run(_stand_in(apply, updates) if tracked else updates)
        if not tracked and _any_requires_grad((new_updates, new_inner)):
            # Autograd tracks a tensor in the inner transform's closure (a hyperparameter),
            # out of may_write's sight: take the tracked path (a rare second call).
            new_updates, new_inner = run(_stand_in(apply, updates))
        out = tree.map(lambda u: torch.where(apply, u, torch.zeros_like(u)), new_updates)
        return out, ApplyIfFiniteState(
            notfinite_count=notfinite_count,
            last_finite=isfinite,
            total_notfinite=torch.where(
                isfinite, state.total_notfinite, _utils.safe_increment(state.total_notfinite)
            ),
            inner_state=_select(apply, new_inner, state.inner_state),
        )

    return fused.register(
        GradientTransformation(init_fn, update_fn),
        fused.ApplyIfFinite(inner, max_consecutive_errors),
    )


class ZeroNansState(NamedTuple):
    """State of :func:`zero_nans`: per leaf, a 0-d bool, whether the last update had a NaN."""

    found_nan: Any


def zero_nans() -> GradientTransformation:
    """Replaces NaNs in the updates with zeros and records, per leaf, whether there were any.

    Infinities are left as they are (unlike ``torch.nan_to_num``). The state,
    :class:`ZeroNansState`, is not used by the transform; it lets you see where NaNs occurred.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.zero_nans()
        >>> params = {"w": torch.zeros(2)}
        >>> u, state = tx.update({"w": torch.tensor([float("nan"), 1.0])}, tx.init(params))
        >>> u["w"], state.found_nan["w"]
        (tensor([0., 1.]), tensor(True))
    """

    def init_fn(params: Any) -> ZeroNansState:
        return ZeroNansState(
            found_nan=tree.map(lambda p: torch.zeros((), dtype=torch.bool, device=p.device), params)
        )

    def update_fn(
        updates: Any, state: ZeroNansState, params: Any = None, **extra: Any
    ) -> tuple[Any, ZeroNansState]:
        del params, extra
        # The flags are per leaf: updates of another structure would silently change the
        # state's (a checkpoint or a compiled step made for it would no longer fit).
        names = ("updates", "state.found_nan")
        tree.flatten_up_to(tree.structure(updates), state.found_nan, names, updates)
        found_nan = tree.map(lambda u: torch.isnan(u).any(), updates)
        out = tree.map(lambda u: torch.where(torch.isnan(u), torch.zeros_like(u), u), updates)
        return out, ZeroNansState(found_nan=found_nan)

    return fused.register(GradientTransformation(init_fn, update_fn), fused.ZeroNans())
