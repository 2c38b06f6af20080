"""Second adversarial review of ``functrain.testing``: differences an assertion let through.

Each case is a pair of trees that differ under the documented rule ``|a-b| <= atol + rtol*|b|``
(worked out by hand with Python integers here), or a compile count that missed a recompile.
"""

from __future__ import annotations

import pytest
import torch

from functrain import testing

nan, inf = float("nan"), float("inf")


def fails(fn, *args, **kwargs) -> str:
    """Runs an assertion expected to fail and returns its message."""
    with pytest.raises(AssertionError) as err:
        fn(*args, **kwargs)
    return str(err.value)


# --------------------------------------------------------------------------------------------
# Integers beyond float64's 2**53 beside floats, and uint64
# --------------------------------------------------------------------------------------------


def test_uint64_beyond_int64_differences_are_exact():
    # float64 rounds 2**63 + 1 to 2**63: the two leaves passed with rtol=0.
    a = torch.tensor([2**63, 5], dtype=torch.uint64)
    b = torch.tensor([2**63 + 1, 5], dtype=torch.uint64)
    msg = fails(testing.assert_trees_all_close, a, b, rtol=0)
    assert "1 of 2 elements differ" in msg and "|a-b|=1;" in msg
    msg = fails(testing.assert_trees_all_equal, a, b)
    assert "|a-b|=1;" in msg
    testing.assert_trees_all_close(a, b, rtol=0, atol=1)
    top = torch.tensor([2**64 - 1], dtype=torch.uint64)
    below = torch.tensor([2**64 - 2], dtype=torch.uint64)
    assert "|a-b|=1;" in fails(testing.assert_trees_all_close, top, below, rtol=0)


def test_int64_beside_an_integral_float_is_compared_exactly():
    # 2**62 + 1 (int64) against 2.0**62 (float32) differ by exactly 1.
    a, b = torch.tensor([2**62 + 1]), torch.tensor([2.0**62])
    assert "|a-b|=1;" in fails(testing.assert_trees_all_close, a, b, rtol=0)
    assert "|a-b|=1;" in fails(testing.assert_trees_all_close, b, a, rtol=0)
    testing.assert_trees_all_close(a, b, rtol=0, atol=1)
    testing.assert_trees_all_close(torch.tensor([2**62]), b, rtol=0)
    # Mixed with a NaN elsewhere in the leaf, the exact difference still decides.
    a2 = torch.tensor([2**62 + 1, 0])
    b2 = torch.tensor([2.0**62, nan], dtype=torch.float64)
    fails(testing.assert_trees_all_close, a2, b2, rtol=0)


def test_non_finite_floats_beside_integers_still_fail():
    fails(testing.assert_trees_all_close, torch.tensor([1]), torch.tensor([inf]), atol=1e300)
    fails(testing.assert_trees_all_close, torch.tensor([1]), torch.tensor([nan]))


@pytest.mark.parametrize(("rtol", "atol"), [(-1.0, 5.0), (0.0, -1.0), (nan, 0.0), (0.0, nan)])
def test_negative_or_nan_tolerance_is_an_error(rtol, atol):
    # rtol=-1, atol=5 accepted |1-2| (5 - 2 >= 1); torch.isclose refuses negative tolerances.
    with pytest.raises(ValueError, match="non-negative"):
        testing.assert_trees_all_close(
            torch.tensor([1.0]), torch.tensor([2.0]), rtol=rtol, atol=atol
        )


# --------------------------------------------------------------------------------------------
# A recompile refused by recompile_limit is still a recompile
# --------------------------------------------------------------------------------------------


def test_recompile_refused_by_the_limit_is_counted():
    # Past the limit dynamo runs the frame eagerly and starts no compilation: count_compiles
    # said 1 and assert_max_compiles(1) passed code that asked to recompile on every call.
    f = torch.compile(lambda x, s: x * s, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1), testing.count_compiles() as count:
        for s in (0.1, 0.2, 0.3):
            f(torch.ones(2), s)
    assert count.compiles == 2
    assert any("recompile_limit" in r for r in count.reasons)
    g = torch.compile(lambda x, s: x * s, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(AssertionError):
        with testing.assert_max_compiles(1):
            for s in (0.1, 0.2):
                g(torch.ones(2), s)
    h = testing.assert_max_traces(torch.compile(lambda x, s: x * s, backend="eager"), n=1)
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(AssertionError):
        for s in (0.1, 0.2):
            h(torch.ones(2), s)


def test_no_recompile_counts_one():
    f = torch.compile(lambda x, s: x * s, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1), testing.count_compiles() as count:
        for s in (0.1, 0.2):
            f(torch.ones(2), torch.tensor(s))
    assert (count.compiles, count.reasons) == (1, [])


# --------------------------------------------------------------------------------------------
# Probes that held up (kept as guards)
# --------------------------------------------------------------------------------------------


def test_probes_that_held_up():
    t = torch.tensor
    testing.assert_trees_all_close(t([-0.0]), t([0.0]), rtol=0)  # -0.0 == 0.0, as in chex
    fails(testing.assert_trees_all_close, t([nan]), t([nan]), equal_nan=False)
    fails(testing.assert_trees_all_close, [t(1.0)], (t(1.0),))  # list vs tuple
    testing.assert_trees_all_equal({"a": t(1), "b": t(2)}, {"b": t(2), "a": t(1)})
    testing.assert_trees_all_equal({1: t(1), "a": t(2)}, {"a": t(2), 1: t(1)})
    fails(testing.assert_trees_all_equal, {1: t(1), "a": t(2)}, {"a": t(1), 1: t(2)})
    fails(testing.assert_trees_all_close, torch.ones(0, 3), torch.ones(3, 0))
    fails(testing.assert_trees_all_close, 1.0, t([1.0]))  # () vs (1,)
    fails(testing.assert_trees_all_close, t([1.0]), t([complex(1.0, 1e-3)]))
    fails(testing.assert_trees_all_close, t([complex(inf, nan)]), t([complex(-inf, nan)]))
    fails(testing.assert_trees_all_equal, t([1.0]), t([1.0], dtype=torch.float64))
    testing.assert_trees_all_close(t([1.0]), t([1.0], dtype=torch.float64), rtol=0)
    f8 = torch.float8_e4m3fn
    fails(testing.assert_trees_all_equal, t([1.0]).to(f8), t([2.0]).to(f8))
    fails(testing.assert_trees_all_close, torch.ones(2, requires_grad=True), torch.ones(2) * 2)
    with pytest.raises(NotImplementedError):  # meta tensors hold no values to compare
        testing.assert_trees_all_close(torch.ones(1, device="meta"), torch.ones(1, device="meta"))
    fails(testing.assert_tree_on_device, [torch.ones(1, device="meta")], "cpu")
