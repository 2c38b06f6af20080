"""``MultiSteps``: accumulate gradients over mini-steps and update every k of them (optax's).

For users who feed one micro-batch at a time from their own loop. (The pure
``make_train_step(..., micro_batches=k)`` accumulates inside one step instead.)

Design: the counters ``mini_step`` and ``gradient_step`` are int32 tensors kept on the **CPU**
whatever the params' device. Deciding whether a mini-step is the k-th then only reads host
memory, which is not a device synchronisation, so in eager mode the inner optimizer runs only on
the k-th mini-step and the other mini-steps cost one fused accumulation. Under
``torch.compile`` (where reading a value would break the graph) the same maths is done with
``torch.where`` over both branches: the inner update is then computed at every mini-step and
its results are discarded except on the k-th, which is what optax's ``lax.cond`` amounts to
under ``vmap``. The numbers are the same either way.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils
from functrain.optim._masking import _is_numpy_bool
from functrain.optim.base import GradientTransformation, _accepts_extra, _check_transform

__all__ = [
    "MultiSteps",
    "MultiStepsState",
    "skip_large_updates",
    "skip_not_finite",
]


class MultiStepsState(NamedTuple):
    """State of :class:`MultiSteps`.

    Attributes:
        mini_step: int32 CPU tensor: mini-steps accumulated since the last update (``0..k-1``).
        gradient_step: int32 CPU tensor: number of inner-optimizer updates so far.
        inner_opt_state: the inner transform's state.
        acc_grads: the running mean (or sum) of this cycle's gradients.
        skip_state: whatever ``should_skip_update_fn`` returned last (``()`` without one).
    """

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    inner_opt_state: Any
    acc_grads: Any
    skip_state: Any = ()


def skip_not_finite(
    updates: Any, gradient_step: torch.Tensor, params: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A ``should_skip_update_fn`` for :class:`MultiSteps`: skip updates with a NaN or inf.

    Args:
        updates: the update pytree to check.
        gradient_step: unused (part of the ``should_skip_update_fn`` signature).
        params: unused (likewise).

    Returns:
        ``(should_skip, {"should_skip": should_skip, "num_not_finite": num})``: a 0-d bool
        tensor and the int64 count of non-finite elements (0 on the CPU for no leaves).

    Example:
        >>> import torch, functrain as ft
        >>> ft.skip_not_finite([torch.tensor([1.0, float("inf")])], torch.tensor(0), None)[0]
        tensor(True)
    """
    del gradient_step, params
    leaves = tree.leaves(updates)
    if leaves:
        num = torch.stack([(~torch.isfinite(x)).sum() for x in leaves]).sum()
    else:
        num = torch.zeros((), dtype=torch.int64)
    should_skip = num > 0
    return should_skip, {"should_skip": should_skip, "num_not_finite": num}


def skip_large_updates(
    updates: Any, gradient_step: torch.Tensor, params: Any, max_squared_norm: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A ``should_skip_update_fn``: skip updates whose squared global norm is not below a bound.

    Use it as ``functools.partial(skip_large_updates, max_squared_norm=...)``; a NaN norm is
    skipped too.

    Args:
        updates: the update pytree to check.
        gradient_step: unused (part of the ``should_skip_update_fn`` signature).
        params: unused (likewise).
        max_squared_norm: skip when ``‖updates‖² ≥ max_squared_norm``.

    Returns:
        ``(should_skip, {"should_skip": should_skip, "norm_squared": norm_sq})``: a 0-d bool
        tensor and the 0-d squared global norm (``ft.tree.norm(updates, squared=True)``).

    Example:
        >>> import torch, functrain as ft
        >>> ft.skip_large_updates([torch.tensor([3.0, 4.0])], torch.tensor(0), None, 20.0)[0]
        tensor(True)
    """
    del gradient_step, params
    norm_sq = tree.norm(updates, squared=True)
    should_skip = torch.logical_not(norm_sq < max_squared_norm)
    return should_skip, {"should_skip": should_skip, "norm_squared": norm_sq}


def _cpu_int(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int32)


def _schedule_value(k: Any) -> int:
    """``k`` from ``every_k_schedule`` as a Python int; a non-integer is an error, not truncated."""
    try:
        return operator.index(k)  # int, NumPy int, integer tensor of one element
    except TypeError:
        pass
    # An integral float (``2.0``, a one-element float tensor) is accepted, as in optax.
    value = math.nan
    if isinstance(k, torch.Tensor):
        if k.numel() == 1 and not k.is_complex():
            value = float(k)
    elif isinstance(k, numbers.Real):
        value = float(k)
    if not value.is_integer():
        raise TypeError(f"every_k_schedule must return an integer, got {k!r}")
    return int(value)


def _batched_counters(state: MultiStepsState) -> bool:
    """Whether ``vmap`` batches the counters (an ensemble): their values cannot be read then,
    so the traced form's selects run instead (under ``grad`` the eager form still does)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    batched = torch._C._functorch.is_batchedtensor
    return batched(state.mini_step) or batched(state.gradient_step)


class MultiSteps:
    """Accumulates the updates of ``k`` consecutive calls and feeds their mean to ``opt``.

    On each of the first ``k − 1`` mini-steps, ``update`` returns zeros and only accumulates;
    on the k-th it calls the inner optimizer once with the mean (or, with
    ``use_grad_mean=False``, the sum) of the ``k`` updates, returns its output, and starts a new
    cycle. The mean is the running (Welford) mean ``acc + (g − acc) / (n + 1)``, as in optax.
    ``every_k_schedule`` may be a function of ``gradient_step`` (an int32 CPU tensor), to change
    the effective batch size during training; under ``torch.compile`` it must compute ``k``
    with tensor operations (e.g. ``torch.where``), not Python comparisons.

    See the module docstring for how this avoids device syncs (the counters are CPU tensors) and
    what happens under ``torch.compile``. With ``should_skip_update_fn``, eager mode reads its
    boolean on the host: one small device sync per mini-step when it lives on an accelerator.

    Differences from optax: ``accumulator_dtype=None`` (the default) accumulates each leaf in
    its own dtype promoted to at least float32 (optax: always float32), so float64 training
    keeps float64 accumulators. A cycle ends once ``mini_step ≥ k − 1`` (optax: ``==``) and
    ``mini_step`` then restarts at 0 (optax: ``(mini_step + 1) % k``), so a state saved
    mid-cycle under a larger ``k`` updates at once and then runs full cycles of the new ``k``.
    PyTorch has no equivalent wrapper; the usual pattern is calling
    ``loss.backward()`` ``k`` times and ``optimizer.step()`` once.

    Args:
        opt: the inner transform.
        every_k_schedule: ``k`` (an int ≥ 1) or a function of the gradient step giving it.
        use_grad_mean: average the accumulated updates (``True``) or sum them.
        should_skip_update_fn: optional ``f(updates, gradient_step, params) ->
            (should_skip, skip_state)``, ``should_skip`` a 0-d bool tensor or a Python
            boolean; a skipped mini-step leaves the state as it was (except
            ``skip_state``) and returns zeros. See :func:`skip_not_finite`.
        accumulator_dtype: dtype of ``acc_grads`` (default: see above); complex leaves use
            its complex counterpart (``float32`` → ``complex64``), so no imaginary part is lost.

    Example:
        >>> import torch, functrain as ft
        >>> ms = ft.MultiSteps(ft.sgd(1.0), every_k_schedule=2)
        >>> params = {"w": torch.zeros(1)}
        >>> state = ms.init(params)
        >>> u, state = ms.update({"w": torch.tensor([1.0])}, state, params)
        >>> u["w"], bool(ms.has_updated(state))
        (tensor([0.]), False)
        >>> u, state = ms.update({"w": torch.tensor([3.0])}, state, params)
        >>> u["w"], bool(ms.has_updated(state))
        (tensor([-2.]), True)
    """

    def __init__(
        self,
        opt: GradientTransformation,
        every_k_schedule: int | Callable[[torch.Tensor], Any],
        use_grad_mean: bool = True,
        should_skip_update_fn: Callable[..., tuple[Any, Any]] | None = None,
        accumulator_dtype: torch.dtype | None = None,
    ) -> None:
        self._opt = _check_transform(opt, "MultiSteps opt")
        self._passes_extra = _accepts_extra(self._opt.update)
        if isinstance(every_k_schedule, bool) or not (
            isinstance(every_k_schedule, numbers.Integral) or callable(every_k_schedule)
        ):
            raise TypeError(
                f"every_k_schedule must be an int or callable, got {every_k_schedule!r}"
            )
        if isinstance(every_k_schedule, numbers.Integral):
            # A NumPy integer is an int here (optax would call it and fail).
            every_k_schedule = int(every_k_schedule)
            if every_k_schedule < 1:
                raise ValueError(f"every_k_schedule must be >= 1, got {every_k_schedule}")
        self._every_k_schedule = every_k_schedule
        self._use_grad_mean = use_grad_mean
        self._should_skip_update_fn = should_skip_update_fn
        _ops.check_dtype("accumulator_dtype", accumulator_dtype)
        self._accumulator_dtype = accumulator_dtype

    @property
    def inner_opt(self) -> GradientTransformation:
        """The wrapped transform."""
        return self._opt

    def _k(self, gradient_step: torch.Tensor) -> Any:
        k = self._every_k_schedule
        return k(gradient_step) if callable(k) else k

    def _acc_dtype(self, leaf: torch.Tensor) -> torch.dtype:
        acc = self._accumulator_dtype
        if acc is None:
            if leaf.is_floating_point() or leaf.is_complex():
                # complex32 → complex64, as bfloat16/float16 → float32.
                return torch.promote_types(leaf.dtype, torch.float32)
            return leaf.dtype
        # The accumulator's precision, in the leaf's kind: a real accumulator of complex
        # gradients would discard their imaginary part.
        if leaf.is_complex():
            return acc if acc.is_complex else acc.to_complex()
        return acc.to_real() if acc.is_complex else acc

    def _skip(self, updates: Any, gradient_step: torch.Tensor, params: Any) -> tuple[Any, Any]:
        if self._should_skip_update_fn is None:
            return None, ()
        skip, skip_state = self._should_skip_update_fn(updates, gradient_step, params)
        if isinstance(skip, bool) or _is_numpy_bool(skip):
            # optax takes ``jnp.asarray(should_skip)``, so a plain boolean is a legal answer.
            skip = torch.tensor(bool(skip))
        if not (isinstance(skip, torch.Tensor) and skip.dtype == torch.bool and skip.dim() == 0):
            raise ValueError(
                "should_skip_update_fn must return a 0-d bool tensor as its first output, got "
                f"{skip!r}"
            )
        return skip, skip_state

    def init(self, params: Any) -> MultiStepsState:
        """Builds the initial state: zero counters (CPU), the inner state and zero accumulators."""
        gradient_step = _cpu_int(0)
        _, skip_state = self._skip(tree.zeros_like(params), gradient_step, params)
        return MultiStepsState(
            mini_step=_cpu_int(0),
            gradient_step=gradient_step,
            inner_opt_state=self._opt.init(params),
            acc_grads=tree.map(lambda p: torch.zeros_like(p, dtype=self._acc_dtype(p)), params),
            skip_state=skip_state,
        )

    def _accumulate(self, updates: Any, acc: Any, n: Any) -> tuple[list, list, Any]:
        g, spec, other = _utils.flat(updates, {"state.acc_grads": acc})
        acc_leaves = other["state.acc_grads"]
        if not g:
            return g, acc_leaves, spec
        g = [x.to(a.dtype) for x, a in zip(g, acc_leaves)]
        if self._use_grad_mean and isinstance(n, torch.Tensor):
            # A CPU counter tensor broadcasts as a scalar in plain ops (not in every foreach op).
            new = [a + (x - a) / (n + 1) for x, a in zip(g, acc_leaves)]
        elif self._use_grad_mean:
            step = _foreach.div(_foreach.sub(g, acc_leaves), n + 1)
            new = _foreach.add(acc_leaves, step)
        else:
            new = _foreach.add(g, acc_leaves)
        return g, new, spec

    def _inner_update(
        self, acc: list, spec: Any, updates: Any, state: Any, params: Any, extra: dict
    ):
        grads = tree.unflatten(spec, [a.to(u.dtype) for a, u in zip(acc, tree.leaves(updates))])
        if self._passes_extra:
            return self._opt.update(grads, state.inner_opt_state, params, **extra)
        return self._opt.update(grads, state.inner_opt_state, params)

    def update(
        self, updates: Any, state: MultiStepsState, params: Any = None, **extra: Any
    ) -> tuple[Any, MultiStepsState]:
        """Accumulates ``updates``; every k-th call returns the inner optimizer's update."""
        if not isinstance(state, MultiStepsState):
            raise TypeError(f"MultiSteps expects a MultiStepsState, got {type(state).__name__}")
        if torch.compiler.is_compiling() or _batched_counters(state):
            return self._update_traced(updates, state, params, extra)
        k = _schedule_value(self._k(state.gradient_step))
        if k < 1:
            raise ValueError(f"every_k_schedule returned {k}; it must be >= 1")
        skip, skip_state = self._skip(updates, state.gradient_step, params)
        if skip is not None and bool(skip):
            return tree.zeros_like(updates), state._replace(skip_state=skip_state)
        mini_step = int(state.mini_step)
        _, acc, spec = self._accumulate(updates, state.acc_grads, mini_step)
        # ``<``, not ``!=`` (optax's test): a state saved mid-cycle and resumed with a smaller k
        # is already past the k-th mini-step and must update now, not wrap around and drop it.
        if mini_step < k - 1:
            new_state = state._replace(
                mini_step=_cpu_int(mini_step + 1),
                acc_grads=tree.unflatten(spec, acc),
                skip_state=skip_state,
            )
            return tree.zeros_like(updates), new_state
        out, inner_state = self._inner_update(acc, spec, updates, state, params, extra)
        new_state = MultiStepsState(
            # 0, not optax's ``(mini_step + 1) % k``: a resumed ``mini_step`` beyond ``k - 1``
            # (saved with a larger k) would otherwise start the next cycle part-way through.
            mini_step=_cpu_int(0),
            gradient_step=_utils.safe_increment(state.gradient_step),
            inner_opt_state=inner_state,
            acc_grads=tree.unflatten(spec, [torch.zeros_like(a) for a in acc]),
            skip_state=skip_state,
        )
        return out, new_state

    def _update_traced(
        self, updates: Any, state: MultiStepsState, params: Any, extra: dict[str, Any]
    ) -> tuple[Any, MultiStepsState]:
        # Under torch.compile: no value may be read, so both branches are computed and selected.
        k = self._k(state.gradient_step)
        skip, skip_state = self._skip(updates, state.gradient_step, params)
        keep = torch.zeros((), dtype=torch.bool) if skip is None else skip
        emit = (state.mini_step >= k - 1) & ~keep
        _, acc, spec = self._accumulate(updates, state.acc_grads, state.mini_step)
        acc = [torch.where(keep, a, n) for a, n in zip(tree.leaves(state.acc_grads), acc)]
        out, inner_state = self._inner_update(acc, spec, updates, state, params, extra)
        new_state = MultiStepsState(
            mini_step=torch.where(
                emit,
                torch.zeros_like(state.mini_step),
                torch.where(keep, state.mini_step, state.mini_step + 1),
            ).to(torch.int32),
            gradient_step=torch.where(
                emit, _utils.safe_increment(state.gradient_step), state.gradient_step
            ),
            inner_opt_state=tree.map(
                lambda n, o: torch.where(emit, n.to(o.dtype), o),
                inner_state,
                state.inner_opt_state,
            ),
            acc_grads=tree.unflatten(
                spec, [torch.where(emit, torch.zeros_like(a), a) for a in acc]
            ),
            skip_state=skip_state,
        )
        return tree.map(lambda u: torch.where(emit, u, torch.zeros_like(u)), out), new_state

    def has_updated(self, state: MultiStepsState) -> torch.Tensor:
        """Whether the last ``update`` called the inner optimizer (a CPU bool tensor).

        Example:
            >>> import torch, functrain as ft
            >>> ms = ft.MultiSteps(ft.sgd(0.1), every_k_schedule=3)
            >>> bool(ms.has_updated(ms.init([torch.zeros(1)])))
            False
        """
        return torch.logical_and(state.mini_step == 0, state.gradient_step > 0)

    def gradient_transformation(self) -> GradientTransformation:
        """This wrapper as a :class:`GradientTransformation` ``(init, update)``.

        Example:
            >>> import torch, functrain as ft
            >>> tx = ft.MultiSteps(ft.sgd(0.1), every_k_schedule=2).gradient_transformation()
            >>> type(tx.init([torch.zeros(1)])).__name__
            'MultiStepsState'
        """
        return GradientTransformation(init=self.init, update=self.update)
