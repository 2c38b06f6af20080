"""``torch._foreach_*`` kernels that also run under ``torch.func`` transforms.

The foreach kernels have no batching rule: under ``torch.func.vmap`` (an ensemble of models,
a hyperparameter sweep: ``vmap(tx.update)``) they fail with "Batching rule not implemented for
aten::_foreach_add.List". Each wrapper here calls its kernel unchanged unless a functorch
transform is active, the only cost then being one bool check; under a transform it loops over
the leaves with the per-tensor op, which gives the same numbers (the CPU foreach kernels' own
slow path is that loop) and which every transform supports.

Arguments follow the kernels: a list or tuple is zipped with the leaves, anything else (a Python
number, a 0-d tensor) is passed to every leaf; ``addcmul``/``addcdiv`` also take a 1-d tensor of
per-leaf scalars. ``torch.compile`` traces the kernels themselves (no transform is active while
it traces an unbatched function).

Example:
    >>> import torch
    >>> from functrain import _foreach
    >>> torch.func.vmap(lambda x: _foreach.add([x], [x])[0])(torch.ones(2, 1))
    tensor([[2.],
            [2.]])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from functrain import _func_transforms

__all__: list[str] = []  # internal

_transforms_active = torch._C._are_functorch_transforms_active
_grad_enabled = torch.is_grad_enabled


def may_write(*values: Any) -> bool:
    """Whether temporaries computed from ``values`` may be written in place.

    False while they may be differentiated: a ``torch.func`` ``grad``/``jvp`` is active, or
    autograd records (grad mode on) and some tensor among ``values`` (tensors, lists of them,
    anything else ignored) requires grad. Writing a temporary in place then fails the backward
    pass when an op saved it (``sqrt`` saves its result), so callers take the out-of-place op.
    Otherwise in place keeps the fast path's speed and its numbers bit for bit.

    Example:
        >>> import torch
        >>> from functrain import _foreach
        >>> _foreach.may_write([torch.ones(2)], 0.5)
        True
        >>> _foreach.may_write([torch.ones(2, requires_grad=True)])
        False
    """
    # Dynamo cannot trace the functorch interpreter stack; compiled code is functionalized
    # anyway, and its transforms' wrapped tensors report ``requires_grad`` below.
    if _transforms_active() and not torch.compiler.is_compiling():
        return not _func_transforms.differentiating()
    if not _grad_enabled():
        return True
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                return False
        elif isinstance(v, (list, tuple)):
            for x in v:
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    return False
    return True


def differentiated(grads: Any, params: Any = ()) -> bool:
    r"""Whether an update of ``grads`` (a list of tensors) at ``params`` is differentiated.

    True under a differentiating ``torch.func`` transform, or when autograd records (grad mode
    on) and a gradient requires grad (``create_graph=True``: MAML, gradcheck) or a parameter
    that is not an ``nn.Parameter`` does (a plain tensor made to require grad, the result of a
    previous differentiable step). ``nn.Parameter``\ s do not count: the torch-style loop
    ``tx.update(grads, state, dict(net.named_parameters()))`` outside ``no_grad`` is not
    differentiated, as ``torch.optim`` treats a module's weights as constants. Tracked tensor
    hyperparameters need no signal here: their graphs are kept regardless.

    Example:
        >>> import torch
        >>> from functrain import _foreach
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> _foreach.differentiated([torch.ones(2)], [p])
        False
        >>> _foreach.differentiated([torch.ones(2, requires_grad=True)], [p])
        True
    """
    if _transforms_active() and not torch.compiler.is_compiling():
        return _func_transforms.differentiating()
    if not _grad_enabled():
        return False
    return any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads) or any(
        isinstance(p, torch.Tensor) and p.requires_grad and not isinstance(p, torch.nn.Parameter)
        for p in params
    )


def constants(grads: Any, xs: list[Any]) -> list[Any]:
    r"""``xs`` (parameters or a copy of the initial ones) detached when autograd would record
    them but the update of ``grads`` is not :func:`differentiated`, else ``xs`` itself.

    Without it, a torch-style loop whose params are ``nn.Parameter``\ s built a graph through
    every update that uses them (weight decay, distances from the initial point): the state
    then chained one step's graph into the next (memory growing with the steps) and took the
    slow out-of-place paths. Detaching loses no derivative w.r.t. anything else.

    Example:
        >>> import torch
        >>> from functrain import _foreach
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> _foreach.constants([torch.ones(2)], [p])[0].requires_grad
        False
    """
    if not _grad_enabled() or not any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs):
        return xs
    if differentiated(grads, xs):
        return xs
    return [x.detach() if isinstance(x, torch.Tensor) else x for x in xs]


def _tracked_scalar(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a tensor scalar argument (not a list of leaves) requires grad under autograd."""
    for a in (*args[1:], *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return _grad_enabled()
    return False


def _norm(x: torch.Tensor, ord: float = 2, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.linalg.vector_norm(x, ord, dtype=dtype)


def _pointwise(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op`` with ``addcmul``'s positional ``value`` (the foreach kernels' 4th argument)."""

    def per_tensor(x: Any, a: Any, b: Any, value: Any = 1) -> Any:
        return op(x, a, b, value=value)

    return per_tensor


def _loop(op: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """``[op(*column_i)]`` over the leaves: lists are zipped, other arguments broadcast."""
    n = len(args[0])
    columns = [a if isinstance(a, (list, tuple)) else [a] * n for a in args]
    keyed = {k: v if isinstance(v, (list, tuple)) else [v] * n for k, v in kwargs.items()}
    return [op(*(c[i] for c in columns), **{k: v[i] for k, v in keyed.items()}) for i in range(n)]


def _column(args: Any, i: int) -> Any:
    """Leaf ``i`` of each list in ``args`` (a tuple or a dict), as a 1-leaf list."""
    if isinstance(args, dict):
        return {k: v[i : i + 1] if isinstance(v, (list, tuple)) else v for k, v in args.items()}
    return tuple(a[i : i + 1] if isinstance(a, (list, tuple)) else a for a in args)


def _number_like(s: torch.Tensor) -> bool | int | float | complex:
    """A Python number of ``s``'s kind, for the dtype a ``Scalar`` argument promotes to."""
    if s.is_complex():
        return 1j
    if s.is_floating_point():
        return 1.0
    return True if s.dtype == torch.bool else 1


def _scalar_loop(
    op: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[Any]:
    """``_loop`` for a ``Scalar`` overload given a 0-d tensor, which the kernel reads as a number.

    A number never promotes a leaf within its kind, but a 0-d tensor beside a 0-d leaf does
    (``float32`` + ``float64`` gives ``float64``), and beside an integer leaf it gives its own
    dtype rather than the default one. So 0-d leaves go through as 1-element tensors, and the
    scalar takes the dtype a number would give an integer leaf.
    """
    n = len(args[0])
    out = []
    for i in range(n):
        x = args[0][i]
        a = [c[i] if isinstance(c, (list, tuple)) else c for c in args]
        k = {key: v[i] if isinstance(v, (list, tuple)) else v for key, v in kwargs.items()}
        if not (x.is_floating_point() or x.is_complex()):
            for j, s in enumerate(a[1:], 1):
                if isinstance(s, torch.Tensor) and s.dim() == 0 and not isinstance(args[j], list):
                    a[j] = s.to(torch.result_type(x, _number_like(s)))
        if x.dim() == 0:
            a = [t.unsqueeze(0) if isinstance(c, (list, tuple)) else t for c, t in zip(args, a)]
            out.append(op(*a, **k).squeeze(0))
        else:
            out.append(op(*a, **k))
    return out


def _wrap(
    kernel: Callable[..., Any],
    op: Callable[..., Any],
    *,
    scalars_at: int = -1,
    number_scalars: bool = False,
) -> Any:
    """``kernel`` outside functorch transforms, a per-leaf loop of ``op`` inside them (and for a
    tensor scalar that requires grad: the kernels' derivatives fail for it).

    ``op`` is the out-of-place per-tensor op; an in-place kernel's results are copied into its
    first list (several in-place ops, e.g. ``addcmul_`` and ``lerp_``, have no batching rule).
    ``scalars_at``: the position of an argument that may be a 1-d tensor of per-leaf scalars.
    ``number_scalars``: the kernel's overload for a lone scalar takes a ``Scalar``, so a 0-d
    tensor there acts as a Python number (``add``, ``sub``, ``lerp``; ``mul`` and ``div`` have
    a ``Tensor`` overload that promotes as the per-tensor op does).
    """
    name = kernel.__name__  # "_foreach_add_", or "_foreach_add_.Tensor" for an overload
    in_place = name.split(".")[0].endswith("_")

    def call(*args: Any, **kwargs: Any) -> Any:
        # A 1-d tensor of per-leaf scalars has no derivative formula at all ("derivative for
        # aten::_foreach_addcmul is not implemented"), even when only the leaves require grad.
        if (
            not _transforms_active()
            and not _tracked_scalar(args, kwargs)
            and not (
                0 <= scalars_at < len(args)
                and isinstance(args[scalars_at], torch.Tensor)
                and not may_write(*args[:scalars_at])
            )
        ):
            return kernel(*args, **kwargs)
        if 0 <= scalars_at < len(args):
            s = args[scalars_at]
            if isinstance(s, torch.Tensor) and s.dim() == 1:
                args = (*args[:scalars_at], list(s.unbind(0)), *args[scalars_at + 1 :])
        wrapped = number_scalars and any(
            isinstance(a, torch.Tensor) and a.dim() == 0 for a in (*args[1:], *kwargs.values())
        )
        loop = _scalar_loop if wrapped else _loop
        if not in_place:
            return loop(op, args, kwargs)
        # One leaf at a time, each written before the next is read: a leaf listed twice (tied
        # weights) then gets both updates, as from the kernel.
        for i, x in enumerate(args[0]):
            (y,) = loop(op, _column(args, i), _column(kwargs, i))
            # The kernel refuses what ``copy_`` would silently truncate (2.5 into an int);
            # ``_foreach_copy_`` itself converts.
            if op is not _second and not torch.can_cast(y.dtype, x.dtype):
                raise RuntimeError(
                    f"result type {y.dtype} can't be cast to the desired output type {x.dtype}"
                )
            x.copy_(y)
        return None

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``{name}``, or a per-leaf loop under functorch transforms."
    return call


def _second(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y


add = _wrap(torch._foreach_add, torch.add, number_scalars=True)
add_ = _wrap(torch._foreach_add_, torch.add, number_scalars=True)
# The ``Tensor`` overloads by name: a 0-d tensor scalar is then not read on the host.
add_tensor = _wrap(torch.ops.aten._foreach_add.Tensor, torch.add)
add_tensor_ = _wrap(torch.ops.aten._foreach_add_.Tensor, torch.add)
sub = _wrap(torch._foreach_sub, torch.sub, number_scalars=True)
mul = _wrap(torch._foreach_mul, torch.mul)
mul_ = _wrap(torch._foreach_mul_, torch.mul)
div = _wrap(torch._foreach_div, torch.div)
div_ = _wrap(torch._foreach_div_, torch.div)
maximum = _wrap(torch._foreach_maximum, torch.maximum)
lerp = _wrap(torch._foreach_lerp, torch.lerp, number_scalars=True)
lerp_ = _wrap(torch._foreach_lerp_, torch.lerp, number_scalars=True)
addcmul = _wrap(torch._foreach_addcmul, _pointwise(torch.addcmul), scalars_at=3)
addcmul_ = _wrap(torch._foreach_addcmul_, _pointwise(torch.addcmul), scalars_at=3)
addcdiv = _wrap(torch._foreach_addcdiv, _pointwise(torch.addcdiv), scalars_at=3)
addcdiv_ = _wrap(torch._foreach_addcdiv_, _pointwise(torch.addcdiv), scalars_at=3)
sqrt = _wrap(torch._foreach_sqrt, torch.sqrt)
sqrt_ = _wrap(torch._foreach_sqrt_, torch.sqrt)
abs = _wrap(torch._foreach_abs, torch.abs)  # shadows the builtin here only: the kernel's name
sign = _wrap(torch._foreach_sign, torch.sign)
clone = _wrap(torch._foreach_clone, torch.clone)
copy_ = _wrap(torch._foreach_copy_, _second)
zero_ = _wrap(torch._foreach_zero_, torch.zeros_like)
norm = _wrap(torch._foreach_norm, _norm)


def maybe_in_place(
    in_place: bool,
    op_: Callable[..., Any],
    op: Callable[..., Any],
    xs: list[torch.Tensor],
    *args: Any,
    **kwargs: Any,
) -> list[torch.Tensor]:
    """``op_(xs, ...)`` on a caller's own temporaries when ``in_place``, else ``op(xs, ...)``.

    Returns the list to use from then on. ``in_place`` is a :func:`may_write` of what the
    temporaries were computed from: the in-place wrappers themselves always write in place (the
    in-step engines update their state that way by design).

    Example:
        >>> import torch
        >>> from functrain import _foreach
        >>> xs = [torch.ones(2)]
        >>> _foreach.maybe_in_place(True, _foreach.add_, _foreach.add, xs, 1.0) is xs
        True
    """
    if in_place:
        op_(xs, *args, **kwargs)
        return xs
    return list(op(xs, *args, **kwargs))
