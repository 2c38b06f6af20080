"""Review of ``make_train_step(..., compile=...)``: errors, recompile limits, donation, resume.

Compiled with ``backend="aot_eager"`` (dynamo and AOTAutograd, no code generation): tracing
failures and recompilations are dynamo's doing whatever the backend. References are the eager
step (``compile=False``) on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functrain as ft
from functrain import testing
from functrain.train import train_step as step_module

FAST = {"backend": "aot_eager"}


def _mlp(*, batch_norm=False, dropout=False, dtype=torch.float64):
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 8)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(8))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(0.3))
    return ft.functionalize(nn.Sequential(*layers, nn.Linear(8, 2)).to(dtype))


def _batch(n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 4, generator=g).to(dtype),
        "y": torch.randn(n, 2, generator=g).to(dtype),
    }


def _clone(tree):
    return ft.tree.map(torch.clone, tree)


def _raised(step, state, batch):
    with pytest.raises(Exception) as info:
        step(state, batch)
    return info.value


# -- errors raised inside the compiled core ------------------------------------------------------

_MODEL, _PARAMS, _ = _mlp()


def _picky_loss(params, batch):
    """A loss whose error depends on the batch's structure (one step object for every case)."""
    out = _MODEL(params, batch["x"][:, :3] if "narrow" in batch else batch["x"])
    err = (out - batch["y"]).square()
    if "rows" in batch and batch["x"].shape[0] != 4:
        raise ValueError(f"expected 4 rows, got {batch['x'].shape[0]}")
    if "per_example" in batch:
        return err  # not reduced: the step's own check refuses it
    if "aux" in batch:
        return ft.LossOutput(err.mean(), aux={"loss": err.mean()})  # clashes with a metric
    return err.mean()


@pytest.fixture(scope="module")
def picky_steps():
    tx = ft.adam(1e-2)
    return (
        ft.make_train_step(_picky_loss, tx, micro_batches=2, compile=FAST),
        ft.make_train_step(_picky_loss, tx, micro_batches=2),
        tx,
    )


@pytest.mark.parametrize("case", ["rows", "per_example", "aux", "narrow"])
def test_errors_in_loss_fn_keep_their_type_and_message(picky_steps, case):
    """Dynamo reports an exception raised while tracing as ``Unsupported: Observed exception``
    (a ``RuntimeError``) or a fake-tensor ``TorchRuntimeError``, hiding the ValueError /
    TypeError and message the eager step raises (including the step's own clear checks)."""
    compiled, eager, tx = picky_steps
    batch = {**_batch(), case: torch.zeros(6)}
    state = ft.TrainState.create(params=_PARAMS, tx=tx)
    before = _clone(state)
    expected = _raised(eager, ft.TrainState.create(params=_PARAMS, tx=tx), batch)
    got = _raised(compiled, state, batch)
    assert type(got) is type(expected), repr(got)[:300]
    assert str(got) == str(expected)
    # The state was not touched and still trains.
    assert not state.consumed
    testing.assert_trees_all_equal(state, before)
    compiled(state, _batch())


def test_an_error_after_the_update_leaves_the_donated_state_usable(monkeypatch):
    """The real error comes from an eager run; with ``donate=True`` that run writes its update in
    place, so it must run on copies and must not make the caller treat its own state as torn."""

    def fail(self, *args, **kwargs):
        raise ValueError("metrics failed after the update")

    monkeypatch.setattr(step_module.TrainStep, "_finish_metrics", fail)
    tx = ft.adam(1e-2)  # a fused in-place update when eager and donating
    step = ft.make_train_step(
        _picky_loss,
        tx,
        compile=FAST,
        max_consecutive_skips=2,
        loss_scale=ft.DynamicLossScale(),  # read from a slot the compiled core sets
    )
    state = step.prepare(ft.TrainState.create(params=_PARAMS, tx=tx))
    before = _clone(state)
    with pytest.raises(ValueError, match="metrics failed after the update"):
        step(state, _batch())
    assert not state.consumed
    testing.assert_trees_all_equal(state, before)


def _notes(err):
    return "\n".join(getattr(err, "__notes__", []))


def test_untraceable_loss_fn_errors_say_what_to_do():
    """``ft.key_generator`` (the documented way to use the ``key`` argument) and host reads
    cannot be traced; the error must say what the compiled step needs instead."""
    model, params, _ = _mlp()
    tx = ft.sgd(0.1)

    def key_loss(p, b, key):
        noise = torch.rand(b["x"].shape, generator=ft.key_generator(key), dtype=b["x"].dtype)
        return (model(p, b["x"] + noise) - b["y"]).square().mean()

    def item_loss(p, b):
        loss = (model(p, b["x"]) - b["y"]).square().mean()
        return loss * 0 if loss.item() > 1e9 else loss

    state = ft.TrainState.create(params=params, tx=tx)
    err = _raised(ft.make_train_step(key_loss, tx, compile=FAST), state, _batch())
    assert "key_generator" in _notes(err) and "torch.rand" in _notes(err)
    err = _raised(ft.make_train_step(item_loss, tx, compile=FAST), state, _batch())
    assert ".item()" in _notes(err) and "compile=False" in _notes(err)
    assert not state.consumed


def test_a_failure_of_torch_compile_alone_is_named_as_such():
    """Dropout under symbolic shapes (``dynamic=True``) fails to trace though eager runs: the
    error must say the step itself is fine and point back to static shapes."""
    model, params, _ = _mlp(dropout=True, dtype=torch.float32)
    tx = ft.sgd(0.1)

    def loss_fn(p, b):
        return (model(p, b["x"]) - b["y"]).square().mean()

    step = ft.make_train_step(loss_fn, tx, compile={**FAST, "dynamic": True})
    state = ft.TrainState.create(params=params, tx=tx)
    err = _raised(step, state, _batch(dtype=torch.float32))
    assert isinstance(err, torch._dynamo.exc.TorchDynamoException)
    assert "torch.compile limitation" in _notes(err) and "static shapes" in _notes(err)
    assert not state.consumed


def test_the_recompile_limit_error_says_what_to_do():
    """Every new batch shape compiles again; past ``recompile_limit`` (8 by default: a run with
    variable sequence lengths) fullgraph=True fails with "Hard failure due to fullgraph=True"."""
    model, params, _ = _mlp()
    tx = ft.sgd(0.1)

    def loss_fn(p, b):
        return (model(p, b["x"]) - b["y"]).square().mean()

    step = ft.make_train_step(loss_fn, tx, compile=FAST)
    state = ft.TrainState.create(params=params, tx=tx)
    with torch._dynamo.config.patch(recompile_limit=2):
        for n in (4, 5):
            state, _ = step(state, _batch(n))
        err = _raised(step, state, _batch(6))
    assert "recompile_limit" in _notes(err) and "batch shape" in _notes(err)
    assert "dynamic" in _notes(err)
    assert not state.consumed
    step(state, _batch(4))  # a shape compiled before still runs


# -- probes that hold: donation and resume -------------------------------------------------------


def _bn_loss(model):
    def loss_fn(p, b, buffers):
        out, new_buffers = model.apply(p, buffers, b["x"])
        err = (out - b["y"]).square().sum(-1)
        return ft.LossOutput(
            ft.LossSum(err.sum(), b["x"].shape[0]), aux={"max": err.max()}, buffers=new_buffers
        )

    return loss_fn


def test_donate_false_leaves_every_input_leaf_bitwise_unchanged():
    """Params, optimizer state, buffers, key and every ``extra`` entry (skip counters, loss
    scale, noise-scale state), through finite and skipped (NaN) steps."""
    model, params, buffers = _mlp(batch_norm=True)
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-2))
    step = ft.make_train_step(
        _bn_loss(model),
        tx,
        micro_batches=2,
        donate=False,
        compile=FAST,
        grad_stats=ft.noise_scale_hook(),
        max_consecutive_skips=3,
        loss_scale=ft.DynamicLossScale(init_scale=2.0**8),
    )
    state = step.prepare(ft.TrainState.create(params=params, tx=tx, buffers=buffers, seed=1))
    for i in range(3):
        batch = _batch(seed=i)
        if i == 1:
            batch["x"][0, 0] = float("nan")
        before = _clone(state)
        new, metrics = step(state, batch)
        testing.assert_trees_all_equal(state, before)
        assert int(metrics["skipped"]) == (i == 1)
        state = new


def test_resume_with_dropout_batch_norm_and_extras_is_bitwise_without_recompiling(tmp_path):
    model, params, buffers = _mlp(batch_norm=True, dropout=True, dtype=torch.float32)
    schedule = ft.cosine_decay_schedule(0.05, 10)
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.inject_hyperparams(ft.adamw)(schedule))
    options = dict(
        micro_batches=2,
        grad_stats=ft.noise_scale_hook(),
        max_consecutive_skips=3,
        loss_scale=ft.DynamicLossScale(init_scale=2.0**6, growth_interval=2),
    )
    compiled = ft.make_train_step(_bn_loss(model), tx, compile=FAST, **options)
    eager = ft.make_train_step(_bn_loss(model), tx, **options)
    batches = [_batch(8, seed=i, dtype=torch.float32) for i in range(5)]
    batches[1]["x"][0, 0] = float("nan")

    def fresh():
        return ft.TrainState.create(params=params, tx=tx, buffers=buffers, seed=7)

    reference = fresh()
    for i, b in enumerate(batches):
        reference, ref_metrics = compiled(reference, b)
        if i == 2:
            ft.checkpoint.save(tmp_path / "compiled", reference)
    state = fresh()
    for b in batches[:3]:
        state, _ = eager(state, b)
    ft.checkpoint.save(tmp_path / "eager", state)
    torch.manual_seed(123)  # the global generator's state must not matter
    with testing.assert_max_compiles(0):
        restored = ft.checkpoint.restore(tmp_path / "compiled", target=compiled.prepare(fresh()))
        for b in batches[3:]:
            restored, metrics = compiled(restored, b)
        # A checkpoint of the eager step resumes under the compiled graph, too.
        from_eager = ft.checkpoint.restore(tmp_path / "eager", target=compiled.prepare(fresh()))
        compiled(from_eager, batches[3])
    testing.assert_trees_all_equal(restored, reference)
    testing.assert_trees_all_equal(metrics, ref_metrics)
    assert int(restored.extra["nonfinite"].total) == 1


# -- functrain.testing's trace counter ------------------------------------------------------------


def test_assert_max_traces_does_not_count_a_restarted_analysis():
    """Dynamo restarts the analysis of a frame at a graph break (to compile the part before
    it): one trace of the function was counted twice, failing ``n=1`` on the first call."""

    @testing.assert_max_traces(n=1)
    def fn(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    compiled = torch.compile(fn, backend="eager")
    for _ in range(3):
        torch.testing.assert_close(compiled(torch.ones(2)), torch.full((2,), 3.0))
    assert fn.traces == 1
    with pytest.raises(AssertionError, match="traced 2 times"):
        compiled(torch.ones(3, dtype=torch.float64))  # a real retrace still counts
