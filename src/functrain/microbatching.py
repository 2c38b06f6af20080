"""Microbatched evaluation of functions, as ``optax.microbatching`` (optax 0.2.8).

:func:`microbatch` turns ``fun(*args)`` into a function that splits the batch arguments into
micro-batches of ``microbatch_size`` rows, evaluates ``fun`` on one after another (a Python
loop, so only one micro-batch's intermediates are alive at a time) and combines the results as
an :class:`Accumulator` says: :attr:`AccumulationType.SUM`, ``MEAN``, ``RUNNING_MEAN`` or
``CONCAT``, or a pytree of them matching (a prefix of) ``fun``'s output. :func:`micro_vmap` is
``torch.func.vmap`` with microbatching; :func:`micro_grad` computes per-example gradients
(``torch.func.grad_and_value`` under ``vmap``), transforms them (``transform_fn``, e.g.
per-example clipping) and sums or averages them, returning per-example losses, metrics and aux.

As in optax, micro-batch ``i`` of a batch of ``B = n * microbatch_size`` rows is the *strided*
set of rows ``i, i + n, i + 2n, ...`` (:func:`reshape_batch_axis` is a column-major reshape),
and ``CONCAT`` puts every row back in its place. Micro-batches are views of the inputs; only
``CONCAT`` copies (once, when it assembles its result). ``num_real_microbatches=k`` counts
only the first ``k`` micro-batches (the others are padding): a Python int stops the loop after
``k``; a 0-d integer tensor is never read on the host: every micro-batch is evaluated and the
padded ones' contributions are dropped with ``torch.where`` (so a step compiled once serves
any ``k``). ``MEAN`` then still divides by all ``n`` micro-batches, ``RUNNING_MEAN`` by the
``k`` real ones, and ``CONCAT`` leaves zeros in the padded rows, as in optax.

Relation to ``ft.make_train_step(micro_batches=K)``: the train step also accumulates exactly
(the gradient of the full-batch loss), and also takes micro-batches of unequal sizes (10
examples with ``K=4`` give 3, 3, 2, 2, contiguous rows) and weights each by its size; use it
to train. This module is the optax-compatible building block: equal sizes (``B`` divisible by
``microbatch_size``), strided rows, any function and any accumulation, per-example gradient
transforms; use it to port optax code or to evaluate a function too large for one pass.

Differences from optax: the loop is a Python loop (``torch.compile`` unrolls it) instead of
``lax.fori_loop``; an :class:`Accumulator`'s ``init`` receives the first micro-batch's actual
output (optax passes its shape and dtype only); ``vmap_fn`` defaults to ``torch.func.vmap``
and keyword arguments of :func:`micro_vmap`'s function are mapped along axis 0, as in
``jax.vmap`` (``torch.func.vmap`` itself never maps keyword arguments); outputs of mapped
functions (and :func:`micro_grad`'s aux) must be tensors or ``None``; :func:`micro_grad`
differentiates tensors only (optax also takes Python floats); negative ``in_axes`` count from
each leaf's last axis; :func:`micro_vmap`'s ``SUM`` of a mapped axis sums bool and 8/16-bit
integers in int32 (``jnp.sum``: unsigned ones in uint32); bad input raises errors naming the
argument, pytree path and shape.

Example:
    >>> import torch
    >>> import functrain.microbatching as mb
    >>> fun = lambda x: (x + 1, (3 * x).sum())
    >>> data = torch.tensor([1, 2, 3, 4])
    >>> strategy = (mb.AccumulationType.CONCAT, mb.AccumulationType.SUM)
    >>> mb.microbatch(fun, argnums=0, microbatch_size=2, accumulator=strategy)(data)
    (tensor([2, 3, 4, 5]), tensor(30))
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import torch
import torch.func

from functrain import tree as _tree

# The public classes live with the built-in accumulations (which construct them) and are
# re-exported here; PyTreeFn / UpdateFn stay module attributes, as before the split.
from functrain._microbatching_accumulators import (
    AccumulationType,
    Accumulator,
    AccumulatorTree,
    PyTreeFn,  # noqa: F401
    UpdateFn,  # noqa: F401
    _canonicalize,
    _select,
)
from functrain._microbatching_args import (
    _check_num_real,
    _plan,
    _reshape_leaf,
    _tensor_leaves,
)
from functrain.train.microbatch import _as_int

__all__ = [
    "AccumulationType",
    "Accumulator",
    "micro_grad",
    "micro_vmap",
    "microbatch",
    "reshape_batch_axis",
]

Function: TypeAlias = Callable[..., Any]
VmapFn: TypeAlias = Callable[[Function, Any, Any], Function]
# optax's namedtuple (type name "Aux"): micro_grad's per-example outputs.
IndividualOutputs = collections.namedtuple("Aux", ["values", "metrics", "aux"])


def reshape_batch_axis(tree: Any, microbatch_size: int, axis: int = 0) -> Any:
    """Splits each leaf's batch axis into ``(num_microbatches, microbatch_size)`` axes.

    The split is column-major, as in optax: row ``a + n * b`` of a batch of ``n *
    microbatch_size`` rows lands at ``[a, b]``, so micro-batch ``a`` holds rows ``a, a + n,
    ...``. The results are views (nothing is copied).

    Args:
        tree: a pytree of tensors, each with a batch axis ``axis``.
        microbatch_size: the number of rows per micro-batch.
        axis: the batch axis (negative counts from each leaf's end).

    Returns:
        The pytree of reshaped views, the two new axes at ``axis``.

    Raises:
        TypeError: a leaf is not a tensor (the message names its path).
        ValueError: a leaf lacks ``axis``, or its size is not divisible by
            ``microbatch_size`` (the message names the path and shape).

    Example:
        >>> import torch
        >>> import functrain.microbatching as mb
        >>> mb.reshape_batch_axis(torch.arange(6), 3)
        tensor([[0, 2, 4],
                [1, 3, 5]])
    """
    names, leaves, spec = _tensor_leaves(tree, "tree", "a batch leaf")
    return _tree.unflatten(
        spec, [_reshape_leaf(x, microbatch_size, axis, n) for n, x in zip(names, leaves)]
    )


def microbatch(
    fun: Function,
    argnums: int | Sequence[int],
    microbatch_size: int | None,
    accumulator: Accumulator | AccumulationType | AccumulatorTree = AccumulationType.SUM,
    *,
    argnames: str | Sequence[str] = (),
    in_axes: int | Sequence[int] = 0,
    num_real_microbatches: int | torch.Tensor | None = None,
) -> Function:
    """``fun`` evaluated micro-batch by micro-batch, the results combined by ``accumulator``.

    For ``SUM`` the new function computes ``sum(fun(micro_batch_i) for i in range(n))``, one
    micro-batch after another, so peak memory is that of one micro-batch.

    Args:
        fun: any function.
        argnums: the positions of the arguments with a batch axis.
        microbatch_size: rows per micro-batch; must divide the batch size. ``None`` returns
            ``fun`` itself.
        accumulator: how to combine the micro-batch results: an :class:`Accumulator`, an
            :class:`AccumulationType`, or a pytree of them that is a prefix of ``fun``'s
            output.
        argnames: the names of keyword arguments with a batch axis.
        in_axes: the batch axis of each of ``argnums + argnames`` (in that order), or one for
            all of them.
        num_real_microbatches: evaluate only the first this many micro-batches (the others
            are padding). A 0-d integer tensor is not read on the host: all micro-batches are
            evaluated and the padded ones ignored.

    Returns:
        A function with ``fun``'s arguments and the accumulated result.

    Raises:
        ValueError: (when called) batch arguments with different batch sizes, a batch size
            not divisible by ``microbatch_size``, a missing argument or axis, an int
            ``num_real_microbatches`` above the number of micro-batches; (when built) a
            non-positive ``microbatch_size`` or ``in_axes`` of the wrong length.
        TypeError: a batch leaf that is not a tensor (named by its path).

    Example:
        >>> import torch
        >>> import functrain.microbatching as mb
        >>> x = torch.arange(6.0)
        >>> mb.microbatch(lambda x: (x**2).sum(), argnums=0, microbatch_size=2)(x)
        tensor(55.)
    """
    if microbatch_size is None:
        return fun
    size = _as_int(microbatch_size)
    if size is None or size < 1:
        raise ValueError(f"microbatch_size must be a positive int or None, got {microbatch_size!r}")
    argnums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    argnames = (argnames,) if isinstance(argnames, str) else tuple(argnames)
    n_batch = len(argnums) + len(argnames)
    in_axes = (in_axes,) * n_batch if isinstance(in_axes, int) else tuple(in_axes)
    if len(in_axes) != n_batch:
        raise ValueError(
            f"in_axes={in_axes} must have one axis per entry of argnums + argnames "
            f"({n_batch}: {argnums + argnames})"
        )
    num_real = _check_num_real(num_real_microbatches)

    def microbatched_fun(*args: Any, **kwargs: Any) -> Any:
        plan, batch_size = _plan(size, argnums, argnames, in_axes, args, kwargs)
        n = batch_size // size
        if isinstance(num_real, int) and num_real > n:
            raise ValueError(
                f"num_real_microbatches={num_real} is more than the {n} micro-batches of "
                f"batch_size={batch_size} / microbatch_size={size}"
            )
        acc = _canonicalize(accumulator, n)

        def f(index: int) -> Any:
            new_args, new_kwargs = list(args), dict(kwargs)
            for key, leaves, axes, spec in plan:
                part = _tree.unflatten(spec, [x.select(a, index) for x, a in zip(leaves, axes)])
                if isinstance(key, int):
                    new_args[key] = part
                else:
                    new_kwargs[key] = part
            return fun(*new_args, **new_kwargs)

        count = num_real if isinstance(num_real, int) else n
        value = f(0)
        carry = acc.init(value)
        for i in range(count):
            if i:
                value = f(i)
            new = acc.update(carry, value, i)
            carry = (
                new if not isinstance(num_real, torch.Tensor) else _select(num_real > i, new, carry)
            )
        return acc.finalize(carry)

    return microbatched_fun


def _vmap_call(
    vmap_fn: VmapFn,
    fun: Function,
    in_axes: tuple[Any, ...],
    out_axes: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``vmap_fn(fun, in_axes, out_axes)(*args, **kwargs)`` with the kwargs mapped along 0.

    ``torch.func.vmap`` maps no keyword argument and returns only tensors, so the kwargs
    travel as one extra positional dict (in_axes 0) and the output is flattened (``None``
    subtrees allowed) and rebuilt.
    """
    specs: list[Any] = []

    def flat_fun(*a: Any) -> tuple[torch.Tensor, ...]:
        kw = a[-1] if kwargs else {}
        out = fun(*(a[:-1] if kwargs else a), **kw)
        _, leaves, spec = _tensor_leaves(out, "output", "outputs of a mapped function")
        specs.append(spec)
        return tuple(leaves)

    dims = (*in_axes, 0) if kwargs else in_axes
    flat = vmap_fn(flat_fun, dims, out_axes)(*args, *((kwargs,) if kwargs else ()))
    return _tree.unflatten(specs[-1], flat)


def micro_vmap(
    fun: Function,
    in_axes: int | Sequence[int] = 0,
    out_axes: Any = 0,
    *,
    microbatch_size: int | None = None,
    vmap_fn: VmapFn = torch.func.vmap,
    accumulator: Accumulator | AccumulationType | AccumulatorTree = AccumulationType.CONCAT,
    num_real_microbatches: int | torch.Tensor | None = None,
) -> Function:
    """``torch.func.vmap`` that maps ``microbatch_size`` rows at a time, and may reduce.

    With the default ``CONCAT`` the result is ``vmap(fun, in_axes)(*args)``; ``SUM`` / ``MEAN``
    reduce the mapped axis without ever holding the full per-example output. Keyword arguments
    are mapped along axis 0 (as ``jax.vmap`` does).

    Args:
        fun: the function to map.
        in_axes: the mapped axis of each positional argument (``None``: not mapped); an int
            stands for a single positional argument.
        out_axes: must be 0.
        microbatch_size: rows per micro-batch (``None``: one ``vmap`` over everything).
        vmap_fn: called as ``vmap_fn(fun, in_axes, out_axes)``, e.g. a
            ``functools.partial(torch.func.vmap, chunk_size=...)``.
        accumulator: what to do with the mapped axis of each output: ``CONCAT`` (keep it),
            ``SUM``, ``MEAN``, ``RUNNING_MEAN``, or a pytree of these (a prefix of the output).
        num_real_microbatches: as in :func:`microbatch`.

    Returns:
        The mapped function.

    Raises:
        NotImplementedError: ``out_axes`` other than 0.

    Example:
        >>> import torch
        >>> import functrain.microbatching as mb
        >>> mb.micro_vmap(lambda x: x**2, microbatch_size=4)(torch.arange(8))
        tensor([ 0,  1,  4,  9, 16, 25, 36, 49])
    """
    if out_axes != 0:
        raise NotImplementedError("out_axis != 0 is not currently supported")
    in_axes = (in_axes,) if isinstance(in_axes, int) else tuple(in_axes)

    def vmap_reduce_fn(*args: Any, kwargs: dict[str, Any]) -> Any:
        output = _vmap_call(vmap_fn, fun, in_axes, out_axes, args, kwargs)
        leaves = _tree.leaves(output)
        # Only ``aggregate`` is used, which does not depend on the count.
        count = leaves[0].shape[0] if leaves and leaves[0].dim() else 1
        return _canonicalize(accumulator, count).aggregate(output)

    micro_vmap_fn = microbatch(
        vmap_reduce_fn,
        argnums=tuple(i for i, ax in enumerate(in_axes) if ax is not None),
        argnames="kwargs",
        microbatch_size=microbatch_size,
        accumulator=accumulator,
        in_axes=(*tuple(ax for ax in in_axes if ax is not None), 0),
        num_real_microbatches=num_real_microbatches,
    )

    def wrapped_fn(*args: Any, **kwargs: Any) -> Any:
        return micro_vmap_fn(*args, kwargs=kwargs)

    return wrapped_fn


def micro_grad(
    fun: Function,
    has_aux: bool = False,
    argnums: int | Sequence[int] = 0,
    *,
    batch_argnums: int | Sequence[int] = 1,
    keep_batch_dim: bool = True,
    microbatch_size: int | None = None,
    accumulator: Accumulator | AccumulationType | AccumulatorTree = AccumulationType.SUM,
    transform_fn: Callable[[Any], Any] = lambda x: x,
    metrics_fn: Callable[[Any], Any] = lambda x: None,
    num_real_microbatches: int | torch.Tensor | None = None,
) -> Function:
    """Per-example gradients, transformed and accumulated, with per-example values and metrics.

    For each example ``j`` of the batch arguments, ``g_j = grad(fun)(..., example_j, ...)``
    (``torch.func.grad_and_value`` under ``torch.func.vmap``, ``microbatch_size`` examples at a
    time); the result is ``accumulator`` over ``transform_fn(g_j)`` (``SUM``: ``Σ_j``, equal
    to the gradient of the summed loss when ``transform_fn`` is the identity; ``MEAN``: the
    average), plus ``IndividualOutputs(values, metrics, aux)`` holding per example the loss
    ``fun(...)``, ``metrics_fn(g_j)`` and ``fun``'s aux (concatenated along axis 0).

    Args:
        fun: ``fun(*args) -> loss`` (a 0-d tensor), or ``(loss, aux)`` with ``has_aux``.
        has_aux: whether ``fun`` returns ``(loss, aux)``; aux leaves must be tensors.
        argnums: the argument(s) to differentiate (tensors or pytrees of tensors).
        batch_argnums: the positional argument(s) with a leading batch axis; they must be the
            last positional arguments (as in optax, the mapped ``in_axes`` cover positions
            ``0..max(batch_argnums)``). Keyword arguments are batched too.
        keep_batch_dim: call ``fun`` with a batch axis of size 1 (``True``) or on bare
            examples.
        microbatch_size: examples per micro-batch (``None``: all at once).
        accumulator: how the transformed gradients are combined (default ``SUM``).
        transform_fn: applied to each per-example gradient before accumulation, e.g.
            clipping, or ``lambda g: (g, g**2)`` for moments.
        metrics_fn: applied to each per-example gradient; returned per example.
        num_real_microbatches: as in :func:`microbatch`.

    Returns:
        A function of ``fun``'s arguments returning ``(accumulated, IndividualOutputs)``.

    Example:
        >>> import torch
        >>> import functrain.microbatching as mb
        >>> def loss(params, features, targets):
        ...     return 0.5 * ((features @ params - targets) ** 2).mean()
        >>> (g, g2), aux = mb.micro_grad(
        ...     loss, argnums=0, batch_argnums=(1, 2),
        ...     accumulator=mb.AccumulationType.MEAN,
        ...     transform_fn=lambda g: (g, g**2), metrics_fn=torch.linalg.norm,
        ... )(torch.zeros(1), torch.ones(4, 1), torch.tensor([0.0, 2.0, 4.0, 6.0]))
        >>> g, g2
        (tensor([-3.]), tensor([14.]))
        >>> aux.values, aux.metrics
        (tensor([ 0.,  2.,  8., 18.]), tensor([0., 2., 4., 6.]))
    """
    if isinstance(batch_argnums, int):
        batch_argnums = (batch_argnums,)
    argnums_ = argnums if isinstance(argnums, int) else tuple(argnums)
    aux_specs: list[Any] = []

    def value_and_aux_leaves(*args: Any, **kwargs: Any) -> tuple[Any, tuple[torch.Tensor, ...]]:
        out = fun(*args, **kwargs)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"has_aux=True: fun must return a (value, aux) pair, got {type(out).__name__}"
                )
            value, aux = out
        else:
            value, aux = out, None
        # torch.func returns tensor aux only: flatten (None subtrees allowed), rebuild below.
        _, leaves, spec = _tensor_leaves(aux, "aux", "leaves of fun's aux")
        aux_specs.append(spec)
        return value, tuple(leaves)

    value_and_grad_fn = torch.func.grad_and_value(value_and_aux_leaves, argnums_, has_aux=True)

    def grad_fn(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        grad, (value, aux_leaves) = value_and_grad_fn(*args, **kwargs)
        aux = _tree.unflatten(aux_specs.pop(), aux_leaves)
        result = transform_fn(grad)
        return result, IndividualOutputs(values=value, metrics=metrics_fn(grad), aux=aux)

    in_axes: list[int | None] = [None] * (max(batch_argnums) + 1)
    for i in batch_argnums:
        in_axes[i] = 0
    micro_fun = micro_vmap(
        grad_fn,
        in_axes=tuple(in_axes),
        accumulator=(accumulator, AccumulationType.CONCAT),
        microbatch_size=microbatch_size,
        num_real_microbatches=num_real_microbatches,
    )
    if not keep_batch_dim:
        return micro_fun

    @functools.wraps(micro_fun)
    def with_batch_dim(*args: Any, **kwargs: Any) -> Any:
        # Each example then reaches ``fun`` as a batch of one: (B, ...) -> (B, 1, ...).
        new_args = list(args)
        for i in batch_argnums:
            new_args[i] = _tree.map(lambda x: x.unsqueeze(1), args[i])
        return micro_fun(*new_args, **kwargs)

    return with_batch_dim
