"""``apply_if_finite`` and ``zero_nans`` register opaque specs, unseen by fusion.

The specs describe the wrappers for inspection (``fused.describe``, read by the DP step's ``tx``
check); ``fused.spec_of`` hides them, so the in-place planner and the pure path's fused kernel
treat these wrappers as they did when they registered nothing: ``update_in_place`` returns
``None`` (nothing written) for every optimizer holding one, and ``tx.update`` gives the members'
own numbers. The expected engines were read from the code before the specs existed (the same
checks run there), and the control optimizers without wrappers still take their engines.
"""

import pytest
import torch

import functrain as ft
from functrain.grads.privacy import dp_members
from functrain.optim import _pure_fused, fused


def _params():
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}


def _grads():
    gen = torch.Generator().manual_seed(1)
    return {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}


def _clone(tree):
    return ft.tree.map(lambda x: x.clone(), tree)


LABELS = {"w": "fast", "b": "slow"}

# Optimizers holding a wrapper: never recognised by the fused path, before or after.
WRAPPED = {
    "zero_nans": lambda: ft.zero_nans(),
    "apply_if_finite_adamw": lambda: ft.apply_if_finite(ft.adamw(1e-2), 3),
    "chain_zero_nans_adamw": lambda: ft.chain(ft.zero_nans(), ft.adamw(1e-2)),
    "chain_clip_zero_nans_sgd": lambda: ft.chain(
        ft.clip_by_global_norm(1.0), ft.zero_nans(), ft.sgd(0.1, momentum=0.9)
    ),
    "chain_adam_apply_if_finite_lr": lambda: ft.chain(
        ft.scale_by_adam(), ft.apply_if_finite(ft.scale(-0.01), 0)
    ),
    "partition_zero_nans": lambda: ft.partition(
        {"fast": ft.adamw(1e-2), "slow": ft.chain(ft.zero_nans(), ft.sgd(0.1))}, LABELS
    ),
    "multi_transform_fn_apply_if_finite": lambda: ft.multi_transform(
        {"fast": ft.adam(1e-2), "slow": ft.apply_if_finite(ft.sgd(0.1), 3)}, lambda p: LABELS
    ),
    "selective_transform_lion": lambda: ft.selective_transform(
        ft.chain(ft.zero_nans(), ft.adamw(1e-2)), freeze_mask={"w": False, "b": True}
    ),
    "masked_zero_nans": lambda: ft.chain(
        ft.masked(ft.zero_nans(), {"w": True, "b": False}), ft.adamw(1e-2)
    ),
    "named_chain_zero_nans": lambda: ft.named_chain(
        ("guard", ft.zero_nans()), ("opt", ft.adamw(1e-2))
    ),
}

# Controls without wrappers: the engines they took before.
CONTROLS = {
    "adamw": (lambda: ft.adamw(1e-2), "kernel"),
    "sgd_momentum": (lambda: ft.sgd(0.1, momentum=0.9), "kernel"),
    "nesterov_adam": (lambda: ft.adam(1e-2, nesterov=True), "foreach"),
}


@pytest.mark.parametrize("engines", [("kernel", "foreach"), ("foreach",), ("kernel",)])
@pytest.mark.parametrize("found_inf", [False, True])
@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_wrapped_optimizers_stay_unrecognised(name, found_inf, engines):
    tx = WRAPPED[name]()
    params, grads = _params(), _grads()
    state = tx.init(params)
    before_p, before_s = _clone(params), _clone(state)
    flag = torch.tensor(False) if found_inf else None
    done = fused.update_in_place(tx, grads, state, params, found_inf=flag, engines=engines)
    assert done is None
    # Nothing was written: the parameters and the state are the old ones, bit for bit.
    for a, b in zip(ft.tree.leaves(params), ft.tree.leaves(before_p)):
        assert torch.equal(a, b)
    for a, b in zip(ft.tree.leaves(state), ft.tree.leaves(before_s)):
        assert torch.equal(a, b)


# Its only caller is ``chain``'s update, with the chain itself.
@pytest.mark.parametrize("name", sorted(n for n in WRAPPED if n.startswith("chain")))
def test_pure_fused_kernel_skips_wrapped_chains(name):
    tx = WRAPPED[name]()
    params = _params()
    assert _pure_fused.update(tx, _grads(), tx.init(params), params) is None


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_controls_keep_their_engine(name):
    make, engine = CONTROLS[name]
    tx = make()
    params = _params()
    done = fused.update_in_place(tx, _grads(), tx.init(params), params)
    assert done is not None and done.engine == engine


def test_specs_are_opaque_to_spec_of_and_seen_by_describe():
    inner = ft.sgd(0.1)
    guarded = ft.apply_if_finite(inner, 5)
    spec = fused.describe(guarded)
    assert isinstance(spec, fused.ApplyIfFinite) and isinstance(spec, fused.Opaque)
    assert spec.inner.update is inner.update and spec.max_consecutive_errors == 5
    assert fused.spec_of(guarded) is None

    # partition's spec is a plannable one (tests/optim/test_fused_partition.py), seen by both.
    txs = {"fast": ft.adam(1e-2), "slow": ft.sgd(0.1)}
    part = ft.partition(txs, LABELS)
    spec = fused.describe(part)
    assert isinstance(spec, fused.Partition) and spec.labels is LABELS
    assert not isinstance(spec, fused.Opaque) and fused.spec_of(part) is spec
    assert {k: v.update for k, v in spec.transforms.items()} == {
        k: v.update for k, v in txs.items()
    }

    assert isinstance(fused.describe(ft.zero_nans()), fused.ZeroNans)
    assert fused.spec_of(ft.zero_nans()) is None
    # Fusable specs are seen by both.
    adamw = ft.adamw(1e-2)
    assert fused.describe(adamw) is fused.spec_of(adamw)


def test_pure_numbers_of_wrapped_optimizers():
    params, grads = _params(), _grads()
    grads["b"][0] = float("nan")
    # zero_nans then sgd: -0.1 · g with the NaN zeroed (by hand, in float64).
    tx = ft.chain(ft.zero_nans(), ft.sgd(0.1))
    u, _ = tx.update(grads, tx.init(params), params)
    want_b = grads["b"].double().nan_to_num(nan=0.0) * -0.1
    torch.testing.assert_close(u["b"].double(), want_b)
    torch.testing.assert_close(u["w"].double(), grads["w"].double() * -0.1)
    # apply_if_finite skips the non-finite update whole: zeros.
    tx = ft.apply_if_finite(ft.sgd(0.1), 2)
    u, state = tx.update(grads, tx.init(params), params)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in ft.tree.leaves(u))
    assert int(state.notfinite_count) == 1
    # partition: each group its own rate.
    tx = ft.partition({"fast": ft.sgd(1.0), "slow": ft.sgd(0.01)}, LABELS)
    u, _ = tx.update(_grads(), tx.init(params), params)
    torch.testing.assert_close(u["w"].double(), _grads()["w"].double() * -1.0)
    torch.testing.assert_close(u["b"].double(), _grads()["b"].double() * -0.01)


def test_dp_members_reads_the_specs():
    noisy = ft.dp_noisy_mean(1.0, 1.1, expected_batch_size=8, seed=0)
    tx = ft.chain(ft.zero_nans(), ft.apply_if_finite(ft.chain(noisy, ft.scale(-0.1)), 2))
    assert [r for r, _ in dp_members(tx)] == ["guard", "noisy_mean", "other"]
    with pytest.raises(ValueError, match="partition"):
        list(dp_members(ft.partition({"fast": noisy, "slow": ft.sgd(0.1)}, LABELS)))
    # A user's own transform registering a wrapper spec is read through it, not by its code.
    mine = fused.register(
        ft.GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s)),
        fused.ApplyIfFinite(noisy, 0),
    )
    assert [r for r, _ in dp_members(mine)] == ["noisy_mean"]
