"""Fusion specs of :mod:`functrain.optim.fused`: the records factories attach to their transforms.

A factory registers a spec with :func:`register` (``ScaleByAdam(b1, b2, ...)`` for
``scale_by_adam``, :class:`Chain` for ``chain``, ...); the planner (``functrain.optim._fused_plan``)
reads them with :func:`spec_of`, inspection (the DP step's ``tx`` check) with :func:`describe`.
Everything here is re-exported by :mod:`functrain.optim.fused`.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import torch

_SPECS: weakref.WeakKeyDictionary[Callable[..., Any], Spec] = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
    """Base class of fusion specs (plain records of a factory's arguments)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Identity(Spec):
    """``identity()``: state ``EmptyState``."""


@dataclasses.dataclass(frozen=True, eq=False)
class SetToZero(Spec):
    """``set_to_zero()``: zero updates (frozen parameters); state ``EmptyState``."""


@dataclasses.dataclass(frozen=True, eq=False)
class Chain(Spec):
    """``chain(*members)``: state a tuple of the members' states."""

    members: tuple[Any, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class NamedChain(Spec):
    """``named_chain(*members)``: state a dict keyed by the members' names."""

    members: tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Masked(Spec):
    """``masked(inner, mask)``: state ``MaskedState(inner_state)`` over the unmasked leaves."""

    inner: Any
    mask: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Injected(Spec):
    """``inject_hyperparams(f)(...)``: ``prepare(updates, state, params) -> (hparams, inner)``.

    ``prepare`` must be the pure update's own code for the current hyperparameters and inner
    transform; the state is ``InjectHyperparamsState(count, hyperparams, inner_state)``.
    """

    prepare: Callable[[Any, Any, Any], tuple[dict[str, torch.Tensor], Any]]
    # What was injected, for inspection (the DP step's ``tx`` check): the factory, its static
    # arguments, its numeric hyperparameters' initial values and its schedules by name.
    factory: Callable[..., Any] | None = None
    static: dict[str, Any] = dataclasses.field(default_factory=dict)
    numeric: dict[str, Any] = dataclasses.field(default_factory=dict)
    schedules: dict[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class ClipByGlobalNorm(Spec):
    """``clip_by_global_norm(max_norm)``: state ``EmptyState``."""

    max_norm: Any


@dataclasses.dataclass(frozen=True, eq=False)
class ScaleByAdam(Spec):
    """``scale_by_adam(...)``: state ``ScaleByAdamState(count, mu, nu)``."""

    b1: Any
    b2: Any
    eps: Any
    eps_root: Any
    mu_dtype: torch.dtype | None
    nesterov: bool


@dataclasses.dataclass(frozen=True, eq=False)
class Trace(Spec):
    """``trace(decay, nesterov, accumulator_dtype)``: state ``TraceState(trace)``."""

    decay: Any
    nesterov: bool
    accumulator_dtype: torch.dtype | None


@dataclasses.dataclass(frozen=True, eq=False)
class AddDecayedWeights(Spec):
    """Unmasked ``add_decayed_weights``: ``EmptyState``, or ``WeightDecayScheduleState(count)``
    when ``weight_decay`` is a schedule."""

    weight_decay: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Scale(Spec):
    """Multiplication by ``sign * value`` (``value`` a number or a tensor read at each update):
    ``scale`` and ``scale_by_learning_rate``; state ``EmptyState``."""

    value: Any
    sign: int = 1


@dataclasses.dataclass(frozen=True, eq=False)
class ScaleBySchedule(Spec):
    """Multiplication by ``fn(count)``: state ``ScaleByScheduleState(count)``."""

    fn: Callable[[torch.Tensor], Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Opaque(Spec):
    """Base of specs that describe a wrapper for inspection only (the DP step's ``tx`` check).

    The planner never fuses these: :func:`spec_of` hides them, so an optimizer holding one is
    "not recognised" exactly as when the wrapper registered nothing (the engines have no
    primitive for it, and ``_collect`` would otherwise take an unknown spec for a primitive).
    Read them with :func:`describe`.
    """


@dataclasses.dataclass(frozen=True, eq=False)
class ApplyIfFinite(Opaque):
    """``apply_if_finite(inner, max_consecutive_errors)``."""

    inner: Any
    max_consecutive_errors: int


@dataclasses.dataclass(frozen=True, eq=False)
class Partition(Spec):
    """``partition(transforms, param_labels)`` (``multi_transform``): ``{label: transform}``;
    state ``PartitionState({label: MaskedState(inner_state)})``, each transform on its label's
    leaves (torch.optim's parameter groups)."""

    transforms: dict[Any, Any]
    labels: Any


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroNans(Opaque):
    """``zero_nans()``: the identity on finite updates."""


def register(tx: Any, spec: Spec) -> Any:
    """Attaches ``spec`` to the transform ``tx`` and returns ``tx`` (a one-liner in factories).

    Example:
        >>> import functrain as ft
        >>> from functrain.optim import fused
        >>> tx = fused.register(ft.identity(), fused.Identity())
        >>> type(fused.spec_of(tx)).__name__
        'Identity'
    """
    if not torch.compiler.is_compiling():  # traced code never plans: dynamo skips this
        _SPECS[tx.update] = spec
    return tx


def describe(tx: Any) -> Spec | None:
    """The spec registered for ``tx``, :class:`Opaque` ones included, or ``None``.

    Example:
        >>> import functrain as ft
        >>> from functrain.optim import fused
        >>> type(fused.describe(ft.zero_nans())).__name__
        'ZeroNans'
    """
    try:
        return _SPECS.get(tx.update)
    except TypeError:  # an update that cannot be weakly referenced
        return None


def spec_of(tx: Any) -> Spec | None:
    """The fusion spec of ``tx``, or ``None`` when it has none (or only an :class:`Opaque` one).

    Example:
        >>> import functrain as ft
        >>> from functrain.optim import fused
        >>> type(fused.spec_of(ft.adamw(1e-3))).__name__
        'Chain'
        >>> fused.spec_of(ft.zero_nans()) is None
        True
    """
    spec = describe(tx)
    return None if isinstance(spec, Opaque) else spec
