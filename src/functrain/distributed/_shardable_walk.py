"""The walk through an optimizer's structure behind :func:`~functrain.distributed.check_shardable`.

Holds the tables of transforms known to be elementwise or refused on a sharded optimizer state,
the walker that looks inside ``chain``, ``masked``, ``partition``, ``inject_hyperparams``,
``MultiSteps`` … (reading closures, not numbers), and :func:`mask_functions`, which collects
the mask and label functions it meets. The public checks live in
:mod:`functrain.distributed.shardable`, which re-exports :func:`mask_functions`.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import torch

from functrain.optim.base import GradientTransformation

_ELEMENTWISE = frozenset(
    {
        "add_decayed_weights",
        "chain",
        "clip",
        "ema",
        "freeze",
        "identity",
        "masked",
        "multi_transform",
        "named_chain",
        "partition",
        "reduce_on_plateau",  # one scale for every element, from the global loss
        "scale",
        "scale_by_adam",
        "scale_by_adamax",
        "scale_by_amsgrad",
        "scale_by_learning_rate",
        "scale_by_lion",
        "scale_by_radam",
        "scale_by_rms",
        "scale_by_rss",
        "scale_by_schedule",
        "scale_by_sign",
        "scale_by_stddev",
        "schedule_free",  # per element, around its base optimizer (checked in turn)
        "selective_transform",
        "set_to_zero",
        "trace",
    }
)

_REFUSED = {
    "clip_by_global_norm": "needs the norm of the whole gradient; it is only supported as the "
    "first transform of the outermost chain (chain(clip_by_global_norm(...), ...)), not after "
    "another transform nor inside masked, partition, inject_hyperparams or MultiSteps",
    "scale_by_trust_ratio": "needs each parameter's whole norm (trust ratios of lamb / lars)",
    "clip_by_block_rms": "needs each parameter's whole RMS",
    "_scale_by_param_block": "needs each parameter's whole norm or RMS",
    "adaptive_grad_clip": "needs unit-wise norms over whole parameters",
    "scale_by_factored_rms": "keeps row and column statistics of whole matrices (adafactor)",
    # add_noise and dp_noisy_mean are supported (_POSITIONED below). Never wrap a noise
    # transform with elementwise(): it would not be told where its pieces sit, so every rank
    # would draw its shard's noise from the same positions, correlating the shards' noise.
    "differentially_private_aggregate": "takes per-example gradients (it clips and sums them), "
    "not a summed gradient; for DP-SGD across ranks use make_data_parallel_train_step("
    "..., per_example_clip=C) with dp_noisy_mean",
    "apply_if_finite": "decides on the finiteness of the whole gradient (the step's own "
    "nonfinite='skip', the default, skips non-finite steps on every rank and works sharded)",
    "zero_nans": "keeps one NaN flag per whole parameter in its state",
}

_MARK = "_functrain_elementwise"
_NOISE = frozenset({"add_noise", "dp_noisy_mean", "differentially_private_aggregate"})
# Noise drawn by position that the sharded step tells where each piece sits (``shard_index``),
# so each piece gets its slice of the whole parameter's noise. The positions come in the order
# of the whole update tree: under these wrappers, which hand their inner transforms part of the
# tree, a noise transform would not see that order.
_POSITIONED = frozenset({"add_noise", "dp_noisy_mean"})
_SUBTREE = frozenset({"masked", "partition", "multi_transform", "selective_transform", "freeze"})


def _closure(fn: Any) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None)
    if code is None or cells is None:
        return {}
    out = {}
    for name, cell in zip(code.co_freevars, cells):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    return out


def _transforms_in(value: Any, depth: int = 0) -> list[Any]:
    if depth > 4:
        return []
    if hasattr(value, "init") and hasattr(value, "update") and not isinstance(value, type):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _transforms_in(v, depth + 1)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _transforms_in(v, depth + 1)]
    return []


def _factory(fn: Any) -> str | None:
    """The functrain factory that made ``fn`` (outermost qualname part), or ``None``."""
    module = getattr(fn, "__module__", None) or ""
    qualname = getattr(fn, "__qualname__", None) or ""
    if not module.startswith("functrain."):
        return None
    return qualname.split(".<locals>.")[0] if ".<locals>." in qualname else qualname


class _Walk:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.problems: list[str] = []
        self.leading_clip: float | torch.Tensor | None = None
        self.masks: list[tuple[str, Any]] = []  # (where, mask or label function)

    def visit(self, tx: Any, where: str, head: bool) -> None:
        update = tx.update
        if getattr(update, _MARK, False):
            self.names.append("elementwise")
            return
        owner = getattr(update, "__self__", None)
        if isinstance(update, types.MethodType) and type(owner).__name__ == "MultiSteps":
            self.names.append("MultiSteps")
            if getattr(owner, "_should_skip_update_fn", None) is not None:
                self.problems.append(
                    f"{where}MultiSteps(should_skip_update_fn=...): the skip decision looks at "
                    "the whole gradient"
                )
            self.visit(owner.inner_opt, f"{where}MultiSteps/", head=False)
            return
        factory = _factory(update)
        if factory is None:
            self.problems.append(
                f"{where}{getattr(update, '__qualname__', type(update).__name__)}: a custom "
                "transform; if it is elementwise, wrap it with "
                "functrain.distributed.elementwise(tx)"
            )
            return
        closure = _closure(update)
        if factory == "wrapped_transform" or factory == "inject_hyperparams":
            self.names.append("inject_hyperparams")
            self._inject(closure, where)
            return
        if factory in ("stateless", "_stateless_map"):
            fn = closure.get("f", closure.get("fn"))
            inner = _factory(fn)
            if inner in (None, "stateless"):
                self.problems.append(
                    f"{where}stateless({getattr(fn, '__qualname__', fn)!r}): a custom function; "
                    "if it is elementwise, wrap the transform with "
                    "functrain.distributed.elementwise(tx)"
                )
                return
            factory = inner
        self.names.append(factory)
        if factory == "clip_by_global_norm":
            if head and self.leading_clip is None:
                self.leading_clip = closure.get("max_norm")
                return
            self.problems.append(f"{where}clip_by_global_norm: {_REFUSED[factory]}")
            return
        if factory in _REFUSED:
            self.problems.append(f"{where}{factory}: {_REFUSED[factory]}")
            return
        if factory in _POSITIONED:
            wrappers = sorted(_SUBTREE & set(where.split("/")))
            if wrappers:
                self.problems.append(
                    f"{where}{factory}: draws noise by position in the whole update tree, which "
                    f"{', '.join(wrappers)} hands only part of; put it outside that wrapper"
                )
            return
        if factory not in _ELEMENTWISE:
            self.problems.append(
                f"{where}{factory}: not known to be elementwise; if it is, wrap it with "
                "functrain.distributed.elementwise(tx)"
            )
            return
        mask_name = {
            "masked": "mask",
            "partition": "param_labels",
            "multi_transform": "param_labels",
        }
        if factory in mask_name:
            fn = _find(closure, (mask_name[factory],)).get(mask_name[factory])
            if callable(fn):
                self.masks.append((f"{where}{factory}", fn))
        first = True
        for name in sorted(closure) if factory not in ("chain", "named_chain") else ["txs"]:
            for inner_tx in _transforms_in(closure.get(name)):
                in_head = head and first and factory in ("chain", "named_chain")
                self.visit(inner_tx, f"{where}{factory}/", in_head)
                first = False

    def _inject(self, closure: dict[str, Any], where: str) -> None:
        # inject_hyperparams rebuilds its inner transform from the hyperparameters at every
        # update; rebuild it once here, with the values its init would use.
        found = _find(closure, ("build", "numeric", "schedules"))
        try:
            count = torch.zeros((), dtype=torch.int32)
            schedules = found.get("schedules", {})
            hparams = {**found.get("numeric", {}), **{k: f(count) for k, f in schedules.items()}}
            inner = found["build"](hparams)
        except Exception as err:
            self.problems.append(
                f"{where}inject_hyperparams: could not rebuild the inner transform to check it "
                f"({type(err).__name__}: {err})"
            )
            return
        self.visit(inner, f"{where}inject_hyperparams/", head=False)


def _find(closure: dict[str, Any], names: tuple[str, ...], depth: int = 3) -> dict[str, Any]:
    """The first values named ``names`` in ``closure`` or the closures of functions in it."""
    found: dict[str, Any] = {}
    frontier = [closure]
    for _ in range(depth):
        nested = []
        for variables in frontier:
            for name, value in variables.items():
                if name in names and name not in found:
                    found[name] = value
                elif callable(value) and not isinstance(value, type):
                    nested.append(_closure(value))
        frontier = nested
    return found


def mask_functions(tx: GradientTransformation) -> list[tuple[str, Any]]:
    """The mask and label functions of the ``masked`` / ``partition`` wrappers in ``tx`` (internal).

    Returns ``(where, function)`` pairs, ``where`` naming the wrapper as
    :func:`check_shardable`'s errors do.

    Example:
        >>> import functrain as ft
        >>> from functrain.distributed.shardable import mask_functions
        >>> [where for where, _ in mask_functions(ft.adamw(0.1, mask=lambda p: p))]
        ['chain/masked']
    """
    walk = _Walk()
    walk.visit(tx, "", head=True)
    return walk.masks
