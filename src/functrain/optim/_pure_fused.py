"""The pure path of recognised AdamW chains through the fused kernel, out of place.

``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)`` (optionally after
``clip_by_global_norm``) run member by member costs about ten full passes over memory and
seven fresh tensors per leaf: each ``torch._foreach_*`` op is a pass, and every member must
allocate its result because it cannot know its input is a temporary. Here the chain's update is
formed in one ``torch._fused_adamw_`` pass instead, on tensors that belong to the result:

* the new moments are clones of the old ones, updated by the kernel (the inputs are untouched);
* the kernel's "parameters" are the updates themselves: started at ``c · p`` with
  ``c = −lr·wd / (1 − lr·wd)``, the kernel's decoupled decay ``u ← u·(1 − lr·wd)`` turns them
  into ``−lr·wd·p``, and its Adam step then subtracts ``lr · m̂ / (√v̂ + eps)``.

So ``u = −lr·(m̂/(√v̂ + eps) + wd·p)``, the member-by-member numbers to rounding (the kernel
orders a few float operations differently, as :mod:`functrain.optim.fused`'s ``"kernel"``
engine does). Anything else (other chains, tensor learning rates, ``found_inf``...) returns
``None`` and the chain runs its members.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import Any

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, fused
from functrain.optim._fused_engines import _call, _clip_inputs, _groups, _match
from functrain.optim._utils import safe_increment

# Switch for tests that want the member-by-member numbers as a reference.
ENABLED = True

_SHAPE = attrgetter("shape")
_REQUIRES_GRAD = attrgetter("requires_grad")


def _rebuild(like: Any, leaves: list[torch.Tensor]) -> Any:
    """``like``'s structure with ``leaves`` (the fast path for plain containers)."""
    if _ops.plain_leaves(like) is not None:
        return _ops.plain_rebuild(like, leaves)
    return tree.unflatten(tree.structure(like), leaves)


def _updates(ops: list[fused.Op], ctx: fused.Context) -> list[torch.Tensor] | None:
    job = _match(ops, ctx)
    if job is None or job.kind != "adamw" or isinstance(job.lr, torch.Tensor):
        return None
    core = job.core
    assert core is not None
    mu_l, nu_l = core.leaves["mu"], core.leaves["nu"]  # in tree order (fused._state_leaves)
    if torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, chain(mu_l, nu_l))):
        return None  # moments of an earlier tracked step: differentiated, no kernel
    lr = float(job.lr)
    if 1 - lr * job.wd == 0:
        return None
    grads, grad_scale = _clip_inputs(job.clip, ctx, None, False)
    count = safe_increment(core.state.count)
    # Clones keep each tensor's strides, as the kernels and the moments' layout want; one
    # foreach call per list saves a Python dispatch per leaf.
    mu = list(torch._foreach_clone(mu_l))
    nu = list(torch._foreach_clone(nu_l))
    out: list[Any] = [None] * ctx.n
    for (device, _dtype, decays), idx in _groups(job, ctx).items():
        wd = job.wd if decays else 0.0
        ps = [ctx.p[i] for i in idx]
        if wd:
            with torch.no_grad():  # constants here (see update): no graph from nn.Parameters
                us = list(torch._foreach_mul(ps, _ops.cpu_number(-lr * wd / (1 - lr * wd), ps)))
        else:
            us = [torch.zeros_like(p) for p in ps]
        on = {
            "wd": wd,
            "lr": lr,
            "grad_scale": None if grad_scale is None else grad_scale.to(device),
            "found_inf": None,
            "step": count.to(device, torch.float64 if device.type == "cpu" else torch.float32),
        }
        states = [[mu[i] for i in idx], [nu[i] for i in idx]]
        if not job.uniform and any(
            u.stride() != p.stride() or t[k].stride() != p.stride()
            for k, (u, p) in enumerate(zip(us, ps))
            for t in states
        ):
            return None  # the kernels pair elements by one flat index (see _leaf_ok)
        _call(job, on, us, [grads[i] for i in idx], states)
        for i, u in zip(idx, us):
            out[i] = u
    state = core.state
    core.new_state = state._replace(
        count=count, mu=_rebuild(state.mu, mu), nu=_rebuild(state.nu, nu)
    )
    return out


def update(tx: Any, updates: Any, state: Any, params: Any) -> tuple[Any, Any] | None:
    """``tx.update(updates, state, params)`` through the fused kernel, or ``None``.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain.optim import _pure_fused
        >>> tx = ft.adamw(0.1)
        >>> params = [torch.ones(2)]
        >>> u, state = _pure_fused.update(tx, [torch.ones(2)], tx.init(params), params)
        >>> u
        [tensor([-0.1000, -0.1000])]
    """
    if not ENABLED or params is None or torch.compiler.is_compiling():
        return None
    if torch._C._are_functorch_transforms_active():
        return None  # vmap, grad...: the fused kernel has no batching rule nor derivative
    if not all(fused.spec_of(t) is not None for t in getattr(fused.spec_of(tx), "members", ())):
        return None  # a member without a spec: not recognisable, skip the planning
    ctx = fused.Context(updates, params, None)
    if not ctx.same_structure or ctx.n == 0:
        return None
    if list(map(_SHAPE, ctx.g)) != ctx.shapes:
        return None  # the members name the mismatch
    if _foreach.differentiated(ctx.g, ctx.p):
        # Differentiating through the update: the kernels have no derivative. Tracked moments
        # are refused in ``_updates``, tracked hyperparameters (``adam(lr_tensor)``, injected
        # ones, a schedule's value) by the plan (``_fused_engines._number``). Params that
        # merely require grad (``nn.Parameter``s in a torch-style loop) are constants: the
        # kernel path serves them too.
        return None
    made = fused.plan(tx, state, ctx)
    if made is None:
        return None
    leaves = _updates(made.ops, ctx)
    if leaves is None:
        return None
    return _rebuild(updates, leaves), made.build()
