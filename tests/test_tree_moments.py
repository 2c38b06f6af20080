"""``ft.tree`` moments (``update_moment``, ``…_per_elem_norm``, ``update_infinity_moment``,
``bias_correction``) and ``min``, ``conj``, ``real``, ``dtype``, ``cast_like``, ``batch_shape``.

References are optax's formulas computed by hand in Python double precision.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

F64 = torch.float64
VALUES = st.lists(st.floats(-100, 100, allow_nan=False, width=64), min_size=1, max_size=6)
DECAY = st.floats(0.0, 0.9999)


def _pairs(data: st.DataObject) -> tuple[list[float], list[float]]:
    g = data.draw(VALUES)
    m = data.draw(st.lists(st.floats(0, 100), min_size=len(g), max_size=len(g)))
    return g, m


@given(st.data(), DECAY, st.sampled_from([1, 2, 3, 4]), st.booleans())
def test_update_moment_matches_hand_formula(data, decay, order, tensor_decay):
    g, m = _pairs(data)
    d = torch.tensor(decay, dtype=F64) if tensor_decay else decay
    out = ft.tree.update_moment(
        {"a": torch.tensor(g, dtype=F64), "n": None},
        {"a": torch.tensor(m, dtype=F64), "n": None},
        d,
        order,
    )
    expected = [(1 - decay) * gi**order + decay * mi for gi, mi in zip(g, m)]
    assert out["n"] is None
    testing.assert_trees_all_close(
        out["a"], torch.tensor(expected, dtype=F64), rtol=1e-13, atol=1e-13
    )


@given(st.data(), DECAY, st.sampled_from([1, 2, 3, 2.5]))
def test_update_moment_per_elem_norm_complex_and_real(data, decay, order):
    g, m = _pairs(data)
    im = data.draw(st.lists(st.floats(-100, 100), min_size=len(g), max_size=len(g)))
    z = torch.tensor([complex(a, b) for a, b in zip(g, im)], dtype=torch.complex128)
    out = ft.tree.update_moment_per_elem_norm(
        [z, torch.tensor(g, dtype=F64)], [torch.tensor(m, dtype=F64)] * 2, decay, order
    )
    want_c = [(1 - decay) * abs(complex(a, b)) ** order + decay * mi for a, b, mi in zip(g, im, m)]
    assert out[0].dtype == F64
    testing.assert_trees_all_close(out[0], torch.tensor(want_c, dtype=F64), rtol=1e-12, atol=1e-12)
    if order != 2.5:  # real: g**order, signed for odd orders (a fractional power of g < 0 is NaN)
        want_r = [(1 - decay) * gi**order + decay * mi for gi, mi in zip(g, m)]
        testing.assert_trees_all_close(
            out[1], torch.tensor(want_r, dtype=F64), rtol=1e-12, atol=1e-12
        )


@given(st.data(), DECAY, st.floats(0, 1e-3))
def test_update_infinity_moment_matches_hand_formula(data, decay, eps):
    g, m = _pairs(data)
    out = ft.tree.update_infinity_moment(
        [torch.tensor(g, dtype=F64)], [torch.tensor(m, dtype=F64)], decay, eps
    )
    expected = [max(abs(gi) + eps, decay * mi) for gi, mi in zip(g, m)]
    testing.assert_trees_all_close(out[0], torch.tensor(expected, dtype=F64), rtol=0, atol=0)


def test_infinity_moment_propagates_nan_and_keeps_none():
    out = ft.tree.update_infinity_moment(
        [torch.tensor([math.nan, 1.0]), None], [torch.tensor([0.0, math.nan]), None], 0.9, 0.0
    )
    assert out[1] is None and bool(torch.isnan(out[0]).all())


def test_zero_dim_tensor_decay_does_not_promote_a_zero_dim_leaf():
    d = torch.tensor(0.9, dtype=F64)
    g, m = {"s": torch.tensor(2.0)}, {"s": torch.tensor(1.0)}
    for fn in (ft.tree.update_moment, ft.tree.update_moment_per_elem_norm):
        assert fn(g, m, d, 2)["s"].dtype == torch.float32
    assert ft.tree.update_infinity_moment(g, m, d, d)["s"].dtype == torch.float32


@given(st.floats(0.5, 0.9999), st.integers(1, 10_000))
def test_bias_correction_float64_int32_count(decay, count):
    c = torch.tensor(count, dtype=torch.int32)
    out = ft.tree.bias_correction({"m": torch.tensor([1.0, -3.0], dtype=F64)}, decay, c)
    bc = 1 - decay**count
    testing.assert_trees_all_close(
        out["m"], torch.tensor([1.0 / bc, -3.0 / bc], dtype=F64), rtol=1e-12, atol=0
    )


def test_bias_correction_bfloat16_stays_bfloat16_and_finite():
    # In bfloat16, 0.999 rounds to 1.0 and 1 - 0.999**1 would be 0; the power is taken in
    # float32 and only 1 - decay**count rounded to bfloat16.
    m = torch.tensor([0.001], dtype=torch.bfloat16)
    out = ft.tree.bias_correction([m, None], torch.tensor(0.999), torch.tensor(1))
    assert out[0].dtype == torch.bfloat16 and out[1] is None
    assert abs(float(out[0]) - 1.0) < 0.02


def test_min():
    tree = {
        "a": torch.tensor([1.0, 5.0]),
        "b": torch.tensor([-3], dtype=torch.int64),
        "e": torch.ones(0),
    }
    assert ft.tree.min(tree).item() == -3.0 and ft.tree.min(tree).dtype == torch.float32
    assert math.isnan(ft.tree.min([torch.tensor([math.nan, 1.0])]).item())
    with pytest.raises(ValueError, match="without elements"):
        ft.tree.min({"e": torch.ones(0), "n": None})


def test_conj_and_real_are_new_memory():
    z = torch.tensor([1.0 + 2.0j, -3.0 - 4.0j])
    c = ft.tree.conj({"z": z, "r": torch.ones(1)})
    assert not c["z"].is_conj() and c["z"].numpy().tolist() == [1.0 - 2.0j, -3.0 + 4.0j]
    r = ft.tree.real([z, None])
    assert r[1] is None and r[0].dtype == torch.float32 and r[0].is_contiguous()
    r[0].add_(10.0)
    assert z.real.tolist() == [1.0, -3.0]


def test_dtype_handlers_and_errors():
    tree = {"a": torch.ones(1, dtype=torch.float16), "b": {"c": torch.ones(1, dtype=F64)}}
    with pytest.raises(ValueError, match=r"tree\['b'\]\['c'\] is torch.float64"):
        ft.tree.dtype(tree)
    assert ft.tree.dtype(tree, "promote") == F64
    assert ft.tree.dtype(tree, "highest") == F64
    assert ft.tree.dtype(tree, "lowest") == torch.float16
    assert ft.tree.dtype({"n": None}) == torch.get_default_dtype()
    mixed = [torch.ones(1, dtype=torch.float16), torch.ones(1, dtype=torch.bfloat16)]
    assert ft.tree.dtype(mixed, "promote") == torch.float32
    with pytest.raises(ValueError, match="neither promotes"):
        ft.tree.dtype(mixed, "highest")
    with pytest.raises(ValueError, match="mixed_dtype_handler='max'"):
        ft.tree.dtype(mixed, "max")


def test_cast_like():
    tree = {"i": torch.tensor([1.7]), "k": torch.tensor([2.0]), "n": None}
    other = {"i": torch.zeros(1, dtype=torch.int32), "k": None, "n": None}
    out = ft.tree.cast_like(tree, other)
    assert out["i"].dtype == torch.int32 and out["i"].item() == 1
    assert out["k"] is tree["k"] and out["n"] is None
    with pytest.raises(ft.tree.TreeMismatchError, match="'x'"):
        ft.tree.cast_like({"x": torch.ones(1)}, {"y": torch.ones(1)})


def test_batch_shape_copies():
    x = torch.tensor([1.0, 2.0])
    out = ft.tree.batch_shape({"x": x, "s": torch.tensor(3.0), "n": None}, (2, 3))
    assert out["x"].shape == (2, 3, 2) and out["s"].shape == (2, 3) and out["n"] is None
    assert out["x"].tolist() == [[[1.0, 2.0]] * 3] * 2
    out["x"][0, 0, 0] = 9.0  # writable, and x does not change
    assert x.tolist() == [1.0, 2.0] and out["x"][1, 1, 0].item() == 1.0
    assert ft.tree.batch_shape([x])[0] is not x
