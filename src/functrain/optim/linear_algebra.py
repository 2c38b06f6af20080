"""Linear algebra for optimizers, as optax's ``nnls``, ``power_iteration`` and
``matrix_inverse_pth_root``.

No function reads a value back to the host, so all of them can sit inside a compiled step:
iteration counts are Python ints (they fix the length of the loop), and where optax leaves a
``lax.while_loop`` early once an error tolerance is met, these run every iteration and freeze
the converged values with ``torch.where`` — the same result, at the cost of the remaining
iterations' arithmetic.

Differences from optax: ``precision`` is accepted (a :class:`Precision` or its name) and
ignored: matrix products follow PyTorch's ``torch.set_float32_matmul_precision`` (``"highest"``
by default, optax's default ``Precision.HIGHEST``). ``power_iteration``'s default start vector is
uniform in ``[-1, 1]`` as optax's, from a functrain key (default key ``0``) instead of JAX's
``PRNGKey(0)``, so its values differ. ``matrix_inverse_pth_root`` computes in the matrix's dtype
(float32 for half precision; optax: always float32) and returns its ``error`` as a 0-d tensor
(optax: the int ``0`` for a 1 × 1 matrix). ``nnls`` ignores ``unroll``.

Example:
    >>> import torch
    >>> from functrain.optim.linear_algebra import power_iteration
    >>> eig, vec = power_iteration(torch.diag(torch.tensor([3.0, 1.0])))
    >>> round(float(eig), 4)
    3.0
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Callable
from typing import Any

import torch

from functrain import tree as _tree
from functrain.optim.random_utils import _key_bits, uniform_like

# Precision is a stand-in for jax.lax.Precision (the default of an ignored argument): an
# attribute of this module, not a top-level name.
__all__ = ["matrix_inverse_pth_root", "nnls", "power_iteration"]


class Precision(enum.Enum):
    """Stand-in for ``jax.lax.Precision`` (accepted and ignored, see the module docstring).

    Example:
        >>> from functrain.optim.linear_algebra import Precision
        >>> Precision.HIGHEST.value
        'highest'
    """

    DEFAULT = "default"
    HIGH = "high"
    HIGHEST = "highest"


def _check_precision(precision: Any, who: str) -> None:
    names = {p.value for p in Precision} | {p.name for p in Precision}
    if precision is None or isinstance(precision, Precision):
        return
    if isinstance(precision, str) and precision in names:
        return
    if type(precision).__name__ == "Precision":  # jax.lax.Precision from ported code
        return
    raise ValueError(f"{who}: precision must be a Precision or one of {sorted(names)}")


def _check_iters(value: Any, name: str, who: str) -> int:
    if isinstance(value, (torch.Tensor, bool)):
        raise TypeError(
            f"{who}: {name} must be a Python int (it fixes the loop length without a host "
            f"read), got {type(value).__name__}"
        )
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{who}: {name} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{who}: {name} must be non-negative, got {value}")
    return value


def _square_float(matrix: Any, who: str) -> torch.Tensor:
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{who}: matrix must be a tensor, got {type(matrix).__name__}")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{who}: matrix must be square 2-d, got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise TypeError(f"{who}: matrix must be floating point, got {matrix.dtype}")
    return matrix


def _norm(v: Any) -> torch.Tensor:
    # A plain vector skips the pytree machinery (it dominates tracing under torch.compile).
    return torch.linalg.vector_norm(v) if isinstance(v, torch.Tensor) else _tree.norm(v)


def _normalize(v: Any) -> Any:
    return v * (1.0 / _norm(v)) if isinstance(v, torch.Tensor) else _tree.scale(1.0 / _norm(v), v)


def _vdot(x: Any, y: Any) -> torch.Tensor:
    return (
        torch.vdot(x.reshape(-1), y.reshape(-1))
        if isinstance(x, torch.Tensor)
        else _tree.vdot(x, y)
    )


def _residual_norm(z: Any, eig: torch.Tensor, v: Any) -> torch.Tensor:
    if isinstance(z, torch.Tensor):
        return _norm(z - eig * v)
    return _norm(_tree.sub(z, _tree.scale(eig, v)))


def _select(active: torch.Tensor, new: Any, old: Any) -> Any:
    if isinstance(new, torch.Tensor):
        return torch.where(active, new, old)
    return _tree.where(active, new, old)


def power_iteration(
    matrix: torch.Tensor | Callable[[Any], Any],
    *,
    v0: Any = None,
    num_iters: int = 100,
    error_tolerance: float | torch.Tensor = 1e-6,
    precision: Precision | str = Precision.HIGHEST,
    key: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Any]:
    """The dominant eigenvalue (largest in magnitude) and its eigenvector, by power iteration.

    ``v ← A v / ‖A v‖`` repeatedly; the eigenvalue estimate is ``λ = ⟨v, A v⟩``. Iteration stops
    changing the result once ``|‖A v − λ v‖ / λ| < error_tolerance`` (optax leaves its loop
    then; here the remaining iterations run and keep the converged values: no host read).

    Args:
        matrix: a square ``(n, n)`` tensor, or a function computing the matrix-vector product
            on a pytree (then ``v0`` is required and gives the pytree's structure).
        v0: the start vector (a ``(n,)`` tensor, or a pytree for a callable ``matrix``). Default:
            uniform in ``[-1, 1]`` drawn from ``key``.
        num_iters: the number of iterations, a Python int.
        error_tolerance: the relative residual below which the estimate is final.
        precision: accepted for optax compatibility and ignored.
        key: a functrain key (0-d integer tensor) or int seed for the default ``v0``; ``None``
            means key ``0``.

    Returns:
        ``(eigenvalue, eigenvector)``: a 0-d tensor and a unit-norm vector (or pytree).

    Raises:
        ValueError: ``matrix`` is callable and ``v0`` is ``None``, or ``matrix`` is not square.
        TypeError: ``num_iters`` is not a Python int, or ``matrix`` is not floating point.

    Example:
        >>> import torch
        >>> from functrain.optim.linear_algebra import power_iteration
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> eig, vec = power_iteration(lambda v: {"x": a @ v["x"]}, v0={"x": torch.ones(2)})
        >>> round(float(eig), 4), vec["x"]
        (3.0, tensor([0.7071, 0.7071]))
    """
    who = "power_iteration"
    num_iters = _check_iters(num_iters, "num_iters", who)
    _check_precision(precision, who)
    if callable(matrix):
        mvp = matrix
        if v0 is None:
            raise ValueError(f"{who}: v0 must be provided when `matrix` is a callable.")
    else:
        matrix = _square_float(matrix, who)
        mvp = lambda v: matrix @ v  # noqa: E731
        if v0 is None:
            like = torch.empty(matrix.shape[-1:], dtype=matrix.dtype, device=matrix.device)
            v0 = uniform_like(_key_bits(0 if key is None else key, who), like, -1.0, 1.0)
    eigvec = _normalize(v0)
    z = mvp(eigvec)
    eig = torch.zeros_like(_vdot(eigvec, z))
    for _ in range(num_iters):
        residual = _residual_norm(z, eig, eigvec)
        active = ~(torch.abs(residual / eig) < error_tolerance)
        new_eigvec = _normalize(z)
        new_z = mvp(new_eigvec)
        new_eig = _vdot(new_eigvec, new_z)
        eigvec = _select(active, new_eigvec, eigvec)
        z = _select(active, new_z, z)
        eig = torch.where(active, new_eig, eig)
    return eig, _normalize(z)


def _mat_power(mat: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """``mat ** 2**k`` with ``k = round(log2 p)`` clamped to ``0..3`` (optax's ``lax.switch``)."""
    if not isinstance(p, torch.Tensor):
        k = min(max(round(math.log2(p)), 0), 3)
        for _ in range(k):
            mat = mat @ mat
        return mat
    k = torch.clamp(torch.round(torch.log2(p.to(mat.dtype))), 0, 3)
    out = mat
    for level in range(1, 4):  # a tensor p: every power, then a select (no host read)
        mat = mat @ mat
        out = torch.where(k >= level, mat, out)
    return out


def matrix_inverse_pth_root(
    matrix: torch.Tensor,
    p: int | torch.Tensor,
    num_iters: int = 100,
    ridge_epsilon: float | torch.Tensor = 1e-6,
    error_tolerance: float | torch.Tensor = 1e-6,
    precision: Precision | str = Precision.HIGHEST,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(matrix + ε I)^(−1/p)`` of a symmetric PSD matrix, by coupled Newton iterations.

    With ``α = −1/p``, ``ε = ridge_epsilon · max(λ_max, 1e-16)`` (``λ_max`` by 100 power
    iterations), ``z = (1 + p) / (2 ‖A + εI‖_F)``, ``M₀ = z (A + εI)``, ``H₀ = z^(1/p) I``::

        Mᵢ' = (1 − α) I + α Mᵢ;   Mᵢ₊₁ = (Mᵢ')^p Mᵢ;   Hᵢ₊₁ = Hᵢ Mᵢ'

    (Higham, *Functions of Matrices*, eq. 7.18) until ``max |Mᵢ − I| ≤ error_tolerance``, or the
    error grows by more than 1.2× (then the previous ``H`` is returned), or ``num_iters``.
    ``(Mᵢ')^p`` is computed by repeated squaring for ``p ∈ {1, 2, 4, 8}``; as optax, another
    ``p`` uses the power ``2^round(log2 p)`` (clamped to 1…8) in that product. The early exits
    are expressed with ``torch.where`` (every iteration runs; no host read).

    Args:
        matrix: a symmetric positive semi-definite ``(n, n)`` floating tensor.
        p: the root, a positive int (or a tensor).
        num_iters: the maximum number of iterations, a Python int.
        ridge_epsilon: the relative ridge making the matrix positive definite.
        error_tolerance: the ``max |M − I|`` at which iteration stops.
        precision: accepted for optax compatibility and ignored.

    Returns:
        ``(root, error)``: ``matrix^(−1/p)`` in ``matrix``'s dtype and the final
        ``max |M − I|`` (0-d; ``0`` for a 1 × 1 matrix, computed in closed form).

    Raises:
        ValueError: ``matrix`` is not square 2-d, or a Python ``p`` is not positive.
        TypeError: ``num_iters`` is not a Python int, or ``matrix`` is not floating point.

    Example:
        >>> import torch
        >>> from functrain.optim.linear_algebra import matrix_inverse_pth_root
        >>> root, error = matrix_inverse_pth_root(torch.diag(torch.tensor([4.0, 16.0])), 2)
        >>> root.diagonal()
        tensor([0.5000, 0.2500])
    """
    who = "matrix_inverse_pth_root"
    matrix = _square_float(matrix, who)
    num_iters = _check_iters(num_iters, "num_iters", who)
    _check_precision(precision, who)
    if not isinstance(p, torch.Tensor) and not p > 0:
        raise ValueError(f"{who}: p must be a positive integer, got {p}")
    out_dtype = matrix.dtype
    compute = torch.promote_types(matrix.dtype, torch.float32)
    a = matrix.to(compute)
    n = a.shape[0]
    alpha = -1.0 / p
    identity = torch.eye(n, dtype=compute, device=a.device)
    max_ev, _ = power_iteration(a, num_iters=100, error_tolerance=1e-6, precision=precision)
    ridge = ridge_epsilon * torch.clamp(max_ev, min=1e-16)
    if n == 1:
        root = (a + ridge) ** alpha
        return root.to(out_dtype), torch.zeros((), dtype=compute, device=a.device)
    damped = a + ridge * identity
    z = (1 + p) / (2 * torch.linalg.matrix_norm(damped))
    mat_m = damped * z
    error = torch.amax(torch.abs(mat_m - identity))
    mat_h = identity * z ** (1.0 / p)
    old_mat_h = mat_h
    run_step = torch.ones((), dtype=torch.bool, device=a.device)
    for _ in range(num_iters):
        active = (error > error_tolerance) & run_step
        mat_m_i = (1 - alpha) * identity + alpha * mat_m
        new_mat_m = _mat_power(mat_m_i, p) @ mat_m
        new_mat_h = mat_h @ mat_m_i
        new_error = torch.amax(torch.abs(new_mat_m - identity))
        # The error may grow for an iteration before converging: up to 1.2x is tolerated.
        new_run_step = new_error < error * 1.2
        old_mat_h = torch.where(active, mat_h, old_mat_h)
        mat_m = torch.where(active, new_mat_m, mat_m)
        mat_h = torch.where(active, new_mat_h, mat_h)
        error = torch.where(active, new_error, error)
        run_step = torch.where(active, new_run_step, run_step)
    error = torch.amax(torch.abs(mat_m - identity))
    root = torch.where(run_step, mat_h, old_mat_h)
    return root.to(out_dtype), error


def _spectral_radius_upper_bound(matrix: torch.Tensor) -> torch.Tensor:
    """``min(‖Q‖_F, ‖Q‖₁)``, both upper bounds on the spectral radius."""
    if matrix.numel() == 0:
        return torch.zeros((), dtype=matrix.dtype, device=matrix.device)
    frobenius = torch.linalg.matrix_norm(matrix, ord="fro")
    return torch.minimum(frobenius, torch.linalg.matrix_norm(matrix, ord=1))


def nnls(
    A: torch.Tensor,
    b: torch.Tensor,
    iters: int,
    unroll: int | bool = 1,
    L: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-negative least squares ``min ‖A x − b‖₂ s.t. x ≥ 0``, by fast projected gradient.

    Polyak (2015)'s accelerated projected gradient on ``½ xᵀQx − qᵀx`` with ``Q = AᵀA``,
    ``q = Aᵀb``, step ``1/L``; from ``x₀ = p₀ = 0``, ``c₀ = 0``::

        cₖ₊₁ = (1 + √(1 + 4cₖ²)) / 2;   sₖ = (cₖ − 1) / cₖ₊₁
        xₖ₊₁ = max(pₖ − (Q pₖ − q) / L, 0);   pₖ₊₁ = xₖ₊₁ + sₖ (xₖ₊₁ − xₖ)

    The momentum coefficients depend on ``k`` only, so they are Python floats: no host read.

    Args:
        A: the ``(M, N)`` matrix.
        b: the ``(M,)`` vector or ``(M, K)`` matrix of right-hand sides (solved column-wise).
        iters: the number of iterations, a Python int.
        unroll: accepted for optax compatibility (``lax.scan``'s unroll) and ignored.
        L: an upper bound on the spectral radius of ``AᵀA``; default ``min(‖Q‖_F, ‖Q‖₁)``.
            ``0`` is replaced by 1.

    Returns:
        ``x`` of shape ``(N,)`` or ``(N, K)``.

    Raises:
        ValueError: ``A`` is not 2-d, ``b`` is not 1-d or 2-d, or their rows differ.
        TypeError: ``iters`` is not a Python int.

    Example:
        >>> import torch
        >>> from functrain.optim.linear_algebra import nnls
        >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> b = torch.tensor([5.0, 6.0])
        >>> nnls(A, b, 1000)
        tensor([0.0000, 1.7000])
    """
    who = "nnls"
    iters = _check_iters(iters, "iters", who)
    if not isinstance(A, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{who}: A and b must be tensors")
    if A.dim() != 2:
        raise ValueError(f"{who}: A must be 2-d (M, N), got shape {tuple(A.shape)}")
    if b.dim() not in (1, 2) or b.shape[0] != A.shape[0]:
        raise ValueError(
            f"{who}: b must have shape (M,) or (M, K) with M = A.shape[0] = {A.shape[0]}, got "
            f"{tuple(b.shape)}"
        )
    dtype = torch.promote_types(A.dtype, b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    A, b = A.to(dtype), b.to(dtype)
    Q = A.mT @ A
    q = A.mT @ b
    if L is None:
        L = _spectral_radius_upper_bound(Q)
    L = torch.as_tensor(L, dtype=dtype, device=A.device)
    L = torch.where(L == 0, torch.ones_like(L), L)
    x = torch.zeros(A.shape[-1:] + b.shape[1:], dtype=dtype, device=b.device)
    p, c = x, 0.0
    for _ in range(iters):
        cn = (1 + math.sqrt(1 + 4 * c**2)) / 2
        s = (c - 1) / cn
        xn = torch.clamp(p - (Q @ p - q) / L, min=0)
        p = xn + s * (xn - x)
        x, c = xn, cn
    return x
