"""Hutchinson's estimator of the Hessian diagonal, ``z ⊙ (H z)`` with Rademacher probes
(optax.contrib's ``hutchinson_estimator_diag_hessian``), Sophia-H's default.

Randomness: the probe vectors come from the counter-based generator of
:mod:`functrain.optim._prng` (a key in the state, split at every estimate), not from a global
RNG, so an estimate is a pure function of its inputs, compiles with ``torch.compile`` and never
synchronises with the device. The probes differ from optax's (JAX's threefry) for the same seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from functrain import tree
from functrain.optim import _prng, _utils
from functrain.optim.base import GradientTransformation

__all__ = ["HutchinsonState", "hutchinson_estimator_diag_hessian"]


class HutchinsonState(NamedTuple):
    """State of :func:`hutchinson_estimator_diag_hessian`: the generator ``key``.

    ``key`` is a 0-d int64 tensor, split at every estimate: the probes are a pure function of
    the initial key and the number of estimates made.

    Example:
        >>> import torch, functrain as ft
        >>> ft.hutchinson_estimator_diag_hessian(3).init([torch.zeros(1)]).key.dtype
        torch.int64
    """

    key: torch.Tensor


def _base_key(seed: int | torch.Tensor | None) -> torch.Tensor:
    """A generator key from an int seed, a 0-d integer tensor key, or ``None`` (seed 0)."""
    if seed is None:
        return _prng.make_key(0)
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype.is_floating_point or seed.dtype.is_complex:
            raise ValueError(
                f"random_seed must be an int or a 0-d integer tensor, got a {seed.dtype} "
                f"tensor of shape {tuple(seed.shape)}"
            )
        if seed.dtype == torch.bool:
            raise ValueError("random_seed must be an int or a 0-d integer tensor, got a bool")
        return seed.to(torch.int64) & _prng.MASK32
    return _prng.make_key(seed)  # TypeError for anything but an int


def _rademacher_like(key: torch.Tensor, like: torch.Tensor, stream: int) -> torch.Tensor:
    """±1 with equal probability, shaped like ``like`` and in its dtype, from ``key``.

    Element ``j`` of leaf ``stream`` is the top bit of a keyed hash of ``j`` (the hash
    :func:`functrain.optim._prng.normal_like` uses), so the draw is reproducible from the key.
    """
    key = _prng.mix32((key.to(like.device) & _prng.MASK32) ^ _prng.mix32(stream & _prng.MASK32))
    index = torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    if like.numel() > _prng.MASK32:  # indices beyond 32 bits: fold the high part into the key
        key = _prng.mix32(key ^ (index >> 32))
        index = index & _prng.MASK32
    bits = _prng.mix32(_prng.mix32((index + key) & _prng.MASK32) ^ key)
    signs = 1 - 2 * (bits >> 31)
    return signs.reshape(like.shape).to(like.dtype)


def hutchinson_estimator_diag_hessian(
    random_seed: int | torch.Tensor | None = None,
) -> GradientTransformation:
    r"""Estimates the Hessian's diagonal by Hutchinson's method: ``z ⊙ (∇²f · z)``.

    ``z`` is a Rademacher vector (independent ±1 entries) shaped like the parameters, so
    ``E[z ⊙ Hz] = diag(H)``: the estimate is unbiased but noisy. ``Hz`` is a Hessian-vector
    product, computed reverse-over-reverse as the vector-Jacobian product of
    ``torch.func.grad(obj_fn)`` with ``z`` (``H`` is symmetric; the cost of a few gradients; it
    traces under ``torch.compile(fullgraph=True)``). optax takes the forward-over-reverse
    ``jvp``: the same numbers up to rounding. The incoming updates are ignored; the output is a tree
    like ``params``.

    ``update`` needs ``params`` and the keyword ``obj_fn``: ``obj_fn(params)`` returns the
    scalar loss (close over the batch: ``obj_fn = lambda p: loss_fn(p, batch)``).
    ``nn.Parameter``\ s are constants here, as to ``torch.optim``: the estimate holds no graph
    to a module's weights (which Sophia's ``nu`` would carry from step to step). It stays
    differentiable when the update is (a ``torch.func`` transform, tracked gradients, or
    tracked params that are not ``nn.Parameter``\ s).

    Differences from optax: the probes come from functrain's counter-based generator, so they
    differ from JAX's for the same seed; each leaf's probe has that leaf's dtype (optax casts
    all of them to the lowest-precision parameter dtype, which JAX's ``jvp`` then refuses for
    a tree of mixed dtypes). Complex parameters are refused (the Hessian of a real loss in
    complex parameters is not ``∇²f`` of this formula).

    Args:
        random_seed: an int seed or a 0-d integer tensor key (optax: a JAX key); ``None`` is
            seed 0, as optax's ``PRNGKey(0)``.

    Example:
        >>> import torch, functrain as ft
        >>> obj_fn = lambda p: (torch.tensor([1.0, 2.0, 3.0]) * p["w"] ** 2).sum()
        >>> params = {"w": torch.ones(3)}
        >>> tx = ft.hutchinson_estimator_diag_hessian(random_seed=0)
        >>> diag, _ = tx.update(params, tx.init(params), params, obj_fn=obj_fn)
        >>> diag["w"]  # exact for a separable objective: 2 * [1, 2, 3]
        tensor([2., 4., 6.])
    """
    base_key = _base_key(random_seed)

    def init_fn(params: Any) -> HutchinsonState:
        return HutchinsonState(key=base_key.to(_utils.default_device(params)))

    def update_fn(
        updates: Any,
        state: HutchinsonState,
        params: Any = None,
        obj_fn: Callable[[Any], torch.Tensor] | None = None,
        **extra: Any,
    ) -> tuple[Any, HutchinsonState]:
        del extra
        if params is None:
            raise ValueError(
                "hutchinson_estimator_diag_hessian needs params: call "
                "update(updates, state, params, obj_fn=...)"
            )
        if obj_fn is None:
            raise ValueError(
                "hutchinson_estimator_diag_hessian needs the objective: call update(updates, "
                "state, params, obj_fn=lambda p: loss(p, batch)). make_train_step passes only "
                "value=, so drive Sophia-H from your own loop (see ft.sophia)"
            )
        leaves, spec = tree.flatten(params)
        # None leaves (masked out by ft.masked, say) reach torch.func as an opaque "must be
        # Tensor" error; obj_fn needs the whole tree, so say which leaf is missing.
        paths, values, _ = optree.tree_flatten_with_path(params, none_is_leaf=True)
        missing = [p for p, v in zip(paths, values) if v is None]
        if missing:
            raise ValueError(
                f"hutchinson_estimator_diag_hessian: {tree.path_str(missing[0], 'params')} is "
                "None (masked out?); obj_fn needs every parameter, so do not wrap Sophia-H in "
                "ft.masked: give it a hessian_diagonal_fn that needs no objective"
            )
        if any(x.is_complex() for x in leaves):
            path, dtype = _utils.complex_leaf(params, "params")
            raise TypeError(
                f"hutchinson_estimator_diag_hessian: {path} is {dtype}; complex parameters "
                "are not supported"
            )
        # Evaluated at constants unless the update is differentiated: torch.func's result at
        # nn.Parameters would keep an autograd graph to the module's weights (the same numbers).
        params = _utils.constant_tree(params, updates)
        next_key, sample_key = _prng.split(state.key)
        signs = tree.unflatten(
            spec, [_rademacher_like(sample_key, x, i) for i, x in enumerate(leaves)]
        )
        # Reverse over reverse: the Hessian is symmetric, so the vector-Jacobian product of
        # the gradient is H·z. (Forward over reverse, optax's jvp, imports torch's
        # jvp decompositions, whose torch.jit.script raises a DeprecationWarning.)
        _, vjp_fn = torch.func.vjp(torch.func.grad(obj_fn), params)
        (hvp,) = vjp_fn(signs)
        products = [h * z for h, z in zip(tree.leaves(hvp), tree.leaves(signs))]
        return tree.unflatten(spec, products), HutchinsonState(key=next_key)

    return GradientTransformation(init_fn, update_fn)


# optax's default estimator: one shared instance (it is pure; each ``init`` starts its key).
_HUTCHINSON = hutchinson_estimator_diag_hessian()
