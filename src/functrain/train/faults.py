"""Numerical faults in the train step: skip non-finite steps, count them, raise; loss scaling.

``make_train_step(..., nonfinite="skip")`` (the default) checks every step, on the device and
without a host sync, whether the loss and every gradient element are finite. A step that is not
is **skipped**: parameters, optimizer state (its counts too, hence schedules), buffers and
gradient-statistics states come out bit-for-bit as they went in. ``state.step`` and the random
key still advance: the step counts batches consumed, so a data order derived from the step stays
aligned and the next batch gets fresh randomness. The metric ``skipped`` (0-d int32) is 1 for a
skipped step.

How a skip costs no host sync: the optimizer stage runs anyway; its updates are replaced by
``-0.0`` (``p + (-0.0) == p`` bit for bit, ``-0.0`` included, so the in-place update of a
donated state leaves the memory as it was) and its new state by the old one (``torch.where``).
An optimizer stage that can skip by itself (a fused kernel with a ``found_inf`` input) declares
``supports_found_inf = True`` and receives ``found_inf=`` instead (see :func:`apply_guarded`).

Options that keep a :class:`NonFiniteState` in ``state.extra["nonfinite"]`` (and report
``skipped_total``):

* ``max_consecutive_skips=n``: more than ``n`` skipped steps in a row raise
  :class:`NonFiniteError` from the next call, before it touches its input state (that state holds
  the parameters from before the faults). The count is read without stalling the device: on the
  CPU directly, on CUDA from an asynchronous copy, so the error may come a call or two later.
* ``loss_scale=ft.DynamicLossScale()``: float16 loss scaling, ``torch.amp.GradScaler``'s
  policy; its :class:`~functrain.LossScaleState` lives in ``state.extra["loss_scale"]`` and the
  metric ``loss_scale`` is the scale the step used. An overflow skips the step (as above) and
  halves the scale. The ``loss`` metric is reported unscaled.

A state whose update changes more than tensor values (a Python-number counter in an optimizer
or hook state, a ``None`` filled at the first step) cannot be chosen on the device: for it the
step reads the finiteness flag on the host (one sync), so that a skip keeps it too.

``nonfinite="ignore"`` turns the check off (NaNs then reach the parameters).

A checkpoint of a state with these entries restores into a target that has them too: build the
target with ``step.prepare(ft.TrainState.create(...))``.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from functrain import tree
from functrain.optim import _utils
from functrain.optim.base import GradientTransformation, _accepts_extra, _call_update
from functrain.optim.loss_scale import DynamicLossScale, LossScaleState, all_finite
from functrain.train import loss as loss_lib

__all__ = ["NonFiniteError", "NonFiniteState"]

NONFINITE_KEY = "nonfinite"
LOSS_SCALE_KEY = "loss_scale"


class NonFiniteError(FloatingPointError):
    """Too many train steps in a row had a non-finite loss or gradient.

    Raised by a step made with ``max_consecutive_skips=n`` once more than ``n`` consecutive
    steps were skipped; the state passed to the raising call is left intact.

    Example:
        >>> import functrain as ft
        >>> issubclass(ft.NonFiniteError, FloatingPointError)
        True
    """


class NonFiniteState(NamedTuple):
    """Skip counters of a train step, kept in ``state.extra["nonfinite"]``.

    Attributes:
        consecutive: skipped steps in a row up to now (0-d int32; a finite step resets it).
        total: all skipped steps so far (0-d int32).
    """

    consecutive: torch.Tensor
    total: torch.Tensor


class Check(NamedTuple):
    """What :meth:`StepFaults.check` found (internal)."""

    grads: Any  # unscaled when loss scaling
    ok: torch.Tensor | None  # 0-d bool, None when not checking
    extra: dict[str, Any]  # new fault entries of state.extra
    metrics: dict[str, torch.Tensor]
    found_inf: torch.Tensor | None = None  # ``~ok`` when already computed


def scale_result(result: Any, scale: torch.Tensor) -> Any:
    """A loss function's result with its loss multiplied by ``scale`` (loss scaling)."""
    if isinstance(result, loss_lib.LossOutput):
        return result._replace(loss=scale_result(result.loss, scale))
    if isinstance(result, loss_lib.LossSum):
        if isinstance(result.total, torch.Tensor) and result.total.is_floating_point():
            return result._replace(total=result.total * scale)
        return result
    if isinstance(result, torch.Tensor) and result.is_floating_point():
        return result * scale
    return result  # not a valid result: the step's parser names the problem


def _same_value(n: Any, o: Any) -> bool:
    """Whether two non-tensor leaves (Python numbers, ``None``, strings) are equal."""
    if n is o:
        return True
    if isinstance(n, torch.Tensor) or isinstance(o, torch.Tensor) or type(n) is not type(o):
        return False
    try:
        return bool(n == o)
    except Exception:  # an exotic leaf whose ``==`` is not a plain bool: treat as changed
        return False


def _select(ok: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``ok`` else ``old``, leaf-wise; identical leaves are not copied.

    ``torch.where`` can only choose between tensors of one shape. A state whose update changed
    anything else (a Python-number counter, a ``None`` placeholder filled lazily, a leaf's
    shape or the tree's structure) is chosen whole, which reads ``ok`` on the host: one sync,
    only for such states; the leaf-wise choice would keep the new value of a skipped step.
    """
    n_leaves, spec = tree.flatten(new)
    o_leaves, o_spec = tree.flatten(old)
    tensors = spec == o_spec and all(
        _same_value(n, o)
        if not (isinstance(n, torch.Tensor) and isinstance(o, torch.Tensor))
        else n.shape == o.shape
        for n, o in zip(n_leaves, o_leaves)
    )
    if not tensors and not torch.compiler.is_compiling():
        return new if bool(ok) else old  # rare: see the docstring

    if not tensors:  # compiled: no host read there; the leaf-wise choice, as best it can
        return tree.map(lambda n, o: _pick(ok, n, o), new, old)
    return tree.unflatten(spec, [_pick(ok, n, o) for n, o in zip(n_leaves, o_leaves)])


def _pick(ok: torch.Tensor, n: Any, o: Any) -> Any:
    if n is o or not (isinstance(n, torch.Tensor) and isinstance(o, torch.Tensor)):
        return n
    return torch.where(ok, n, o if o.dtype == n.dtype else o.to(n.dtype))


def skip_unless(tx: GradientTransformation, ok: torch.Tensor) -> GradientTransformation:
    """``tx`` whose update is a no-op unless ``ok``: updates ``-0.0``, the old state kept.

    Adding ``-0.0`` leaves every parameter bit-for-bit as it was (``+0.0`` would turn ``-0.0``
    into ``+0.0``), in place or not, whatever the parameter's dtype.
    """

    passes_extra = _accepts_extra(tx.update)  # a bare user transform gets no keywords

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        new_updates, new_state = _call_update(tx, passes_extra, updates, state, params, extra)
        masked = tree.map(lambda u: torch.where(ok, u, -0.0), new_updates)
        return masked, _select(ok, new_state, state)

    return GradientTransformation(tx.init, update_fn)


def apply_guarded(
    apply_optimizer: Callable[..., Any],
    tx: GradientTransformation,
    grads: Any,
    opt_state: Any,
    params: Any,
    *,
    in_place: bool,
    ok: torch.Tensor | None,
    found_inf: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
) -> Any:
    """Runs the step's optimizer stage so that ``ok == False`` changes nothing.

    The contract for a replacement optimizer stage (e.g. a fused in-place one): if it has the
    attribute ``supports_found_inf = True`` it is called with ``found_inf=`` (a 0-d bool
    tensor on the params' device) and must then, where ``found_inf`` is true, leave the
    parameters and the optimizer state bit-for-bit unchanged (in place or not) without reading
    the flag on the host, like ``torch._fused_adam_(..., found_inf=...)``. Otherwise it gets
    :func:`skip_unless` ``(tx, ok)``, which is correct for any stage built on ``tx.update``
    and ``apply_updates``. ``found_inf``: ``~ok``, if the caller has it already. ``value``: the
    step's loss, handed on as ``value=`` (for ``tx.update(..., value=loss)``, e.g.
    :func:`functrain.reduce_on_plateau`); passed only to a stage with ``accepts_value = True``
    (a replacement stage written before it keeps its signature).
    """
    passes = value is not None and getattr(apply_optimizer, "accepts_value", False)
    kw: dict[str, Any] = {"value": value} if passes else {}
    if ok is None:
        return apply_optimizer(tx, grads, opt_state, params, in_place=in_place, **kw)
    if getattr(apply_optimizer, "supports_found_inf", False):
        found_inf = ~ok if found_inf is None else found_inf
        return apply_optimizer(
            tx, grads, opt_state, params, in_place=in_place, found_inf=found_inf, **kw
        )
    return apply_optimizer(skip_unless(tx, ok), grads, opt_state, params, in_place=in_place, **kw)


def _check_max(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_consecutive_skips must be a non-negative int or None, got {value!r}")
    return value


class StepFaults:
    """The non-finite policy of one train step (internal; built by ``make_train_step``)."""

    def __init__(
        self,
        nonfinite: Literal["skip", "ignore"],
        max_consecutive_skips: int | None,
        loss_scale: DynamicLossScale | None,
    ) -> None:
        if nonfinite not in ("skip", "ignore"):
            hint = (
                "; to stop on non-finite steps use nonfinite='skip' with max_consecutive_skips=0 "
                "(ft.NonFiniteError from the next call, its input state intact)"
                if nonfinite == "raise"
                else ""
            )
            raise ValueError(f"nonfinite must be 'skip' or 'ignore', got {nonfinite!r}{hint}")
        self.max_consecutive_skips = _check_max(max_consecutive_skips)
        if loss_scale is not None and not isinstance(loss_scale, DynamicLossScale):
            raise TypeError(
                "loss_scale must be a ft.DynamicLossScale (e.g. ft.DynamicLossScale()) or None, "
                f"got {type(loss_scale).__name__}"
            )
        if nonfinite == "ignore" and (max_consecutive_skips is not None or loss_scale is not None):
            option = "max_consecutive_skips" if loss_scale is None else "loss_scale"
            raise ValueError(f"{option} needs nonfinite='skip' (it skips non-finite steps)")
        self.active = nonfinite == "skip"
        # Set by the step when its gradients are step-local tensors nobody else holds (the
        # autograd loop): the check may then use the fused in-place AMP check (see _finite).
        self.grads_writable = False
        self._ones: dict[torch.device, torch.Tensor] = {}
        self.loss_scale = loss_scale
        self.stateful = self.max_consecutive_skips is not None or loss_scale is not None
        self._scale: contextvars.ContextVar[torch.Tensor] = contextvars.ContextVar("loss_scale")
        # (counter tensor, pinned host copy, event) of the last CUDA step, for a lazy raise.
        self._pending: tuple[torch.Tensor, torch.Tensor, Any] | None = None

    # -- state ------------------------------------------------------------------------------
    def init_extra(self, params: Any) -> dict[str, Any]:
        """The ``state.extra`` entries this policy keeps, freshly initialised."""
        out: dict[str, Any] = {}
        if self.stateful:
            zero = _utils.zero_count(params)
            out[NONFINITE_KEY] = NonFiniteState(zero, zero.clone())
        if self.loss_scale is not None:
            out[LOSS_SCALE_KEY] = self.loss_scale.init(_utils.default_device(params))
        return out

    def _entries(self, extra: dict[str, Any], params: Any) -> dict[str, Any]:
        """This policy's entries of ``state.extra`` (fresh ones where missing), type-checked."""
        keys = [NONFINITE_KEY] + ([LOSS_SCALE_KEY] if self.loss_scale is not None else [])
        fresh = self.init_extra(params) if any(k not in extra for k in keys) else {}
        out = {k: extra[k] if k in extra else fresh[k] for k in keys}
        for key, kind in ((NONFINITE_KEY, NonFiniteState), (LOSS_SCALE_KEY, LossScaleState)):
            if key in out and not isinstance(out[key], kind):
                raise TypeError(
                    f"state.extra[{key!r}] must be a {kind.__name__} (kept there by the train "
                    f"step), got {type(out[key]).__name__}"
                )
        return out

    # -- the loss ---------------------------------------------------------------------------
    def wrap_loss(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        """``loss_fn`` multiplied by the current loss scale (``loss_fn`` itself without one)."""
        if self.loss_scale is None:
            return loss_fn
        scale_var = self._scale

        @functools.wraps(loss_fn)  # keeps the signature: the step passes buffers=/key= by it
        def scaled_loss(params: Any, batch: Any, **kwargs: Any) -> Any:
            return scale_result(loss_fn(params, batch, **kwargs), scale_var.get())

        return scaled_loss

    def current_scale(self) -> torch.Tensor:
        """The loss scale set by :meth:`begin` for the eager step in progress."""
        return self._scale.get()

    def begin(self, extra: dict[str, Any], params: Any) -> contextvars.Token | None:
        """Before the gradient stage: raises a pending :class:`NonFiniteError`, sets the scale."""
        if not self.active or not self.stateful:
            return None
        entries = self._entries(extra, params)
        if self.max_consecutive_skips is not None:
            count = self._read(entries[NONFINITE_KEY].consecutive)
            if count is not None and count > self.max_consecutive_skips:
                raise NonFiniteError(
                    f"{count} consecutive train steps had a non-finite loss or gradient "
                    f"(max_consecutive_skips={self.max_consecutive_skips}); their updates were "
                    "skipped, so the state passed to this call still holds the parameters from "
                    "before them. Check the data and the learning rate, or train in float32 / "
                    "with a loss scale"
                )
        if self.loss_scale is not None:
            return self._scale.set(entries[LOSS_SCALE_KEY].scale)
        return None

    def end(self, token: contextvars.Token | None) -> None:
        """Resets what :meth:`begin` set (also after an error)."""
        if token is not None:
            self._scale.reset(token)

    def _read(self, counter: torch.Tensor) -> int | None:
        if counter.device.type == "cpu":
            return int(counter)  # a CPU tensor: no device synchronization
        pending = self._pending
        if pending is not None and pending[0] is counter and pending[2].query():
            return int(pending[1])
        return None

    def _record(self, counter: torch.Tensor) -> None:
        if self.max_consecutive_skips is None or counter.device.type != "cuda":
            return
        if torch.compiler.is_compiling():
            return  # events and pinned copies stay out of the graph: see after_compiled
        host = torch.empty((), dtype=counter.dtype, pin_memory=True)
        host.copy_(counter, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (counter, host, event)

    def after_compiled(self, extra: dict[str, Any]) -> None:
        """Records, eagerly, the skip counter a compiled step returned in ``extra``, so that the
        next call can read it without waiting for the device."""
        entry = extra.get(NONFINITE_KEY) if self.stateful else None
        if entry is not None:
            self._record(entry.consecutive)

    # -- after the gradient stage -----------------------------------------------------------
    def check(
        self,
        metrics: dict[str, torch.Tensor],
        grads: Any,
        extra: dict[str, Any],
        params: Any,
        *,
        writable: bool = False,
    ) -> Check:
        """Unscales the gradients, decides whether the step is finite, updates the counters.

        Replaces ``metrics["loss"]`` by the unscaled loss when loss scaling. ``writable``: this
        call's gradients are the step's own to write (as :attr:`grads_writable` says for all).
        """
        if not self.active:
            return Check(grads, None, {}, {})
        loss = metrics["loss"]
        new_extra: dict[str, Any] = {}
        out_metrics: dict[str, torch.Tensor] = {}
        entries = self._entries(extra, params) if self.stateful else {}
        if self.loss_scale is not None:
            ls_state = entries[LOSS_SCALE_KEY]
            loss = loss / ls_state.scale
            metrics["loss"] = loss
            grads, finite = self.loss_scale.unscale(ls_state, grads)
            ok = finite & torch.isfinite(loss)
            new_extra[LOSS_SCALE_KEY] = self.loss_scale.update(ls_state, ok)
            out_metrics["loss_scale"] = ls_state.scale
        else:
            ok = self._finite(grads, loss, writable or self.grads_writable)
        found_inf = ~ok
        out_metrics["skipped"] = found_inf.to(torch.int32)
        if self.stateful:
            counts = entries[NONFINITE_KEY]
            consecutive = torch.where(
                ok, torch.zeros_like(counts.consecutive), _utils.safe_increment(counts.consecutive)
            )
            total = torch.where(ok, counts.total, _utils.safe_increment(counts.total))
            new_extra[NONFINITE_KEY] = NonFiniteState(consecutive, total)
            out_metrics["skipped_total"] = total
            self._record(consecutive)
        return Check(grads, ok, new_extra, out_metrics, found_inf)

    def _finite(self, grads: Any, loss: torch.Tensor, writable: bool | None = None) -> torch.Tensor:
        """``all_finite(grads) & isfinite(loss)``; for writable gradients in one kernel.

        Writable gradients of one floating dtype (the autograd loop's, step-local) and the
        loss (a tensor the step made) are checked by
        ``torch._amp_foreach_non_finite_check_and_unscale_`` (GradScaler's check) with an
        inverse scale of 1: multiplying by 1 leaves every value bit for bit (NaN, inf and -0.0
        included), and one fused call replaces a reduction and a Python call per leaf.
        """
        if writable is None:
            writable = self.grads_writable
        leaves = tree.leaves(grads) if writable else []
        # Traced, or under a torch.func transform (the fused kernel has no batching rule).
        if (
            not leaves
            or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
        ):
            return all_finite(grads) & torch.isfinite(loss)
        first = leaves[0]
        device, dtype = first.device, first.dtype
        if device.type not in ("cpu", "cuda") or not first.is_floating_point():
            return all_finite(grads) & torch.isfinite(loss)
        for x in leaves:
            if (
                x.dtype != dtype
                or x.device != device
                or x.layout != torch.strided
                or type(x) is not torch.Tensor
            ):
                return all_finite(grads) & torch.isfinite(loss)
        one = self._ones.get(device)
        if one is None:
            one = self._ones[device] = torch.ones((1,), dtype=torch.float32, device=device)
        found = torch.zeros((1,), dtype=torch.float32, device=device)
        same_kind = loss.dtype == dtype and loss.device == device and type(loss) is torch.Tensor
        torch._amp_foreach_non_finite_check_and_unscale_(
            [*leaves, loss] if same_kind else leaves, found, one
        )
        ok = (found == 0).reshape(())
        return ok if same_kind else ok & torch.isfinite(loss)

    @staticmethod
    def keep_if_skipped(ok: torch.Tensor | None, new: Any, old: Any) -> Any:
        """``new`` (buffers, hook states) if the step was applied, else ``old``, bit-for-bit."""
        if ok is None or new is old or new is None or old is None:
            return new
        return _select(ok, new, old)
