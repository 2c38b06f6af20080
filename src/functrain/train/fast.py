"""The train step's fast paths: the fused in-place optimizer stage and cheap global norms.

**Fused optimizer stage.** A donating step owns the state it consumes, so its optimizer stage
may update that state's tensors in place. :class:`FusedStage` asks
:func:`functrain.optim.fused.update_in_place` to do so (fused ``torch._fused_adam(w)_`` /
``_fused_sgd_`` kernels for the Adam and SGD families, in-place ``torch._foreach_*``
arithmetic for other recognised chains) and falls back to the pure stage (``tx.update`` then
an in-place ``apply_updates``) for anything it does not recognise. It honours the non-finite
skip of :mod:`functrain.train.faults` on the device (``found_inf``), reuses the step's
``grad_norm`` for a leading ``clip_by_global_norm``, and reports ``update_norm`` as the norm of
the parameter change (the fused kernels never form the updates; this differs from the norm of
the updates only by the rounding of ``p + u`` for finite parameters: where ``p`` is ±inf it is
NaN, and a skipped step reports 0 as the pure path does).

**Global norms.** :func:`global_norm` is ``ft.tree.norm`` for the common case of float32 or
float64 leaves of one dtype on one device, bit for bit, without ``tree.norm``'s per-leaf
checks.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain import tree
from functrain._precision import HALF as _HALF
from functrain._sq_norms import sum_sq_norms
from functrain.optim import fused
from functrain.train.optimizer_stage import (
    Applied,
    apply_optimizer,
    mark_in_place_write,
    reset_in_place_writes,
)

__all__: list[str] = []  # internal: used by make_train_step


def global_norm(values: Any) -> torch.Tensor:
    """``ft.tree.norm(values)`` (the L2 norm over all leaves), bit for bit, with fewer checks.

    For the common case of float32 or float64 leaves of one dtype on one device this sums the
    squared norms as ``tree.norm`` does (:func:`functrain._sq_norms.sum_sq_norms`) without its
    per-leaf type checks. Anything else (mixed dtypes or devices, half precision, which
    ``tree.norm`` reduces in float32) uses ``tree.norm``.

    Example:
        >>> import torch
        >>> from functrain.train.fast import global_norm
        >>> global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        tensor(5.)
    """
    leaves = tree.leaves(values)
    if not leaves:
        return tree.norm(values)
    first = leaves[0]
    dtype, device = first.dtype, first.device
    if (
        not first.is_floating_point()
        or dtype in _HALF
        or any(x.dtype != dtype or x.device != device for x in leaves)
    ):
        return tree.norm(values)
    nonempty = [x for x in leaves if x.numel()]
    if not nonempty:
        return first.new_zeros(())
    return sum_sq_norms(nonempty).sqrt()


class FusedStage:
    """The optimizer stage of a donating train step, in place where ``tx`` allows it.

    Called as ``stage(tx, grads, opt_state, params, *, in_place, found_inf=None)`` and
    returning the step's ``Applied`` (with ``updates=None`` and ``update_norm`` set when the
    fused path ran). ``supports_found_inf`` tells :func:`functrain.train.faults.apply_guarded`
    that it skips non-finite steps by itself.

    Args:
        update_norm: compute the norm of the parameter change (for the ``update_norm`` metric).
        grads_writable: the gradients belong to the step alone (the kernels may unscale them).
        grad_norm: the step's ``grad_norm`` of these gradients, if computed.
    """

    supports_found_inf = True
    accepts_value = True  # apply_guarded hands it the step's loss as value=

    def __init__(
        self,
        *,
        update_norm: bool = True,
        grads_writable: bool = False,
        grad_norm: torch.Tensor | None = None,
    ) -> None:
        self.update_norm = update_norm
        self.grads_writable = grads_writable
        self.grad_norm = grad_norm
        self.last_engine: str | None = None  # "kernel", "foreach" or "pure" (for tests, benches)

    def for_call(
        self, grad_norm: torch.Tensor | None, *, grads_writable: bool = False
    ) -> FusedStage:
        """This stage for one call, knowing the gradients' norm, and whether this call's
        gradients are the step's to write (beyond what the stage was made with)."""
        stage = FusedStage(
            update_norm=self.update_norm,
            grads_writable=self.grads_writable or grads_writable,
            grad_norm=grad_norm,
        )
        stage.parent = self  # type: ignore[attr-defined]
        return stage

    def _record(self, engine: str) -> None:
        self.last_engine = engine
        parent = getattr(self, "parent", None)
        if parent is not None:
            parent.last_engine = engine

    def __call__(
        self,
        tx: Any,
        grads: Any,
        opt_state: Any,
        params: Any,
        *,
        in_place: bool,
        found_inf: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
    ) -> Any:
        """Runs the optimizer stage (see the class docstring).

        ``value`` (the step's loss) reaches ``tx.update`` on the pure path only: the chains
        the fused engines recognise ignore it, and one that reads it (``reduce_on_plateau``)
        is not recognised.
        """
        if in_place and not torch.compiler.is_compiling():
            mark_in_place_write()  # the engines write group by group: a failure may tear it
            done = fused.update_in_place(
                tx,
                grads,
                opt_state,
                params,
                found_inf=found_inf,
                grad_norm=self.grad_norm,
                update_norm=self.update_norm,
                grads_writable=self.grads_writable,
                shapes_known=True,  # derivatives with respect to the params
            )
            if done is not None:
                self._record(done.engine)
                return Applied(params, done.opt_state, None, done.update_norm)
            reset_in_place_writes()  # None: nothing was touched
        self._record("pure")
        return apply_optimizer(
            tx, grads, opt_state, params, in_place=in_place, found_inf=found_inf, value=value
        )
