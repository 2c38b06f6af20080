"""Which optimizers give the same numbers on a sharded (ZeRO-1) optimizer state.

With ``shard_optimizer=True`` every rank runs the optimizer on its *piece* of each parameter
(a block of rows; see :mod:`functrain.distributed.zero`). That is exact for transforms that
treat every element on its own (Adam, SGD with momentum, weight decay, …), and wrong for those
that need information about a whole parameter or the whole gradient. :func:`check_shardable`
looks inside a transform (``chain``, ``masked``, ``partition``, ``inject_hyperparams``,
``MultiSteps`` …) and raises :class:`~functrain.distributed.ShardingError` naming every
transform that would give different numbers, instead of training silently differently.

**Supported (exact):** ``sgd`` (momentum, nesterov), ``adam``, ``adamw``, ``nadam``,
``nadamw``, ``radam``, ``amsgrad``, ``adamax``, ``rmsprop``, ``adagrad``, ``lion``,
``sign_sgd`` and their building blocks ``scale``, ``scale_by_learning_rate``,
``scale_by_schedule``, ``scale_by_sign``, ``scale_by_adam``, ``scale_by_amsgrad``,
``scale_by_adamax``, ``scale_by_radam``, ``scale_by_lion``, ``scale_by_rms``,
``scale_by_rss``, ``scale_by_stddev``, ``trace``, ``ema``, ``add_decayed_weights``, ``clip``,
``identity``, ``set_to_zero``; the wrappers ``chain``, ``named_chain``, ``masked``,
``partition``/``multi_transform``, ``freeze``, ``selective_transform``,
``inject_hyperparams`` and ``MultiSteps`` (without ``should_skip_update_fn``) around them.
Masks and labels given as functions of the parameters see each rank's pieces: those pieces
keep the number of dimensions and all but one size of the parameter (a 0-d parameter is
replicated, not cut), so masks such as ``p.ndim > 1`` work; functions of exact shapes or
element counts may not: the step evaluates every such function on every rank's pieces (on
shapes only, at its first call: :func:`check_masks_agree`) and raises
:class:`~functrain.distributed.ShardingError` where a piece would get another mask or label
than its parameter.

**Supported through the step:** ``clip_by_global_norm`` as the *first* transform of the chain
(as in ``chain(clip_by_global_norm(1.0), adamw(...))``): the step computes the global gradient
norm with one extra all-reduce of a scalar and clips before the optimizer, after which the
in-chain clip leaves the (already clipped) pieces unchanged.

**Not supported (raise):** ``clip_by_global_norm`` anywhere else; ``scale_by_trust_ratio``
(``lamb``, ``lars``: per-parameter norms); ``clip_by_block_rms``,
``scale_by_param_block_norm``/``_rms``, ``adaptive_grad_clip`` (per-parameter or per-unit
norms); ``scale_by_factored_rms`` (``adafactor``: row and column statistics); ``add_noise``
(``noisy_sgd``: noise tied to positions in a parameter); ``apply_if_finite`` (one decision
for the whole gradient); ``zero_nans`` (per-parameter flags in its state);
``MultiSteps(should_skip_update_fn=...)``. Use them with ``shard_optimizer=False``.

**Your own transforms** are refused unless you declare them elementwise with
:func:`elementwise`.

Example:
    >>> import functrain as ft
    >>> from functrain import distributed as dist
    >>> dist.check_shardable(ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-3))).leading_clip
    1.0
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.distributed.errors import ShardingError
from functrain.optim.base import GradientTransformation

__all__ = ["ShardingReport", "check_shardable", "elementwise"]

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
    "add_noise": "draws noise tied to positions inside each parameter (noisy_sgd)",
    # Never wrap these with elementwise(): every rank would draw its shard's noise from the same
    # positions of the same stream, so the shards' noise would not be the whole tree's.
    "dp_noisy_mean": "draws DP noise tied to positions inside each parameter; do not wrap it "
    "with elementwise(), which would correlate the noise of the shards",
    "differentially_private_aggregate": "draws DP noise tied to positions inside each "
    "parameter; do not wrap it with elementwise(), which would correlate the noise of the shards",
    "apply_if_finite": "decides on the finiteness of the whole gradient (the step's own "
    "nonfinite='skip', the default, skips non-finite steps on every rank and works sharded)",
    "zero_nans": "keeps one NaN flag per whole parameter in its state",
}

_MARK = "_functrain_elementwise"
_NOISE = frozenset({"add_noise", "dp_noisy_mean", "differentially_private_aggregate"})


class ShardingReport(NamedTuple):
    """What :func:`check_shardable` found.

    Attributes:
        leading_clip: ``max_norm`` of a ``clip_by_global_norm`` that is the first transform
            (the step then clips with the global norm), else ``None``.
        transforms: the names of the transforms found, in the order visited.

    Example:
        >>> import functrain as ft
        >>> from functrain import distributed as dist
        >>> dist.check_shardable(ft.sgd(0.1)).leading_clip is None
        True
    """

    leading_clip: float | torch.Tensor | None
    transforms: tuple[str, ...]


def elementwise(tx: GradientTransformation) -> GradientTransformation:
    """Declares a custom transform elementwise, so a sharded optimizer state accepts it.

    "Elementwise" means: each output element depends only on the same element of the updates,
    the parameters and the state (scalars such as step counts aside), and ``init`` gives state
    leaves that are either independent of the parameters or have each parameter's shape. Such
    a transform gives the same numbers on a parameter's piece as on the whole parameter.
    :func:`check_shardable` trusts the declaration and does not look inside.

    Args:
        tx: the transform to declare (anything with ``init`` and ``update``); not modified.

    Returns:
        A new ``GradientTransformation`` with ``tx.init`` and an ``update`` that calls
        ``tx.update`` unchanged, marked as elementwise.

    Raises:
        TypeError: ``tx`` lacks ``init`` or ``update``.
        ValueError: ``tx`` contains a noise transform (``add_noise``, ``dp_noisy_mean``,
            ``differentially_private_aggregate``), whose noise would differ on shards.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain import distributed as dist
        >>> halve = dist.elementwise(ft.stateless(lambda u, p: ft.tree.scale(0.5, u)))
        >>> dist.check_shardable(halve).transforms
        ('elementwise',)
    """
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"expected a GradientTransformation, got {type(tx).__name__}")
    walk = _Walk()
    walk.visit(tx, "", head=False)
    noisy = sorted(set(walk.names) & _NOISE)
    if noisy:
        raise ValueError(
            f"elementwise(tx): tx contains {', '.join(noisy)}, whose noise is tied to positions "
            "inside each parameter; on shards it would not be the whole tree's noise (for DP, "
            "correlated noise weakens the guarantee). Use shard_optimizer=False"
        )
    inner = tx.update

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        return inner(updates, state, params, **extra)

    setattr(update_fn, _MARK, True)
    return GradientTransformation(tx.init, update_fn)


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


def check_shardable(tx: GradientTransformation) -> ShardingReport:
    """Checks that ``tx`` gives the same numbers on a sharded optimizer state.

    See the module documentation for the exact list of supported transforms. The check reads
    the structure of ``tx`` (the transforms it was built from), not its numbers.

    Args:
        tx: the optimizer.

    Returns:
        A :class:`ShardingReport`.

    Raises:
        ShardingError: listing every transform that cannot run sharded, and why.

    Example:
        >>> import functrain as ft
        >>> from functrain import distributed as dist
        >>> dist.check_shardable(ft.adamw(1e-3)).transforms
        ('chain', 'scale_by_adam', 'add_decayed_weights', 'scale')
        >>> try:
        ...     dist.check_shardable(ft.lamb(1e-3))
        ... except dist.ShardingError as err:
        ...     print(str(err).splitlines()[1])
          chain/scale_by_trust_ratio: needs each parameter's whole norm (trust ratios of lamb / lars)
    """
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"tx must be a GradientTransformation, got {type(tx).__name__}")
    walk = _Walk()
    walk.visit(tx, "", head=True)
    if walk.problems:
        raise ShardingError(
            "this optimizer cannot run on a sharded optimizer state (shard_optimizer=True) "
            "with the same numbers:\n"
            + "\n".join(f"  {p}" for p in walk.problems)
            + "\nUse shard_optimizer=False (each rank keeps the whole optimizer state)."
        )
    return ShardingReport(walk.leading_clip, tuple(walk.names))


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, torch.Tensor) else f"a tensor {tuple(value.shape)}"


def _same(a: Any, b: Any) -> bool | None:
    """Whether two mask or label leaves are equal (``None``: cannot tell, e.g. meta tensors)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return None
    try:
        return bool(a == b)
    except Exception:
        return None


def check_masks_agree(tx: GradientTransformation, params: Any, layout: Any) -> None:
    """Raises :class:`ShardingError` if a mask or label function of ``tx`` gives a piece of some
    rank another value than its whole parameter (internal).

    Evaluated on meta tensors (no memory) for every rank's pieces, so every rank reaches the
    same verdict without a collective. ``layout`` is a :class:`functrain.distributed.zero.Layout`.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain.distributed import zero
        >>> from functrain.distributed.shardable import check_masks_agree
        >>> params = {"w": torch.zeros(4, 3)}
        >>> tx = ft.masked(ft.trace(0.9), lambda p: {"w": p["w"].shape[0] == 4})
        >>> layout = zero.Layout(ft.tree.leaves(params), 0, 2, 25.0)
        >>> try:
        ...     check_masks_agree(tx, params, layout)
        ... except ft.distributed.ShardingError as err:
        ...     print(str(err).splitlines()[1])
          masked: params['w'] is True on the whole parameter (4, 3), False on rank 0's piece (2, 3)
    """
    functions = mask_functions(tx)
    if not functions or layout.world_size == 1:
        return
    leaves, spec = tree.flatten(params)
    paths = tree.flatten_with_paths(params)[0]

    def on(shapes: Sequence[torch.Size], fn: Any) -> Any:
        metas = [torch.empty(s, dtype=x.dtype, device="meta") for x, s in zip(leaves, shapes)]
        return fn(tree.unflatten(spec, metas))

    problems = []
    for where, fn in functions:
        try:
            whole = tree.flatten_with_paths(on([x.shape for x in leaves], fn))
        except Exception:  # a mask of values, not shapes: nothing to compare on meta tensors
            continue
        for r in range(layout.world_size):
            shapes = [s.local_shape(r) for s in layout.shards]
            try:
                piece = tree.flatten_with_paths(on(shapes, fn))
            except Exception as err:
                problems.append(
                    f"{where}: the function fails on rank {r}'s pieces ({type(err).__name__}: "
                    f"{err})"
                )
                break
            if piece[2] != whole[2]:
                problems.append(f"{where}: its result has another structure on rank {r}'s pieces")
                break
            bad = next(
                (
                    (p, a, b)
                    for p, a, b in zip(whole[0], whole[1], piece[1])
                    if _same(a, b) is False
                ),
                None,
            )
            if bad is not None:
                path, a, b = bad
                # The leaf of the same path in the parameters, for its shapes (a prefix mask
                # names a subtree: then no shape).
                i = next((k for k, q in enumerate(paths) if q == path), None)
                shapes_note = (
                    ("", "")
                    if i is None
                    else (f" {tuple(leaves[i].shape)}", f" {tuple(shapes[i])}")
                )
                problems.append(
                    f"{where}: {tree.path_str(path, 'params')} is {_describe(a)} on the whole "
                    f"parameter{shapes_note[0]}, {_describe(b)} on rank {r}'s piece"
                    f"{shapes_note[1]}"
                )
                break
    if problems:
        raise ShardingError(
            "a mask or label function gives the pieces of a sharded optimizer state "
            "(shard_optimizer=True) other values than the whole parameters, so the pieces "
            "would be transformed differently:\n"
            + "\n".join(f"  {p}" for p in problems)
            + "\nMake it depend on p.ndim or on names, not on exact shapes, or use "
            "shard_optimizer=False."
        )
