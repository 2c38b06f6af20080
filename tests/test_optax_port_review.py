"""Small optax programs ported to functrain by renaming only (review H37).

Each test is an optax user's program (from optax's docs and examples) with ``jnp`` → ``torch``,
``jax.grad`` → ``torch.func.grad`` and ``optax`` → ``ft``, run in float64. The references are
float64 hand computations in plain Python (lists of floats, ``math``), written from the optax
formulas; they were checked once against optax 0.2.8 with ``jax_enable_x64`` (not imported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch.func import grad, grad_and_value

import functrain as ft

optax = ft  # the port: "a user porting optax code changes only the import"

Vec = list[float]


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _norm(v: Vec) -> float:
    return math.sqrt(sum(x * x for x in v))


def _close(got: torch.Tensor, want: Vec, rtol: float = 1e-12) -> None:
    torch.testing.assert_close(got, torch.tensor(want), rtol=rtol, atol=1e-14)


def test_contrib_namespace_has_optax_contrib_names():
    """optax users write ``optax.contrib.prodigy``; the port writes ``ft.contrib.prodigy``."""
    contrib = ft.contrib
    optax_contrib_028 = (
        "COCOBState DAdaptAdamWState DifferentiallyPrivateAggregateState DoGState DoWGState "
        "GaLoreDimensionNumbers GaLoreState HutchinsonState MadgradState MechanicState "
        "MomoAdamState MomoState MuonDimensionNumbers MuonState NormalizeState ProdigyState "
        "ReduceLROnPlateauState SAMState ScaleByAdemamixState ScaleBySimplifiedAdEMAMixState "
        "ScheduleFreeState SophiaState SplitRealAndImaginaryState acprop ademamix adopt cocob "
        "dadapt_adamw differentially_private_aggregate dog dowg dpsgd galore "
        "hutchinson_estimator_diag_hessian madgrad mechanize momo momo_adam muon normalize "
        "prodigy reduce_on_plateau sam scale_by_acprop scale_by_ademamix scale_by_adopt "
        "scale_by_cocob scale_by_galore scale_by_madgrad scale_by_muon "
        "scale_by_simplified_ademamix schedule_free schedule_free_adamw "
        "schedule_free_eval_params schedule_free_sgd simplified_ademamix sophia "
        "split_real_and_imaginary"
    ).split()
    assert sorted(contrib.__all__) == sorted(optax_contrib_028)
    for name in optax_contrib_028:
        assert getattr(contrib, name) is getattr(ft, name), name


def test_monitor_snapshot_docstring_program():
    """optax.monitor's docstring example, plus a snapshot, for three steps."""

    def f(x):
        return torch.sum(x**2)

    solver = optax.chain(
        optax.sgd(learning_rate=0.1, momentum=0.9),
        optax.monitor(
            {
                "norm_before_clip": optax.tree.norm,
                "is_clipped_ema": optax.measure_with_ema(
                    lambda x: optax.tree.norm(x) > 1.0, decay=0.9
                ),
            }
        ),
        optax.snapshot("snap", lambda x: optax.tree.norm(x)),
        optax.clip_by_global_norm(1.0),
    )
    params = torch.tensor([1.0, 2.0, 3.0])
    state = solver.init(params)
    got = []
    for _ in range(3):
        updates, state = solver.update(grad(f)(params), state)
        params = optax.apply_updates(params, updates)
        got.append(
            [
                float(optax.tree.get(state, k))
                for k in ("norm_before_clip", "is_clipped_ema", "snap")
            ]
        )

    # Hand: trace m ← g + 0.9 m; u = −0.1 m; ema ← 0.9 ema + 0.1 [‖u‖ > 1], debiased.
    x, m, ema, want = [1.0, 2.0, 3.0], [0.0] * 3, 0.0, []
    for t in range(1, 4):
        m = [2 * xi + 0.9 * mi for xi, mi in zip(x, m)]
        u = [-0.1 * mi for mi in m]
        n = _norm(u)
        ema = 0.9 * ema + 0.1 * float(n > 1.0)
        want.append([n, ema / (1 - 0.9**t), n])
        x = [xi + ui * min(1.0, 1.0 / n) for xi, ui in zip(x, u)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-12, atol=1e-14)
    _close(params, x)


def _adam_hand(x: Vec, g_of: Callable[[Vec], Vec], lrs: Vec) -> Vec:
    m, v = [0.0] * len(x), [0.0] * len(x)
    for t, lr in enumerate(lrs, start=1):
        g = g_of(x)
        m = [0.9 * a + 0.1 * b for a, b in zip(m, g)]
        v = [0.999 * a + 0.001 * b * b for a, b in zip(v, g)]
        x = [
            xi - lr * (mi / (1 - 0.9**t)) / (math.sqrt(vi / (1 - 0.999**t)) + 1e-8)
            for xi, mi, vi in zip(x, m, v)
        ]
    return x


def test_inject_hyperparams_tree_get_set_program():
    """Halve the injected learning rate each step with ``tree.get``/``tree.set``."""
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
    params = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor(0.5)}
    state = opt.init(params)
    hist = []
    for _ in range(3):
        g = grad(lambda p: torch.sum(p["w"] ** 2) + p["b"] ** 2)(params)
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
        lr = optax.tree.get(state, "learning_rate")
        state = optax.tree.set(state, learning_rate=lr / 2)
        hist.append(float(lr))
    assert hist == [0.1, 0.05, 0.025]
    want = _adam_hand([1.0, -2.0, 0.5], lambda x: [2 * xi for xi in x], hist)
    _close(params["w"], want[:2])
    _close(params["b"], want[2])

    counts = optax.tree.get_all_with_path(state, "count")
    assert len(counts) == 2 and all(int(c) == 3 for _, c in counts)
    adam_count = optax.tree.get(
        state,
        "count",
        filtering=lambda path, _: (
            isinstance(path[-1], optax.tree.NamedTupleKey)
            and path[-1].tuple_name == "ScaleByAdamState"
        ),
    )
    assert int(adam_count) == 3

    tx = optax.adam(0.1)
    mapped = optax.tree_map_params(tx, lambda p: p * 0 + 7.0, tx.init(params))
    assert mapped[0].mu["w"].tolist() == [7.0, 7.0]


def _simplex_hand(v: Vec, s: float = 1.0) -> Vec:
    """Euclidean projection onto {p ≥ 0, Σp = s} by sorting (Held et al.)."""
    u = sorted(v, reverse=True)
    css, theta = 0.0, 0.0
    for k, uk in enumerate(u, start=1):
        css += uk
        if uk - (css - s) / k > 0:
            theta = (css - s) / k
    return [max(x - theta, 0.0) for x in v]


def test_projected_gradient_descent_program():
    """sgd then ``projections.projection_simplex`` each step; other projections by keyword."""
    from functrain import projections

    x = torch.tensor([0.2, -0.4, 1.3])
    target = torch.tensor([0.0, 3.0, 1.0])
    tx = optax.sgd(0.1)
    st = tx.init(x)
    for _ in range(5):
        g = grad(lambda x: torch.sum((x - target) ** 2))(x)
        u, st = tx.update(g, st)
        x = projections.projection_simplex(optax.apply_updates(x, u))
    h = [0.2, -0.4, 1.3]
    for _ in range(5):
        h = _simplex_hand([hi - 0.1 * 2 * (hi - ti) for hi, ti in zip(h, [0.0, 3.0, 1.0])])
    _close(x, h)

    # optax names the first argument ``tree``; an optax program may pass it by keyword.
    ball = projections.projection_l2_ball(tree={"a": torch.tensor([3.0, 4.0])}, scale=2.0)
    _close(ball["a"], [1.2, 1.6])
    box = projections.projection_box(tree=torch.tensor([-1.0, 0.5, 2.0]), lower=0.0, upper=1.0)
    _close(box, [0.0, 0.5, 1.0])
    _close(projections.projection_simplex(tree=torch.tensor([0.5, 2.0]), scale=1.0), [0.0, 1.0])
    _close(projections.projection_non_negative(tree=torch.tensor([0.5, -3.0])), [0.5, 0.0])


_T, _W, _X0 = [1.0, -1.0, 2.0], [1.0, 2.0, 3.0], [0.3, 0.1, -0.2]


def _loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sum((p["w"] - torch.tensor(_T)) ** 2 * torch.tensor(_W))


def _g(x: Vec) -> Vec:
    return [2 * w * (xi - t) for xi, t, w in zip(x, _T, _W)]


def _run(tx: ft.GradientTransformation, n: int = 4, **extra: Callable) -> torch.Tensor:
    p = {"w": torch.tensor(_X0)}
    s = tx.init(p)
    for _ in range(n):
        g, _value = grad_and_value(_loss)(p)
        u, s = tx.update(g, s, p, **extra)
        p = optax.apply_updates(p, u)
    return p["w"]


def test_contrib_dog_program():
    """``optax.contrib.dog()`` with its defaults: heuristic r₀ = 1e-6·(1 + ‖x₀‖), eps 1e-8."""
    x, r, gsum = list(_X0), 1e-6 * (1 + _norm(_X0)), 0.0
    for _ in range(4):
        g = _g(x)
        r = max(r, _norm([a - b for a, b in zip(_X0, x)]))
        gsum += sum(gi * gi for gi in g)
        eta = r / math.sqrt(gsum + 1e-8)
        x = [xi - eta * gi for xi, gi in zip(x, g)]
    _close(_run(ft.contrib.dog()), x)


def test_contrib_madgrad_program():
    """``optax.contrib.madgrad(0.1)``: the update rule of functrain's and optax's docstring."""
    lr, mom, eps = 0.1, 0.9, 1e-6
    x, gs, s = list(_X0), [0.0] * 3, [0.0] * 3
    for k in range(4):
        g = _g(x)
        lam = (lr + eps) * math.sqrt(k + 1)
        gs = [a + lam * b * b for a, b in zip(gs, g)]
        s = [a + lam * b for a, b in zip(s, g)]
        z = [x0 - si / (gi ** (1 / 3) + eps) for x0, si, gi in zip(_X0, s, gs)]
        x = [(1 - mom) * zi + mom * xi for zi, xi in zip(z, x)]
    # optax rounds λ to float32 (documented in scale_by_madgrad): agreement to ~1e-8 with it.
    _close(_run(ft.contrib.madgrad(0.1)), x)


def test_contrib_sam_opaque_program():
    """``optax.contrib.sam`` (opaque mode) with the usual normalize-then-sgd adversary."""
    tx = ft.contrib.sam(
        optax.sgd(0.1),
        optax.chain(ft.contrib.normalize(), optax.sgd(0.05)),
        sync_period=2,
        opaque_mode=True,
    )
    got = _run(tx, grad_fn=lambda pp, _i: grad(_loss)(pp))
    x = list(_X0)
    for _ in range(4):
        g = _g(x)
        n = _norm(g)
        g_adv = _g([xi + 0.05 * gi / n for xi, gi in zip(x, g)])
        x = [xi - 0.1 * gi for xi, gi in zip(x, g_adv)]
    _close(got, x)


def test_contrib_split_real_and_imaginary_program():
    """Adam on the real and imaginary parts of complex parameters, separately."""
    tx = ft.contrib.split_real_and_imaginary(optax.adam(0.1))
    p = torch.tensor([1 + 2j, -0.5 + 0.1j], dtype=torch.complex128)
    target = torch.tensor(0.2 - 1j, dtype=torch.complex128)
    s = tx.init(p)
    for _ in range(3):
        # torch's gradient of a real loss is ∂L/∂re + i·∂L/∂im (optax programs write conj(jax.grad))
        g = grad(lambda z: torch.sum(torch.abs(z - target) ** 2))(p)
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
    re = _adam_hand([1.0, -0.5], lambda x: [2 * (xi - 0.2) for xi in x], [0.1] * 3)
    im = _adam_hand([2.0, 0.1], lambda y: [2 * (yi + 1.0) for yi in y], [0.1] * 3)
    _close(p.real, re)
    _close(p.imag, im)
