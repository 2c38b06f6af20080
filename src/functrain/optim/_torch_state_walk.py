"""The walk behind :mod:`functrain.optim.torch_state`: which torch field fills which
functrain state field, the parameter correspondence, and the recursive conversion of a
state tree (chains, wrappers) in either direction."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import optree
import torch

from functrain import tree
from functrain.optim import fused
from functrain.optim.accumulation import TraceState
from functrain.optim.adaptive import ScaleByAdamState, ScaleByAmsgradState
from functrain.optim.additive import WeightDecayScheduleState
from functrain.optim.base import EmptyState
from functrain.optim.hyperparams import InjectHyperparamsState
from functrain.optim.rms import (
    ScaleByRmsState,
    ScaleByRmsWithCountState,
    ScaleByRssState,
    ScaleByRStdDevState,
    ScaleByRStdDevWithCountState,
)
from functrain.optim.rms_ratio import ScaleByAdaDeltaState
from functrain.optim.scaling import ScaleByScheduleState
from functrain.optim.wrappers import (
    ApplyIfFiniteState,
    MaskedNode,
    MaskedState,
    PartitionState,
    ZeroNansState,
)

__all__: list[str] = []  # internal

# torch.optim class -> family; the family names which torch field fills which functrain field.
_FAMILIES = {
    "Adam": "adam",
    "AdamW": "adam",
    "RAdam": "radam",
    "Adamax": "adamax",
    "SGD": "sgd",
    "RMSprop": "rmsprop",
    "Adagrad": "adagrad",
    "Adadelta": "adadelta",
}
_ADAM_LIKE = ("adam", "radam", "adamax")
# (functrain state type, field) -> {family: torch field}.
_SLOTS: dict[tuple[type, str], dict[str, str]] = {
    (ScaleByAdamState, "mu"): dict.fromkeys(_ADAM_LIKE, "exp_avg"),
    (ScaleByAdamState, "nu"): {"adam": "exp_avg_sq", "radam": "exp_avg_sq", "adamax": "exp_inf"},
    (TraceState, "trace"): {"sgd": "momentum_buffer", "rmsprop": "momentum_buffer"},
    (ScaleByRmsState, "nu"): {"rmsprop": "square_avg"},
    (ScaleByRmsWithCountState, "nu"): {"rmsprop": "square_avg"},
    (ScaleByRStdDevState, "mu"): {"rmsprop": "grad_avg"},
    (ScaleByRStdDevState, "nu"): {"rmsprop": "square_avg"},
    (ScaleByRStdDevWithCountState, "mu"): {"rmsprop": "grad_avg"},
    (ScaleByRStdDevWithCountState, "nu"): {"rmsprop": "square_avg"},
    (ScaleByRssState, "sum_of_squares"): {"adagrad": "sum"},
    (ScaleByAdaDeltaState, "e_g"): {"adadelta": "square_avg"},
    (ScaleByAdaDeltaState, "e_x"): {"adadelta": "acc_delta"},
}
_COUNTED = (
    ScaleByAdamState,
    ScaleByRmsWithCountState,
    ScaleByRStdDevWithCountState,
    ScaleByScheduleState,
    WeightDecayScheduleState,
)
_UNKNOWN, _SCHEDULED = "unknown", "scheduled"  # the learning rate before a trace, when not a number
# Fields that hold signed sums of gradients: with torch's maximize=True, of the negated gradient.
_SIGNED = ("exp_avg", "momentum_buffer", "grad_avg")
_SUPPORTED = "Adam, AdamW, RAdam, Adamax, SGD, RMSprop, Adagrad, Adadelta"


def _family_of_fields(fields: set[str], groups: list[dict[str, Any]], k: int) -> str:
    """The torch family of one parameter's state, from its field names (a ``state_dict``)."""
    if "max_exp_avg_sq" in fields:
        raise ValueError(
            f"torch parameter {k} has amsgrad's max_exp_avg_sq: torch takes the maximum of the "
            "raw second moment, ft.amsgrad (optax) of the bias-corrected one, so no functrain "
            "state equals it; not converted"
        )
    if "mu_product" in fields:
        raise ValueError(
            f"torch parameter {k} has NAdam's mu_product: torch.optim.NAdam's momentum schedule "
            "has no functrain counterpart (ft.nadam is optax's NAdam); not converted"
        )
    if {"exp_avg", "exp_avg_sq"} <= fields:
        return "adam" if all("amsgrad" in g for g in groups) else "radam"
    if {"exp_avg", "exp_inf"} <= fields:
        return "adamax"
    if {"square_avg", "acc_delta"} <= fields:
        return "adadelta"
    if "square_avg" in fields:
        return "rmsprop"
    if "sum" in fields:
        return "adagrad"
    if fields == {"momentum_buffer"}:
        return "sgd"
    raise ValueError(
        f"torch parameter {k} has state {sorted(fields)}, of no supported optimizer ({_SUPPORTED})"
    )


def _family_of_optimizer(optimizer: torch.optim.Optimizer) -> str:
    name = type(optimizer).__name__
    if name not in _FAMILIES:
        raise ValueError(
            f"torch.optim.{name} is not supported (supported: {_SUPPORTED}; NAdam, ASGD, "
            "Rprop, LBFGS, SparseAdam have no exact functrain state)"
        )
    return _FAMILIES[name]


def _check_groups(groups: list[dict[str, Any]]) -> None:
    for i, g in enumerate(groups):
        if g.get("amsgrad"):
            raise ValueError(
                f"torch param_groups[{i}] has amsgrad=True: torch's max_exp_avg_sq (maximum of the "
                "raw second moment) equals no functrain state (ft.amsgrad keeps the maximum of "
                "the bias-corrected one); not converted"
            )


def _tx_kind(tx: Any) -> str | None:
    """Which Adam-family transform made a ``ScaleByAdamState`` (``None``: cannot tell)."""
    spec = fused.describe(tx) if tx is not None else None
    if isinstance(spec, fused.ScaleByAdam):
        return "nadam" if spec.nesterov else "adam"
    name = getattr(getattr(tx, "update", None), "__qualname__", "")
    for kind in ("scale_by_adamax", "scale_by_radam", "scale_by_adam"):
        if name.startswith(kind + "."):
            return kind[len("scale_by_") :]
    return None


@dataclasses.dataclass
class _Ctx:
    """What a walk over the state needs: the parameters and, per torch position, its entry."""

    paths: list[str]  # params path of each flat (optree-order) leaf
    shapes: list[torch.Size]
    pos_of_leaf: list[int]  # torch position of each flat leaf
    spec: Any  # treespec of params
    families: dict[int, str]  # torch position -> family (positions with state)
    entries: dict[
        int, dict[str, Any]
    ]  # torch position -> state entry (from_torch: read; to: built)
    step: int | None
    to_torch: bool
    groups: list[dict[str, Any]]  # torch's param_groups
    group_of: list[int]  # torch position -> index of its param group
    consumed: set[tuple[int, str]] = dataclasses.field(default_factory=set)
    vary: bool = False  # inside inject_hyperparams with schedules: its scales change with time
    order_hint: str = ""  # appended to shape mismatches when the order is params' own


def _is_marker(pre: Any) -> bool:
    return isinstance(pre, str)


def _scale_of(ctx: _Ctx, tx: Any, pre: Any) -> Any:
    """The product of the scalings applied so far in a chain, after the member ``tx``."""
    spec = fused.describe(tx) if tx is not None else None
    varies = isinstance(spec, fused.ScaleBySchedule) or (ctx.vary and isinstance(spec, fused.Scale))
    if varies or _is_marker(pre):
        return _SCHEDULED if varies else pre
    if isinstance(spec, fused.Scale):
        factor = spec.value * spec.sign
        return factor if pre is None else pre * factor
    return pre


def _describe(pre: Any) -> str:
    if _is_marker(pre):
        return "a scheduled factor" if pre == _SCHEDULED else "an unknown factor"
    return f"{float(pre):g}" if isinstance(pre, (int, float)) or pre.ndim == 0 else "a tensor"


def _check_options(ctx: _Ctx, k: int, torch_field: str, name: str) -> None:
    """Refuses torch options under which the field means something else than tx's."""
    index = ctx.group_of[k]
    group = ctx.groups[index]
    if group.get("maximize") and torch_field in _SIGNED:
        raise ValueError(
            f"{name}: torch param_groups[{index}] has maximize=True, so its {torch_field!r} sums "
            "negated gradients, and functrain minimises: not converted (to continue a "
            "maximisation, minimise the negated objective and set maximize to False in the "
            "state dict's param_groups, or in torch's optimizer going back)"
        )
    if torch_field == "momentum_buffer" and group.get("dampening", 0) != 0:
        raise ValueError(
            f"{name}: torch param_groups[{index}] has dampening={group['dampening']:g}: "
            "torch.optim.SGD's buffer follows b <- momentum * b + (1 - dampening) * g (its first "
            "is g), ft.trace's t <- decay * t + g; no exact conversion"
        )


def _slot(ctx: _Ctx, node: Any, field: str, kind: str | None, pre: Any, where: str) -> Any:
    """Fills (from torch) or reads (to torch) one per-parameter field of a state."""
    table = _SLOTS[(type(node), field)]
    value = getattr(node, field)
    if not ctx.to_torch and not ctx.entries:
        return value  # torch keeps no per-parameter state (SGD without momentum): tx's init
    leaves = ctx.spec.flatten_up_to(value)
    out = []
    for i, leaf in enumerate(leaves):
        if leaf is None or isinstance(leaf, MaskedNode):
            out.append(leaf)
            continue
        k = ctx.pos_of_leaf[i]
        name = f"{where}.{field} of {ctx.paths[i]} (torch parameter {k})"
        family = ctx.families.get(k)
        if family is None:
            raise ValueError(
                f"torch has no stepped state for {ctx.paths[i]} (torch parameter {k}: none, or "
                "one at step 0 as Adagrad makes in __init__) while others have some, but tx "
                f"keeps {where}.{field} for it; a parameter that never gets a "
                "gradient must be left out of the optimizer's state: wrap it with "
                "ft.selective_transform(tx, freeze_mask=...) or ft.partition/ft.masked, whose "
                "state there is a MaskedNode"
            )
        if family not in table or (
            isinstance(node, ScaleByAdamState) and kind is not None and kind != family
        ):
            what = f"tx's {kind}" if kind else f"tx's {type(node).__name__}"
            raise ValueError(
                f"{name}: torch parameter {k} holds {family} state, which {what} cannot take "
                f"(it holds {', '.join(f'{f} ({t})' for f, t in table.items())})"
            )
        torch_field = table[family]
        if (k, torch_field) in ctx.consumed:
            raise ValueError(f"{name}: torch's {torch_field!r} would fill two states of tx")
        ctx.consumed.add((k, torch_field))
        _check_options(ctx, k, torch_field, name)
        if isinstance(node, TraceState) and _is_marker(pre):
            raise ValueError(
                f"{name}: a learning rate that is {pre} is applied before this momentum "
                "buffer (optax's order), torch's is applied after it: no exact conversion"
            )
        unit = pre is None or (isinstance(pre, (int, float)) and pre == 1)
        if not isinstance(node, TraceState) and not unit:
            # Only a momentum buffer is linear in its inputs with torch's learning rate applied
            # after it; torch feeds its other states the gradient itself.
            raise ValueError(
                f"{name}: tx scales the updates by {_describe(pre)} before it, but "
                f"torch.optim's {torch_field!r} is of the unscaled gradient; no exact "
                "conversion (scale the loss instead, or scale after this transform)"
            )
        if ctx.to_torch:
            t = leaf.detach().clone()
            ctx.entries.setdefault(k, {})[torch_field] = t if pre is None else t / pre
            out.append(leaf)
            continue
        if torch_field not in ctx.entries[k]:
            raise ValueError(
                f"{name}: tx keeps it but torch keeps no {torch_field!r} (only "
                f"{sorted(ctx.entries[k])}); tx must keep what torch keeps, no more (e.g. no "
                "momentum, no centring where torch had none)"
            )
        src = ctx.entries[k][torch_field]
        if tuple(src.shape) != tuple(ctx.shapes[i]):
            raise ValueError(
                f"{ctx.paths[i]} has shape {tuple(ctx.shapes[i])} but torch parameter {k}'s "
                f"{torch_field!r} has shape {tuple(src.shape)}{ctx.order_hint}"
            )
        new = src.detach().to(device=leaf.device, dtype=leaf.dtype, copy=True)
        out.append(new if pre is None else new * pre)
    return optree.tree_unflatten(ctx.spec, out) if not ctx.to_torch else value


def _count(ctx: _Ctx, count: torch.Tensor, where: str) -> torch.Tensor:
    if ctx.to_torch:
        ctx.entries.setdefault(-1, {})[where] = count
        return count
    if ctx.step is None:
        raise ValueError(
            f"tx's state has a step counter ({where}) but the torch state keeps no step "
            "(torch.optim.SGD): pass step= (the number of optimizer steps taken)"
        )
    return torch.full_like(count, ctx.step)


def _walk(ctx: _Ctx, node: Any, tx: Any, pre: Any, where: str) -> tuple[Any, Any]:
    """Returns the converted ``node`` and the scaling applied after it (see :func:`_scale_of`)."""
    spec = fused.describe(tx) if tx is not None else None
    if (
        node is None
        or isinstance(node, (MaskedNode, EmptyState))
        or (isinstance(node, tuple) and not node)
    ):
        return node, _scale_of(ctx, tx, pre)
    if isinstance(node, ScaleByAmsgradState):
        raise ValueError(
            f"{where}: ft.amsgrad's nu_max (maximum of the bias-corrected second moment) has no "
            "torch counterpart (torch's max_exp_avg_sq is of the raw one)"
        )
    if any(type(node) is t for t, _ in _SLOTS):
        kind = _tx_kind(tx) if isinstance(node, ScaleByAdamState) else None
        if kind == "nadam":
            raise ValueError(f"{where}: ft.nadam's state has no torch.optim counterpart")
        fields = {f: _slot(ctx, node, f, kind, pre, where) for t, f in _SLOTS if t is type(node)}
        if "count" in node._fields:
            fields["count"] = _count(ctx, node.count, where + ".count")
        return node._replace(**fields), _scale_of(ctx, tx, pre)
    if isinstance(node, (ScaleByScheduleState, WeightDecayScheduleState)):
        return node._replace(count=_count(ctx, node.count, where + ".count")), _scale_of(
            ctx, tx, pre
        )
    if isinstance(node, (MaskedState, ApplyIfFiniteState)):
        inner_tx = spec.inner if isinstance(spec, (fused.Masked, fused.ApplyIfFinite)) else tx
        inner, after = _walk(ctx, node.inner_state, inner_tx, pre, where + ".inner_state")
        return node._replace(inner_state=inner), after
    if isinstance(node, PartitionState):
        txs = spec.transforms if isinstance(spec, fused.Partition) else {}
        new, same = {}, isinstance(spec, fused.Partition)
        for label, sub in node.inner_states.items():
            where_sub = f"{where}.inner_states[{label!r}]"
            new[label], after = _walk(ctx, sub, txs.get(label), pre, where_sub)
            same = same and after is pre
        # Unless no member scales (clipping per group, say), the scaling now depends on the leaf.
        return node._replace(inner_states=new), pre if same else _UNKNOWN
    if isinstance(node, InjectHyperparamsState):
        inner_tx, inner_pre, vary = None, _UNKNOWN, ctx.vary
        if isinstance(spec, fused.Injected) and spec.factory is not None:
            inner_tx, inner_pre = spec.factory(**spec.static, **node.hyperparams), pre
            # A scheduled hyperparameter may be the learning rate: scales inside are not constant.
            ctx.vary = vary or bool(spec.schedules)
        count = _count(ctx, node.count, where + ".count")
        try:
            inner, after = _walk(ctx, node.inner_state, inner_tx, inner_pre, where + ".inner_state")
        finally:
            ctx.vary = vary
        # Its hyperparameters may change between steps: only a member that scales nothing (an
        # injected clip, say) leaves the scaling known.
        same = inner_tx is not None and after is inner_pre
        return node._replace(count=count, inner_state=inner), pre if same else _UNKNOWN
    if isinstance(node, ZeroNansState):
        return node, pre
    if isinstance(node, (tuple, list)) and not hasattr(node, "_fields"):
        members = spec.members if isinstance(spec, fused.Chain) else [None] * len(node)
        out = []
        for i, (sub, sub_tx) in enumerate(zip(node, members)):
            sub, pre = _walk(
                ctx, sub, sub_tx, pre if spec is not None else _UNKNOWN, f"{where}[{i}]"
            )
            out.append(sub)
        return type(node)(out), pre
    if isinstance(node, dict):
        members = dict(spec.members) if isinstance(spec, fused.NamedChain) else {}
        out = {}
        for key, sub in node.items():
            p = pre if key in members else _UNKNOWN
            out[key], pre = _walk(ctx, sub, members.get(key), p, f"{where}[{key!r}]")
        return out, pre
    raise ValueError(
        f"{where}: tx's state holds a {type(node).__name__}, which no torch.optim state fills "
        f"(supported: the states of {_SUPPORTED} and the wrappers chain, masked, partition, "
        "inject_hyperparams, apply_if_finite)"
    )


def _positions(params: Any, order: Sequence[Any] | None) -> tuple[list[Any], list[int]]:
    """Each flat leaf's params path and torch position (default: dict insertion order)."""
    paths, _, _ = tree.flatten_with_paths(params)
    index = {p: i for i, p in enumerate(paths)}
    if order is None:

        def rank(path: tuple[Any, ...]) -> list[int] | None:
            node, key = params, []
            for entry in path:
                if isinstance(node, dict):
                    key.append(list(node).index(entry))
                elif isinstance(node, (list, tuple)):
                    key.append(entry)
                else:
                    return None
                node = node[entry]
            return key

        ranks = [rank(p) for p in paths]
        leaf_of_pos = list(range(len(paths)))
        if all(r is not None for r in ranks):
            leaf_of_pos = sorted(leaf_of_pos, key=lambda i: ranks[i])
    else:
        leaf_of_pos = []
        for k, key in enumerate(order):
            path = key if isinstance(key, tuple) else (key,)
            if path not in index:
                raise ValueError(f"order[{k}] = {key!r} is not a path of params")
            if index[path] in leaf_of_pos:
                raise ValueError(f"order[{k}] = {key!r} appears twice")
            leaf_of_pos.append(index[path])
        if len(leaf_of_pos) != len(paths):
            missing = [
                tree.path_str(p, "params") for i, p in enumerate(paths) if i not in leaf_of_pos
            ]
            raise ValueError(
                f"order has {len(order)} entries for {len(paths)} params; missing {missing}"
            )
    pos_of_leaf = [0] * len(paths)
    for k, i in enumerate(leaf_of_pos):
        pos_of_leaf[i] = k
    return [tree.path_str(p, "params") for p in paths], pos_of_leaf


def _named_order(
    params: Any, order: Sequence[Any] | None, groups: list[dict[str, Any]]
) -> Sequence[Any] | None:
    """The order torch's ``param_names`` give (torch >= 2.6, optimizers built from
    ``named_parameters()``), checked against ``order=``; ``order`` when they name no params."""
    if not groups or not all("param_names" in g for g in groups):
        return order
    names = [n for g in groups for n in g["param_names"]]
    paths, _, _ = tree.flatten_with_paths(params)
    by_name = {".".join(str(e) for e in path): path for path in paths}
    if len(set(names)) != len(names) or not all(n in by_name for n in names):
        return order  # names of another module (a wrapper's prefix, a submodule's own names)
    if order is None:
        return [by_name[n] for n in names]
    for k, (key, n) in enumerate(zip(order, names)):
        if (key if isinstance(key, tuple) else (key,)) != by_name[n]:
            raise ValueError(
                f"order[{k}] = {key!r} but torch's param_groups name parameter {k} {n!r}"
            )
    return order


def _context(params: Any, order: Any, groups: list[dict[str, Any]], to_torch: bool) -> _Ctx:
    leaves, spec = tree.flatten(params)
    n_torch = sum(len(g["params"]) for g in groups)
    if n_torch != len(leaves):
        raise ValueError(
            f"the torch optimizer has {n_torch} parameters but params has {len(leaves)} leaves"
        )
    named = _named_order(params, order, groups)
    paths, pos_of_leaf = _positions(params, named)
    shapes = [leaf.shape for leaf in leaves]
    group_of = [i for i, g in enumerate(groups) for _ in g["params"]]
    ctx = _Ctx(paths, shapes, pos_of_leaf, spec, {}, {}, None, to_torch, groups, group_of)
    if named is None:
        # Param groups built from net.parameters() in another order (weights, then biases)
        # record no names; the user cannot guess that order= is the way out.
        ctx.order_hint = (
            "; torch's parameters were taken in params' insertion order (its param_groups name "
            "none): for groups built in another order, pass order=[params keys in torch's order]"
        )
    return ctx


def _required(family: str, group: dict[str, Any]) -> set[str]:
    """The fields torch's ``step`` reads for a parameter of ``group``."""
    if family == "sgd":
        return {"momentum_buffer"} if group.get("momentum", 0) != 0 else set()
    if family == "rmsprop":
        need = {"square_avg"}
        need |= {"grad_avg"} if group.get("centered") else set()
        return need | ({"momentum_buffer"} if group.get("momentum", 0) > 0 else set())
    return {
        "adam": {"exp_avg", "exp_avg_sq"},
        "radam": {"exp_avg", "exp_avg_sq"},
        "adamax": {"exp_avg", "exp_inf"},
        "adagrad": {"sum"},
        "adadelta": {"square_avg", "acc_delta"},
    }[family]


def _scalar_dtype() -> torch.dtype:
    # torch.optim's _get_scalar_dtype(): the step's dtype when neither fused nor capturable.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
