"""Adversarial tests of ``functrain.testing``: inputs on which a helper must fail, not pass.

These complement ``tests/test_testing.py``; each case here is a way an assertion could let a
real difference through (or name the wrong place), checked against the documented semantics
``|a-b| <= atol + rtol*|b|`` and chex's behaviour.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch

from functrain import testing

nan, inf = float("nan"), float("inf")


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def fails(fn, *args, **kwargs) -> str:
    """Runs an assertion expected to fail and returns its message."""
    with pytest.raises(AssertionError) as err:
        fn(*args, **kwargs)
    return str(err.value)


# --------------------------------------------------------------------------------------------
# Calls that compare nothing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "assertion",
    [
        testing.assert_trees_all_close,
        testing.assert_trees_all_equal,
        testing.assert_trees_all_equal_shapes,
        testing.assert_trees_all_equal_dtypes,
        testing.assert_trees_all_equal_structs,
    ],
)
def test_a_single_tree_is_an_error_not_a_pass(assertion):
    # The classic typo: both trees packed into one tuple. It compares nothing, so it must not
    # pass silently (chex raises ValueError too).
    a, b = torch.zeros(2), torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least two trees"):
        assertion((a, b))


# --------------------------------------------------------------------------------------------
# Values: integers, complex NaNs, conjugate views
# --------------------------------------------------------------------------------------------


def test_all_close_integers_beyond_float64_precision():
    # float64 rounds both to 2**62: the difference of 1 must still exceed atol=0, rtol=0.
    big = 2**62
    msg = fails(
        testing.assert_trees_all_close, torch.tensor([big]), torch.tensor([big + 1]), rtol=0.0
    )
    assert f"a={big}, b={big + 1}, |a-b|=1;" in msg
    testing.assert_trees_all_close(torch.tensor([big]), torch.tensor([big + 1]), atol=1.0, rtol=0)
    # Opposite extremes: the int64 difference overflows; the float64 one is exact enough.
    lo, hi = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
    fails(testing.assert_trees_all_close, torch.tensor([lo]), torch.tensor([hi]), rtol=0.5)
    testing.assert_trees_all_close(torch.tensor([lo]), torch.tensor([hi]), rtol=2.5)


def test_all_equal_message_gives_exact_integer_difference():
    big = 2**62
    msg = fails(testing.assert_trees_all_equal, torch.tensor([big]), torch.tensor([big + 3]))
    assert "|a-b|=3;" in msg  # float64 would say 0


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (complex(nan, 1.0), complex(nan, 2.0)),  # NaN real parts, different imaginary parts
        (complex(1.0, nan), complex(nan, 1.0)),  # NaN in different parts
        (complex(nan, nan), complex(nan, 0.0)),
    ],
)
def test_complex_nans_in_different_places_differ(a, b):
    # A complex number is NaN when either part is: comparing isnan() of whole elements took
    # all of these pairs for "NaN in the same place".
    x, y = torch.tensor([0j, a]), torch.tensor([0j, b])
    assert "1 of 2 elements differ; worst at index (1,)" in fails(
        testing.assert_trees_all_equal, x, y
    )
    assert "1 of 2 elements differ; worst at index (1,)" in fails(
        testing.assert_trees_all_close, x, y, atol=0.1
    )
    # A NaN in the same part with the other part equal (or close) is still a match.
    testing.assert_trees_all_equal(x, x.clone())
    testing.assert_trees_all_close(x, x + 1e-9, atol=1e-6)
    with pytest.raises(AssertionError):
        testing.assert_trees_all_close(x, x.clone(), equal_nan=False)


def test_complex_nan_with_close_other_part_is_close():
    x = torch.tensor([complex(nan, 1.0), complex(2.0, nan)])
    y = torch.tensor([complex(nan, 1.0 + 1e-7), complex(2.0 - 1e-7, nan)])
    testing.assert_trees_all_close(x, y, rtol=1e-6)
    fails(testing.assert_trees_all_close, x, y, rtol=1e-8)


def test_bitwise_reads_lazy_conjugate_and_negative_views():
    # .conj() returns a view with a conjugate bit that view_as_real cannot read: the bitwise
    # comparison used to raise RuntimeError instead of comparing.
    z = torch.tensor([1 + 1j, 2 - 3j])
    testing.assert_trees_all_equal(z.conj(), z.conj().resolve_conj(), bitwise=True)
    msg = fails(testing.assert_trees_all_equal, z.conj(), z, bitwise=True)
    assert "2 of 2 elements differ" in msg and "bitwise equality required" in msg
    neg = torch.tensor([1 + 1j])._neg_view()
    testing.assert_trees_all_equal(neg, torch.tensor([-1 - 1j]), bitwise=True)


def test_probes_that_held_up():
    # Kept as regression guards: each was probed in review and found correct.
    fails(testing.assert_trees_all_close, torch.ones(3), torch.ones(1, 3))  # no broadcasting
    fails(testing.assert_trees_all_equal, torch.ones(3), torch.ones(1, 3))
    fails(testing.assert_trees_all_close, torch.tensor([-inf]), torch.tensor([inf]), atol=inf)
    fails(testing.assert_trees_all_close, torch.tensor([True]), torch.tensor([False]))
    fails(testing.assert_trees_all_close, torch.tensor([0], dtype=torch.uint8), 255)
    fails(testing.assert_trees_all_equal, np.ones(2), torch.ones(2))  # float64 vs float32
    testing.assert_trees_all_close(np.ones(2), torch.ones(2))  # dtypes may differ
    x = torch.arange(12.0).reshape(3, 4)
    testing.assert_trees_all_equal(x.t(), x.t().contiguous(), bitwise=True)
    fails(testing.assert_trees_all_equal, x[:, ::2], x[:, 1::2], bitwise=True)
    fails(testing.assert_tree_all_finite, {"z": torch.tensor([complex(1.0, nan)])})
    # rtol scales |b|, including for negative references.
    testing.assert_trees_all_close(torch.tensor(-9.0), torch.tensor(-10.0), rtol=0.1)


# --------------------------------------------------------------------------------------------
# Structure mismatches name the path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (
            {"p": Pair(torch.ones(1), torch.ones(1))},
            {"p": (torch.ones(1), torch.ones(1))},
            "a['p'] is a Pair but b['p'] is a tuple",
        ),
        (
            {"p": [torch.ones(1)], "q": (torch.ones(1),)},
            {"p": [torch.ones(1)], "q": [torch.ones(1)]},
            "a['q'] is a tuple but b['q'] is a list",
        ),
        (
            {"w": torch.ones(1)},
            {"w": [torch.ones(1)]},
            "a['w'] is a leaf but b['w'] is a list",
        ),
        ({"w": None}, {"w": torch.ones(1)}, "a['w'] is None but b['w'] is a leaf"),
    ],
)
def test_structure_mismatch_names_the_path(a, b, message):
    for assertion in (testing.assert_trees_all_close, testing.assert_trees_all_equal_structs):
        assert fails(assertion, a, b) == f"tree structures differ: {message}"


def test_missing_subtree_and_list_length_name_the_path():
    a = {"fc": {"w": torch.ones(1), "b": torch.ones(1)}}
    b = {"fc": {"w": torch.ones(1)}}
    assert "a['fc']['b'] has no counterpart in b" in fails(testing.assert_trees_all_close, a, b)
    assert "b['fc']['b'] has no counterpart in a" in fails(testing.assert_trees_all_close, b, a)
    assert "b[0][2] has no counterpart in a" in fails(
        testing.assert_trees_all_equal, [[1, 2]], [[1, 2, 3]]
    )


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def test_assert_shape_ellipsis_as_in_chex():
    testing.assert_shape([torch.ones(3), torch.ones(2, 5, 3)], (..., 3))
    testing.assert_shape(torch.ones(2, 5, 3), (2, ..., 3))
    testing.assert_shape(torch.ones(()), (...,))
    testing.assert_shape(torch.ones(2, 4), (None, ..., {3, 4}))
    assert fails(testing.assert_shape, torch.ones(3, 2), (..., 3)) == (
        "tensor 0 has shape (3, 2), expected (..., 3)"
    )
    fails(testing.assert_shape, torch.ones(3), (3, ..., 3))  # both ends need their own dims
    with pytest.raises(ValueError, match="at most one"):
        testing.assert_shape(torch.ones(3), (..., 3, ...))


# --------------------------------------------------------------------------------------------
# Compile counting (probes that held up, kept as guards)
# --------------------------------------------------------------------------------------------


def test_trace_limit_is_not_swallowed_by_a_graph_break_fallback():
    # Without fullgraph, an exception while tracing could make dynamo fall back to eager and
    # hide the failure; the over-limit retrace must still raise.
    def step(x, k):
        return x * k

    checked = testing.assert_max_traces(step, n=1)
    compiled = torch.compile(checked, backend="eager")
    with testing.count_compiles() as outer, testing.count_compiles() as inner:
        compiled(torch.ones(2), torch.tensor(2.0))
        with pytest.raises(AssertionError, match="traced 2 times, at most 1 allowed"):
            compiled(torch.ones(2, 2), torch.tensor(2.0))  # a new rank: retrace
    assert checked.traces == 2
    assert outer.compiles == inner.compiles >= 2  # nested counters each see every compile
