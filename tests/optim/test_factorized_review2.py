"""Second review of Adafactor's pieces, ``trace`` and ``ema`` against optax's formulas.

Every reference is written by hand in float64 from optax's source (``factorized.py``,
``transform.py``, ``alias.py``): the factored dims are numpy's ``argsort`` of the shape (stable
for so few dims: ties go to the later axis as the largest), the decay ``1 − (t + 1)^(−0.8)`` is
evaluated in float32 with ``t`` counting from 0, and ``epsilon`` is added to ``|g|²``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import functrain as ft
from functrain import testing

F64 = torch.float64

# 0-d, 1-d, square, tall, wide, 3-d and 4-d leaves, with ties and dims below the threshold.
SHAPES = {
    "scalar": (),
    "vec": (7,),
    "square": (5, 5),
    "tall": (6, 3),
    "wide": (3, 8),
    "small": (2, 9),  # second largest dim below the threshold of 3: unfactored
    "cube_tie": (4, 4, 4),
    "cube": (3, 6, 4),
    "four": (2, 5, 3, 5),
    "unit": (1, 1),
}


def _factored_dims(shape: tuple[int, ...], min_dim: int) -> tuple[int, int] | None:
    """optax's ``_factored_dims``, with numpy itself."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < min_dim:
        return None
    return int(order[-2]), int(order[-1])


def _beta(step: int, rate: float = 0.8, offset: int = 0) -> float:
    t = np.float32(step - offset + 1)  # optax: jnp.array(i + 1, jnp.float32)
    return float(np.float32(1.0) - t ** np.float32(-rate))


def _delete(shape: tuple[int, ...], d: int) -> tuple[int, ...]:
    return tuple(np.delete(np.array(shape, dtype=np.int64), d).tolist())


class _RefFactored:
    """optax ``scale_by_factored_rms`` on one leaf, in float64."""

    def __init__(self, shape: tuple[int, ...], min_dim: int, rate: float, offset: int, eps: float):
        self.dims = _factored_dims(shape, min_dim)
        self.rate, self.offset, self.eps, self.step = rate, offset, eps, 0
        if self.dims is None:
            self.v = torch.zeros(shape, dtype=F64)
        else:
            d1, d0 = self.dims
            self.row = torch.zeros(_delete(shape, d0), dtype=F64)
            self.col = torch.zeros(_delete(shape, d1), dtype=F64)

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        b = _beta(self.step, self.rate, self.offset)
        self.step += 1
        sq = g.abs() ** 2 + self.eps
        if self.dims is None:
            self.v = b * self.v + (1 - b) * sq
            return g * self.v**-0.5
        d1, d0 = self.dims
        self.row = b * self.row + (1 - b) * sq.mean(dim=d0)
        self.col = b * self.col + (1 - b) * sq.mean(dim=d1)
        red = d1 - 1 if d1 > d0 else d1
        rf = (self.row / self.row.mean(dim=red, keepdim=True)) ** -0.5
        return g * rf.unsqueeze(d0) * (self.col**-0.5).unsqueeze(d1)


def _grads(seed: int, steps: int, dtype: torch.dtype = F64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(s, generator=gen, dtype=F64).to(dtype) for k, s in SHAPES.items()}
        for _ in range(steps)
    ]


@pytest.mark.parametrize(
    "min_dim, rate, offset, eps", [(3, 0.8, 0, 1e-30), (4, 0.5, -3, 1e-3), (1, 0.8, 0, 0.0)]
)
def test_factored_rms_matches_optax_on_every_leaf_kind(min_dim, rate, offset, eps) -> None:
    tx = ft.scale_by_factored_rms(
        decay_rate=rate, step_offset=offset, min_dim_size_to_factor=min_dim, epsilon=eps
    )
    params = {k: torch.zeros(s, dtype=F64) for k, s in SHAPES.items()}
    state = tx.init(params)
    refs = {k: _RefFactored(s, min_dim, rate, offset, eps) for k, s in SHAPES.items()}
    for k, s in SHAPES.items():
        dims = _factored_dims(s, min_dim)
        if dims is None:
            assert tuple(state.v[k].shape) == s and tuple(state.v_row[k].shape) == (1,)
        else:
            assert tuple(state.v_row[k].shape) == _delete(s, dims[1])
            assert tuple(state.v_col[k].shape) == _delete(s, dims[0])
            assert tuple(state.v[k].shape) == (1,)
    for g in _grads(0, 5):
        u, state = tx.update(g, state, params)
        for k in SHAPES:
            testing.assert_trees_all_close(u[k], refs[k](g[k]), rtol=1e-6, atol=0)
    assert state.count.dtype == torch.int32 and int(state.count) == 5


def test_ties_pick_the_later_axis_as_largest() -> None:
    # optax: argsort((4, 4, 4)) = [0, 1, 2], so d1 = 1 and d0 = 2: v_row (4, 4) averages axis 2.
    tx = ft.scale_by_factored_rms(min_dim_size_to_factor=2)
    g = torch.arange(1.0, 65.0, dtype=F64).reshape(4, 4, 4)
    state = tx.init([torch.zeros(4, 4, 4, dtype=F64)])
    _, state = tx.update([g], state)
    torch.testing.assert_close(state.v_row[0], (g * g + 1e-30).mean(dim=2), rtol=1e-14, atol=0)
    torch.testing.assert_close(state.v_col[0], (g * g + 1e-30).mean(dim=1), rtol=1e-14, atol=0)


def test_complex_leaves_use_abs_sq_as_optax() -> None:
    # init accepted complex params (complex statistics) but update refused complex gradients.
    gen = torch.Generator().manual_seed(3)
    shapes = {"m": (4, 5), "v": (3,)}
    tx = ft.scale_by_factored_rms(min_dim_size_to_factor=2)
    params = {k: torch.zeros(s, dtype=torch.complex128) for k, s in shapes.items()}
    state = tx.init(params)
    refs = {k: _RefFactored(s, 2, 0.8, 0, 1e-30) for k, s in shapes.items()}
    for _ in range(4):
        g = {k: torch.randn(s, generator=gen, dtype=torch.complex128) for k, s in shapes.items()}
        u, state = tx.update(g, state, params)
        for k in shapes:
            assert u[k].dtype == torch.complex128
            testing.assert_trees_all_close(u[k], refs[k](g[k]), rtol=1e-6, atol=0)
    assert state.v_row["m"].dtype == torch.complex128
    assert torch.all(state.v_row["m"].imag == 0) and torch.all(state.v["v"].imag == 0)


def test_complex64_leaf_of_float32_model_keeps_its_dtype() -> None:
    tx = ft.scale_by_factored_rms(min_dim_size_to_factor=2)
    params = [torch.zeros(3, 4, dtype=torch.complex64), torch.zeros(2)]
    state = tx.init(params)
    g = [torch.full((3, 4), 3 + 4j, dtype=torch.complex64), torch.ones(2)]
    u, state = tx.update(g, state, params)
    assert u[0].dtype == torch.complex64 and state.v_col[0].dtype == torch.complex64
    # Constant |g| = 5: the first step's factors give u = g / 5.
    torch.testing.assert_close(u[0], g[0] / 5)


def test_bfloat16_params_keep_float32_statistics_and_reference_values() -> None:
    tx = ft.scale_by_factored_rms(min_dim_size_to_factor=3)
    params = {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in SHAPES.items()}
    state = tx.init(params)
    refs = {k: _RefFactored(s, 3, 0.8, 0, 1e-30) for k, s in SHAPES.items()}
    for g in _grads(5, 4, torch.bfloat16):
        u, state = tx.update(g, state, params)
        for k in SHAPES:
            assert u[k].dtype == torch.bfloat16
            want = refs[k](g[k].to(F64)).to(torch.bfloat16)
            testing.assert_trees_all_close(u[k], want, rtol=2e-2, atol=1e-6)
    for part in (state.v, state.v_row, state.v_col):
        assert all(x.dtype == torch.float32 for x in ft.tree.leaves(part))


def test_update_does_not_touch_its_inputs() -> None:
    tx = ft.adafactor(0.1, min_dim_size_to_factor=2, momentum=0.9, weight_decay_rate=0.1)
    gen = torch.Generator().manual_seed(2)
    params = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    state = tx.init(params)
    g = _grads(1, 1, torch.float32)[0]
    snapshot = [x.clone() for x in ft.tree.leaves((g, state, params))]
    tx.update(g, state, params)
    for a, b in zip(ft.tree.leaves((g, state, params)), snapshot):
        assert torch.equal(a, b)


# --- adafactor alias ---------------------------------------------------------------------


def _adafactor_ref(params, grads, *, lr, min_dim, clip, scale, momentum, wd, factored):
    refs = {
        k: _RefFactored(tuple(p.shape), min_dim if factored else 10**9, 0.8, 0, 1e-30)
        for k, p in params.items()
    }
    mom = {k: torch.zeros_like(p) for k, p in params.items()}
    p = {k: x.clone() for k, x in params.items()}
    traj = []
    for g in grads:
        for k in p:
            u = refs[k](g[k])
            if clip is not None:
                u = u / max(1.0, math.sqrt(float((u * u).mean())) / clip)
            u = u * lr
            if scale:
                u = u * max(math.sqrt(float((p[k] * p[k]).mean())), 1e-3)
            if momentum is not None:
                mom[k] = (1 - momentum) * u + momentum * mom[k]  # ema, debias=False
                u = mom[k]
            if wd is not None:
                u = u + wd * p[k]
            p[k] = p[k] - u
        traj.append({k: x.clone() for k, x in p.items()})
    return traj


@pytest.mark.parametrize(
    "kw",
    [
        dict(clip=1.0, scale=True, momentum=None, wd=None, factored=True),
        dict(clip=0.3, scale=True, momentum=0.8, wd=0.05, factored=True),
        dict(clip=None, scale=False, momentum=0.5, wd=None, factored=False),
    ],
)
def test_adafactor_trajectory_matches_optax_with_moving_params(kw) -> None:
    gen = torch.Generator().manual_seed(11)
    params = {k: torch.randn(s, generator=gen, dtype=F64) for k, s in SHAPES.items()}
    grads = _grads(12, 5)
    tx = ft.adafactor(
        0.05,
        min_dim_size_to_factor=3,
        clipping_threshold=kw["clip"],
        multiply_by_parameter_scale=kw["scale"],
        momentum=kw["momentum"],
        dtype_momentum=F64,
        weight_decay_rate=kw["wd"],
        factored=kw["factored"],
    )
    want = _adafactor_ref(params, grads, lr=0.05, min_dim=3, **kw)
    p, state = params, tx.init(params)
    for g, expected in zip(grads, want):
        u, state = tx.update(g, state, p)
        p = ft.apply_updates(p, u)
        testing.assert_trees_all_close(p, expected, rtol=1e-6, atol=1e-9)


def test_adafactor_in_step_fast_path_equals_pure_path() -> None:
    def loss(p, batch):
        # Each batch leaf has a leading batch dimension of one.
        return sum((x * b[0]).sum() + (x * x).sum() for x, b in zip(ft.tree.leaves(p), batch))

    gen = torch.Generator().manual_seed(4)
    params = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    batches = [
        [torch.randn((1, *x.shape), generator=gen) for x in ft.tree.leaves(params)]
        for _ in range(4)
    ]
    finals = {}
    for donate in (True, False):
        tx = ft.adafactor(0.05, min_dim_size_to_factor=3, momentum=0.9, weight_decay_rate=0.01)
        step = ft.make_train_step(loss, tx, donate=donate)
        state = ft.TrainState.create(
            params={k: v.clone() for k, v in params.items()}, tx=tx, seed=None
        )
        traj = []
        for b in batches:
            state, _ = step(state, b)
            traj.append({k: v.clone() for k, v in state.params.items()})
        finals[donate] = (traj, state.opt_state)
    for a, b in zip(finals[True][0], finals[False][0]):
        testing.assert_trees_all_equal(a, b)
    testing.assert_trees_all_equal(finals[True][1], finals[False][1])


# --- trace and ema -------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("acc", [None, F64])
def test_trace_matches_optax_and_fast_path(nesterov, acc) -> None:
    decay = 0.7
    grads = _grads(21, 4, torch.float32)
    tx = ft.trace(decay, nesterov=nesterov, accumulator_dtype=acc)
    params = {k: torch.zeros(s) for k, s in SHAPES.items()}
    state = tx.init(params)
    assert all(t.dtype == (acc or torch.float32) for t in ft.tree.leaves(state.trace))
    t = {k: torch.zeros(s, dtype=F64) for k, s in SHAPES.items()}
    for g in grads:
        u, state = tx.update(g, state)
        for k in SHAPES:
            g64 = g[k].to(F64)
            t[k] = g64 + decay * t[k]
            want = g64 + decay * t[k] if nesterov else t[k]
            assert u[k].dtype == torch.float32
            testing.assert_trees_all_close(u[k], want.float(), rtol=1e-6, atol=1e-7)

    def loss(p, batch):
        return sum((p[k] * batch[k][0]).sum() for k in p)

    runs = {}
    for donate in (True, False):
        chain = ft.chain(ft.trace(decay, nesterov, acc), ft.scale(-0.1))
        step = ft.make_train_step(loss, chain, donate=donate)
        st = ft.TrainState.create(
            params={k: v.clone() for k, v in params.items()}, tx=chain, seed=None
        )
        for g in grads:
            st, _ = step(st, {k: x.unsqueeze(0) for k, x in g.items()})
        runs[donate] = (st.params, st.opt_state)
    # A float32 trace runs torch's fused SGD kernel, documented to equal the pure path to
    # rounding; a float64 trace runs the foreach engine, bit-for-bit the pure path.
    if acc is None:
        testing.assert_trees_all_close(runs[True], runs[False], rtol=1e-6, atol=1e-7)
    else:
        testing.assert_trees_all_equal(runs[True], runs[False])


@pytest.mark.parametrize("debias", [False, True])
@pytest.mark.parametrize("acc", [None, torch.float32])
def test_ema_matches_optax_on_bfloat16_updates(debias, acc) -> None:
    decay = 0.9
    grads = _grads(31, 5, torch.bfloat16)
    tx = ft.ema(decay, debias=debias, accumulator_dtype=acc)
    state = tx.init({k: torch.zeros(s, dtype=torch.bfloat16) for k, s in SHAPES.items()})
    e = {k: torch.zeros(s, dtype=F64) for k, s in SHAPES.items()}
    for count, g in enumerate(grads, start=1):
        u, state = tx.update(g, state)
        assert int(state.count) == count
        for k in SHAPES:
            e[k] = (1 - decay) * g[k].to(F64) + decay * e[k]
            # The average is stored in its dtype (bfloat16 without accumulator_dtype).
            e[k] = e[k].to(acc or torch.bfloat16).to(F64)
            want = e[k] / (1 - decay**count) if debias else e[k]
            assert u[k].dtype == torch.bfloat16
            testing.assert_trees_all_close(u[k], want.to(torch.bfloat16), rtol=3e-2, atol=1e-3)
    assert all(x.dtype == (acc or torch.bfloat16) for x in ft.tree.leaves(state.ema))
