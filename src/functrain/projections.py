"""Euclidean projections of pytrees onto convex sets, as ``optax.projections``.

Every function returns the point of the set closest to its input in the Euclidean norm of the
whole tree, seen as one vector (the leaves concatenated): ``argmin_p ‖x − p‖₂`` over the set.
Box-like sets (:func:`projection_non_negative`, :func:`projection_box`,
:func:`projection_hypercube`, :func:`projection_linf_ball`) act element by element; the others
couple every element of every leaf through a norm, an inner product or a sort.

They are pure (inputs are never mutated), read no values back to the host (the simplex's
threshold is found with a sort, a cumulative sum and a gather, all on the device), compile with
``torch.compile(fullgraph=True)`` and work under ``torch.func.vmap``, which projects each row of
a batch on its own. ``None`` subtrees (masked leaves) stay ``None``.

Differences from optax: ``projection_box`` and ``projection_hypercube`` accept a scalar bound
for a tree with several leaves (optax's ``tree.map`` only accepts that for a single array);
bounds are cast to each leaf's dtype, so the result keeps the input's dtypes; the sort-based
projections (simplex, l1) compute float16/bfloat16 leaves in float32 and round once; leaves
must be tensors (optax also takes Python numbers); the l2 projections divide by the largest
magnitude before squaring, so a norm beyond the dtype's squared range (e.g. float32's
``[1e20, 1e20]`` or ``[1e-30, 1e-30]``) projects correctly where optax gives 0 or inf.

Example:
    Projected gradient descent on the probability simplex: minimise ``‖w − t‖²`` with ``w ≥ 0``
    and ``sum(w) = 1``, projecting after each step.

    >>> import torch, functrain as ft
    >>> target = torch.tensor([0.9, 0.6, -0.3])
    >>> params = {"w": torch.full((3,), 1 / 3)}
    >>> tx = ft.sgd(0.1)
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...     grads = {"w": 2 * (params["w"] - target)}
    ...     updates, state = tx.update(grads, state, params)
    ...     params = ft.projections.projection_simplex(ft.apply_updates(params, updates))
    >>> params["w"]
    tensor([0.6500, 0.3500, 0.0000])
"""

from __future__ import annotations

from typing import Any

import torch

from functrain import tree as _tree
from functrain._precision import HALF

__all__ = [
    "projection_box",
    "projection_halfspace",
    "projection_hypercube",
    "projection_hyperplane",
    "projection_l1_ball",
    "projection_l1_sphere",
    "projection_l2_ball",
    "projection_l2_sphere",
    "projection_linf_ball",
    "projection_non_negative",
    "projection_simplex",
    "projection_vector",
]

Scalar = float | torch.Tensor


def _leaves(x: Any, name: str, *, floating: bool = False) -> tuple[list[torch.Tensor], Any]:
    """The tensor leaves of ``x`` and its treespec; a non-tensor leaf raises naming its path."""
    paths, leaves, spec = _tree.flatten_with_paths(x)
    for p, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{_tree.path_str(p, name)} must be a tensor, got {type(leaf).__name__}"
            )
        if floating and not leaf.is_floating_point():
            raise TypeError(
                f"{_tree.path_str(p, name)} must be a real floating-point tensor, got {leaf.dtype}"
            )
    return leaves, spec


def _check_scale(name: str, value: Any, *, positive: bool) -> None:
    """Checks a Python-number radius (a tensor is not read: that would sync with the device)."""
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    bad = not (value > 0 if positive else value >= 0) or value != value or value == float("inf")
    if bad:
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")


def _ravel(leaves: list[torch.Tensor]) -> torch.Tensor:
    """All leaves as one vector in their promoted dtype (at least float32 for half leaves)."""
    dtype = leaves[0].dtype
    for leaf in leaves[1:]:
        dtype = torch.promote_types(dtype, leaf.dtype)
    dtype = torch.float32 if dtype in HALF else dtype
    return torch.cat([leaf.reshape(-1).to(dtype) for leaf in leaves])


def _unravel(vec: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Splits ``vec`` back into tensors shaped and typed as ``leaves``."""
    parts = torch.split(vec, [leaf.numel() for leaf in leaves])
    return [p.reshape(leaf.shape).to(leaf.dtype) for p, leaf in zip(parts, leaves)]


def _l2_norm(tree: Any) -> torch.Tensor:
    """``‖x‖₂`` of the whole tree without overflow or underflow: ``m · ‖x / m‖₂``, ``m = max|xᵢ|``.

    The plain sum of squares overflows float32 for a norm above about 1.8e19 and underflows
    below about 1e-19: the l2 projections of ``[1e20, 1e20]`` were zero and those of
    ``[1e-30, 1e-30]`` were inf. Dividing by the largest magnitude first keeps the squares in
    range. The identity is exact in real arithmetic, so the gradient is the norm's.
    """
    m = _tree.norm(tree, ord=float("inf"))
    safe = torch.where(m > 0, m, torch.ones_like(m))  # a zero tree: its norm is 0, not 0/0
    return safe * _tree.norm(_tree.scale(1 / safe, tree))


def _unit_simplex(v: torch.Tensor) -> torch.Tensor:
    """Projection of the vector ``v`` onto ``{p ≥ 0, sum(p) = 1}`` (Held et al.; Duchi et al.).

    With ``u`` sorted decreasingly and ``c`` its cumulative sums, the support has the ``k``
    largest entries, ``k`` the number of ``j`` with ``1/j + u_j − c_j/j > 0``; the result is
    ``relu(v + (1 − c_k)/k)``. ``k`` stays a tensor (a gather index), so nothing syncs.
    """
    n = v.shape[-1]
    u = torch.sort(v, dim=-1, descending=True).values
    csum = torch.cumsum(u, dim=-1)
    ind = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    k = (1 / ind + (u - csum / ind) > 0).sum(-1, keepdim=True)
    # k >= 1 for finite input (j = 1 always qualifies); NaNs could give 0, an invalid index.
    k = k.clamp(min=1)
    tau = torch.gather(csum, -1, k - 1)
    kf = k.to(v.dtype)
    return torch.relu(1 / kf + (v - tau / kf))


def _scale_simplex(v: torch.Tensor, scale: Scalar) -> torch.Tensor:
    return scale * _unit_simplex(v / scale)


def projection_non_negative(tree: Any) -> Any:
    """Projection onto the non-negative orthant: ``max(x, 0)`` element-wise.

    Args:
        tree: the tree to project.

    Returns:
        A tree with ``tree``'s structure, shapes and dtypes.

    Example:
        >>> import torch, functrain as ft
        >>> ft.projections.projection_non_negative({"w": torch.tensor([1.0, -2.0])})
        {'w': tensor([1., 0.])}
    """
    leaves, spec = _leaves(tree, "tree")
    return _tree.unflatten(spec, [torch.relu(x) for x in leaves])


def _bound_leaves(bound: Any, name: str, spec: Any, like: Any) -> list[Any]:
    """A scalar bound repeated for every leaf, or the leaves of a bound tree shaped like ``like``."""
    if isinstance(bound, int | float) or (isinstance(bound, torch.Tensor) and bound.ndim == 0):
        return [bound] * spec.num_leaves
    if isinstance(bound, torch.Tensor) and spec.num_leaves == 1 and _tree.structure(like).is_leaf():
        return [bound]
    return _tree.flatten_up_to(spec, bound, ("tree", name), like)


def _clip(x: torch.Tensor, lo: Any, hi: Any) -> torch.Tensor:
    # jnp.clip's semantics, min(max(x, lo), hi) (hi wins where lo > hi), in x's dtype.
    out = torch.maximum(x, lo.to(x.dtype)) if isinstance(lo, torch.Tensor) else x.clamp(min=lo)
    out = torch.minimum(out, hi.to(x.dtype)) if isinstance(hi, torch.Tensor) else out.clamp(max=hi)
    return out.to(x.dtype)


def projection_box(tree: Any, lower: Any, upper: Any) -> Any:
    """Projection onto the box ``lower ≤ p ≤ upper``: clipping, element-wise.

    Where ``lower > upper`` the result is ``upper``, as ``jnp.clip``.

    Args:
        tree: the tree to project.
        lower: the lower bound: a number, a 0-d tensor, or a tree with ``tree``'s structure
            (leaves broadcastable to its leaves).
        upper: the upper bound, in the same forms.

    Returns:
        A tree with ``tree``'s structure, shapes and dtypes (bounds are cast to each leaf's
        dtype).

    Example:
        >>> import torch, functrain as ft
        >>> ft.projections.projection_box({"w": torch.tensor([-2.0, 0.5, 3.0])}, -1.0, 1.0)
        {'w': tensor([-1.0000,  0.5000,  1.0000])}
    """
    leaves, spec = _leaves(tree, "tree")
    lo = _bound_leaves(lower, "lower", spec, tree)
    hi = _bound_leaves(upper, "upper", spec, tree)
    return _tree.unflatten(spec, [_clip(x, a, b) for x, a, b in zip(leaves, lo, hi)])


def projection_hypercube(tree: Any, scale: Any = 1) -> Any:
    """Projection onto the hypercube ``0 ≤ p ≤ scale`` (the unit hypercube by default).

    Args:
        tree: the tree to project.
        scale: the side of the cube: a number, a 0-d tensor or a tree like ``tree``.

    Returns:
        A tree with ``tree``'s structure, shapes and dtypes.

    Example:
        >>> import torch, functrain as ft
        >>> ft.projections.projection_hypercube(torch.tensor([-0.5, 0.25, 2.0]))
        tensor([0.0000, 0.2500, 1.0000])
    """
    return projection_box(tree, 0, scale)


def projection_linf_ball(tree: Any, scale: Scalar = 1) -> Any:
    """Projection onto the l∞ ball ``max |p_i| ≤ scale``: clipping to ``[−scale, scale]``.

    Args:
        tree: the tree to project.
        scale: the radius, ``≥ 0`` (a number or a 0-d tensor).

    Returns:
        A tree with ``tree``'s structure, shapes and dtypes.

    Example:
        >>> import torch, functrain as ft
        >>> ft.projections.projection_linf_ball(torch.tensor([-3.0, 0.5, 2.0]), 1.0)
        tensor([-1.0000,  0.5000,  1.0000])
    """
    _check_scale("scale", scale, positive=False)
    return projection_box(tree, -scale, scale)


def projection_simplex(tree: Any, scale: Scalar = 1) -> Any:
    """Projection onto the simplex ``p ≥ 0, sum(p) = scale`` of the whole tree.

    All leaves are treated as one vector: the result sums to ``scale`` over every element of
    every leaf. The threshold is found by sorting (``O(n log n)``), without host reads.

    Args:
        tree: the tree to project (real floating-point leaves).
        scale: the value the result sums to, ``> 0`` (a number or a 0-d tensor); 1 gives the
            probability simplex.

    Returns:
        A tree with ``tree``'s structure, shapes and dtypes.

    Example:
        >>> import torch, functrain as ft
        >>> out = ft.projections.projection_simplex({"w": torch.tensor([2.5, 3.2]), "b": torch.tensor(0.5)})
        >>> out
        {'w': tensor([0.1500, 0.8500]), 'b': tensor(0.)}
        >>> ft.tree.sum(out)
        tensor(1.)
    """
    _check_scale("scale", scale, positive=True)
    leaves, spec = _leaves(tree, "tree", floating=True)
    if not leaves:
        return tree
    out = _scale_simplex(_ravel(leaves), scale)
    return _tree.unflatten(spec, _unravel(out, leaves))


def projection_l1_sphere(tree: Any, scale: Scalar = 1) -> Any:
    """Projection onto the l1 sphere ``sum |p_i| = scale``: ``sign(x) ·`` the simplex
    projection of ``|x|``.

    A zero input has no closest point; as optax, it maps to zero.

    Args:
        tree: the tree to project (real floating-point leaves).
        scale: the radius, ``> 0`` (a number or a 0-d tensor).

    Returns:
        A tree with ``tree``'s structure, shapes and dtypes.

    Example:
        >>> import torch, functrain as ft
        >>> ft.projections.projection_l1_sphere(torch.tensor([0.2, -0.1]), 1.0)
        tensor([ 0.5500, -0.4500])
    """
    _check_scale("scale", scale, positive=True)
    leaves, spec = _leaves(tree, "tree", floating=True)
    if not leaves:
        return tree
    v = _ravel(leaves)
    out = torch.sign(v) * _scale_simplex(v.abs(), scale)
    return _tree.unflatten(spec, _unravel(out, leaves))


def projection_l1_ball(tree: Any, scale: Scalar = 1) -> Any:
    """Projection onto the l1 ball ``sum |p_i| ≤ scale``.

    Inside the ball the input is returned as it is; outside, its l1-sphere projection. Both
    are computed and one is selected with ``torch.where`` (optax's ``lax.cond``), so the
    choice reads nothing back to the host.

    Args:
        tree: the tree to project (real floating-point leaves).
        scale: the radius, ``> 0`` (a number or a 0-d tensor).

    Returns:
        A tree with ``tree``'s structure, shapes and dtypes.

    Example:
        >>> import torch, functrain as ft
        >>> ft.projections.projection_l1_ball({"w": torch.tensor([2.5, 3.2]), "b": torch.tensor(0.5)})
        {'w': tensor([0.1500, 0.8500]), 'b': tensor(0.)}
    """
    _check_scale("scale", scale, positive=True)
    leaves, spec = _leaves(tree, "tree", floating=True)
    if not leaves:
        return tree
    v = _ravel(leaves)
    sphere = torch.sign(v) * _scale_simplex(v.abs(), scale)
    out = torch.where(v.abs().sum() <= scale, v, sphere)
    return _tree.unflatten(spec, _unravel(out, leaves))


def projection_l2_sphere(tree: Any, scale: Scalar = 1) -> Any:
    """Projection onto the l2 sphere ``‖p‖₂ = scale``: ``x · scale / ‖x‖₂``.

    As optax, a zero input gives NaNs (``0 / 0``): it has no closest point on the sphere.
    The norm is computed as ``m · ‖x / m‖₂`` with ``m = max|xᵢ|``, so it neither overflows nor
    underflows.

    Args:
        tree: the tree to project.
        scale: the radius, ``≥ 0`` (a number or a 0-d tensor).

    Returns:
        A tree with ``tree``'s structure, shapes and dtypes.

    Example:
        >>> import torch, functrain as ft
        >>> ft.projections.projection_l2_sphere(torch.tensor([3.0, 4.0]), 10.0)
        tensor([6., 8.])
    """
    _check_scale("scale", scale, positive=False)
    if not _leaves(tree, "tree")[0]:
        return tree
    return _tree.scale(scale / _l2_norm(tree), tree)


def projection_l2_ball(tree: Any, scale: Scalar = 1) -> Any:
    """Projection onto the l2 ball ``‖p‖₂ ≤ scale``: ``x · scale / max(‖x‖₂, scale)``.

    The norm is computed as ``m · ‖x / m‖₂`` with ``m = max|xᵢ|``, so it neither overflows nor
    underflows (a tiny radius works too).

    Args:
        tree: the tree to project.
        scale: the radius, ``> 0`` (a number or a 0-d tensor).

    Returns:
        A tree with ``tree``'s structure, shapes and dtypes.

    Example:
        >>> import torch, functrain as ft
        >>> ft.projections.projection_l2_ball({"w": torch.tensor([3.0, 4.0])}, 1.0)
        {'w': tensor([0.6000, 0.8000])}
    """
    _check_scale("scale", scale, positive=True)
    if not _leaves(tree, "tree")[0]:
        return tree
    n = _l2_norm(tree)
    # max(‖x‖, scale), not optax's sqrt(max(‖x‖², scale²)): scale² underflows for a tiny radius.
    big = torch.maximum(n, scale) if isinstance(scale, torch.Tensor) else n.clamp(min=scale)
    return _tree.scale(scale / big, tree)


def projection_vector(x: Any, a: Any) -> Any:
    """Projection of ``x`` onto the line spanned by ``a``: ``(⟨x, a⟩ / ⟨a, a⟩) · a``.

    Args:
        x: the tree to project.
        a: a tree with ``x``'s structure and shapes (non-zero).

    Returns:
        A tree with ``a``'s structure.

    Example:
        >>> import torch, functrain as ft
        >>> ft.projections.projection_vector(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]))
        tensor([2., 0.])
    """
    _leaves(x, "x")
    _leaves(a, "a")
    return _tree.scale(_tree.vdot(x, a) / _tree.vdot(a, a), a)


def projection_hyperplane(x: Any, a: Any, b: Scalar) -> Any:
    """Projection onto the hyperplane ``⟨a, p⟩ = b``: ``x + ((b − ⟨x, a⟩) / ⟨a, a⟩) · a``.

    Args:
        x: the tree to project.
        a: the normal of the hyperplane, a tree with ``x``'s structure and shapes (non-zero).
        b: the offset, a number or a 0-d tensor.

    Returns:
        A tree with ``x``'s structure.

    Example:
        >>> import torch, functrain as ft
        >>> ft.projections.projection_hyperplane(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]), 1.0)
        tensor([1., 0.])
    """
    _leaves(x, "x")
    _leaves(a, "a")
    return _tree.add_scale(x, (b - _tree.vdot(x, a)) / _tree.vdot(a, a), a)


def projection_halfspace(x: Any, a: Any, b: Scalar) -> Any:
    """Projection onto the halfspace ``⟨a, p⟩ ≤ b``: :func:`projection_hyperplane` when
    ``⟨a, x⟩ > b``, else ``x`` itself (a step ``min(0, (b − ⟨x, a⟩) / ⟨a, a⟩) · a``).

    Args:
        x: the tree to project.
        a: the normal of the halfspace, a tree with ``x``'s structure and shapes (non-zero).
        b: the offset, a number or a 0-d tensor.

    Returns:
        A tree with ``x``'s structure.

    Example:
        >>> import torch, functrain as ft
        >>> a = torch.tensor([1.0, 1.0])
        >>> ft.projections.projection_halfspace(torch.tensor([2.0, 1.0]), a, 1.0)
        tensor([1., 0.])
        >>> ft.projections.projection_halfspace(torch.tensor([0.0, 0.5]), a, 1.0)
        tensor([0.0000, 0.5000])
    """
    _leaves(x, "x")
    _leaves(a, "a")
    step = ((b - _tree.vdot(x, a)) / _tree.vdot(a, a)).clamp(max=0)
    return _tree.add_scale(x, step, a)
