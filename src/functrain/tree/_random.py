"""Random pytrees from functrain keys (``ft.tree.random_like``, ``split_key_like``,
``unwrap_random_key_data``; optax's ``tree.random_like`` and friends on JAX keys).

A key is a 0-d ``int64`` CPU tensor (:func:`functrain.random_key`, :func:`functrain.split_key`)
or a Python integer seed, which stands for ``ft.random_key(seed)``. A *sampler* is a callable
``sampler(key, shape, dtype)`` returning a tensor of that shape and dtype (optax's
``jax.random.normal`` convention); one that also takes a ``device`` keyword is asked to draw on
the leaf's device.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch

from functrain.tree._structure import flatten, flatten_with_paths, map, path_str, unflatten

__all__ = ["random_like", "split_key_like", "unwrap_random_key_data"]


# Imported when first used: functrain.train and functrain.optim import functrain.tree.
def _rng() -> ModuleType:
    from functrain.train import rng

    return rng


def _prng() -> ModuleType:
    from functrain.optim import _prng

    return _prng


def _as_key(rng_key: Any, name: str = "rng_key") -> torch.Tensor:
    """A functrain key from a key tensor or an integer seed (``ft.random_key(seed)``)."""
    if isinstance(rng_key, torch.Tensor):
        return rng_key  # split_key checks dtype, shape and device with a clear message
    if isinstance(rng_key, bool) or not isinstance(rng_key, numbers.Integral):
        raise TypeError(
            f"{name} must be a functrain key (ft.random_key) or an int seed, "
            f"got {type(rng_key).__name__}"
        )
    return _rng().random_key(int(rng_key))


def _key32(key: Any, device: torch.device | None = None) -> torch.Tensor:
    """The 32-bit generator key of :mod:`functrain.optim._prng` for a functrain key or seed (an
    int seed stands for ``ft.random_key(seed)``), on ``device`` if given."""
    key32 = _prng().key32(key if isinstance(key, torch.Tensor) else _as_key(key, "key"))
    return key32 if device is None else key32.to(device)


def _float_dtype(dtype: Any, who: str) -> torch.dtype:
    """A real floating torch dtype; Python's ``float`` means the default dtype (JAX's too)."""
    if dtype is float:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{who}: dtype must be a floating torch.dtype (or float), got {dtype!r}")
    return dtype


def _standard_normal(
    key: Any,
    shape: Sequence[int] = (),
    dtype: Any = float,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard-normal samples of ``shape`` and ``dtype`` from a functrain key (the default
    sampler of :func:`random_like`), drawn on ``device`` (by default the key's device).

    Counter-based (:func:`functrain.optim._prng().normal_like`): the draw depends on the key only,
    is the same on every device up to the last bit of ``log``/``cos``, and reads nothing back
    to the host. Samples are truncated at about ±6.66.
    """
    dtype = _float_dtype(dtype, "tree_random_like sampler")
    key32 = _key32(key, device)
    like = torch.empty(tuple(shape), dtype=dtype, device=key32.device)
    return _prng().normal_like(key32, like)


def _takes_device(sampler: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(sampler).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return "device" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def split_key_like(rng_key: torch.Tensor | int, target_tree: Any) -> Any:
    """Splits a key into one key per leaf of ``target_tree`` (optax's ``tree.split_key_like``).

    Leaf ``i`` (in :func:`functrain.tree.flatten` order) gets ``ft.split_key(rng_key, n)[i]``,
    ``n`` the number of leaves: distinct, independent keys, the same for the same
    ``(rng_key, structure)``.

    Args:
        rng_key: a functrain key (a 0-d ``int64`` CPU tensor, :func:`functrain.random_key`) or
            an integer seed, meaning ``ft.random_key(seed)``.
        target_tree: the tree whose structure to match; its leaves may be anything (only their
            number is used); ``None`` subtrees stay ``None``.

    Returns:
        A tree of ``target_tree``'s structure whose leaves are 0-d ``int64`` CPU keys.

    Raises:
        TypeError: ``rng_key`` is neither an ``int64`` tensor nor an integer.
        ValueError: ``rng_key`` is not 0-d or not on the CPU.

    Example:
        >>> import torch, functrain as ft
        >>> keys = ft.tree.split_key_like(ft.random_key(0), {"a": torch.ones(2), "b": None})
        >>> keys["a"].shape, keys["b"]
        (torch.Size([]), None)
    """
    leaves, spec = flatten(target_tree)
    keys = _rng().split_key(_as_key(rng_key), len(leaves))
    return unflatten(spec, list(keys.unbind()))


def random_like(
    rng_key: torch.Tensor | int,
    target_tree: Any,
    sampler: Callable[..., torch.Tensor] = _standard_normal,
    dtype: torch.dtype | None = None,
) -> Any:
    """A tree of random tensors shaped like ``target_tree`` (optax's ``tree.random_like``).

    Leaf ``i`` is ``sampler(key_i, leaf.shape, dtype or leaf.dtype)`` with ``key_i`` the leaf's
    key from :func:`split_key_like`, so every leaf draws independently and the result is
    reproducible from ``rng_key``. The default sampler draws standard normals with functrain's
    counter-based generator (no global RNG, no host synchronization, directly on the leaf's
    device, the same values on CPU and CUDA up to the last bit).

    A sampler is ``sampler(key, shape, dtype) -> Tensor``, as optax's ``jax.random.normal``:
    ``key`` a 0-d ``int64`` CPU key (use it with :func:`functrain.key_generator`, or draw from
    it with :class:`functrain.perturbations.Normal`'s ``sample``), ``shape`` a tuple of ints,
    ``dtype`` a torch dtype. A sampler that accepts a ``device`` keyword (or ``**kwargs``) gets
    ``device=leaf.device`` (as optax passes ``out_sharding``); otherwise its result is moved to
    the leaf's device.

    Args:
        rng_key: a functrain key (a 0-d ``int64`` CPU tensor) or an integer seed.
        target_tree: a pytree of tensors; ``None`` subtrees stay ``None``.
        sampler: the noise sampler, by default standard normals.
        dtype: the dtype passed to ``sampler``; ``None`` (default) passes each leaf's dtype.
            The default sampler needs a floating dtype.

    Returns:
        A pytree of ``target_tree``'s structure whose leaves have the target leaves' shapes and
        devices, the dtype the sampler returned (``dtype`` or the leaf's, for the default).

    Raises:
        TypeError: a leaf of ``target_tree`` is not a tensor (the message names its path), the
            key is not a key, or the default sampler gets a non-floating dtype.
        ValueError: the sampler returned a tensor of another shape (named by path), or the key
            is not 0-d or not on the CPU.

    Differences from optax: keys are functrain keys, not JAX key arrays; samplers receive a
    ``device`` keyword instead of ``out_sharding``.

    Example:
        >>> import torch, functrain as ft
        >>> tree = {"w": torch.zeros(1000, dtype=torch.float64), "b": torch.zeros(2)}
        >>> noise = ft.tree.random_like(ft.random_key(0), tree)
        >>> noise["w"].dtype, noise["b"].dtype
        (torch.float64, torch.float32)
        >>> bool(noise["w"].mean().abs() < 0.2)
        True
        >>> uniform = lambda key, shape, dtype: torch.rand(
        ...     shape, dtype=dtype, generator=ft.key_generator(key))
        >>> bool((ft.tree.random_like(ft.random_key(1), tree, uniform)["w"] >= 0).all())
        True
    """
    paths, leaves, spec = flatten_with_paths(target_tree)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"tree_random_like: {path_str(path, 'target_tree')} must be a tensor, "
                f"got {type(leaf).__name__}"
            )
    keys = _rng().split_key(_as_key(rng_key), len(leaves)).unbind()
    with_device = _takes_device(sampler)
    out = []
    for path, leaf, key in zip(paths, leaves, keys):
        leaf_dtype = dtype or leaf.dtype
        if with_device:
            sample = sampler(key, tuple(leaf.shape), leaf_dtype, device=leaf.device)
        else:
            sample = sampler(key, tuple(leaf.shape), leaf_dtype)
        sample = torch.as_tensor(sample).to(leaf.device)
        if sample.shape != leaf.shape:
            raise ValueError(
                f"tree_random_like: the sampler returned shape {tuple(sample.shape)} for "
                f"{path_str(path, 'target_tree')} of shape {tuple(leaf.shape)}"
            )
        out.append(sample)
    return unflatten(spec, out)


def unwrap_random_key_data(input_tree: Any) -> Any:
    """``input_tree`` itself (optax's ``tree.unwrap_random_key_data``).

    optax turns JAX's typed key arrays (``jax.random.key``), which cannot be compared
    numerically, into their raw ``uint32`` data. A functrain key already is a plain ``int64``
    tensor holding its data, comparable with ``torch.equal``, so there is nothing to unwrap:
    every leaf, key or not, is returned as is (the same objects), in new containers as optax's
    ``tree.map`` builds.

    Args:
        input_tree: a pytree of tensors and keys (any leaves).

    Returns:
        A pytree of ``input_tree``'s structure holding the same leaf objects.

    Example:
        >>> import torch, functrain as ft
        >>> state = {"key": ft.random_key(0), "w": torch.ones(2)}
        >>> ft.tree.unwrap_random_key_data(state)["key"] is state["key"]
        True
    """
    return map(lambda leaf: leaf, input_tree)
