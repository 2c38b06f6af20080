"""signum, normalize_by_update_norm, scale_by_distance_over_gradients (DoG), the per-layer
per-example clip, optax's base helpers (stateless_with_tree_map, with_extra_args_support, …)
and its numerics (global_norm, safe_norm, safe_root_mean_squares, safe_increment).

References are float64 loops written from optax 0.2.8's formulas, element by element."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter

import functrain as ft
from functrain import testing

F64 = torch.float64


def _grads(steps: int = 8) -> list[dict[str, torch.Tensor]]:
    """Varying gradients with zeros and sign flips."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in range(steps):
        w = torch.randn(3, 2, generator=gen, dtype=F64) * (-1) ** t
        b = torch.zeros(2, dtype=F64) if t in (1, 2) else torch.randn(2, generator=gen, dtype=F64)
        out.append({"w": w, "b": b})
    return out


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(3, 2, generator=gen, dtype=F64),
        "b": torch.randn(2, dtype=F64, generator=gen),
    }


def _run(tx, grads, params):
    state, outs = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params)
        outs.append(u)
        params = ft.apply_updates(params, u)
    return outs


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


def test_signum_matches_hand_loop() -> None:
    lr, beta = 0.05, 0.7
    grads, params = _grads(), _params()
    outs = _run(ft.signum(lr, beta), grads, params)
    m = {k: [0.0] * v.numel() for k, v in params.items()}
    for g, u in zip(grads, outs):
        for k in g:
            for i, gi in enumerate(g[k].flatten().tolist()):
                m[k][i] = beta * m[k][i] + (1 - beta) * gi
                assert u[k].flatten()[i].item() == pytest.approx(-lr * _sign(m[k][i]), abs=1e-12)


def test_normalize_by_update_norm_matches_hand_loop() -> None:
    grads, params = _grads(), _params()
    outs = _run(ft.normalize_by_update_norm(-0.3, 1e-3), grads, params)
    for g, u in zip(grads, outs):
        flat = [x for v in g.values() for x in v.flatten().tolist()]
        denom = (math.sqrt(sum(x * x for x in flat)) + 1e-3) / -0.3
        for k in g:
            want = [x / denom for x in g[k].flatten().tolist()]
            assert u[k].flatten().tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    zero = {"w": torch.zeros(3, 2, dtype=F64)}
    assert ft.normalize_by_update_norm().update(zero, ft.EmptyState())[0]["w"].abs().sum() == 0


def test_dog_matches_hand_loop() -> None:
    reps, eps, scale = 1e-2, 1e-4, -1.0
    grads, params = _grads(), _params()
    tx = ft.scale_by_distance_over_gradients(reps, eps, F64, scale)
    outs = _run(tx, grads, params)
    x0 = {k: v.flatten().tolist() for k, v in params.items()}
    x = {k: list(v) for k, v in x0.items()}
    d = {k: reps * (1 + math.sqrt(sum(a * a for a in v))) for k, v in x0.items()}
    G = {k: 0.0 for k in x0}
    for g, u in zip(grads, outs):
        for k in g:
            d[k] = max(d[k], math.sqrt(sum((a - b) ** 2 for a, b in zip(x[k], x0[k]))))
            gk = g[k].flatten().tolist()
            G[k] += sum(a * a for a in gk)
            want = [scale * d[k] / math.sqrt(G[k] + eps) * a for a in gk]
            assert u[k].flatten().tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
            x[k] = [a + b for a, b in zip(x[k], want)]


def test_dog_state_and_scalar_leaf() -> None:
    tx = ft.scale_by_distance_over_gradients(reps_rel=0.5, eps=0.0)
    p = {"s": torch.tensor(2.0), "h": torch.ones(2, dtype=torch.bfloat16)}
    state = tx.init(p)
    assert state._fields == ("max_dist", "grad_sum_of_squares", "init_params")
    assert state.grad_sum_of_squares["s"].shape == (1,)
    assert state.max_dist["h"].dtype == torch.float32  # bfloat16 leaves: float32 scalars
    assert state.init_params["s"] is not p["s"]  # a copy, not an alias of the live params
    u, _ = tx.update({"s": torch.tensor(1.0), "h": torch.ones(2, dtype=torch.bfloat16)}, state, p)
    assert u["s"].shape == () and u["h"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"s": torch.tensor(1.0)}, tx.init({"s": torch.tensor(1.0)}))
    with pytest.raises(TypeError, match=r"params\['z'\].*complex"):
        tx.init({"z": torch.ones(2, dtype=torch.complex64)})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ft.scale_by_distance_over_gradients(reps_rel=-1.0), "reps_rel"),
        (lambda: ft.scale_by_distance_over_gradients(eps=-1.0), "eps"),
        (lambda: ft.scale_by_distance_over_gradients(global_scale=math.nan), "global_scale"),
        (lambda: ft.scale_by_distance_over_gradients(param_dtype=torch.int32), "param_dtype"),
        (lambda: ft.normalize_by_update_norm(eps=-1e-3), "eps"),
        (lambda: ft.normalize_by_update_norm(scale_factor=math.inf), "scale_factor"),
        (lambda: ft.signum(0.1, beta=1.5), "beta"),
        (lambda: ft.per_example_layer_norm_clip([torch.ones(2, 3)], -1.0), "global_l2_norm_clip"),
        (lambda: ft.per_example_layer_norm_clip([torch.ones(2), torch.ones(3)], 1.0), "leading"),
        (lambda: ft.safe_increment(torch.tensor(True)), "bool"),
    ],
)
def test_bad_arguments(make, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make()


TXS = {
    "signum": lambda: ft.signum(ft.linear_schedule(0.1, 0.01, 5)),
    "normalize": lambda: ft.normalize_by_update_norm(-1.0),
    "dog": lambda: ft.scale_by_distance_over_gradients(1e-3, global_scale=-1.0),
}


@pytest.mark.parametrize("name", sorted(TXS))
def test_pure_masked_bf16(name: str) -> None:
    params = {"a": torch.randn(3, dtype=torch.bfloat16), "b": torch.randn(2, 2)}
    g = {"a": torch.randn(3, dtype=torch.bfloat16), "b": torch.randn(2, 2)}
    tx = TXS[name]()
    state = tx.init(params)
    copies = [x.clone() for x in ft.tree.leaves((g, state, params))]
    u, _ = tx.update(g, state, params)
    for x, c in zip(ft.tree.leaves((g, state, params)), copies):
        assert torch.equal(x, c)
    assert u["a"].dtype == torch.bfloat16 and torch.isfinite(u["a"].float()).all()
    masked = ft.masked(TXS[name](), {"a": False, "b": True})
    mu, _ = masked.update(g, masked.init(params), params)
    assert torch.equal(mu["a"], g["a"])
    empty = TXS[name]()
    assert empty.update({}, empty.init({}), {})[0] == {}


@pytest.mark.parametrize("name", sorted(TXS))
def test_compiles_once(name: str) -> None:
    torch._dynamo.reset()
    tx = TXS[name]()
    params = {"w": torch.randn(3, 2)}
    counter = CompileCounter()
    compiled = torch.compile(tx.update, backend=counter, fullgraph=True)
    state_e = state_c = tx.init(params)
    for t in range(4):
        g = {"w": torch.randn(3, 2) * (t - 1)}
        ue, state_e = tx.update(g, state_e, params)
        uc, state_c = compiled(g, state_c, params)
        testing.assert_trees_all_close(uc, ue, rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_signum_inject_hyperparams_and_train_step() -> None:
    tx = ft.inject_hyperparams(ft.signum)(learning_rate=0.1)
    state = tx.init({"w": torch.zeros(2)})
    u, _ = tx.update({"w": torch.tensor([1.0, -1.0])}, state)
    testing.assert_trees_all_close(u, {"w": torch.tensor([-0.1, 0.1])})

    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=F64)
    batch = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)}

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()

    for tx in (ft.signum(0.05), ft.chain(ft.normalize_by_update_norm(), ft.scale(-0.1))):
        step = ft.make_train_step(loss_fn, tx, micro_batches=2)
        state = step.prepare(ft.TrainState.create(params={"w": torch.zeros(3, dtype=F64)}, tx=tx))
        losses = []
        for _ in range(5):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        assert losses[-1] < losses[0]


def _layer_clip_reference(grads: list[torch.Tensor], clip: float, uniform: bool):
    sizes = [g[0].numel() for g in grads]
    sums, counts = [], []
    for g, n in zip(grads, sizes):
        c = clip / math.sqrt(len(grads)) if uniform else clip * math.sqrt(n / sum(sizes))
        acc, count = [0.0] * n, 0
        for ex in g:
            flat = ex.flatten().tolist()
            norm = math.sqrt(sum(a * a for a in flat))
            f = 1.0 if norm == 0 else min(1.0, c / norm)
            count += f < 1
            acc = [a + f * b for a, b in zip(acc, flat)]
        sums.append(acc)
        counts.append(count)
    return sums, counts


@pytest.mark.parametrize("uniform", [True, False])
def test_per_example_layer_norm_clip_reference(uniform: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    grads = [
        torch.randn(5, 3, 2, generator=gen, dtype=F64),
        torch.randn(5, 4, generator=gen, dtype=F64),
    ]
    grads[1][2] = 0.0  # a zero example: factor 1, not clipped
    before = [g.clone() for g in grads]
    out, counts = ft.per_example_layer_norm_clip(grads, 1.7, uniform)
    sums, want_counts = _layer_clip_reference(grads, 1.7, uniform)
    for o, s in zip(out, sums):
        assert o.flatten().tolist() == pytest.approx(s, rel=1e-12, abs=1e-14)
    assert [int(c) for c in counts] == want_counts
    assert all(torch.equal(a, b) for a, b in zip(grads, before))
    one = [grads[0]]
    testing.assert_trees_all_close(
        ft.per_example_layer_norm_clip(one, 1.7)[0], ft.per_example_global_norm_clip(one, 1.7)[0]
    )
    inf_sum, inf_counts = ft.per_example_layer_norm_clip(grads, math.inf)
    testing.assert_trees_all_close(inf_sum, [g.sum(0) for g in grads])
    assert [int(c) for c in inf_counts] == [0, 0]


def test_base_helpers() -> None:
    assert ft.init_empty_state({"w": torch.ones(1)}) == ft.EmptyState()
    tx = ft.stateless_with_tree_map(lambda u, p: u * 2 if p is None else u + p)
    masked = {"w": torch.ones(2), "m": None}
    assert tx.update(masked, tx.init(None))[0]["m"] is None
    testing.assert_trees_all_close(
        tx.update({"w": torch.ones(2)}, ft.EmptyState())[0], {"w": torch.full((2,), 2.0)}
    )
    p = {"w": torch.full((2,), 3.0)}
    testing.assert_trees_all_close(
        tx.update({"w": torch.ones(2)}, ft.EmptyState(), p)[0], {"w": torch.full((2,), 4.0)}
    )

    def plain_update(u, s, p=None):  # a user transform without **kwargs
        return ft.tree.scale(-1.0, u), s

    plain = ft.GradientTransformationExtraArgs(ft.init_empty_state, plain_update)
    with pytest.raises(TypeError):
        plain.update([torch.ones(1)], ft.EmptyState(), None, loss=1.0)
    wrapped = ft.with_extra_args_support(plain)
    assert wrapped.update([torch.ones(1)], ft.EmptyState(), None, loss=1.0)[0][0].item() == -1.0
    sgd = ft.sgd(0.1)
    assert ft.with_extra_args_support(sgd) is sgd
    assert isinstance(sgd, ft.GradientTransformationExtraArgs)
    with pytest.raises(TypeError, match="with_extra_args_support"):
        ft.with_extra_args_support(42)


def test_numerics() -> None:
    g = {"a": torch.tensor([3.0], dtype=F64), "b": torch.tensor([4.0], dtype=F64)}
    assert ft.global_norm(g).item() == 5.0
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    n = ft.safe_norm(x, 0.1)
    assert n.item() == 0.1 and torch.equal(torch.autograd.grad(n, x)[0], torch.zeros(3, dtype=F64))
    r = ft.safe_root_mean_squares(x, 0.2)
    assert r.item() == 0.2 and torch.equal(torch.autograd.grad(r, x)[0], torch.zeros(3, dtype=F64))
    m = torch.tensor([[3.0, -4.0], [0.0, 0.0]], dtype=F64)
    assert ft.safe_norm(m, 0.5, 1, 1).tolist() == [7.0, 0.5]
    assert ft.safe_norm(m, 0.5, axis=1, keepdims=True).shape == (2, 1)
    assert ft.safe_root_mean_squares(m, 0.0).item() == pytest.approx(math.sqrt(25 / 4), rel=1e-15)
    i32 = torch.tensor(2**31 - 1, dtype=torch.int32)
    assert ft.safe_increment(i32).item() == 2**31 - 1
    assert ft.safe_increment(torch.tensor(2**31 - 1, dtype=torch.int64)).item() == 2**31
    assert ft.safe_int32_increment(torch.tensor(5, dtype=torch.int8)).dtype == torch.int8
    assert ft.safe_increment(torch.tensor(127, dtype=torch.int8)).item() == 127
    assert ft.safe_increment(torch.tensor(1.5)).item() == 2.5


@settings(max_examples=30, deadline=None)
@given(st.floats(0.01, 100.0), st.integers(0, 2**16))
def test_normalize_is_scale_invariant(c: float, seed: int) -> None:
    g = torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=F64)
    tx = ft.normalize_by_update_norm(eps=0.0)
    a, _ = tx.update([g], ft.EmptyState())
    b, _ = tx.update([c * g], ft.EmptyState())
    testing.assert_trees_all_close(a, b, rtol=1e-12, atol=1e-14)
    assert ft.tree.norm(a).item() == pytest.approx(1.0, rel=1e-12)
