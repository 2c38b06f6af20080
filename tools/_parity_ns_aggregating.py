"""Cases of ``tools/optax_parity_namespaces.py`` for ``experimental.aggregating`` and the
stateful schedules (``inject_stateful_hyperparams``, ``WrappedSchedule``)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from _parity_ns_common import Case, both, quiet, rng, same, tree_err
from optax.experimental import aggregating as ox_agg

import functrain as ft
from functrain.experimental import aggregating as ft_agg

NOT_COMPARED = {
    "experimental.aggregating.AggregatorUpdateFn": "protocol type",
    "StatefulSchedule": "protocol type (exercised by the inject_stateful_hyperparams cases)",
}

SHAPES = {"w": (3, 2), "b": (2,)}


def _params() -> dict[str, np.ndarray]:
    r = rng(40)
    return {k: r.standard_normal(s) for k, s in SHAPES.items()}


def _grads(step: int, batch: tuple[int, ...]) -> dict[str, np.ndarray]:
    r = rng(100 + step)
    return {k: r.standard_normal((*batch, *s)) * (1 + k.startswith("w")) for k, s in SHAPES.items()}


def _lib(xp: Any) -> Any:
    return (ft, ft_agg) if xp is torch else (optax, ox_agg)


def _run(
    make: Any, batch: tuple[int, ...], steps: int, extra: Any = None, probe: Any = None
) -> float:
    """``make(lib, agg)`` built in both libraries, run ``steps`` updates on the same
    per-element gradients; updates, states (and ``probe(agg, state)``) compared every step."""
    pt, pj = both(_params())
    tx_t, tx_j = make(ft, ft_agg), make(optax, ox_agg)
    st, sj = tx_t.init(pt), tx_j.init(pj)
    update_j = jax.jit(tx_j.update)  # one compilation instead of one per eager operation
    err = tree_err(st, sj)
    for step in range(steps):
        gt, gj = both(_grads(step, batch))
        kw_t, kw_j = both(extra(step)) if extra else ({}, {})
        ut, st = tx_t.update(gt, st, pt, **kw_t)
        uj, sj = update_j(gj, sj, pj, **kw_j)
        err = max(err, tree_err(ut, uj), tree_err(st, sj))
        if probe:
            err = max(err, tree_err(probe(ft_agg, st), probe(ox_agg, sj)))
        if isinstance(ut, tuple):  # an aggregator with aux: (mean, {sum_sq_diff_grads, ...})
            ut, uj = ut[0], uj[0]
        pt, pj = ft.apply_updates(pt, ut), optax.apply_updates(pj, uj)
    return err


def _custom_aggregator(lib: Any, agg: Any) -> Any:
    """An :class:`Aggregator` built from plain functions: the per-element median-free
    'mean of the two extremes' of each coordinate, with an empty state."""

    def update(per_elt: Any, state: Any, params: Any = None) -> Any:
        if lib is ft:
            return ft.tree.map(lambda g: (g.amax(0) + g.amin(0)) / 2, per_elt), state
        return jax.tree.map(lambda g: (g.max(0) + g.min(0)) / 2, per_elt), state

    return agg.Aggregator(lib.init_empty_state, update)


def _sum_sq_extra(step: int) -> dict[str, Any]:
    r = rng(200 + step)
    return {
        "sum_sq_diff_grads": {k: np.abs(r.standard_normal(s)) for k, s in SHAPES.items()},
        "sample_size": np.asarray(4 + step),
    }


def _batch_size(axis: Any, batch: tuple[int, ...]) -> float:
    gt, gj = both(_grads(0, batch))
    got = ft_agg.get_batch_size_from_per_elt_updates(gt, axis)
    want = ox_agg.get_batch_size_from_per_elt_updates(gj, axis)
    return same(got == want and isinstance(got, int), f"{got!r} vs optax {want!r}")


def _state_fields() -> float:
    names = (
        "AccumulateAvgUpdatesState",
        "PerElementMeanAndSumSqDiffGradsState",
        "PerElementMeanAndVarianceEMAState",
    )
    for name in names:
        ft_fields, ox_fields = getattr(ft_agg, name)._fields, getattr(ox_agg, name)._fields
        same(ft_fields == ox_fields, f"{name}: {ft_fields} vs optax {ox_fields}")
    return 0.0


class _Total:
    """A stateful schedule: the running sum of the ``addendum`` extra argument (optax's test)."""

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    def init(self) -> Any:
        return self.xp.zeros(()) + 0.25

    def update(self, state: Any, **extra_args: Any) -> Any:
        return state + extra_args["addendum"]

    def __call__(self, state: Any, **extra_args: Any) -> Any:
        return state


def _stateful(kind: str) -> Any:
    def make(lib: Any, _: Any) -> Any:
        xp = torch if lib is ft else jnp
        inject = functools.partial(quiet, lib.inject_stateful_hyperparams)
        sched = lib.linear_schedule(0.1, 0.01, 5)
        if lib is optax:  # optax divides an int32 count in float32: an int64 count gives the
            # float64 value of the formula, which functrain computes (as tools/optax_parity.py)
            sched = functools.partial(lambda s, n: s(jnp.asarray(n, jnp.int64)), sched)
        if kind == "scale":
            return inject(lib.scale)(step_size=_Total(xp))
        if kind == "adam":
            return inject(lib.adam)(learning_rate=lib.WrappedSchedule(sched), b1=0.8)
        if kind == "sgd":  # a plain schedule (wrapped by the injector) and a stateful one
            return inject(lib.sgd, static_args="nesterov")(
                learning_rate=sched, momentum=_Total(xp), nesterov=True
            )
        return inject(lib.adam, hyperparam_dtype=xp.float32)(learning_rate=_Total(xp), eps=1e-3)

    return make


def _addendum(step: int) -> dict[str, Any]:
    return {"addendum": np.asarray(0.1 * (step % 3) - 0.05)}


def _wrapped_schedule() -> float:
    sched_t = ft.WrappedSchedule(ft.cosine_decay_schedule(1.0, 7, alpha=0.1))
    sched_j = optax.WrappedSchedule(optax.cosine_decay_schedule(1.0, 7, alpha=0.1))
    st, sj = sched_t.init(), sched_j.init()
    err = tree_err(st, sj)
    for _ in range(10):
        err = max(err, tree_err(sched_t(st), sched_j(sj)))
        st, sj = sched_t.update(st), sched_j.update(sj)
        err = max(err, tree_err(st, sj))
    return err


def cases() -> list[Case]:
    name = "experimental.aggregating."
    out = [Case(name + "*State", "NamedTuple field names", _state_fields)]
    for axis, batch in ((0, (4,)), ((0, 1), (2, 3))):
        out.append(
            Case(
                name + "average_per_element_updates",
                f"per_elt_axis {axis}, batch {batch}",
                functools.partial(
                    _run, lambda lib, agg, a=axis: agg.average_per_element_updates(a), batch, 3
                ),
            )
        )
        out.append(
            Case(
                name + "get_batch_size_from_per_elt_updates",
                f"per_elt_axis {axis}",
                functools.partial(
                    _batch_size, list(axis) if isinstance(axis, tuple) else axis, batch
                ),
            )
        )
    for steps in (1, 3):
        out.append(
            Case(
                name + "accumulate_avg_updates",
                f"accumulation_steps {steps}, 7 updates",
                functools.partial(
                    _run, lambda lib, agg, n=steps: agg.accumulate_avg_updates(n), (), 7
                ),
            )
        )
    for axis, batch in ((None, ()), (0, (4,)), ((0, 1), (2, 2))):
        out.append(
            Case(
                name + "average_incrementally_updates",
                f"per_elt_axis {axis}, accumulation_steps 3, 7 updates",
                functools.partial(
                    _run, lambda lib, agg, a=axis: agg.average_incrementally_updates(a, 3), batch, 7
                ),
            )
        )
    processes = {
        "scale(0.5) / average_per_element_updates(0) / adam(0.1)": lambda lib, agg: agg.process(
            lib.scale(0.5), agg.average_per_element_updates(0), lib.adam(0.1)
        ),
        "identity / average_incrementally_updates(0, 3) / sgd(0.1, momentum 0.9)": lambda lib, agg: (
            agg.process(
                lib.identity(), agg.average_incrementally_updates(0, 3), lib.sgd(0.1, momentum=0.9)
            )
        ),
        "identity / custom Aggregator (mean of extremes) / adam(0.1)": lambda lib, agg: agg.process(
            lib.identity(), _custom_aggregator(lib, agg), lib.adam(0.1)
        ),
    }
    for label, make in processes.items():
        out.append(
            Case(name + "process", label + ", 7 updates", functools.partial(_run, make, (4,), 7))
        )
    out.append(
        Case(
            name + "Aggregator",
            "built from init/update functions (inside process)",
            functools.partial(_run, processes[list(processes)[2]], (4,), 3),
        )
    )
    why_chan = (
        "optax computes Chan's size factor micro_step * batch_size / (micro_step + 1) "
        "from int32 arrays in float32 (not exact for accumulation_steps 3: 8/3)"
    )
    for axis, acc, batch in ((0, 1, (4,)), (0, 3, (4,)), ((0, 1), 2, (2, 3))):
        doc = {"tol": 1e-7, "doc": True, "why": why_chan} if acc == 3 else {}
        out.append(
            Case(
                name + "get_per_element_mean_and_sum_sq_diff_grads",
                f"per_elt_axis {axis}, accumulation_steps {acc}, 7 updates (mean and aux)",
                functools.partial(
                    _run,
                    lambda lib, agg, a=axis, n=acc: agg.get_per_element_mean_and_sum_sq_diff_grads(
                        a, n
                    ),
                    batch,
                    7,
                ),
                **doc,
            )
        )
    for decay in (0.9, 0.0):
        out.append(
            Case(
                name + "track_per_element_mean_and_variance_with_ema",
                f"ema_decay {decay:g}, sum_sq_diff_grads/sample_size as extra args, 5 updates",
                functools.partial(
                    _run,
                    lambda lib, agg, d=decay: agg.track_per_element_mean_and_variance_with_ema(d),
                    (),
                    5,
                    _sum_sq_extra,
                ),
            )
        )
    why_var = (
        "optax divides 1 / (sample_size - 1) in float32: sample_size is batch_size times "
        "an int32 micro-step when accumulating (functrain: float64)"
    )
    unbiased = lambda agg, state: agg.get_unbiased_mean_and_variance_ema(state)  # noqa: E731
    for opt, decay, axis, acc, batch in (
        ("adam", 0.9, 0, 1, (4,)),
        ("sgd", 0.5, [0, 1], 2, (2, 3)),
    ):
        label = f"{opt}(0.1), ema_decay {decay:g}, per_elt_axis {axis}, accumulation_steps {acc}"

        def make(lib: Any, agg: Any, o: str = opt, d: float = decay, a: Any = axis, n: int = acc):
            return agg.add_mean_variance_to_opt(getattr(lib, o)(0.1), d, a, n)

        doc = {} if acc == 1 else {"tol": 1e-7, "doc": True, "why": why_var}
        out.append(
            Case(
                name + "add_mean_variance_to_opt",
                label + ", 6 updates",
                functools.partial(_run, make, batch, 6),
                **doc,
            )
        )
        out.append(
            Case(
                name + "get_unbiased_mean_and_variance_ema",
                "state of add_mean_variance_to_opt: " + label,
                functools.partial(_run, make, batch, 6, None, unbiased),
                **doc,
            )
        )
    why_f32 = (
        "optax's _convert_floats keeps a stateful schedule's non-weak float64 value in "
        "float64 under hyperparam_dtype=float32; functrain casts every float "
        "hyperparameter to hyperparam_dtype (documented)"
    )
    for kind, label in (
        ("scale", "scale(step_size=stateful running sum of an extra arg)"),
        ("adam", "adam(learning_rate=WrappedSchedule(linear), b1=0.8)"),
        ("sgd", "sgd(plain schedule, momentum=stateful, static nesterov)"),
        ("f32", "adam(learning_rate=stateful, eps), hyperparam_dtype float32"),
    ):
        doc = {"tol": 1e-5, "doc": True, "why": why_f32} if kind == "f32" else {}
        out.append(
            Case(
                "inject_stateful_hyperparams",
                label + ", 6 updates, extra args",
                functools.partial(_run, _stateful(kind), (), 6, _addendum),
                **doc,
            )
        )
    out.append(
        Case(
            "WrappedSchedule",
            "cosine_decay_schedule: init/update/__call__, 10 steps",
            _wrapped_schedule,
        )
    )
    return out
