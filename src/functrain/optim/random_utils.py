"""A diagonal Gaussian parametrised by its log-scale, as ``optax.multi_normal``.

``multi_normal(loc, log_scale)`` returns a :class:`MultiNormalDiagFromLogScale`: independent
normals ``N(loc, exp(log_scale)²)`` over the broadcast shape of ``loc`` and ``log_scale`` (the
*parameter shape*), seen as one multivariate distribution: ``log_prob`` sums over the parameter
axes. It is the search distribution of evolution strategies and of the perturbation-based
gradient estimators.

Randomness comes from a functrain key (``ft.random_key(seed)``, any 0-d integer tensor, or a
Python int) through the counter-based sampler of :mod:`functrain.optim._prng`: no global RNG,
no host read, the same draw on every device and under ``torch.compile``.

Differences from optax: samples are drawn in the parameters' dtype (optax draws float32 noise
and promotes); the noise is not JAX's (another generator); :meth:`entropy` is an addition.

Example:
    >>> import torch
    >>> from functrain.optim.random_utils import multi_normal
    >>> dist = multi_normal(torch.zeros(3), torch.zeros(3))
    >>> dist.sample((4,), key=0).shape
    torch.Size([4, 3])
    >>> round(float(dist.log_prob(torch.zeros(3))), 4)
    -2.7568
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import torch

from functrain.optim import _prng

__all__ = ["MultiNormalDiagFromLogScale", "multi_normal"]

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


def _key_bits(key: Any, who: str) -> torch.Tensor:
    """A 32-bit ``_prng`` key from a functrain key (0-d integer tensor) or a Python int seed."""
    return _prng.key32(key, f"{who}: key")


def uniform_like(key: torch.Tensor, like: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Uniform samples in ``[low, high)`` shaped like ``like`` (dtype, device), from a ``_prng``
    key (internal: :func:`functrain.optim.linear_algebra.power_iteration`'s start vector)."""
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    key = _prng.mix32((key.to(like.device) & _prng.MASK32) ^ 0x2545F491)
    index = torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    if like.numel() > _prng.MASK32:  # indices beyond 32 bits: fold the high part into the key
        key = _prng.mix32(key ^ (index >> 32))
        index = index & _prng.MASK32
    bits = _prng.mix32(_prng.mix32((index + key) & _prng.MASK32) ^ key)
    unit = bits.to(compute) * 2.0**-32  # in [0, 1)
    return (low + (high - low) * unit).reshape(like.shape).to(like.dtype)


def _as_float_tensor(value: Any, name: str) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"multi_normal: {name} must be real, got {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


class MultiNormalDiagFromLogScale:
    """A diagonal multivariate normal with mean ``loc`` and standard deviation ``exp(log_scale)``.

    Args:
        loc: the mean (tensor or array-like).
        log_scale: the log of the standard deviation, broadcastable with ``loc``.

    Raises:
        ValueError: ``loc`` and ``log_scale`` do not broadcast ("Incompatible shapes for
            broadcasting", as optax).
        TypeError: either is complex or boolean.

    Example:
        >>> import torch
        >>> from functrain.optim.random_utils import MultiNormalDiagFromLogScale
        >>> dist = MultiNormalDiagFromLogScale(torch.zeros(2, 1), torch.zeros(3))
        >>> dist.sample([5], key=1).shape
        torch.Size([5, 2, 3])
    """

    def __init__(self, loc: Any, log_scale: Any) -> None:
        self._log_scale = _as_float_tensor(log_scale, "log_scale")
        self._scale = torch.exp(self._log_scale)
        self._mean = _as_float_tensor(loc, "loc")
        try:
            self._param_shape = tuple(torch.broadcast_shapes(self._mean.shape, self._scale.shape))
        except RuntimeError:
            raise ValueError(
                f"Incompatible shapes for broadcasting: loc {tuple(self._mean.shape)} and "
                f"log_scale {tuple(self._log_scale.shape)}"
            ) from None

    def _dtype(self) -> torch.dtype:
        return torch.promote_types(self._mean.dtype, self._scale.dtype)

    def sample(self, shape: Sequence[int] | int, key: Any) -> torch.Tensor:
        """Draws samples of shape ``(*shape, *param_shape)``: ``loc + exp(log_scale) · ε``.

        Args:
            shape: the sample shape (a sequence of ints; an int ``n`` means ``(n,)``).
            key: a functrain key (0-d integer tensor, e.g. ``ft.random_key(0)``) or an int
                seed; the same key gives the same samples.

        Returns:
            A tensor of shape ``(*shape, *param_shape)`` in the parameters' (promoted) dtype,
            on ``loc``'s device.

        Raises:
            TypeError, ValueError: ``key`` is not an int or a 0-d integer tensor, or ``shape``
                is not a sequence of non-negative ints.
        """
        if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
            shape = (int(shape),)
        try:
            sample_shape = tuple(operator.index(s) for s in shape) + self._param_shape
        except TypeError:
            raise TypeError(f"sample: shape must be a sequence of ints, got {shape!r}") from None
        if any(s < 0 for s in sample_shape):
            raise ValueError(f"sample: shape must be non-negative, got {tuple(shape)}")
        like = torch.empty(sample_shape, dtype=self._dtype(), device=self._mean.device)
        noise = _prng.normal_like(_key_bits(key, "sample"), like)
        return noise * self._scale + self._mean

    def log_prob(self, x: Any) -> torch.Tensor:
        """The log density of ``x``, summed over the parameter axes (the trailing ones).

        ``log p(x) = Σ −½((x − loc)/σ)² − log σ − ½ log 2π`` with ``σ = exp(log_scale)``.

        Args:
            x: values of shape ``(*batch, *param_shape)`` (or broadcastable to it).

        Returns:
            A tensor of shape ``batch`` (0-d for a single point).
        """
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=self._dtype())
        z = (x - self._mean) / self._scale
        log_prob = -0.5 * z * z - self._log_scale - _HALF_LOG_TWO_PI
        if not self._param_shape:  # a scalar distribution: nothing to sum (sum(dim=()) is all)
            return log_prob
        return log_prob.sum(dim=tuple(range(-len(self._param_shape), 0)))

    def entropy(self) -> torch.Tensor:
        """The differential entropy ``Σ ½ + ½ log 2π + log σ`` over the parameter axes (0-d).

        Not in optax (an addition): the closed form of the sum of the marginal entropies.
        """
        per_dim = torch.broadcast_to(self._log_scale, self._param_shape) + (0.5 + _HALF_LOG_TWO_PI)
        return per_dim.sum()

    @property
    def log_scale(self) -> torch.Tensor:
        """The log standard deviation, as given (not broadcast)."""
        return self._log_scale

    @property
    def params(self) -> list[torch.Tensor]:
        """``[loc, log_scale]``, as given (not broadcast)."""
        return [self._mean, self._log_scale]


def multi_normal(loc: Any, log_scale: Any) -> MultiNormalDiagFromLogScale:
    """A diagonal multivariate normal from its mean and log standard deviation.

    Args:
        loc: the mean (tensor or array-like).
        log_scale: the log standard deviation, broadcastable with ``loc``.

    Returns:
        A :class:`MultiNormalDiagFromLogScale` over ``broadcast_shapes(loc, log_scale)``.

    Raises:
        ValueError: the shapes do not broadcast.

    Example:
        >>> import torch
        >>> from functrain.optim.random_utils import multi_normal
        >>> mean, log_scale = multi_normal(torch.ones(2), torch.zeros(2)).params
        >>> mean
        tensor([1., 1.])
    """
    return MultiNormalDiagFromLogScale(loc=loc, log_scale=log_scale)
