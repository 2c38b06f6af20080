"""Review of the low-level helpers every transform uses (``_ops``, ``_utils``, ``_precision``).

References are hand computations: ``torch.promote_types`` tables, optax's
``safe_int32_increment`` (``jnp.where(count < int32_max, count + 1, int32_max)``) written out
in Python integers, and ``torch.optim.Adam`` for NumPy-scalar hyperparameters.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft
from functrain import _precision
from functrain.optim import _ops, _utils

INT32_MAX = 2**31 - 1
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
COMPLEX = [torch.complex64, torch.complex128]
INTS = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
ALL = FLOATS + COMPLEX + INTS


# --- construction-time checks -------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [np.float32(0.1), np.float16(0.25), np.float64(0.1), np.int64(2), np.uint8(3)]
)
def test_check_finite_number_accepts_numpy_real_scalars(value):
    _utils.check_finite_number("lr", value, minimum=0.0)  # was TypeError "must be a number"


@pytest.mark.parametrize("value", [np.float32(0.9), np.float16(0.5), np.float64(0.9), np.int64(0)])
def test_check_decay_accepts_numpy_real_scalars(value):
    _ops.check_decay("b1", value)


@pytest.mark.parametrize("value", [np.float32("nan"), np.float32("inf"), np.float16("-inf")])
def test_check_finite_number_refuses_numpy_non_finite(value):
    with pytest.raises(ValueError, match="lr must be finite"):
        _utils.check_finite_number("lr", value)


@pytest.mark.parametrize("value", [np.float32("nan"), np.float32(1.0), np.int64(-1)])
def test_check_decay_refuses_numpy_out_of_range(value):
    with pytest.raises(ValueError, match=r"b1 must be in \[0, 1\)"):
        _ops.check_decay("b1", value)


@pytest.mark.parametrize("value", [True, False, np.True_, np.False_])
def test_check_decay_refuses_booleans(value):
    # b1=True silently meant a decay of 1: a bias correction 1 - 1**t = 0, NaN updates.
    with pytest.raises(TypeError, match="b1 must be a number"):
        _ops.check_decay("b1", value)


@pytest.mark.parametrize("kw", [{"b1": True}, {"b2": True}])
def test_adam_refuses_boolean_decay(kw):
    with pytest.raises(TypeError, match="must be a number"):
        ft.adam(0.1, **kw)


@pytest.mark.parametrize("value", [True, np.True_, np.array(0.1), "0.1", 1j, None])
def test_check_finite_number_refuses_non_numbers(value):
    with pytest.raises(TypeError, match="lr must be a number, a tensor or a schedule"):
        _utils.check_finite_number("lr", value)


@pytest.mark.parametrize(
    "value",
    [10**400, -(10**400), 2**63, -(2**63) - 1, np.uint64(2**63)],
    ids=["1e400", "-1e400", "2**63", "-2**63-1", "uint64-2**63"],
)
def test_check_finite_number_refuses_integers_torch_cannot_take(value):
    # 10**400 passed and the first update raised OverflowError converting it.
    with pytest.raises(ValueError, match="beyond int64's range"):
        _utils.check_finite_number("lr", value)


def test_sgd_huge_integer_learning_rate_refused_at_construction():
    with pytest.raises(ValueError, match=r"learning_rate=1000.*… is an integer beyond"):
        ft.sgd(10**400)


@pytest.mark.parametrize("value", [2**63 - 1, -(2**63), 0, -0.0, 1e308, np.int64(2**62)])
def test_check_finite_number_boundaries_accepted(value):
    _utils.check_finite_number("x", value)


def test_check_finite_number_minimum_boundary():
    _utils.check_finite_number("eps", 0.0, minimum=0.0)
    _utils.check_finite_number("eps", -0.0, minimum=0.0)  # -0.0 == 0.0
    with pytest.raises(ValueError, match=r"eps must be >= 0\.0"):
        _utils.check_finite_number("eps", -5e-324, minimum=0.0)
    with pytest.raises(ValueError, match=r"eps must be >= 0\.0"):
        _utils.check_finite_number("eps", np.float32(-1e-30), minimum=0.0)


@pytest.mark.parametrize("dtype", ALL)
def test_check_finite_number_skips_tensors_without_reading_them(dtype):
    value = torch.zeros((), dtype=dtype)
    with _NoHostReads():
        _utils.check_finite_number("lr", value, minimum=0.0)
        _utils.check_finite_number("lr", torch.empty((), device="meta"), minimum=0.0)
        _ops.check_decay("b1", torch.empty((), device="meta"))


def test_adam_numpy_hyperparameters_match_torch_optim():
    lr, b1, b2, eps = np.float32(0.01), np.float32(0.8), np.float16(0.99), np.float32(1e-6)
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(3)]
    tx = ft.adam(lr, b1=b1, b2=b2, eps=eps)
    params, state = {"p": p.clone()}, tx.init({"p": p})
    ref = p.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=float(lr), betas=(float(b1), float(b2)), eps=float(eps))
    for g in grads:
        u, state = tx.update({"p": g}, state, params)
        params = {"p": params["p"] + u["p"]}
        ref.grad = g.clone()
        opt.step()
    torch.testing.assert_close(params["p"], ref.detach(), rtol=1e-12, atol=1e-12)


# --- counters -----------------------------------------------------------------------------


def _optax_safe_int32_increment(count: int) -> int:
    return count + 1 if count < INT32_MAX else INT32_MAX


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("count", [0, 1, INT32_MAX - 2, INT32_MAX - 1, INT32_MAX])
def test_safe_increment_is_optax_safe_int32_increment(dtype, count):
    out = _utils.safe_increment(torch.tensor(count, dtype=dtype))
    assert out.dtype == dtype and out.shape == ()
    assert int(out) == _optax_safe_int32_increment(count)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8])
def test_safe_increment_narrow_counts_saturate_instead_of_wrapping(dtype):
    top = torch.iinfo(dtype).max
    out = _utils.safe_increment(torch.tensor(top, dtype=dtype))
    assert out.dtype == dtype and int(out) == top  # was the dtype's minimum (or 0)
    assert int(_utils.safe_increment(torch.tensor(top - 1, dtype=dtype))) == top


def test_safe_increment_meta_and_batched():
    out = _utils.safe_increment(torch.zeros((), dtype=torch.int32, device="meta"))
    assert out.device.type == "meta" and out.dtype == torch.int32
    counts = torch.tensor([0, INT32_MAX - 1, INT32_MAX], dtype=torch.int32)
    assert _utils.safe_increment(counts).tolist() == [1, INT32_MAX, INT32_MAX]


def test_zero_count_and_default_device():
    for empty in ({}, [], (), None, {"a": None}):
        assert _utils.default_device(empty) == torch.device("cpu")
        count = _utils.zero_count(empty)
        assert count.dtype == torch.int32 and count.shape == () and count.device.type == "cpu"
    meta = _utils.zero_count({"w": torch.empty(3, device="meta")})
    assert meta.device.type == "meta" and meta.dtype == torch.int32


# --- dtype helpers (against torch's own promotion) ----------------------------------------

_dtype = st.sampled_from(ALL)


def _ref_float_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    floats = [d for d in dtypes if d.is_floating_point]
    if not floats:
        return torch.float32
    return functools.reduce(torch.promote_types, floats)


@settings(max_examples=200, deadline=None)
@given(st.lists(_dtype, max_size=6))
def test_float_dtype_is_promote_types_of_the_floating_leaves(dtypes):
    leaves = [torch.zeros((), dtype=d) for d in dtypes]
    assert _utils.float_dtype(leaves) == _ref_float_dtype(dtypes)
    metas = [torch.empty(2, dtype=d, device="meta") for d in dtypes]
    assert _utils.float_dtype(metas) == _ref_float_dtype(dtypes)


@settings(max_examples=100, deadline=None)
@given(_dtype)
def test_real_dtype_widen_and_accumulation_dtype(dtype):
    x = torch.zeros(2, dtype=dtype)
    expected_real = x.real.dtype if dtype.is_complex else dtype
    assert _ops.real_dtype(dtype) == expected_real
    widened = _precision.widen(x)
    assert widened.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    assert (widened is x) == (dtype not in (torch.float16, torch.bfloat16))
    acc = _precision.accumulation_dtype(dtype)
    assert acc == torch.result_type(x, torch.zeros((), dtype=torch.float32).expand(2))
    assert _ops.scalar_dtype([x]) == torch.float64


@settings(max_examples=100, deadline=None)
@given(st.lists(_dtype, max_size=5))
def test_widen_all_returns_the_same_list_without_half_leaves(dtypes):
    xs = [torch.zeros(1, dtype=d) for d in dtypes]
    out = _precision.widen_all(xs)
    if not any(d in (torch.float16, torch.bfloat16) for d in dtypes):
        assert out is xs
    assert [t.dtype for t in out] == [
        torch.float32 if d in (torch.float16, torch.bfloat16) else d for d in dtypes
    ]


# --- no host reads in the update-path helpers ---------------------------------------------

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}
PY_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.__complex__,
}


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            raise AssertionError(f"host read of a tensor: {func}")
        return func(*args, **(kwargs or {}))


class _NoPyReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in PY_READS:
            raise AssertionError(f"host read of a tensor: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("s_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("leaf_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_update_path_helpers_read_no_tensor_scalar(s_dtype, leaf_dtype):
    gen = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(3, generator=gen).to(leaf_dtype),
        torch.randn((), generator=gen).to(leaf_dtype),
    ]
    ys = [
        torch.randn_like(
            x.float(),
        ).to(leaf_dtype)
        for x in xs
    ]
    cs = [torch.randn(2, dtype=torch.complex64, generator=gen)]
    s = torch.tensor(0.9, dtype=s_dtype)
    count = torch.tensor(3, dtype=torch.int32)
    with _NoHostReads(), _NoPyReads():
        for fn in (_ops.mul, _ops.div, _ops.add):
            out = fn(xs, s)
            assert [o.dtype for o in out] == [leaf_dtype] * 2
        _ops.add_scaled(xs, s, ys)
        _ops.add_([x.clone() for x in xs], s)
        _ops.lerp(xs, ys, s)
        _ops.lerp_([x.clone() for x in xs], ys, s)
        _ops.moment(ys, xs, s)
        _ops.moment_sq(ys, xs, s)
        _ops.moment_sq(cs, cs, s)
        _ops.scaled_square(xs, s)
        _ops.scalar(s, xs[0])
        _ops.add_abs_sq(xs, ys)
        _ops.sub_abs_sq(xs, ys)
        _ops.maximum(xs, ys)
        _ops.sign(xs + cs)
        new = _utils.safe_increment(count)
        _utils.power(s, new, _ops.scalar_dtype(xs))
        _utils.power(0.9, new, _ops.scalar_dtype(xs))
        _utils.resolve(lambda c: 0.1 * c, new)
        _utils.float_dtype(xs)
        _utils.flat(xs, {"mu": ys})
        _precision.widen_all(xs)


def test_numpy_hyperparameters_take_the_fused_kernel_bitwise_as_python_floats():
    # NumPy float32 scalars were not "numbers" to the fused engines: another engine, and
    # last-bit differences from the same run with Python floats.
    import numpy as np

    from functrain.optim import fused

    params = [torch.randn(5, 3, generator=torch.Generator().manual_seed(0))]
    grads = [torch.randn(5, 3, generator=torch.Generator().manual_seed(1))]
    results = []
    for lr, wd in ((0.5, 0.25), (np.float32(0.5), np.float32(0.25))):  # exact in float32
        tx = ft.adamw(lr, weight_decay=wd)
        p = [x.clone() for x in params]
        done = fused.update_in_place(tx, [g.clone() for g in grads], tx.init(p), p)
        assert done is not None and done.engine == "kernel", done
        results.append(p[0])
    assert torch.equal(results[0], results[1])
