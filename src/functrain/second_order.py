"""Second-order quantities of a loss, as ``optax.second_order`` (0.2.8).

All three take a loss ``loss(params, inputs, targets) -> scalar`` and a pytree of parameters,
and see the parameters as one vector: the leaves flattened row-major and concatenated in
:func:`functrain.tree.flatten` order (dict keys sorted, as ``jax.flatten_util.ravel_pytree``),
in the leaves' common dtype.

* :func:`hvp`: the Hessian-vector product ``H v``, returned as a pytree shaped like ``params``;
* :func:`hessian_diag`: the Hessian's diagonal, one ``H e_i`` per parameter (``vmap`` over the
  rows of an identity matrix): ``n`` Hessian-vector products and an ``n × n`` identity for ``n``
  parameters, so meant for small models, as optax's;
* :func:`fisher_diag`: the diagonal of the observed (empirical) Fisher information of a
  negative log-likelihood, the squared gradient ``(∇ nll)²``.

They are pure (inputs are never modified), read nothing back to the host and follow the
parameters' device and dtype. optax 0.2.7 deprecated these functions (removed in 0.2.9);
functrain provides them without a deprecation warning so that ported code keeps working.

Differences from optax: ``H v`` is a reverse-over-reverse product (``vjp`` of the gradient)
where optax's is forward-over-reverse (``jvp``); they agree for the symmetric Hessian of a
twice continuously differentiable loss. ``hvp`` is documented by optax as returning an array but returns (and
here returns) a pytree shaped like ``params``; ``hessian_diag``'s identity takes the parameters'
common dtype (JAX's ``jnp.eye`` uses the default float dtype).

Example:
    Least squares ``‖X w − y‖² / m`` has Hessian ``2 XᵀX / m``.

    >>> import torch
    >>> import functrain.second_order as second_order
    >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> y = torch.tensor([1.0, 0.0])
    >>> loss = lambda p, x, t: ((x @ p["w"] - t) ** 2).mean()
    >>> params = {"w": torch.zeros(2)}
    >>> second_order.hessian_diag(loss, params, X, y)
    tensor([10., 20.])
    >>> second_order.hvp(loss, torch.tensor([1.0, 0.0]), params, X, y)
    {'w': tensor([10., 14.])}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from functrain import tree as _tree

__all__ = ["fisher_diag", "hessian_diag", "hvp"]

LossFn = Callable[[Any, Any, Any], torch.Tensor]


def _leaves(params: Any, who: str) -> tuple[list[torch.Tensor], Any]:
    """The floating tensor leaves of ``params`` and its treespec; a bad leaf names its path."""
    paths, leaves, spec = _tree.flatten_with_paths(params)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{who}: {_tree.path_str(path, 'params')} must be a tensor, "
                f"got {type(leaf).__name__}"
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"{who}: {_tree.path_str(path, 'params')} must be a floating-point tensor "
                f"(it is differentiated), got {leaf.dtype}"
            )
    return leaves, spec


def _ravel(leaves: list[torch.Tensor]) -> torch.Tensor:
    """The leaves flattened and concatenated in their common dtype (``ravel_pytree``'s)."""
    if not leaves:
        return torch.zeros(0)
    dtype = leaves[0].dtype
    for leaf in leaves[1:]:
        dtype = torch.promote_types(dtype, leaf.dtype)
    return torch.cat([leaf.reshape(-1).to(dtype) for leaf in leaves])


def _unravel(v: torch.Tensor, leaves: list[torch.Tensor], who: str) -> list[torch.Tensor]:
    """``v`` cut into pieces shaped, typed and placed like ``leaves``."""
    size = sum(leaf.numel() for leaf in leaves)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{who}: v must be a tensor, got {type(v).__name__}")
    if v.shape != (size,):
        raise ValueError(
            f"{who}: v must be a vector of the {size} parameters (params flattened), "
            f"got shape {tuple(v.shape)}"
        )
    pieces, start = [], 0
    for leaf in leaves:
        piece = v[start : start + leaf.numel()].reshape(leaf.shape)
        pieces.append(piece.to(device=leaf.device, dtype=leaf.dtype))
        start += leaf.numel()
    return pieces


def _hvp(loss: LossFn, v: torch.Tensor, params: Any, inputs: Any, targets: Any) -> Any:
    leaves, spec = _leaves(params, "hvp")
    tangents = _unravel(v, leaves, "hvp")
    # Differentiated in the flat leaves, the tree rebuilt inside the loss: torch.func's own
    # pytrees refuse None leaves ("Thing passed to transform API must be Tensor") and know
    # nothing of containers registered with functrain.tree only; optax skips None subtrees.
    grad_fn = torch.func.grad(lambda flat: loss(_tree.unflatten(spec, flat), inputs, targets))
    # Reverse over reverse: the Hessian is symmetric, so the vector-Jacobian product of the
    # gradient is H v. (optax's forward over reverse, torch.func.jvp, imports torch's jvp
    # decompositions on first use, whose torch.jit.script raises a DeprecationWarning.)
    _, vjp_fn = torch.func.vjp(grad_fn, list(leaves))
    (product,) = vjp_fn(tangents)
    return _tree.unflatten(spec, product)


def hvp(loss: LossFn, v: torch.Tensor, params: Any, inputs: Any, targets: Any) -> Any:
    """The product of the Hessian of ``loss`` at ``params`` with a vector ``v``.

    ``H v`` with ``H = ∇²_params loss(params, inputs, targets)``, computed without forming
    ``H``: the vector-Jacobian product of the gradient with ``v`` (``torch.func.vjp`` of
    ``torch.func.grad``; ``H`` is symmetric, so this is optax's ``jvp`` of the gradient).

    Args:
        loss: ``loss(params, inputs, targets) -> scalar tensor``, differentiable with
            ``torch.func`` (no in-place updates of ``params``, no ``.item()``).
        v: a vector of the size of ``params`` flattened (the leaves concatenated in
            :func:`functrain.tree.flatten` order); each piece is cast to its leaf's dtype and
            device.
        params: a pytree of floating tensors.
        inputs: the inputs ``loss`` is evaluated at.
        targets: the targets ``loss`` is evaluated at.

    Returns:
        ``H v`` as a pytree shaped like ``params`` (as optax's, whose docstring says array).

    Raises:
        TypeError: a leaf of ``params`` is not a floating tensor (named by path), or ``v`` is
            not a tensor.
        ValueError: ``v`` is not a vector of the number of parameters.

    Example:
        >>> import torch
        >>> import functrain.second_order as second_order
        >>> loss = lambda p, x, t: (p["a"] ** 2 * p["b"]).sum()  # H = [[2b, 2a], [2a, 0]]
        >>> params = {"a": torch.tensor([3.0]), "b": torch.tensor([5.0])}
        >>> second_order.hvp(loss, torch.tensor([1.0, 1.0]), params, None, None)
        {'a': tensor([16.]), 'b': tensor([6.])}
    """
    return _hvp(loss, v, params, inputs, targets)


def hessian_diag(loss: LossFn, params: Any, inputs: Any, targets: Any) -> torch.Tensor:
    """The diagonal of the Hessian of ``loss`` at ``params``, as a flat vector.

    Entry ``i`` is ``e_iᵀ H e_i``, one Hessian-vector product per parameter, batched with
    ``torch.func.vmap`` over the rows of an ``n × n`` identity (``n`` the number of parameters):
    exact, but ``n`` times the cost of a gradient, for small models (as optax's).

    Args:
        loss: ``loss(params, inputs, targets) -> scalar tensor``, differentiable and
            ``vmap``-able with ``torch.func``.
        params: a pytree of floating tensors.
        inputs: the inputs ``loss`` is evaluated at.
        targets: the targets ``loss`` is evaluated at.

    Returns:
        A vector of ``n`` entries in the parameters' common dtype, in the order of ``params``
        flattened (:func:`functrain.tree.flatten` order, each leaf row-major).

    Raises:
        TypeError: a leaf of ``params`` is not a floating tensor (named by path).

    Example:
        >>> import torch
        >>> import functrain.second_order as second_order
        >>> loss = lambda p, x, t: (p["a"] ** 2 * p["b"]).sum()
        >>> params = {"a": torch.tensor([3.0]), "b": torch.tensor([5.0])}
        >>> second_order.hessian_diag(loss, params, None, None)
        tensor([10.,  0.])
    """
    leaves, _ = _leaves(params, "hessian_diag")
    flat = _ravel(leaves)
    n = flat.numel()
    if n == 0:
        return flat
    eye = torch.eye(n, dtype=flat.dtype, device=flat.device)

    def diagonal_entry(v: torch.Tensor) -> torch.Tensor:
        hv = _ravel(_tree.leaves(_hvp(loss, v, params, inputs, targets)))
        return torch.dot(v, hv.to(v.dtype))

    return torch.func.vmap(diagonal_entry)(eye)


def fisher_diag(
    negative_log_likelihood: LossFn, params: Any, inputs: Any, targets: Any
) -> torch.Tensor:
    """The diagonal of the observed Fisher information: the squared gradient of an NLL.

    ``(∇_params nll(params, inputs, targets))²`` element by element, flattened. With a loss that
    sums (not averages) the negative log-likelihood of a batch, this is the square of the
    batch's summed score; the per-example empirical Fisher needs per-example gradients
    (:func:`functrain.per_sample_grads`).

    Args:
        negative_log_likelihood: ``nll(params, inputs, targets) -> scalar tensor``,
            differentiable with ``torch.func``.
        params: a pytree of floating tensors.
        inputs: the inputs ``negative_log_likelihood`` is evaluated at.
        targets: the targets ``negative_log_likelihood`` is evaluated at.

    Returns:
        A vector of ``n`` entries in the parameters' common dtype, in the order of ``params``
        flattened (:func:`functrain.tree.flatten` order, each leaf row-major).

    Raises:
        TypeError: a leaf of ``params`` is not a floating tensor (named by path).

    Example:
        >>> import torch
        >>> import functrain.second_order as second_order
        >>> nll = lambda p, x, t: 0.5 * ((x * p["mu"] - t) ** 2).sum()  # Gaussian, unit variance
        >>> params = {"mu": torch.tensor([1.0])}
        >>> second_order.fisher_diag(nll, params, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
        tensor([25.])
    """
    leaves, spec = _leaves(params, "fisher_diag")
    if not leaves:
        return _ravel(leaves)

    def nll(flat: list[torch.Tensor]) -> torch.Tensor:  # in the flat leaves, as _hvp's loss
        return negative_log_likelihood(_tree.unflatten(spec, flat), inputs, targets)

    return torch.square(_ravel(torch.func.grad(nll)(list(leaves))))
