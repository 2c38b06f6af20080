"""Helpers of the gradient stage: seeding, the backward call, and micro-batch size arithmetic.

Moved out of :mod:`functrain.train.gradient` (which re-exports them, so
``gradient._seeding`` and the others keep working): the buffer check, the per-micro-batch RNG
seeding context, the fast ``backward`` engine call, the ``torch.autograd.grad`` objective
wrapper, the small tensor helpers the stage's statistics use, and the backward loop's record
of per-micro-batch squared norms for a ``per_micro_batch_sq_norm`` hook.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from functrain import tree
from functrain._messages import message
from functrain._sq_norms import sq_norm
from functrain.train import _recompute, rng

__all__: list[str] = []

# The engine call behind torch.autograd.backward (private; the public function if it moves).
_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _check_buffers(old: Any, new: Any) -> None:
    if old is not None and tree.structure(old) != tree.structure(new):
        tree.check_shapes(old, new, ("state.buffers", "buffers returned by loss_fn"))
        raise tree.TreeMismatchError(
            "buffers returned by loss_fn differ in structure from state.buffers: "
            f"{tree.structure(new)} vs {tree.structure(old)}"
        )


_NO_SEEDING = contextlib.nullcontext()  # reusable: nullcontext keeps no state


def _seeding(
    key: torch.Tensor | None, seed: bool, devices: Sequence[torch.device]
) -> contextlib.AbstractContextManager[None]:
    if key is None or not seed:
        return _NO_SEEDING
    return rng.seeded_rng(key, devices)


def _devices(params: Any) -> list[torch.device]:
    """The params' devices, in first-seen order: the CUDA generators :func:`_seeding` seeds."""
    return list({leaf.device: None for leaf in tree.leaves(params)})


def _backward(
    objective: torch.Tensor, inputs: tuple[torch.Tensor, ...], plain_inputs: bool
) -> None:
    """``torch.autograd.backward(objective, inputs=inputs)`` for a scalar objective.

    A plain real 0-d tensor with plain tensor inputs (``plain_inputs``) takes the engine call
    directly: ``torch.autograd.backward``'s argument normalisation and checks are per-call
    Python that a small model's step notices (4 calls a step with K=4). Anything else (tensor
    subclasses and their ``__torch_function__``, functorch transforms, other shapes) goes
    through ``torch.autograd.backward`` and its checks and errors.
    """
    if (
        plain_inputs
        and _run_backward is not None
        and type(objective) is torch.Tensor
        and objective.dim() == 0
        and objective.requires_grad
        and objective.is_floating_point()
        and not torch._C._are_functorch_transforms_active()
    ):
        grad = torch.ones_like(objective, memory_format=torch.preserve_format)
        _run_backward(
            (objective,),
            (grad,),
            False,
            False,
            inputs,
            allow_unreachable=True,
            accumulate_grad=True,
        )
        return
    torch.autograd.backward(objective, inputs=inputs)


def _autograd_grad(objective: Callable[..., Any]) -> Callable[..., Any]:
    def grad_fn(
        params: Any, mb: Any, buffers: Any, key: Any, weight: float | None = None
    ) -> tuple[Any, dict]:
        leaves, spec = tree.flatten(params)
        leaves = [p.detach().requires_grad_() for p in leaves]
        with torch.enable_grad():
            with _recompute.recorded_calls() as calls:
                obj, payload = objective(tree.unflatten(spec, leaves), mb, buffers, key, weight)
            if obj.requires_grad:
                with _recompute.recomputing(calls):  # activation checkpointing's recompute
                    grads = torch.autograd.grad(
                        obj, leaves, allow_unused=True, materialize_grads=True
                    )
            else:  # independent of the params: zero, as torch.func.grad gives (grad would raise)
                grads = tuple(torch.zeros_like(p) for p in leaves)
        return tree.unflatten(spec, list(grads)), payload

    return grad_fn


# torch.func's refusal ("torch.func.{grad, vjp, jacrev, hessian} don't yet support saved tensor
# hooks"), raised when a saved-tensor hook is pushed under a torch.func transform.
_FUNC_HOOKS_REFUSAL = "support saved tensor hooks"


def _saved_tensor_hooks_error(err: BaseException, where: str) -> ValueError | None:
    """A clear error for torch.func's refusal of saved-tensor hooks in ``loss_fn``, or ``None``.

    ``err`` (or an exception it chains, as torch.compile's ``BackendCompilerFailed`` does) is
    matched by message, only once a gradient call has failed: nothing is probed per step.
    ``where`` names the option that chose torch.func (``"strategy='vmap'"``, ...).
    """
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if _FUNC_HOOKS_REFUSAL in message(cur):
            break
        seen.add(id(cur))
        cur = getattr(cur, "inner_exception", None) or cur.__cause__ or cur.__context__
    else:
        return None
    # Imported here: functrain.grads imports functrain.train. Same wording as the per-sample
    # functions' refusal.
    from functrain.grads._layer_rules import SAVED_TENSOR_HOOKS

    return ValueError(
        f"{where} takes gradients with torch.func, which cannot differentiate a loss_fn that "
        f"runs {SAVED_TENSOR_HOOKS}: activation checkpointing (use_reentrant=False, "
        "checkpoint_sequential) or offloading (save_on_cpu) in loss_fn. Use strategy='loop' "
        "with grad_backend='autograd' (the default 'auto' picks it for an eager loop step) "
        "and no compile=, or remove the checkpointing/offloading from loss_fn"
    )


def _inverse_count(count: torch.Tensor) -> torch.Tensor:
    """``1 / count``, and 0 where ``count`` is 0: the hook's scale of ``∇Tᵢ`` and ``Tᵢ``.

    A ``LossSum`` micro-batch that counts no unit (all padding) has no mean gradient; the hook
    gets zeros with size 0 (which weighs it out of any size-weighted statistic) rather than the
    NaN of ``∇Tᵢ / 0``. Selected on the device: no host read.
    """
    return torch.where(count != 0, count.reciprocal(), 0.0)


def _size_dtype(value: torch.Tensor) -> torch.dtype:
    """Micro-batch sizes as floats that hold them exactly (bfloat16 rounds 257 to 256)."""
    return torch.promote_types(value.dtype, torch.float32)


def _permute(vec: torch.Tensor, perm: list[int]) -> torch.Tensor:
    # Indexing with Python ints keeps everything on the device (no index tensor to upload).
    return torch.stack([vec[j] for j in perm])


class _SqNormRecord:
    """The per-micro-batch ``‖ĝᵢ‖²`` of a :attr:`GradStatsHook.per_micro_batch_sq_norm` hook in
    the backward loop: a hook on each step-local leaf takes the squared norm of the gradient
    backward hands it before it is added into ``.grad`` (once per leaf and backward, all uses
    of a tied leaf summed), so no micro-batch gradient is kept.

    With ``units`` (a fresh :class:`~functrain.CosineAccumulator` of the leaves, for a hook
    with :attr:`GradStatsHook.accumulates_unit_gradients`) it also adds each micro-batch's unit
    gradient into ``units.unit_sum``. ``ĝᵢ/‖ĝᵢ‖`` is the unit vector of the gradient backward
    produces (a positive multiple of ``ĝᵢ``), so neither weights nor the loss scale come off:
    after the first backward that gradient is ``.grad`` itself; later ones are held from their
    hooks until the micro-batch ends (at most one micro-batch's gradients, as
    ``torch.autograd.grad`` would return them), while backward still sums them in place.
    """

    def __init__(self, leaves: list[torch.Tensor], units: Any = None, spec: Any = None) -> None:
        self.parts: list[torch.Tensor] = []  # this micro-batch's per-leaf squared norms
        self.losses: list[torch.Tensor] = []
        self.sizes: list[torch.Tensor] = []
        self.values: list[dict[str, torch.Tensor]] = []
        # Set around the step's own backward call (:meth:`backward`): a gradient that loss_fn
        # takes itself (a gradient penalty's torch.autograd.grad) reaches the same hooks and
        # must not count.
        self.recording = False
        self.leaves = leaves
        self.units = units
        self.unit_leaves = None if units is None else tree.leaves(units.unit_sum)
        self.held: list[tuple[int, torch.Tensor]] = []  # (leaf index, gradient) to add
        # Whether this micro-batch's unit gradient is read from .grad (the first backward) or
        # from the gradients its hooks hold.
        self.from_grad = False
        self.hold = False
        self.spec = spec  # the params' structure, for the sparse error's path
        self.handles = [
            leaf.register_hook(functools.partial(self._square, i)) for i, leaf in enumerate(leaves)
        ]

    def backward(
        self, objective: torch.Tensor, inputs: tuple[torch.Tensor, ...], plain: bool
    ) -> None:
        """The step's own backward pass (:func:`_backward`), whose gradients the hooks take."""
        # The first micro-batch's gradients are read from .grad, unless loss_fn ran a backward
        # of its own into it (not counted, as later micro-batches' hooks do not count it).
        self.from_grad = (
            self.units is not None
            and self.units.count == 0
            and all(leaf.grad is None for leaf in self.leaves)
        )
        self.hold = self.units is not None and not self.from_grad
        self.recording = True
        try:
            _backward(objective, inputs, plain)
        finally:
            self.recording = False

    def _square(self, index: int, grad: torch.Tensor) -> None:
        if not self.recording:
            return
        if grad.layout != torch.strided:  # the step's clear error, not a crash in sq_norm
            _check_dense_grads(self._with(index, grad))
        if self.hold:
            self.held.append((index, grad))
        # Not the BLAS dot: MKL's sdot/ddot gave different bits for the same values at
        # another memory offset (a view a cat's backward hands over) or thread count;
        # sq_norm's are the same (see functrain._sq_norms).
        wide = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else None
        self.parts.append(sq_norm(grad, wide))

    def micro_batch(
        self, stage: Any, meta: Any, size: int, weight: float, payload: dict[str, Any]
    ) -> None:
        """Hands the hook this micro-batch's unweighted, unscaled ``‖ĝᵢ‖²`` and its size."""
        value, inverse = stage._unscaled(payload["value"], None)
        parts, self.parts = self.parts, []
        if parts:
            sq = torch.stack(parts).sum() if len(parts) > 1 else parts[0]
        else:  # no parameter got a gradient
            sq = torch.zeros((), dtype=_size_dtype(value), device=value.device)
        raw = sq
        if meta.is_sum:  # ∇Tᵢ, to be divided by the count
            b = payload["count"]
            factor = _inverse_count(b)
            self.losses.append(value * factor)
            self.sizes.append(b)
            sq = sq * factor.to(sq.dtype).square()
        else:  # wᵢ∇Lᵢ: the objective was weighted before differentiation
            b = torch.full((), size, dtype=_size_dtype(value), device=value.device)
            self.losses.append(value)
            sq = sq / (weight * weight)
        if inverse is not None:
            sq = sq * inverse.to(sq.dtype).square()
        assert stage.sq_norm_hook is not None
        self.values.append(stage.sq_norm_hook(sq, b))
        if self.units is not None:
            self._add_unit(raw, None if not meta.is_sum else factor != 0)

    def _add_unit(self, sq_norm: torch.Tensor, counts: torch.Tensor | None) -> None:
        """Adds this micro-batch's unit gradient (``sq_norm``: the squared norm of the
        gradient backward produced) into ``units``; drops the held gradients."""
        from functrain.grads import cosine  # functrain.grads imports functrain.train

        units = self.units
        divisor, unit_sq = cosine._unit_divisor(sq_norm, units.unit_sq_sum, counts)
        if self.from_grad:  # the first backward's gradients are the .grad tensors
            held = [(i, leaf.grad) for i, leaf in enumerate(self.leaves) if leaf.grad is not None]
        else:  # empty without a backward this micro-batch (a loss that ignores the params)
            held, self.held = self.held, []
        self.from_grad = self.hold = False
        assert self.unit_leaves is not None
        if held:
            added = cosine._add_units_in_place(
                [self.unit_leaves[i] for i, _ in held], [g for _, g in held], divisor
            )
            for (i, _), a in zip(held, added):
                self.unit_leaves[i] = a
        self.units = units._replace(unit_sq_sum=unit_sq, count=units.count + 1)

    @property
    def accumulated(self) -> Any:
        """The :class:`~functrain.CosineAccumulator` formed so far (``None`` without units)."""
        if self.units is None:
            return None
        assert self.unit_leaves is not None
        spec = tree.structure(self.units.unit_sum)
        return self.units._replace(unit_sum=tree.unflatten(spec, self.unit_leaves))

    def _with(self, index: int, grad: torch.Tensor) -> Any:
        """The leaves with ``grad`` at ``index``, as the params' pytree where it is known."""
        leaves = [grad if j == index else leaf for j, leaf in enumerate(self.leaves)]
        return leaves if self.spec is None else tree.unflatten(self.spec, leaves)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.held = []  # not kept alive by a traceback that holds this record


def _any_half(params: Any) -> bool:
    return any(
        isinstance(p, torch.Tensor) and p.dtype in (torch.float16, torch.bfloat16)
        for p in tree.leaves(params)
    )


_SPARSE_FIX = (
    "functrain's transforms update dense tensors, and torch.optim.Adam refuses sparse "
    "gradients too. Build the layer with sparse=False (nn.Embedding / nn.EmbeddingBag): the "
    "update is the same as with a densified gradient"
)


def _check_dense_grads(grads: Any) -> None:
    """Raises a path-named ValueError for a sparse gradient (``nn.Embedding(sparse=True)``).

    Sparse gradients are refused rather than densified: densifying would quietly give the
    dense optimizer's update (every row's moments decay each step) to a user who asked for a
    sparse layer, likely expecting ``SparseAdam``'s lazy per-row update. Only the layout is
    read (metadata, no host sync; a constant under ``torch.compile``), and this runs after
    the gradients and before anything is written, so the state stays usable.
    """
    leaves = tree.leaves(grads)
    if all(not isinstance(g, torch.Tensor) or g.layout == torch.strided for g in leaves):
        return
    paths, leaves, _ = tree.flatten_with_paths(grads)
    for path, g in zip(paths, leaves):
        if isinstance(g, torch.Tensor) and g.layout != torch.strided:
            raise ValueError(
                f"the gradient of {tree.path_str(path, 'params')} has layout {g.layout} "
                f"(a sparse gradient, e.g. from nn.Embedding(sparse=True)); {_SPARSE_FIX}"
            )


def _sparse_vmap_error(err: BaseException, where: str) -> ValueError | None:
    """A clear error for a sparse gradient inside ``torch.func`` (which cannot batch one);
    the failing parameter is not known there, so the message names the usual cause."""
    if isinstance(err, NotImplementedError) and "Sparse" in message(err):
        return ValueError(
            f"{where}: the model produced a sparse gradient (e.g. nn.Embedding(sparse=True) or "
            f"nn.EmbeddingBag(sparse=True)), which torch.func cannot batch; {_SPARSE_FIX}. "
            f"Original error: {err}"
        )
    return None
