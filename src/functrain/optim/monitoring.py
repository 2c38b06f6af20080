"""Transforms that record measures of the updates in their state: ``snapshot``, ``monitor``.

They return the updates unchanged; placed in a :func:`~functrain.chain`, they see the updates
as transformed by the members before them (e.g. the norm before clipping). The measurements
are tensors in the optimizer state, so reading them costs nothing until you print them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _utils
from functrain.optim.accumulation import ema
from functrain.optim.base import (
    GradientTransformation,
    GradientTransformationExtraArgs,
    _check_transform,
    chain,
    stateless,
    with_extra_args_support,
)

__all__ = ["MonitorState", "SnapshotState", "measure_with_ema", "monitor", "snapshot"]

Measure = Callable[[Any], Any]


class SnapshotState(NamedTuple):
    """State of :func:`snapshot`: ``measurement``, a dict from the measure's name to its value.

    Example:
        >>> import torch, functrain as ft
        >>> ft.snapshot("norm", ft.tree.norm).init({"w": torch.tensor([3.0, 4.0])})
        SnapshotState(measurement={'norm': tensor(5.)})
    """

    measurement: dict[str, Any]


def snapshot(measure_name: str, measure: Measure) -> GradientTransformation:
    """Stores ``measure(updates)`` in the state under ``measure_name``; updates pass unchanged.

    ``init`` stores ``measure(params)``, so the state has its final structure from the start.

    Args:
        measure_name: the key of the measurement in ``state.measurement``.
        measure: maps the updates (as they arrive at this transform) to a tensor or a tree.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.chain(ft.snapshot("before_clip", ft.tree.norm), ft.clip_by_global_norm(1.0))
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> state[0].measurement["before_clip"], ft.tree.norm(updates)
        (tensor(5.), tensor(1.))
    """
    if not isinstance(measure_name, str):
        raise TypeError(f"snapshot: measure_name must be a str, got {type(measure_name).__name__}")
    if not callable(measure):
        raise TypeError(f"snapshot: measure must be callable, got {type(measure).__name__}")

    def init_fn(params: Any) -> SnapshotState:
        # A placeholder measure of the params: as torch.optim, a module's weights are
        # constants here (no graph to them in the state), unless the caller differentiates.
        return SnapshotState({measure_name: measure(_utils.constant_tree(params))})

    def update_fn(
        updates: Any, state: SnapshotState, params: Any = None, **extra: Any
    ) -> tuple[Any, SnapshotState]:
        del state, params, extra
        return updates, SnapshotState({measure_name: measure(updates)})

    return GradientTransformation(init_fn, update_fn)


class MonitorState(NamedTuple):
    """State of :func:`monitor`: the latest ``measurements`` by name and each measure's state.

    ``init`` fills ``measurements`` with each measure applied to the params (as ``snapshot``
    does), where optax starts from ``{}``: the state keeps one structure, so a fresh state is a
    checkpoint restore target and a compiled step traces it. The values are replaced by the
    first ``update``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.monitor({"norm": ft.tree.norm}).init({"w": torch.ones(2)})
        MonitorState(measurements={'norm': tensor(1.4142)}, measure_states=(EmptyState(),))
    """

    measurements: dict[str, Any]
    measure_states: tuple[Any, ...]


def monitor(
    measures: dict[str, GradientTransformation | Measure],
) -> GradientTransformationExtraArgs:
    """Records several measures of the updates, some with their own state; updates pass unchanged.

    Each measure is a callable ``measure(updates)`` (stateless, as :func:`snapshot`) or a
    gradient transformation whose *output* is the measurement and whose state is kept in
    ``measure_states``, e.g. :func:`measure_with_ema`. Every measure sees the same incoming
    updates, ``params`` and keyword arguments.

    Args:
        measures: a dict from measurement names to callables or transformations.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.chain(
        ...     ft.monitor({
        ...         "norm": ft.tree.norm,
        ...         "clipped_ema": ft.measure_with_ema(lambda u: ft.tree.norm(u) > 1.0, decay=0.9),
        ...     }),
        ...     ft.clip_by_global_norm(1.0),
        ... )
        >>> params = {"w": torch.zeros(2)}
        >>> state = tx.init(params)
        >>> for g in (0.5, 4.0):
        ...     _, state = tx.update({"w": torch.tensor([g, 0.0])}, state, params)
        >>> state[0].measurements["norm"], state[0].measurements["clipped_ema"]
        (tensor(4.), tensor(0.5263))
    """
    if not isinstance(measures, dict):
        raise TypeError(f"monitor: measures must be a dict, got {type(measures).__name__}")
    txs: dict[str, GradientTransformation] = {}
    for name, measure in measures.items():
        if callable(measure):
            txs[name] = stateless(lambda u, _p, m=measure: m(u))
        else:
            tx = _check_transform(measure, f"monitor measure {name!r}")
            txs[name] = with_extra_args_support(tx)
    names = tuple(txs)

    def init_fn(params: Any) -> MonitorState:
        params = _utils.constant_tree(params)  # as snapshot's init: no graph to nn.Parameters
        states = tuple(txs[n].init(params) for n in names)
        # optax starts from {}; here each measure is applied to the params (as snapshot does),
        # so the state keeps one structure: a fresh state is a checkpoint restore target, and
        # torch.compile in make_train_step cannot trace an empty dict.
        measurements = {n: txs[n].update(params, s, params)[0] for n, s in zip(names, states)}
        return MonitorState(measurements, states)

    def update_fn(
        updates: Any, state: MonitorState, params: Any = None, **extra: Any
    ) -> tuple[Any, MonitorState]:
        if len(state.measure_states) != len(names):
            raise ValueError(
                f"monitor of {len(names)} measures got {len(state.measure_states)} measure "
                "states; was the state made by this monitor's init?"
            )
        measurements, new_states = {}, []
        for n, s in zip(names, state.measure_states):
            measurements[n], s = txs[n].update(updates, s, params, **extra)
            new_states.append(s)
        return updates, MonitorState(measurements, tuple(new_states))

    return GradientTransformation(init_fn, update_fn)


def _floating(x: Any) -> Any:
    # A boolean or integer measure (e.g. "was the norm clipped") is averaged as a fraction, as
    # jax promotes it; ema's state must be floating from init on, so cast before it sees it.
    def cast(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex()):
            return t.to(torch.get_default_dtype())
        return t

    return tree.map(cast, x)


def measure_with_ema(
    measure: Measure,
    decay: float | torch.Tensor,
    debias: bool = True,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformationExtraArgs:
    """A measure of the updates recorded as an exponential moving average, for :func:`monitor`.

    ``chain(stateless(measure), ema(decay, debias, accumulator_dtype))`` with the average
    initialised from ``measure(params)``'s shape; its output (the update it returns) is the
    average, debiased by ``1 − decayᵗ`` by default. Boolean and integer measurements are
    averaged in the default floating dtype (a fraction of steps).

    Args:
        measure: maps the updates to a tensor or a tree of tensors.
        decay: the averaging coefficient in ``[0, 1]``.
        debias: divide by ``1 − decayᵗ`` (``t`` the number of updates so far).
        accumulator_dtype: optional floating dtype in which the average is stored.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.measure_with_ema(ft.tree.norm, decay=0.5)
        >>> state = tx.init([torch.zeros(2)])
        >>> out, state = tx.update([torch.tensor([3.0, 4.0])], state)
        >>> out, tx.update([torch.tensor([0.0, 2.0])], state)[0]
        (tensor(5.), tensor(3.))
    """
    if not callable(measure):
        raise TypeError(f"measure_with_ema: measure must be callable, got {type(measure).__name__}")
    average = ema(decay, debias, accumulator_dtype)
    ema_init = average.init
    # The average has the measurement's shape, not the parameters': measure them at init.
    average = average._replace(init=lambda params: ema_init(_floating(measure(params))))
    return chain(stateless(lambda u, _p: _floating(measure(u))), average)
