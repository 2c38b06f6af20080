"""``functrain.assignment``: optax's Hungarian algorithms, against scipy and brute force.

References: ``scipy.optimize.linear_sum_assignment`` (an independent C++ implementation of
Crouse's algorithm) for the optimal cost, and, on matrices of continuous random costs (a unique
optimum with probability 1), for the matching itself; an enumeration of every matching on
matrices up to 6 × 6; the pair orders and the two worked examples of optax's docstrings.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from functrain import assignment

FNS = [assignment.hungarian_algorithm, assignment.base_hungarian_algorithm]
IDS = ["hungarian", "base"]


def scipy_cost(costs: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(costs)
    return float(costs[rows, cols].sum())


def brute_force_cost(costs: np.ndarray) -> float:
    """The minimum over every matching of ``min(n, m)`` pairs (n!/(n-r)! of them)."""
    n, m = costs.shape
    if n > m:
        costs, n, m = costs.T, m, n
    if n == 0:
        return 0.0
    return min(
        float(sum(costs[i, cols[i]] for i in range(n)))
        for cols in itertools.permutations(range(m), n)
    )


def check_matching(i: torch.Tensor, j: torch.Tensor, shape: tuple[int, int]) -> None:
    """Two int64 index vectors of length min(n, m), in range, no row or column twice."""
    r = min(shape)
    assert i.dtype == torch.int64 and j.dtype == torch.int64
    assert i.shape == (r,) and j.shape == (r,)
    assert len(set(i.tolist())) == r and len(set(j.tolist())) == r
    assert all(0 <= a < shape[0] for a in i.tolist())
    assert all(0 <= b < shape[1] for b in j.tolist())


def matrices(elements: st.SearchStrategy, max_side: int = 8) -> st.SearchStrategy:
    return st.tuples(st.integers(0, max_side), st.integers(0, max_side)).flatmap(
        lambda s: st.lists(elements, min_size=s[0] * s[1], max_size=s[0] * s[1]).map(
            lambda v: np.array(v, dtype=np.float64).reshape(s)
        )
    )


FLOATS = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
SMALL_INTS = st.integers(-3, 3)  # many ties


@pytest.mark.parametrize("fn", FNS, ids=IDS)
@given(costs=matrices(FLOATS))
def test_optimal_cost_matches_scipy(fn, costs):
    i, j = fn(torch.tensor(costs))
    check_matching(i, j, costs.shape)
    got = float(costs[i.numpy(), j.numpy()].sum())
    assert got == pytest.approx(scipy_cost(costs), rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("fn", FNS, ids=IDS)
@given(costs=matrices(SMALL_INTS))
def test_ties_and_integers_match_scipy(fn, costs):
    as_int = torch.tensor(costs, dtype=torch.int64)
    i, j = fn(as_int)
    check_matching(i, j, costs.shape)
    assert int(as_int[i, j].sum()) == round(scipy_cost(costs))


@pytest.mark.parametrize("fn", FNS, ids=IDS)
@given(costs=matrices(st.integers(-20, 20), max_side=6))
def test_brute_force_on_small_matrices(fn, costs):
    i, j = fn(torch.tensor(costs, dtype=torch.float32))
    check_matching(i, j, costs.shape)
    assert float(costs[i.numpy(), j.numpy()].sum()) == brute_force_cost(costs)


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_seeded_sweep_matches_scipy(fn):
    """400 seeded matrices (continuous and tie-heavy integer, every shape up to 9 × 9): wrong
    dual potentials stay optimal on most small matrices, so breadth is needed to catch them."""
    rng = np.random.default_rng(2024)
    for trial in range(400):
        n, m = rng.integers(1, 10, size=2)
        costs = rng.normal(size=(n, m)) if trial % 2 else rng.integers(0, 3, (n, m)) * 1.0
        i, j = fn(torch.tensor(costs))
        check_matching(i, j, costs.shape)
        got = float(costs[i.numpy(), j.numpy()].sum())
        assert got == pytest.approx(scipy_cost(costs), abs=1e-9), (trial, costs)


@given(costs=matrices(SMALL_INTS))
def test_base_breaks_ties_as_scipy(costs):
    """scipy implements the same algorithm (Crouse 2016) with the same scan order and
    tie-breaking, so even among many optimal matchings base picks scipy's."""
    rows, cols = linear_sum_assignment(costs)
    i, j = assignment.base_hungarian_algorithm(torch.tensor(costs))
    assert i.tolist() == rows.tolist() and j.tolist() == cols.tolist()


@pytest.mark.parametrize("shape", [(5, 5), (3, 7), (7, 3), (1, 6), (6, 1)])
def test_base_matches_scipy_pairs_exactly(shape):
    """Continuous costs have a unique optimum, and base orders its pairs as scipy: by row."""
    gen = torch.Generator().manual_seed(sum(shape))
    costs = torch.randn(shape, dtype=torch.float64, generator=gen)
    rows, cols = linear_sum_assignment(costs.numpy())
    i, j = assignment.base_hungarian_algorithm(costs)
    assert i.tolist() == rows.tolist() and j.tolist() == cols.tolist()


@pytest.mark.parametrize("shape", [(6, 6), (3, 7), (7, 3)])
def test_hungarian_pairs_and_optax_order(shape):
    """The same pairs as scipy; ordered as optax: by column (square), by decreasing row (wide),
    by decreasing column (tall)."""
    gen = torch.Generator().manual_seed(10 + sum(shape))
    costs = torch.randn(shape, dtype=torch.float64, generator=gen) * 100
    rows, cols = linear_sum_assignment(costs.numpy())
    i, j = assignment.hungarian_algorithm(costs)
    assert set(zip(i.tolist(), j.tolist())) == set(zip(rows.tolist(), cols.tolist()))
    n, m = shape
    if n == m:
        assert j.tolist() == list(range(n))
    elif n < m:
        assert i.tolist() == list(range(n))[::-1]
    else:
        assert j.tolist() == list(range(m))[::-1]


def test_optax_docstring_examples():
    """The costs and, for base, the indices printed in optax 0.2.8's docstrings."""
    tall = torch.tensor([[8, 4, 7], [5, 2, 3], [9, 6, 7], [9, 4, 8]])
    five = torch.tensor(
        [[90, 80, 75, 70], [35, 85, 55, 65], [125, 95, 90, 95], [45, 110, 95, 115],
         [50, 100, 90, 100]]
    )  # fmt: skip
    for fn in FNS:
        i, j = fn(tall)
        assert int(tall[i, j].sum()) == 15
        i, j = fn(five)
        assert int(five[i, j].sum()) == 265
    i, j = assignment.base_hungarian_algorithm(tall)
    assert (i.tolist(), j.tolist()) == ([0, 1, 3], [0, 2, 1])
    i, j = assignment.base_hungarian_algorithm(five)
    assert (i.tolist(), j.tolist()) == ([0, 1, 2, 3], [3, 2, 1, 0])


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_negative_and_offset_costs(fn):
    """Adding a constant to every entry (or negating a maximisation) keeps the optimum."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 9, dtype=torch.float64, generator=gen)
    for costs in (base - 1e6, -base, base * 1e-9):
        i, j = fn(costs)
        check_matching(i, j, (6, 9))
        assert float(costs[i, j].sum()) == pytest.approx(scipy_cost(costs.numpy()), rel=1e-12)


@pytest.mark.parametrize("fn", FNS, ids=IDS)
@pytest.mark.parametrize("shape", [(0, 0), (0, 4), (4, 0)])
def test_empty(fn, shape):
    i, j = fn(torch.zeros(shape))
    assert i.shape == (0,) and j.shape == (0,)
    assert i.dtype == torch.int64 and j.dtype == torch.int64


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_inputs_and_output_device(fn):
    """Lists, NumPy arrays and half-precision tensors are accepted; CPU in, CPU out."""
    lists = [[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]
    for costs in (lists, np.array(lists), torch.tensor(lists, dtype=torch.float16)):
        i, j = fn(costs)
        assert i.device.type == "cpu"
        assert sum(lists[a][b] for a, b in zip(i.tolist(), j.tolist())) == 5.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_indices_on_the_input_device(fn):
    costs = torch.randn(5, 7, device="cuda", generator=None)
    i, j = fn(costs)
    assert i.device == costs.device and j.device == costs.device
    assert float(costs[i, j].sum()) == pytest.approx(scipy_cost(costs.double().cpu().numpy()))


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_inf_forbids_pairs(fn):
    inf = math.inf
    costs = np.array([[1.0, inf, 3.0], [inf, inf, 1.0], [2.0, 5.0, inf]])
    i, j = fn(torch.tensor(costs))
    assert float(costs[i.numpy(), j.numpy()].sum()) == scipy_cost(costs) == 7.0


@pytest.mark.parametrize("fn", FNS, ids=IDS)
@pytest.mark.parametrize(
    "costs",
    [
        [[math.inf, math.inf], [1.0, 2.0]],  # row 0 cannot be matched
        [[math.inf, math.inf], [math.inf, math.inf]],
        [[1.0, math.inf, math.inf], [2.0, math.inf, math.inf]],  # two rows, one usable column
    ],
)
def test_infeasible_raises_as_scipy(fn, costs):
    with pytest.raises(ValueError, match="infeasible"):
        linear_sum_assignment(np.array(costs))
    with pytest.raises(ValueError, match="infeasible"):
        fn(torch.tensor(costs))


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_bad_inputs(fn):
    with pytest.raises(ValueError, match="NaN or -inf"):
        fn(torch.tensor([[math.nan, 1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="NaN or -inf"):
        fn(torch.tensor([[-math.inf, 1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"2-d.*\(2, 2, 2\)"):
        fn(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match=r"2-d.*\(3,\)"):
        fn(torch.zeros(3))
    with pytest.raises(TypeError, match="real"):
        fn(torch.zeros(2, 2, dtype=torch.complex64))


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_does_not_modify_input(fn):
    costs = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    before = costs.clone()
    fn(costs)
    assert torch.equal(costs, before)
