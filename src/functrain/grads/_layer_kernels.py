"""The shared pieces of the per-layer gradient Functions: the :class:`Sink` and the kernels.

The :class:`Sink` receives each layer's parameter gradients (per example, as per-example
squared norms, or summed); the kernels form those norms, Gram entries and outer-product sums
(half precision widened), and ``_Rule`` is the ``autograd.Function`` base with a cheap
``apply``. The Functions themselves are in :mod:`functrain.grads._layer_grads`, which
re-exports everything here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from functrain._precision import widen

__all__ = ["Sink", "stacked_weight_grads"]


# Squared norms and Gram entries of half-precision gradients are formed in float32: in float16 a
# per-example gradient of norm 256 squares to inf, and ghost clipping then dropped the example
# from the sum (a clip factor C/inf = 0) instead of clipping it.


def _row_sq(x: torch.Tensor) -> torch.Tensor:
    """Each example's squared L2 norm of a per-example tensor ``(B, ...)`` (half precision in
    float32)."""
    return widen(x).reshape(x.shape[0], -1).square().sum(1)


class Sink:
    """Where the rules' backward passes put parameter gradients, by parameter index.

    ``mode`` says what a backward pass computes:

    * ``"grads"``: per-example gradients ``(B, *param.shape)``; a tied parameter's uses add up;
    * ``"norms"``: each example's squared gradient norm per parameter, ``(B,)``, by a rule's
      cheaper route where it has one; a parameter used more than once (tied) still needs its
      per-example gradient, summed over its uses before the norm is taken;
    * ``"sum"``: the gradient summed over the examples, by the layers' ordinary kernels;
    * ``"gram"``: the ``(B, B)`` Gram matrix of the per-example gradients, each parameter's
      part by a rule's cheaper route where it has one, else from its per-example gradient
      (tied parameters, as in ``"norms"``, from the sum of their uses).
    """

    def __init__(self, n: int) -> None:
        self.mode = "grads"
        self.uses = [0] * n
        self.grads: list[torch.Tensor | None] = [None] * n
        self.sq: list[torch.Tensor | None] = [None] * n
        self.gram: torch.Tensor | None = None

    def put(
        self,
        index: int | None,
        per_example: Callable[[], torch.Tensor],
        summed: Callable[[], torch.Tensor],
        sq_norm: Callable[[], torch.Tensor] | None = None,
        gram: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        if index is None:
            return
        if self.mode == "sum":
            self._add(index, summed())
        elif self.mode == "grads" or self.uses[index] > 1:
            self._add(index, per_example())
        elif self.mode == "gram":
            part = gram() if gram is not None else _row_gram(per_example())
            self.gram = part if self.gram is None else self.gram + part
        else:
            sq = sq_norm() if sq_norm is not None else _row_sq(per_example())
            old = self.sq[index]
            self.sq[index] = sq if old is None else old + sq

    def _add(self, index: int, grad: torch.Tensor) -> None:
        old = self.grads[index]
        self.grads[index] = grad if old is None else old + grad

    def gram_matrix(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """``"gram"`` mode: the ``(rows, rows)`` Gram matrix over all parameters."""
        total = self.gram if self.gram is not None else like.new_zeros(rows, rows)
        for g in self.grads:  # tied parameters, their uses summed
            if g is not None:
                total = total + _row_gram(g)
        return total

    def squared_norms(self, rows: int, like: torch.Tensor) -> list[torch.Tensor]:
        """``"norms"`` mode: every parameter's per-example squared norms ``(rows,)``, in order
        (zeros for a parameter the loss never used)."""
        return [
            sq if sq is not None else _row_sq(g) if g is not None else like.new_zeros(rows)
            for sq, g in zip(self.sq, self.grads)
        ]


def _batch_first(info: Any, x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The physical tensor with the vmap dimension in front (broadcast when unbatched)."""
    return x.movedim(dim, 0) if dim is not None else x.expand(info.batch_size, *x.shape)


def _linear_sq_norm(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``‖gᵢᵀxᵢ‖²`` for ``g: (B, T, out)``, ``x: (B, T, in)``, by the cheaper of two routes.

    With ``T`` rows per example the "ghost" identity ``‖gᵀx‖² = Σ (ggᵀ ⊙ xxᵀ)`` costs
    ``T²(in + out)`` per example against ``T·in·out`` for forming ``gᵀx`` (Li et al., 2021).
    """
    g, x = widen(g), widen(x)
    rows, t = g.shape[:2]
    if t == 1:
        return g.reshape(rows, -1).square().sum(1) * x.reshape(rows, -1).square().sum(1)
    if t * (g.shape[2] + x.shape[2]) < g.shape[2] * x.shape[2]:
        return (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))).sum((1, 2))
    return _row_sq(torch.bmm(g.transpose(1, 2), x))


def _outer_sum(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Σₜ gₜ ⊗ xₜ`` per example, ``(B, out, in)``, for ``g: (B, T, out)``, ``x: (B, T, in)``.

    With one row per example a broadcast product: a batched matmul of inner size 1 ran about
    10% slower on CPU (the same single product per element, so the same numbers).
    """
    if g.shape[1] == 1:
        return g.transpose(1, 2) * x
    return torch.bmm(g.transpose(1, 2), x)


def _row_gram(x: torch.Tensor) -> torch.Tensor:
    """``X Xᵀ`` of the rows of ``x`` flattened: ``(B, B)`` (half precision in float32)."""
    flat = widen(x).reshape(x.shape[0], -1)
    return flat @ flat.T


def _linear_gram(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``⟨gᵢᵀxᵢ, gⱼᵀxⱼ⟩`` for ``g: (B, T, out)``, ``x: (B, T, in)``, by the cheaper route.

    The ghost form ``Σₜᵤ (gᵢₜ·gⱼᵤ)(xᵢₜ·xⱼᵤ)`` costs ``B²T²(in + out)`` against
    ``BT·in·out + B²·in·out`` for forming the per-example gradients and their products.
    """
    g, x = widen(g), widen(x)
    rows, t, out_f = g.shape
    in_f = x.shape[2]
    if t == 1:
        g2, x2 = g[:, 0], x[:, 0]
        return (g2 @ g2.T) * (x2 @ x2.T)
    if rows * t * t * (in_f + out_f) < t * in_f * out_f + rows * in_f * out_f:
        gg = torch.einsum("bto,cuo->bctu", g, g)
        return (gg * torch.einsum("bti,cui->bctu", x, x)).sum((2, 3))
    return _row_gram(torch.bmm(g.transpose(1, 2), x))


# ``torch.autograd.Function.apply`` binds every call's arguments with ``inspect.signature`` when
# ``setup_context`` is defined (about 0.1 ms a call, a tenth of a small layer's whole backward).
_C_APPLY = torch._C._FunctionBase.__dict__["apply"]


class _Rule(torch.autograd.Function):
    """A Function whose ``apply`` skips that binding: every rule passes all its arguments."""

    @classmethod
    def apply(cls, *args: Any) -> Any:  # type: ignore[override]
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)  # the vmap rule, through torch.func's machinery
        return _C_APPLY.__get__(None, cls)(*args)


def stacked_weight_grads(
    g: torch.Tensor,
    source: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Per-example weight gradients of a convolution with ``groups`` (1 included):
    ``(B, C_out, C_in/G, *kernel)``, in the weight's element order. They are the weight gradient
    of one convolution with ``groups = B·G`` over ``(N, B·C_in, *spatial)`` (``source`` padded
    by the symmetric ``padding``), whose group ``b·G + j`` holds example ``b``'s group ``j``."""
    rows, n, out_channels = g.shape[:3]
    if rows == 0 or n == 0:  # no groups (B·G = 0), or nothing to sum
        return weight.new_zeros((rows, *weight.shape))
    # (B, N, C, ...) -> (N, B·C, ...): a view for N = 1.
    gn = g.movedim(1, 0).reshape(n, rows * out_channels, *g.shape[3:])
    xn = source.movedim(1, 0).reshape(n, rows * source.shape[2], *source.shape[3:])
    (_, grads, _) = torch.ops.aten.convolution_backward(
        gn,
        xn,
        weight.new_empty((rows * out_channels, *weight.shape[1:])),  # its shape only
        None,
        list(stride),
        list(padding),
        list(dilation),
        False,
        [0] * len(stride),
        rows * groups,
        [False, True, False],
    )
    return grads.view(rows, out_channels, *weight.shape[1:])
