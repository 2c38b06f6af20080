"""Review 3 of the fused in-place optimizer stage of the train step (``fused=True``).

A fused step and a pure step (``fused=False``) run on copies of one state for several steps,
with a non-finite batch in the middle (skipped: counts and schedules must not advance), over
trees that mix float64 and float32 leaves, hold a transposed (non-contiguous) parameter, a 0-d
and a zero-size parameter and one the loss never reads (zero gradient). Parameters, optimizer
state (structure, dtypes, values) and every metric must agree. The kernel engine's AdamW is
also checked bit for bit against ``torch.optim.AdamW(fused=True)`` and against an AdamW done by
hand in float64, and unsupported optimizers (amsgrad, adamax) must take the pure path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft

F64 = torch.float64


def _params(kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    p = {
        "w": torch.randn(3, 2, generator=gen),
        "b": torch.randn(2, generator=gen),
        "s": torch.randn((), generator=gen),
        "u": torch.randn(4, generator=gen),  # unused by the loss: zero gradient
    }
    if kind == "mixed":  # float64 and float32 leaves, and a zero-size one
        p["w"], p["s"] = p["w"].double(), p["s"].double()
        p["z"] = torch.zeros(0, 3)
    elif kind == "transposed":  # a non-contiguous parameter
        p["w"] = torch.randn(2, 3, generator=gen).t()
    return p


def _loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    w, bias, s = (p[k].to(F64) for k in ("w", "b", "s"))
    return ((b["x"] @ w + bias - b["y"]) ** 2).mean() + 0.5 * s.square() * b["k"].mean()


def _batch(i: int, nan: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    k = torch.ones(6, dtype=F64)
    if nan:
        k[0] = math.nan
    return {
        "x": torch.randn(6, 3, generator=gen, dtype=F64),
        "y": torch.randn(6, 2, generator=gen, dtype=F64),
        "k": k,
    }


def _matrices(tree_: Any) -> Any:
    return ft.tree.map(lambda x: x.ndim > 1, tree_)


_SCHED = ft.linear_schedule(1e-2, 1e-3, 4)

_TXS: dict[str, Callable[[], Any]] = {
    "adamw": lambda: ft.adamw(1e-2, weight_decay=0.1),
    "adamw_mask": lambda: ft.adamw(1e-2, weight_decay=0.1, mask=_matrices),
    "adam_schedule": lambda: ft.adam(_SCHED),
    "adam_nesterov": lambda: ft.adam(1e-2, nesterov=True),
    "sgd_nesterov": lambda: ft.sgd(1e-2, momentum=0.9, nesterov=True),
    "sgd": lambda: ft.sgd(1e-2),
    "clip_adamw": lambda: ft.chain(ft.clip_by_global_norm(0.5), ft.adamw(1e-2, weight_decay=0.1)),
    "clip_zero": lambda: ft.chain(ft.clip_by_global_norm(0.0), ft.sgd(1e-2, momentum=0.9)),
    "coupled": lambda: ft.chain(
        ft.clip_by_global_norm(0.3), ft.add_decayed_weights(0.1, _matrices), ft.adam(1e-2)
    ),
    "inject_schedule": lambda: ft.inject_hyperparams(ft.adamw)(
        learning_rate=_SCHED, weight_decay=0.1
    ),
    "inject_f64_tensor": lambda: ft.inject_hyperparams(ft.adamw)(
        learning_rate=torch.tensor(1e-2, dtype=F64), weight_decay=torch.tensor(0.1, dtype=F64)
    ),
    "inject_sgd_tensor": lambda: ft.inject_hyperparams(ft.sgd)(
        learning_rate=torch.tensor(1e-2), momentum=0.9
    ),
    "decay_schedule": lambda: ft.chain(ft.add_decayed_weights(_SCHED), ft.sgd(1e-2, momentum=0.9)),
    "ascent": lambda: ft.chain(ft.scale_by_adam(), ft.scale(0.01)),
    "amsgrad": lambda: ft.amsgrad(1e-2),
    "adamax": lambda: ft.adamax(1e-2),
}


def _run(name: str, kind: str, fused: bool, steps: int, nan_at: int, **kw: Any) -> Any:
    tx = _TXS[name]()
    state = ft.TrainState.create(params=_params(kind), tx=tx, seed=None)
    step = ft.make_train_step(_loss, tx, fused=fused, **kw)
    metrics = []
    for i in range(steps):
        state, m = step(state, _batch(i, nan=i == nan_at))
        metrics.append(m)
    return state, metrics, step


def _assert_close(a: Any, b: Any, what: str) -> None:
    la, sa = ft.tree.flatten(a)
    lb, sb = ft.tree.flatten(b)
    assert sa == sb, what
    for x, y in zip(la, lb):
        assert type(x) is type(y), what
        if not isinstance(x, torch.Tensor):
            assert x == y, what
            continue
        assert (x.dtype, x.shape) == (y.dtype, y.shape), what
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, equal_nan=True, msg=what)


@pytest.mark.parametrize("kind", ["float32", "mixed", "transposed"])
@pytest.mark.parametrize("name", sorted(_TXS))
def test_fused_matches_pure_with_a_skipped_step(name: str, kind: str) -> None:
    a, ma, step = _run(name, kind, True, steps=4, nan_at=1)
    b, mb, _ = _run(name, kind, False, steps=4, nan_at=1)
    _assert_close(a.params, b.params, "params")
    _assert_close(a.opt_state, b.opt_state, "opt_state")
    for i, (x, y) in enumerate(zip(ma, mb)):
        _assert_close(x, y, f"metrics of step {i}")
    assert [int(m["skipped"]) for m in ma] == [0, 1, 0, 0]
    engine = step.apply_optimizer.last_engine
    if name in ("amsgrad", "adamax"):  # moments the engines do not know: never fused
        assert engine == "pure"
    elif name != "adam_nesterov":  # foreach cannot skip on the device: pure under "skip"
        assert engine == "kernel"


@pytest.mark.parametrize(
    "kw", [{"micro_batches": [1, 4, 1]}, {"grad_backend": "autograd"}, {"norm_metrics": False}]
)
@pytest.mark.parametrize("name", ["clip_adamw", "sgd_nesterov", "inject_schedule"])
def test_fused_matches_pure_across_step_options(name: str, kw: dict[str, Any]) -> None:
    a, ma, _ = _run(name, "mixed", True, steps=3, nan_at=2, **kw)
    b, mb, _ = _run(name, "mixed", False, steps=3, nan_at=2, **kw)
    _assert_close(a.params, b.params, "params")
    _assert_close(a.opt_state, b.opt_state, "opt_state")
    _assert_close(ma, mb, "metrics")


def test_skipped_step_changes_nothing_and_counts_hold() -> None:
    """A NaN step first: the fused step leaves params and every opt_state leaf as they were."""
    tx = _TXS["inject_schedule"]()
    state = ft.TrainState.create(params=_params("mixed"), tx=tx, seed=None)
    before = ft.tree.map(torch.clone, (state.params, state.opt_state))
    state, m = ft.make_train_step(_loss, tx)(state, _batch(0, nan=True))
    assert int(m["skipped"]) == 1 and float(m["update_norm"]) == 0.0
    for x, y in zip(ft.tree.leaves(before), ft.tree.leaves((state.params, state.opt_state))):
        assert x.dtype == y.dtype
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_kernel_adamw_is_torch_fused_adamw_bit_for_bit(dtype: torch.dtype) -> None:
    """The docs claim the step's AdamW is ``torch.optim.AdamW(fused=True)``'s kernel."""
    gen = torch.Generator().manual_seed(3)
    start = {"a": torch.randn(7, 5, generator=gen), "b": torch.randn(3, generator=gen)}
    start = {k: v.to(dtype) for k, v in start.items()}
    tx = ft.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)

    def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((v.float() * b[k].float()).sum() for k, v in p.items())

    state = ft.TrainState.create(params={k: v.clone() for k, v in start.items()}, tx=tx, seed=None)
    step = ft.make_train_step(loss, tx, norm_metrics=False)
    ref = [torch.nn.Parameter(v.clone()) for v in start.values()]
    opt = torch.optim.AdamW(
        ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, fused=True
    )
    for _ in range(4):
        g = {k: torch.randn(v.shape, generator=gen).to(dtype) for k, v in start.items()}
        state, _ = step(state, {k: v[None] for k, v in g.items()})
        for p, gk in zip(ref, g.values()):
            p.grad = gk.clone()
        opt.step()
    assert step.apply_optimizer.last_engine == "kernel"
    for k, p in zip(start, ref):
        assert torch.equal(state.params[k], p.detach()), k


def test_adamw_with_skip_matches_float64_hand_reference() -> None:
    """AdamW done by hand in float64, the NaN step left out, against the fused step."""
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.1
    tx = ft.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    p0 = torch.tensor([0.5, -1.0, 2.0], dtype=F64)

    def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return (p["w"] * b["g"]).sum() * b["k"].mean()

    grads = [torch.tensor(v, dtype=F64) for v in ([1.0, 2.0, -3.0], [0.1, 0.2, 0.3], [-1.0, 0, 4])]
    state = ft.TrainState.create(params={"w": p0.clone()}, tx=tx, seed=None)
    step = ft.make_train_step(loss, tx)
    p, m, v, t = p0.clone(), torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), 0
    for i, g in enumerate([grads[0], None, grads[1], grads[2]]):
        k = torch.tensor([math.nan if g is None else 1.0], dtype=F64)
        state, _ = step(state, {"g": (grads[0] if g is None else g)[None], "k": k})
        if g is None:
            continue
        t += 1
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p - lr * ((m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps) + wd * p)
    assert step.apply_optimizer.last_engine == "kernel"
    torch.testing.assert_close(state.params["w"], p, rtol=1e-12, atol=1e-14)
    assert int(state.opt_state[0].count) == 3


@pytest.mark.parametrize("name", ["adamw", "clip_adamw", "sgd_nesterov"])
def test_float16_with_dynamic_loss_scale_matches_pure(name: str) -> None:
    """Overflowing scales are skipped by both paths alike (the scale halves, nothing moves)."""

    def run(fused: bool) -> Any:
        tx = _TXS[name]()
        params = {k: v.half() for k, v in _params("float32").items()}
        state = ft.TrainState.create(params=params, tx=tx, seed=None)
        step = ft.make_train_step(_loss, tx, fused=fused, loss_scale=ft.DynamicLossScale())
        out = []
        for i in range(5):
            state, m = step(state, _batch(i))
            out.append({k: v for k, v in m.items() if k != "update_norm"})
        return state, out

    (a, ma), (b, mb) = run(True), run(False)
    _assert_close(a.params, b.params, "params")
    _assert_close(a.opt_state, b.opt_state, "opt_state")
    _assert_close(ma, mb, "metrics")
    assert sum(int(m["skipped"]) for m in ma) < 5  # some steps did update
