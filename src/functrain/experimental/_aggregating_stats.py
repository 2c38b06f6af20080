"""Private half of :mod:`functrain.experimental.aggregating`: per-element means, variances and
their EMAs (documented there)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.experimental import _aggregating_ops as _ops
from functrain.experimental._aggregating_core import (
    Aggregator,
    _check_steps,
    _flags,
    process,
)
from functrain.optim import _utils
from functrain.optim.base import (
    GradientTransformation,
    GradientTransformationExtraArgs,
    chain,
    identity,
    init_empty_state,
)


def get_batch_size_from_per_elt_updates(per_elt_updates: Any, per_elt_axis: int | list[int]) -> int:
    """The number of elements of per-element updates: the size of their batch axes.

    Read from shapes only (no host sync): ``shape[per_elt_axis]`` for an int axis, the
    product of the sizes for a sequence of axes.

    Args:
        per_elt_updates: a pytree of tensors with batch axes ``per_elt_axis``.
        per_elt_axis: the batch axis or axes.

    Returns:
        The batch size, a Python int.

    Raises:
        ValueError: if the leaves' batch sizes differ (each is listed with its path), an axis
            is out of range or repeated, or the tree has no tensor leaves.
        TypeError: if ``per_elt_axis`` is not an int or a sequence of ints.

    Example:
        >>> import torch
        >>> from functrain.experimental import aggregating
        >>> grads = {"w": torch.zeros(4, 3, 2), "b": torch.zeros(4, 3)}
        >>> aggregating.get_batch_size_from_per_elt_updates(grads, 0)
        4
        >>> aggregating.get_batch_size_from_per_elt_updates(grads, [0, 1])
        12
    """
    return _ops.batch_size(per_elt_updates, _ops.check_axis(per_elt_axis))


class PerElementMeanAndSumSqDiffGradsState(NamedTuple):
    """State of :func:`get_per_element_mean_and_sum_sq_diff_grads` when it accumulates.

    Attributes:
        micro_step: int32 count of micro-batches merged since the last output.
        ready: bool, true right after the step that output the statistics.
        mean_grads: the mean of the elements seen so far.
        sum_sq_diff_grads: their sum of squared differences to that mean.

    Example:
        >>> import torch
        >>> from functrain.experimental import aggregating
        >>> agg = aggregating.get_per_element_mean_and_sum_sq_diff_grads(0, 2)
        >>> agg.init([torch.zeros(1)]).ready
        tensor(False)
    """

    micro_step: torch.Tensor
    ready: torch.Tensor
    mean_grads: Any
    sum_sq_diff_grads: Any


def get_per_element_mean_and_sum_sq_diff_grads(
    per_elt_axis: int | Sequence[int] = 0,
    accumulation_steps: int = 1,
) -> Aggregator:
    """Aggregates per-element updates into their mean, with their sum of squared differences.

    ``update`` returns ``((mean, aux), state)`` with ``aux = {"sum_sq_diff_grads": Σ(x −
    mean)², "sample_size": n}``: the unbiased variance is ``sum_sq_diff_grads / (n − 1)``. The
    deviations are taken from the batch's mean (two passes, no cancellation). Use it in
    :func:`process` with ``aggregator_has_aux=True``, as :func:`add_mean_variance_to_opt` does.

    With ``accumulation_steps > 1`` the statistics of ``accumulation_steps`` micro-batches are
    merged with Chan et al.'s pairwise formula, as optax: after ``k`` batches of ``b``
    elements, a new batch with mean ``m_b`` and sum ``S_b`` gives ``δ = m_b − m``,
    ``m ← m + δ/(k+1)`` and ``S ← S + S_b + δ²·k·b/(k+1)``. The last micro-batch outputs them
    (``sample_size = accumulation_steps·b``, a tensor) and sets ``ready``; the others output
    zeros. The formula assumes micro-batches of equal size (as optax does): with unequal
    ones the mean is the average of the micro-batch means. Difference from optax: the size
    factor ``k·b/(k+1)`` is computed in the statistics' dtype (float64 for float64 updates),
    where optax computes it from int32 counts in float32 (8/3 is then rounded to float32).

    Args:
        per_elt_axis: the batch axis or axes of every leaf.
        accumulation_steps: the number of micro-batches per output.

    Returns:
        An :class:`Aggregator`: stateless for one step, else with
        :class:`PerElementMeanAndSumSqDiffGradsState`.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if ``accumulation_steps < 1``; in ``update``, if the leaves' batch sizes
            differ, an axis is out of range, or the shapes do not match the state.

    Example:
        >>> import torch
        >>> from functrain.experimental import aggregating
        >>> agg = aggregating.get_per_element_mean_and_sum_sq_diff_grads()
        >>> (mean, aux), _ = agg.update([torch.tensor([1.0, 2.0, 6.0])], agg.init(None))
        >>> mean, aux
        ([tensor(3.)], {'sum_sq_diff_grads': [tensor(14.)], 'sample_size': 3})
    """
    axis = _ops.check_axis(per_elt_axis)
    steps = _check_steps(accumulation_steps)

    def stats_fn(per_elt_updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        size = _ops.batch_size(per_elt_updates, axis)
        mean, ssd = _ops.mean_and_sum_sq_diff(per_elt_updates, axis)
        return (mean, {"sum_sq_diff_grads": ssd, "sample_size": size}), state

    if steps == 1:
        return Aggregator(init_empty_state, stats_fn)

    def init_fn(params: Any) -> PerElementMeanAndSumSqDiffGradsState:
        micro_step, ready = _flags(params)
        zeros = tree.zeros_like(params)
        return PerElementMeanAndSumSqDiffGradsState(
            micro_step, ready, zeros, tree.zeros_like(params)
        )

    def update_fn(
        per_elt_updates: Any, state: PerElementMeanAndSumSqDiffGradsState, params: Any = None
    ) -> tuple[Any, PerElementMeanAndSumSqDiffGradsState]:
        del params
        size = _ops.batch_size(per_elt_updates, axis)
        batch_mean, batch_ssd = _ops.mean_and_sum_sq_diff(per_elt_updates, axis)
        tree.check_shapes(
            state.mean_grads, batch_mean, ("state.mean_grads", "per_elt_updates without batch axes")
        )
        new_micro_step = state.micro_step + 1
        m_leaves, spec = tree.flatten(state.mean_grads)
        others = [
            tree.flatten_up_to(spec, t, ("state.mean_grads", name), state.mean_grads)
            for t, name in (
                (state.sum_sq_diff_grads, "state.sum_sq_diff_grads"),
                (batch_mean, "batch mean"),
                (batch_ssd, "batch sum_sq_diff"),
            )
        ]
        pairs = [
            _ops.merge(m, s, bm, bs, state.micro_step, new_micro_step, size)
            for m, s, bm, bs in zip(m_leaves, *others)
        ]
        new_mean = tree.unflatten(spec, [p[0] for p in pairs])
        new_ssd = tree.unflatten(spec, [p[1] for p in pairs])
        outputs = (
            new_mean,
            {"sum_sq_diff_grads": new_ssd, "sample_size": new_micro_step * size},
        )
        ready_state = PerElementMeanAndSumSqDiffGradsState(
            torch.zeros_like(state.micro_step),
            torch.ones_like(state.ready),
            tree.zeros_like(new_mean),
            tree.zeros_like(new_ssd),
        )
        not_ready_state = PerElementMeanAndSumSqDiffGradsState(
            new_micro_step, torch.zeros_like(state.ready), new_mean, new_ssd
        )
        return tree.where(
            new_micro_step == steps,
            (outputs, ready_state),
            (tree.zeros_like(outputs), not_ready_state),
        )

    return Aggregator(init_fn, update_fn)


class PerElementMeanAndVarianceEMAState(NamedTuple):
    """State of :func:`track_per_element_mean_and_variance_with_ema`.

    Attributes:
        count: int32 number of updates so far (saturates at the int32 maximum).
        ema_decay: the decay, a 0-d tensor (float64 when a parameter is float64, else
            float32, or the dtype of a tensor decay), read by
            :func:`get_unbiased_mean_and_variance_ema`.
        mean_grads_ema: the EMA of the per-step mean gradients, without bias correction.
        variance_grads_ema: the EMA of the per-step unbiased variances, without bias
            correction.

    Example:
        >>> import torch
        >>> from functrain.experimental import aggregating
        >>> tx = aggregating.track_per_element_mean_and_variance_with_ema(0.5)
        >>> tx.init([torch.zeros(1)]).ema_decay
        tensor(0.5000)
    """

    count: torch.Tensor
    ema_decay: torch.Tensor
    mean_grads_ema: Any
    variance_grads_ema: Any


def _check_decay(ema_decay: Any) -> None:
    if isinstance(ema_decay, torch.Tensor):
        if ema_decay.dim() != 0 or not ema_decay.is_floating_point():
            raise ValueError(
                f"ema_decay must be a number or a 0-d floating tensor, got a {ema_decay.dtype} "
                f"tensor of shape {tuple(ema_decay.shape)}"
            )
        return
    if not isinstance(ema_decay, numbers.Real) or isinstance(ema_decay, bool):
        raise TypeError(f"ema_decay must be a real number or a 0-d tensor, got {ema_decay!r}")
    if not 0.0 <= float(ema_decay) < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")


def _ema(new: torch.Tensor, old: torch.Tensor, decay: Any) -> torch.Tensor:
    """``(1 − decay)·new + decay·old`` in ``old``'s dtype (optax's update, term for term)."""
    return ((1.0 - decay) * new + decay * old).to(old.dtype)


def track_per_element_mean_and_variance_with_ema(
    ema_decay: Any = 0.9,
) -> GradientTransformationExtraArgs:
    """Tracks EMAs of the per-element mean and variance of the gradients over steps.

    Meant as the first postprocessor of :func:`process` after
    :func:`get_per_element_mean_and_sum_sq_diff_grads` (``aggregator_has_aux=True``), which
    passes ``sum_sq_diff_grads`` and ``sample_size`` as keyword arguments. Each step, with
    ``β = ema_decay``, the (mean) updates ``g`` and ``v = sum_sq_diff_grads / (sample_size −
    1)``: ``mean_ema ← (1 − β)·g + β·mean_ema``, ``variance_ema ← (1 − β)·v + β·variance_ema``,
    ``count ← count + 1``. The updates pass through unchanged. Read the bias-corrected values
    with :func:`get_unbiased_mean_and_variance_ema`.

    Args:
        ema_decay: the decay ``β`` in ``[0, 1)``: a number or a 0-d tensor.

    Returns:
        A :class:`~functrain.GradientTransformation` with
        :class:`PerElementMeanAndVarianceEMAState`; its ``update`` takes the keyword-only
        arguments ``sum_sq_diff_grads`` (a tree like the updates) and ``sample_size`` (an int
        of at least 2, or an integer tensor).

    Raises:
        TypeError, ValueError: if ``ema_decay`` is not a number in ``[0, 1)`` or a 0-d tensor;
            in ``update``, if an int ``sample_size`` is below 2 or the shapes do not match the
            state.

    Example:
        >>> import torch
        >>> from functrain.experimental import aggregating
        >>> tx = aggregating.track_per_element_mean_and_variance_with_ema(ema_decay=0.5)
        >>> state = tx.init([torch.zeros(1)])
        >>> _, state = tx.update(
        ...     [torch.tensor([2.0])], state, sum_sq_diff_grads=[torch.tensor([8.0])], sample_size=5
        ... )
        >>> state.mean_grads_ema, state.variance_grads_ema
        ([tensor([1.])], [tensor([1.])])
    """
    _check_decay(ema_decay)

    def init_fn(params: Any) -> PerElementMeanAndVarianceEMAState:
        leaves = [x for x in tree.leaves(params) if isinstance(x, torch.Tensor)]
        device = _utils.default_device(params)
        if isinstance(ema_decay, torch.Tensor):
            dtype = ema_decay.dtype
        else:
            dtype = torch.promote_types(_utils.float_dtype(leaves), torch.float32)
        return PerElementMeanAndVarianceEMAState(
            count=_utils.zero_count(params),
            ema_decay=torch.as_tensor(ema_decay, dtype=dtype, device=device),
            mean_grads_ema=tree.zeros_like(params),
            variance_grads_ema=tree.zeros_like(params),
        )

    def update_fn(
        updates: Any,
        state: PerElementMeanAndVarianceEMAState,
        params: Any = None,
        *,
        sum_sq_diff_grads: Any,
        sample_size: int | torch.Tensor,
        **extra_args: Any,
    ) -> tuple[Any, PerElementMeanAndVarianceEMAState]:
        del params, extra_args
        if isinstance(sample_size, numbers.Integral) and sample_size < 2:
            raise ValueError(
                f"sample_size must be at least 2 to estimate a variance, got {sample_size}"
            )
        tree.check_shapes(state.mean_grads_ema, updates, ("state.mean_grads_ema", "updates"))
        tree.check_shapes(
            state.variance_grads_ema,
            sum_sq_diff_grads,
            ("state.variance_grads_ema", "sum_sq_diff_grads"),
        )
        decay = ema_decay
        mean_ema = tree.map(lambda m, g: _ema(g, m, decay), state.mean_grads_ema, updates)

        def variance(s: torch.Tensor) -> torch.Tensor:
            # Divide rather than multiply by a reciprocal rounded in another dtype.
            n = sample_size - 1
            return s / (n.to(s.real.dtype) if isinstance(n, torch.Tensor) else n)

        var_ema = tree.map(
            lambda v, s: _ema(variance(s), v, decay), state.variance_grads_ema, sum_sq_diff_grads
        )
        new_state = state._replace(
            count=_utils.safe_increment(state.count),
            mean_grads_ema=mean_ema,
            variance_grads_ema=var_ema,
        )
        return updates, new_state

    return GradientTransformationExtraArgs(init_fn, update_fn)


def get_unbiased_mean_and_variance_ema(state: Any) -> tuple[Any, Any]:
    """The bias-corrected EMAs of :func:`track_per_element_mean_and_variance_with_ema`.

    Finds the (single) :class:`PerElementMeanAndVarianceEMAState` anywhere in ``state`` and
    returns ``mean_grads_ema / (1 − β^count)`` and ``variance_grads_ema / (1 − β^count)``
    (NaN before the first update, as in optax). No host sync.

    Args:
        state: an optimizer state holding one ``PerElementMeanAndVarianceEMAState``, e.g.
            that of :func:`add_mean_variance_to_opt`.

    Returns:
        ``(unbiased_mean_ema, unbiased_variance_ema)``, trees like the parameters.

    Raises:
        ValueError: if ``state`` holds no ``PerElementMeanAndVarianceEMAState``.
        KeyError: if it holds several.

    Example:
        >>> import torch
        >>> from functrain.experimental import aggregating
        >>> tx = aggregating.track_per_element_mean_and_variance_with_ema(ema_decay=0.5)
        >>> state = tx.init([torch.zeros(1)])
        >>> _, state = tx.update(
        ...     [torch.tensor([2.0])], state, sum_sq_diff_grads=[torch.tensor([8.0])], sample_size=5
        ... )
        >>> aggregating.get_unbiased_mean_and_variance_ema(state)
        ([tensor([2.])], [tensor([2.])])
    """
    found = tree.get(state, "PerElementMeanAndVarianceEMAState", None)
    if found is None:
        raise ValueError(
            "State must have PerElementMeanAndVarianceEMAState to compute unbiased mean and "
            "variance EMA."
        )
    correction = 1 - found.ema_decay**found.count

    def unbias(x: torch.Tensor) -> torch.Tensor:
        return (x / correction).to(x.dtype)

    return tree.map(unbias, found.mean_grads_ema), tree.map(unbias, found.variance_grads_ema)


def add_mean_variance_to_opt(
    opt: GradientTransformation,
    ema_decay: Any = 0.9,
    per_elt_axis: int | list[int] = 0,
    accumulation_steps: int = 1,
) -> GradientTransformation:
    """``opt`` on the mean of per-element gradients, tracking their mean and variance EMAs.

    :func:`process` of :func:`get_per_element_mean_and_sum_sq_diff_grads` and
    ``chain(track_per_element_mean_and_variance_with_ema(ema_decay), opt)``: ``update`` takes
    per-element gradients, ``opt`` steps on their mean (once per ``accumulation_steps``
    calls), and :func:`get_unbiased_mean_and_variance_ema` reads the statistics from the state.
    Difference from optax: with ``accumulation_steps > 1`` the variance's ``1/(n − 1)`` is
    computed in the statistics' dtype, where optax computes it in float32 (its ``n`` is an
    int32 step count times the batch size).

    Args:
        opt: the optimizer to run on the mean gradient.
        ema_decay: the EMA decay of the statistics, in ``[0, 1)``.
        per_elt_axis: the batch axis or axes of the per-element gradients.
        accumulation_steps: the number of (equal-size) micro-batches per step.

    Returns:
        An :class:`Aggregator` whose state is ``(EmptyState(), aggregator_state,
        (PerElementMeanAndVarianceEMAState, opt_state))``.

    Raises:
        TypeError, ValueError: for a bad argument, as the functions it combines.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain.experimental import aggregating
        >>> opt = aggregating.add_mean_variance_to_opt(ft.sgd(0.1), ema_decay=0.9)
        >>> params = {"w": torch.zeros(2)}
        >>> state = opt.init(params)
        >>> per_sample = {"w": torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 3.0]])}
        >>> updates, state = opt.update(per_sample, state, params)
        >>> updates["w"]
        tensor([-0.3000, -0.1000])
        >>> mean, var = aggregating.get_unbiased_mean_and_variance_ema(state)
        >>> mean["w"], var["w"]
        (tensor([3., 1.]), tensor([4., 3.]))
    """
    return process(
        preprocessor=identity(),
        aggregator=get_per_element_mean_and_sum_sq_diff_grads(per_elt_axis, accumulation_steps),
        postprocessor=chain(track_per_element_mean_and_variance_with_ema(ema_decay), opt),
        aggregator_has_aux=True,
    )
