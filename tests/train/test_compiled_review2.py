"""Second review of ``make_train_step(..., compile=...)``: option checks, limits, parity.

Compiled with ``backend="aot_eager"`` (dynamo and AOTAutograd, no code generation) on a
``Linear(3, 2)`` in float64, so that the eager step (``compile=False``) is a reference to
rounding. The option checks run no compilation at all.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functrain as ft
from functrain import testing

FAST = {"backend": "aot_eager"}
TOL = {"rtol": 1e-12, "atol": 1e-14}

torch.manual_seed(0)
_MODEL, _PARAMS, _ = ft.functionalize(nn.Linear(3, 2).double())


def _batches(n, rows=7, *, nan_at=None, inf_at=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b = {
            "x": torch.randn(rows, 3, generator=g, dtype=torch.float64),
            "y": torch.randn(rows, 2, generator=g, dtype=torch.float64),
        }
        if i == nan_at:
            b["x"][0, 0] = float("nan")
        if i == inf_at:
            b["y"][0, 0] = 1e300  # squared: an infinite loss
        out.append(b)
    return out


def _mse(p, b):
    return (_MODEL(p, b["x"]) - b["y"]).square().mean()


def _sum_loss_with_aux(p, b):
    """A masked sum (a count that varies per micro-batch) with a scalar aux metric."""
    err = (_MODEL(p, b["x"]) - b["y"]).square()
    mask = b["y"][:, 0] > -0.5
    return ft.LossOutput(
        ft.LossSum((err.sum(-1) * mask).sum(), mask.sum()), aux={"worst": err.max()}
    )


def _assert_close(a, b):
    la, lb = ft.tree.leaves(a), ft.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, equal_nan=True, **TOL)


def _run_both(loss_fn, tx, batches, *, compile=FAST, **kwargs):
    compiled = ft.make_train_step(loss_fn, tx, compile=compile, **kwargs)
    eager = ft.make_train_step(loss_fn, tx, **kwargs)
    sc = ft.TrainState.create(params=_PARAMS, tx=tx, seed=3)
    se = ft.TrainState.create(params=_PARAMS, tx=tx, seed=3)
    metrics = []
    with testing.count_compiles() as count:
        for batch in batches:
            sc, mc = compiled(sc, batch)
            se, me = eager(se, batch)
            assert set(mc) == set(me)
            _assert_close(mc, me)
            metrics.append(mc)
    _assert_close(sc, se)
    return sc, metrics, count


# -- option checks (no compilation) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        # torch.compile's own "unexpected keyword argument 'compile()'" named neither.
        (
            {"fulgraph": True},
            TypeError,
            r"unknown torch.compile keyword argument\(s\) \['fulgraph'\]",
        ),
        ({"model": _mse}, TypeError, r"unknown torch.compile keyword.*\['model'\]"),
        # An AttributeError ('int' object has no attribute 'items') from inside torch.
        ({"options": 3}, TypeError, "options must be a dict of inductor settings"),
        # The cudagraphs backend is CUDA graphs: outputs replayed into the same memory.
        ({"backend": "cudagraphs"}, ValueError, "CUDA graphs"),
    ],
)
def test_bad_compile_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        ft.make_train_step(_mse, ft.sgd(0.1), compile=options)


def test_accepted_options_still_pass():
    for options in ({}, {"fullgraph": True, "dynamic": None}, {"recompile_limit": 3, "name": "s"}):
        ft.make_train_step(_mse, ft.sgd(0.1), compile={**FAST, **options})


# -- limits ----------------------------------------------------------------------------------------


def test_a_steps_own_recompile_limit_is_the_one_named():
    """``compile={'recompile_limit': 1}`` is torch.compile's per-function limit: the note said
    "already compiled for 8 ..." (the global config's) and told the user to raise the config."""
    step = ft.make_train_step(_mse, ft.sgd(0.1), compile={**FAST, "recompile_limit": 1})
    state = ft.TrainState.create(params=_PARAMS, tx=ft.sgd(0.1))
    state, _ = step(state, _batches(1, rows=4)[0])
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit) as info:
        step(state, _batches(1, rows=5)[0])
    notes = "\n".join(info.value.__notes__)
    assert "compiled for 1 different" in notes
    assert "compile={'recompile_limit': 1}" in notes
    assert not state.consumed


# -- probes that hold: parity with eager in float64 -----------------------------------------------


def test_sum_loss_aux_noise_scale_and_an_inf_step_with_loss_scale_match_eager():
    """Unequal micro-batches (7 rows, K=3), ``LossSum`` with varying counts, an aux metric,
    ``noise_scale_hook(cosine=True)`` and a skipped infinite step with loss-scale backoff."""
    tx = ft.MultiSteps(ft.adamw(1e-2, weight_decay=0.1, mask={"weight": True, "bias": False}), 2)
    sc, metrics, count = _run_both(
        _sum_loss_with_aux,
        tx,
        _batches(5, inf_at=2),
        micro_batches=3,
        grad_stats=ft.noise_scale_hook(cosine=True),
        loss_scale=ft.DynamicLossScale(init_scale=2.0**8, growth_interval=2),
        max_consecutive_skips=2,
    )
    assert count.compiles == 1, count.reasons
    assert [int(m["skipped"]) for m in metrics] == [0, 0, 1, 0, 0]
    assert "noise_scale/mean_cosine" in metrics[0] and "worst" in metrics[0]
    # By hand: 256, x2 after two good steps (512), /2 on the inf (256), x2 after two more.
    assert float(sc.extra["loss_scale"].scale) == 512.0


def test_hyperparameter_schedules_cross_phase_boundaries_without_recompiling():
    lr = ft.join_schedules(
        [ft.constant_schedule(0.05), ft.warmup_cosine_decay_schedule(0.0, 0.1, 3, 10)], [4]
    )
    wd = ft.exponential_decay(0.1, 3, 0.5, staircase=True)
    tx = ft.chain(
        ft.clip_by_global_norm(1.0),
        ft.inject_hyperparams(ft.adamw)(learning_rate=lr, weight_decay=wd),
    )
    _, metrics, count = _run_both(_mse, tx, _batches(16, rows=4), micro_batches=2)
    assert count.compiles == 1, count.reasons
    expected = torch.tensor([float(lr(i)) for i in range(16)], dtype=torch.float64)
    torch.testing.assert_close(torch.stack([m["lr"] for m in metrics]), expected)


def test_dynamic_shapes_compile_once_for_varying_batch_sizes():
    batches = [_batches(1, rows=n, seed=n)[0] for n in (7, 9, 8, 11)]
    _, _, count = _run_both(
        _mse, ft.sgd(0.1), batches, micro_batches=2, compile={**FAST, "dynamic": True}
    )
    assert count.compiles == 1, count.reasons


def test_a_hyperparameter_tensor_changed_in_place_is_read_without_recompiling():
    lr = torch.tensor(0.1, dtype=torch.float64)
    tx = ft.sgd(lr)
    step = ft.make_train_step(_mse, tx, compile=FAST, donate=False)
    batch = _batches(1)[0]
    state, _ = step(ft.TrainState.create(params=_PARAMS, tx=tx), batch)
    lr.fill_(0.0)  # sgd with a zero learning rate leaves the parameters as they are
    with testing.assert_max_compiles(0):
        new, _ = step(state, batch)
    testing.assert_trees_all_equal(new.params, state.params)
