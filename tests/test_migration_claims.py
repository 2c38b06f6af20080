"""Numerical checks of the claims made in docs/migration/ and docs/concepts/.

Every test names the page and the claim it checks. References are the real ``torch.optim``
optimizers and schedulers, or optax's formulas (optax is not installed) written out by hand in
float64; no expected value comes from functrain itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import functrain as ft

F64 = torch.float64


def _grads(n: int, shape: tuple[int, ...] = (5,), seed: int = 0) -> list[torch.Tensor]:
    """A fixed float64 gradient sequence."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]


def _torch_traj(
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    p0: torch.Tensor,
    grads: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Parameters after each step of a torch.optim optimizer fed ``grads``."""
    p = torch.nn.Parameter(p0.clone())
    opt = make([p])
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


def _ft_traj(
    tx: ft.GradientTransformation, p0: torch.Tensor, grads: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Parameters after each functrain update fed ``grads``."""
    params = {"w": p0.clone()}
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = tx.update({"w": g.clone()}, state, params)
        params = ft.apply_updates(params, updates)
        out.append(params["w"].clone())
    return out


def _assert_same_traj(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14, msg=f"step {i}")


P0 = torch.linspace(-1.0, 1.0, 5, dtype=F64)


# --- from-torch-optim.md: the optimizer table ------------------------------------------


@pytest.mark.parametrize(("momentum", "nesterov"), [(None, False), (0.9, False), (0.9, True)])
def test_sgd_same_trajectory_as_torch(momentum: float | None, nesterov: bool) -> None:
    """`SGD(lr, momentum, nesterov)` == `ft.sgd(lr, momentum, nesterov)` (dampening=0)."""
    grads = _grads(6)
    ref = _torch_traj(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum or 0.0, nesterov=nesterov),
        P0,
        grads,
    )
    _assert_same_traj(_ft_traj(ft.sgd(0.1, momentum, nesterov), P0, grads), ref)


def test_sgd_coupled_weight_decay_as_torch() -> None:
    """`SGD(..., weight_decay=wd)` == `chain(add_decayed_weights(wd), sgd(lr, ...))`."""
    grads = _grads(6)
    ref = _torch_traj(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05), P0, grads
    )
    tx = ft.chain(ft.add_decayed_weights(0.05), ft.sgd(0.1, momentum=0.9))
    _assert_same_traj(_ft_traj(tx, P0, grads), ref)


def test_adam_same_trajectory_as_torch() -> None:
    """`Adam(lr, betas=(b1, b2), eps)` == `ft.adam(lr, b1, b2, eps)`."""
    grads = _grads(8)
    ref = _torch_traj(
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6), P0, grads
    )
    _assert_same_traj(_ft_traj(ft.adam(0.01, 0.8, 0.99, 1e-6), P0, grads), ref)


def test_adamw_same_trajectory_and_default_decays() -> None:
    """`AdamW(lr, weight_decay=wd)` == `ft.adamw(lr, weight_decay=wd)`; defaults 1e-2 vs 1e-4."""
    grads = _grads(8)
    ref = _torch_traj(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1), P0, grads)
    _assert_same_traj(_ft_traj(ft.adamw(0.01, weight_decay=0.1), P0, grads), ref)
    p = torch.nn.Parameter(torch.zeros(1))
    assert torch.optim.AdamW([p]).defaults["weight_decay"] == 1e-2
    # optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None,
    # weight_decay=1e-4, mask=None)
    p0 = torch.ones(1, dtype=F64)
    one_step = _ft_traj(ft.adamw(0.5), p0, [torch.zeros(1, dtype=F64)])[0]
    torch.testing.assert_close(one_step, p0 - 0.5 * 1e-4 * p0, rtol=1e-15, atol=0)


def _optax_amsgrad(grads: Sequence[torch.Tensor], lr: float, b1: float, b2: float, eps: float):
    """optax.scale_by_amsgrad: nu_max = max(nu_max, nu_hat), the *bias-corrected* moment."""
    p = P0.clone()
    mu = torch.zeros_like(p)
    nu = torch.zeros_like(p)
    nu_max = torch.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        mu_hat = mu / (1 - b1**t)
        nu_hat = nu / (1 - b2**t)
        nu_max = torch.maximum(nu_max, nu_hat)
        p = p - lr * mu_hat / (nu_max.sqrt() + eps)
        out.append(p.clone())
    return out


def test_amsgrad_is_optax_variant() -> None:
    """`ft.amsgrad` takes the maximum of the bias-corrected second moment (optax)."""
    grads = _grads(10)
    _assert_same_traj(
        _ft_traj(ft.amsgrad(0.01, 0.9, 0.99), P0, grads),
        _optax_amsgrad(grads, 0.01, 0.9, 0.99, 1e-8),
    )


def _torch_amsgrad(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return _torch_traj(lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True), P0, grads)


def test_amsgrad_agrees_with_torch_while_bias_corrected_moment_grows() -> None:
    """With a non-decreasing |g| (so nu_hat never decreases) the two variants coincide."""
    grads = [torch.full((5,), 1.0 + 0.1 * t, dtype=F64) for t in range(8)]
    _assert_same_traj(_ft_traj(ft.amsgrad(0.01), P0, grads), _torch_amsgrad(grads))


def test_amsgrad_differs_from_torch_when_only_raw_moment_grows() -> None:
    """|g| 1 then 0.75: the raw nu grows, the bias-corrected one falls, and the steps differ."""
    grads = [torch.full((5,), 1.0, dtype=F64), torch.full((5,), 0.75, dtype=F64)]
    b2 = 0.999
    nu1, nu2 = (1 - b2) * 1.0, b2 * (1 - b2) + (1 - b2) * 0.5625
    assert nu2 > nu1 and nu2 / (1 - b2**2) < nu1 / (1 - b2)
    ours, ref = _ft_traj(ft.amsgrad(0.01), P0, grads), _torch_amsgrad(grads)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(ours[1], ref[1], rtol=1e-9, atol=0)


def test_rmsprop_eps_outside_root_equals_torch() -> None:
    """`RMSprop(lr, alpha, eps)` == `ft.rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=False)`."""
    grads = _grads(8)
    ref = _torch_traj(lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-3), P0, grads)
    ours = _ft_traj(ft.rmsprop(0.01, decay=0.9, eps=1e-3, eps_in_sqrt=False), P0, grads)
    _assert_same_traj(ours, ref)
    # optax's default (eps inside the root) is a different trajectory.
    other = _ft_traj(ft.rmsprop(0.01, decay=0.9, eps=1e-3), P0, grads)
    assert not torch.allclose(other[-1], ref[-1], rtol=1e-9, atol=0)


def test_adagrad_equals_torch_with_eps_zero_only() -> None:
    """`ft.adagrad(lr, v, eps=0)` == `Adagrad(lr, initial_accumulator_value=v, eps=0)`."""
    grads = _grads(8)

    def ref(eps: float) -> list[torch.Tensor]:
        return _torch_traj(
            lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1, eps=eps),
            P0,
            grads,
        )

    _assert_same_traj(_ft_traj(ft.adagrad(0.1, 0.1, eps=0.0), P0, grads), ref(0.0))
    # A nonzero eps goes inside the root here and outside in PyTorch: no equal setting.
    ours = _ft_traj(ft.adagrad(0.1, 0.1, eps=1e-2), P0, grads)
    assert not torch.allclose(ours[-1], ref(1e-2)[-1], rtol=1e-9, atol=0)


def test_adagrad_defaults_are_optax() -> None:
    """optax.adagrad(learning_rate, initial_accumulator_value=0.1, eps=1e-7): s ← 0.1 + g²."""
    g = torch.tensor([2.0, 0.5], dtype=F64)
    ours = _ft_traj(ft.adagrad(1.0), torch.zeros(2, dtype=F64), [g])[0]
    torch.testing.assert_close(ours, -g / torch.sqrt(0.1 + g * g + 1e-7), rtol=1e-14, atol=0)


def test_clip_by_global_norm_has_no_epsilon() -> None:
    """No `1e-6` in the norm (unlike clip_grad_norm_), and no change under the threshold."""
    g = torch.tensor([3.0, 4.0], dtype=F64)  # norm 5
    tx = ft.clip_by_global_norm(1.0)
    clipped, _ = tx.update({"w": g}, tx.init({"w": g}))
    torch.testing.assert_close(clipped["w"], g / 5.0, rtol=1e-15, atol=0)
    p = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    torch.testing.assert_close(p.grad, g / (5.0 + 1e-6), rtol=1e-15, atol=0)
    small = torch.tensor([0.3, -0.4], dtype=torch.float32)
    kept, _ = tx.update({"w": small}, tx.init({"w": small}))
    assert torch.equal(kept["w"], small)


def test_clip_equals_clip_grad_value() -> None:
    """`clip_grad_value_(p, v)` == `ft.clip(v)`."""
    g = _grads(1)[0] * 3
    p = torch.nn.Parameter(torch.zeros(5, dtype=F64))
    p.grad = g.clone()
    torch.nn.utils.clip_grad_value_([p], 0.7)
    tx = ft.clip(0.7)
    ours, _ = tx.update({"w": g}, tx.init({"w": g}))
    assert torch.equal(ours["w"], p.grad)


# --- from-torch-optim.md: the schedule table --------------------------------------------


def _torch_lrs(make: Callable[[torch.optim.Optimizer], Any], n: int, lr: float = 1.0):
    """The learning rate torch uses at optimizer steps 0..n-1."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _check_schedule(schedule: Callable[[int], Any], ref: list[float], rel: float = 1e-6) -> None:
    for t, want in enumerate(ref):
        assert float(schedule(t)) == pytest.approx(want, rel=rel, abs=1e-12), f"step {t}"


def test_schedules_match_lr_scheduler() -> None:
    """The schedule table: each lr_scheduler and its functrain counterpart, step by step."""
    sch = torch.optim.lr_scheduler
    n = 25
    _check_schedule(
        ft.linear_schedule(0.25, 1.0, 10), _torch_lrs(lambda o: sch.LinearLR(o, 0.25, 1.0, 10), n)
    )
    _check_schedule(
        ft.exponential_decay(1.0, 1, 0.9), _torch_lrs(lambda o: sch.ExponentialLR(o, 0.9), n)
    )
    _check_schedule(
        ft.exponential_decay(1.0, 7, 0.5, staircase=True),
        _torch_lrs(lambda o: sch.StepLR(o, 7, 0.5), n),
    )
    _check_schedule(
        ft.piecewise_constant_schedule(1.0, {5: 0.1, 12: 0.1}),
        _torch_lrs(lambda o: sch.MultiStepLR(o, [5, 12], 0.1), n),
    )
    _check_schedule(
        ft.cosine_decay_schedule(1.0, 20, alpha=0.05),
        _torch_lrs(lambda o: sch.CosineAnnealingLR(o, 20, eta_min=0.05), 21),
    )
    _check_schedule(
        ft.polynomial_schedule(1.0, 0.0, 2.0, 10),
        _torch_lrs(lambda o: sch.PolynomialLR(o, 10, 2.0), n),
    )


# --- from-optax.md --------------------------------------------------------------------


def test_tree_mismatch_message_quoted_on_page() -> None:
    """The message `updates['fc']['bias']: shape (3,) does not match params[...] shape (4,)`."""
    params = {"fc": {"weight": torch.zeros(3, 4), "bias": torch.zeros(4)}}
    updates = {"fc": {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}}
    with pytest.raises(ft.tree.TreeMismatchError) as info:
        ft.apply_updates(params, updates)
    assert str(info.value) == (
        "updates['fc']['bias']: shape (3,) does not match params['fc']['bias'] shape (4,)"
    )


def test_counters_are_int32_and_saturate() -> None:
    """Counts are 0-d int32 tensors that saturate at the largest int32."""
    params = {"w": torch.zeros(2)}
    tx = ft.adam(0.1)
    state = tx.init(params)
    count = state[0].count
    assert count.dtype == torch.int32 and count.dim() == 0
    top = torch.iinfo(torch.int32).max
    state = (state[0]._replace(count=torch.tensor(top, dtype=torch.int32)), *state[1:])
    _, state = tx.update({"w": torch.ones(2)}, state, params)
    assert int(state[0].count) == top


def test_schedule_return_kinds() -> None:
    """`schedule(100)` is a float, `schedule(count)` a tensor, tensor-built ones tensors."""
    s = ft.linear_schedule(1.0, 0.0, 200)
    assert isinstance(s(100), float) and s(100) == pytest.approx(0.5)
    out = s(torch.tensor(100, dtype=torch.int32))
    assert isinstance(out, torch.Tensor) and float(out) == pytest.approx(0.5)
    c = ft.constant_schedule(torch.tensor(0.1))
    assert isinstance(c(3), torch.Tensor)
    assert isinstance(c(torch.tensor(3, dtype=torch.int32)), torch.Tensor)


def test_learning_rate_read_before_increment() -> None:
    """The first update uses schedule(0), the second schedule(1), as in optax."""
    grads = [torch.ones(1, dtype=F64)] * 2
    tx = ft.sgd(ft.piecewise_constant_schedule(1.0, {1: 0.5}))
    traj = _ft_traj(tx, torch.zeros(1, dtype=F64), grads)
    assert [float(x) for x in traj] == [-1.0, -1.5]


def test_schedule_counts_optimizer_steps_not_micro_batches() -> None:
    """from-torch-optim.md: one schedule evaluation per optimizer step, any micro-batching."""
    model, params, _ = ft.functionalize(torch.nn.Linear(3, 1))

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return model(p, b["x"]).mean()

    tx = ft.sgd(ft.piecewise_constant_schedule(1.0, {1: 0.5, 2: 0.5}))
    step = ft.make_train_step(loss_fn, tx, micro_batches=4)
    state = ft.TrainState.create(params=params, tx=tx)
    batch = {"x": torch.ones(8, 3)}
    before = state.params["bias"].clone()
    state, _ = step(state, batch)
    # d(mean output)/d bias = 1 for the full batch, whatever K; lr at step 0 is 1.0.
    torch.testing.assert_close(state.params["bias"], before - 1.0)
    b1 = state.params["bias"].clone()
    state, _ = step(state, batch)
    torch.testing.assert_close(state.params["bias"], b1 - 0.5)
    assert int(state.step) == 2


def test_random_key_is_cpu_int64_scalar() -> None:
    """from-optax.md / randomness-and-buffers.md: a key is a 0-d int64 CPU tensor."""
    key = ft.random_key(3)
    assert key.dtype == torch.int64 and key.dim() == 0 and key.device.type == "cpu"


# --- concepts/ ------------------------------------------------------------------------


def test_update_never_modifies_inputs() -> None:
    """pure-steps-and-pytrees.md / donation.md: `tx.update` modifies nothing it is given."""
    params = {"w": torch.randn(4)}
    grads = {"w": torch.randn(4)}
    tx = ft.chain(ft.clip_by_global_norm(0.1), ft.adamw(0.1))
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    snap = ft.tree.map(torch.clone, (grads, state, params))
    tx.update(grads, state, params)
    ft.testing.assert_trees_all_equal((grads, state, params), snap)


def test_functionalize_detached_and_create_copies() -> None:
    """no-grad.md / donation.md: detached params; `create` copies unless copy=False."""
    net = torch.nn.Linear(3, 2)
    _, params, _ = ft.functionalize(net)
    assert all(not t.requires_grad for t in ft.tree.leaves(params))
    tx = ft.sgd(0.1)
    copied = ft.TrainState.create(params=params, tx=tx)
    shared = ft.TrainState.create(params=params, tx=tx, copy=False)
    assert copied.params["weight"].data_ptr() != params["weight"].data_ptr()
    assert shared.params["weight"].data_ptr() == params["weight"].data_ptr()


def test_grad_backends_agree_and_step_counts() -> None:
    """no-grad.md: "func" and "autograd" give the same numbers to rounding; step + 1."""
    model, params, _ = ft.functionalize(torch.nn.Linear(4, 2))

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(p, b["x"]), b["y"])

    batch = {"x": torch.randn(10, 4), "y": torch.randn(10, 2)}
    tx = ft.adam(1e-2)
    out = {}
    for backend in ("func", "autograd"):
        step = ft.make_train_step(loss_fn, tx, micro_batches=[6, 4], grad_backend=backend)
        state, _ = step(ft.TrainState.create(params=params, tx=tx), batch)
        assert int(state.step) == 1
        out[backend] = state.params
    ft.testing.assert_trees_all_close(out["func"], out["autograd"], rtol=1e-6, atol=1e-7)


def test_per_sample_grads_leading_batch_dim() -> None:
    """no-grad.md: per-example gradients get a leading batch dimension on every leaf."""
    model, params, _ = ft.functionalize(torch.nn.Linear(4, 2))

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return model(p, b["x"]).pow(2).sum()

    batch = {"x": torch.randn(5, 4)}
    psg = ft.per_sample_grads(loss_fn, params, batch)
    for name, t in params.items():
        assert psg[name].shape == (5, *t.shape)
    full = torch.func.grad(loss_fn)(params, batch)
    ft.testing.assert_trees_all_close(
        ft.tree.map(lambda t: t.sum(0), psg), full, rtol=1e-5, atol=1e-6
    )


def test_global_norm_example() -> None:
    """pure-steps-and-pytrees.md: the norm of 15 ones is sqrt(15), computed in float64."""
    grads = {"a": torch.ones(3, 4, dtype=F64), "b": torch.ones(3, dtype=F64)}
    assert float(ft.tree.norm(grads)) == pytest.approx(math.sqrt(15.0), rel=1e-15)


def _optax_cosine_onecycle(t: int, steps: int, peak: float) -> float:
    """optax.cosine_onecycle_schedule(steps, peak) with its defaults, in float64.

    optax interpolates cosine-wise from peak/25 to peak over [0, int(0.3 * steps)], then to
    peak / 25 / 1e4 over [int(0.3 * steps), steps], and stays there.
    """
    b1, init = int(0.3 * steps), peak / 25.0
    final = init / 1e4
    if t >= steps:
        return final
    start, end, lo, hi = (init, peak, 0, b1) if t < b1 else (peak, final, b1, steps)
    frac = (t - lo) / (hi - lo)
    return end + (start - end) * (1 + math.cos(math.pi * frac)) / 2


def test_cosine_onecycle_is_optax_and_one_step_after_torch() -> None:
    """from-torch-optim.md: optax's timing; OneCycleLR reaches peak and end one step earlier."""
    steps = 20
    f = ft.cosine_onecycle_schedule(steps, 1.0)
    for t in range(steps + 3):
        assert float(f(t)) == pytest.approx(_optax_cosine_onecycle(t, steps, 1.0), rel=1e-12)
    sch = torch.optim.lr_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    one_cycle = sch.OneCycleLR(opt, max_lr=1.0, total_steps=steps)
    ref = []
    for t in range(steps):  # OneCycleLR refuses to be stepped past total_steps - 1
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        if t < steps - 1:
            one_cycle.step()
    # torch's peak is at pct_start * T - 1 = 5, functrain's at 6, torch's end at T - 1,
    # functrain's at T; the annealing phases match one step apart.
    assert ref[5] == pytest.approx(1.0) and float(f(6)) == pytest.approx(1.0)
    assert ref[steps - 1] == pytest.approx(float(f(steps)), rel=1e-6)
    for t in range(5, steps):
        assert float(f(t + 1)) == pytest.approx(ref[t], rel=1e-6)


def test_metrics_grad_norm_is_before_clipping() -> None:
    """from-torch-optim.md: `grad_norm` is what clip_grad_norm_ returns (the unclipped norm)."""
    model, params, _ = ft.functionalize(torch.nn.Linear(3, 1))

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return 100.0 * model(p, b["x"]).mean()

    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.sgd(0.1))
    state = ft.TrainState.create(params=params, tx=tx)
    _, metrics = ft.make_train_step(loss_fn, tx)(state, {"x": torch.ones(4, 3)})
    # d/dw = 100 * ones(1, 3), d/db = 100: norm 100 * sqrt(1 + 3) = 200.
    assert float(metrics["grad_norm"]) == pytest.approx(200.0, rel=1e-6)


def test_replaced_states_share_donation() -> None:
    """donation.md: consuming one of two states made with `replace` consumes both."""
    model, params, _ = ft.functionalize(torch.nn.Linear(3, 1))

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return model(p, b["x"]).mean()

    tx = ft.sgd(0.1)
    state = ft.TrainState.create(params=params, tx=tx)
    sibling = state.replace(extra={"tag": 1})
    ft.make_train_step(loss_fn, tx)(state, {"x": torch.ones(2, 3)})
    for consumed in (state, sibling):
        with pytest.raises(ft.ConsumedStateError):
            _ = consumed.params


def test_keys_per_step_and_micro_batch() -> None:
    """randomness-and-buffers.md: same state, same keys; one key per micro-batch; key advances."""
    model, params, _ = ft.functionalize(torch.nn.Linear(3, 1))
    seen: list[int] = []

    def loss_fn(p: Any, b: Any, key: torch.Tensor) -> torch.Tensor:
        seen.append(int(key))
        return model(p, b["x"]).mean()

    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, donate=False)
    state = ft.TrainState.create(params=params, tx=tx, seed=0)
    batch = {"x": torch.ones(4, 3)}
    new_state, _ = step(state, batch)
    first = list(seen)
    step(state, batch)
    assert seen[2:] == first and len(first) == 2 and first[0] != first[1]
    assert int(new_state.key) != int(state.key)
    step(new_state, batch)
    assert set(seen[4:]).isdisjoint(first)


def test_noisy_sgd_resumes_same_noise() -> None:
    """from-optax.md: noise state lives in opt_state, so a restored copy continues the stream."""
    params = {"w": torch.zeros(4)}
    grads = {"w": torch.zeros(4)}
    tx = ft.noisy_sgd(0.1, seed=3)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    saved = ft.tree.map(torch.clone, state)
    a, _ = tx.update(grads, state, params)
    b, _ = tx.update(grads, saved, params)
    assert torch.equal(a["w"], b["w"])
    c, _ = tx.update(grads, tx.init(params), params)
    assert not torch.equal(a["w"], c["w"])
