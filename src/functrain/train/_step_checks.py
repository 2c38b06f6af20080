"""Input validation for train and eval steps: arguments, states and parameter structure.

Everything here runs eagerly on the host before a step's tensor work (never under
``torch.compile``) and raises path-named errors that say how to fix the call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from functrain import tree
from functrain.optim.base import GradientTransformation
from functrain.train import microbatch
from functrain.train.state import TrainState

__all__: list[str] = []  # internal: used by make_train_step, make_eval_step and distributed


def _check_step_args(
    loss_fn: Callable[..., Any],
    tx: GradientTransformation,
    micro_batches: Any,
    strategy: str,
    chunk_size: Any,
    grad_backend: str,
    flags: dict[str, Any],
) -> None:
    """Raises unless ``make_train_step``'s arguments (``flags``: the bool options) are valid."""
    if strategy not in ("loop", "vmap"):
        raise ValueError(f"strategy must be 'loop' or 'vmap', got {strategy!r}")
    if grad_backend not in ("auto", "func", "autograd"):
        raise ValueError(f"grad_backend must be 'auto', 'func' or 'autograd', got {grad_backend!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"tx must be a GradientTransformation, got {type(tx).__name__}")
    _check_micro_batches(micro_batches)
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")


class _StructureGuard:
    """Remembers the params' structure and shapes of the first step and checks later ones."""

    def __init__(self) -> None:
        self.spec: Any = None
        self.shapes: tuple[torch.Size, ...] = ()
        self.dtypes: tuple[torch.dtype, ...] = ()
        self.reference: Any = None

    def check(self, params: Any) -> list[Any]:
        """Raises unless ``params`` has the first step's structure; returns its leaves."""
        leaves, spec = tree.flatten(params)
        shapes = tuple(leaf.shape for leaf in leaves)
        dtypes = tuple(leaf.dtype for leaf in leaves)
        if self.spec is None:
            self.spec, self.shapes, self.dtypes = spec, shapes, dtypes
            self.reference = tree.unflatten(spec, [torch.empty(s, device="meta") for s in shapes])
            return leaves
        if spec == self.spec and shapes == self.shapes:
            if dtypes != self.dtypes:
                self._dtype_changed(params, dtypes)
            return leaves
        try:
            tree.check_shapes(self.reference, params, ("first step's params", "state.params"))
        except tree.TreeMismatchError as err:
            raise tree.TreeMismatchError(
                f"state.params changed structure since this step was first called ({err}); "
                "a step, its optimizer state and its model belong to one parameter structure: "
                "build a new state (and step) for the new model"
            ) from None
        raise tree.TreeMismatchError(
            f"state.params changed structure since this step was first called: {spec} vs "
            f"{self.spec}"
        )

    def _dtype_changed(self, params: Any, dtypes: tuple[torch.dtype, ...]) -> None:
        # The optimizer state (moments, loss scale) was made for the first dtypes: a cast of
        # the params alone would mix precisions silently.
        paths, _, _ = tree.flatten_with_paths(params)
        i = next(i for i, (a, b) in enumerate(zip(dtypes, self.dtypes)) if a != b)
        raise tree.TreeMismatchError(
            f"state.params changed dtype since this step was first called: "
            f"{tree.path_str(paths[i], 'params')} is {dtypes[i]}, was {self.dtypes[i]}; the "
            "optimizer state was made for the old dtypes: cast the params before "
            "ft.TrainState.create and build a new state (and step) for the new dtypes"
        )


def _check_micro_batches(micro_batches: Any) -> None:
    def positive(n: Any) -> bool:
        k = microbatch._as_int(n)  # numpy integers too (sizes from np.bincount), not bools
        return k is not None and k >= 1

    sizes = (
        micro_batches
        if isinstance(micro_batches, Sequence) and not isinstance(micro_batches, str)
        else None
    )
    if not (positive(micro_batches) or (sizes and all(positive(s) for s in sizes))):
        raise ValueError(
            "micro_batches must be a positive int (the number of micro-batches) or a non-empty "
            f"sequence of positive ints (their sizes), got {micro_batches!r}"
        )


def _check_opt_state(tx: GradientTransformation, params: Any, opt_state: Any) -> None:
    """Raises a path-named error when ``opt_state`` is not of the kind ``tx.init`` makes.

    ``tx.init`` runs on meta tensors (no memory, no numbers; the CPU generator is restored in
    case an init draws from it). An init that cannot run on meta tensors is not checked.
    """
    meta = tree.map(lambda p: torch.empty_like(p, device="meta"), params)
    try:
        with torch.random.fork_rng(devices=[]):
            expected = tx.init(meta)
    except Exception:  # best effort: the update then fails on its own terms
        return
    if tree.structure(expected) == tree.structure(opt_state):
        _check_opt_devices(params, expected, opt_state)
        return
    hint = (
        "state.opt_state was not made by this step's optimizer: create the state with the "
        "same tx (ft.TrainState.create(params=..., tx=tx))"
    )
    try:
        tree.check_shapes(expected, opt_state, ("tx.init(params)", "state.opt_state"))
    except tree.TreeMismatchError as err:
        raise tree.TreeMismatchError(f"{hint}; {err}") from None
    raise tree.TreeMismatchError(
        f"{hint}; node types differ: {tree.structure(opt_state)} vs {tree.structure(expected)}"
    )


def _check_opt_devices(params: Any, expected: Any, opt_state: Any) -> None:
    """Raises a path-named error for an ``opt_state`` leaf off the device of all the params.

    Only where the params share one device, and only for the leaves that ``tx.init`` derived
    from the params (meta in ``expected``; moments, traces) and that are not 0-d (a 0-d CPU
    tensor mixes with accelerator tensors): those must live with the params, or ``tx.update``
    fails inside torch with an error that names no leaf (a state half moved to an accelerator).
    """
    devices = {p.device for p in tree.leaves(params)}
    if len(devices) != 1:
        return
    (device,) = devices
    paths, leaves, _ = tree.flatten_with_paths(opt_state)
    for path, leaf, want in zip(paths, leaves, tree.leaves(expected)):
        if (
            isinstance(leaf, torch.Tensor)
            and isinstance(want, torch.Tensor)
            and want.is_meta
            and want.dim() > 0
            and leaf.device != device
        ):
            raise ValueError(
                f"{tree.path_str(path, 'state.opt_state')} is on {leaf.device}, the params on "
                f"{device}: create the state from the params where they live, or move its "
                "opt_state with them"
            )


def _check_state(state: Any, where: str) -> TrainState:
    if not isinstance(state, TrainState):
        raise TypeError(f"{where} expects a ft.TrainState, got {type(state).__name__}")
    if state.consumed:
        state.step  # noqa: B018  (raises ConsumedStateError with the explanation)
    return state


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage that ``t`` may touch: ``[start, stop)``."""
    size = t.element_size()
    start = t.storage_offset() * size
    if t.numel() == 0:
        return start, start
    last = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return start, start + (last + 1) * size


# Exact answers of _share_bytes, keyed by the two views' geometry: the check runs every step,
# and interleaved views (columns of one matrix) would otherwise redo an O(numel) test each time.
_SHARED_CACHE: dict[tuple[Any, ...], bool] = {}


def _geometry(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.element_size())


def _share_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views of one storage whose byte spans intersect share a byte.

    Spans intersect for disjoint interleaved views too (``w[:, :3]`` and ``w[:, 3:]``), which
    an in-place update writes once each, so spans alone would refuse legal parameters. The
    views' geometry is replayed on a host mask (one byte per unit of the joint span; the units
    are elements when both views' elements have one size): no parameter data is read.
    """
    key = (_geometry(a), _geometry(b))
    if key in _SHARED_CACHE:
        return _SHARED_CACHE[key]
    unit = a.element_size() if a.element_size() == b.element_size() else 1
    views = []
    for t in (a, b):
        scale = t.element_size() // unit  # 1, or the element size when counting bytes
        shape, stride = list(t.shape), [s * scale for s in t.stride()]
        if scale > 1:  # each element covers `scale` consecutive bytes
            shape, stride = [*shape, scale], [*stride, 1]
        views.append((shape, stride, t.storage_offset() * scale))
    base = min(off for _, _, off in views)
    end = max(_span(t)[1] for t in (a, b)) // unit
    mask = torch.zeros(end - base, dtype=torch.bool)
    (shape, stride, off), (shape_b, stride_b, off_b) = views
    mask.as_strided(shape, stride, off - base).fill_(True)
    shared = bool(mask.as_strided(shape_b, stride_b, off_b - base).any())
    if len(_SHARED_CACHE) > 4096:  # geometries are per parameter; bound it all the same
        _SHARED_CACHE.clear()
    _SHARED_CACHE[key] = shared
    return shared


def _check_no_overlap(leaves: list[torch.Tensor], params: Any, where: str) -> None:
    """Raises when two parameter leaves share memory, which an in-place update would write
    twice (a tied weight given as two leaves of one tensor, overlapping views).

    Disjoint views of one buffer are fine, interleaved ones included. Only the storages'
    addresses and the views' geometry are read: no sync.
    """
    storages: list[int | None] = [leaf.untyped_storage().data_ptr() for leaf in leaves]
    if len(set(storages)) == len(storages):
        return  # the common case, checked with no per-leaf work beyond the address
    # Meta tensors have no memory (every meta storage reports address 0), so they cannot
    # overlap: they are left out rather than all reported as sharing one storage.
    storages = [None if leaf.is_meta else ptr for leaf, ptr in zip(leaves, storages)]
    real = [ptr for ptr in storages if ptr is not None]
    if len(set(real)) == len(real):
        return
    by_storage: dict[int, list[int]] = {}
    for i, ptr in enumerate(storages):
        if ptr is not None:
            by_storage.setdefault(ptr, []).append(i)
    for indices in by_storage.values():
        # The leaves seen so far whose span may still reach later ones, by span end.
        active: list[tuple[int, int]] = []
        for (start, stop), j in sorted((_span(leaves[i]), i) for i in indices if leaves[i].numel()):
            active = [(end, k) for end, k in active if end > start]
            shared = [k for _, k in active if _share_bytes(leaves[k], leaves[j])]
            if shared:
                i = shared[0]
                paths = tree.flatten_with_paths(params)[0]
                first, second = (tree.path_str(paths[k], "params") for k in sorted((i, j)))
                raise ValueError(
                    f"{where}: {first} and {second} overlap in memory, and a donating step updates "
                    "parameters in place, so the shared elements would be updated twice. Give "
                    "a tied weight as one leaf, build the state with TrainState.create(..., "
                    "copy=True) (the default), or use donate=False"
                )
            active.append((stop, j))


def consume_torn(state: TrainState, err: BaseException, by: str) -> None:
    """Consumes a donated state that a failing step may have half-updated, and says so in
    ``err`` (a step that fails before it writes into the state's memory leaves it usable)."""
    state._consume(f"{by}, which failed while updating it in place")
    err.add_note(
        "functrain: the step failed while writing its update into the donated state's memory, "
        "so that state may be half-updated and is consumed (using it raises "
        "ConsumedStateError); resume from a checkpoint"
    )


class OptStateGuard:
    """Checks at every call, not only the first, that a state's ``opt_state`` was made for the
    step's optimizer.

    A state built for another optimizer and passed to a step that has run already would
    otherwise fail deep in ``tx.update`` or, where that ignores the state (``sgd`` given an
    Adam state), run silently with it. Free for the state the step returned last (a weak
    reference); another state costs one structure flatten, and ``check(params, opt_state)``
    the first time its structure is seen.
    """

    def __init__(self, check: Callable[[Any, Any], None]) -> None:
        self._check = check
        self._issued: weakref.ref[TrainState] | None = None
        self._specs: set[Any] = set()

    def check(self, state: TrainState, params: Any, opt_state: Any) -> None:
        """Raises unless ``opt_state`` (``state``'s) is one the step's optimizer makes."""
        issued = self._issued
        if issued is not None and issued() is state:
            return
        spec = tree.structure(opt_state)
        if spec not in self._specs:
            self._check(params, opt_state)
            self._specs.add(spec)

    def issue(self, state: TrainState) -> None:
        """Records the state the step returns (its ``opt_state`` is ``tx.update``'s)."""
        if self._issued is None:  # tx.update's structure, should it differ from tx.init's
            self._specs.add(tree.structure(state._opt_state))
        self._issued = weakref.ref(state)
