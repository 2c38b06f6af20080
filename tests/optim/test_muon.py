"""Muon (``ft.muon``, ``ft.scale_by_muon``): against optax's formulas written out by hand in
float64, against ``torch.optim.Muon`` where the two agree, and the polar factor from an SVD."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain.testing import assert_trees_all_close

F64 = torch.float64
NS = (3.4445, -4.7750, 2.0315)
CONV = ft.MuonDimensionNumbers(reduction_axis=(1, 2, 3), output_axis=0)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "up": _randn(gen, 12, 4),  # (out, in): tall, fan_out > fan_in
        "down": _randn(gen, 3, 12),  # wide
        "square": _randn(gen, 5, 5),
        "experts": _randn(gen, 2, 6, 3),  # two stacked (out, in) matrices
        "conv": _randn(gen, 4, 2, 3, 3),
        "bias": _randn(gen, 12),
        "norm": _randn(gen, 5),
    }


def _grads(steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in _model().items()}
    return [{k: _randn(gen, *s) for k, s in shapes.items()} for _ in range(steps)]


def _ns_by_hand(x: torch.Tensor, coeffs: Any, steps: int, eps: float) -> torch.Tensor:
    """optax's ``_orthogonalize`` of one (fan_in, fan_out) matrix, step by step."""
    rows = [coeffs] * steps if isinstance(coeffs[0], float) else list(coeffs)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (torch.sqrt((x * x).sum()) + eps)
    for c0, c1, c2 in rows:
        a = x @ x.T
        x = c0 * x + (c1 * a + (c2 * a) @ a) @ x
    return x.T if tall else x


def _matrices(p: torch.Tensor, dims: ft.MuonDimensionNumbers) -> tuple[list[torch.Tensor], Any]:
    """The (fan_in, fan_out) matrices of ``p`` and a function putting them back."""

    def axes(spec: Any) -> list[int]:
        return [a % p.dim() for a in ((spec,) if isinstance(spec, int) else spec)]

    red, out = axes(dims.reduction_axis), axes(dims.output_axis)
    batch = [a for a in range(p.dim()) if a not in red + out]
    order = batch + red + out
    moved = p.permute(order)
    fan_in, fan_out = (math.prod(p.shape[a] for a in axes) for axes in (red, out))
    mats = list(moved.reshape(-1, fan_in, fan_out))

    def back(ms: list[torch.Tensor]) -> torch.Tensor:
        return (
            torch.stack(ms)
            .reshape(moved.shape)
            .permute(sorted(range(p.dim()), key=order.__getitem__))
        )

    return mats, back


def _muon_by_hand(
    params: dict[str, torch.Tensor],
    grads: list[dict[str, torch.Tensor]],
    dims: dict[str, ft.MuonDimensionNumbers | None],
    *,
    lr: float = 0.05,
    beta: float = 0.95,
    eps: float = 1e-8,
    wd: float = 0.0,
    nesterov: bool = True,
    coeffs: Any = NS,
    steps: int = 5,
    consistent_rms: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    adam_wd: float = 0.0,
) -> dict[str, torch.Tensor]:
    """optax.contrib.muon's update rule, leaf by leaf (its docstring and source, written out)."""
    p = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    for t, g in enumerate(grads, start=1):
        for k in p:
            m[k] = (1 - beta if dims[k] else 1 - b1) * g[k] + (beta if dims[k] else b1) * m[k]
            if dims[k] is None:  # AdamW (nesterov as the alias passes it)
                v2[k] = (1 - b2) * g[k] ** 2 + b2 * v2[k]
                if nesterov:
                    mhat = b1 * m[k] / (1 - b1 ** (t + 1)) + (1 - b1) * g[k] / (1 - b1**t)
                else:
                    mhat = m[k] / (1 - b1**t)
                u = mhat / (torch.sqrt(v2[k] / (1 - b2**t)) + eps) + adam_wd * p[k]
            else:
                if nesterov:
                    mhat = beta * (m[k] / (1 - beta ** (t + 1))) + (1 - beta) * (
                        g[k] / (1 - beta**t)
                    )
                else:
                    mhat = m[k] / (1 - beta**t)
                mats, back = _matrices(mhat, dims[k])
                ortho = back([_ns_by_hand(x, coeffs, steps, eps) for x in mats])
                fan_in, fan_out = mats[0].shape
                if consistent_rms is None:
                    scale = math.sqrt(max(1.0, fan_out / fan_in))
                else:
                    scale = math.sqrt(max(fan_in, fan_out)) * consistent_rms
                u = scale * ortho + wd * p[k]
            p[k] = p[k] - lr * u
    return p


def _run(tx: ft.GradientTransformation, params: Any, grads: list[Any]) -> Any:
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = ft.apply_updates(params, updates)
    return params


def _default_dims(params: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: ft.MuonDimensionNumbers() if v.dim() == 2 else None for k, v in params.items()}


@pytest.mark.parametrize("nesterov", [True, False])
def test_default_muon_matches_optax_rule_by_hand(nesterov: bool) -> None:
    params, grads = _model(), _grads(8)
    got = _run(
        ft.muon(0.05, weight_decay=0.1, nesterov=nesterov, adam_weight_decay=0.01), params, grads
    )
    want = _muon_by_hand(
        params, grads, _default_dims(params), wd=0.1, adam_wd=0.01, nesterov=nesterov
    )
    assert_trees_all_close(got, want, rtol=1e-11, atol=1e-12)


def test_dimension_numbers_choose_muon_leaves_and_axes() -> None:
    params, grads = _model(), _grads(6)
    dims = _default_dims(params) | {
        "experts": ft.MuonDimensionNumbers(),  # batch axis 0
        "conv": CONV,
    }
    got = _run(ft.muon(0.05, muon_weight_dimension_numbers=dims, consistent_rms=0.2), params, grads)
    want = _muon_by_hand(params, grads, dims, consistent_rms=0.2)
    assert_trees_all_close(got, want, rtol=1e-11, atol=1e-12)
    # The same choice as a callable of the params.
    chooser = ft.muon(
        0.05,
        # Mapped leaf by leaf: the Muon group calls it on its updates, whose AdamW leaves are
        # None (ft.tree.map skips them), as optax calls it on updates holding MaskedNodes.
        muon_weight_dimension_numbers=lambda p: ft.tree.map(
            lambda v: (
                CONV if v.dim() == 4 else (ft.MuonDimensionNumbers() if v.dim() > 1 else None)
            ),
            p,
        ),
        consistent_rms=0.2,
    )
    assert_trees_all_close(_run(chooser, params, grads), want, rtol=1e-11, atol=1e-12)


def test_per_step_coefficients_and_schedule() -> None:
    params, grads = _model(), _grads(5)
    rows = ((4.0, -4.5, 1.5), (3.4, -4.7, 2.0), (1.5, -0.5, 0.0))
    schedule = ft.linear_schedule(0.1, 0.01, 5)
    tx = ft.muon(schedule, ns_coeffs=rows, ns_steps=99, beta=0.9)
    got = _run(tx, params, grads)
    # A schedule's value per step: replay by hand with one learning rate per step.
    want = params
    for t in range(len(grads)):
        lr_t = float(schedule(torch.tensor(t)))  # the value the step sees (default dtype)
        step_want = _muon_by_hand(
            params, grads[: t + 1], _default_dims(params), lr=1.0, beta=0.9, coeffs=rows
        )
        prev = _muon_by_hand(
            params, grads[:t], _default_dims(params), lr=1.0, beta=0.9, coeffs=rows
        )
        # lr=1 runs differ by one update, which the schedule scales.
        want = {k: want[k] + lr_t * (step_want[k] - prev[k]) for k in want}
    assert_trees_all_close(got, want, rtol=1e-9, atol=1e-10)


def _torch_muon(params: dict[str, torch.Tensor], grads: list[Any]) -> dict[str, torch.Tensor]:
    """``torch.optim.Muon(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=False)`` run on
    ``grads`` from ``params``: the final parameters."""
    mine = [torch.nn.Parameter(v.clone()) for v in params.values()]
    opt = torch.optim.Muon(mine, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=False)
    for g in grads:
        for p, k in zip(mine, params):
            p.grad = g[k].clone()
        opt.step()
    return dict(zip(params, [p.detach() for p in mine]))


def test_torch_optim_muon_without_nesterov(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.optim.Muon without Nesterov: the same direction (its iteration patched to keep
    float64 instead of casting to bfloat16), width scaling and decoupled decay."""
    import torch.optim._muon as torch_muon

    def full_precision(grad: torch.Tensor, coeffs: Any, steps: int, eps: float) -> torch.Tensor:
        return _ns_by_hand(grad.T, coeffs, steps, 0.0).T  # PyTorch's (out, in) orientation

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", full_precision)
    params = {k: v for k, v in _model().items() if v.dim() == 2}
    grads = [{k: g[k] for k in params} for g in _grads(10)]
    got = _run(ft.muon(0.02, beta=0.9, eps=0.0, weight_decay=0.1, nesterov=False), params, grads)
    assert_trees_all_close(got, _torch_muon(params, grads), rtol=1e-10, atol=1e-12)


def test_bfloat16_iteration_agrees_with_torch_optim_muon() -> None:
    """Against PyTorch's own (unpatched) bfloat16 iteration, float32 trajectories agree to the
    bfloat16 rounding of the orthogonalized updates, with ``ns_dtype=torch.bfloat16`` (whose
    input is the bias-corrected average, so it rounds differently) as with the default."""
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(64, 32, generator=gen), "b": torch.randn(48, 96, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(5)]
    ref = _torch_muon(params, grads)

    def gap(**kw: Any) -> float:
        tx = ft.muon(0.02, beta=0.9, weight_decay=0.1, nesterov=False, **kw)
        got = _run(tx, params, grads)
        return max(float((got[k] - ref[k]).abs().max()) for k in ref)

    # Five updates of size lr·√max(1, out/in)·O(1), each off by bfloat16 rounding (2⁻⁸).
    bound = 5 * 0.02 * 1.5 * 2**-7
    assert gap(ns_dtype=torch.bfloat16) < bound and gap() < bound


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 7),
    cols=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_cubic_iteration_converges_to_the_polar_factor(rows: int, cols: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(_randn(gen, rows, rows))
    v, _ = torch.linalg.qr(_randn(gen, cols, cols))
    k = min(rows, cols)
    sigma = torch.linspace(0.3, 2.0, k, dtype=F64)  # well conditioned: converges in 60 steps
    x = u[:, :k] @ torch.diag(sigma) @ v[:, :k].T
    polar = u[:, :k] @ v[:, :k].T
    got = ft.orthogonalize_via_newton_schulz(x, (1.5, -0.5, 0.0), ns_steps=60, eps=0.0)
    torch.testing.assert_close(got, polar, rtol=0, atol=1e-10)


def test_default_iteration_pushes_singular_values_near_one() -> None:
    gen = torch.Generator().manual_seed(3)
    x = _randn(gen, 32, 16)
    s = torch.linalg.svdvals(ft.orthogonalize_via_newton_schulz(x))
    assert 0.6 < float(s.min()) and float(s.max()) < 1.25


def test_update_is_pure_and_state_round_trips() -> None:
    params, grads = _model(), _grads(2)
    tx = ft.muon(0.05, weight_decay=0.1)
    state = tx.init(params)
    before = ft.tree.map(torch.clone, (grads[0], state, params))
    _, new_state = tx.update(grads[0], state, params)
    ft.testing.assert_trees_all_equal((grads[0], state, params), before)
    # The state holds plain tensors: a checkpoint copy continues alike.
    copied = ft.tree.map(torch.clone, new_state)
    a, _ = tx.update(grads[1], new_state, params)
    b, _ = tx.update(grads[1], copied, params)
    ft.testing.assert_trees_all_equal(a, b)


def test_bfloat16_leaves_compute_in_float32() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, generator=gen)
    g = torch.randn(8, 4, generator=gen)
    tx = ft.scale_by_muon()
    got, state = tx.update({"w": g.bfloat16()}, tx.init({"w": w.bfloat16()}))
    want, _ = tx.update({"w": g.bfloat16().float()}, tx.init({"w": w}))
    assert got["w"].dtype == torch.bfloat16 and state.mu["w"].dtype == torch.bfloat16
    torch.testing.assert_close(got["w"], want["w"].bfloat16(), rtol=0, atol=0)


def test_vmapped_ensemble_equals_members() -> None:
    gen = torch.Generator().manual_seed(0)
    params = {"w": _randn(gen, 3, 6, 4), "b": _randn(gen, 3, 6)}
    grads = [{k: _randn(gen, *v.shape) for k, v in params.items()} for _ in range(3)]
    tx = ft.muon(0.05, weight_decay=0.1)
    state = torch.func.vmap(tx.init)(params)
    batched = params
    for g in grads:
        updates, state = torch.func.vmap(tx.update)(g, state, batched)
        batched = torch.func.vmap(ft.apply_updates)(batched, updates)
    for i in range(3):
        member = _run(
            tx,
            {k: v[i] for k, v in params.items()},
            [{k: v[i] for k, v in g.items()} for g in grads],
        )
        assert_trees_all_close(
            {k: v[i] for k, v in batched.items()}, member, rtol=1e-12, atol=1e-13
        )


def test_train_step_trains_a_model_with_muon() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(64, 8)
    y = x[:, :1] * 2 - x[:, 1:2]

    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (batch[0],))
        return torch.nn.functional.mse_loss(out, batch[1])

    tx = ft.muon(0.02)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = ft.TrainState.create(params=params, tx=tx)
    pure = _run(tx, params, [torch.func.grad(loss_fn)(params, (x, y))])
    first = None
    for _ in range(60):
        state, metrics = step(state, (x, y))
        if first is None:
            first = float(metrics["loss"])
            assert_trees_all_close(state.params, pure, rtol=1e-5, atol=1e-6)
    assert float(metrics["loss"]) < 0.2 * first


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"shape \(3,\) or \(steps, 3\)"):
        ft.scale_by_muon(ns_coeffs=(1.0, 2.0))
    with pytest.raises(ValueError, match="ns_steps"):
        ft.scale_by_muon(ns_steps=-1)
    tx = ft.scale_by_muon()
    with pytest.raises(ValueError, match=r"rank >= 2, got shape \(3,\)"):
        tx.update({"b": torch.ones(3)}, tx.init({"b": torch.ones(3)}))
    bad = ft.scale_by_muon(weight_dimension_numbers={"w": ft.MuonDimensionNumbers(), "v": None})
    params = {"w": torch.ones(2, 2), "v": torch.ones(2, 2)}
    with pytest.raises(TypeError, match=r"weight_dimension_numbers\['v'\]"):
        bad.update(params, bad.init(params))
    overlap = ft.scale_by_muon(weight_dimension_numbers=ft.MuonDimensionNumbers(0, 0))
    with pytest.raises(ValueError, match="disjoint"):
        overlap.update(params, overlap.init(params))


def test_ns_dtype_sets_the_iterations_precision() -> None:
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(24, 40, generator=gen)
    exact = _ns_by_hand(g.double().T, NS, 5, 1e-8).T  # the (in, out) matrix, float64

    def error(**kw: Any) -> float:
        tx = ft.scale_by_muon(nesterov=False, **kw)
        u, _ = tx.update({"w": g}, tx.init({"w": g}))
        assert u["w"].dtype == torch.float32
        return float((u["w"].double() - exact).abs().max())

    assert error() < 1e-5  # float32
    assert 1e-4 < error(ns_dtype=torch.bfloat16) < 5e-2  # bfloat16's 2⁻⁸, compounded
