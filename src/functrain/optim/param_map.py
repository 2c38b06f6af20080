"""Mapping a function over the params-shaped parts of an optimizer state (optax's
``tree_map_params``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree

from functrain import tree
from functrain.optim.base import GradientTransformation, OptState, Params

__all__ = ["tree_map_params"]


class _ParamsPlaceholder:
    """Stands for the whole params tree while an ``init`` runs: a pytree node with no children.

    A leaf-wise map over it (``zeros_like``, ``full_like``, ``where``, …) returns another
    placeholder, so every params-shaped subtree of the state it builds is a placeholder, and
    everything else (counts, hyperparameters) is an ordinary leaf.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "_ParamsPlaceholder()"


optree.register_pytree_node(
    _ParamsPlaceholder,
    lambda _: ((), None),
    lambda _meta, _children: _ParamsPlaceholder(),
    # ft.tree and the inits work on optree's global registry.
    namespace=getattr(optree.registry, "__GLOBAL_NAMESPACE"),
)


def is_params_placeholder(node: Any) -> bool:
    """Whether ``node`` is the placeholder :func:`tree_map_params` passes to an ``init``.

    Inits that cannot apply their configuration to it (a mask or labels tree fixed at
    construction) check for it and build their state over it unmasked, as optax's do.
    """
    return isinstance(node, _ParamsPlaceholder)


def _name(initable: Any) -> str:
    """A transform's name for messages: its init's qualified name (``adam.<locals>.init_fn``)."""
    init = getattr(initable, "init", initable)
    return getattr(init, "__qualname__", type(initable).__name__)


def _placeholder_state(initable: GradientTransformation | Callable[[Params], OptState]) -> OptState:
    """``initable``'s state for a placeholder params tree, or a clear error naming it."""
    init = getattr(initable, "init", initable)
    if not callable(init):
        raise TypeError(
            "tree_map_params: initable must be a GradientTransformation or an init function, "
            f"got {type(initable).__name__}"
        )
    name = _name(initable)
    try:
        return init(_ParamsPlaceholder())
    except (AttributeError, TypeError, ValueError, IndexError, RuntimeError) as err:
        # The init read a tensor attribute (shape, dtype, device) instead of mapping over the
        # params; its state has no placeholder to tell params-shaped parts apart.
        raise TypeError(
            f"tree_map_params cannot find the params-shaped parts of the state of {name}: "
            "it needs an init that maps over the params (as optax's inits do), but this one "
            f"inspects the tensors themselves ({type(err).__name__}: {err})"
        ) from err


def tree_map_params(
    initable: GradientTransformation | Callable[[Params], OptState],
    f: Callable[..., Any],
    state: OptState,
    /,
    *rest: Any,
    transform_non_params: Callable[[Any], Any] | None = None,
    is_leaf: Callable[[Any], bool] | None = None,
) -> OptState:
    """Applies ``f`` to every params-shaped subtree of an optimizer state (optax's).

    The params-shaped parts (Adam's ``mu`` and ``nu``, SGD's momentum trace, …) are found by
    calling ``initable``'s ``init`` on a placeholder that stands for the whole params tree: each
    subtree of the resulting state that is the placeholder is params-shaped in ``state``, and
    ``f`` is applied leaf-wise over it (with the matching leaves of ``rest``). Every other leaf
    (step counts, injected hyperparameters, ``None`` stays ``None``) goes through
    ``transform_non_params`` when given, and is returned as it is otherwise.

    Typical uses: casting or moving the moments (``lambda t: t.to(torch.float64)``), building
    sharding specs for the state from the params' specs, or rebuilding moments after a change
    of the params.

    "Params-shaped" follows optax's rule, by the tree structure ``init`` builds over the
    placeholder, not by leaf shapes: GaLore's projectors, SM3's per-axis accumulators and
    Adafactor's factored ``(1,)`` placeholders are params-shaped too (a cast works; per-leaf
    specs in ``rest`` may not fit them). Some 0-d state takes the params' dtype at init
    (``inject_hyperparams``' hyperparameters, schedule-free's weight sums): to move a whole
    state to float64, cast them with ``transform_non_params`` as well.

    Args:
        initable: the transform that made ``state`` (a ``GradientTransformation``), or its
            ``init`` function. Its ``init`` must map over the params (``ft.tree.zeros_like`` and
            the like); an init that reads a tensor's shape, dtype or device raises ``TypeError``.
        f: called on each leaf of each params-shaped subtree, with the matching leaves of
            ``rest``.
        state: the optimizer state to map over; not modified.
        *rest: trees with the params' structure, passed to ``f`` leaf by leaf.
        transform_non_params: called on every leaf of ``state`` outside the params-shaped parts.
        is_leaf: passed to the leaf-wise map over each params-shaped subtree (``optree``'s),
            e.g. to stop at masked-out entries.

    Returns:
        A new state of ``state``'s structure (unless ``f`` returns subtrees).

    Raises:
        TypeError: if ``initable``'s init cannot run on the placeholder (it inspects tensors).
        TreeMismatchError: if ``state`` is not a state of ``initable``, naming the path.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2)}
        >>> tx = ft.adam(0.1)
        >>> state = tx.init(params)
        >>> wide = ft.tree_map_params(tx, lambda t: t.to(torch.float64), state)
        >>> wide[0].mu["w"].dtype, wide[0].count.dtype
        (torch.float64, torch.int32)
        >>> zeroed = ft.tree_map_params(
        ...     tx, lambda t: t, state, transform_non_params=torch.zeros_like
        ... )
        >>> zeroed[0].count
        tensor(0, dtype=torch.int32)
    """
    with_placeholders = _placeholder_state(initable)
    paths, template_leaves, spec = optree.tree_flatten_with_path(
        with_placeholders, is_leaf=is_params_placeholder
    )
    try:
        state_parts = tree.flatten_up_to(spec, state, ("initable's state", "state"))
    except tree.TreeMismatchError as err:
        # Either ``state`` comes from another transform, or the init builds part of its state
        # from the leaves themselves (a list per leaf), which a placeholder has none of, or
        # ``state`` lost its NamedTuples in a checkpoint restored without a target.
        raise tree.TreeMismatchError(
            f"tree_map_params: state is not a state of {_name(initable)} as its init builds it "
            f"over placeholder params (it must map over the params; a checkpoint must be "
            f"restored with a target to keep the state's NamedTuples); {err}"
        ) from None
    out = []
    for path, template, value in zip(paths, template_leaves, state_parts):
        if is_params_placeholder(template):
            try:
                out.append(optree.tree_map(f, value, *rest, is_leaf=is_leaf))
            except ValueError as err:
                raise tree.TreeMismatchError(
                    f"tree_map_params: {tree.path_str(path, 'state')} does not have the "
                    f"structure of the trees in rest ({err}); a masked-out entry is None in "
                    "the state: is_leaf=lambda v: v is None passes it to f"
                ) from None
        elif transform_non_params is not None:
            out.append(transform_non_params(value))
        else:
            out.append(value)
    return optree.tree_unflatten(spec, out)
