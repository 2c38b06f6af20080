"""Differentiable approximations of functions by random perturbations, as
``optax.perturbations`` (0.2.8).

:func:`make_perturbed_fun` turns a function ``f`` (possibly piecewise constant, such as an
argmax) into the Monte Carlo estimate of its smoothed version
``f_σ(x) = E_{z ∼ μ}[f(x + σ z)]``, whose gradient (by ``torch.autograd.grad``,
``Tensor.backward`` or ``torch.func.grad``/``jacrev``/``jacfwd``/``vmap``) is the unbiased
score-function estimate ``E[(f(x + σ z) − b) · (−∇ log μ(z)) / σ]``, ``b`` the baseline
``f(x)`` or 0. Only values of ``f`` are used, never its derivatives. The noise ``μ`` is
:class:`Gumbel` (the default; with an argmax, ``f_σ`` is ``softmax(x / σ)``) or
:class:`Normal`, or any object with optax's ``sample(key, sample_shape, dtype)`` and
``log_prob(inputs)`` methods.

Keys are functrain keys: a 0-d ``int64`` CPU tensor (:func:`functrain.random_key`,
:func:`functrain.split_key`) or an integer seed meaning ``ft.random_key(seed)``. The built-in
samplers are counter-based (:mod:`functrain.optim._prng`): reproducible from the key alone, the
same on CPU and CUDA up to the last bit of ``log``/``cos``, drawn on the target device, with no
host synchronization.

Differences from optax: keys are functrain keys, and the draws differ from JAX's; ``sample``
takes an extra keyword-only ``device`` (default: the key's device); the perturbed function
draws each input leaf's ``num_samples`` noises in one ``noise.sample`` call with ``sample_shape
= (num_samples, *leaf.shape)`` (leaf ``i`` with key ``tree_split_key_like(key, inputs)``'s leaf
``i``) where optax splits the key per sample first; ``fun`` is batched over the samples with
``torch.func.vmap``, as optax's ``jax.vmap``, so it must be ``vmap``-able (``None`` leaves of
its input and output are skipped, as optax's); the log-densities are summed, and the magic box
computed, in at least float32 (in float16 the sum overflowed and the box's gradient cancelled),
the result keeping optax's dtype.

Example:
    A perturbed argmax with Gumbel noise approaches ``softmax(x / σ)``, and is differentiable.

    >>> import torch, functrain as ft
    >>> import functrain.perturbations as perturbations
    >>> def argmax(x):
    ...     return torch.nn.functional.one_hot(x.argmax(), x.shape[0]).to(x.dtype)
    >>> x = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    >>> soft_argmax = perturbations.make_perturbed_fun(argmax, num_samples=20_000, sigma=1.0)
    >>> y = soft_argmax(ft.random_key(0), x)
    >>> bool((y - torch.softmax(x, 0)).abs().max() < 0.02)
    True
    >>> (g,) = torch.autograd.grad(y[2], x)
    >>> g.shape
    torch.Size([3])
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from functrain import tree as _tree
from functrain._precision import HALF as _HALF
from functrain.optim import _prng
from functrain.tree._random import (
    _float_dtype,
    _key32,
    _standard_normal,
    _takes_device,
)
from functrain.tree._random import split_key_like as tree_split_key_like

__all__ = ["Gumbel", "Normal", "make_perturbed_fun"]


class Normal:
    """The standard normal distribution, with optax's ``sample`` and ``log_prob``.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain.perturbations import Normal
        >>> z = Normal().sample(ft.random_key(0), (10_000,))
        >>> bool(z.mean().abs() < 0.05), bool((z.var() - 1).abs() < 0.05)
        (True, True)
        >>> Normal().log_prob(torch.tensor([1.0, 2.0]))
        tensor([-0.5000, -2.0000])
    """

    def sample(
        self,
        key: torch.Tensor | int,
        sample_shape: Sequence[int] = (),
        dtype: Any = float,
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Standard-normal samples (truncated at about ±6.66; counter-based, no host sync).

        Args:
            key: a functrain key (a 0-d integer tensor) or an integer seed.
            sample_shape: the shape of the result.
            dtype: a floating torch dtype; ``float`` (default) means torch's default dtype.
            device: where to draw; ``None`` (default) draws on the key's device.

        Returns:
            A tensor of ``sample_shape`` and ``dtype``, a deterministic function of ``key``.

        Raises:
            TypeError: ``dtype`` is not floating, or ``key`` is not a key or an integer.
        """
        return _standard_normal(key, sample_shape, dtype, device=device)

    def log_prob(self, inputs: torch.Tensor) -> torch.Tensor:
        """The log-density up to its constant: ``−inputs² / 2`` (elementwise)."""
        return -0.5 * inputs**2


def _gumbel_from_bits(bits: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """Standard Gumbel values ``−log(−log u)`` of ``u = (bits + ½) / 2³²`` in the open (0, 1).

    ``u`` is never 0 or 1. ``−log u`` is computed as ``−log1p(−(1 − u))`` above ½ with
    ``1 − u`` taken from the integers (``(2³² − bits − ½) / 2³²``): in float32, ``u`` itself
    rounds to 1 for the top 2⁸ values of ``bits`` and would give ``+inf``. The values lie in
    about ``[−3.13, 22.87]``.
    """
    u = (bits.to(compute) + 0.5) * 2.0**-32
    one_minus_u = ((_prng.MASK32 - bits).to(compute) + 0.5) * 2.0**-32
    # The clamp only guards the branch torch.where discards (log1p(-1) = -inf).
    neg_log_u = torch.where(u < 0.5, -torch.log(u), -torch.log1p(-one_minus_u.clamp(max=0.5)))
    return -torch.log(neg_log_u)


def _gumbel(key: Any, shape: Sequence[int], dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Standard Gumbel samples of ``shape`` from 32-bit hashes of (key, element index)."""
    key32 = _key32(key, device)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    numel = 1
    for size in shape:
        numel *= int(size)
    index = torch.arange(numel, dtype=torch.int64, device=key32.device)
    key32 = _prng.mix32(key32 ^ _prng.mix32(0x6A09E667))  # a stream apart from normal's
    if numel > _prng.MASK32:  # indices beyond 32 bits: fold the high part into the key
        key32 = _prng.mix32(key32 ^ (index >> 32))
        index = index & _prng.MASK32
    bits = _prng.mix32(_prng.mix32((index + key32) & _prng.MASK32) ^ key32)
    return _gumbel_from_bits(bits, compute).reshape(tuple(shape)).to(dtype)


class Gumbel:
    """The standard Gumbel distribution, with optax's ``sample`` and ``log_prob``.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain.perturbations import Gumbel
        >>> g = Gumbel().sample(ft.random_key(0), (10_000,), torch.float64)
        >>> bool((g.mean() - 0.5772).abs() < 0.05)  # the Euler-Mascheroni constant
        True
        >>> Gumbel().log_prob(torch.tensor([0.0]))
        tensor([-1.])
    """

    def sample(
        self,
        key: torch.Tensor | int,
        sample_shape: Sequence[int] = (),
        dtype: Any = float,
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Standard Gumbel samples, ``−log(−log u)`` for uniform ``u`` (counter-based).

        Args:
            key: a functrain key (a 0-d integer tensor) or an integer seed.
            sample_shape: the shape of the result.
            dtype: a floating torch dtype; ``float`` (default) means torch's default dtype.
            device: where to draw; ``None`` (default) draws on the key's device.

        Returns:
            A tensor of ``sample_shape`` and ``dtype``, finite (about ``[−3.1, 22.9]``), a
            deterministic function of ``key``.

        Raises:
            TypeError: ``dtype`` is not floating, or ``key`` is not a key or an integer.
        """
        dtype = _float_dtype(dtype, "Gumbel.sample")
        return _gumbel(key, sample_shape, dtype, device)

    def log_prob(self, inputs: torch.Tensor) -> torch.Tensor:
        """The log-density ``−inputs − exp(−inputs)`` (elementwise)."""
        return -inputs - torch.exp(-inputs)


def _wide_sum(log_prob: torch.Tensor) -> torch.Tensor:
    """Each row's sum, accumulated and returned in float32 for half-precision densities."""
    return log_prob.sum(1, dtype=torch.float32) if log_prob.dtype in _HALF else log_prob.sum(1)


def _check(num_samples: Any, noise: Any) -> None:
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, numbers.Integral)
        or num_samples < 1
    ):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    for method in ("sample", "log_prob"):
        if not callable(getattr(noise, method, None)):
            raise TypeError(
                f"noise must have sample and log_prob methods (like Gumbel()), "
                f"{type(noise).__name__} has no {method}"
            )


def make_perturbed_fun(
    fun: Callable[[Any], Any],
    num_samples: int = 1000,
    sigma: float | torch.Tensor = 0.1,
    noise: Any = Gumbel(),  # noqa: B008 (optax's default: a stateless instance)
    use_baseline: bool = True,
) -> Callable[[torch.Tensor | int, Any], Any]:
    """A differentiable Monte Carlo approximation of ``fun`` by random perturbations.

    The returned ``perturbed(key, inputs)`` draws ``z_1 … z_n`` (``n = num_samples``) from
    ``noise`` and returns ``(1/n) Σ_i f(x + σ z_i)``, an unbiased estimate of
    ``f_σ(x) = E_z[f(x + σ z)]``. It is built, as optax's, with the "magic box"
    ``□_i = exp(l_i − stop_grad(l_i))`` of DiCE (Foerster et al., 2018), where
    ``l_i = Σ log_prob((y_i − x) / σ)`` over every element of every leaf and ``y_i`` the
    detached perturbed input::

        perturbed(key, x) = (1/n) Σ_i [□_i f(y_i) + (1 − □_i) b]

    with the baseline ``b = f(stop_grad(x))`` if ``use_baseline`` else 0. Its value is the plain
    average (``□ = 1``); its gradient in ``x`` is the score-function estimate
    ``(1/n) Σ_i (f(y_i) − b) (−∇ log_prob(z_i)) / σ``, and higher derivatives are unbiased
    estimates too. ``fun`` is only evaluated, never differentiated.

    Args:
        fun: a function from a pytree of tensors to a pytree of tensors; it is batched over the
            samples with ``torch.func.vmap`` (so no ``.item()`` or data-dependent Python
            control flow), and called once more on ``x`` for the baseline.
        num_samples: the number of perturbed evaluations averaged, a positive int.
        sigma: the scale of the perturbation (a float or a 0-d tensor).
        noise: an object with ``sample(key, sample_shape, dtype)`` and ``log_prob(inputs)``,
            like :class:`Gumbel` (default) or :class:`Normal`. ``sample`` is called once per
            input leaf with ``sample_shape = (num_samples, *leaf.shape)`` and the leaf's dtype
            (and ``device=`` the leaf's device if it takes a ``device`` keyword); ``log_prob``
            is elementwise.
        use_baseline: subtract ``f(x)`` in the gradient estimate (variance reduction; it does
            not change the value).

    Returns:
        ``perturbed(key, inputs)``: ``key`` a functrain key (0-d ``int64`` CPU tensor) or an
        integer seed, ``inputs`` a pytree of floating tensors; it returns a pytree of
        ``fun``'s output structure, each leaf averaged over the samples. The same key gives the
        same samples.

    Raises:
        ValueError: ``num_samples`` is not a positive int (at construction).
        TypeError: ``noise`` lacks ``sample`` or ``log_prob`` (at construction); a leaf of
            ``inputs`` is not a floating tensor (at the call, named by path).

    Example:
        >>> import torch, functrain as ft
        >>> import functrain.perturbations as perturbations
        >>> relu_sum = lambda x: torch.relu(x).sum()
        >>> fn = perturbations.make_perturbed_fun(relu_sum, 1_000, 0.1)
        >>> x = torch.zeros(3)
        >>> grad = torch.func.grad(fn, argnums=1)(ft.random_key(0), x)
        >>> grad.shape
        torch.Size([3])
    """
    _check(num_samples, noise)
    with_device = _takes_device(noise.sample)

    def perturbed(key: torch.Tensor | int, inputs: Any) -> Any:
        paths, leaves, spec = _tree.flatten_with_paths(inputs)
        for path, leaf in zip(paths, leaves):
            if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                got = leaf.dtype if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                raise TypeError(
                    f"make_perturbed_fun: {_tree.path_str(path, 'inputs')} must be a floating "
                    f"tensor, got {got}"
                )
        if not leaves:  # nothing to perturb: f_σ is f
            return fun(inputs)
        keys = _tree.leaves(tree_split_key_like(key, inputs))
        shifted, log_probs = [], []
        for leaf, leaf_key in zip(leaves, keys):
            shape = (num_samples, *leaf.shape)
            if with_device:
                z = noise.sample(leaf_key, shape, leaf.dtype, device=leaf.device)
            else:
                z = noise.sample(leaf_key, shape, leaf.dtype)
            z = torch.as_tensor(z).to(leaf.device)
            # y = x + σz is a constant; z is recomputed from it as (y − x)/σ so that the log
            # density, and through it the magic box, depends on x.
            y = (leaf.detach() + sigma * z).detach()
            log_probs.append(noise.log_prob((y - leaf) / sigma).reshape(num_samples, -1))
            shifted.append(y)
        box_dtype = functools.reduce(torch.promote_types, [lp.dtype for lp in log_probs])
        # The box in at least float32: a float16 sum of log-densities over ~10⁵ elements
        # overflowed to -inf and exp(-inf - (-inf)) made the value and the gradient NaN; and the
        # gradient reaching a float16 box, (f(y) - b) / n, was the float16 difference of two
        # rounded terms, which cancels when f(y) is close to b (a zero gradient).
        log_prob = sum(_wide_sum(lp) for lp in log_probs)
        box = torch.exp(log_prob - log_prob.detach())
        out_spec: list[Any] = []

        def flat_fun(*flat: torch.Tensor) -> tuple[Any, ...]:
            # vmapped over flat leaves, with flat outputs: torch.func.vmap refuses None inputs
            # and outputs (optax's jax.vmap skips them) and knows nothing of containers
            # registered with functrain.tree only.
            out_leaves, spec_out = _tree.flatten(fun(_tree.unflatten(spec, list(flat))))
            out_spec.append(spec_out)
            return tuple(out_leaves)

        outputs = torch.func.vmap(flat_fun)(*shifted)
        if use_baseline:
            baseline = _tree.leaves(fun(_tree.map(torch.Tensor.detach, inputs)))
        else:
            baseline = [None] * len(outputs)

        def average(out: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
            weight = box.reshape(num_samples, *([1] * (out.dim() - 1)))
            estimate = weight * out
            if base is not None:
                estimate = estimate + (1 - weight) * base
            # The dtype of optax's result (a box of the densities' dtype times the output).
            return estimate.mean(0).to(torch.promote_types(box_dtype, out.dtype))

        return _tree.unflatten(out_spec[0], [average(o, b) for o, b in zip(outputs, baseline)])

    return perturbed
