"""Checks of the behavioural claims made in docs/guides/ (all but performance and per-sample).

Each test names the guide and the claim it checks. References are computed independently:
full-batch gradients in float64 with ``torch.autograd``, ``torch.optim`` optimizers, PyTorch
BatchNorm run by hand, TensorBoard event files read back with the ``tensorboard`` package, and
dynamo's compile counter. No expected value comes from the code under test.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F

import functrain as ft
from functrain import checkpoint, testing
from functrain import distributed as dist

F64 = torch.float64


def _linear(seed: int = 0, dtype: torch.dtype = F64) -> tuple[Any, dict[str, torch.Tensor]]:
    """A functional Linear(6, 3) in ``dtype``."""
    torch.manual_seed(seed)
    model, params, _ = ft.functionalize(torch.nn.Linear(6, 3).to(dtype))
    return model, params


def _full_batch_grad(
    model: Any, params: dict[str, torch.Tensor], loss: Any, batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The gradient of ``loss`` on the whole batch with torch.autograd (no accumulation)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(loss(leaves, batch), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


# --- gradient-accumulation.md ----------------------------------------------------------


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("k", [3, 4, 7])
def test_accumulation_is_full_batch_gradient_whatever_the_split(strategy: str, k: int) -> None:
    """'Either way the step returns the gradient of the full batch ... whatever the sizes'."""
    model, params = _linear()
    batch = {"x": torch.randn(10, 6, dtype=F64), "y": torch.randint(0, 3, (10,))}

    def loss_fn(p: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(p, b["x"]), b["y"])

    g = _full_batch_grad(model, params, loss_fn, batch)
    tx = ft.sgd(1.0)
    step = ft.make_train_step(loss_fn, tx, micro_batches=k, strategy=strategy, donate=False)
    state, metrics = step(ft.TrainState.create(params=params, tx=tx), batch)
    for name in params:
        torch.testing.assert_close(state.params[name], params[name] - g[name], rtol=0, atol=1e-14)
    torch.testing.assert_close(metrics["loss"], loss_fn(params, batch), rtol=1e-14, atol=0)


def test_micro_batch_split_is_tensor_split() -> None:
    """'`micro_batches=4` on a batch of 10 splits it 3, 3, 2, 2 (as torch.tensor_split does)'."""
    assert [len(c) for c in torch.tensor_split(torch.arange(10), 4)] == [3, 3, 2, 2]
    sizes: list[int] = []

    def loss_fn(p: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
        sizes.append(b["x"].shape[0])
        return (p["w"] * b["x"]).sum(-1).mean()

    params = {"w": torch.ones(2, dtype=F64)}
    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, micro_batches=4, grad_backend="autograd")
    step(ft.TrainState.create(params=params, tx=tx), {"x": torch.randn(10, 2, dtype=F64)})
    assert sizes == [3, 3, 2, 2]


def _token_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randn(8, 5, 6, generator=g, dtype=F64)
    labels = torch.randint(0, 3, (8, 5), generator=g)
    labels[torch.arange(5) >= (torch.arange(8) % 5 + 1)[:, None]] = -100  # 1 to 5 tokens
    return {"x": ids, "labels": labels}


@pytest.mark.parametrize("k", [1, 3, 8])
def test_loss_sum_is_exact_token_mean_for_any_micro_batches(k: int) -> None:
    """'the exact token mean of the batch, independent of `micro_batches`' (loss and grads)."""
    model, params = _linear(1)
    batch = _token_batch()

    def loss_fn(p: Any, b: dict[str, torch.Tensor]) -> ft.LossSum:
        total = F.cross_entropy(
            model(p, b["x"]).flatten(0, 1), b["labels"].flatten(), reduction="sum"
        )
        return ft.LossSum(total, (b["labels"] != -100).sum())

    def token_mean(p: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(p, b["x"]).flatten(0, 1), b["labels"].flatten())

    g = _full_batch_grad(model, params, token_mean, batch)
    tx = ft.sgd(1.0)
    step = ft.make_train_step(loss_fn, tx, micro_batches=k, donate=False)
    state, metrics = step(ft.TrainState.create(params=params, tx=tx), batch)
    torch.testing.assert_close(metrics["loss"], token_mean(params, batch), rtol=1e-14, atol=0)
    for name in params:
        torch.testing.assert_close(state.params[name], params[name] - g[name], rtol=0, atol=1e-14)


def test_aux_metrics_combine_by_examples_and_by_counts() -> None:
    """'a 0-d tensor is combined as a mean over examples and an ft.LossSum as Σtotal/Σcount'."""
    model, params = _linear(2)
    batch = _token_batch()

    def loss_fn(p: Any, b: dict[str, torch.Tensor]) -> ft.LossOutput:
        logits = model(p, b["x"])
        mask = b["labels"] != -100
        hits = ((logits.argmax(-1) == b["labels"]) & mask).sum()
        per_seq = (logits.mean(-1) * mask).sum(-1) / mask.sum(-1)
        return ft.LossOutput(
            per_seq.mean(), aux={"acc": ft.LossSum(hits, mask.sum()), "seq": per_seq.mean()}
        )

    tx = ft.sgd(0.0)
    step = ft.make_train_step(loss_fn, tx, micro_batches=3, donate=False)
    _, metrics = step(ft.TrainState.create(params=params, tx=tx), batch)
    logits = model(params, batch["x"])
    mask = batch["labels"] != -100
    hits = ((logits.argmax(-1) == batch["labels"]) & mask).sum()
    acc = hits.to(F64) / mask.sum().to(F64)
    per_seq = (logits.mean(-1) * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(metrics["acc"].to(F64), acc, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["seq"], per_seq.mean(), rtol=1e-12, atol=0)


def test_schedules_count_optimizer_steps_not_micro_batches() -> None:
    """'The count in the optimizer state advances once per step, not once per micro-batch'."""
    model, params = _linear(3)
    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=lambda c: 0.1 * (c + 1))
    loss_fn = lambda p, b: F.cross_entropy(model(p, b["x"]), b["y"])  # noqa: E731
    step = ft.make_train_step(loss_fn, tx, micro_batches=4)
    state = ft.TrainState.create(params=params, tx=tx)
    batch = {"x": torch.randn(8, 6, dtype=F64), "y": torch.randint(0, 3, (8,))}
    lrs = []
    for _ in range(3):
        state, metrics = step(state, batch)
        lrs.append(float(metrics["lr"]))
    assert lrs == pytest.approx([0.1, 0.2, 0.3], rel=1e-6)  # a float32 hyperparameter


def test_multisteps_averages_k_gradients_and_steps_once() -> None:
    """'MultiSteps ... accumulates the mean of K gradients and runs the inner optimizer once'."""
    grads = [torch.randn(4, dtype=F64) for _ in range(6)]
    ms = ft.MultiSteps(ft.adam(0.1), every_k_schedule=3)
    params = {"w": torch.zeros(4, dtype=F64)}
    state = ms.init(params)
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = torch.optim.Adam([p], lr=0.1)
    for i, g in enumerate(grads):
        updates, state = ms.update({"w": g}, state, params)
        params = ft.apply_updates(params, updates)
        if i % 3 < 2:
            assert not updates["w"].any()  # zero updates in between
        else:
            p.grad = torch.stack(grads[i - 2 : i + 1]).mean(0)
            opt.step()
            torch.testing.assert_close(params["w"], p.detach(), rtol=1e-12, atol=1e-14)


def test_batchnorm_loop_threads_buffers_like_consecutive_forward_passes() -> None:
    """'micro-batch i+1 sees the buffers micro-batch i produced, exactly as K forward passes'."""
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5)).to(F64)
    reference = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5)).to(F64)
    reference.load_state_dict(net.state_dict())
    model, params, buffers = ft.functionalize(net)
    batch = {"x": torch.randn(16, 6, dtype=F64)}

    def loss_fn(p: Any, b: dict[str, torch.Tensor], buffers: Any) -> ft.LossOutput:
        out, new = model.apply(p, buffers, b["x"])
        return ft.LossOutput(out.square().mean(), buffers=new)

    tx = ft.sgd(0.0)
    step = ft.make_train_step(loss_fn, tx, micro_batches=4)
    state, _ = step(ft.TrainState.create(params=params, tx=tx, buffers=buffers), batch)
    reference.train()
    for chunk in torch.tensor_split(batch["x"], 4):
        reference(chunk)
    bn = reference[1]
    torch.testing.assert_close(state.buffers["1.running_mean"], bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(state.buffers["1.running_var"], bn.running_var, rtol=0, atol=0)
    assert int(state.buffers["1.num_batches_tracked"]) == 4


def test_batchnorm_momentum_rule_of_thumb() -> None:
    """'m = 0.1 and K = 4 give m_K ≈ 0.026': K updates with m_K forget as one with m."""
    m_k = 1 - (1 - 0.1) ** (1 / 4)
    assert round(m_k, 3) == 0.026
    assert (1 - m_k) ** 4 == pytest.approx(0.9, rel=1e-12)


# --- composing-transforms.md -----------------------------------------------------------


def _run_ft(tx: ft.GradientTransformation, p0: torch.Tensor, grads: list[torch.Tensor]) -> Any:
    params = {"w": p0.clone()}
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"w": g}, state, params)
        params = ft.apply_updates(params, updates)
    return params["w"], state


def _run_torch(opt_cls: Any, p0: torch.Tensor, grads: list[torch.Tensor], **kw: Any) -> Any:
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


P0 = torch.linspace(-1.0, 1.0, 5, dtype=F64)
GRADS = [torch.randn(5, dtype=F64, generator=torch.Generator().manual_seed(i)) for i in range(5)]


def test_decay_after_adam_is_adamw_and_before_is_torch_adam_l2() -> None:
    """'after scale_by_adam ... (AdamW); before ... what torch.optim.Adam(weight_decay) does'."""
    after = ft.chain(
        ft.scale_by_adam(), ft.add_decayed_weights(0.1), ft.scale_by_learning_rate(0.01)
    )
    before = ft.chain(
        ft.add_decayed_weights(0.1), ft.scale_by_adam(), ft.scale_by_learning_rate(0.01)
    )
    ref_w = _run_torch(torch.optim.AdamW, P0, GRADS, lr=0.01, weight_decay=0.1)
    ref_l2 = _run_torch(torch.optim.Adam, P0, GRADS, lr=0.01, weight_decay=0.1)
    torch.testing.assert_close(_run_ft(after, P0, GRADS)[0], ref_w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_run_ft(before, P0, GRADS)[0], ref_l2, rtol=1e-12, atol=1e-14)


def test_scale_by_learning_rate_is_scale_minus_lr() -> None:
    """'`ft.scale(-lr)` is the same for a constant'."""
    a = _run_ft(ft.scale_by_learning_rate(0.3), P0, GRADS)[0]
    b = _run_ft(ft.scale(-0.3), P0, GRADS)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, P0 - 0.3 * torch.stack(GRADS).sum(0), rtol=1e-14, atol=1e-14)


def test_masked_passes_other_parameters_through_unchanged() -> None:
    """'ft.masked(inner, mask) runs inner where True and passes the others through'."""
    grads = {"a": torch.randn(3, dtype=F64), "b": torch.randn(3, dtype=F64)}
    params = {"a": torch.ones(3, dtype=F64), "b": torch.ones(3, dtype=F64)}
    tx = ft.masked(ft.scale(-2.0), {"a": True, "b": False})
    updates, _ = tx.update(grads, tx.init(params), params)
    torch.testing.assert_close(updates["a"], -2.0 * grads["a"], rtol=0, atol=0)
    torch.testing.assert_close(updates["b"], grads["b"], rtol=0, atol=0)


def test_apply_if_finite_skips_keeps_inner_state_and_counts() -> None:
    """'skips steps whose updates contain NaN ... keeping the inner state ... counting'."""
    tx = ft.apply_if_finite(ft.adam(0.1), max_consecutive_errors=5)
    params = {"w": P0.clone()}
    state = tx.init(params)
    _, state = tx.update({"w": GRADS[0]}, state, params)
    bad = GRADS[1].clone()
    bad[2] = float("nan")
    updates, new_state = tx.update({"w": bad}, state, params)
    assert not updates["w"].any()
    testing.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    assert int(new_state.notfinite_count) == 1 and int(new_state.total_notfinite) == 1


def test_zero_nans_replaces_nans_by_zeros() -> None:
    """'ft.zero_nans() replaces NaNs in gradients by zeros'."""
    g = torch.tensor([1.0, float("nan"), -2.0], dtype=F64)
    tx = ft.zero_nans()
    updates, _ = tx.update({"w": g}, tx.init({"w": g}), None)
    torch.testing.assert_close(updates["w"], torch.tensor([1.0, 0.0, -2.0], dtype=F64))


def test_inject_hyperparams_reports_the_schedule_at_the_count_before_the_update() -> None:
    """'the value used by the last update' / 'the first step of a warmup from 0 logs 0'."""
    schedule = ft.linear_schedule(0.0, 1.0, transition_steps=4)
    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=schedule)
    params = {"w": P0.clone()}
    state = tx.init(params)
    for i, g in enumerate(GRADS[:4]):
        new_params = ft.apply_updates(params, tx.update({"w": g}, state, params)[0])
        _, state = tx.update({"w": g}, state, params)
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(i / 4, abs=1e-7)
        torch.testing.assert_close(new_params["w"], params["w"] - i / 4 * g, rtol=1e-6, atol=1e-7)
        params = new_params


def test_named_chain_state_is_a_dict_of_member_states() -> None:
    """'ft.named_chain is chain with names: its state is a dict'."""
    tx = ft.named_chain(("clip", ft.clip_by_global_norm(1.0)), ("sgd", ft.sgd(0.1, 0.9)))
    state = tx.init({"w": P0})
    assert isinstance(state, dict) and list(state) == ["clip", "sgd"]
    plain = ft.chain(ft.clip_by_global_norm(1.0), ft.sgd(0.1, 0.9))
    torch.testing.assert_close(_run_ft(tx, P0, GRADS)[0], _run_ft(plain, P0, GRADS)[0])


# --- checkpoints.md --------------------------------------------------------------------


def test_checkpoint_refuses_a_function_leaf_naming_its_path(tmp_path: Path) -> None:
    """'A leaf of another type is a TypeError ... (cannot checkpoint state['opt'][1] ...)'."""
    state = {"opt": [torch.zeros(1), lambda: 0]}
    with pytest.raises(TypeError, match=r"cannot checkpoint state\['opt'\]\[1\] of type function"):
        checkpoint.save(tmp_path / "a.safetensors", state)


def test_checkpoint_mismatch_messages(tmp_path: Path) -> None:
    """The CheckpointMismatchError examples: dtype, missing entry, list vs tuple."""
    path = tmp_path / "s.safetensors"
    checkpoint.save(path, {"w": torch.zeros(2), "x": [torch.zeros(1)]})
    cases = [
        ({"w": torch.zeros(2, dtype=F64), "x": [torch.zeros(1)]}, "has dtype float32 but target"),
        ({"w": torch.zeros(2), "x": (torch.zeros(1),)}, "is a list but target has a tuple"),
        (
            {"w": torch.zeros(2), "x": [torch.zeros(1)], "b": torch.zeros(1)},
            r"target\['b'\] has no counterpart in the checkpoint",
        ),
    ]
    for target, message in cases:
        with pytest.raises(checkpoint.CheckpointMismatchError, match=message):
            checkpoint.restore(path, target=target)


def test_restore_without_target_gives_builtin_containers(tmp_path: Path) -> None:
    """'NamedTuples ... come back as dicts of their fields, tensors on the CPU'."""

    class Pair(NamedTuple):
        a: torch.Tensor
        b: int

    path = tmp_path / "p.safetensors"
    checkpoint.save(path, {"p": Pair(torch.arange(3), 7)})
    out = checkpoint.restore(path)
    assert type(out["p"]) is dict and out["p"]["b"] == 7
    assert torch.equal(out["p"]["a"], torch.arange(3))


def test_pickles_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    """'A pickle or a torch.save archive ... InvalidCheckpointError'; damaged files too."""
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(checkpoint.InvalidCheckpointError, match="is a Python pickle"):
        checkpoint.restore(evil)
    archive = tmp_path / "archive.pt"
    torch.save({"w": torch.zeros(2)}, archive)
    with pytest.raises(checkpoint.InvalidCheckpointError):
        checkpoint.restore(archive)
    good = tmp_path / "good.safetensors"
    checkpoint.save(good, {"w": torch.arange(4.0)})
    data = bytearray(good.read_bytes())
    data[-1] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(checkpoint.InvalidCheckpointError, match="checksum mismatch"):
        checkpoint.restore(bad)
    short = tmp_path / "short.safetensors"
    short.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.restore(short)


def test_manager_file_names_retention_and_refused_old_step(tmp_path: Path) -> None:
    """'checkpoint_00000042.safetensors', 'keeps the newest max_to_keep plus ... the best'."""
    manager = checkpoint.CheckpointManager(
        tmp_path, max_to_keep=2, best_metric="eval/loss", mode="min"
    )
    for step, loss in [(1, 0.5), (2, 0.1), (3, 0.7), (4, 0.9), (42, 0.8)]:
        manager.save(step, {"w": torch.full((1,), float(step))}, metrics={"eval/loss": loss})
    assert manager.all_steps() == [2, 4, 42] and manager.best_step() == 2
    assert (tmp_path / "checkpoint_00000042.safetensors").exists()
    with pytest.raises(ValueError):
        manager.save(3, {"w": torch.zeros(1)}, metrics={"eval/loss": 1.0})


def _dropout_setup() -> tuple[Any, Any, Any, dict[str, torch.Tensor]]:
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    model, params, _ = ft.functionalize(net)
    tx = ft.inject_hyperparams(ft.adamw)(ft.linear_schedule(0.0, 1e-2, 3), weight_decay=0.1)
    step = ft.make_train_step(
        lambda p, b: F.cross_entropy(model(p, b["x"]), b["y"]),
        tx,
        micro_batches=2,
        max_consecutive_skips=3,
    )
    state = step.prepare(ft.TrainState.create(params=params, tx=tx, key=ft.random_key(0)))
    data = {"x": torch.randn(8, 6), "y": torch.randint(0, 3, (8,))}
    return step, tx, params, {"state": state, **data}


def test_resume_is_bit_for_bit(tmp_path: Path) -> None:
    """'Training 2N steps equals N steps, saving, restoring and N more, bit-for-bit'."""
    step, tx, params, d = _dropout_setup()
    batch = {"x": d["x"], "y": d["y"]}
    straight = d["state"]
    for _ in range(4):
        straight, m_straight = step(straight, batch)
    resumed = _dropout_setup()[3]["state"]
    for _ in range(2):
        resumed, _ = step(resumed, batch)
    checkpoint.save(tmp_path / "c.safetensors", resumed)
    torch.manual_seed(123)  # whatever the process drew before does not matter
    target = step.prepare(ft.TrainState.create(params=params, tx=tx))
    resumed = checkpoint.restore(tmp_path / "c.safetensors", target=target)
    for _ in range(2):
        resumed, m_resumed = step(resumed, batch)
    testing.assert_trees_all_equal(resumed, straight)
    testing.assert_trees_all_equal(m_resumed, m_straight)


def test_bare_target_for_a_step_with_extra_state_is_rejected(tmp_path: Path) -> None:
    """'a bare target is rejected with a message naming the entry'."""
    _, tx, params, d = _dropout_setup()
    checkpoint.save(tmp_path / "c.safetensors", d["state"])
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"\['extra'\]\['nonfinite'\]"):
        checkpoint.restore(
            tmp_path / "c.safetensors", target=ft.TrainState.create(params=params, tx=tx)
        )


def test_nonfinite_step_is_skipped_bit_for_bit_and_counted() -> None:
    """'skipped: parameters ... optimizer state come out bit-for-bit ... state.step advances'."""
    step, _, _, d = _dropout_setup()
    state, _ = step(d["state"], {"x": d["x"], "y": d["y"]})
    before = ft.tree.map(torch.clone, (state.params, state.opt_state))
    bad_x = d["x"].clone()
    bad_x[0, 0] = float("nan")
    bad = {"x": bad_x, "y": d["y"]}
    for i in range(3):
        state, metrics = step(state, bad)
        assert int(metrics["skipped"]) == 1 and int(metrics["skipped_total"]) == i + 1
    testing.assert_trees_all_equal((state.params, state.opt_state), before)
    assert int(state.step) == 4
    state, _ = step(state, bad)  # the fourth in a row: more than max_consecutive_skips=3
    with pytest.raises(ft.NonFiniteError):
        step(state, {"x": d["x"], "y": d["y"]})


def test_dynamic_loss_scale_defaults_match_grad_scaler() -> None:
    """'the same defaults' as GradScaler: backoff 0.5, growth_interval 2000, growth 2.0."""
    policy = ft.DynamicLossScale()
    scaler = torch.amp.GradScaler("cpu")
    s = policy.init(torch.device("cpu"))
    assert float(s.scale) == scaler.get_scale()
    assert policy.backoff_factor == scaler.get_backoff_factor() == 0.5
    assert policy.growth_factor == scaler.get_growth_factor() == 2.0
    assert policy.growth_interval == scaler.get_growth_interval() == 2000


# --- torch-compile.md ------------------------------------------------------------------

_LOSS = lambda p, b: F.cross_entropy(b["x"] @ p["w"].T, b["y"])  # noqa: E731


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"mode": "reduce-overhead"}, ValueError),
        ({"mode": "max-autotune"}, ValueError),
        ({"options": {"triton.cudagraphs": True}}, ValueError),
        ({"backend": "cudagraphs"}, ValueError),
        ({"disable": True}, ValueError),
        ({"fulgraph": True}, TypeError),
    ],
)
def test_compile_options_refused(options: dict[str, Any], error: type[Exception]) -> None:
    """'All four raise a ValueError, as does {"disable": True}' and a typo is a TypeError."""
    with pytest.raises(error):
        ft.make_train_step(_LOSS, ft.sgd(0.1), compile=options)


def test_compile_with_autograd_backend_is_refused() -> None:
    """'`grad_backend="autograd"` ... make_train_step raises a ValueError naming the option'."""
    with pytest.raises(ValueError, match="grad_backend"):
        ft.make_train_step(_LOSS, ft.sgd(0.1), compile=True, grad_backend="autograd")


def test_compiled_step_compiles_once_and_matches_eager() -> None:
    """'It compiles once' across a schedule and a fresh state; a new shape recompiles."""
    params = {"w": torch.randn(3, 4)}
    tx = ft.inject_hyperparams(ft.adam)(ft.linear_schedule(1e-3, 1e-2, 4))
    kw: dict[str, Any] = {"micro_batches": 2, "donate": False}
    compiled = ft.make_train_step(_LOSS, tx, compile={"backend": "aot_eager"}, **kw)
    eager = ft.make_train_step(_LOSS, tx, **kw)
    g = torch.Generator().manual_seed(0)
    batches = [
        {"x": torch.randn(6, 4, generator=g), "y": torch.randint(0, 3, (6,), generator=g)}
        for _ in range(3)
    ]
    with testing.assert_max_compiles(1):
        for _ in range(2):  # a fresh state the second time
            a = b = ft.TrainState.create(params=params, tx=tx)
            for batch in batches:
                a, ma = compiled(a, batch)
                b, mb = eager(b, batch)
            testing.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ma["loss"], mb["loss"], rtol=1e-5, atol=1e-6)
    with testing.count_compiles() as count:
        compiled(a, {"x": torch.randn(4, 4), "y": torch.randint(0, 3, (4,))})
    assert count.compiles == 1


# --- tensorboard.md --------------------------------------------------------------------


def _read_tb(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run in ``logdir``, read with the tensorboard package."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_train_loop_writes_the_documented_tags(tmp_path: Path) -> None:
    """The 'default metrics' table: tag names, lr before the update, eval weighting."""
    torch.manual_seed(6)
    model, params, _ = ft.functionalize(torch.nn.Linear(4, 3))

    def loss_fn(p: Any, b: dict[str, torch.Tensor]) -> ft.LossOutput:
        logits = model(p, b["x"])
        acc = (logits.argmax(-1) == b["y"]).float().mean()
        return ft.LossOutput(F.cross_entropy(logits, b["y"]), aux={"accuracy": acc})

    tx = ft.chain(
        ft.clip_by_global_norm(1e-3),
        ft.inject_hyperparams(ft.sgd)(ft.linear_schedule(0.0, 0.1, 4)),
    )
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    data = {"x": torch.randn(32, 4), "y": torch.randint(0, 3, (32,))}
    evals = [{"x": torch.randn(n, 4), "y": torch.randint(0, 3, (n,))} for n in (5, 11)]
    from functrain.logging import TensorBoardWriter

    state0 = ft.TrainState.create(params=params, tx=tx)
    p0 = ft.tree.map(torch.clone, params)
    ft.train_loop(
        step,
        state0,
        ft.TensorBatches(data, 16, seed=0),
        epochs=1,
        eval_step=ft.make_eval_step(loss_fn),
        eval_batches=evals,
        writer=lambda purge_step: TensorBoardWriter(tmp_path, purge_step=purge_step),
        log_every=1,
    )
    scalars = _read_tb(tmp_path)
    expected = {
        "train/loss", "train/lr", "train/grad_norm", "train/update_norm", "train/param_norm",
        "train/update_param_ratio", "train/skipped", "train/accuracy", "perf/step_time_s",
        "perf/examples_per_s", "perf/data_time_s", "eval/loss", "eval/accuracy",
    }  # fmt: skip
    assert expected <= set(scalars), expected - set(scalars)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([0.0, 0.025], abs=1e-7)
    # The first step's grad norm, before clipping, from the first batch in float64.
    first = ft.TensorBatches(data, 16, seed=0)
    batch = next(first.iter_epoch(0))
    g = _full_batch_grad(
        model, ft.tree.map(lambda t: t.to(F64), p0), lambda p, b: loss_fn(p, b).loss,
        {"x": batch["x"].to(F64), "y": batch["y"]},
    )  # fmt: skip
    norm = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
    assert scalars["train/grad_norm"][0][1] == pytest.approx(norm, rel=1e-5)
    for (_, u), (_, p), (_, r) in zip(
        scalars["train/update_norm"], scalars["train/param_norm"],
        scalars["train/update_param_ratio"], strict=True,
    ):  # fmt: skip
        assert r == pytest.approx(u / p, rel=1e-5)


def test_purge_step_drops_the_interrupted_runs_later_points(tmp_path: Path) -> None:
    """'purge_step=k + 1 ... drop the earlier events with step >= k + 1'."""
    from functrain.logging import TensorBoardWriter

    with TensorBoardWriter(tmp_path) as w:
        for i in range(1, 6):
            w.write_scalars(i, {"x": float(i)})
    with TensorBoardWriter(tmp_path, purge_step=4) as w:
        for i in range(4, 7):
            w.write_scalars(i, {"x": 10.0 * i})
    assert _read_tb(tmp_path)["x"] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]


def test_hparams_go_into_the_same_run(tmp_path: Path) -> None:
    """'hparams go into the same run, not a sub-run'."""
    from functrain.logging import TensorBoardWriter

    with TensorBoardWriter(tmp_path) as w:
        w.write_hparams({"lr": 3e-3}, {"eval/loss": None})
        w.write_scalars(1, {"eval/loss": 0.5})
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "_hparams_/session_start_info" in acc.summary_metadata


# --- data-parallel.md ------------------------------------------------------------------


def test_without_torchrun_rank_zero_of_one() -> None:
    """'Without torchrun ... dist.rank() is 0, dist.world_size() is 1'."""
    assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_rank_zero()


def test_shard_indices_pieces_and_drop_last() -> None:
    """Contiguous pieces of one permutation, sizes differing by at most one; 65 on 2 ranks."""
    pieces = [
        dist.shard_indices(65, rank=r, world_size=2, shuffle=True, seed=1, epoch=3)
        for r in range(2)
    ]
    assert [len(p) for p in pieces] == [33, 32]
    assert sorted(torch.cat(pieces).tolist()) == list(range(65))
    assert [len(p.split(32)) for p in pieces] == [2, 1]
    again = dist.shard_indices(65, rank=0, world_size=2, shuffle=True, seed=1, epoch=4)
    assert not torch.equal(again, pieces[0])
    dropped = [dist.shard_indices(65, rank=r, world_size=2, drop_last=True) for r in range(2)]
    assert [len(p) for p in dropped] == [32, 32]


@pytest.mark.parametrize(
    "tx", [ft.lamb(1e-3), ft.adafactor(), ft.chain(ft.sgd(0.1), ft.clip_by_global_norm(1.0))]
)
def test_check_shardable_refuses_norm_based_transforms(tx: ft.GradientTransformation) -> None:
    """The 'refused' row: lamb, adafactor, clip_by_global_norm not first."""
    with pytest.raises(dist.ShardingError):
        dist.check_shardable(tx)


def test_check_shardable_accepts_clip_first_then_adamw() -> None:
    """'clip_by_global_norm as the first transform' is exact through the step."""
    dist.check_shardable(ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(3e-3)))
