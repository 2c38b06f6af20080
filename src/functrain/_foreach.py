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

__all__: list[str] = []  # internal

_transforms_active = torch._C._are_functorch_transforms_active


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


def _wrap(kernel: Callable[..., Any], op: Callable[..., Any], *, scalars_at: int = -1) -> Any:
    """``kernel`` outside functorch transforms, a per-leaf loop of ``op`` inside them.

    ``op`` is the out-of-place per-tensor op; an in-place kernel's results are copied into its
    first list (several in-place ops, e.g. ``addcmul_`` and ``lerp_``, have no batching rule).
    ``scalars_at``: the position of an argument that may be a 1-d tensor of per-leaf scalars.
    """
    name = kernel.__name__  # "_foreach_add_", or "_foreach_add_.Tensor" for an overload
    in_place = name.split(".")[0].endswith("_")

    def call(*args: Any, **kwargs: Any) -> Any:
        if not _transforms_active():
            return kernel(*args, **kwargs)
        if 0 <= scalars_at < len(args):
            s = args[scalars_at]
            if isinstance(s, torch.Tensor) and s.dim() == 1:
                args = (*args[:scalars_at], list(s.unbind(0)), *args[scalars_at + 1 :])
        out = _loop(op, args, kwargs)
        if not in_place:
            return out
        for x, y in zip(args[0], out):
            x.copy_(y)
        return None

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``{name}``, or a per-leaf loop under functorch transforms."
    return call


def _second(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y


add = _wrap(torch._foreach_add, torch.add)
add_ = _wrap(torch._foreach_add_, torch.add)
# The ``Tensor`` overloads by name: a 0-d tensor scalar is then not read on the host.
add_tensor = _wrap(torch.ops.aten._foreach_add.Tensor, torch.add)
add_tensor_ = _wrap(torch.ops.aten._foreach_add_.Tensor, torch.add)
sub = _wrap(torch._foreach_sub, torch.sub)
mul = _wrap(torch._foreach_mul, torch.mul)
mul_ = _wrap(torch._foreach_mul_, torch.mul)
div = _wrap(torch._foreach_div, torch.div)
div_ = _wrap(torch._foreach_div_, torch.div)
maximum = _wrap(torch._foreach_maximum, torch.maximum)
lerp = _wrap(torch._foreach_lerp, torch.lerp)
lerp_ = _wrap(torch._foreach_lerp_, torch.lerp)
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
