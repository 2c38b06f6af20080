"""Fusion specs: in-place fused updates for optimizers built from known primitives.

``tx.update`` is pure: it never writes into its inputs, so every step allocates the new moments,
the updates and (with ``apply_updates``) the new parameters. A train step that *owns* the state
it consumes (``donate=True``) may instead update that state's own tensors in place. This module
lets it do so without giving up composition: optimizers stay ordinary chains of transforms, and
the in-place path is derived from what the chain is made of.

**Specs.** A factory that builds a primitive attaches a small description of itself, a *fusion
spec*, to the transform it returns: ``return register(GradientTransformation(init, update),
ScaleByAdam(b1, b2, eps, ...))``. The registry is a ``WeakKeyDictionary`` keyed by the ``update``
function object (a ``GradientTransformation`` is a tuple, which cannot be weakly referenced), so
specs cost nothing and vanish with their transform. Composite transforms register composite
specs (:class:`Chain`, :class:`NamedChain`, :class:`Masked`, :class:`Injected` for
``inject_hyperparams``, :class:`Partition`) that point at their members. A transform without a
spec (a user's own, or a wrapper such as ``MultiSteps``) makes the whole optimizer "not
recognised", and the caller uses the pure path. Wrappers that cannot be fused
(``apply_if_finite``, ``zero_nans``) register :class:`Opaque` specs, for inspection only:
:func:`spec_of` hides them, so to the planner they are transforms without a spec.

**Plans.** :func:`update_in_place` walks the spec tree together with the optimizer state into a
flat list of primitive operations, each on a subset of the parameter leaves (masks and
partition labels give subsets; the ops of one partition group carry the group's leaves), plus a
function that rebuilds the state tree. Nothing is evaluated or written while
planning, so the choice of engine (below) is made before any tensor changes.

**Layout.** This module holds the entry point, :func:`update_in_place`. The specs and
:func:`register` live in ``functrain.optim._fused_specs``, the planner (:class:`Context`,
:func:`plan`) in ``functrain.optim._fused_plan``; both are re-exported here, so factories and
engines keep reaching them as ``fused.X``.

**Engines** (:mod:`functrain.optim._fused_engines`):

* ``"kernel"``: optimizers of the shapes ``[clip_by_global_norm] [add_decayed_weights]
  scale_by_adam [add_decayed_weights] scale_by_learning_rate`` (adam, adamw, coupled-decay Adam)
  and ``[clip_by_global_norm] [add_decayed_weights] [trace] scale_by_learning_rate`` (sgd,
  momentum, Nesterov) run ``torch._fused_adam_`` / ``_fused_adamw_`` / ``_fused_sgd_`` on the
  state's tensors, grouped by device, dtype and weight-decay mask. A ``partition`` whose every
  group has such a shape (after an optional global ``clip_by_global_norm``) runs them group by
  group, as ``torch.optim`` does its parameter groups. The clipping factor is folded
  into the kernel's ``grad_scale`` (or applied to the gradients first), the learning rate may be
  a number, a tensor or a schedule (the kernels take a tensor ``lr``), and a ``found_inf`` flag
  skips the update on the device (the counters then stay as they were). The numbers equal the
  pure path's to rounding (the kernels order a few operations differently). SGD with momentum
  0, SGD on float16/bfloat16 CPU leaves (whose CPU kernel is broken in torch 2.13), and a
  float64 learning-rate tensor on an accelerator with float64 leaves (the kernels would round
  it to float32) are left to ``"foreach"``.
* ``"foreach"``: any recognised optimizer (Nesterov Adam, ``eps_root``, masks anywhere, tensor
  hyperparameters on an accelerator, ...) runs the pure path's own ``torch._foreach_*``
  arithmetic, with the moments updated in place and temporaries reused: bit-for-bit the pure
  path's numbers, with a fraction of its allocations. It cannot skip on ``found_inf``.

Counters advance exactly as in the pure path (saturating int32 ``count``), and the new state has
the pure path's structure and types, so states move freely between the paths and checkpoints.

Example:
    >>> import torch, functrain as ft
    >>> from functrain.optim import fused
    >>> tx = ft.adamw(1e-2, weight_decay=1e-2)
    >>> params = {"w": torch.ones(3)}
    >>> state = tx.init(params)
    >>> u, pure_state = tx.update({"w": torch.ones(3)}, state, params)
    >>> done = fused.update_in_place(tx, {"w": torch.ones(3)}, tx.init(params), params)
    >>> done.engine, torch.allclose(params["w"], 1 + u["w"])
    ('kernel', True)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim._fused_plan import (  # noqa: F401
    _DTYPE,
    _MASK_CACHE,
    _SHAPE,
    _STATE_FIELDS,
    Context,
    Op,
    Plan,
    _collect,
    _mask_subset,
    _state_leaves,
    _updates_view,
    plan,
)
from functrain.optim._fused_specs import (  # noqa: F401
    _SPECS,
    AddDecayedWeights,
    ApplyIfFinite,
    Chain,
    ClipByGlobalNorm,
    Identity,
    Injected,
    Masked,
    NamedChain,
    Opaque,
    Partition,
    Scale,
    ScaleByAdam,
    ScaleBySchedule,
    SetToZero,
    Spec,
    Trace,
    ZeroNans,
    describe,
    register,
    spec_of,
)

__all__: list[str] = []  # internal: reached as ``functrain.optim.fused``


# ------------------------------------------------------------------------------------ entry


class InPlace(NamedTuple):
    """Result of :func:`update_in_place`."""

    opt_state: Any  # the new optimizer state (its big tensors are the old ones, updated)
    update_norm: torch.Tensor | None  # ‖params_new − params_old‖ when asked for
    engine: str  # "kernel" or "foreach"


def _select_changed(found_inf: torch.Tensor, new: Any, old: Any) -> Any:
    """``old`` where ``found_inf`` for the leaves that are new objects (counts, hparams)."""

    def pick(n: Any, o: Any) -> Any:
        if n is o or not (isinstance(n, torch.Tensor) and isinstance(o, torch.Tensor)):
            return n
        return torch.where(found_inf.to(n.device), o.to(n.dtype), n)

    def walk(n: Any, o: Any) -> Any:
        # The engines keep the moments' containers (``_replace`` of the counts only), so
        # whole subtrees are the old objects: skipping them avoids a pass over every leaf.
        if n is o:
            return n
        kind = type(n)
        if kind is type(o):
            if kind is tuple or kind is list:
                if len(n) == len(o):
                    return kind(walk(a, b) for a, b in zip(n, o))
            elif kind is dict:
                if n.keys() == o.keys():
                    return {k: walk(v, o[k]) for k, v in n.items()}
            elif issubclass(kind, tuple) and hasattr(kind, "_fields") and len(n) == len(o):
                return kind(*(walk(a, b) for a, b in zip(n, o)))
        return tree.map(pick, n, o)  # leaves, custom nodes and mismatches (which raise)

    return walk(new, old)


def update_in_place(
    tx: Any,
    grads: Any,
    opt_state: Any,
    params: Any,
    *,
    found_inf: torch.Tensor | None = None,
    grad_norm: torch.Tensor | None = None,
    update_norm: bool = False,
    grads_writable: bool = False,
    engines: tuple[str, ...] = ("kernel", "foreach"),
    shapes_known: bool = False,
) -> InPlace | None:
    """Applies ``tx`` to ``params`` and ``opt_state`` **in place**, or returns ``None``.

    The caller must own ``params`` and ``opt_state`` (nothing else may read them afterwards);
    ``grads`` is only written when ``grads_writable`` (the kernels then unscale it in place).
    ``None`` means nothing was touched: ``tx`` is not recognised, the state does not match,
    parameters are aliased, a gradient's shape is not its parameter's, or no engine in
    ``engines`` applies (``"foreach"`` cannot honour ``found_inf``). Then use the pure path.

    Args:
        tx: the optimizer.
        grads: the gradients, a pytree like ``params``.
        opt_state: ``tx``'s state for ``params``.
        params: the parameters (updated in place).
        found_inf: optional 0-d bool tensor; where true, nothing changes (no host read).
        grad_norm: ``tree.norm(grads)`` if already known (reused by a leading clip).
        update_norm: also return the norm of the parameter change (one extra pass).
        grads_writable: whether the gradient tensors may be overwritten.
        engines: the engines to try, in order.
        shapes_known: the caller guarantees every gradient has its parameter's shape (the
            train step's gradients are derivatives with respect to the parameters), which
            skips a per-leaf check costing ~40 µs per update over 400 leaves.

    Returns:
        An :class:`InPlace` with the new state (same structure as ``tx.update``'s), or ``None``.
    """
    from functrain.optim import _fused_engines

    ctx = Context(grads, params, found_inf)
    if not ctx.same_structure or len(set(map(id, ctx.p))) != ctx.n:
        return None
    if not shapes_known and list(map(_SHAPE, ctx.g)) != ctx.shapes:
        # The pure path names the mismatch; the kernels would pair elements by flat index
        # (reading past a smaller gradient) and foreach arithmetic would broadcast.
        return None
    made = plan(tx, opt_state, ctx)
    if made is None:
        return None
    if grads_writable and len(set(map(id, ctx.g))) != ctx.n:
        # One gradient tensor given for two leaves: the kernels would unscale it (and the
        # clipping factor multiply it) once per leaf, so the second leaf saw it twice.
        grads_writable = False
    for engine in engines:
        run = _fused_engines.ENGINES[engine]
        # Outside autograd: parameters that require grad (a caller's nn.Parameters) made the
        # kernel engine's update-norm pass raise after the kernel had written the update.
        with torch.no_grad():
            norm = run(made.ops, ctx, grad_norm, update_norm, grads_writable)
        if norm is not False:
            new_state = made.build()
            if found_inf is not None:
                new_state = _select_changed(found_inf, new_state, opt_state)
                if isinstance(norm, torch.Tensor):
                    # A skipped step moves nothing; old − new is NaN where a parameter is
                    # already non-finite, and the pure path reports 0.
                    norm = torch.where(found_inf.to(norm.device), norm.new_zeros(()), norm)
            return InPlace(new_state, norm if update_norm else None, engine)
    return None
