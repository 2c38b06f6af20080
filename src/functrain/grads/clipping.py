"""Per-example clipping and its sum: ``Σᵢ gᵢ · min(1, C/‖gᵢ‖)``, the DP-SGD gradient before
noise (:mod:`functrain.grads.privacy` adds the noise).

:func:`per_example_global_norm_clip` clips materialized per-example gradients (optax's
function); :func:`clipped_grad_sum` computes the sum from ``loss_fn`` chunk by chunk, or with
ghost norms (``method="layers"``) without forming per-example gradients at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain._precision import HALF as _HALF
from functrain._precision import widen
from functrain.grads._layer_dispatch import REDUCTION_METHODS, layer_chunks, reduce_by_layers
from functrain.grads._layer_passes import clipped_sum_by_layers
from functrain.grads._per_example import _check_options, batch_size_of
from functrain.grads._routes import layers_attempt
from functrain.grads.per_sample import vmap_chunks
from functrain.grads.stats import global_row_norms, leaf_row_norms, row_matrix
from functrain.optim import _utils

__all__ = [
    "ClippedGradSum",
    "clipped_grad_sum",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
]

PyTree = Any


def _check_number(name: str, value: Any, *, minimum: float, finite: bool = True) -> None:
    """A number or 0-d floating-point tensor checked at the call (a tensor's value is not read:
    no sync).

    ``finite=False`` lets ``inf`` through (``l2_norm_clip=inf`` of the clipping functions: no
    clipping, as in optax). Bools are refused (``True`` would silently mean 1), and so are
    schedules and tensors of other shapes or dtypes, which would fail mid-step.
    """
    if callable(value) and not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a number or a 0-d floating-point tensor, not a schedule")
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or not value.is_floating_point()):
        raise ValueError(
            f"{name} must be a number or a 0-d floating-point tensor, got a {value.dtype} "
            f"tensor of shape {tuple(value.shape)}"
        )
    if finite or not (isinstance(value, float) and value == math.inf):
        _utils.check_finite_number(name, value, minimum=minimum)


def _clip_factors(leaves: list[torch.Tensor], l2_norm_clip: float | torch.Tensor) -> torch.Tensor:
    """Per-example ``min(1, C/‖gᵢ‖)`` (0/0 → 1), as optax; no epsilon (Opacus: ``‖g‖ + 1e-6``).

    Norms of float16 gradients are taken in float32: a norm above 65504 rounded to ``inf``,
    its factor to 0, and the example was dropped from the sum instead of clipped to ``C``.
    """
    if any(x.dtype in _HALF for x in leaves):
        norms = [
            torch.linalg.vector_norm(row_matrix(x), dim=1, dtype=torch.float32)
            if x.dtype in _HALF
            else torch.linalg.vector_norm(row_matrix(x), dim=1)
            for x in leaves
        ]
        return _factors_of(global_row_norms(norms), l2_norm_clip)
    return _factors_of(global_row_norms(leaf_row_norms(leaves)), l2_norm_clip)


def _factors_of(norms: torch.Tensor, l2_norm_clip: float | torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(torch.clamp(l2_norm_clip / norms, max=1.0), nan=1.0)


def _weighted_sum(leaves: list[torch.Tensor], weights: torch.Tensor) -> list[torch.Tensor]:
    """``Σᵢ weightᵢ·xᵢ`` per leaf, in at least float32 (callers round): a factor ``C/‖g‖`` such
    as 1e-5 is subnormal in float16 and lost most of its digits when rounded to it."""
    return [
        (weights.to(widen(x).dtype) @ widen(row_matrix(x))).reshape(x.shape[1:]) for x in leaves
    ]


def per_example_global_norm_clip(
    grads: PyTree, l2_norm_clip: float | torch.Tensor
) -> tuple[PyTree, torch.Tensor]:
    """Clips each example's gradient to global norm ``l2_norm_clip`` and sums: optax's function.

    ``Σᵢ gᵢ · min(1, C/‖gᵢ‖)`` over the leading dimension of every leaf.

    ``l2_norm_clip`` is checked as in :func:`clipped_grad_sum`.

    Args:
        grads: per-example gradients, every leaf with the same leading batch dimension (not
            modified).
        l2_norm_clip: ``C ≥ 0``, a number (``inf``: no clipping) or a 0-d floating tensor.

    Returns:
        ``(clipped_sum, num_clipped)``: a pytree like one example's gradient, in the leaves'
        dtypes (summed in at least float32), and an int64 0-d count of the examples whose norm
        exceeded ``C`` (a zero gradient is not clipped).

    Raises:
        ValueError: no leaves, leaves of different leading dimensions, a negative or NaN
            number ``l2_norm_clip`` (a tensor's value is not read) or a tensor one that is
            not 0-d floating.
        TypeError: ``l2_norm_clip`` is a schedule, a bool or not a number.

    Example:
        >>> import torch, functrain as ft
        >>> g = [torch.tensor([[0.0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
        >>> ft.per_example_global_norm_clip(g, 1.25)
        ([tensor([1.7500, 1.7500, 1.7500])], tensor(3))
    """
    _check_number("l2_norm_clip", l2_norm_clip, minimum=0.0, finite=False)
    leaves, spec = _check_batched(grads, "per_example_global_norm_clip")
    factors = _clip_factors(leaves, l2_norm_clip)
    clipped = _rounded(_weighted_sum(leaves, factors), leaves)
    return tree.unflatten(spec, clipped), (factors < 1).sum()


def _check_batched(grads: PyTree, name: str) -> tuple[list[torch.Tensor], Any]:
    """The leaves of per-example ``grads``; ValueError unless all share a leading dimension."""
    leaves, spec = tree.flatten(grads)
    if not leaves or any(x.dim() == 0 or x.shape[0] != leaves[0].shape[0] for x in leaves):
        why = ""
        try:
            batch_size_of(grads, "grads")
        except ValueError as err:  # names the first leaf at fault
            why = f": {err}"
        raise ValueError(
            f"{name} expects every leaf of grads to have the same leading batch dimension "
            f"(per-example gradients){why}"
        )
    return leaves, spec


def per_example_layer_norm_clip(
    grads: PyTree, global_l2_norm_clip: float | torch.Tensor, uniform: bool = True
) -> tuple[PyTree, PyTree]:
    """Clips each example's gradient leaf by leaf (McMahan et al., 2017) and sums: optax's
    function.

    Each of the ``K`` leaves ("layers") is clipped on its own, as by
    :func:`per_example_global_norm_clip`, to ``Cᵢ = C / √K`` (``uniform=True``) or
    ``Cᵢ = C · √(Dᵢ / D)`` with ``Dᵢ`` the leaf's per-example size and ``D`` their total
    (``uniform=False``); either way ``Σ Cᵢ² = C²``, so the whole gradient has norm at most
    ``C``. With one leaf it equals :func:`per_example_global_norm_clip`.

    Args:
        grads: per-example gradients, every leaf with the same leading batch dimension (not
            modified).
        global_l2_norm_clip: ``C ≥ 0``, a number (``inf``: no clipping) or a 0-d floating
            tensor.
        uniform: the same clip norm for every leaf, or one proportional to ``√Dᵢ``.

    Returns:
        ``(clipped_sum, num_clipped)``: a pytree like one example's gradient, and a pytree of
        the same structure holding each leaf's int64 0-d count of clipped examples (optax:
        int32).

    Raises:
        ValueError: no leaves, leaves of different leading dimensions, or a negative or NaN
            ``global_l2_norm_clip``.
        TypeError: ``global_l2_norm_clip`` is a schedule, a bool or not a number.

    Example:
        >>> import torch, functrain as ft
        >>> g = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.tensor([[2.0], [0.0]])}
        >>> ft.per_example_layer_norm_clip(g, 2.0 ** 0.5)
        ({'a': tensor([0.9000, 1.2000]), 'b': tensor([1.])}, {'a': tensor(1), 'b': tensor(1)})
    """
    _check_number("global_l2_norm_clip", global_l2_norm_clip, minimum=0.0, finite=False)
    leaves, spec = _check_batched(grads, "per_example_layer_norm_clip")
    if uniform:
        clips = [global_l2_norm_clip * (1.0 / len(leaves)) ** 0.5 for _ in leaves]
    else:
        sizes = [x[0].numel() for x in leaves]
        # Every leaf empty per example: no entry to clip (optax divides 0 by 0 and raises).
        total = max(sum(sizes), 1)
        clips = [global_l2_norm_clip * (n / total) ** 0.5 for n in sizes]
    sums, counts = [], []
    for x, clip in zip(leaves, clips):
        factors = _clip_factors([x], clip)
        sums.append(_rounded(_weighted_sum([x], factors), [x])[0])
        counts.append((factors < 1).sum())
    return tree.unflatten(spec, sums), tree.unflatten(spec, counts)


class ClippedGradSum(NamedTuple):
    """Result of :func:`clipped_grad_sum`.

    Attributes:
        grad_sum: ``Σᵢ clip(gᵢ, C)``, a pytree like ``params``.
        num_clipped: number of examples whose gradient norm exceeded ``C`` (int64 tensor).
        loss_sum: ``Σᵢ lossᵢ`` (divide by the batch size for the mean loss).
        count: number of examples (a Python int).

    Example:
        >>> import torch, functrain as ft
        >>> out = ft.clipped_grad_sum(lambda p, x: (x @ p).mean(), torch.zeros(2), torch.eye(2), 0.5)
        >>> out.grad_sum, out.num_clipped, out.count
        (tensor([0.5000, 0.5000]), tensor(2), 2)
    """

    grad_sum: PyTree
    num_clipped: torch.Tensor
    loss_sum: torch.Tensor
    count: int


def clipped_grad_sum(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    l2_norm_clip: float | torch.Tensor,
    *,
    chunk_size: int | None = None,
    buffers: PyTree | None = None,
    randomness: str = "error",
    method: str = "auto",
) -> ClippedGradSum:
    """The sum of per-sample gradients each clipped to norm ``l2_norm_clip``, chunk by chunk.

    This is the DP-SGD gradient before noise and normalization. It never holds more than
    ``chunk_size`` per-sample gradients. For micro-batch accumulation, add the ``grad_sum`` of
    each micro-batch (``ft.tree.add``) and apply :func:`dp_noisy_mean` once per step.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar mean loss``, as in :func:`per_sample_grads`.
        params: pytree of floating-point tensors to differentiate.
        batch: pytree of tensors sharing a leading batch dimension.
        l2_norm_clip: ``C``, the per-example norm bound: ``>= 0`` (``inf``: no clipping). A
            negative or NaN Python number raises ``ValueError`` (a negative ``C`` would flip
            the gradients, a NaN one turn clipping off); a tensor is used unchecked.
        chunk_size: examples per ``vmap`` call; at most this many per-sample gradients are
            held at once (``None``: the whole batch in one call, the fastest).
        buffers: non-differentiated state shared by all examples, passed as ``buffers=``.
        randomness: ``torch.func.vmap`` randomness mode: ``"error"``, ``"different"``,
            ``"same"``.
        method: ``"vmap"`` forms per-sample gradients with ``vmap(grad)``, clips and sums
            them. ``"layers"`` never forms them ("ghost clipping", Li et al. 2021): when every
            parameter is the weight or bias of a linear, convolution (grouped and depthwise
            included), layer-norm or embedding call, one backward pass gives each
            example's gradient norm layer by layer and a second, ordinary one the weighted sum
            ``∇ Σᵢ factorᵢ·lossᵢ``; it raises ``ValueError`` naming the parameter otherwise.
            ``"loop"`` takes one example's gradient (autograd) at a time and clips and adds it before
            the next (one gradient alive at a time; any model, PyTorch's recurrent modules
            included). ``"auto"`` (default): ``"layers"`` when it applies and a chunk's
            per-sample gradients would take 64 MiB or more, else ``"vmap"``, or ``"loop"``
            where the model runs ``nn.LSTM``/``nn.GRU``/``nn.RNN`` or a cell. Ghost clipping costs a
            second backward pass but never writes ``chunk × parameters`` numbers, so it wins
            when those are many (a 0.67M-parameter MLP at batch 64, on CPU: about 4× a plain
            gradient against 31× for ``"vmap"``) and loses on small models (a 26k-parameter
            CNN: 2.3–2.6× against 1.9–2.1×).

    Returns:
        A :class:`ClippedGradSum`: ``grad_sum`` (pytree like ``params``), ``num_clipped``,
        ``loss_sum`` and ``count``. An example whose gradient is exactly zero has factor 1
        (``0/0`` is not NaN). One whose gradient holds a NaN keeps factor 1 (not counted as
        clipped) and an inf one gets factor 0 (``0·inf`` is NaN): either way ``grad_sum`` is
        not finite where that gradient was not, and a step that skips non-finite updates sees it.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.zeros(2)}
        >>> batch = {"x": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
        >>> loss_fn = lambda p, b: -(b["x"] @ p["w"]).mean()
        >>> out = ft.clipped_grad_sum(loss_fn, params, batch, 1.0, chunk_size=1)
        >>> out.grad_sum["w"], out.num_clipped
        (tensor([-0.9000, -1.2000]), tensor(1))
    """
    _check_options(chunk_size, randomness, loss_fn, params, method, REDUCTION_METHODS)
    _check_number("l2_norm_clip", l2_norm_clip, minimum=0.0, finite=False)
    done = reduce_by_layers(
        method,
        params,
        batch,
        chunk_size,
        layers_attempt(
            method,
            params,
            batch,
            buffers,
            lambda: _clipped_sum_by_layers(
                loss_fn, params, batch, l2_norm_clip, chunk_size, buffers, randomness
            ),
        ),
    )
    if done is not None:
        return done
    acc: list[torch.Tensor] | None = None
    spec = None
    num_clipped = None
    loss_sum = None
    count = 0
    for c in vmap_chunks(loss_fn, params, batch, chunk_size, buffers, randomness, method):
        leaves, spec = tree.flatten(c.grads)
        if leaves:
            factors = _clip_factors(leaves, l2_norm_clip)
        else:  # no parameters: every gradient is zero, nothing is clipped
            factors = torch.ones(c.stop - c.start, device=c.losses.device)
        part = _widened(_weighted_sum(leaves, factors))
        clipped = (factors < 1).sum()
        if acc is None:
            acc, num_clipped, loss_sum = part, clipped, _wide_sum(c.losses)
        else:
            if acc:  # else there are no parameters
                _foreach.add_(acc, part)
            num_clipped = num_clipped + clipped
            loss_sum = loss_sum + _wide_sum(c.losses)
        count += c.stop - c.start
        loss_dtype = c.losses.dtype
    grad_sum = tree.unflatten(spec, _rounded(acc, leaves))
    return ClippedGradSum(grad_sum, num_clipped, loss_sum.to(loss_dtype), count)


def _widened(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Chunk sums in at least float32: a bfloat16 sum over chunks rounds once per chunk (400
    one-example chunks of a loss near 100 lost 7%). Float32 and wider leaves are untouched."""
    return [widen(x) for x in leaves]


def _wide_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dtype=torch.float32) if x.dtype in _HALF else x.sum()


def _rounded(acc: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [a.to(x.dtype) for a, x in zip(acc, like)]


def _clipped_sum_by_layers(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    l2_norm_clip: float | torch.Tensor,
    chunk_size: int | None,
    buffers: PyTree | None,
    randomness: str,
) -> ClippedGradSum:
    """``method="layers"``: ghost norms, then one weighted backward pass per chunk."""
    setup = layer_chunks(loss_fn, params, batch, chunk_size, buffers)

    def factors_of(squared_norms: list[torch.Tensor], rows: int) -> torch.Tensor:
        if not squared_norms:  # no parameters: every gradient is zero
            return torch.ones(rows)
        return _factors_of(torch.stack(squared_norms).sum(0).sqrt(), l2_norm_clip)

    acc: list[torch.Tensor] = []
    num_clipped = loss_sum = None
    for start, stop, chunk in setup.chunks:
        losses, factors, part = clipped_sum_by_layers(
            setup.example_loss,
            setup.param_leaves,
            chunk,
            randomness,
            lambda sq, rows=stop - start: factors_of(sq, rows),
        )
        part = _widened(part)
        if num_clipped is None or loss_sum is None:
            acc, num_clipped, loss_sum = part, (factors < 1).sum(), _wide_sum(losses)
        else:
            if acc:  # else there are no parameters
                _foreach.add_(acc, part)
            num_clipped = num_clipped + (factors < 1).sum()
            loss_sum = loss_sum + _wide_sum(losses)
        loss_dtype = losses.dtype
    assert num_clipped is not None and loss_sum is not None  # at least one chunk
    grad_sum = tree.unflatten(setup.param_spec, _rounded(acc, setup.param_leaves))
    return ClippedGradSum(grad_sum, num_clipped, loss_sum.to(loss_dtype), batch_size_of(batch))
