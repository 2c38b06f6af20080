"""In-place fused updates (``functrain.optim.fused``) give the pure path's numbers.

The reference is the pure path run member by member (``tx.update`` then ``apply_updates``, with
the fused pure path of ``functrain.optim._pure_fused`` switched off), on copies; the foreach
engine must match it bit for bit, the fused kernels to rounding (tight in float64).
"""

import pytest
import torch

import functrain as ft
from functrain.optim import _pure_fused, fused

STEPS = 12


def _params(dtype):
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 4, generator=gen, dtype=dtype),
        "b": torch.randn(4, generator=gen, dtype=dtype),
        "s": torch.randn((), generator=gen, dtype=dtype),
        "deep": [torch.randn(3, 2, generator=gen, dtype=dtype)],
    }


def _grads(dtype, steps=STEPS):
    gen = torch.Generator().manual_seed(1)
    out = []
    for t in range(steps):
        scale = 0.3 + 0.4 * (t % 3)  # norms on both sides of the clipping bounds below
        out.append(
            ft.tree.map(
                lambda p: scale * torch.randn(p.shape, generator=gen).to(dtype), _params(dtype)
            )
        )
    return out


def _clone(tree):
    return ft.tree.map(lambda x: x.clone(), tree)


def _matrices(p):
    return ft.tree.map(lambda x: x.ndim > 1, p)


SCHED = ft.warmup_cosine_decay_schedule(0.0, 0.05, 3, STEPS)

KERNEL_CASES = {
    "adam": lambda: ft.adam(1e-2),
    "adamw": lambda: ft.adamw(1e-2, weight_decay=0.1),
    "adamw_mask_tree": lambda: ft.adamw(
        1e-2, weight_decay=0.1, mask={"w": True, "b": False, "s": False, "deep": [True]}
    ),
    "adamw_mask_fn": lambda: ft.adamw(1e-2, weight_decay=0.1, mask=_matrices),
    "adamw_schedule": lambda: ft.adamw(SCHED, weight_decay=0.1),
    "adamw_tensor_lr": lambda: ft.adamw(torch.tensor(0.02), weight_decay=0.1),
    "adamw_decay_schedule": lambda: ft.adamw(1e-2, weight_decay=lambda n: 0.1 / (1.0 + n)),
    "clip_adamw": lambda: ft.chain(ft.clip_by_global_norm(0.5), ft.adamw(SCHED, 0.8, 0.99)),
    "coupled_adam": lambda: ft.chain(ft.add_decayed_weights(0.1), ft.adam(1e-2)),
    "named": lambda: ft.named_chain(("clip", ft.clip_by_global_norm(0.4)), ("opt", ft.adam(0.01))),
    "sgd": lambda: ft.sgd(0.1),
    "momentum": lambda: ft.sgd(0.1, momentum=0.9),
    "nesterov": lambda: ft.sgd(SCHED, momentum=0.8, nesterov=True),
    "sgd_coupled_clip": lambda: ft.chain(
        ft.clip_by_global_norm(0.5), ft.add_decayed_weights(1e-2, _matrices), ft.sgd(0.1, 0.9)
    ),
    "inject_adamw": lambda: ft.inject_hyperparams(ft.adamw, static_args="mask")(
        learning_rate=SCHED, weight_decay=1e-2, mask=_matrices
    ),
    "tensor_b1": lambda: ft.adam(1e-2, b1=torch.tensor(0.8)),  # a CPU tensor: read, no sync
    "inject_sgd": lambda: ft.inject_hyperparams(ft.sgd)(learning_rate=0.1, momentum=0.9),
    "clip_inject": lambda: ft.chain(
        ft.clip_by_global_norm(0.5), ft.inject_hyperparams(ft.adamw)(SCHED)
    ),
}
FOREACH_ONLY = {
    "nadamw": lambda: ft.nadamw(1e-2, weight_decay=0.1, mask=_matrices),
    "eps_root": lambda: ft.adam(1e-2, eps_root=1e-8),
    "masked_adam": lambda: ft.chain(
        ft.masked(ft.scale_by_adam(), _matrices), ft.scale_by_learning_rate(0.01)
    ),
    "both_decays": lambda: ft.chain(ft.add_decayed_weights(0.1), ft.adamw(1e-2, weight_decay=0.1)),
    "bf16_mu": lambda: ft.adam(1e-2, mu_dtype=torch.bfloat16),
    "masked_clip": lambda: ft.chain(ft.masked(ft.clip_by_global_norm(0.2), _matrices), ft.sgd(0.1)),
}


def _pure(tx, params, grads, *, fused_pure=False):
    """The pure path; member by member (each transform's own ops) unless ``fused_pure``."""
    state = tx.init(params)
    norms = []
    before, _pure_fused.ENABLED = _pure_fused.ENABLED, fused_pure
    try:
        for g in grads:
            u, state = tx.update(g, state, params)
            norms.append(ft.tree.norm(u))
            params = ft.apply_updates(params, u)
    finally:
        _pure_fused.ENABLED = before
    return params, state, norms


def _in_place(tx, params, grads, engines, **kw):
    params = _clone(params)
    state = tx.init(params)
    norms, used = [], set()
    for g in grads:
        done = fused.update_in_place(
            tx, _clone(g), state, params, engines=engines, update_norm=True, **kw
        )
        assert done is not None, "not recognised"
        state = done.opt_state
        norms.append(done.update_norm)
        used.add(done.engine)
    return params, state, norms, used


def _close(a, b, dtype):
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}
    ft.testing.assert_trees_all_equal_structs(a, b)
    ft.testing.assert_trees_all_close(a, b, **tol)


@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_engine_matches_pure_path(name, dtype):
    tx = KERNEL_CASES[name]()
    params, grads = _params(dtype), _grads(dtype)
    ref_p, ref_s, ref_norms = _pure(tx, params, grads)
    p, s, norms, used = _in_place(tx, params, grads, ("kernel",))
    assert used == {"kernel"}
    _close(p, ref_p, dtype)
    _close(s, ref_s, dtype)  # counts (int32) exactly, moments to rounding
    # The update norm is ‖p_new − p_old‖: the update up to the rounding of p + u.
    norm_tol = 1e-9 if dtype == torch.float64 else 1e-3
    ft.testing.assert_trees_all_close(norms, ref_norms, rtol=norm_tol, atol=1e-12)


@pytest.mark.parametrize("name", sorted(KERNEL_CASES) + sorted(FOREACH_ONLY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_engine_is_bitwise_the_pure_path(name, dtype):
    tx = {**KERNEL_CASES, **FOREACH_ONLY}[name]()
    params, grads = _params(dtype), _grads(dtype, steps=6)
    ref_p, ref_s, ref_norms = _pure(tx, params, grads)
    p, s, norms, used = _in_place(tx, params, grads, ("foreach",))
    assert used == {"foreach"}
    ft.testing.assert_trees_all_equal(p, ref_p)
    ft.testing.assert_trees_all_equal(s, ref_s)
    ft.testing.assert_trees_all_equal(norms, ref_norms)


@pytest.mark.parametrize("name", sorted(FOREACH_ONLY))
def test_default_engines_fall_back_to_foreach(name):
    tx = FOREACH_ONLY[name]()
    params = _params(torch.float32)
    done = fused.update_in_place(tx, _grads(torch.float32, 1)[0], tx.init(params), params)
    assert done is not None and done.engine == "foreach"


def test_states_move_between_paths():
    tx = KERNEL_CASES["clip_adamw"]()
    params, grads = _params(torch.float64), _grads(torch.float64)
    ref_p, ref_s, _ = _pure(tx, params, grads)
    p, state = _clone(params), tx.init(params)
    for t, g in enumerate(grads):
        if t % 2:
            u, state = tx.update(g, state, p)
            p = ft.apply_updates(p, u)
        else:
            state = fused.update_in_place(tx, _clone(g), state, p).opt_state
    _close(p, ref_p, torch.float64)
    _close(state, ref_s, torch.float64)


@pytest.mark.parametrize("name", ["clip_adamw", "sgd_coupled_clip", "momentum"])
def test_found_inf_skips_bitwise_and_counts_stay(name):
    tx = KERNEL_CASES[name]()
    params, grads = _params(torch.float32), _grads(torch.float32, 3)
    state = tx.init(params)
    for g in grads[:2]:
        state = fused.update_in_place(tx, _clone(g), state, params).opt_state
    before_p, before_s = _clone(params), ft.tree.map(lambda x: x.clone(), state)
    bad = _clone(grads[2])
    bad["b"][0] = float("nan")
    done = fused.update_in_place(tx, bad, state, params, found_inf=torch.tensor(True))
    assert done.engine == "kernel"
    ft.testing.assert_trees_all_equal(params, before_p)
    ft.testing.assert_trees_all_equal(done.opt_state, before_s)
    # found_inf=False is an ordinary step.
    ref_p, ref_s = _clone(params), ft.tree.map(lambda x: x.clone(), state)
    u, ref_s = tx.update(grads[2], ref_s, ref_p)
    ref_p = ft.apply_updates(ref_p, u)
    done = fused.update_in_place(
        tx, _clone(grads[2]), done.opt_state, params, found_inf=torch.tensor(False)
    )
    _close(params, ref_p, torch.float32)
    _close(done.opt_state, ref_s, torch.float32)


def test_clip_folded_into_grad_scale_when_gradients_are_writable():
    tx = KERNEL_CASES["clip_adamw"]()
    params, grads = _params(torch.float32), _grads(torch.float32)
    ref_p, ref_s, _ = _pure(tx, params, grads)
    p, s, _, used = _in_place(tx, params, grads, ("kernel",), grads_writable=True)
    assert used == {"kernel"}
    _close(p, ref_p, torch.float32)
    _close(s, ref_s, torch.float32)


def test_reuses_a_given_grad_norm():
    tx = ft.chain(ft.clip_by_global_norm(1e-3), ft.sgd(1.0))
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    g = {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    # A (deliberately wrong) norm of 5000 is what the clip uses: factor 1e-3 / 5000.
    fused.update_in_place(tx, g, tx.init(params), params, grad_norm=torch.tensor(5000.0))
    ft.testing.assert_trees_all_close(params["w"], torch.tensor([-6e-7, -8e-7]).double())


def test_not_recognised_or_unsafe_returns_none_and_touches_nothing():
    params = _params(torch.float32)
    g = _grads(torch.float32, 1)[0]
    before = _clone(params)
    custom = ft.chain(ft.stateless(lambda u, p: u), ft.sgd(0.1))
    assert fused.update_in_place(custom, g, custom.init(params), params) is None
    lion = ft.lion(1e-3)
    assert fused.update_in_place(lion, g, lion.init(params), params) is None
    tx = ft.adam(1e-3)
    assert fused.update_in_place(tx, g, ft.sgd(0.1, 0.9).init(params), params) is None
    shared = {"a": params["b"], "b": params["b"]}
    grads = {"a": g["b"], "b": g["b"]}
    assert fused.update_in_place(tx, grads, tx.init(shared), shared) is None
    found = torch.tensor(False)
    nadam = ft.nadam(1e-3)
    assert fused.update_in_place(nadam, g, nadam.init(params), params, found_inf=found) is None
    ft.testing.assert_trees_all_equal(params, before)


def test_specs_compose():
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-3))
    spec = fused.spec_of(tx)
    assert isinstance(spec, fused.Chain)
    kinds = [type(fused.spec_of(m)).__name__ for m in spec.members]
    assert kinds == ["ClipByGlobalNorm", "Chain"]
    assert fused.spec_of(ft.lion(1e-3)) is not None  # a chain, but of an unknown primitive
    assert fused.spec_of(ft.scale_by_lion()) is None


def _layouts():
    """Successive inputs for one optimizer: each changes dtype, strides or structure."""
    gen = torch.Generator().manual_seed(3)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return [
        ("float32", [r(3, 4), r(5)], [r(3, 4), r(5)], {"kernel"}),
        ("float64", [r(3, 4, dtype=torch.float64), r(5)], [r(3, 4), r(5)], {"foreach"}),
        ("all float64", *([[r(3, 4, dtype=torch.float64)]] * 2), {"kernel"}),
        ("transposed", [r(4, 3).t(), r(5)], [r(3, 4), r(5)], {"foreach"}),
        ("dict", {"a": r(3, 4), "b": r(5)}, {"a": r(3, 4), "b": r(5)}, {"kernel"}),
        ("more leaves", [r(3, 4), r(5), r(2)], [r(3, 4), r(5), r(2)], {"kernel"}),
        ("float32 again", [r(3, 4), r(5)], [r(3, 4), r(5)], {"kernel"}),
    ]


def test_each_call_is_planned_for_its_own_leaves():
    # One optimizer object across layouts: nothing learnt from an earlier call (a plan, an
    # engine choice, a mask subset) may be reused for inputs it does not fit.
    tx = ft.adamw(1e-2, weight_decay=0.1, mask=lambda p: ft.tree.map(lambda x: x.ndim > 1, p))
    for name, params, grads, engines in _layouts():
        ref_params, ref_state, _ = _pure(tx, params, [grads])
        mine = ft.tree.map(lambda x: x.clone() if x.is_contiguous() else x.t().clone().t(), params)
        state = tx.init(mine)
        done = fused.update_in_place(tx, _clone(grads), state, mine)
        assert done is not None and {done.engine} == engines, name
        exact = engines == {"foreach"} or name == "all float64"  # the kernels round differently
        _close((mine, done.opt_state), (ref_params, ref_state), torch.float64 if exact else None)


@pytest.mark.parametrize("name", sorted(set(KERNEL_CASES) - {"adamw_mask_tree"}))  # fixed keys
def test_update_norm_over_many_small_leaves_matches_pure_path(name):
    """Chunks of many small leaves form the update norm from flat copies (one ``cat`` each side
    of the kernel); a transposed leaf among them takes the per-leaf route. Both equal the pure
    path's ``‖updates‖``, with two dtype groups and a leaf larger than a chunk."""
    gen = torch.Generator().manual_seed(3)
    params = {f"w{i}": torch.randn(3 + i % 5, 2, generator=gen) for i in range(40)}
    params["t"] = torch.randn(4, 3, generator=gen).T  # not contiguous
    params["big"] = torch.randn((1 << 18) + 5, generator=gen)
    params.update({f"d{i}": torch.randn(5, generator=gen).double() for i in range(20)})
    # empty_like keeps the transposed leaf's strides, which the kernels need its gradient to share.
    grads = [
        ft.tree.map(
            lambda p: torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen)), params
        )
    ]
    grads.append(ft.tree.map(lambda g: -0.5 * g, grads[0]))
    tx = KERNEL_CASES[name]()
    ref_p, _, ref_norms = _pure(tx, params, grads)
    p, _, norms, _ = _in_place(tx, params, grads, ("kernel",))
    _close(p, ref_p, torch.float32)
    for got, want in zip(norms, ref_norms):  # ‖new − old‖ in float32 against ‖u‖
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=0)
