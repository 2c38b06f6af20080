"""Statistics of per-sample gradients streamed from ``loss_fn``, chunk by chunk.

:func:`per_sample_grad_norms`, :func:`per_sample_grad_moments` and :func:`per_sample_gram`
compute ``chunk_size`` per-sample gradients at a time, reduce them and drop them, so memory is
``chunk_size × parameters`` instead of ``batch × parameters``. Norms and Gram matrices can also
be taken layer by layer in one backward pass without forming the gradients (``method="layers"``,
ghost norms). The reductions themselves are those of :mod:`functrain.grads.stats`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from functrain import tree
from functrain._precision import HALF as _HALF
from functrain._precision import widen
from functrain.grads._layer_dispatch import REDUCTION_METHODS, layer_chunks, reduce_by_layers
from functrain.grads._layer_passes import gram_by_layers, sq_norms_by_layers
from functrain.grads._per_example import Generators, _check_options, batch_size_of, rng_devices
from functrain.grads._routes import layers_attempt
from functrain.grads.per_sample import PerSampleChunk, _chunks, per_sample_chunks, vmap_chunks
from functrain.grads.stats import (
    GradMoments,
    GradNorms,
    _centred_sums,
    _check_rows,
    _cross_gram,
    _flat_rows,
    _gram_dtype,
    _to_cosine,
    per_sample_norms,
    row_matrix,
)

__all__ = ["per_sample_grad_moments", "per_sample_grad_norms", "per_sample_gram"]

PyTree = Any


def per_sample_grad_norms(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
    buffers: PyTree | None = None,
    randomness: str = "error",
    method: str = "auto",
) -> GradNorms:
    """Per-sample gradient norms (global and per leaf), computed chunk by chunk.

    Arguments are those of :func:`per_sample_grads`; only ``chunk_size`` gradients are alive at
    a time. Useful to find the hardest examples or to pick a DP clipping norm.

    ``method``: ``"vmap"`` forms each chunk's per-sample gradients and takes their norms;
    ``"layers"`` takes the norms layer by layer in one backward pass without forming the
    gradients (ghost norms, as :func:`clipped_grad_sum`; it raises ``ValueError`` naming a
    parameter used by a call other than linear, convolution, layer norm or embedding);
    ``"loop"`` takes one example's gradient (autograd) at a time and its norms before the next (any
    model, PyTorch's recurrent modules included); ``"auto"`` (default) uses ``"layers"`` when
    it applies and a chunk's per-sample gradients would take 64 MiB or more, else ``"vmap"``,
    or ``"loop"`` where the model runs a recurrent module (``nn.LSTM``, ``nn.GRU``,
    ``nn.RNN`` or a cell).

    Args:
        loss_fn: ``loss_fn(params, batch) -> loss``, as for :func:`per_sample_grads`.
        params: pytree of floating-point tensors (not modified).
        batch: pytree of tensors sharing a leading batch dimension ``n``.
        chunk_size: examples per chunk (``None``: one chunk).
        buffers: non-differentiated state passed as ``loss_fn(..., buffers=buffers)``.
        randomness: ``"error"``, ``"different"`` or ``"same"``, as for :func:`per_sample_grads`.
        method: ``"auto"``, ``"vmap"``, ``"layers"`` or ``"loop"`` (above).

    Returns:
        A :class:`GradNorms` of ``(n,)`` tensors, dtypes as :func:`per_sample_norms` gives
        (half precision computed in float32, rounded once). An empty batch gives empty norms.

    Raises:
        ValueError: bad options, batch leaves of different lengths, or (``"layers"``) a
            parameter its rules do not cover.
        TypeError: a ``loss_fn`` that is not callable.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2)}
        >>> batch = {"x": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "y": torch.zeros(2)}
        >>> loss_fn = lambda p, b: ((b["x"] @ p["w"] - b["y"]) ** 2).mean()
        >>> ft.per_sample_grad_norms(loss_fn, params, batch, chunk_size=1).global_norm
        tensor([13.4164, 70.0000])
    """
    _check_options(chunk_size, randomness, loss_fn, params, method, REDUCTION_METHODS)
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
            lambda: _norms_by_layers(loss_fn, params, batch, chunk_size, buffers, randomness),
        ),
    )
    if done is not None:
        return done
    parts = []
    for c in vmap_chunks(loss_fn, params, batch, chunk_size, buffers, randomness, method):
        parts.append(per_sample_norms(c.grads))
        # Dropped before the next chunk is computed: a loop variable would keep two alive.
        del c
    if len(parts) == 1:
        return parts[0]
    return GradNorms(
        torch.cat([p.global_norm for p in parts]),
        tree.map(lambda *xs: torch.cat(xs), *(p.leaf_norms for p in parts)),
    )


def _norms_by_layers(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    chunk_size: int | None,
    buffers: PyTree | None,
    randomness: str,
) -> GradNorms:
    """``method="layers"``: the squared norms of each chunk from one backward pass."""
    setup = layer_chunks(loss_fn, params, batch, chunk_size, buffers)
    chunks: list[list[torch.Tensor]] = []
    totals: list[torch.Tensor] = []
    for start, stop, chunk in setup.chunks:
        losses, squares = sq_norms_by_layers(
            setup.example_loss, setup.param_leaves, chunk, randomness
        )
        chunks.append(squares)
        totals.append(sum(squares, losses.new_zeros(stop - start)))
    squares = [torch.cat(parts) for parts in zip(*chunks)]
    # Half-precision squares come in float32; the norms keep the vmap route's dtypes, each
    # rounded once.
    dtypes = [p.dtype for p in setup.param_leaves]
    leaf_norms = [sq.sqrt().to(d) if d in _HALF else sq.sqrt() for sq, d in zip(squares, dtypes)]
    total = torch.cat(totals).sqrt()
    if leaf_norms:
        total = total.to(_gram_dtype(leaf_norms))
    return GradNorms(total, tree.unflatten(setup.param_spec, leaf_norms))


def per_sample_grad_moments(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
    buffers: PyTree | None = None,
    randomness: str = "error",
    method: str = "auto",
) -> GradMoments:
    """Moments of the per-sample gradients (mean, variance, SNR), accumulated chunk by chunk.

    Memory is ``chunk_size × parameters`` plus three parameter-sized accumulators (float32 for
    half-precision parameters, whose mean is rounded once at the end and whose ``m2`` stays
    float32, as :class:`GradMoments` documents). Combine with
    :func:`grad_variance`, :func:`grad_snr`, ``GradMoments.sum_of_squares`` or
    :func:`gradient_diversity_from_moments`.

    The sums ``Σ dᵢ`` and ``Σ dᵢ²`` of the deviations ``dᵢ = gᵢ − c`` from the first chunk's
    mean ``c`` (the first example's gradient for ``"loop"``) are accumulated and give ``mean = c + Σ dᵢ / n`` and
    ``m2 = Σ dᵢ² − (Σ dᵢ)² / n``. Merging chunk moments with :func:`merge_grad_moments`
    instead rounds every partial mean, which costs the variance a relative ``ε·|mean|/std``
    (2e-4 for float32 gradients with mean/std = 1e4 in chunks of 16, against 3e-7 here).

    Args:
        loss_fn: ``loss_fn(params, batch) -> loss``, as for :func:`per_sample_grads`.
        params: pytree of floating-point tensors (not modified).
        batch: pytree of tensors sharing a leading batch dimension ``n``.
        chunk_size: examples per chunk (``None``: one chunk).
        buffers: non-differentiated state passed as ``loss_fn(..., buffers=buffers)``.
        randomness: ``"error"``, ``"different"`` or ``"same"``, as for :func:`per_sample_grads`.
        method: ``"vmap"`` (chunks by ``vmap(grad)``), ``"loop"`` (one autograd pass per
            example, accumulated as it comes: one gradient alive at a time) or ``"auto"``
            (default: ``"vmap"``, or ``"loop"`` for PyTorch's recurrent modules).

    Returns:
        A :class:`GradMoments` with ``count = n``: ``mean`` in the parameters' dtypes, ``m2``
        (``Σᵢ (gᵢ − mean)²``, not divided) float32 for half-precision parameters. An empty
        batch gives ``count`` 0 and zeros.

    Raises:
        ValueError: bad options or batch leaves of different lengths (as
            :func:`per_sample_grads`).

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2)}
        >>> batch = {"x": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "y": torch.zeros(2)}
        >>> loss_fn = lambda p, b: ((b["x"] @ p["w"] - b["y"]) ** 2).mean()
        >>> m = ft.per_sample_grad_moments(loss_fn, params, batch, chunk_size=1)
        >>> m.mean["w"], ft.grad_variance(m)["w"]
        (tensor([24., 34.]), tensor([648., 968.]))
    """
    _check_options(chunk_size, randomness, loss_fn, params, method, ("auto", "vmap", "loop"))
    centres: list[torch.Tensor] | None = None
    sums: list[tuple[torch.Tensor, torch.Tensor]] = []
    count = 0
    spec = None
    shapes: list[tuple[torch.Size, torch.dtype]] = []
    for c in vmap_chunks(loss_fn, params, batch, chunk_size, buffers, randomness, method):
        leaves, spec = tree.flatten(c.grads)
        if not leaves:
            raise ValueError("per_sample_grad_moments needs at least one gradient leaf")
        _check_rows(leaves, c.grads)
        rows = [row_matrix(x) for x in leaves]
        n = rows[0].shape[0]
        if centres is None:
            # Any centre near the mean works; the first chunk's rounded mean is one. Widened:
            # half-precision sums over many chunks are kept in float32 and rounded once.
            centres = [widen(r.new_full((1, n), 1.0 / max(n, 1)) @ r) for r in rows]
        parts = [_centred_sums(r, centre) for r, centre in zip(rows, centres)]
        if sums:
            for (a, b), (p, q) in zip(sums, parts):
                a.add_(p)  # the sums are this function's own tensors
                b.add_(q)
        else:
            sums = parts
        count += n
        shapes = [(x.shape[1:], x.dtype) for x in leaves]
        # Dropped before the next chunk is computed: loop variables would keep two alive.
        del c, leaves, rows, parts
    assert centres is not None and spec is not None  # at least one chunk
    means, m2s = [], []
    for (shape, dtype), centre, (s1, s2) in zip(shapes, centres, sums):
        shift = s1 / max(count, 1)
        means.append((centre + shift).reshape(shape).to(dtype))
        # m2 keeps the accumulation dtype: a float16 one overflowed (see GradMoments).
        m2s.append((s2 - s1 * shift).clamp_min_(0).reshape(shape))
    return GradMoments(count, tree.unflatten(spec, means), tree.unflatten(spec, m2s))


def per_sample_gram(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    *,
    cosine: bool = False,
    chunk_size: int | None = None,
    buffers: PyTree | None = None,
    randomness: str = "error",
    eps: float = 1e-30,
    method: str = "auto",
) -> torch.Tensor:
    """Gram / cosine matrix between the per-sample gradients, block by block.

    With ``c`` chunks, block ``(i, j)`` needs chunks ``i`` and ``j`` at the same time, so at
    most two chunks of gradients are alive, at the cost of recomputing chunk gradients
    ``c(c+1)/2`` times instead of ``c``. With ``chunk_size=None`` it is one pass. With
    ``randomness="different"`` or ``"same"`` (dropout...), each recomputation of a chunk replays
    the random draws of its first computation (the default generators are put back to their
    states before it), so every block sees the same per-sample gradients and the matrix is a
    Gram matrix; the generators end where one pass over the chunks would leave them.

    ``method``: ``"vmap"`` forms the chunks' per-sample gradients as above; ``"layers"`` adds
    up each layer's part of the matrix in one backward pass without forming the gradients
    where a rule allows (a linear layer's part is ``(GGᵀ) ⊙ (XXᵀ)`` over its inputs ``X`` and
    output gradients ``G``; convolutions and layer norms form their per-example gradients one
    layer at a time), over each pair of chunks together; it raises ``ValueError`` naming a
    parameter used by any other call. With several chunks it runs each pair of chunks as one
    batch, whose random draws differ from the chunks' own, so it refuses ``randomness`` other
    than ``"error"`` there. ``"loop"`` forms the chunks' gradients with one autograd pass per
    example (any model, PyTorch's recurrent modules included). ``"auto"`` (default) uses
    ``"layers"`` when it applies and a chunk's per-sample gradients would take 64 MiB or more
    (and not for random draws over several chunks), else ``"vmap"``, or ``"loop"`` for a
    recurrent module.

    Args:
        loss_fn: ``loss_fn(params, batch) -> loss``, as for :func:`per_sample_grads`.
        params: pytree of floating-point tensors (not modified).
        batch: pytree of tensors sharing a leading batch dimension ``n``.
        cosine: divide by ``‖gᵢ‖·‖gⱼ‖`` (a zero gradient gets cosine 0 with everything).
        chunk_size: examples per chunk (``None``: one chunk).
        buffers: non-differentiated state passed as ``loss_fn(..., buffers=buffers)``.
        randomness: ``"error"``, ``"different"`` or ``"same"``, as for :func:`per_sample_grads`.
        eps: floor on norms when ``cosine``.
        method: ``"auto"``, ``"vmap"``, ``"layers"`` or ``"loop"`` (above).

    Returns:
        An ``(n, n)`` tensor in the parameters' promoted dtype (half precision formed in
        float32 and rounded once); ``(0, 0)`` for an empty batch.

    Raises:
        ValueError: bad options, batch leaves of different lengths, or (``"layers"``) a
            parameter its rules do not cover, or random draws over several chunks.
        TypeError: a ``loss_fn`` that is not callable.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2)}
        >>> batch = {"x": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
        >>> loss_fn = lambda p, b: (b["x"] @ p["w"]).mean()
        >>> ft.per_sample_gram(loss_fn, params, batch, chunk_size=1)
        tensor([[1., 0.],
                [0., 1.]])
    """
    _check_options(chunk_size, randomness, loss_fn, params, method, REDUCTION_METHODS)
    # Pairs of chunks run as one batch draw other numbers than the chunks alone: no layers.
    paired_draws = (
        randomness != "error" and chunk_size is not None and chunk_size < batch_size_of(batch)
    )
    if paired_draws and method == "layers":
        raise ValueError(
            f"per_sample_gram(method='layers', randomness={randomness!r}) with several "
            "chunks: the layer rules run each pair of chunks as one batch, whose random "
            "draws differ from pair to pair, so the blocks would not fit together. Use "
            "method='vmap' (it replays each chunk's draws), chunk_size=None, or "
            "randomness='error' with the randomness turned off (model.eval())"
        )
    g = None
    if not paired_draws:
        g = reduce_by_layers(
            method,
            params,
            batch,
            chunk_size,
            layers_attempt(
                method,
                params,
                batch,
                buffers,
                lambda: _gram_by_layers(loss_fn, params, batch, chunk_size, buffers, randomness),
            ),
        )
    if g is None:
        g, dtype = _gram_by_vmap(loss_fn, params, batch, chunk_size, buffers, randomness, method)
    else:  # formed in float32 for half-precision gradients, returned as the vmap route does
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in tree.leaves(params)))
    return _to_cosine(g, eps, dtype) if cosine else g.to(dtype)


def _gram_by_layers(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    chunk_size: int | None,
    buffers: PyTree | None,
    randomness: str,
) -> torch.Tensor:
    """``method="layers"``: one backward pass per pair of chunks (one in all for one chunk)."""
    setup = layer_chunks(loss_fn, params, batch, chunk_size, buffers)
    chunks = list(setup.chunks)

    def gram(leaves: list[torch.Tensor]) -> torch.Tensor:
        return gram_by_layers(setup.example_loss, setup.param_leaves, leaves, randomness)[1]

    if len(chunks) == 1:
        return gram(chunks[0][2])
    n = chunks[-1][1]
    g: torch.Tensor | None = None
    for i, (a0, a1, a) in enumerate(chunks):
        for b0, b1, b in chunks[i + 1 :]:
            block = gram([torch.cat(pair) for pair in zip(a, b)])
            g = block.new_empty(n, n) if g is None else g
            k = a1 - a0
            g[a0:a1, a0:a1], g[b0:b1, b0:b1] = block[:k, :k], block[k:, k:]
            g[a0:a1, b0:b1], g[b0:b1, a0:a1] = block[:k, k:], block[k:, :k]
    assert g is not None  # two chunks at least
    return g


def _gram_by_vmap(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    chunk_size: int | None,
    buffers: PyTree | None,
    randomness: str,
    method: str,
) -> tuple[torch.Tensor, torch.dtype]:
    """``method="vmap"`` or ``"loop"`` (``"auto"``: ``vmap``, or the loop for a recurrent
    model): blocks of materialized per-sample gradients, two chunks at a time.

    Returns the matrix (float32 for half-precision gradients) and the gradients' dtype."""
    opts = {"chunk_size": chunk_size, "buffers": buffers, "randomness": randomness}

    def chunks(part: PyTree) -> Iterator[PerSampleChunk]:
        if method == "auto":  # not the rules' per-sample gradients: vmap (or the loop)
            return _chunks(
                loss_fn, params, part, chunk_size, buffers, randomness, False, "vmap-auto"
            )
        return per_sample_chunks(loss_fn, params, part, method=method, **opts)

    n = batch_size_of(batch)
    replay = _Replay(params, batch, buffers) if randomness != "error" else None
    rows = []
    dtype = None
    # Explicit next() calls: a chunk is computed by next(), after its draws are set up.
    row_chunks, row_start = chunks(batch), 0
    while (ci := _next_chunk(row_chunks, replay, row_start)) is not None:
        left = _flat_rows(ci.grads)
        dtype = _gram_dtype(left)
        blocks = [_cross_gram(left, left)]
        # Chunks after ci are recomputed for this row of blocks; earlier ones come by symmetry.
        row_start = ci.stop
        rest = tree.map(lambda x, stop=ci.stop: x[stop:], batch)
        if ci.stop < n:
            col_chunks, col_start = chunks(rest), ci.stop
            while (cj := _next_chunk(col_chunks, replay, col_start)) is not None:
                blocks.append(_cross_gram(left, _flat_rows(cj.grads)))
                col_start += cj.stop - cj.start
                del cj  # before the next one is computed: two chunks alive, not three
        rows.append(blocks)
        del ci, left  # likewise before the next row's chunk
    # Concatenated rather than written into an empty matrix: under an outer torch.func.vmap
    # (an ensemble) the blocks are batched and an unbatched matrix cannot take them in place.
    g = torch.cat(
        [torch.cat([rows[j][i - j].T for j in range(i)] + rows[i], dim=1) for i in range(len(rows))]
    )
    assert dtype is not None
    return g, dtype


class _Replay:
    """The default generators' states before each chunk's first computation, by the chunk's
    first row: a recomputed chunk draws the random numbers its first computation drew.

    The first row of blocks computes every chunk once, in order, recording the states; later
    rows put them back. The last chunk computed is a replay of the last one, so the
    generators end where the first row left them (one pass over the chunks)."""

    def __init__(self, *trees: PyTree) -> None:
        self.generators = Generators(rng_devices(*trees))
        self.states: dict[int, list[torch.Tensor]] = {}

    def before(self, start: int) -> None:
        if start in self.states:
            self.generators.set(self.states[start])
        else:
            self.states[start] = self.generators.get()


def _next_chunk(
    chunks: Iterator[PerSampleChunk], replay: _Replay | None, start: int
) -> PerSampleChunk | None:
    """The next chunk (which starts at row ``start`` of the batch), its draws replayed."""
    if replay is not None:
        replay.before(start)
    return next(chunks, None)
