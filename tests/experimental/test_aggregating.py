"""``functrain.experimental.aggregating`` (optax.experimental.aggregating) vs float64 references.

References written here: ``numpy`` means, sums of squared differences and ``ddof=1`` variances
of the stacked per-element gradients; an EMA with bias correction by a naive loop; per-example
gradients by one ``torch.autograd.grad`` call per example (for the end-to-end MLP on sklearn's
digits). Properties (hypothesis): accumulating any equal-size split of any permutation of a
batch over several calls gives the statistics of one call over the whole batch.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain.experimental import aggregating as A

F64 = torch.float64
SHAPES = {"w": (3, 2), "b": (2,)}


def _per_elt(batch_shape: tuple[int, ...], seed: int, dtype: torch.dtype = F64) -> dict:
    """Per-element gradients: each leaf ``(*batch_shape, *param_shape)``, not centred at 0."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (3 * torch.randn(*batch_shape, *s, generator=g, dtype=F64) + 1.5).to(dtype)
        for k, s in SHAPES.items()
    }


def _params(dtype: torch.dtype = F64) -> dict:
    return {k: torch.zeros(s, dtype=dtype) for k, s in SHAPES.items()}


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def _close(actual: Any, expected: Any, tol: float = 1e-12) -> None:
    actual, expected = ft.tree.leaves(actual), optree.tree_leaves(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(_np(a), np.asarray(e, np.float64), rtol=tol, atol=tol)


def _ref_stats(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, sum of squared differences, count) over ``axes``, by numpy in float64."""
    mean = x.mean(axis=axes)
    n = int(np.prod([x.shape[a] for a in axes]))
    ssd = ((x - x.mean(axis=axes, keepdims=True)) ** 2).sum(axis=axes)
    return mean, ssd, n


# --- one call -----------------------------------------------------------------------------


@given(
    batch=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    form=st.sampled_from(["int", "neg", "seq"]),
    seed=st.integers(0, 2**16),
)
def test_average_per_element_updates_is_numpy_mean(batch: list[int], form: str, seed: int) -> None:
    grads = _per_elt(tuple(batch), seed)
    axes = tuple(range(len(batch)))
    if form == "int" and len(batch) == 1:
        axis: Any = 0
    elif form == "neg" and len(batch) == 1:
        axis = -3  # the first axis of the 3-d "w" only: "b" has 2 dims
        grads = {"w": grads["w"]}
    else:
        axis = list(axes)
    agg = A.average_per_element_updates(axis)
    out, state = agg.update(grads, agg.init(None))
    assert state == ft.EmptyState()
    _close(out, {k: _np(v).mean(axis=axes) for k, v in grads.items()})
    assert out["w"].dtype == F64 and out["w"].shape == SHAPES["w"]


@given(n=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_mean_and_sum_sq_diff_one_call(n: int, seed: int) -> None:
    grads = _per_elt((n,), seed)
    agg = A.get_per_element_mean_and_sum_sq_diff_grads()
    (mean, aux), _ = agg.update(grads, agg.init(_params()))
    assert aux["sample_size"] == n
    for k, x in grads.items():
        ref_mean, ref_ssd, _ = _ref_stats(_np(x), (0,))
        _close(mean[k], ref_mean)
        _close(aux["sum_sq_diff_grads"][k], ref_ssd)
        _close(aux["sum_sq_diff_grads"][k] / (n - 1), np.var(_np(x), axis=0, ddof=1))


def test_sum_sq_diff_has_no_cancellation() -> None:
    """Values 1e8 ± 1 in float64: E[x²] − E[x]² would lose every digit; two passes do not."""
    x = 1e8 + torch.tensor([[-1.0], [0.0], [1.0], [2.0]], dtype=F64)
    (_, aux), _ = A.get_per_element_mean_and_sum_sq_diff_grads().update([x], None, None)
    assert aux["sum_sq_diff_grads"][0].item() == 5.0


def test_half_precision_statistics_are_computed_in_float32() -> None:
    """float16 deviations from a mean it cannot represent (1001.33 rounds to 1001.5): squared in
    float16 they sum to 4.75; in float32, rounded once, to the true 14/3."""
    x = torch.tensor([[1000.0], [1001.0], [1003.0]], dtype=torch.float16)
    (mean, aux), _ = A.get_per_element_mean_and_sum_sq_diff_grads().update([x], None, None)
    ref_mean, ref_ssd, _ = _ref_stats(x.double().numpy(), (0,))
    assert mean[0].dtype == aux["sum_sq_diff_grads"][0].dtype == torch.float16
    assert mean[0].item() == float(np.float16(ref_mean[0]))
    assert aux["sum_sq_diff_grads"][0].item() == float(np.float16(ref_ssd[0]))


def test_get_batch_size_from_per_elt_updates() -> None:
    grads = {"w": torch.zeros(4, 3, 2), "b": torch.zeros(4, 3)}
    assert A.get_batch_size_from_per_elt_updates(grads, 0) == 4
    assert A.get_batch_size_from_per_elt_updates(grads, [0, 1]) == 12
    with pytest.raises(ValueError, match=r"per_elt_updates\['b'\]: 3.*per_elt_updates\['w'\]: 2"):
        A.get_batch_size_from_per_elt_updates(grads, -1)


# --- accumulation over several calls ------------------------------------------------------


@st.composite
def _splits(draw: st.DrawFn) -> tuple[int, int, list[int], int, int]:
    """(calls k, size per call m, a permutation of the k·m elements, batch layout, seed)."""
    k, m = draw(st.integers(2, 4)), draw(st.integers(2, 4))
    perm = draw(st.permutations(list(range(k * m))))
    return k, m, perm, draw(st.sampled_from([0, 1])), draw(st.integers(0, 2**16))


@given(case=_splits())
def test_accumulated_statistics_equal_one_call_over_the_batch(case: tuple) -> None:
    k, m, perm, layout, seed = case
    whole = _per_elt((k * m,), seed)
    if layout == 0:  # batch axis 0, k calls of m elements
        axis: Any = 0
        calls = [{n: x[perm[i * m : (i + 1) * m]] for n, x in whole.items()} for i in range(k)]
    else:  # batch axes (0, 1): k calls of shape (1, m, ...)
        axis = (0, 1)
        calls = [
            {n: x[perm[i * m : (i + 1) * m]].unsqueeze(0) for n, x in whole.items()}
            for i in range(k)
        ]
    agg = A.get_per_element_mean_and_sum_sq_diff_grads(axis, accumulation_steps=k)
    state = agg.init(_params())
    for i, call in enumerate(calls):
        (mean, aux), state = agg.update(call, state)
        if i < k - 1:  # not ready: zeros out, statistics kept
            assert not state.ready and state.micro_step.item() == i + 1
            assert aux["sample_size"].item() == 0
            assert all((x == 0).all() for x in ft.tree.leaves((mean, aux)))
    assert state.ready and state.micro_step.item() == 0
    assert aux["sample_size"].item() == k * m
    assert all((x == 0).all() for x in ft.tree.leaves((state.mean_grads, state.sum_sq_diff_grads)))
    for n, x in whole.items():
        ref_mean, ref_ssd, _ = _ref_stats(_np(x), (0,))
        _close(mean[n], ref_mean, 1e-11)
        _close(aux["sum_sq_diff_grads"][n], ref_ssd, 1e-11)


def test_unequal_micro_batches_weigh_equally_as_in_optax() -> None:
    """optax's merge counts micro-batches, not elements: the mean is the mean of the means."""
    a, b = _per_elt((2,), 1), _per_elt((4,), 2)
    agg = A.get_per_element_mean_and_sum_sq_diff_grads(0, accumulation_steps=2)
    _, state = agg.update(a, agg.init(_params()))
    (mean, aux), _ = agg.update(b, state)
    assert aux["sample_size"].item() == 8  # 2 · the last batch's size, as optax
    for n in SHAPES:
        _close(mean[n], (_np(a[n]).mean(0) + _np(b[n]).mean(0)) / 2)


@given(k=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_accumulate_avg_updates_is_the_mean_of_the_calls(k: int, seed: int) -> None:
    grads = _per_elt((k,), seed)
    tx = A.accumulate_avg_updates(k)
    state = tx.init(_params())
    for i in range(k):
        out, state = tx.update({n: x[i] for n, x in grads.items()}, state)
        if i < k - 1:
            assert all((x == 0).all() for x in ft.tree.leaves(out))
    _close(out, {n: _np(x).mean(0) for n, x in grads.items()})
    if k == 1:
        assert state == ft.EmptyState()  # identity: nothing to accumulate
    else:
        assert state.ready and state.micro_step.item() == 0
        assert state.micro_step.dtype == torch.int32


@given(k=st.integers(1, 3), m=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_average_incrementally_updates_is_the_mean_over_all_elements(
    k: int, m: int, seed: int
) -> None:
    grads = _per_elt((k, m), seed)
    agg = A.average_incrementally_updates(per_elt_axis=0, accumulation_steps=k)
    assert isinstance(agg, A.Aggregator)
    state = agg.init(_params())
    for i in range(k):
        out, state = agg.update({n: x[i] for n, x in grads.items()}, state)
    _close(out, {n: _np(x).mean((0, 1)) for n, x in grads.items()})
    assert not isinstance(A.average_incrementally_updates(None, 2), A.Aggregator)


# --- EMAs of the mean and variance --------------------------------------------------------


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_add_mean_variance_to_opt_vs_naive_ema(ema_decay: float, accumulation_steps: int) -> None:
    lr, m, steps = 0.1, 3, 4
    opt = A.add_mean_variance_to_opt(ft.sgd(lr), ema_decay, 0, accumulation_steps)
    params = _params()
    state = opt.init(params)
    ref_params = {n: np.zeros(s) for n, s in SHAPES.items()}
    mean_ema = {n: np.zeros(s) for n, s in SHAPES.items()}
    var_ema = {n: np.zeros(s) for n, s in SHAPES.items()}
    for t in range(1, steps + 1):
        batch = _per_elt((accumulation_steps * m,), seed=t)
        for i in range(accumulation_steps):
            micro = {n: x[i * m : (i + 1) * m] for n, x in batch.items()}
            updates, state = opt.update(micro, state, params)
            params = ft.apply_updates(params, updates)
        for n, x in batch.items():  # the naive loop, on the pooled step batch
            g = _np(x)
            ref_params[n] = ref_params[n] - lr * g.mean(0)
            mean_ema[n] = (1 - ema_decay) * g.mean(0) + ema_decay * mean_ema[n]
            var_ema[n] = (1 - ema_decay) * np.var(g, 0, ddof=1) + ema_decay * var_ema[n]
        mean, var = A.get_unbiased_mean_and_variance_ema(state)
        _close(mean, {n: v / (1 - ema_decay**t) for n, v in mean_ema.items()}, 1e-11)
        _close(var, {n: v / (1 - ema_decay**t) for n, v in var_ema.items()}, 1e-11)
        _close(params, ref_params, 1e-12)
    ema_state = ft.tree.get(state, "PerElementMeanAndVarianceEMAState")
    assert ema_state.count.item() == steps and ema_state.ema_decay.dtype == F64


def test_track_ema_takes_its_statistics_as_keyword_arguments() -> None:
    tx = A.track_per_element_mean_and_variance_with_ema(ema_decay=0.25)
    state = tx.init([torch.zeros(2, dtype=F64)])
    g, s = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([6.0, 3.0], dtype=F64)
    out, state = tx.update([g], state, sum_sq_diff_grads=[s], sample_size=torch.tensor(4))
    assert out[0] is g
    _close(state.mean_grads_ema, [0.75 * np.array([1.0, 2.0])])
    _close(state.variance_grads_ema, [0.75 * np.array([2.0, 1.0])])
    mean, var = A.get_unbiased_mean_and_variance_ema(state)
    _close(mean, [np.array([1.0, 2.0])])
    _close(var, [np.array([2.0, 1.0])])


# --- process ------------------------------------------------------------------------------


def test_process_keeps_the_postprocessor_only_on_ready_steps() -> None:
    """On the accumulating steps the postprocessor's outputs (here inf: it divides by the
    zero updates) are discarded and its state is unchanged; keyword arguments reach the
    members that take them."""
    seen = []

    def pre(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        seen.append(sorted(extra))
        return updates, state

    inv = ft.stateless(lambda u, p: ft.tree.map(lambda x: 1 / x, u))
    opt = A.process(
        ft.GradientTransformation(ft.init_empty_state, pre),
        A.average_incrementally_updates(0, 2),
        ft.chain(inv, ft.sgd(1.0, momentum=0.5)),
    )
    assert isinstance(opt, A.Aggregator)
    params = {"w": torch.ones(2, dtype=F64)}
    state = opt.init(params)
    first = {"w": torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=F64)}
    out, state = opt.update(first, state, params, loss=torch.tensor(0.0))
    assert seen == [["loss"]]
    assert (out["w"] == 0).all() and torch.isfinite(ft.tree.leaves(state)[-1]).all()
    out, state = opt.update({"w": torch.tensor([[5.0, 2.0], [7.0, 2.0]], dtype=F64)}, state)
    _close(out, {"w": np.array([-1 / 4.0, -1 / 2.0])})  # sgd(1) of 1/mean, first momentum step
    non_agg = A.process(ft.identity(), ft.identity(), ft.identity())
    assert type(non_agg) is ft.GradientTransformation


# --- end to end: per-sample gradients of an MLP on a real batch ----------------------------


def _mlp_problem() -> tuple[dict, dict, Any]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    batch = {"x": torch.tensor(x[:24] / 16.0, dtype=F64), "y": torch.tensor(y[:24])}
    g = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(64, 8, generator=g, dtype=F64) / 8,
        "b1": torch.zeros(8, dtype=F64),
        "w2": torch.randn(8, 10, generator=g, dtype=F64) / 3,
        "b2": torch.zeros(10, dtype=F64),
    }

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        h = torch.tanh(b["x"] @ p["w1"] + p["b1"])
        return torch.nn.functional.cross_entropy(h @ p["w2"] + p["b2"], b["y"])

    return params, batch, loss_fn


def _mean_grad_by_loop(loss_fn: Any, params: dict, batch: dict) -> dict:
    """The mean of per-example gradients, one autograd call per example."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    n = batch["y"].shape[0]
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(n):
        loss = loss_fn(leaves, {k: v[i : i + 1] for k, v in batch.items()})
        for k, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
            total[k] += g
    return {k: v / n for k, v in total.items()}


def test_per_sample_grads_mlp_aggregated_then_adam_equals_adam_on_the_mean() -> None:
    params, batch, loss_fn = _mlp_problem()
    opt = A.process(ft.identity(), A.average_per_element_updates(), ft.adam(1e-2))
    ref_opt = ft.adam(1e-2)
    p, ref_p = params, params
    state, ref_state = opt.init(p), ref_opt.init(ref_p)
    for _ in range(3):
        updates, state = opt.update(ft.per_sample_grads(loss_fn, p, batch), state, p)
        p = ft.apply_updates(p, updates)
        ref_u, ref_state = ref_opt.update(_mean_grad_by_loop(loss_fn, ref_p, batch), ref_state)
        ref_p = ft.apply_updates(ref_p, ref_u)
        _close(p, ref_p, 1e-12)
    # the variance tracked alongside: that of the looped per-example gradients
    opt = A.add_mean_variance_to_opt(ft.adam(1e-2), ema_decay=0.5)
    state = opt.init(params)
    _, state = opt.update(ft.per_sample_grads(loss_fn, params, batch), state, params)
    _, var = A.get_unbiased_mean_and_variance_ema(state)
    per_example = [
        _mean_grad_by_loop(loss_fn, params, {k: v[i : i + 1] for k, v in batch.items()})
        for i in range(24)
    ]
    _close(var, {k: np.var([_np(g[k]) for g in per_example], 0, ddof=1) for k in params}, 1e-10)


# --- state, compilation, signatures, errors -----------------------------------------------


def test_state_is_a_pytree_of_tensors() -> None:
    opt = A.add_mean_variance_to_opt(ft.adam(0.1), 0.9, 0, accumulation_steps=2)
    params = _params()
    state = opt.init(params)
    leaves, spec = optree.tree_flatten(state)
    assert leaves and all(isinstance(x, torch.Tensor) for x in leaves)
    copy = optree.tree_unflatten(spec, [x.clone() for x in leaves])
    grads = _per_elt((3,), 0)
    out_a, state_a = opt.update(grads, state, params)
    out_b, state_b = opt.update(grads, copy, params)
    assert ft.tree.allclose((out_a, state_a), (out_b, state_b), rtol=0, atol=0)
    assert type(ft.tree.get(state, "PerElementMeanAndSumSqDiffGradsState")).__name__ == (
        "PerElementMeanAndSumSqDiffGradsState"
    )


@pytest.mark.parametrize("which", ["mean_variance", "incremental"])
def test_update_compiles_without_graph_breaks(which: str) -> None:
    if which == "mean_variance":
        opt = A.add_mean_variance_to_opt(ft.adam(0.1), 0.9, 0, accumulation_steps=2)
    else:
        opt = A.process(ft.identity(), A.average_incrementally_updates(0, 2), ft.adam(0.1))
    params = _params(torch.float32)
    step = torch.compile(opt.update, fullgraph=True, backend="eager")
    state = ref_state = opt.init(params)
    for t in range(3):
        grads = _per_elt((4,), t, torch.float32)
        out, state = step(grads, state, params)
        ref_out, ref_state = opt.update(grads, ref_state, params)
        assert ft.tree.allclose((out, state), (ref_out, ref_state), rtol=1e-6, atol=1e-7)


def test_signatures_and_fields_follow_optax() -> None:
    e = inspect.Parameter.empty
    expected = {  # optax 0.2.8, optax/experimental/_aggregating.py: (name, default)
        "process": [
            ("preprocessor", e),
            ("aggregator", e),
            ("postprocessor", e),
            ("aggregator_has_aux", False),
        ],
        "average_per_element_updates": [("per_elt_axis", 0)],
        "accumulate_avg_updates": [("accumulation_steps", e)],
        "average_incrementally_updates": [("per_elt_axis", e), ("accumulation_steps", e)],
        "get_batch_size_from_per_elt_updates": [("per_elt_updates", e), ("per_elt_axis", e)],
        "get_per_element_mean_and_sum_sq_diff_grads": [
            ("per_elt_axis", 0),
            ("accumulation_steps", 1),
        ],
        "track_per_element_mean_and_variance_with_ema": [("ema_decay", 0.9)],
        "get_unbiased_mean_and_variance_ema": [("state", e)],
        "add_mean_variance_to_opt": [
            ("opt", e),
            ("ema_decay", 0.9),
            ("per_elt_axis", 0),
            ("accumulation_steps", 1),
        ],
    }
    for name, want in expected.items():
        got = inspect.signature(getattr(A, name)).parameters.values()
        assert [(p.name, p.default) for p in got] == want, name
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in got), name
    assert A.AccumulateAvgUpdatesState._fields == ("micro_step", "ready", "avg_grad")
    assert A.PerElementMeanAndSumSqDiffGradsState._fields == (
        "micro_step",
        "ready",
        "mean_grads",
        "sum_sq_diff_grads",
    )
    assert A.PerElementMeanAndVarianceEMAState._fields == (
        "count",
        "ema_decay",
        "mean_grads_ema",
        "variance_grads_ema",
    )
    assert issubclass(A.Aggregator, ft.GradientTransformation)


def test_bad_input_raises_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="accumulation_steps"):
        A.accumulate_avg_updates(0)
    with pytest.raises(TypeError, match="accumulation_steps"):
        A.get_per_element_mean_and_sum_sq_diff_grads(0, 2.0)
    with pytest.raises(TypeError, match="per_elt_axis"):
        A.average_per_element_updates("0")
    with pytest.raises(ValueError, match="ema_decay"):
        A.track_per_element_mean_and_variance_with_ema(1.0)
    with pytest.raises(ValueError, match=r"per_elt_updates\['b'\]: per_elt_axis 2 is out of range"):
        A.average_per_element_updates(2).update(_per_elt((2,), 0), None)
    with pytest.raises(ValueError, match="repeats"):
        A.average_per_element_updates([0, -3]).update({"w": torch.zeros(2, 3, 2)}, None)
    tx = A.accumulate_avg_updates(2)
    state = tx.init(_params())
    with pytest.raises(ft.tree.TreeMismatchError, match=r"state.avg_grad\['b'\]"):
        tx.update(_per_elt((4,), 0), state)  # per-element updates given to an accumulator
    ema = A.track_per_element_mean_and_variance_with_ema()
    with pytest.raises(ValueError, match="sample_size"):
        one = [torch.ones(1)]
        ema.update(one, ema.init(one), None, sum_sq_diff_grads=one, sample_size=1)
    with pytest.raises(ValueError, match="PerElementMeanAndVarianceEMAState"):
        A.get_unbiased_mean_and_variance_ema(ft.adam(0.1).init(_params()))
    with pytest.raises(TypeError, match="postprocessor"):
        A.process(ft.identity(), ft.identity(), object())
