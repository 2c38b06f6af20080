"""AdaBelief, Yogi, Adadelta, Adan and AdamaxW against hand-written float64 references,
``torch.optim.Adadelta``/``Adamax``, and the transform contract (purity, dtypes, masks,
compilation, bad arguments, the train step)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

F64 = torch.float64
# Zeros, sign flips and a change of scale, per element.
GRADS = [
    [0.5, -1.0, 0.0, 2.0],
    [-0.5, 1.0, 0.0, 0.0],
    [0.1, 0.0, 3.0, -2.0],
    [0.0, -0.2, -3.0, 1e-3],
    [1.5, 0.7, 0.0, -4.0],
    [-1.5, 0.7, 2.0, 0.5],
    [0.0, 0.0, 0.0, 0.0],
    [2.5, -0.3, 1.0, 1.0],
]


def _updates(tx: ft.GradientTransformation, params: list[float] | None = None) -> list[list[float]]:
    p = torch.tensor(params if params is not None else [0.3, -0.2, 1.0, 0.0], dtype=F64)
    state, out = tx.init([p]), []
    for row in GRADS:
        u, state = tx.update([torch.tensor(row, dtype=F64)], state, [p])
        out.append(u[0].tolist())
        p = p + u[0]
    return out


def _check(got: list[list[float]], want: list[list[float]], tol: float = 1e-12) -> None:
    for a, b in zip(got, want, strict=True):
        for x, y in zip(a, b, strict=True):
            assert math.isclose(x, y, rel_tol=tol, abs_tol=tol), (got, want)


# --- hand-written float64 references, one element at a time ---------------------------------


def _belief_ref(b1, b2, eps, eps_root, nesterov):
    out, mu, nu = [], [0.0] * 4, [0.0] * 4
    for t, row in enumerate(GRADS, start=1):
        step = []
        for i, g in enumerate(row):
            mu[i] = b1 * mu[i] + (1 - b1) * g
            nu[i] = b2 * nu[i] + (1 - b2) * (g - mu[i]) ** 2 + eps_root
            if nesterov:
                m_hat = b1 * mu[i] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
            else:
                m_hat = mu[i] / (1 - b1**t)
            step.append(m_hat / (math.sqrt(nu[i] / (1 - b2**t)) + eps))
        out.append(step)
    return out


def _yogi_ref(b1, b2, eps, eps_root, init):
    out, mu, nu = [], [init] * 4, [init] * 4
    for t, row in enumerate(GRADS, start=1):
        step = []
        for i, g in enumerate(row):
            mu[i] = b1 * mu[i] + (1 - b1) * g
            d = nu[i] - g * g
            nu[i] = nu[i] - (1 - b2) * ((d > 0) - (d < 0)) * g * g
            v_hat = nu[i] / (1 - b2**t)
            step.append(mu[i] / (1 - b1**t) / (math.sqrt(v_hat + eps_root) + eps))
        out.append(step)
    return out


def _adadelta_ref(rho, eps):
    out, eg, ex = [], [0.0] * 4, [0.0] * 4
    for row in GRADS:
        step = []
        for i, g in enumerate(row):
            eg[i] = rho * eg[i] + (1 - rho) * g * g
            u = math.sqrt(ex[i] + eps) / math.sqrt(eg[i] + eps) * g
            ex[i] = rho * ex[i] + (1 - rho) * u * u
            step.append(u)
        out.append(step)
    return out


def _adan_ref(b1, b2, b3, eps, eps_root):
    out, m, v, n, prev = [], [0.0] * 4, [0.0] * 4, [0.0] * 4, [0.0] * 4
    for t, row in enumerate(GRADS, start=1):
        step = []
        for i, g in enumerate(row):
            d = 0.0 if t == 1 else g - prev[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * d
            n[i] = b3 * n[i] + (1 - b3) * (g + (1 - b2) * d) ** 2
            num = m[i] / (1 - b1**t) + (1 - b2) * v[i] / (1 - b2**t)
            step.append(num / (math.sqrt(n[i] / (1 - b3**t) + eps_root) + eps))
            prev[i] = g
        out.append(step)
    return out


def _adamaxw_ref(lr, b1, b2, eps, wd, p0):
    out, m, u_inf, p = [], [0.0] * 4, [0.0] * 4, list(p0)
    for t, row in enumerate(GRADS, start=1):
        step = []
        for i, g in enumerate(row):
            m[i] = b1 * m[i] + (1 - b1) * g
            u_inf[i] = max(b2 * u_inf[i], abs(g) + eps)
            step.append(-lr * (m[i] / (1 - b1**t) / u_inf[i] + wd * p[i]))
            p[i] += step[-1]
        out.append(step)
    return out


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("hyper", [(0.9, 0.999, 1e-16, 1e-16), (0.5, 0.8, 1e-3, 1e-4)])
def test_belief_matches_hand_reference(hyper: tuple, nesterov: bool) -> None:
    _check(_updates(ft.scale_by_belief(*hyper, nesterov=nesterov)), _belief_ref(*hyper, nesterov))


@pytest.mark.parametrize("hyper", [(0.9, 0.999, 1e-3, 0.0, 1e-6), (0.5, 0.8, 1e-5, 1e-4, 0.0)])
def test_yogi_matches_hand_reference(hyper: tuple) -> None:
    _check(_updates(ft.scale_by_yogi(*hyper)), _yogi_ref(*hyper))


@pytest.mark.parametrize("hyper", [(0.9, 1e-6), (0.5, 1e-2), (1.0, 1e-3), (0.0, 1e-6)])
def test_adadelta_matches_hand_reference(hyper: tuple) -> None:
    _check(_updates(ft.scale_by_adadelta(*hyper)), _adadelta_ref(*hyper))


@pytest.mark.parametrize("hyper", [(0.98, 0.92, 0.99, 1e-8, 0.0), (0.5, 0.3, 0.9, 1e-4, 1e-3)])
def test_adan_matches_hand_reference(hyper: tuple) -> None:
    _check(_updates(ft.scale_by_adan(*hyper)), _adan_ref(*hyper))


def test_adamaxw_matches_hand_loop_with_decoupled_decay() -> None:
    p0 = [0.3, -0.2, 1.0, 0.0]
    tx = ft.adamaxw(0.05, 0.8, 0.9, 1e-3, weight_decay=0.1)
    _check(_updates(tx, p0), _adamaxw_ref(0.05, 0.8, 0.9, 1e-3, 0.1, p0))


# --- torch.optim trajectories -----------------------------------------------------------------


def _torch_trajectory(opt_cls: Any, tx: ft.GradientTransformation, **kw: Any) -> None:
    """20 steps of a float64 quadratic-ish loss: torch.optim in place vs the pure update."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 3, generator=g, dtype=F64)
    targets = [torch.randn(5, 3, generator=g, dtype=F64) for _ in range(20)]
    loss = lambda p, y: ((p - y) ** 3).abs().sum() + (p * y).sum()  # noqa: E731
    ref = p0.clone().requires_grad_(True)
    opt = opt_cls([ref], **kw)
    p, state = p0.clone(), tx.init(p0)
    for y in targets:
        opt.zero_grad()
        loss(ref, y).backward()
        opt.step()
        u, state = tx.update(torch.func.grad(loss)(p, y), state, p)
        p = ft.apply_updates(p, u)
        torch.testing.assert_close(p, ref.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"rho": 0.5, "eps": 1e-3, "weight_decay": 0.1}])
def test_adadelta_matches_torch_optim(kw: dict[str, Any]) -> None:
    # Same maths, eps inside both roots and coupled weight decay; torch's default lr is 1.0
    # while optax's (None) means "no scaling", so lr is given explicitly.
    _torch_trajectory(torch.optim.Adadelta, ft.adadelta(0.7, **kw), lr=0.7, **kw)


def test_adamaxw_without_decay_matches_torch_adamax() -> None:
    # torch's Adamax weight decay is coupled (L2), AdamaxW's decoupled: compared at 0 here and
    # against a hand loop above.
    tx = ft.adamaxw(0.02, 0.8, 0.95, 1e-6, weight_decay=0.0)
    _torch_trajectory(torch.optim.Adamax, tx, lr=0.02, betas=(0.8, 0.95), eps=1e-6)


# --- the transform contract ------------------------------------------------------------------

ALIASES = {
    "adabelief": lambda lr=1e-2: ft.adabelief(lr),
    "yogi": lambda lr=1e-2: ft.yogi(lr),
    "adadelta": lambda lr=1.0: ft.adadelta(lr, weight_decay=0.01),
    "adan": lambda lr=1e-2: ft.adan(lr, weight_decay=0.01),
    "adamaxw": lambda lr=1e-2: ft.adamaxw(lr),
}


def _tree(dtype: torch.dtype = F64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g, dtype=F64).to(dtype),
        "b": torch.randn(3, generator=g, dtype=F64).to(dtype),
        "s": torch.randn((), generator=g, dtype=F64).to(dtype),
    }


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_update_is_pure(name: str) -> None:
    tx = ALIASES[name]()
    params, state = _tree(), tx.init(_tree())
    for seed in (1, 2):  # the second step reads non-zero state
        grads = _tree(seed=seed)
        before = [x.clone() for x in ft.tree.leaves((grads, state, params))]
        _, new_state = tx.update(grads, state, params)
        for x, y in zip(ft.tree.leaves((grads, state, params)), before, strict=True):
            assert torch.equal(x, y)
        state = new_state


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_bfloat16_leaves_follow_float32_maths(name: str) -> None:
    tx = ALIASES[name]()
    p16, p32 = _tree(torch.bfloat16), _tree(torch.bfloat16)
    p32 = {k: v.float() for k, v in p32.items()}
    s16, s32 = tx.init(p16), tx.init(p32)
    for seed in (1, 2, 3):
        g16 = _tree(torch.bfloat16, seed)
        u16, s16 = tx.update(g16, s16, p16)
        u32, s32 = tx.update({k: v.float() for k, v in g16.items()}, s32, p32)
        for k in u16:
            assert u16[k].dtype == torch.bfloat16
            torch.testing.assert_close(u16[k].float(), u32[k], rtol=2e-2, atol=1e-4)
    assert all(x.dtype in (torch.bfloat16, torch.int32) for x in ft.tree.leaves(s16))


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_masked_none_leaves_and_empty_tree(name: str) -> None:
    params = _tree()
    mask = {"w": True, "b": False, "s": True}
    tx = ft.masked(ALIASES[name](), mask)
    state = tx.init(params)
    u, state = tx.update(_tree(seed=1), state, params)
    ref_tx = ALIASES[name]()
    sub = {k: v for k, v in params.items() if mask[k]}
    ref, _ = ref_tx.update({k: _tree(seed=1)[k] for k in sub}, ref_tx.init(sub), sub)
    for k in sub:
        torch.testing.assert_close(u[k], ref[k], rtol=1e-12, atol=0)
    assert torch.equal(u["b"], _tree(seed=1)["b"])  # passed through unchanged
    empty = ALIASES[name]()
    assert empty.update({}, empty.init({}), {})[0] == {}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_compiles_fullgraph_once_with_a_schedule(name: str) -> None:
    torch._dynamo.reset()
    tx = ALIASES[name](lambda count: 0.01 / (1.0 + count))
    params = _tree(torch.float32)
    state = tx.init(params)
    update = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    ref_state = state
    with testing.assert_max_compiles(1):
        for seed in range(1, 5):
            g = _tree(torch.float32, seed)
            u, state = update(g, state, params)
            ref_u, ref_state = tx.update(g, ref_state, params)
            testing.assert_trees_all_close(u, ref_u, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_injected_learning_rate(name: str) -> None:
    fn = getattr(ft, name)
    injected = ft.inject_hyperparams(fn)(learning_rate=0.05)
    plain = fn(0.05)
    params = _tree()
    s1, s2 = injected.init(params), plain.init(params)
    for seed in (1, 2):
        u1, s1 = injected.update(_tree(seed=seed), s1, params)
        u2, s2 = plain.update(_tree(seed=seed), s2, params)
        testing.assert_trees_all_close(u1, u2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["scale_by_belief", "scale_by_yogi", "scale_by_adan"])
def test_vmap_of_init_and_update(name: str) -> None:
    tx = getattr(ft, name)()
    params = torch.randn(3, 4, dtype=F64)
    grads = torch.randn(3, 4, dtype=F64)
    state = torch.func.vmap(tx.init)(params)
    u, _ = torch.func.vmap(tx.update)(grads, state, params)
    for i in range(3):
        ref, _ = tx.update(grads[i], tx.init(params[i]), params[i])
        torch.testing.assert_close(u[i], ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ft.adabelief(0.1, b1=1.0), "b1"),
        (lambda: ft.adabelief(0.1, eps=-1.0), "eps"),
        (lambda: ft.yogi(0.1, b2=-0.1), "b2"),
        (lambda: ft.scale_by_yogi(initial_accumulator_value=-1e-6), "initial_accumulator_value"),
        (lambda: ft.adadelta(1.0, rho=1.5), "rho"),
        (lambda: ft.adadelta(1.0, eps=float("nan")), "eps"),
        (lambda: ft.adan(0.1, b3=1.0), "b3"),
        (lambda: ft.adan(0.1, eps_root=-1.0), "eps_root"),
        (lambda: ft.adamaxw(0.1, b2=2.0), "b2"),
        (lambda: ft.adamaxw(float("inf")), "learning_rate"),
    ],
)
def test_bad_arguments_name_the_argument(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_adadelta_refuses_complex_leaves_by_name() -> None:
    tx = ft.scale_by_adadelta()
    with pytest.raises(TypeError, match=r"params\['z'\]"):
        tx.init({"z": torch.zeros(2, dtype=torch.complex128)})
    state = tx.init({"z": torch.zeros(2, dtype=F64)})
    with pytest.raises(TypeError, match=r"updates\['z'\]"):
        tx.update({"z": torch.ones(2, dtype=torch.complex128)}, state)


@pytest.mark.parametrize("name", ["scale_by_belief", "scale_by_yogi", "scale_by_adan"])
def test_complex_leaf_with_zero_imaginary_part_equals_the_real_leaf(name: str) -> None:
    tx = getattr(ft, name)()
    real = [torch.tensor(row, dtype=F64) for row in GRADS]
    sr, sc = tx.init([real[0]]), tx.init([real[0].to(torch.complex128)])
    for g in real:
        ur, sr = tx.update([g], sr)
        uc, sc = tx.update([g.to(torch.complex128)], sc)
        torch.testing.assert_close(uc[0].real, ur[0], rtol=1e-12, atol=1e-15)
        assert torch.all(uc[0].imag == 0)


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-3, 1e3), name=st.sampled_from(["belief", "yogi", "adan"]))
def test_updates_are_invariant_to_the_gradient_scale(scale: float, name: str) -> None:
    tx = {
        "belief": lambda: ft.scale_by_belief(eps=0.0, eps_root=0.0),
        "yogi": lambda: ft.scale_by_yogi(eps=0.0, initial_accumulator_value=0.0),
        "adan": lambda: ft.scale_by_adan(eps=0.0),
    }[name]()
    grads = [torch.tensor(row, dtype=F64) + 0.25 for row in GRADS]  # no all-zero element
    s1, s2 = tx.init([grads[0]]), tx.init([grads[0]])
    for g in grads:
        u1, s1 = tx.update([g], s1)
        u2, s2 = tx.update([g * scale], s2)
        torch.testing.assert_close(u2[0], u1[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_train_step_smoke(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=F64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.3
    params = {"w": torch.zeros(3, dtype=F64), "b": torch.zeros((), dtype=F64)}

    def loss(p: Any, batch: Any) -> torch.Tensor:
        return ((batch[0] @ p["w"] + p["b"] - batch[1]) ** 2).mean()

    tx = ALIASES[name](1.0 if name == "adadelta" else 0.05)
    step = ft.make_train_step(loss, tx, micro_batches=2)
    state = ft.TrainState.create(params=params, tx=tx)
    first = float(loss(params, (x, y)))
    for _ in range(5):
        state, _ = step(state, (x, y))
    assert float(loss(state.params, (x, y))) < first
