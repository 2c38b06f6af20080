"""Review of the day's new features: donation leases, the slotted ``seeded_rng``, the DP-SGD
step's ``tx`` check and the mean pairwise cosine of ``noise_scale_hook(cosine=True)``.

References are computed here (float64 by hand, ``torch.random.fork_rng``), never taken from the
code under test.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import functrain as ft

F64 = torch.float64


# --- donation leases ------------------------------------------------------------------------


def _setup() -> tuple[ft.TrainStep, ft.TrainState, torch.Tensor]:
    params = {"w": torch.tensor([1.0, -2.0, 3.0], dtype=F64)}
    tx = ft.adam(0.1)
    step = ft.make_train_step(lambda p, b: (p["w"] * b).sum(), tx)
    state = ft.TrainState.create(params=params, tx=tx)
    return step, state, torch.tensor([0.5, 1.0, -1.0], dtype=F64)


def test_a_fork_with_fresh_params_and_opt_state_survives_donating_its_source():
    step, state, batch = _setup()
    params = ft.tree.map(torch.clone, state.params)
    fork = state.replace(params=params, opt_state=ft.adam(0.1).init(params))
    step(state, batch)  # donates `state`, whose memory the fork does not share
    assert not fork.consumed
    torch.testing.assert_close(fork.params["w"], torch.tensor([1.0, -2.0, 3.0], dtype=F64))
    new, _ = step(fork, batch)
    assert int(new.step) == 1


def test_a_copy_that_still_shares_the_opt_state_is_consumed_with_its_source():
    step, state, batch = _setup()
    sibling = state.replace(params=ft.tree.map(torch.clone, state.params))  # opt_state shared
    step(state, batch)  # adam's moments of `state` may be written in place
    with pytest.raises(ft.ConsumedStateError, match="replace"):
        sibling.opt_state


def test_a_fork_sharing_a_view_of_the_params_is_consumed_with_its_source():
    step, state, batch = _setup()
    view = {"w": state.params["w"][:]}  # a new tensor object over the same memory
    sibling = state.replace(params=view, opt_state=ft.adam(0.1).init(view))
    step(state, batch)
    assert sibling.consumed


def test_repr_of_a_relative_of_a_consumed_state_says_so():
    step, state, batch = _setup()
    sibling = state.replace(key=None)
    step(state, batch)
    assert "consumed" in repr(sibling)


# --- seeded_rng -----------------------------------------------------------------------------


def test_one_seeded_rng_entered_inside_itself_restores_each_level():
    scope = ft.seeded_rng(ft.random_key(3))
    torch.manual_seed(11)
    outside = torch.get_rng_state()
    with scope:
        first = torch.rand(3)
        with scope:
            assert torch.equal(torch.rand(3), first)  # reseeded with the same key
        after_inner = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)
    # The inner exit restored the outer block's generator, not the seeded one.
    with scope:
        torch.rand(3)
        assert torch.equal(torch.rand(3), after_inner)


def test_seeded_rng_draws_as_fork_rng_did_and_restores_after_an_error():
    key = ft.random_key(21)
    torch.manual_seed(5)
    with ft.seeded_rng(key):
        seed = torch.initial_seed()
        inside = torch.rand(4)
    after = torch.rand(4)
    torch.manual_seed(5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        assert torch.equal(torch.rand(4), inside)
    assert torch.equal(torch.rand(4), after)
    torch.manual_seed(5)
    with pytest.raises(KeyError), ft.seeded_rng(key):
        torch.rand(2)
        raise KeyError("boom")
    assert torch.equal(torch.rand(4), after)


class _FailingGenerator:
    def manual_seed(self, seed: int) -> None:
        raise RuntimeError("CUDA error: device lost")


def test_a_failing_cuda_seed_leaves_the_cpu_generator_as_it_was(monkeypatch):
    # No GPU here: the CUDA calls are stood in for; the CPU generator is real.
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda index: torch.tensor([index]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: None)
    monkeypatch.setattr(torch.cuda, "default_generators", (_FailingGenerator(),))
    torch.manual_seed(9)
    before = torch.get_rng_state()
    with (
        pytest.raises(RuntimeError, match="device lost"),
        ft.seeded_rng(ft.random_key(1), ["cuda:0"]),
    ):
        pass
    assert torch.equal(torch.get_rng_state(), before)


# --- the DP-SGD step's tx check -------------------------------------------------------------


def _dp_step(tx: ft.GradientTransformation) -> ft.TrainStep:
    return ft.make_train_step(
        lambda p, b: (p["w"] * b).sum(), tx, micro_batches=2, per_example_clip=1.0
    )


def _noisy(seed: int = 0) -> ft.GradientTransformation:
    return ft.dp_noisy_mean(1.0, 1.1, expected_batch_size=8, seed=seed)


def test_the_documented_recipe_is_accepted_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dp_step(ft.chain(_noisy(), ft.sgd(0.5)))
        _dp_step(ft.named_chain(("noise", _noisy()), ("opt", ft.chain(ft.sgd(0.5)))))


def test_an_aggregate_inside_masked_is_refused():
    aggregate = ft.differentially_private_aggregate(1.0, 1.1, seed=0)
    tx = ft.chain(_noisy(), ft.masked(aggregate, {"w": True}), ft.sgd(0.1))
    with pytest.raises(ValueError, match="differentially_private_aggregate"):
        _dp_step(tx)


def test_dp_noisy_mean_twice_is_refused():
    with pytest.raises(ValueError, match="more than once"):
        _dp_step(ft.chain(_noisy(0), ft.chain(_noisy(1), ft.sgd(0.1))))


def test_a_masked_dp_noisy_mean_is_not_taken_for_the_whole_tree_noise():
    # Noise on the masked leaves only is no DP-SGD noise for the whole tree: refused, naming
    # the wrapper (it used to get the generic "adds no noise" warning).
    tx = ft.chain(ft.masked(_noisy(), {"w": True}), ft.sgd(0.1))
    with pytest.raises(ValueError, match="wraps dp_noisy_mean in masked"):
        _dp_step(tx)


# --- the mean pairwise cosine ---------------------------------------------------------------


def test_one_non_zero_micro_batch_gradient_gives_nan_not_inf():
    # ‖g/‖g‖‖² is 1 only to rounding: (‖u‖² − 1) / (1·0) was ±inf for this gradient.
    params = {"w": torch.zeros(4)}
    grads = [{"w": torch.tensor([0.3, 0.1, 0.7, 0.11])}, {"w": torch.zeros(4)}]
    norm = math.sqrt(sum(x * x for x in (0.3, 0.1, 0.7, 0.11)))
    assert norm > 0
    hook = ft.noise_scale_hook(cosine=True)
    acc = hook.accumulator_init(params)
    sizes = torch.tensor([2.0, 2.0])
    values = []
    for g, b in zip(grads, sizes):
        acc = hook.accumulate(acc, g, b)
        values.append(hook.per_micro_batch(g, b))
    stacked = {k: torch.stack([v[k].reshape(()) for v in values]) for k in values[0]}
    stats = ft.MicroBatchStats(sizes, torch.zeros(2), stacked, acc)
    combined = {"w": (grads[0]["w"] + grads[1]["w"]) / 2}
    metrics, _ = hook.update(stats, combined, hook.init(params))
    assert math.isnan(float(metrics["noise_scale/mean_cosine"]))


def test_the_no_noise_warning_points_at_the_callers_line():
    with pytest.warns(UserWarning, match="adds no noise") as record:
        _dp_step(ft.sgd(0.1))
    assert record[0].filename == __file__
