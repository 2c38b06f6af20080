"""Tests of ``functrain.testing``: assertions, compile counting and variants."""

from __future__ import annotations

import logging
import re
from typing import NamedTuple

import pytest
import torch

from functrain import testing


class State(NamedTuple):
    count: torch.Tensor
    mu: dict


def fails(fn, *args, **kwargs) -> str:
    """Runs an assertion expected to fail and returns its message."""
    with pytest.raises(AssertionError) as err:
        fn(*args, **kwargs)
    return str(err.value)


# --------------------------------------------------------------------------------------------
# assert_trees_all_close
# --------------------------------------------------------------------------------------------


def test_all_close_passes_within_tolerance_across_dtypes():
    a = State(torch.tensor(3), {"w": torch.ones(2, 3), "b": None})
    b = State(torch.tensor(3), {"w": torch.ones(2, 3, dtype=torch.float64) + 1e-7, "b": None})
    testing.assert_trees_all_close(a, b, rtol=1e-6)
    testing.assert_trees_all_close(a, a, b, rtol=1e-6)  # several trees
    testing.assert_trees_all_close([torch.zeros(0)], [torch.zeros(0)])
    testing.assert_trees_all_close({"lr": 0.1}, {"lr": torch.tensor(0.1)})  # numbers as leaves


def test_all_close_failure_names_path_and_worst_element():
    a = {"fc": {"w": torch.zeros(2, 3)}}
    b = {"fc": {"w": torch.zeros(2, 3)}}
    b["fc"]["w"][0, 0] = 0.1
    b["fc"]["w"][1, 2] = -0.5  # the worst
    msg = fails(testing.assert_trees_all_close, a, b, atol=0.05)
    assert "trees differ at ['fc']['w'] (shape (2, 3), torch.float32)" in msg
    assert "2 of 6 elements differ" in msg
    assert "worst at index (1, 2): a=0, b=-0.5, |a-b|=0.5" in msg
    assert "atol=0.05" in msg and "rtol=1e-06" in msg


def test_all_close_rtol_scales_by_second_tree():
    # |a-b| = 1 <= rtol·|b| = 0.1·10 holds; with the roles swapped 0.1·|a|=0.9 < 1.
    testing.assert_trees_all_close(torch.tensor(9.0), torch.tensor(10.0), rtol=0.1)
    with pytest.raises(AssertionError):
        testing.assert_trees_all_close(torch.tensor(9.0), torch.tensor(10.0), rtol=0.09)


def test_all_close_nan_and_inf():
    nan, inf = float("nan"), float("inf")
    testing.assert_trees_all_close(torch.tensor([nan, inf]), torch.tensor([nan, inf]))
    msg = fails(
        testing.assert_trees_all_close, torch.tensor([nan]), torch.tensor([nan]), equal_nan=False
    )
    assert "a=nan, b=nan" in msg
    msg = fails(testing.assert_trees_all_close, torch.tensor([1.0, inf]), torch.tensor([1.0, -inf]))
    assert "index (1,): a=inf, b=-inf" in msg
    # A large rtol must not make an infinity "close" to a finite number.
    fails(testing.assert_trees_all_close, torch.tensor([inf]), torch.tensor([1.0]), rtol=10.0)
    msg = fails(testing.assert_trees_all_close, torch.tensor([0.0, nan]), torch.tensor([0.0, 1.0]))
    assert "1 of 2 elements differ; worst at index (1,): a=nan, b=1" in msg


def test_all_close_third_tree_checked_and_scalar_root():
    msg = fails(
        testing.assert_trees_all_close, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(2.0)
    )
    assert "trees differ at <root> (shape (), torch.float32)" in msg and "index ()" in msg


def test_all_close_complex():
    testing.assert_trees_all_close(torch.tensor([1 + 2j]), torch.tensor([1 + 2j]))
    assert "|a-b|=1" in fails(
        testing.assert_trees_all_close, torch.tensor([1 + 2j]), torch.tensor([1 + 1j])
    )


def test_all_close_structure_and_shape_mismatch():
    msg = fails(testing.assert_trees_all_close, {"a": torch.ones(1)}, {"b": torch.ones(1)})
    assert "a['a'] has no counterpart in b" in msg
    msg = fails(testing.assert_trees_all_close, {"a": torch.ones(1)}, {"a": None})
    assert "a['a'] is a leaf but b['a'] is None" in msg
    msg = fails(testing.assert_trees_all_close, [torch.ones(2)], [torch.ones(3)])
    assert msg == "shapes differ at [0]: (2,) vs (3,)"


# --------------------------------------------------------------------------------------------
# assert_trees_all_equal and friends
# --------------------------------------------------------------------------------------------


def test_all_equal():
    nan = float("nan")
    testing.assert_trees_all_equal(
        {"x": torch.tensor([1.0, nan, -0.0]), "n": torch.arange(3)},
        {"x": torch.tensor([1.0, nan, 0.0]), "n": torch.arange(3)},
    )
    msg = fails(
        testing.assert_trees_all_equal,
        [torch.tensor([1.0, 1.0])],
        [torch.tensor([1.0, 1.0 + 1e-6])],
    )
    assert "trees differ at [0]" in msg and "index (1,)" in msg and "exact equality" in msg


def test_all_equal_does_not_confuse_nan_or_inf_with_numbers():
    big = torch.finfo(torch.float32).max
    assert "a=nan, b=0" in fails(
        testing.assert_trees_all_equal, torch.tensor([float("nan")]), torch.tensor([0.0])
    )
    assert "a=inf" in fails(
        testing.assert_trees_all_equal, torch.tensor([float("inf")]), torch.tensor([big])
    )


def test_all_equal_checks_dtype_and_exact_integers():
    msg = fails(testing.assert_trees_all_equal, {"n": torch.ones(1)}, {"n": torch.ones(1).double()})
    assert msg == "dtypes differ at ['n']: torch.float32 vs torch.float64"
    big = 2**53
    msg = fails(testing.assert_trees_all_equal, torch.tensor([big]), torch.tensor([big + 1]))
    assert f"a={big}, b={big + 1}" in msg


def test_equal_shapes_dtypes_structs():
    a = {"w": torch.ones(2, 3), "s": State(torch.tensor(0), {"m": torch.zeros(3)})}
    b = {"w": torch.zeros(2, 3), "s": State(torch.tensor(5), {"m": torch.ones(3)})}
    testing.assert_trees_all_equal_shapes(a, b)
    testing.assert_trees_all_equal_dtypes(a, b)
    testing.assert_trees_all_equal_structs(a, b, b)
    c = {"w": torch.ones(2, 3), "s": State(torch.tensor(0), {"m": torch.zeros(4)})}
    assert fails(testing.assert_trees_all_equal_shapes, a, c) == (
        "shapes differ at ['s'][1]['m']: (3,) vs (4,)"
    )
    c = {"w": torch.ones(2, 3), "s": State(torch.tensor(0.0), {"m": torch.zeros(3)})}
    assert fails(testing.assert_trees_all_equal_dtypes, a, c) == (
        "dtypes differ at ['s'][0]: torch.int64 vs torch.float32"
    )
    c = {"w": torch.ones(2, 3), "s": State(torch.tensor(0), {"v": torch.zeros(3)})}
    assert "['s'][1]['m'] has no counterpart" in fails(testing.assert_trees_all_equal_structs, a, c)
    # A NamedTuple and a tuple with the same leaves are different structures.
    msg = fails(testing.assert_trees_all_equal_structs, State(1, None), (1, None))
    assert msg.startswith("tree structures differ")


def test_tree_all_finite():
    testing.assert_tree_all_finite({"a": torch.ones(2), "n": torch.arange(2), "none": None})
    x = torch.zeros(2, 3)
    x[1, 2] = float("-inf")
    x[1, 0] = float("nan")
    msg = fails(testing.assert_tree_all_finite, {"p": [torch.ones(1), x]})
    assert msg == "non-finite value at ['p'][1][1][0]: nan (2 of 6 elements non-finite)"


def test_tree_on_device():
    testing.assert_tree_on_device({"a": torch.ones(1), "b": None, "c": 3}, torch.device("cpu"))
    assert fails(testing.assert_tree_on_device, {"a": torch.ones(1)}, "meta") == (
        "['a'] is on cpu, expected meta"
    )


def test_shape_and_rank():
    testing.assert_shape(torch.ones(2, 3), (2, 3))
    testing.assert_shape([torch.ones(2, 3), torch.ones(7, 4)], (None, {3, 4}))
    assert fails(testing.assert_shape, [torch.ones(2, 3), torch.ones(2)], (2, None)) == (
        "tensor 1 has shape (2,), expected (2, None)"
    )
    assert "expected (2, {3})" in fails(testing.assert_shape, torch.ones(2, 5), (2, {3}))
    testing.assert_rank(torch.ones(()), 0)
    testing.assert_rank([torch.ones(2), torch.ones(2, 2)], {1, 2})
    assert fails(testing.assert_rank, torch.ones(2, 2, 2), 2) == "tensor 0 has rank 3, expected [2]"


# --------------------------------------------------------------------------------------------
# Compile counting
# --------------------------------------------------------------------------------------------


def _sgd(x: torch.Tensor, lr: torch.Tensor | float) -> torch.Tensor:
    return x - lr * x.sin()


def test_count_compiles_tensor_lr_does_not_recompile_python_float_does():
    step = torch.compile(lambda x, lr: _sgd(x, lr), fullgraph=True, backend="eager")
    with testing.count_compiles() as count:
        for lr in (0.1, 0.2, 0.3):
            step(torch.ones(3), torch.tensor(lr))
    assert (count.compiles, count.graphs, count.reasons) == (1, 1, [])
    step = torch.compile(lambda x, lr: _sgd(x, lr), fullgraph=True, backend="eager")
    with testing.count_compiles() as count:
        for lr in (0.1, 0.2, 0.3):  # a Python float is first specialized: one recompile
            step(torch.ones(3), lr)
    assert count.compiles == 2 and len(count.reasons) == 1
    assert "Recompiling function" in count.reasons[0] and "lr" in count.reasons[0]


def test_assert_max_compiles_reports_reasons():
    step = torch.compile(lambda x, lr: _sgd(x, lr), fullgraph=True, backend="eager")
    with testing.assert_max_compiles(1):
        step(torch.ones(3), torch.tensor(0.1))
        step(torch.ones(3), torch.tensor(0.2))
    with pytest.raises(AssertionError) as err, testing.assert_max_compiles(0):
        step(torch.ones(3), 0.1)  # a float where a tensor was: recompile
    assert "code inside the block compiled 1 time, at most 0 allowed" in str(err.value)
    assert "triggered by the following guard failure" in str(err.value)


def test_recompile_capture_restores_logging_state():
    from torch._logging._internal import log_state

    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    before = (logger.level, logger.propagate, list(logger.handlers))
    enabled = log_state.is_artifact_enabled("recompiles")
    with testing.count_compiles():
        pass
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    assert log_state.is_artifact_enabled("recompiles") == enabled


def test_assert_max_traces_inside_compile_counts_traces_not_calls():
    @testing.assert_max_traces(n=1)
    def step(x, lr):
        return _sgd(x, lr)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for lr in (0.1, 0.2, 0.3):
        testing.assert_trees_all_close(
            compiled(torch.ones(2), torch.tensor(lr)), _sgd(torch.ones(2), lr), rtol=1e-6
        )
    assert step.traces == 1
    step(torch.ones(2), 0.5)  # eager calls are not traces
    assert step.traces == 1
    with pytest.raises(AssertionError, match="step traced 2 times, at most 1 allowed"):
        compiled(torch.ones(2, 2), torch.tensor(0.1))  # a new rank: retrace


def test_assert_max_traces_outside_compile_counts_compilations():
    compiled = testing.assert_max_traces(
        torch.compile(lambda x, lr: _sgd(x, lr), fullgraph=True, backend="eager"), n=1
    )
    compiled(torch.ones(2), torch.tensor(0.1))
    compiled(torch.ones(2), torch.tensor(0.2))
    assert compiled.traces == 1
    with pytest.raises(AssertionError, match=r"compiled 2 times(.|\n)*guard failure"):
        compiled(torch.ones(2), 0.5)


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


def _params(mark):
    assert mark.name == "parametrize" and mark.args[0] == "variant"
    return mark.args[1]


def test_variants_ids_devices_and_backend(monkeypatch):
    ids = [p.id for p in _params(testing.variants(devices="cpu"))]
    assert ids == ["eager-cpu", "compiled-cpu"]
    ids = [p.id for p in _params(testing.variants(devices="all", eager=False))]
    assert ids == ["compiled-cpu"] + (["compiled-cuda"] if torch.cuda.is_available() else [])
    params = _params(testing.variants(devices=["cpu", "cuda:0"], compiled=False))
    assert [p.id for p in params] == ["eager-cpu", "eager-cuda:0"]
    skip = params[1].marks[0]
    assert skip.name == "skipif" and skip.args[0] is (not torch.cuda.is_available())
    monkeypatch.setenv("FUNCTRAIN_TEST_COMPILE_BACKEND", "aot_eager")
    assert {p.values[0].backend for p in _params(testing.variants())} == {"aot_eager"}
    assert _params(testing.variants(backend="eager"))[0].values[0].backend == "eager"
    with pytest.raises(ValueError, match="eager=True or compiled=True"):
        testing.variants(eager=False, compiled=False)


def test_variants_run_the_function_eagerly_and_compiled():
    seen: list[tuple[str, bool]] = []
    traces = []

    def body(variant):
        @testing.assert_max_traces(n=1)
        def step(x, lr):
            # is_compiling() is answered at trace time and baked into the graph as a constant:
            # True on every call of the compiled variant, False when running eagerly.
            return _sgd(x, lr), torch.compiler.is_compiling()

        f = variant.fn(step)
        x = variant.to(torch.linspace(-1, 1, 5))
        for lr in (0.1, 0.2):
            out, compiled = f(x, torch.tensor(lr, device=variant.device))
            assert compiled is variant.compiled
            testing.assert_tree_on_device(out, variant.device)
            testing.assert_trees_all_close(out, _sgd(x, lr), rtol=1e-6, atol=1e-7)
        seen.append((variant.name, variant.compiled))
        traces.append(step.traces)

    for param in _params(testing.variants(devices="cpu", backend="aot_eager")):
        body(param.values[0])
    assert seen == [("eager-cpu", False), ("compiled-cpu", True)]
    assert traces == [0, 1]  # eager: no trace; compiled: one trace for two learning rates


def test_compiled_variant_is_fullgraph():
    def breaks(x):
        torch._dynamo.graph_break()
        return x + 1

    eager, compiled = (
        p.values[0] for p in _params(testing.variants(devices="cpu", backend="eager"))
    )
    testing.assert_trees_all_equal(eager.fn(breaks)(torch.zeros(1)), torch.ones(1))
    with pytest.raises(Exception, match=re.compile("graph.?break", re.IGNORECASE)):
        compiled.fn(breaks)(torch.zeros(1))


def test_variant_to_moves_tensors_only():
    v = testing.Variant(compiled=False, device=torch.device("meta"))
    out = v.to({"w": torch.ones(2), "n": 3, "none": None})
    assert out["w"].device.type == "meta" and out["n"] == 3 and out["none"] is None


@testing.variants(devices="all", backend="aot_eager")
def test_variants_decorator_in_use(variant):
    step = variant.fn(lambda p, g, lr: {k: p[k] - lr * g[k] for k in p})
    params = variant.to({"w": torch.ones(3), "b": torch.zeros(1)})
    grads = variant.to({"w": torch.full((3,), 2.0), "b": torch.ones(1)})
    new = step(params, grads, torch.tensor(0.5, device=variant.device))
    testing.assert_tree_on_device(new, variant.device)
    testing.assert_trees_all_close(new, {"w": torch.zeros(3), "b": torch.full((1,), -0.5)})


@pytest.mark.slow
# Inductor's CPU backend imports torch.utils.mkldnn, which uses the deprecated
# torch.jit.script_method at import time.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@testing.variants(devices="all", eager=False, backend="inductor")
def test_inductor_variant(variant):
    f = variant.fn(_sgd)
    with testing.assert_max_compiles(1):
        for lr in (0.1, 0.2):
            out = f(variant.to(torch.ones(4)), torch.tensor(lr, device=variant.device))
    testing.assert_trees_all_close(out, _sgd(torch.ones(4), 0.2), rtol=1e-6)


def test_bitwise_equality_tells_signed_zeros_and_nan_payloads_apart():
    nan = torch.tensor([float("nan")])
    other_nan = nan.view(torch.int32).add(1).view(torch.float32)  # another NaN payload
    assert bool(other_nan.isnan())
    testing.assert_trees_all_equal([nan], [other_nan])  # plain: NaNs are equal
    with pytest.raises(AssertionError, match=r"\[0\].*bitwise equality required"):
        testing.assert_trees_all_equal([nan], [other_nan], bitwise=True)
    with pytest.raises(AssertionError, match=r"\['b'\]"):
        testing.assert_trees_all_equal(
            {"a": torch.ones(2), "b": torch.tensor([0.0])},
            {"a": torch.ones(2), "b": torch.tensor([-0.0])},
            bitwise=True,
        )
    z = torch.tensor([complex(0.0, 1.0)])
    testing.assert_trees_all_equal([z, torch.arange(3)], [z.clone(), torch.arange(3)], bitwise=True)
    with pytest.raises(AssertionError):
        testing.assert_trees_all_equal([z], [torch.tensor([complex(-0.0, 1.0)])], bitwise=True)


def test_string_leaves_compare_by_equality():
    """A checkpointed state may hold strings: they compare with ``==`` and by type, naming the
    path, and the numeric leaves beside them are still checked (before: ``TypeError`` from
    ``torch.as_tensor``)."""
    a = {"name": "adamw", "x": torch.ones(2)}
    testing.assert_trees_all_equal(a, {"name": "adamw", "x": torch.ones(2)})
    testing.assert_trees_all_close(a, {"name": "adamw", "x": torch.ones(2) + 1e-9})
    testing.assert_tree_all_finite(a)
    with pytest.raises(AssertionError, match=r"leaves differ at \['name'\]: 'adamw' vs 'sgd'"):
        testing.assert_trees_all_equal(a, {"name": "sgd", "x": torch.ones(2)})
    with pytest.raises(AssertionError, match=r"leaves differ at \['name'\]"):
        testing.assert_trees_all_close(a, {"name": 1.0, "x": torch.ones(2)})
    with pytest.raises(AssertionError, match=r"trees differ at \['x'\]"):
        testing.assert_trees_all_equal(a, {"name": "adamw", "x": torch.zeros(2)})
