"""DoG and DoWG (global step sizes) against their rules written per element in float64, with
the three ``init_step`` rules, purity, masks, bfloat16, compile, a train step and bad
arguments; and how they differ from the layer-wise ``scale_by_distance_over_gradients``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _two_leaf_reference import assert_compiles_once_like_eager, assert_train_step_halves_loss
from _two_leaf_reference import flat as _flat
from _two_leaf_reference import grads as two_leaf_grads
from _two_leaf_reference import lin as _lin
from _two_leaf_reference import p0 as _p0
from _two_leaf_reference import run as _run

import functrain as ft
from functrain import testing

F64 = torch.float64


def _grads(n: int) -> list[list[torch.Tensor]]:
    return two_leaf_grads(n, seed=1, zero_leaf=0)


def _dog_ref(grads, p0, kind, value, eps, lr, wd):
    x, n = list(p0), len(p0)
    r = {
        "distance": value,
        "heuristic": value * (1 + math.sqrt(sum(v * v for v in p0))),
        "learning_rate": 0.0,
    }[kind]
    big_g, out = 0.0, []
    for t, gt in enumerate(grads):
        g = [gi + wd * xi for gi, xi in zip(_flat(gt), x)]
        r = max(r, math.sqrt(sum((x[i] - p0[i]) ** 2 for i in range(n))))
        big_g += sum(v * v for v in g)
        eta = value if (kind == "learning_rate" and t == 0) else r / math.sqrt(big_g + eps)
        c_lr = lr(t) if callable(lr) else lr
        x = [xi - c_lr * eta * gi for xi, gi in zip(x, g)]
        out.append(list(x))
    return out


def _dowg_ref(grads, p0, init, eps, lr):
    x, n = list(p0), len(p0)
    r2, vsum, out = (eps if init is None else init), 0.0, []
    for t, gt in enumerate(grads):
        g = _flat(gt)
        r2 = max(r2, sum((x[i] - p0[i]) ** 2 for i in range(n)))
        vsum += r2 * sum(v * v for v in g)
        eta = r2 / (math.sqrt(vsum) + eps)
        c_lr = lr(t) if callable(lr) else lr
        x = [xi - c_lr * eta * gi for xi, gi in zip(x, g)]
        out.append(list(x))
    return out


@pytest.mark.parametrize(
    "init_step, eps, lr, wd",
    [
        (("heuristic", 1e-6), 1e-8, 1.0, None),
        (("distance", 1e-2), 1e-4, _lin, 0.1),
        (("learning_rate", 0.1), 0.0, 0.5, None),
    ],
)
def test_dog_matches_rule(init_step, eps, lr, wd) -> None:
    grads = _grads(12)
    want = _dog_ref(grads, _flat(_p0()), *init_step, eps, lr, wd or 0.0)
    got = _run(ft.dog(lr, init_step, eps, weight_decay=wd), grads, _p0())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("init, eps, lr", [(None, 1e-4, 1.0), (0.5, 1e-6, _lin), (0.0, 1e-3, 2.0)])
def test_dowg_matches_rule(init, eps, lr) -> None:
    grads = _grads(12)
    want = _dowg_ref(grads, _flat(_p0()), init, eps, lr)
    got = _run(ft.dowg(lr, init, eps), grads, _p0())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_global_not_layerwise() -> None:
    """scale_by_dog takes one step size for the tree; LDoG one per leaf."""
    params = [torch.tensor([3.0, 4.0], dtype=F64), torch.tensor([1.0], dtype=F64)]
    g = [torch.tensor([0.0, 2.0], dtype=F64), torch.tensor([1.0], dtype=F64)]
    tx = ft.scale_by_dog(("heuristic", 0.5), eps=0.0)
    u, _ = tx.update(g, tx.init(params), params)
    eta = 0.5 * (1 + math.sqrt(26.0)) / math.sqrt(5.0)
    torch.testing.assert_close(u, [eta * x for x in g], rtol=1e-14, atol=0)
    ld = ft.scale_by_distance_over_gradients(reps_rel=0.5, eps=0.0, param_dtype=None)
    u2, _ = ld.update(g, ld.init(params), params)
    torch.testing.assert_close(u2[0], torch.tensor([0.0, 3.0], dtype=F64))  # per leaf


@pytest.mark.parametrize("make", [lambda: ft.scale_by_dog(("heuristic", 1e-2)), ft.scale_by_dowg])
def test_pure_masked_bfloat16(make) -> None:
    tx = ft.masked(make(), {"a": True, "b": False})
    p = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(2)}
    g = {"a": torch.tensor([0.5, -2.0, 0.0], dtype=torch.bfloat16), "b": torch.ones(2)}
    state = tx.init(p)
    before = copy.deepcopy((g, state, p))
    u, _ = tx.update(g, state, p)
    testing.assert_trees_all_equal((g, state, p), before, bitwise=True)
    assert u["a"].dtype == torch.bfloat16 and u["b"] is g["b"]
    ref = make()
    pf, gf = [p["a"].float()], [g["a"].float()]
    want, _ = ref.update(gf, ref.init(pf), pf)
    assert torch.equal(u["a"], want[0].to(torch.bfloat16))
    p["a"].add_(1.0)  # the initial parameters are a copy
    assert torch.equal(state.inner_state.init_params["a"], before[1].inner_state.init_params["a"])


@pytest.mark.parametrize(
    "tx", [ft.dog(ft.linear_schedule(1.0, 0.1, 6), ("learning_rate", 0.1)), ft.dowg(0.5)]
)
def test_compiled_with_schedule_compiles_once(tx) -> None:
    assert_compiles_once_like_eager(tx, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "make, kw", [(ft.dog, {"init_step": ("learning_rate", 0.05)}), (ft.dowg, {})]
)
def test_inject_hyperparams_and_train_step(make, kw) -> None:
    tx = ft.inject_hyperparams(make)(learning_rate=1.0, **kw)
    assert_train_step_halves_loss(tx, init=0.1, steps=30)


def test_bad_arguments_complex_and_empty() -> None:
    with pytest.raises(ValueError, match="init_step kind"):
        ft.scale_by_dog(("guess", 1.0))
    with pytest.raises(TypeError, match="init_step"):
        ft.dog(init_step=1e-6)
    with pytest.raises(ValueError, match="init_step value"):
        ft.dog(init_step=("distance", -1.0))
    with pytest.raises(ValueError, match="eps"):
        ft.dowg(eps=-1.0)
    with pytest.raises(ValueError, match="init_estim_sq_dist"):
        ft.scale_by_dowg(-2.0)
    with pytest.raises(ValueError, match="needs params"):
        tx = ft.scale_by_dowg()
        tx.update([torch.ones(1)], tx.init([torch.ones(1)]))
    with pytest.raises(TypeError, match=r"params\[0\].*complex"):
        ft.scale_by_dog(("distance", 1.0)).init([torch.ones(2, dtype=torch.complex64)])
    for tx in (ft.scale_by_dog(("learning_rate", 1.0)), ft.scale_by_dowg()):
        u, _ = tx.update({}, tx.init({}), {})
        assert u == {}
