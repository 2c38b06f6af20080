"""``TrainState``: everything a training run carries from one step to the next, as one pytree.

A train state holds the step counter, the parameters, the optimizer state, the model's buffers
(BatchNorm running statistics and the like), a random key and an ``extra`` dict for add-ons
(e.g. moving averages of gradient statistics). It is registered with ``optree`` (and with
``torch.utils._pytree``), so ``ft.tree`` functions, checkpointing and ``torch.compile`` see through
it; paths read ``['params']['fc.weight']``.

**Donation.** A train step made with ``donate=True`` (the default) *consumes* the state it is
given: it may update the parameters' memory in place, and it empties the consumed object so that
the memory it held is released as soon as the step no longer needs it. Any later use of the
consumed object (reading a field, flattening it, passing it to a step) raises
:class:`ConsumedStateError` instead of silently reading stale or overwritten tensors. States
derived from one another with :meth:`TrainState.replace` share the fields not replaced, so they
share one lease on that memory: consuming any of them consumes them all. The check is a flag test
on attribute access: it costs nothing measurable.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
import torch.utils._pytree as torch_pytree

from functrain import _func_transforms, tree
from functrain.optim.base import GradientTransformation
from functrain.train import rng

__all__ = ["ConsumedStateError", "TrainState"]

_FIELDS = ("step", "params", "opt_state", "buffers", "key", "extra")


class ConsumedStateError(RuntimeError):
    """A train state was used after a donating train step consumed it.

    Example:
        >>> import functrain as ft
        >>> issubclass(ft.ConsumedStateError, RuntimeError)
        True
    """


def _check_tensor_tree(name: str, value: Any, floating: bool = False) -> None:
    paths, leaves, _ = tree.flatten_with_paths(value)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{tree.path_str(path, name)} must be a tensor, got {type(leaf).__name__}"
            )
        if floating and not (leaf.is_floating_point() or leaf.is_complex()):
            # Gradients exist only for floating-point (and complex) tensors.
            raise TypeError(
                f"{tree.path_str(path, name)} must be a floating-point tensor, got {leaf.dtype}"
            )


def _check_no_grad(name: str, value: Any) -> None:
    paths, leaves, _ = tree.flatten_with_paths(value)
    for path, leaf in zip(paths, leaves):
        if leaf.requires_grad and not _tracked_by_transform(leaf):
            # A step differentiates with torch.func and updates params in place: a leaf that
            # is part of an autograd graph failed deep inside the step with a cryptic message.
            raise ValueError(
                f"{tree.path_str(path, name)} requires grad; give detached tensors "
                "(tensor.detach(), sharing its memory) or build a new state with "
                "TrainState.create, which copies and detaches them"
            )


def _check_fields(changes: dict[str, Any]) -> None:
    """Validates the fields given to :meth:`TrainState.replace` (opt_state is the optimizer's)."""
    if "step" in changes:
        step = changes["step"]
        if not (isinstance(step, torch.Tensor) and step.dtype == torch.int64 and step.dim() == 0):
            got = (
                f"a {step.dtype} tensor of shape {tuple(step.shape)}"
                if isinstance(step, torch.Tensor)
                else type(step).__name__
            )
            raise TypeError(f"TrainState.replace: step must be a 0-d int64 tensor, got {got}")
    if changes.get("key") is not None:
        rng.key_seed(changes["key"])  # validates dtype, shape and device
    if "params" in changes:
        _check_tensor_tree("params", changes["params"], floating=True)
        _check_no_grad("params", changes["params"])
    if changes.get("buffers") is not None:
        _check_tensor_tree("buffers", changes["buffers"])
    extra = changes.get("extra")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"TrainState.replace: extra must be a dict, got {type(extra).__name__}")


def _tracked_by_transform(x: torch.Tensor) -> bool:
    """Whether ``x`` is an input (or a function of one) of an outer ``torch.func.grad``/``jvp``:
    its ``requires_grad`` is the transform's, not an autograd graph of the caller's."""
    return _func_transforms.differentiating() and torch._C._functorch.is_gradtrackingtensor(x)


def _owned(value: Any, copy: bool) -> Any:
    # Detached from any autograd graph, but not from an outer torch.func.grad/jvp: there the
    # state is a function of the transform's inputs (meta-learning through steps), and
    # detaching made every derivative through it silently zero.
    def own(x: torch.Tensor) -> torch.Tensor:
        x = x if _tracked_by_transform(x) else x.detach()
        return x.clone() if copy else x

    return optree.tree_map(own, value)


class _Lease:
    """The right to use a set of state tensors, shared by the states that hold them."""

    __slots__ = ("consumed_by",)

    def __init__(self) -> None:
        self.consumed_by: str | None = None


# The fields a donating step may write in place (the step counter and key it replaces).
_WRITTEN = ("params", "opt_state", "buffers", "extra")


def _storages(state: TrainState) -> set[int]:
    return {
        leaf.untyped_storage().data_ptr()
        for name in _WRITTEN
        for leaf in tree.leaves(getattr(state, "_" + name))
        if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().nbytes()
    }


def _shares_writable_memory(source: TrainState, derived: TrainState) -> bool:
    """Whether a donating step given one of the states could overwrite memory the other reads.

    A state whose params, opt_state, buffers and extra were all replaced by fresh tensors (a
    fork: ``replace(params=cloned, opt_state=tx.init(cloned))``) gets its own lease, so
    donating either leaves the other usable. Only storages' addresses are read: no sync.
    """
    if not {"params", "opt_state"} & set(_replaced(source, derived)):
        return True  # the common case (replace(key=...), prepare): shared, nothing to compare
    if torch.compiler.is_compiling() or _func_transforms.active():
        # Dynamo cannot trace untyped_storage() (a graph break, an error with fullgraph=True),
        # and traced tensors' storages are not the real ones; torch.func's wrapped tensors
        # have none ("Cannot access storage of TensorWrapper", replace() under grad or vmap):
        # assume sharing, the safe side.
        return True
    return not _storages(source).isdisjoint(_storages(derived))


def _replaced(source: TrainState, derived: TrainState) -> list[str]:
    return [n for n in _WRITTEN if getattr(source, "_" + n) is not getattr(derived, "_" + n)]


def _device_of(params: Any) -> torch.device:
    for leaf in tree.leaves(params):
        return leaf.device
    return torch.device("cpu")


class TrainState:
    """The state of a training run: step, params, opt_state, buffers, key and extra.

    Attributes:
        step: 0-d ``int64`` tensor on the params' device, the number of steps taken.
        params: pytree of parameter tensors (no ``requires_grad``, no ``.grad``).
        opt_state: the optimizer state, ``tx.init(params)``.
        buffers: pytree of model buffers (e.g. BatchNorm running statistics) or ``None``.
        key: random key (0-d ``int64`` CPU tensor, see :func:`functrain.random_key`) or
            ``None`` for no seeding.
        extra: dict of add-on states (e.g. gradient-statistics moving averages).

    Build it with :meth:`create`; derive modified copies with :meth:`replace`. A state consumed
    by a donating step raises :class:`ConsumedStateError` on any use.

    Example:
        >>> import torch, functrain as ft
        >>> state = ft.TrainState.create(params={"w": torch.zeros(2)}, tx=ft.sgd(0.1))
        >>> int(state.step), list(state.params)
        (0, ['w'])
        >>> len(ft.tree.leaves(state))  # step, w, key (sgd has no state, no buffers)
        3
    """

    __slots__ = (
        "__weakref__",  # a step recognises the state it returned (see TrainStep)
        "_buffers",
        "_consumed",
        "_extra",
        "_key",
        "_lease",
        "_opt_state",
        "_params",
        "_step",
    )

    def __init__(
        self,
        step: torch.Tensor,
        params: Any,
        opt_state: Any,
        buffers: Any = None,
        key: torch.Tensor | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self._step = step
        self._params = params
        self._opt_state = opt_state
        self._buffers = buffers
        self._key = key
        self._extra = {} if extra is None else extra
        self._consumed: str | None = None
        self._lease = _Lease()

    @classmethod
    def create(
        cls,
        *,
        params: Any,
        tx: GradientTransformation,
        buffers: Any = None,
        seed: int | None = 0,
        key: torch.Tensor | None = None,
        extra: dict[str, Any] | None = None,
        copy: bool = True,
    ) -> TrainState:
        """A fresh state at step 0: ``opt_state = tx.init(params)``.

        Args:
            params: pytree of parameter tensors (e.g. from :func:`functrain.functionalize`).
            tx: the optimizer, used only to initialise its state.
            buffers: model buffers pytree, or ``None``.
            seed: seed of the random key (ignored when ``key`` is given); ``None`` for no key,
                in which case steps leave the global random generators alone.
            key: an explicit random key (0-d ``int64`` CPU tensor).
            extra: initial add-on states.
            copy: copy ``params``, ``buffers`` and ``key`` so the state owns its memory
                (default). With ``copy=False`` the state shares your tensors, and a donating
                step updates them in place.

        Example:
            >>> import torch, functrain as ft
            >>> state = ft.TrainState.create(params=[torch.ones(2)], tx=ft.adam(1e-3), seed=1)
            >>> state.step.dtype, state.key.device.type
            (torch.int64, 'cpu')
        """
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise TypeError(f"tx must be a GradientTransformation, got {type(tx).__name__}")
        _check_tensor_tree("params", params, floating=True)
        if buffers is not None:
            _check_tensor_tree("buffers", buffers)
        params = _owned(params, copy)
        buffers = None if buffers is None else _owned(buffers, copy)
        if key is not None:
            rng._check_key(key)  # dtype, shape and device only: its value is not read
            key = key.clone() if copy else key
        elif seed is not None:
            key = rng.random_key(seed)
        step = torch.zeros((), dtype=torch.int64, device=_device_of(params))
        try:
            opt_state = tx.init(params)
        except Exception as err:
            # The optimizer's own message rarely says where it came from.
            err.add_note("raised by tx.init(params) in TrainState.create")
            raise
        return cls(step, params, opt_state, buffers, key, dict(extra or {}))

    def _get(self, name: str) -> Any:
        if self._consumed is not None or self._lease.consumed_by is not None:
            what = (
                f"this TrainState was consumed by {self._consumed}"
                if self._consumed is not None
                else "this TrainState shares tensors (through TrainState.replace) with a state "
                f"consumed by {self._lease.consumed_by}"
            )
            raise ConsumedStateError(
                f"{what}, which may have reused its memory; use the state that step returned "
                "(state, metrics = step(state, batch)), or build the step with donate=False "
                "to keep input states intact"
            )
        return getattr(self, "_" + name)

    step = property(lambda self: self._get("step"), doc="Step counter (0-d int64 tensor).")
    params = property(lambda self: self._get("params"), doc="Parameter pytree.")
    opt_state = property(lambda self: self._get("opt_state"), doc="Optimizer state.")
    buffers = property(lambda self: self._get("buffers"), doc="Model buffers pytree or None.")
    key = property(lambda self: self._get("key"), doc="Random key or None.")
    extra = property(lambda self: self._get("extra"), doc="Add-on states (a dict).")

    @property
    def consumed(self) -> bool:
        """Whether a donating step consumed this state, or a state that shares its tensors
        through :meth:`replace` (it can then no longer be used)."""
        return self._consumed is not None or self._lease.consumed_by is not None

    def _consume(self, by: str) -> None:
        self._get("step")
        self._consumed = self._lease.consumed_by = by
        # Drop the references so the consumed tensors are freed as soon as the step is done.
        self._step = self._params = self._opt_state = self._buffers = self._key = None
        self._extra = None

    def replace(self, **changes: Any) -> TrainState:
        """A copy with some fields replaced (the fields not named are shared, not copied).

        Because the two states share tensors, a donating step that consumes one of them
        consumes the other too: using either afterwards raises :class:`ConsumedStateError`
        rather than reading memory the step updated in place. A copy whose params, opt_state,
        buffers and extra hold no memory of the original (``replace(params=cloned,
        opt_state=tx.init(cloned))``) is independent of it.

        The new values are checked as :meth:`create` checks its arguments: ``step`` a 0-d
        ``int64`` tensor, ``key`` ``None`` or a valid key, ``params`` floating-point tensors
        that do not require grad, ``buffers`` ``None`` or tensors, ``extra`` a dict (``None``
        means ``{}``); ``opt_state`` is not checked.

        Raises:
            TypeError: an unknown field, or a value of the wrong type.
            ValueError: a key of the wrong shape or device, or params that require grad.

        Example:
            >>> import torch, functrain as ft
            >>> s = ft.TrainState.create(params=[torch.ones(1)], tx=ft.sgd(0.1))
            >>> s.replace(key=None).key is None
            True
        """
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise TypeError(f"TrainState has no fields {sorted(unknown)}; fields are {_FIELDS}")
        values = {name: self._get(name) for name in _FIELDS}
        _check_fields(changes)
        values.update(changes)
        derived = TrainState(**values)
        if _shares_writable_memory(self, derived):
            derived._lease = self._lease
        return derived

    def __repr__(self) -> str:
        if self._consumed is not None:
            return f"TrainState(<consumed by {self._consumed}>)"
        if self._lease.consumed_by is not None:
            return (
                f"TrainState(<shares tensors with a state consumed by {self._lease.consumed_by}>)"
            )
        n_params = tree.size(self._params)
        return (
            f"TrainState(step={_scalar_repr(self._step)}, params=<{n_params} elements in "
            f"{len(tree.leaves(self._params))} tensors>, opt_state=..., "
            f"buffers=<{len(tree.leaves(self._buffers))} tensors>, "
            f"key={_scalar_repr(self._key)}, extra={_names_repr(self._extra)})"
        )


# How many ``extra`` names a repr lists before summarising the rest as a count.
_REPR_NAMES = 8


def _scalar_repr(value: Any) -> str:
    """A repr of the step or key that never reads a device's memory (that would sync it)."""
    if not isinstance(value, torch.Tensor):
        return repr(value)
    if value.device.type == "cpu" and value.numel() == 1:
        return repr(value.item())
    return f"<{value.dtype} tensor of shape {tuple(value.shape)} on {value.device}>"


def _names_repr(extra: Any) -> str:
    """The first names of ``extra`` in insertion order (any key type), then how many more."""
    if not isinstance(extra, dict):
        return f"<{type(extra).__name__}>"
    names = [repr(k) for k in list(extra)[:_REPR_NAMES]]
    if len(extra) > _REPR_NAMES:
        names.append(f"... {len(extra) - _REPR_NAMES} more")
    return "[" + ", ".join(names) + "]"


def _flatten(state: TrainState) -> tuple[tuple[Any, ...], None, tuple[str, ...]]:
    return tuple(state._get(name) for name in _FIELDS), None, _FIELDS


def _unflatten(metadata: None, children: Any) -> TrainState:
    del metadata
    return TrainState(*children)


# ft.tree works on optree's global registry, so TrainState is registered there.
optree.register_pytree_node(
    TrainState,
    _flatten,
    _unflatten,
    namespace=getattr(optree.registry, "__GLOBAL_NAMESPACE"),
)


def _torch_flatten(state: TrainState) -> tuple[list[Any], tuple[str, ...]]:
    """The fields that are not ``None``, named by the context: torch's pytrees take ``None`` as
    a leaf, and ``torch.func.vmap`` over stacked states (an ensemble) refused a ``None`` key or
    buffers ("Got in_dim=0 for an input but the input is of type NoneType")."""
    values = _flatten(state)[0]
    present = tuple(n for n, v in zip(_FIELDS, values) if v is not None)
    return [v for v in values if v is not None], present


def _torch_unflatten(children: Any, present: tuple[str, ...]) -> TrainState:
    given = dict(zip(present, children))
    return TrainState(*(given.get(name) for name in _FIELDS))


torch_pytree.register_pytree_node(
    TrainState,
    _torch_flatten,
    _torch_unflatten,
    serialized_type_name="functrain.TrainState",
    flatten_with_keys_fn=lambda s: (
        [
            (torch_pytree.GetAttrKey(n), v)
            for n, v in zip(_torch_flatten(s)[1], _torch_flatten(s)[0])
        ],
        _torch_flatten(s)[1],
    ),
)
