"""Review of wrapper edges: masks, MultiSteps resumes, loss scaling, inject_hyperparams, purity.

References are naive loops, float64 formulas written out here, or torch's own loss-scale op.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch

import functrain as ft


def _params() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=gen),
        "b": torch.randn(3, generator=gen),
        "s": [torch.randn((), generator=gen), torch.randn(2, 2, 2, generator=gen)],
    }


def _grads(params: dict, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return ft.tree.map(lambda p: torch.randn(p.shape, generator=gen), params)


def _snapshot(x):
    return ft.tree.map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, x)


# --- masks -----------------------------------------------------------------------------------


def test_numpy_bool_mask_leaves_are_accepted():
    # NumPy 2 names its scalar bool type ``numpy.bool``; it was refused as "not a bool".
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    tx = ft.masked(ft.scale(-1.0), {"w": np.bool_(True), "b": np.bool_(False)})
    updates, _ = tx.update(params, tx.init(params))
    assert updates["w"].tolist() == [-1.0, -1.0]
    assert updates["b"].tolist() == [1.0]


def _ndim_mask(tree):
    return ft.tree.map(lambda x: x.ndim > 1, tree)


def _ndim_labels(tree):
    return ft.tree.map(lambda x: "matrix" if x.ndim > 1 else "other", tree)


CALLABLE_MASKS = {
    "masked": lambda: ft.masked(ft.scale(-1.0), _ndim_mask),
    "adamw_mask": lambda: ft.adamw(0.1, weight_decay=0.5, mask=_ndim_mask),
    "partition": lambda: ft.partition(
        {"matrix": ft.scale(-1.0), "other": ft.scale(3.0)}, _ndim_labels
    ),
}


@pytest.mark.parametrize("name", sorted(CALLABLE_MASKS))
def test_callable_masks_built_with_tree_map_compile_fullgraph(name):
    # The docstrings' own pattern, ``lambda p: ft.tree.map(lambda x: x.ndim > 1, p)``, failed
    # inside torch.compile (optree unflatten of Python constants).
    params = _params()
    grads = _grads(params)
    tx = CALLABLE_MASKS[name]()
    state = tx.init(params)
    eager, eager_state = tx.update(grads, state, params)
    compiled, compiled_state = torch.compile(tx.update, fullgraph=True)(grads, state, params)
    ft.testing.assert_trees_all_close(compiled, eager, rtol=1e-6, atol=1e-7)
    ft.testing.assert_trees_all_close(compiled_state, eager_state, rtol=1e-6, atol=1e-7)
    if name != "adamw_mask":
        # Matrices (w and the 3-d leaf) get the first transform, the rest the other or none.
        other = 3.0 if name == "partition" else 1.0
        expected = {
            "w": -grads["w"],
            "b": other * grads["b"],
            "s": [other * grads["s"][0], -grads["s"][1]],
        }
        ft.testing.assert_trees_all_close(eager, expected)


def test_selective_transform_takes_a_callable_freeze_mask():
    # A callable is one truthy leaf to tree.map: it froze every parameter silently.
    params = _params()
    grads = _grads(params)
    vectors = lambda tree: ft.tree.map(lambda x: x.ndim <= 1, tree)  # noqa: E731
    tx = ft.selective_transform(ft.sgd(1.0), freeze_mask=vectors)
    state = tx.init(params)
    eager, _ = tx.update(grads, state, params)
    expected = {
        "w": -grads["w"],
        "b": torch.zeros(3),
        "s": [torch.zeros(()), -grads["s"][1]],
    }
    ft.testing.assert_trees_all_close(eager, expected)
    compiled, _ = torch.compile(tx.update, fullgraph=True)(grads, state, params)
    ft.testing.assert_trees_all_close(compiled, expected)


def test_selective_transform_refuses_non_bool_mask_leaves_naming_the_path():
    # ``"freeze" if m else "train"`` took 1/0 (or any string) as a flag; freeze() refuses them.
    with pytest.raises(TypeError, match=r"freeze_mask\['w'\] must be a bool"):
        ft.selective_transform(ft.sgd(1.0), freeze_mask={"w": 1, "b": 0})


# --- MultiSteps -------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True])
def test_multisteps_resumed_with_a_smaller_k_updates_instead_of_dropping(compiled):
    # A state saved after 3 of 4 mini-steps, resumed with k=2: optax's test is
    # ``mini_step < k - 1`` (else update); ``!=`` wrapped around and dropped the 4 gradients.
    params = {"w": torch.zeros(3)}
    grads = [{"w": torch.tensor([1.0, 2.0, 3.0]) * (i + 1)} for i in range(4)]
    four = ft.MultiSteps(ft.sgd(1.0), every_k_schedule=4)
    state = four.init(params)
    for g in grads[:3]:
        _, state = four.update(g, state, params)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)

    two = ft.MultiSteps(ft.sgd(1.0), every_k_schedule=2)
    update = torch.compile(two.update, fullgraph=True) if compiled else two.update
    out, state = update(grads[3], state, params)
    expected = -torch.stack([g["w"] for g in grads]).double().mean(0)
    torch.testing.assert_close(out["w"].double(), expected, rtol=1e-6, atol=0)
    assert int(state.mini_step) == 0 and int(state.gradient_step) == 1
    assert bool(two.has_updated(state))


@pytest.mark.parametrize("compiled", [False, True])
def test_multisteps_skips_non_finite_mini_steps_without_advancing(compiled):
    params = {"w": torch.zeros(2)}
    seq = [[1.0, 1.0], [float("nan"), 0.0], [3.0, 5.0], [float("inf"), 1.0], [2.0, 0.0]]
    ms = ft.MultiSteps(ft.sgd(1.0), every_k_schedule=2, should_skip_update_fn=ft.skip_not_finite)
    update = torch.compile(ms.update, fullgraph=True) if compiled else ms.update
    state = ms.init(params)
    outs = []
    for g in seq:
        u, state = update({"w": torch.tensor(g)}, state, params)
        outs.append(u["w"].tolist())
    # Naive: drop the non-finite ones, then every second finite one emits minus the mean.
    assert outs == [[0.0, 0.0], [0.0, 0.0], [-2.0, -3.0], [0.0, 0.0], [0.0, 0.0]]
    assert int(state.mini_step) == 1 and int(state.gradient_step) == 1
    assert state.acc_grads["w"].tolist() == [2.0, 0.0]


# --- apply_if_finite ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_errors", [0, 1, 3])
def test_apply_if_finite_counters_follow_a_naive_loop(max_errors):
    params = {"w": torch.zeros(2)}
    finite_seq = [True, False, False, False, False, True, False, True, False, False]
    tx = ft.apply_if_finite(ft.sgd(1.0, momentum=0.5), max_errors)
    state = tx.init(params)
    count = total = 0
    for i, finite in enumerate(finite_seq):
        g = torch.tensor([1.0, float(i)]) if finite else torch.tensor([float("nan"), 1.0])
        out, state = tx.update({"w": g}, state, params)
        count = 0 if finite else count + 1
        total += not finite
        applied = finite or count > max_errors
        assert int(state.notfinite_count) == count
        assert int(state.total_notfinite) == total
        assert bool(state.last_finite) == finite
        if not applied:
            assert out["w"].tolist() == [0.0, 0.0]
        elif not finite:  # too many in a row: applied anyway, NaN included (as optax)
            assert bool(torch.isnan(out["w"]).any())


@pytest.mark.parametrize("max_errors", [2**31, sys.maxsize])
def test_apply_if_finite_limits_beyond_int32_never_apply_non_finite_updates(max_errors):
    # ``count > 2**31`` on an int32 counter wrapped to ``count > -2**31``: every NaN update was
    # applied at once, the opposite of "skip them all".
    params = {"w": torch.zeros(2)}
    tx = ft.apply_if_finite(ft.sgd(1.0), max_errors)
    state = tx.init(params)
    for _ in range(3):
        out, state = tx.update({"w": torch.tensor([float("nan"), 1.0])}, state, params)
        assert out["w"].tolist() == [0.0, 0.0]
    # Also once the saturating counter sits at the int32 maximum.
    state = state._replace(notfinite_count=torch.tensor(2**31 - 2, dtype=torch.int32))
    for _ in range(3):
        out, state = tx.update({"w": torch.tensor([float("nan"), 1.0])}, state, params)
        assert out["w"].tolist() == [0.0, 0.0]
    assert int(state.notfinite_count) == 2**31 - 1


# --- loss scaling ------------------------------------------------------------------------------


def test_loss_scale_does_not_overflow_float16_losses_with_dimensions():
    # A float16 vector times a 0-d float32 scale stays float16 in torch: 2 * 2**16 was inf.
    policy = ft.DynamicLossScale()
    losses = torch.tensor([2.0, 1.0, 60000.0], dtype=torch.float16)
    scaled = policy.scale(policy.init(), losses)
    assert torch.isfinite(scaled).all()
    assert scaled.double().tolist() == (losses.double() * 2.0**16).tolist()


@pytest.mark.parametrize("init_scale", [1e39, 1e-50, 0.0])
def test_loss_scale_init_scale_outside_float32_raises_naming_it(init_scale):
    # 1e39 overflowed float32 at init; 1e-50 became a scale of 0 that can never grow.
    with pytest.raises(ValueError, match="init_scale"):
        ft.DynamicLossScale(init_scale=init_scale)


def test_loss_scale_update_takes_a_bool_and_names_a_bad_finite():
    policy = ft.DynamicLossScale(init_scale=4.0, growth_interval=1)
    assert float(policy.update(policy.init(), True).scale) == 8.0
    assert float(policy.update(policy.init(), False).scale) == 2.0
    with pytest.raises(TypeError, match="finite"):
        policy.update(policy.init(), torch.tensor(1.0))


def test_loss_scale_policy_matches_torchs_amp_update_scale_op():
    # ``torch._amp_update_scale_`` is the kernel GradScaler.update runs. An interval beyond
    # int32 means "never grow" there; compared with the int32 tracker it wrapped to "always".
    gen = torch.Generator().manual_seed(0)
    for interval, growth, backoff, init in [
        (3, 2.0, 0.5, 2.0**16),
        (1, 2.0, 0.5, 2.0**120),
        (2**31, 2.0, 0.5, 4.0),
        (sys.maxsize, 2.0, 0.5, 4.0),
    ]:
        policy = ft.DynamicLossScale(init, growth, backoff, interval)
        state = policy.init()
        scale, tracker = torch.tensor(float(init)), torch.zeros((), dtype=torch.int32)
        for finite in (torch.rand(300, generator=gen) < 0.8).tolist():
            state = policy.update(state, torch.tensor(finite))
            torch._amp_update_scale_(
                scale, tracker, torch.tensor(float(not finite)), growth, backoff, interval
            )
            assert torch.equal(state.scale, scale)
            assert int(state.growth_tracker) == int(tracker)


# --- inject_hyperparams ------------------------------------------------------------------------


def test_inject_hyperparams_callable_that_is_not_a_schedule_names_the_argument():
    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    tx = ft.inject_hyperparams(ft.adamw)(learning_rate=0.1, mask=_ndim_mask)
    with pytest.raises(TypeError, match=r"`mask`.*static_args=\('mask',\)"):
        tx.init(params)
    fixed = ft.inject_hyperparams(ft.adamw, static_args="mask")(learning_rate=0.1, mask=_ndim_mask)
    updates, _ = fixed.update(ft.tree.map(torch.zeros_like, params), fixed.init(params), params)
    assert updates["b"].tolist() == [0.0, 0.0]  # masked out of the decay
    assert updates["w"].ne(0).all()


def test_inject_hyperparams_float64_tensor_hyperparameters_keep_their_dtype():
    params = {"w": torch.ones(3)}
    lr = torch.tensor(0.1, dtype=torch.float64)
    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=lr)
    state = tx.init(params)
    updates, state = tx.update({"w": torch.ones(3)}, state, params)
    assert state.hyperparams["learning_rate"].dtype == torch.float64
    assert updates["w"].dtype == torch.float32
    torch.testing.assert_close(updates["w"], torch.full((3,), -0.1))


# --- purity -----------------------------------------------------------------------------------


def _purity_cases() -> dict:
    return {
        "masked": ft.masked(ft.adam(0.1), {"w": True, "b": False, "s": True}),
        "masked_callable": ft.masked(ft.adamw(0.1), _ndim_mask),
        "partition": ft.partition(
            {"a": ft.adam(0.1), "b": ft.sgd(0.1, momentum=0.9)}, {"w": "a", "b": "b", "s": "a"}
        ),
        "freeze": ft.freeze({"w": True, "b": False, "s": True}),
        "apply_if_finite": ft.apply_if_finite(ft.adam(0.1), 1),
        "zero_nans": ft.zero_nans(),
        "multi_steps": ft.MultiSteps(
            ft.adam(0.1), 2, should_skip_update_fn=ft.skip_not_finite
        ).gradient_transformation(),
        "inject": ft.inject_hyperparams(ft.adam)(learning_rate=ft.linear_schedule(0.1, 0.0, 9)),
        "adafactor": ft.adafactor(0.1, min_dim_size_to_factor=2),
    }


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("name", sorted(_purity_cases()))
def test_updates_leave_their_inputs_bitwise_unchanged(name, compiled):
    tx = _purity_cases()[name]
    params = _params()
    grads = _grads(params)
    with_nan = _snapshot(grads)
    with_nan["b"][0] = float("nan")
    update = torch.compile(tx.update, fullgraph=True) if compiled else tx.update
    state = tx.init(params)
    for g in (grads, with_nan, grads):
        before = _snapshot((g, state, params))
        _, new_state = update(g, state, params)
        ft.testing.assert_trees_all_equal((g, state, params), before)
        state = new_state


# --- factored second moments -------------------------------------------------------------------


def _factored_reference(grads: list[np.ndarray], min_dim: int) -> np.ndarray:
    """optax's documented rule in float64, with numpy's argsort choosing the factored axes."""
    shape = grads[0].shape
    dims = None
    if len(shape) >= 2:
        order = np.argsort(shape, kind="stable")
        if shape[order[-2]] >= min_dim:
            dims = int(order[-2]), int(order[-1])
    v = r = c = 0.0
    for step, g in enumerate(grads):
        beta = 1.0 - (step + 1.0) ** -0.8
        sq = g * g + 1e-30
        if dims is None:
            v = beta * v + (1 - beta) * sq
            u = g / np.sqrt(v)
            continue
        d1, d0 = dims
        r = beta * r + (1 - beta) * sq.mean(axis=d0)
        c = beta * c + (1 - beta) * sq.mean(axis=d1)
        reduced = d1 - 1 if d1 > d0 else d1
        row = (r / r.mean(axis=reduced, keepdims=True)) ** -0.5
        u = g * np.expand_dims(row, d0) * np.expand_dims(c**-0.5, d1)
    return u


@pytest.mark.parametrize(
    ("shape", "min_dim"),
    [
        ((), 1),
        ((5,), 1),
        ((1, 7), 1),
        ((1, 7), 2),
        ((7, 1), 1),
        ((3, 200), 3),
        ((200, 3), 4),
        ((5, 5), 5),
        ((6, 2, 6), 2),
        ((2, 3, 4, 5), 3),
        ((2, 20000), 2),
    ],
)
def test_factored_rms_matches_optax_rule_on_edge_shapes(shape, min_dim):
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    tx = ft.scale_by_factored_rms(min_dim_size_to_factor=min_dim)
    params = [torch.zeros(shape, dtype=torch.float64)]
    state = tx.init(params)
    for g in grads:
        out, state = tx.update([g], state, params)
    expected = _factored_reference([g.numpy() for g in grads], min_dim)
    # The decay rate is computed in float32, as optax's ``jnp.array(i + 1, jnp.float32)``.
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-6)
