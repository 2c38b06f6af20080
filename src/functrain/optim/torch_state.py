"""Optimizer-state interop with ``torch.optim``: resume a torch run here, and hand one back.

``opt_state_from_torch`` fills ``tx.init(params)`` with a ``torch.optim`` optimizer's moments and
step; ``opt_state_to_torch`` builds the ``state_dict`` that ``optimizer.load_state_dict`` takes.
Only exact correspondences are converted (each functrain field is the same number as torch's,
up to one rounding where the learning rate is folded into a momentum buffer); anything else is
refused with an error naming it, never converted approximately or dropped.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from functrain.optim._torch_state_walk import (
    _check_groups,
    _context,
    _family_of_fields,
    _family_of_optimizer,
    _required,
    _scalar_dtype,
    _walk,
)

__all__ = ["opt_state_from_torch", "opt_state_to_torch"]


def opt_state_from_torch(
    tx: Any,
    params: Any,
    torch_state: Any,
    *,
    order: Sequence[Any] | None = None,
    step: int | None = None,
) -> Any:
    """Builds ``tx``'s state from a ``torch.optim`` optimizer's, to resume its run with ``tx``.

    Starts from ``tx.init(params)`` and fills, per parameter, what torch keeps: Adam/AdamW/RAdam
    (``exp_avg``, ``exp_avg_sq`` into :class:`ScaleByAdamState` ``mu``, ``nu``), Adamax
    (``exp_avg``, ``exp_inf``: ``mu``, ``nu``), SGD (``momentum_buffer``: :class:`TraceState`),
    RMSprop (``square_avg``, centred ``grad_avg``, ``momentum_buffer``: :class:`ScaleByRmsState`
    or :class:`ScaleByRStdDevState`, :class:`TraceState`), Adagrad (``sum``:
    :class:`ScaleByRssState`) and Adadelta (``square_avg``, ``acc_delta``:
    :class:`ScaleByAdaDeltaState`), inside any chain, ``masked``, ``partition``,
    ``inject_hyperparams`` or ``apply_if_finite``. Every step counter (Adam's ``count``,
    ``scale_by_schedule``'s, ``inject_hyperparams``'s, ...) becomes torch's ``step``, so
    schedules continue where torch is. A momentum buffer after the learning rate (optax's
    RMSprop order) is torch's times ``-lr`` (``tx``'s constant learning rate).

    Refused, with an error naming the cause: torch's ``amsgrad`` (its maximum is of the raw
    second moment, ``ft.amsgrad``'s of the bias-corrected one), NAdam, ASGD, Rprop, LBFGS;
    unequal per-parameter steps; a parameter without torch state while others have some and
    ``tx`` keeps state for it (leave frozen parameters out with ``ft.selective_transform`` or
    ``ft.partition``: their state is then empty); a shape mismatch; torch state that ``tx`` has
    no place for (torch SGD momentum into ``ft.adamw``) or ``tx`` state torch lacks; a momentum
    buffer after a scheduled learning rate; a scaling before any other state (``ft.chain(
    ft.scale(c), ft.adam(lr))``: torch's moments are of the gradient itself); ``maximize=True``
    where torch keeps sums of the negated gradient (``exp_avg``, ``momentum_buffer``,
    ``grad_avg``); SGD ``dampening`` with momentum; ``step=`` other than torch's step; ``tx``
    states no torch state fills (Lion, ``MultiSteps``, ...).

    Parameters correspond in order: torch numbers them across ``param_groups``; the leaves of
    ``params`` are taken in insertion order (dict keys as inserted, not sorted), which for the
    dict of ``ft.functionalize(net)`` is ``net.parameters()``'s order, tied weights counted once
    as in torch. Where torch recorded ``param_names`` (an optimizer built from
    ``named_parameters()``) and they are the paths of ``params`` (dotted keys), they give the
    order, and ``order=`` must agree with them. ``order=`` (a list of ``params`` keys or key
    tuples, one per torch index) overrides the default. Several param groups go to ``ft.partition``: each parameter fills whatever
    sub-state holds it. Hyperparameters (learning rate, betas, ...) are the user's to match;
    ``inject_hyperparams``' values are left as ``tx`` made them. The moments are copies in the
    dtype and device of ``tx.init``'s leaves.

    Args:
        tx: the functrain optimizer that continues the run.
        params: the params pytree (e.g. the dict of ``ft.functionalize(net)``).
        torch_state: a ``torch.optim.Optimizer`` or its ``state_dict()``.
        order: optional params keys/paths in torch's parameter order.
        step: the step count for a torch optimizer that keeps none (SGD) when ``tx`` counts
            (``0`` for one that took none); elsewhere it must equal torch's.

    Returns:
        ``tx``'s state, ready for ``tx.update`` or ``ft.TrainState``.

    Raises:
        ValueError: for any refusal above, naming the parameter, path or field.

    Example:
        >>> import torch, functrain as ft
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        >>> net(torch.ones(3, 2)).sum().backward()
        >>> opt.step()
        >>> _, params, _ = ft.functionalize(net)
        >>> tx = ft.adam(1e-2)
        >>> state = ft.opt_state_from_torch(tx, params, opt)
        >>> state[0].count, torch.equal(state[0].mu["weight"], opt.state[net.weight]["exp_avg"])
        (tensor(1, dtype=torch.int32), True)
    """
    family = None
    if isinstance(torch_state, torch.optim.Optimizer):
        family = _family_of_optimizer(torch_state)
        shapes = [tuple(p.shape) for g in torch_state.param_groups for p in g["params"]]
        torch_state = torch_state.state_dict()
    else:
        shapes = None
    if not isinstance(torch_state, dict) or not {"state", "param_groups"} <= set(torch_state):
        raise TypeError("torch_state must be a torch.optim.Optimizer or its state_dict()")
    groups = torch_state["param_groups"]
    _check_groups(groups)
    init = tx.init(params)
    ctx = _context(params, order, groups, to_torch=False)
    if shapes is not None:
        for i, k in enumerate(ctx.pos_of_leaf):
            if tuple(ctx.shapes[i]) != shapes[k]:
                raise ValueError(
                    f"{ctx.paths[i]} has shape {tuple(ctx.shapes[i])} but torch parameter {k} "
                    f"has shape {shapes[k]}{ctx.order_hint}"
                )
    ids = [i for g in groups for i in g["params"]]
    raw = {k: torch_state["state"].get(i, {}) for k, i in enumerate(ids)}
    raw = {k: {f: v for f, v in e.items() if v is not None} for k, e in raw.items()}
    with_step = [k for k, e in raw.items() if "step" in e]
    steps = (
        torch.stack(
            [torch.as_tensor(raw[k]["step"]).detach().double().cpu() for k in with_step]
        ).tolist()
        if with_step
        else []
    )
    step_of = dict(zip(with_step, steps))
    # A step of 0 is a state torch made before any step (Adagrad makes it in __init__).
    entries = {k: e for k, e in raw.items() if e and step_of.get(k) != 0}
    stepped = [k for k in entries if k in step_of]
    for k in stepped:
        if step_of[k] != step_of[stepped[0]]:
            a, b = stepped[0], k
            leaf_a, leaf_b = ctx.pos_of_leaf.index(a), ctx.pos_of_leaf.index(b)
            raise ValueError(
                f"torch's per-parameter steps differ: {ctx.paths[leaf_a]} (torch parameter {a}) "
                f"is at step {step_of[a]:g}, {ctx.paths[leaf_b]} (torch parameter {b}) at "
                f"{step_of[b]:g}; functrain keeps one count"
            )
    # torch.optim.SGD keeps no step: its state (none at all without momentum) says nothing.
    stepless = family == "sgd" or (family is None and all("dampening" in g for g in groups))
    # No state from an optimizer that keeps a step: it took none.
    torch_step = (None if entries or stepless else 0) if not stepped else int(step_of[stepped[0]])
    if step is not None and torch_step is not None and step != torch_step:
        raise ValueError(f"step={step} but torch's state is at step {torch_step}")
    ctx.step = torch_step if torch_step is not None else step
    if not entries and ctx.step == 0:
        return init
    ctx.entries = entries
    for k, e in entries.items():
        ctx.families[k] = family or _family_of_fields(set(e) - {"step"}, groups, k)
    new, _ = _walk(ctx, init, tx, None, "opt_state")
    for k, e in entries.items():
        left = sorted(set(e) - {"step"} - {f for j, f in ctx.consumed if j == k})
        if left:
            leaf = ctx.pos_of_leaf.index(k)
            raise ValueError(
                f"torch's {left} for {ctx.paths[leaf]} (torch parameter {k}, {ctx.families[k]}) "
                "has no place in tx's state; tx must hold every field torch keeps (e.g. "
                "momentum needs a trace, a centred RMSprop ft.rmsprop(centered=True))"
            )
    return new


def opt_state_to_torch(
    tx: Any,
    opt_state: Any,
    params: Any,
    optimizer: torch.optim.Optimizer,
    *,
    order: Sequence[Any] | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """The ``state_dict`` for ``optimizer.load_state_dict``: hands a functrain run to torch.

    The inverse of :func:`opt_state_from_torch` (same supported optimizers, refusals and
    parameter order): ``param_groups`` are ``optimizer.state_dict()``'s, each parameter's entry
    holds copies of the moments ``tx`` keeps for it and ``step`` as torch stores it (a float
    CPU tensor in torch's scalar dtype; float32 on the parameter's device for fused or
    capturable groups; SGD keeps none). Parameters ``tx`` keeps no state for get no entry.
    ``step`` is the state's counters, which must agree (with ``step=`` too); pass ``step=``
    when ``tx`` counts nothing (``ft.rmsprop`` with a constant learning rate).

    Args:
        tx: the functrain optimizer whose state this is.
        opt_state: its state.
        params: the params pytree the state was made for.
        optimizer: the ``torch.optim`` optimizer that continues (over the same parameters).
        order: optional params keys/paths in torch's parameter order.
        step: torch's step when ``opt_state`` has no counter.

    Returns:
        A ``state_dict`` (``{"state": ..., "param_groups": ...}``).

    Raises:
        ValueError: as :func:`opt_state_from_torch`, and for counters that disagree.

    Example:
        >>> import torch, functrain as ft
        >>> net = torch.nn.Linear(2, 1)
        >>> _, params, _ = ft.functionalize(net)
        >>> tx = ft.adam(1e-2)
        >>> state = tx.init(params)
        >>> _, state = tx.update(ft.tree.ones_like(params), state, params)
        >>> opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        >>> opt.load_state_dict(ft.opt_state_to_torch(tx, state, params, opt))
        >>> opt.state[net.bias]["step"], opt.state[net.bias]["exp_avg"]
        (tensor(1.), tensor([0.1000]))
    """
    family = _family_of_optimizer(optimizer)
    sd = optimizer.state_dict()
    groups = copy.deepcopy(sd["param_groups"])
    _check_groups(groups)
    ctx = _context(params, order, groups, to_torch=True)
    torch_params = [(g, p) for g in optimizer.param_groups for p in g["params"]]
    for i, k in enumerate(ctx.pos_of_leaf):
        if tuple(ctx.shapes[i]) != tuple(torch_params[k][1].shape):
            raise ValueError(
                f"{ctx.paths[i]} has shape {tuple(ctx.shapes[i])} but torch parameter {k} has "
                f"shape {tuple(torch_params[k][1].shape)}{ctx.order_hint}"
            )
    ctx.families = dict.fromkeys(range(len(torch_params)), family)
    _walk(ctx, opt_state, tx, None, "opt_state")
    counters = ctx.entries.pop(-1, {})
    if counters:
        values = torch.stack([c.detach().double().cpu() for c in counters.values()]).tolist()
        names = list(counters)
        for name, v in zip(names, values):
            if v != values[0]:
                raise ValueError(
                    f"the state's step counters differ: {names[0]} = {values[0]:g}, {name} = {v:g}"
                )
        if step is not None and step != values[0]:
            raise ValueError(f"step={step} but the state's step counters are at {values[0]:g}")
        step = int(values[0])
    ids = [i for g in groups for i in g["params"]]
    needs = [k for k, (group, _) in enumerate(torch_params) if _required(family, group)]
    if needs and not ctx.entries:
        # Frozen (masked) parameters get no entry, but a tx that keeps nothing torch needs for
        # any parameter is the wrong optimizer (ft.sgd's empty state into torch's Adam): torch
        # would restart every moment silently.
        leaf = ctx.pos_of_leaf.index(needs[0])
        raise ValueError(
            f"tx's state holds none of what torch.optim.{type(optimizer).__name__} keeps "
            f"({sorted(_required(family, torch_params[needs[0]][0]))} for {ctx.paths[leaf]}, "
            f"torch parameter {needs[0]}): is tx the optimizer this torch one continues?"
        )
    state = {}
    for k, entry in sorted(ctx.entries.items()):
        group, p = torch_params[k]
        need = _required(family, group)
        if set(entry) != need:
            leaf = ctx.pos_of_leaf.index(k)
            raise ValueError(
                f"torch.optim.{type(optimizer).__name__} (param group options) keeps {sorted(need)} "
                f"for {ctx.paths[leaf]} (torch parameter {k}) but tx's state gives "
                f"{sorted(entry)}"
            )
        if family != "sgd":
            if step is None:
                raise ValueError(
                    f"torch.optim.{type(optimizer).__name__} stores a step but tx's state has "
                    "no step counter: pass step="
                )
            if group.get("fused") or group.get("capturable"):
                entry["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
            else:
                entry["step"] = torch.tensor(float(step), dtype=_scalar_dtype())
        state[ids[k]] = entry
    return {"state": state, "param_groups": groups}
