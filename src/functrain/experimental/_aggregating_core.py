"""Private core of :mod:`functrain.experimental.aggregating`: ``Aggregator``, ``process`` and
the averaging / accumulating aggregators (documented there)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch

from functrain import tree
from functrain.experimental import _aggregating_ops as _ops
from functrain.optim import _utils
from functrain.optim.base import (
    EmptyState,
    GradientTransformation,
    GradientTransformationExtraArgs,
    TransformInitFn,
    _accepts_extra,
    _call_update,
    _check_transform,
    chain,
    identity,
    init_empty_state,
)
from functrain.optim.base import (
    OptState as _OptState,
)
from functrain.optim.base import (
    Params as _Params,
)

PerElementUpdates = Any
AggregatedUpdates = Any
MaybeAxis = int | Sequence[int] | None


class AggregatorUpdateFn(Protocol):
    """The type of ``Aggregator.update``: per-element updates in, one aggregated update out.

    ``update(per_elt_updates, state, params=None, **extra_args) -> (updates, new_state)``,
    where each leaf of ``per_elt_updates`` has leading batch axes that ``updates`` lacks.

    Example:
        >>> import torch
        >>> from functrain.experimental import aggregating
        >>> update: aggregating.AggregatorUpdateFn = (
        ...     aggregating.average_per_element_updates().update
        ... )
        >>> update([torch.tensor([[1.0], [3.0]])], None)[0]
        [tensor([2.])]
    """

    def __call__(
        self,
        per_elt_updates: PerElementUpdates,
        state: _OptState,
        params: _Params | None = None,
        **extra_args: Any,
    ) -> tuple[AggregatedUpdates, _OptState]: ...


class Aggregator(GradientTransformationExtraArgs):
    """A transform whose ``update`` maps per-element updates to one update direction.

    The fields are those of :class:`~functrain.GradientTransformation` (``init``, ``update``);
    the class says that ``update`` takes updates with leading batch axes (per-example
    gradients, e.g. from :func:`functrain.per_sample_grads`) and returns updates of the
    parameters' shape, so that the caller feeds it per-element gradients.

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(per_elt_updates, state, params=None, **extra_args)`` returning
            ``(updates, new_state)``.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain.experimental import aggregating
        >>> agg = aggregating.Aggregator(
        ...     init=ft.init_empty_state,
        ...     update=lambda gs, s, _=None: (ft.tree.map(lambda g: g.sum(0), gs), s),
        ... )
        >>> agg.update({"w": torch.ones(3, 2)}, agg.init({"w": torch.zeros(2)}))[0]
        {'w': tensor([3., 3.])}
    """

    init: TransformInitFn
    update: AggregatorUpdateFn


def process(
    preprocessor: GradientTransformation,
    aggregator: GradientTransformation | Aggregator,
    postprocessor: GradientTransformation,
    aggregator_has_aux: bool = False,
) -> GradientTransformation | Aggregator:
    """Per-element preprocessing, aggregation, then an ordinary transform of the aggregate.

    ``update(per_elt_grads, state, params=None, **extra_args)`` runs ``preprocessor`` on the
    per-element gradients, ``aggregator`` on its output, then ``postprocessor`` on the
    aggregate. With ``aggregator_has_aux`` the aggregator returns ``(updates, aux)`` and the
    dict ``aux`` is passed to ``postprocessor`` as keyword arguments (how
    :func:`get_per_element_mean_and_sum_sq_diff_grads` hands ``sum_sq_diff_grads`` and
    ``sample_size`` to :func:`track_per_element_mean_and_variance_with_ema`). Keyword
    arguments reach the members whose ``update`` accepts ``**kwargs``.

    When the aggregator's state has a ``ready`` entry (an accumulator), the postprocessor's
    updates and state are kept only on the ready steps; on the others the updates are zeros
    and its state is unchanged. The postprocessor still runs on those steps and
    ``torch.where`` discards its results (optax skips it with ``lax.cond``): the same numbers
    without reading ``ready`` on the host.

    Args:
        preprocessor: maps per-element gradients to per-element updates.
        aggregator: aggregates per-element updates into one update.
        postprocessor: maps the aggregated update to the final updates.
        aggregator_has_aux: whether the aggregator returns ``(updates, aux_dict)``.

    Returns:
        An :class:`Aggregator` if ``aggregator`` is one, else a
        :class:`~functrain.GradientTransformation`; its state is the tuple
        ``(preprocess_state, aggregate_state, postprocess_state)``.

    Raises:
        TypeError: if a transform has no ``init``/``update``.

    Example:
        Clip each sample's gradient to norm 1, average, then Adam.

        >>> import torch, functrain as ft
        >>> from functrain.experimental import aggregating
        >>> clip_each = lambda gs, _: ft.tree.map(
        ...     lambda g: g * torch.clamp(1 / g.flatten(1).norm(dim=1), max=1.0)[:, None], gs
        ... )
        >>> opt = aggregating.process(
        ...     ft.stateless(clip_each),
        ...     aggregating.average_per_element_updates(),
        ...     ft.adam(learning_rate=0.1),
        ... )
        >>> params = {"w": torch.zeros(2)}
        >>> state = opt.init(params)
        >>> per_sample = {"w": torch.tensor([[3.0, 4.0], [0.1, 0.0]])}
        >>> updates, state = opt.update(per_sample, state, params)
        >>> updates["w"]
        tensor([-0.1000, -0.1000])
    """
    pre = _check_transform(preprocessor, "process preprocessor")
    agg = _check_transform(aggregator, "process aggregator")
    post = _check_transform(postprocessor, "process postprocessor")
    extras = tuple(_accepts_extra(t.update) for t in (pre, agg, post))

    def init_fn(params: _Params) -> tuple[_OptState, _OptState, _OptState]:
        return pre.init(params), agg.init(params), post.init(params)

    def update_fn(
        indiv_grads: PerElementUpdates,
        states: tuple[_OptState, _OptState, _OptState],
        params: _Params | None = None,
        **extra_args: Any,
    ) -> tuple[Any, tuple[_OptState, _OptState, _OptState]]:
        if not isinstance(states, tuple) or len(states) != 3:
            raise ValueError(
                "process: state must be the tuple (preprocess_state, aggregate_state, "
                f"postprocess_state) made by its init, got {type(states).__name__}"
            )
        pre_state, agg_state, post_state = states
        indiv_updates, new_pre = _call_update(
            pre, extras[0], indiv_grads, pre_state, params, extra_args
        )
        aggregated, new_agg = _call_update(
            agg, extras[1], indiv_updates, agg_state, params, extra_args
        )
        if aggregator_has_aux:
            avg_updates, aux = aggregated
            extra_args = extra_args | aux
        else:
            avg_updates = aggregated
        ready = tree.get(new_agg, "ready", True)
        if not isinstance(ready, torch.Tensor) and not ready:  # a static "not ready"
            return tree.zeros_like(avg_updates), (new_pre, new_agg, post_state)
        updates, new_post = _call_update(
            post, extras[2], avg_updates, post_state, params, extra_args
        )
        if isinstance(ready, torch.Tensor):
            # optax's lax.cond without a host read: both branches computed, one kept.
            updates = _ops.select_or_zeros(ready, updates)
            new_post = _ops.select(ready, new_post, post_state)
        return updates, (new_pre, new_agg, new_post)

    if isinstance(aggregator, Aggregator):
        return Aggregator(init_fn, update_fn)
    return GradientTransformationExtraArgs(init_fn, update_fn)


def average_per_element_updates(per_elt_axis: int | Sequence[int] = 0) -> Aggregator:
    """Averages the per-element updates over their batch axes: ``mean(u, axis=per_elt_axis)``.

    Args:
        per_elt_axis: the batch axis, or axes, of every leaf (negative counts from the end).

    Returns:
        A stateless :class:`Aggregator` (state :class:`~functrain.EmptyState`).

    Raises:
        TypeError: if ``per_elt_axis`` is not an int or a sequence of ints.
        ValueError: (in ``update``) if an axis is out of range for a leaf, naming its path.

    Example:
        >>> import torch
        >>> from functrain.experimental import aggregating
        >>> agg = aggregating.average_per_element_updates(per_elt_axis=(0, 1))
        >>> agg.update({"w": torch.arange(8.0).reshape(2, 2, 2)}, agg.init(None))[0]
        {'w': tensor([3., 4.])}
    """
    axis = _ops.check_axis(per_elt_axis)

    def update_fn(
        per_elt_updates: PerElementUpdates, state: EmptyState, params: _Params | None = None
    ) -> tuple[Any, EmptyState]:
        del params
        return _ops.mean(per_elt_updates, axis), state

    return Aggregator(init_empty_state, update_fn)


class AccumulateAvgUpdatesState(NamedTuple):
    """State of :func:`accumulate_avg_updates`.

    Attributes:
        micro_step: int32 count of micro-batches accumulated since the last output.
        ready: bool, true right after the step that output the average.
        avg_grad: the running average of the micro-batches' updates.

    Example:
        >>> import torch
        >>> from functrain.experimental import aggregating
        >>> aggregating.accumulate_avg_updates(2).init([torch.zeros(1)]).micro_step
        tensor(0, dtype=torch.int32)
    """

    micro_step: torch.Tensor
    ready: torch.Tensor
    avg_grad: Any


def _check_steps(accumulation_steps: Any) -> int:
    if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool):
        raise TypeError(f"accumulation_steps must be an int, got {accumulation_steps!r}")
    if accumulation_steps < 1:
        raise ValueError("accumulation_steps must be larger than or equal to 1.")
    return accumulation_steps


def _flags(params: _Params) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero int32 micro-step and a false ``ready`` on the params' device."""
    device = _utils.default_device(params)
    return (
        torch.zeros((), dtype=torch.int32, device=device),
        torch.zeros((), dtype=torch.bool, device=device),
    )


def accumulate_avg_updates(accumulation_steps: int) -> GradientTransformation:
    """Averages the updates of ``accumulation_steps`` successive calls (micro-batches).

    Call ``k`` (from 1) keeps ``avg ← avg + (u − avg)/k`` and returns zeros; call
    ``accumulation_steps`` returns the average of the calls' updates, sets ``ready`` and
    starts over. Every micro-batch weighs the same. Used as the aggregator of :func:`process`,
    the postprocessor then steps once per ``accumulation_steps`` calls.

    Args:
        accumulation_steps: the number of micro-batches per output; 1 returns
            :func:`~functrain.identity` (nothing to accumulate).

    Returns:
        A :class:`~functrain.GradientTransformation` with :class:`AccumulateAvgUpdatesState`.

    Raises:
        TypeError: if ``accumulation_steps`` is not an int.
        ValueError: if ``accumulation_steps < 1``.

    Example:
        Two micro-batches per Adam step: the step equals Adam's on the mean gradient.

        >>> import torch, functrain as ft
        >>> from functrain.experimental import aggregating
        >>> opt = aggregating.process(
        ...     preprocessor=ft.identity(),
        ...     aggregator=aggregating.accumulate_avg_updates(accumulation_steps=2),
        ...     postprocessor=ft.adam(learning_rate=0.1),
        ... )
        >>> params = {"w": torch.zeros(2)}
        >>> state = opt.init(params)
        >>> u1, state = opt.update({"w": torch.tensor([1.0, -4.0])}, state, params)
        >>> u2, state = opt.update({"w": torch.tensor([3.0, 2.0])}, state, params)
        >>> u1["w"], u2["w"]
        (tensor([0., 0.]), tensor([-0.1000,  0.1000]))
    """
    steps = _check_steps(accumulation_steps)
    if steps == 1:
        return identity()

    def init_fn(params: _Params) -> AccumulateAvgUpdatesState:
        micro_step, ready = _flags(params)
        return AccumulateAvgUpdatesState(micro_step, ready, tree.zeros_like(params))

    def update_fn(
        updates: Any, state: AccumulateAvgUpdatesState, params: _Params | None = None
    ) -> tuple[Any, AccumulateAvgUpdatesState]:
        del params
        tree.check_shapes(state.avg_grad, updates, ("state.avg_grad", "updates"))
        new_micro_step = state.micro_step + 1
        new_avg = tree.map(lambda a, u: a + (u - a) / new_micro_step, state.avg_grad, updates)
        zeros = tree.zeros_like(new_avg)
        ready_state = AccumulateAvgUpdatesState(
            torch.zeros_like(state.micro_step), torch.ones_like(state.ready), zeros
        )
        not_ready_state = AccumulateAvgUpdatesState(
            new_micro_step, torch.zeros_like(state.ready), new_avg
        )
        return tree.where(new_micro_step == steps, (new_avg, ready_state), (zeros, not_ready_state))

    return GradientTransformation(init_fn, update_fn)


def average_incrementally_updates(
    per_elt_axis: MaybeAxis, accumulation_steps: int
) -> Aggregator | GradientTransformation:
    """Averages per-element updates over their batch axes, then over micro-batches.

    :func:`average_per_element_updates` chained with :func:`accumulate_avg_updates`; with
    ``per_elt_axis=None`` the updates are already aggregated and only accumulated.

    Args:
        per_elt_axis: the batch axis or axes, or ``None`` for no per-element averaging.
        accumulation_steps: the number of micro-batches per output.

    Returns:
        An :class:`Aggregator`, or with ``per_elt_axis=None`` the accumulator itself.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if ``accumulation_steps < 1``.

    Example:
        >>> import torch
        >>> from functrain.experimental import aggregating
        >>> agg = aggregating.average_incrementally_updates(0, accumulation_steps=2)
        >>> state = agg.init({"w": torch.zeros(1)})
        >>> _, state = agg.update({"w": torch.tensor([[1.0], [3.0]])}, state)
        >>> agg.update({"w": torch.tensor([[5.0], [7.0]])}, state)[0]
        {'w': tensor([4.])}
    """
    if per_elt_axis is None:
        return accumulate_avg_updates(accumulation_steps)
    agg = chain(
        average_per_element_updates(per_elt_axis), accumulate_avg_updates(accumulation_steps)
    )
    return Aggregator(agg.init, agg.update)
