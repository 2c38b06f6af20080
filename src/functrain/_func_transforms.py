"""Which ``torch.func`` transforms a call runs under (internal).

Per-sample gradients and train steps take other routes under an outer transform: ``vmap`` over
an ensemble's parameters batches them, ``grad``/``jvp`` differentiate them. Reading the
functorch interpreter stack is metadata only (no tensor is touched).

Example:
    >>> import torch
    >>> from functrain import _func_transforms
    >>> _func_transforms.differentiating()
    False
    >>> torch.func.grad(lambda x: x * float(_func_transforms.differentiating()))(torch.ones(()))
    tensor(1.)
"""

from __future__ import annotations

import torch

__all__: list[str] = []  # internal

_DIFFERENTIATING = ("Grad", "Jvp")


def active() -> bool:
    """Whether any ``torch.func`` transform (vmap, grad, jvp...) is active."""
    return torch._C._are_functorch_transforms_active()


def differentiating() -> bool:
    """Whether an active ``torch.func`` transform differentiates the call (grad, jvp...)."""
    # Dynamo cannot trace the interpreter stack; a compiled step never runs under a transform.
    if torch.compiler.is_compiling() or not active():
        return False
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(level.key().name in _DIFFERENTIATING for level in stack)


def detach(x: torch.Tensor) -> torch.Tensor:
    """``x.detach()``, except under a differentiating transform: a loss or aux metric then stays
    a function of the transform's inputs (``torch.func.grad`` of a step's ``loss`` metric, as
    ``jax.grad`` of a train step's loss), where ``detach`` made its derivative silently 0."""
    return x if differentiating() else x.detach()
