"""Review tests for ``monitor`` / ``snapshot`` / ``measure_with_ema`` inside ``make_train_step``.

References: the first step's gradient of a least-squares loss written out by hand in float64
(``∇ = 2/N · Xᵀ(Xw − y)``), the moving average as optax's formula, and bit-for-bit copies of
the state for the skipped (non-finite) step.

Two tests failed while ``monitor.init`` left ``measurements`` empty (as optax): a fresh state
was not a checkpoint restore target and a compiled train step could not trace it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft
from functrain import testing

F64 = torch.float64
W_TRUE = torch.tensor([1.0, -2.0, 0.5], dtype=F64)


def _tx() -> ft.GradientTransformation:
    return ft.chain(
        ft.monitor(
            {
                "norm": ft.tree.norm,
                "clipped": lambda u: ft.tree.norm(u) > 1.0,  # a bool measure
                "positive": lambda u: (u["w"] > 0).sum(),  # an int measure
                "twice": lambda u: {"w": 2 * u["w"]},  # a tree measure
                "ema": ft.measure_with_ema(ft.tree.norm, 0.5),
            }
        ),
        ft.snapshot("last", ft.tree.norm),
        ft.sgd(0.1),
    )


def _batches() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen, dtype=F64)
    good = {"x": x, "y": x @ W_TRUE}
    bad = {"x": x.clone(), "y": good["y"].clone()}
    bad["y"][3] = float("nan")
    return good, bad


def _loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()


def _fresh(step: Any) -> ft.TrainState:
    return step.prepare(ft.TrainState.create(params={"w": torch.zeros(3, dtype=F64)}, tx=_tx()))


def test_measurements_in_a_donating_micro_batched_step_and_a_skipped_nan_batch():
    good, bad = _batches()
    step = ft.make_train_step(_loss, _tx(), micro_batches=2, donate=True, nonfinite="skip")
    state, _ = step(_fresh(step), good)
    # The first gradient by hand (w = 0): 2/N · Xᵀ(0 − y), averaged over two equal halves.
    g = 2 / 8 * good["x"].T @ (-good["y"])
    m = state.opt_state[0].measurements
    norm = float(g.norm())
    assert float(m["norm"]) == pytest.approx(norm, rel=1e-12)
    assert bool(m["clipped"]) is (norm > 1.0) and m["clipped"].dtype == torch.bool
    assert int(m["positive"]) == int((g > 0).sum()) and m["positive"].dtype == torch.int64
    torch.testing.assert_close(m["twice"]["w"], 2 * g, rtol=1e-12, atol=1e-12)
    assert float(m["ema"]) == pytest.approx(norm, rel=1e-12)  # debiased first step
    assert float(state.opt_state[1].measurement["last"]) == pytest.approx(norm, rel=1e-12)

    before = ft.tree.map(torch.clone, (state.params, state.opt_state))
    state, metrics = step(state, bad)
    assert int(metrics["skipped"]) == 1
    testing.assert_trees_all_equal((state.params, state.opt_state), before)

    # The next good step continues the average from the kept state: e = (0.5·n1 + 0.5·n2)·0.5
    # divided by 1 − 0.5² (optax's debiased ema, written out here).
    w1 = before[0]["w"]
    g2 = 2 / 8 * good["x"].T @ (good["x"] @ w1 - good["y"])
    state, _ = step(state, good)
    n2 = float(g2.norm())
    expected = (0.5 * (0.5 * norm) + 0.5 * n2) / (1 - 0.25)
    assert float(state.opt_state[0].measurements["ema"]) == pytest.approx(expected, rel=1e-12)


def test_checkpoint_round_trip_of_the_measurements(tmp_path: Path):
    good, _ = _batches()
    step = ft.make_train_step(_loss, _tx(), micro_batches=2, donate=False)
    state, _ = step(_fresh(step), good)
    path = tmp_path / "state.safetensors"
    ft.checkpoint.save(path, state)
    # A target with the measurements' structure: a state that has taken one step.
    target, _ = step(_fresh(step), good)
    restored = ft.checkpoint.restore(path, target=target)
    testing.assert_trees_all_equal(restored.opt_state, state.opt_state)
    assert restored.opt_state[0].measurements["clipped"].dtype == torch.bool


def test_restore_into_a_freshly_initialised_target(tmp_path: Path):
    good, _ = _batches()
    step = ft.make_train_step(_loss, _tx(), micro_batches=2, donate=False)
    state, _ = step(_fresh(step), good)
    path = tmp_path / "state.safetensors"
    ft.checkpoint.save(path, state)
    restored = ft.checkpoint.restore(path, target=_fresh(step))  # the documented recipe
    testing.assert_trees_all_equal(restored.opt_state, state.opt_state)


def test_compiled_train_step_without_recompiles():
    good, _ = _batches()
    torch._dynamo.reset()
    compiled = ft.make_train_step(_loss, _tx(), compile={"backend": "aot_eager"})
    eager = ft.make_train_step(_loss, _tx())
    s_c, s_e = _fresh(compiled), _fresh(eager)
    s_c, _ = compiled(s_c, good)
    s_e, _ = eager(s_e, good)
    with testing.assert_max_compiles(1):
        for _ in range(3):
            s_c, _ = compiled(s_c, good)
            s_e, _ = eager(s_e, good)
    testing.assert_trees_all_close(s_c.opt_state, s_e.opt_state, rtol=1e-12, atol=1e-12)
