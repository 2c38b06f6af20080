"""Private fused leaf-list arithmetic whose scalars may be Python numbers or 0-d tensors.

``torch._foreach_*`` ops take Python scalars everywhere, but a 0-d tensor only in some
overloads (and ``alpha=tensor`` silently reads it on the host). These helpers pick an overload
that keeps tensor hyperparameters on the device, so changing one in place neither recompiles a
``torch.compile``-d step nor synchronises with the device.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain import _foreach, tree
from functrain.optim import _utils

Scalar = float | int | torch.Tensor


def plain_leaves(x: Any) -> list[torch.Tensor] | None:
    """``tree.leaves(x)`` for a plain ``list``, ``tuple`` or ``dict`` of plain tensors, else None.

    The fast path of the hot pure updates: optree spends about a microsecond per leaf, which
    is a noticeable share of an update over hundreds of small tensors. Dict leaves come in
    sorted-key order, as optree gives them.
    """
    kind = type(x)
    if kind is dict:
        try:
            values = [x[k] for k in sorted(x)]
        except TypeError:  # unsortable keys: optree's insertion order, left to optree
            return None
    elif kind is list or kind is tuple:
        values = list(x)
    else:
        return None
    # One set of types is ~2.5x faster than a per-leaf generator over hundreds of leaves.
    return values if not values or set(map(type, values)) == {torch.Tensor} else None


def same_container(a: Any, b: Any) -> bool:
    """Whether two containers accepted by :func:`plain_leaves` have the same structure."""
    if type(a) is not type(b) or len(a) != len(b):
        return False
    return type(a) is not dict or a.keys() == b.keys()


def plain_rebuild(like: Any, leaves: list[torch.Tensor]) -> Any:
    """``tree.unflatten(tree.structure(like), leaves)`` for a container of ``plain_leaves``."""
    kind = type(like)
    if kind is dict:
        by_key = dict(zip(sorted(like), leaves))
        return {k: by_key[k] for k in like}  # optree keeps the insertion order
    return leaves if kind is list else tuple(leaves)


def is_zero(value: Any) -> bool:
    """True for a Python number equal to 0 (tensors are never treated as known zeros)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def on_device(value: Scalar, like: torch.Tensor) -> Scalar:
    """Moves a tensor scalar to ``like``'s device (numbers pass through)."""
    if isinstance(value, torch.Tensor) and value.device != like.device:
        return value.to(like.device)
    return value


def cpu_number(value: Scalar, xs: list[torch.Tensor]) -> Scalar:
    """A Python number as a 0-d tensor of the leaves' dtype when they are float32/float64 CPU
    tensors of one dtype, else ``value`` as is.

    The CPU ``torch._foreach_*`` ops wrap a Python scalar into a fresh tensor for every leaf:
    with hundreds of small leaves that costs more than the arithmetic (0.89 vs 0.53 ms for a
    multiply of 400 leaves of 2,000 floats). A 0-d tensor of the leaves' own dtype gives the
    same bits; one of another dtype would take a slower mixed-dtype loop.

    Example:
        >>> import torch
        >>> cpu_number(0.5, [torch.ones(3)])
        tensor(0.5000)
        >>> cpu_number(0.5, [torch.ones(3, dtype=torch.bfloat16)])
        0.5
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not xs:
        return value
    if torch.compiler.is_compiling():  # compiled code has no per-leaf wrapping to avoid
        return value
    dtype = xs[0].dtype
    if dtype not in (torch.float32, torch.float64) or not xs[0].is_cpu:
        return value
    if not all(x.dtype == dtype for x in xs):
        return value
    return torch.tensor(value, dtype=dtype)


def mul(xs: list[torch.Tensor], s: Scalar) -> list[torch.Tensor]:
    """``[x * s]``, each in ``x``'s dtype."""
    if not xs:
        return []
    return _keep_dtypes(_foreach.mul(xs, on_device(cpu_number(s, xs), xs[0])), xs, s)


def div(xs: list[torch.Tensor], s: Scalar) -> list[torch.Tensor]:
    """``[x / s]``, each in ``x``'s dtype."""
    if not xs:
        return []
    return _keep_dtypes(_foreach.div(xs, on_device(cpu_number(s, xs), xs[0])), xs, s)


def add_scaled(xs: list[torch.Tensor], a: Scalar, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[x + a * y]``, each in ``x``'s dtype."""
    if not xs:
        return []
    if isinstance(a, torch.Tensor):
        scaled = _foreach.mul(ys, on_device(a, xs[0]))
        return _keep_dtypes(_foreach.add(xs, scaled), xs, a)
    return list(_foreach.add(xs, ys, alpha=a))


def add(xs: list[torch.Tensor], s: Scalar) -> list[torch.Tensor]:
    """``[x + s]``, each in ``x``'s dtype, without reading a tensor ``s`` on the host.

    ``torch._foreach_add(xs, t)`` resolves a 0-d tensor ``t`` as a Python scalar and reads it
    (a device sync on CUDA, every step); the ``Tensor`` overload, called by name, does not.
    """
    if not xs:
        return []
    if isinstance(s, torch.Tensor):
        out = _foreach.add_tensor(xs, on_device(s, xs[0]))
        return _like(list(out), xs)
    return list(_foreach.add(xs, cpu_number(s, xs)))


def add_(xs: list[torch.Tensor], s: Scalar) -> None:
    """``x += s`` for every ``x``, without reading a tensor ``s`` on the host (see :func:`add`)."""
    if not xs:
        return
    if not isinstance(s, torch.Tensor):
        _foreach.add_(xs, cpu_number(s, xs))
        return
    s = on_device(s, xs[0])
    if all(x.dim() or x.dtype == s.dtype for x in xs):
        _foreach.add_tensor_(xs, s)
    else:  # a 0-d leaf would be promoted to ``s``'s dtype, which in place cannot hold
        _foreach.copy_(xs, add(xs, s))


def sqrt(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[√x]`` as new tensors; when they may be differentiated (:func:`functrain._foreach.
    may_write` false), with derivative 0 instead of ∞ where ``x`` is exactly 0.

    A second moment that is exactly 0 (a leaf whose gradients were all 0) has a zero numerator
    beside it, so the update's true derivative there is 0; ``√``'s infinite slope times that
    zero made every derivative through the update NaN (as in optax). Values are unchanged
    (negative inputs still give NaN).
    """
    if _foreach.may_write(xs):
        return list(_foreach.sqrt(xs))
    return [safe_sqrt(x) for x in xs]


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``√x`` with derivative 0 instead of ∞ where ``x`` is exactly 0 (a double ``where``):
    the same values, negative inputs included (NaN)."""
    return torch.where(x == 0, 0, torch.sqrt(torch.where(x == 0, 1, x)))


def add_fresh(xs: list[torch.Tensor], s: Scalar) -> list[torch.Tensor]:
    """``[x + s]`` written into ``xs``, the caller's own temporaries, unless they may be
    differentiated (:func:`functrain._foreach.may_write`): then a new list, as autograd refuses
    the in-place write of a saved tensor (``sqrt``'s result). Returns the list to use."""
    return _foreach.maybe_in_place(_foreach.may_write(xs, s), add_, add, xs, s)


def lerp(start: list[torch.Tensor], end: list[torch.Tensor], weight: Scalar) -> list[torch.Tensor]:
    """``[torch.lerp(a, b, weight)]`` without reading a tensor ``weight`` on the host.

    ``torch._foreach_lerp`` has no overload for one tensor weight (a 0-d tensor would be read
    as a Python scalar); its list overload takes one per leaf, in the leaf's dtype.
    """
    if not start:
        return []
    if not isinstance(weight, torch.Tensor):
        return list(_foreach.lerp(start, end, weight))
    return list(_foreach.lerp(start, end, _per_leaf(weight, start)))


def lerp_(start: list[torch.Tensor], end: list[torch.Tensor], weight: Scalar) -> None:
    """In-place :func:`lerp`."""
    if not start:
        return
    if not isinstance(weight, torch.Tensor):
        _foreach.lerp_(start, end, weight)
    else:
        _foreach.lerp_(start, end, _per_leaf(weight, start))


def _per_leaf(value: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``value`` on the leaves' device, once per leaf in its dtype (one cast per dtype)."""
    value = on_device(value, like[0])
    by_dtype: dict[torch.dtype, torch.Tensor] = {}
    out = []
    for x in like:
        cast = by_dtype.get(x.dtype)
        if cast is None:
            cast = by_dtype[x.dtype] = value.to(x.dtype)
        out.append(cast)
    return out


def _keep_dtypes(out: Any, xs: list[torch.Tensor], s: Scalar) -> list[torch.Tensor]:
    """Casts back leaves that a 0-d tensor scalar promoted (optax keeps every leaf's dtype).

    Type promotion treats a 0-d leaf and a 0-d scalar alike, so a 0-d float32 parameter times a
    float64 bias correction (or schedule value) would come out float64; larger leaves never do.
    """
    out = list(out)
    if isinstance(s, torch.Tensor):
        return _like(out, xs)
    return out


def _like(xs: list[torch.Tensor], likes: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[x.to(y.dtype)]`` without a dispatcher call per leaf when no cast is needed."""
    if all(x.dtype == y.dtype for x, y in zip(xs, likes)):
        return list(xs)
    return [x.to(y.dtype) for x, y in zip(xs, likes)]


def moment(g: list[torch.Tensor], m: list[torch.Tensor], decay: Scalar) -> list[torch.Tensor]:
    """Exponential moving average ``(1 - decay) * g + decay * m`` (optax ``update_moment``).

    Computed as ``torch.lerp(m, g, 1 - decay)``, the form ``torch.optim`` uses.
    """
    if not g:
        return []
    return lerp(_like(m, g), g, 1 - on_device(decay, g[0]))


def moment_sq(g: list[torch.Tensor], v: list[torch.Tensor], decay: Scalar) -> list[torch.Tensor]:
    """``decay * v + (1 - decay) * |g|²`` (optax ``update_moment_per_elem_norm`` of order 2).

    A complex leaf gets ``|g|² = g·conj(g)``, not ``g·g``, as optax's ``abs_sq``: its moment
    stays in the leaf's complex dtype with a zero imaginary part.
    """
    if not g:
        return []
    if any(x.is_complex() for x in g):
        return _by_kind(g, v, lambda gs, vs: moment_sq(gs, vs, decay), _complex_moment(decay))
    decay = on_device(decay, g[0])
    v = _like(v, g)
    if isinstance(decay, torch.Tensor):
        out = mul(v, decay)
        w = _foreach.may_write(out, g, decay)
        return _foreach.maybe_in_place(w, _foreach.add_, _foreach.add, out, scaled_square(g, decay))
    out = list(_foreach.mul(v, cpu_number(decay, v)))
    w = _foreach.may_write(out, g)
    return _foreach.maybe_in_place(w, _foreach.addcmul_, _foreach.addcmul, out, g, g, 1 - decay)


def _complex_moment(decay: Scalar) -> Any:
    """The per-leaf complex branch of :func:`moment_sq` for :func:`_by_kind`."""

    def fn(gs: list[torch.Tensor], vs: list[torch.Tensor]) -> list[torch.Tensor]:
        d = on_device(decay, gs[0])
        return [(v.real * d + (1 - d) * abs_sq(x)).to(x.dtype) for x, v in zip(gs, vs)]

    return fn


def _by_kind(
    xs: list[torch.Tensor], ys: list[torch.Tensor], real_fn: Any, complex_fn: Any
) -> list[torch.Tensor]:
    """``real_fn`` on the real leaves of ``xs`` (with their partners in ``ys``), ``complex_fn``
    on the complex ones, merged back in order: real leaves keep their fused, bitwise path."""
    out: list[Any] = [None] * len(xs)
    for want_complex, fn in ((False, real_fn), (True, complex_fn)):
        idx = [i for i, x in enumerate(xs) if x.is_complex() == want_complex]
        if idx:
            for i, r in zip(idx, fn([xs[i] for i in idx], [ys[i] for i in idx])):
                out[i] = r
    return out


def abs_sq(x: torch.Tensor) -> torch.Tensor:
    """``|x|²`` in ``x``'s real dtype (optax ``numerics.abs_sq``); ``x·x`` for a real ``x``.

    For a complex ``x`` the sum of the squared parts: ``x·conj(x)`` may carry a rounding error
    in its imaginary part where the multiply is fused.
    """
    if x.is_complex():
        return torch.view_as_real(x.resolve_conj()).square().sum(-1)  # no view of a conj view
    return x * x


def add_abs_sq(acc: list[torch.Tensor], g: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[a + |x|²]``, each in ``a``'s dtype (``addcmul`` for real leaves)."""
    if not any(x.is_complex() for x in g):
        return list(_foreach.addcmul(acc, g, g))
    return [(a + abs_sq(x)).to(a.dtype) for a, x in zip(acc, g)]


def sub_abs_sq(acc: list[torch.Tensor], mu: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[a − |m|²]`` (a centred second moment), each in ``a``'s dtype."""
    if not any(m.is_complex() for m in mu):
        return list(_foreach.sub(acc, _foreach.mul(mu, mu)))
    return [(a - abs_sq(m)).to(a.dtype) for a, m in zip(acc, mu)]


def maximum(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """Elementwise ``max(x, y)``; complex moments (zero imaginary parts) by their real parts.

    JAX orders complex numbers lexicographically, which is the same on such moments; torch
    has no complex ``maximum``. The result has the promoted dtype of each pair.
    """
    if not any(t.is_complex() for t in (*xs, *ys)):
        return list(_foreach.maximum(xs, ys))
    return [
        torch.maximum(x.real, y.real).to(torch.promote_types(x.dtype, y.dtype))
        for x, y in zip(xs, ys)
    ]


def sign(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[sign(x)]``; for a complex ``x`` its phase ``x / |x|`` (``torch.sgn``, NumPy's sign)."""
    if not any(x.is_complex() for x in xs):
        return list(_foreach.sign(xs)) if xs else []
    return [torch.sgn(x) if x.is_complex() else torch.sign(x) for x in xs]


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of a complex ``dtype`` (``dtype`` itself when real)."""
    return _REAL.get(dtype, dtype)


_REAL = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def scaled_square(g: list[torch.Tensor], decay: torch.Tensor) -> list[torch.Tensor]:
    """``(1 − decay)·g·g`` in that order (``addcmul``'s), each in ``g``'s dtype: ``g·g`` first
    overflows float32 from ``|g| ≈ 1.8e19`` where the product does not."""
    sq = mul(g, 1 - decay)
    return _foreach.maybe_in_place(_foreach.may_write(sq, g), _foreach.mul_, _foreach.mul, sq, g)


def scalar(value: Scalar, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d tensor with ``like``'s dtype and device."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def cast(xs: list[torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
    """Casts each tensor to ``dtype`` (``None`` keeps them)."""
    if dtype is None:
        return xs
    return [x.to(dtype) for x in xs]


def cast_like(xs: list[torch.Tensor], likes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Casts each tensor to the dtype of its partner in ``likes``."""
    return _like(xs, likes)


def unshared(out: list[torch.Tensor], kept: list[torch.Tensor]) -> list[torch.Tensor]:
    """``out`` with a copy of each tensor that is its partner in ``kept`` (the new state's).

    The updates belong to the caller, and PyTorch code changes them in place (``u.mul_(-lr)``,
    ``p.add_(u)``-style loops): were they the state's own tensors (a momentum returned as
    the update), that would silently change the optimizer state too.
    """
    return [o.clone() if o is k else o for o, k in zip(out, kept)]


def check_decay(
    name: str, value: Any, *, allow_one: bool = False, allow_schedule: bool = False
) -> None:
    """Validates a Python-number decay rate: finite and in ``[0, 1)`` (``[0, 1]`` if allowed).

    Tensor values and schedules are not inspected (that would read device memory); a tensor's
    shape is metadata and must be 0-d. NumPy scalars are numbers; a bool is refused (``b1=True``
    would mean a decay of 1, whose bias correction divides by zero). A schedule is refused
    unless the transform evaluates it (``allow_schedule``): elsewhere it failed at the first
    update inside torch's arithmetic, naming nothing.
    """
    check_scalar_tensor(name, value)
    if isinstance(value, torch.Tensor):
        return
    if callable(value):
        if allow_schedule:
            return
        refuse_schedule(name, value)
    if not _utils.is_real_number(value):
        kinds = (
            "a number, a 0-d tensor or a schedule" if allow_schedule else "a number or a 0-d tensor"
        )
        raise TypeError(f"{name} must be {kinds}, got {value!r}")
    upper_ok = value <= 1 if allow_one else value < 1
    if not (value >= 0 and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def refuse_schedule(name: str, value: Any) -> None:
    """Refuses a schedule for a hyperparameter the transform takes as a fixed value."""
    if callable(value) and not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a number or a 0-d tensor, not a schedule: this transform takes "
            f"a fixed value (ft.inject_hyperparams(factory)(..., {name}=schedule) evaluates a "
            "schedule at every step and passes the value)"
        )


def check_scalar_tensor(name: str, value: Any) -> None:
    """Refuses a tensor hyperparameter that is not 0-d: a shaped one would broadcast against
    the leaves (or fail deep inside an update) instead of being one number."""
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        raise ValueError(
            f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}"
        )


def state_zeros(params: Any, dtype: torch.dtype | None, name: str) -> Any:
    """``tree.zeros_like(params, dtype=dtype)`` for a state dtype such as ``mu_dtype``.

    A real ``dtype`` for complex parameters would store only the moments' real parts (the
    imaginary parts silently dropped at every update), so it is refused, naming the leaf.
    """
    if dtype is not None and not dtype.is_complex:
        paths, leaves, _ = tree.flatten_with_paths(params)
        for path, x in zip(paths, leaves):
            if isinstance(x, torch.Tensor) and x.is_complex():
                raise ValueError(
                    f"{name}={dtype} is real but {tree.path_str(path, 'params')} is "
                    f"{x.dtype}: the moments would lose their imaginary parts; use a complex "
                    "dtype (e.g. torch.complex128) or None"
                )
    return tree.zeros_like(params, dtype=dtype)


def check_dtype(name: str, dtype: Any) -> None:
    """Validates an optional state dtype (``mu_dtype``, ``accumulator_dtype``, …).

    An integer dtype would silently truncate the moment it stores (``0.1·g`` becomes 0).
    """
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype or None, got {dtype!r}")
    if not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"{name} must be a floating-point dtype, got {dtype}")


def scalar_dtype(leaves: list[torch.Tensor]) -> torch.dtype:
    """The dtype for per-step scalars such as bias corrections: float64 where available.

    ``torch.optim`` computes them in Python doubles; doing the same keeps float32 runs on the
    same side of thresholds (e.g. RAdam's ``ρₜ ≥ 5``). MPS has no float64, so float32 there.
    """
    if any(x.device.type == "mps" for x in leaves):
        return torch.float32
    return torch.float64
