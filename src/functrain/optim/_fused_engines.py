"""Engines of :mod:`functrain.optim.fused`: the fused kernels (here) and in-place foreach
arithmetic (:mod:`functrain.optim._foreach_engine`).

An engine is ``run(ops, ctx, grad_norm, update_norm, grads_writable)``. It returns ``False``
(before touching anything) when it does not apply; otherwise it updates the parameters and the
state tensors in place, sets every op's ``new_state`` and returns the update norm (or ``None``
when not asked for).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from operator import attrgetter
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain._precision import HALF as _HALF
from functrain._sq_norms import sq_norm, sum_sq_norms
from functrain.optim import _foreach_engine, _ops, _utils
from functrain.optim._utils import safe_increment
from functrain.optim.fused import (
    AddDecayedWeights,
    ClipByGlobalNorm,
    Context,
    Op,
    Scale,
    ScaleByAdam,
    ScaleBySchedule,
    SetToZero,
    Trace,
)

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DEVICES = ("cpu", "cuda")
# Elements per chunk when the update norm is wanted: the kernels update the parameters in
# place, so the old values of one chunk at a time are kept in a scratch buffer.
_CHUNK = 1 << 18
_MANY = 16  # leaves in a chunk from which the update norm gathers them flat
_IS_CPU = attrgetter("is_cpu")
_DTYPE = attrgetter("dtype")


def _number(value: Any) -> float | None:
    """``value`` as a float if that needs no device read (numbers, CPU tensors), else None.

    Also None for a tensor that autograd tracks (a learned learning rate): as a float it would
    silently lose its derivative, so the caller takes the differentiable path.
    """
    if _utils.is_real_number(value):  # NumPy scalars too: the kernel, as for Python floats
        return float(value)
    if (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and value.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not (value.requires_grad and torch.is_grad_enabled())
    ):
        return float(value)
    return None


def _learning_rate(op: Op) -> float | torch.Tensor | None:
    """The kernels' ``lr`` (minus the factor the pure path multiplies by) and the new state."""
    spec = op.spec
    if isinstance(spec, Scale):
        factor = spec.value if spec.sign == 1 else spec.sign * spec.value
        op.new_state = op.state
    else:
        assert isinstance(spec, ScaleBySchedule)
        factor = spec.fn(op.state.count)
        op.new_state = op.state._replace(count=safe_increment(op.state.count))
    number = _number(factor)
    if number is not None:
        return -number
    if isinstance(factor, torch.Tensor) and factor.dim() == 0 and factor.is_floating_point():
        return -factor
    return None


class _Job(NamedTuple):
    kind: str  # "adam" (coupled decay), "adamw" (decoupled) or "sgd"
    clip: Op | None
    core: Op | None
    lr: float | torch.Tensor
    hyper: dict[str, Any]
    wd: float
    decayed: frozenset[int]
    uniform: bool  # every leaf a CPU tensor of one dtype


def _leaf_ok(ctx: Context, i: int, states: list[list[torch.Tensor]]) -> bool:
    p, g = ctx.p[i], ctx.g[i]
    if p.dtype not in _KERNEL_DTYPES or p.device.type not in _KERNEL_DEVICES:
        return False
    group = [g, *(s[i] for s in states)]
    if any(t.dtype != p.dtype or t.device != p.device for t in group):
        return False
    if p.device.type == "cuda":  # multi_tensor_apply wants dense tensors
        return all(t.is_contiguous() for t in (p, *group))
    # The CPU kernels walk a leaf's tensors with one flat index: each must have the
    # parameter's strides, and those must be dense (a transposed parameter with a
    # contiguous gradient would pair the wrong elements).
    return _dense(p) and all(t.stride() == p.stride() for t in group)


def _half_on_cpu(ctx: Context, uniform: bool) -> bool:
    """Whether a leaf is a float16 or bfloat16 CPU tensor, which ``torch._fused_sgd_`` gets
    wrong: in torch 2.13 its CPU kernel updates only the last ``numel % 16`` elements of such a
    tensor (the vectorised body is lost), so plain SGD on a bfloat16 model did not train."""
    if uniform:  # all CPU tensors of one dtype
        return ctx.p[0].dtype in _HALF
    return any(p.dtype in _HALF and p.is_cpu for p in ctx.p)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its memory without gaps or overlaps, in some order of its dims."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).is_contiguous()


def _uniform(ctx: Context, states: list[list[torch.Tensor]]) -> bool:
    """All leaves are contiguous CPU tensors of one kernel dtype (the common case, in bulk)."""
    dtype = ctx.p[0].dtype
    if dtype not in _KERNEL_DTYPES:
        return False
    everything = list(chain(ctx.p, ctx.g, *states))
    # ``map`` over C-level getters: this runs every step over every leaf, and a generator
    # costs about twice as much per tensor. ``is_cpu`` rather than ``.device``, which builds an
    # object per call.
    return (
        all(map(_IS_CPU, everything))
        and set(map(_DTYPE, everything)) == {dtype}
        and all(map(torch.Tensor.is_contiguous, everything))
    )


def _match(ops: list[Op], ctx: Any) -> _Job | None:
    """Recognises ``[clip] [decay] (adam [decay] | [trace]) lr`` with kernel-friendly leaves."""
    kinds = [type(op.spec) for op in ops]
    pos = 0
    found: dict[str, Op] = {}
    for name, kind in (("clip", ClipByGlobalNorm), ("pre", AddDecayedWeights)):
        if pos < len(ops) and kinds[pos] is kind:
            found[name], pos = ops[pos], pos + 1
    if pos < len(ops) and kinds[pos] in (ScaleByAdam, Trace):
        found["core"], pos = ops[pos], pos + 1
        if kinds[pos - 1] is ScaleByAdam and pos < len(ops) and kinds[pos] is AddDecayedWeights:
            found["post"], pos = ops[pos], pos + 1
    if pos != len(ops) - 1 or kinds[pos] not in (Scale, ScaleBySchedule):
        return None
    if "pre" in found and "post" in found:
        return None
    clip, core = found.get("clip"), found.get("core")
    if any(op is not None and len(op.idx) != ctx.n for op in (clip, core, ops[pos])):
        return None
    hyper: dict[str, Any] = {}
    states: list[list[torch.Tensor]] = []
    if core is not None and isinstance(core.spec, ScaleByAdam):
        s = core.spec
        hyper = {"beta1": _number(s.b1), "beta2": _number(s.b2), "eps": _number(s.eps)}
        if s.nesterov or _number(s.eps_root) != 0.0 or None in hyper.values():
            return None
        states = [core.leaves["mu"], core.leaves["nu"]]
        kind = "adam" if "pre" in found else "adamw"
    else:
        kind = "sgd"
        hyper = {"momentum": 0.0, "nesterov": False}
        if core is not None:
            assert isinstance(core.spec, Trace)
            hyper = {"momentum": _number(core.spec.decay), "nesterov": core.spec.nesterov}
            # ``_fused_sgd_`` refuses momentum buffers with momentum 0 (``sgd(lr, momentum=0.0)``
            # keeps a trace, which the pure path sets to the updates): the foreach engine runs it.
            if not hyper["momentum"]:
                return None
            states = [core.leaves["trace"]]
    uniform = ctx.n > 0 and _uniform(ctx, states)
    if not uniform and not all(_leaf_ok(ctx, i, states) for i in range(ctx.n)):
        return None
    if kind == "sgd" and _half_on_cpu(ctx, uniform):
        return None
    wd, decayed = 0.0, frozenset()
    decay = found.get("pre", found.get("post"))
    if decay is not None:
        rate = decay.spec.weight_decay  # type: ignore[attr-defined]
        if callable(rate):
            rate = rate(decay.state.count)
            decay.new_state = decay.state._replace(count=safe_increment(decay.state.count))
        else:
            decay.new_state = decay.state
        number = _number(rate)
        if number is None:
            return None
        local = getattr(ctx, "local", None)  # a partition group's numbering of its leaves
        wd = number
        decayed = frozenset(decay.idx if local is None else (local[i] for i in decay.idx))
    lr = _learning_rate(ops[pos])
    if lr is None:
        return None
    # The kernels take a float32 ``lr`` tensor: float64 parameters would step by a learning
    # rate rounded to float32 (1e-8 relative), where the pure path uses it whole.
    if (
        isinstance(lr, torch.Tensor)
        and lr.dtype == torch.float64
        and any(p.dtype == torch.float64 for p in ctx.p)
    ):
        return None
    return _Job(kind, clip, core, lr, hyper, wd, decayed, uniform)


def _groups(job: _Job, ctx: Context) -> dict[tuple[Any, ...], list[int]]:
    decayed = job.decayed
    if job.uniform and len(decayed) in (0, ctx.n):
        p = ctx.p[0]
        return {(p.device, p.dtype, len(decayed) > 0): list(range(ctx.n))}
    out: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(ctx.p):
        out.setdefault((p.device, p.dtype, i in decayed), []).append(i)
    return out


Piece = tuple[torch.Tensor, ...]  # one leaf's (or slice's) param, grad and state tensors


def _chunks(idx: list[int], ctx: Context, grads: list, states: list[list]) -> list[list[Piece]]:
    """The leaves in runs of about ``_CHUNK`` elements; big contiguous leaves are cut into flat
    slices (the kernels are elementwise), so a run's old values stay in cache while the
    update norm is formed."""
    out: list[list[Piece]] = [[]]
    size = 0
    for i in idx:
        whole = (ctx.p[i], grads[i], *(s[i] for s in states))
        if whole[0].numel() > _CHUNK and all(t.is_contiguous() for t in whole):
            pieces: list[Piece] = list(zip(*(t.view(-1).split(_CHUNK) for t in whole)))
        else:
            pieces = [whole]
        for piece in pieces:
            n = piece[0].numel()
            if out[-1] and size + n > _CHUNK:
                out.append([])
                size = 0
            out[-1].append(piece)
            size += n
    return out


def _with_norm(
    job: _Job, on: dict[str, Any], idx: list[int], ctx: Context, grads: list, states: list
) -> list[torch.Tensor]:
    """Runs the kernel chunk by chunk, keeping each chunk's old values in one scratch buffer;
    returns the squared norms of the parameter changes.

    Half-precision changes are squared and summed in float32, as ``tree.norm`` reduces them:
    in float16 squares below 6e-8 (steps under 2.4e-4) vanish and sums above 65504 overflow,
    so the norm of a small step over many elements came out 0, of a large one inf.
    """
    chunks = _chunks(idx, ctx, grads, states)
    first = chunks[0][0][0]
    acc = torch.float32 if first.dtype in _HALF else None  # one dtype per group
    scratch = torch.empty(
        max(sum(piece[0].numel() for piece in c) for c in chunks),
        dtype=first.dtype,
        device=first.device,
    )
    squares = []
    for chunk in chunks:
        ps = [piece[0] for piece in chunk]
        part = [[piece[2 + k] for piece in chunk] for k in range(len(states))]
        grads_part = [piece[1] for piece in chunk]
        if len(ps) >= _MANY and all(map(torch.Tensor.is_contiguous, ps)):
            # Many small leaves: gathering them flat (one ``cat`` each side of the kernel) costs
            # less than three per-leaf foreach loops.
            flat = [p.view(-1) for p in ps]
            old_flat = torch.cat(flat, out=scratch[: sum(map(torch.Tensor.numel, flat))])
            _call(job, on, ps, grads_part, part)
            change = old_flat.sub_(torch.cat(flat))
            squares.append(sq_norm(change, acc))
            continue
        sizes = [p.numel() for p in ps]
        old = [v.view_as(p) for v, p in zip(scratch[: sum(sizes)].split(sizes), ps)]
        torch._foreach_copy_(old, ps)
        _call(job, on, ps, grads_part, part)
        torch._foreach_sub_(old, ps)
        squares.append(sum_sq_norms(old, acc))
    return squares


def _clip_inputs(
    clip: Op | None, ctx: Any, grad_norm: torch.Tensor | None, writable: bool
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The kernels' gradients and ``grad_scale`` with the clipping factor folded in."""
    if clip is None:
        return ctx.g, None
    clip.new_state = clip.state  # before the early return: an empty tree keeps it too
    if not ctx.g:
        return ctx.g, None
    if any(g.dtype in _HALF for g in ctx.g):
        # The norm in float32 (tree.norm's, before its rounding to the leaves' dtype): a float16
        # norm above 65504 rounds to inf, which zeroed every update.
        g_norm = tree.norm([*ctx.g, ctx.g[0].new_empty(0, dtype=torch.float32)])
    else:
        g_norm = grad_norm if grad_norm is not None else tree.norm(ctx.g)
    bound = _ops.on_device(clip.spec.max_norm, g_norm)  # type: ignore[attr-defined]
    if writable and all(g.dtype != torch.float64 for g in ctx.g):
        # The kernels divide by grad_scale (a float32 tensor) in the same pass.
        scale = torch.where(g_norm < bound, torch.ones_like(g_norm), g_norm / bound)
        return ctx.g, scale.to(torch.float32)
    factor = torch.where(g_norm < bound, torch.ones_like(g_norm), bound / g_norm)
    if writable:
        torch._foreach_mul_(ctx.g, factor.to(ctx.g[0].device))
        return ctx.g, None
    # A 0-d gradient times a 0-d factor of a wider dtype (the norm of mixed float32 and float64
    # gradients) comes out in the wider dtype; the kernels need each gradient's own.
    scaled = _ops.mul(ctx.g, factor)
    return [s if s.dtype == g.dtype else s.to(g.dtype) for s, g in zip(scaled, ctx.g)], None


class _Group:
    """The leaves ``idx`` of a :class:`Context`, numbered from 0: one ``partition`` group, which
    the kernels run as ``torch.optim`` runs a parameter group."""

    def __init__(self, ctx: Context, idx: list[int]) -> None:
        self.p = [ctx.p[i] for i in idx]
        self.g = [ctx.g[i] for i in idx]
        self.n = len(idx)
        self.found_inf = ctx.found_inf
        self.local = {i: j for j, i in enumerate(idx)}


def _segments(ops: list[Op], ctx: Context) -> tuple[Op | None, list[tuple[Any, list[Op]]]] | None:
    """``ops`` as (a leading global clip, [(leaves, their ops)]): one segment without
    ``partition``; with one, a segment per group, after an optional ``clip_by_global_norm`` of
    every leaf (``None``: another shape, left to the ``"foreach"`` engine)."""
    if all(op.group is None for op in ops):
        return None, [(ctx, ops)]
    head = 0
    while head < len(ops) and ops[head].group is None:
        head += 1
    clip = None
    if head == 1 and isinstance(ops[0].spec, ClipByGlobalNorm) and len(ops[0].idx) == ctx.n:
        clip = ops[0]
    elif head:
        return None
    segments: list[tuple[Any, list[Op]]] = []
    for op in ops[head:]:
        if op.group is None:  # an op after the partition, on every leaf
            return None
        if segments and segments[-1][1][-1].group is op.group:
            segments[-1][1].append(op)
        else:
            segments.append((op.group, [op]))
    # Each segment runs as a whole optimizer step on the raw gradients, so every leaf must be
    # in exactly one: a leaf in two (a partition chained after another, a nested partition
    # followed by an op of its outer group) would step twice instead of composing, and a leaf
    # in none (a group whose transform is ``identity``, a partition under ``masked``) would
    # not move where the pure path adds its gradient.
    seen = [i for group, _ in segments for i in group]
    if len(seen) != ctx.n or len(set(seen)) != ctx.n:
        return None
    return clip, [(_Group(ctx, group), members) for group, members in segments]


def _kernel(
    ops: list[Op], ctx: Context, grad_norm: torch.Tensor | None, want_norm: bool, writable: bool
) -> Any:
    found = _segments(ops, ctx)
    if found is None:
        return False
    head_clip, segments = found
    jobs: list[_Job | None] = []
    for part, members in segments:
        # ``members`` is empty for an optimizer without ops (``identity()``, a chain of them):
        # the pure path adds the gradient, which no kernel does (``_match`` declines).
        if members and all(
            isinstance(op.spec, SetToZero) and len(op.idx) == part.n for op in members
        ):
            jobs.append(None)  # a frozen group (``set_to_zero``): nothing to write
            continue
        job = _match(members, part)
        if job is None or (head_clip is not None and job.clip is not None):
            return False
        jobs.append(job)
    for (_, members), job in zip(segments, jobs):
        if job is None:
            for op in members:
                op.new_state = op.state
    # Everything is recognised: from here on tensors are written.
    grads, grad_scale = _clip_inputs(head_clip, ctx, grad_norm, writable)
    squares: list[torch.Tensor] = []
    for (part, _), job in zip(segments, jobs):
        if job is None:
            continue
        part_grads = grads if part is ctx else [grads[i] for i in part.local]
        if head_clip is None:
            # A clip of the group's own leaves: the step's global norm is not theirs.
            own_norm = grad_norm if part is ctx else None
            part_grads, grad_scale = _clip_inputs(
                job.clip, _Leaves(part.p, part_grads), own_norm, writable
            )
        squares += _run(job, part, part_grads, grad_scale, want_norm)
    if not want_norm:
        return None
    if not ctx.p:
        return torch.zeros(())
    # In the leaves' promoted dtype, as ``tree.norm`` of the updates (half sums were float32).
    result = ctx.p[0].dtype
    for p in ctx.p[1:]:
        if p.dtype != result:
            result = torch.promote_types(result, p.dtype)
    if not squares:  # only frozen groups: nothing moved (a zero of every leaf's dtype too)
        return ctx.p[0].new_zeros((), dtype=result)
    first = squares[0]
    dtype = first.dtype
    for sq in squares[1:]:
        dtype = torch.promote_types(dtype, sq.dtype)
    total = torch.stack([s.to(first.device, dtype) for s in squares]).sum().sqrt()
    return total.to(result)


class _Leaves(NamedTuple):
    p: list[torch.Tensor]
    g: list[torch.Tensor]


def _run(
    job: _Job,
    ctx: Any,
    grads: list[torch.Tensor],
    grad_scale: torch.Tensor | None,
    want_norm: bool,
) -> list[torch.Tensor]:
    """Runs one recognised job on ``ctx``'s leaves; the squared norms of their changes (when
    ``want_norm``)."""
    core = job.core
    count = None
    if core is not None:
        if isinstance(core.spec, ScaleByAdam):
            count = safe_increment(core.state.count)
            core.new_state = core.state._replace(count=count)
        else:
            core.new_state = core.state
    states = []
    if core is not None:
        names = ("mu", "nu") if isinstance(core.spec, ScaleByAdam) else ("trace",)
        states = [core.leaves[n] for n in names]
    squares: list[torch.Tensor] = []
    for (device, _dtype, decays), idx in _groups(job, ctx).items():
        on = {"wd": job.wd if decays else 0.0}
        if isinstance(job.lr, torch.Tensor):
            on["lr"] = job.lr.to(device=device, dtype=torch.float32)  # the CUDA kernels' type
        else:
            on["lr"] = job.lr
        on["grad_scale"] = None if grad_scale is None else grad_scale.to(device)
        on["found_inf"] = (
            None if ctx.found_inf is None else ctx.found_inf.to(device=device, dtype=torch.float32)
        )
        if count is not None:
            on["step"] = count.to(device, torch.float64 if device.type == "cpu" else torch.float32)
        if want_norm:
            squares += _with_norm(job, on, idx, ctx, grads, states)
        elif len(idx) == ctx.n:  # everything in one call: the lists as they are
            _call(job, on, ctx.p, grads, states)
        else:
            ps, gs = [ctx.p[i] for i in idx], [grads[i] for i in idx]
            _call(job, on, ps, gs, [[s[i] for i in idx] for s in states])
    return squares


def _call(job: _Job, on: dict[str, Any], ps: list, gs: list, states: list[list]) -> None:
    flags = {"maximize": False, "grad_scale": on["grad_scale"], "found_inf": on["found_inf"]}
    if job.kind == "sgd":
        torch._fused_sgd_(
            ps,
            gs,
            states[0] if states else [],
            weight_decay=on["wd"],
            momentum=job.hyper["momentum"],
            lr=on["lr"],
            dampening=0.0,
            nesterov=job.hyper["nesterov"],
            is_first_step=False,
            **flags,
        )
        return
    fused = torch._fused_adam_ if job.kind == "adam" else torch._fused_adamw_
    fused(
        ps,
        gs,
        states[0],
        states[1],
        [],
        [on["step"]] * len(ps),
        lr=on["lr"],
        weight_decay=on["wd"],
        amsgrad=False,
        **job.hyper,
        **flags,
    )


ENGINES: dict[str, Callable[..., Any]] = {"kernel": _kernel, "foreach": _foreach_engine.run}
