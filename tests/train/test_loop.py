"""train_loop: data order, metrics, evaluation, checkpoints and resume, Ctrl-C, DataLoader."""

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import functrain as ft
from functrain.checkpoint import CheckpointManager
from functrain.logging import TensorBoardWriter

N, BATCH = 48, 8  # 6 batches per epoch


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=gen)
    return {"x": x, "y": torch.randint(0, 3, (N,), generator=gen), "idx": torch.arange(N)}


def _setup(k=2, dropout=0.2):
    """An MLP with dropout (so the random key must be restored too) and AdamW + schedule."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))
    model, params, _ = ft.functionalize(net)

    def loss_fn(p, batch):
        return F.cross_entropy(model(p, batch["x"]), batch["y"])

    schedule = ft.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=3, decay_steps=20)
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.inject_hyperparams(ft.adamw)(schedule))
    state = ft.TrainState.create(params=params, tx=tx, seed=3)
    step = ft.make_train_step(loss_fn, tx, micro_batches=k)
    return step, state, loss_fn


class Recorder:
    """Wraps a step and records the example indices of every batch it sees."""

    def __init__(self, step):
        self.step, self.seen = step, []

    def __call__(self, state, batch):
        self.seen.append(batch["idx"].tolist())
        return self.step(state, batch)


def _events(path):
    acc = EventAccumulator(os.fspath(path), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _curve(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_loop_equals_manual_steps_over_seeded_epochs():
    step, state, _ = _setup()
    batches = ft.TensorBatches(_data(), BATCH, seed=7)
    result = ft.train_loop(step, state, batches, epochs=2)

    step2, ref, _ = _setup()
    for epoch in range(2):
        batches.set_epoch(epoch)
        for batch in batches:
            ref, _ = step2(ref, batch)
    ft.testing.assert_trees_all_equal(result.state.params, ref.params)
    assert int(result.state.step) == 12
    assert result.history.steps("train/loss") == list(range(1, 13))


def test_epoch_order_is_a_seeded_permutation():
    step, state, _ = _setup()
    rec = Recorder(step)
    ft.train_loop(rec, state, ft.TensorBatches(_data(), BATCH, seed=7), epochs=2)
    epochs = [[i for batch in rec.seen[e * 6 : (e + 1) * 6] for i in batch] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N))
    assert epochs[0] != epochs[1]
    rec2 = Recorder(_setup()[0])
    ft.train_loop(rec2, _setup()[1], ft.TensorBatches(_data(), BATCH, seed=7), epochs=2)
    assert rec2.seen == rec.seen


def test_default_metrics_reach_tensorboard(tmp_path):
    step, state, loss_fn = _setup()
    data = _data()
    with TensorBoardWriter(tmp_path) as writer:
        result = ft.train_loop(
            step,
            state,
            ft.TensorBatches(data, BATCH, seed=1),
            epochs=2,
            writer=writer,
            eval_step=ft.make_eval_step(loss_fn),
            eval_batches=[data],
        )
    acc = _events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/update_param_ratio",
        "train/update_norm",
        "train/param_norm",
        "perf/step_time_s",
        "perf/examples_per_s",
        "perf/data_time_s",
        "eval/loss",
    }
    assert expected <= tags
    assert all(t.startswith("train/") for t in tags - expected)  # other step metrics
    loss = _curve(acc, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 13))
    assert [v for _, v in loss] == pytest.approx(result.history.values("train/loss"), rel=1e-6)
    # Evaluation at the end of each epoch.
    assert [s for s, _ in _curve(acc, "eval/loss")] == [6, 12]
    ratio = dict(_curve(acc, "train/update_param_ratio"))
    upd, par = dict(_curve(acc, "train/update_norm")), dict(_curve(acc, "train/param_norm"))
    assert ratio[5] == pytest.approx(upd[5] / par[5], rel=1e-5)
    for _, v in _curve(acc, "perf/examples_per_s"):
        assert v > 0
    lr = [v for _, v in _curve(acc, "train/lr")]
    # The lr each step used: the schedule at the count before the step (optax).
    assert lr[:4] == pytest.approx([0.0, 1e-2 / 3, 2e-2 / 3, 1e-2])


def test_log_every_logs_multiples_and_the_last_step():
    step, state, _ = _setup()
    result = ft.train_loop(
        step, state, ft.TensorBatches(_data(), BATCH), epochs=2, max_steps=10, log_every=4
    )
    assert result.history.steps("train/loss") == [4, 8, 10]
    assert result.history.steps("perf/step_time_s") == [4, 8, 10]


def _count_saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, len(saved)


def test_eval_does_no_gradient_work_and_is_example_weighted():
    step, state, loss_fn = _setup(dropout=0.0)
    data = _data()
    calls = []
    base_eval = ft.make_eval_step(loss_fn)

    def eval_step(s, batch):
        assert not torch.is_grad_enabled()
        before = {k: v.clone() for k, v in s.params.items()}
        out, saved = _count_saved_tensors(lambda: base_eval(s, batch))
        assert saved == 0  # nothing kept for a backward pass
        ft.testing.assert_trees_all_equal(s.params, before)
        calls.append(int(s.step))
        return out

    # Uneven eval batches: the mean must be weighted by examples (5 and 3).
    x, y = data["x"][:8].double(), data["y"][:8]
    eval_batches = [{"x": x[:5].float(), "y": y[:5]}, {"x": x[5:].float(), "y": y[5:]}]
    result = ft.train_loop(
        step,
        state,
        ft.TensorBatches(data, BATCH),
        epochs=2,
        eval_step=eval_step,
        eval_batches=eval_batches,
        eval_every=4,
    )
    assert calls == [4, 4, 8, 8, 12, 12]  # two eval batches at steps 4, 8 and 12
    params = {k: v.double() for k, v in result.state.params.items()}
    logits = F.linear(F.relu(F.linear(x, params["0.weight"], params["0.bias"])), params["3.weight"])
    expected = F.cross_entropy(logits + params["3.bias"], y)
    assert result.history.last("eval/loss") == pytest.approx(float(expected), rel=1e-5)


def _token_setup():
    torch.manual_seed(0)
    emb = nn.Embedding(7, 4)
    model, params, _ = ft.functionalize(emb)

    def loss_fn(p, batch):
        logits = model(p, batch["ids"]) @ p["weight"].T
        targets = torch.where(batch["mask"], batch["ids"], -100)
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        return ft.LossSum(total, batch["mask"].sum())

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (16, 6), generator=gen)
    lengths = torch.randint(1, 7, (16,), generator=gen)
    mask = torch.arange(6)[None] < lengths[:, None]
    return model, params, loss_fn, {"ids": ids, "mask": mask}


def test_token_losses_give_tokens_per_second_and_token_weighted_eval():
    _, params, loss_fn, data = _token_setup()
    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    halves = [{k: v[:4] for k, v in data.items()}, {k: v[4:] for k, v in data.items()}]
    result = ft.train_loop(
        step,
        ft.TrainState.create(params=params, tx=tx),
        ft.TensorBatches(data, 8, shuffle=False),
        eval_step=ft.make_eval_step(loss_fn),
        eval_batches=halves,
    )
    assert all(v > 0 for v in result.history.values("perf/tokens_per_s"))
    # Σ total / Σ count over the whole set, not the mean of the two batch means.
    total = sum(float(loss_fn(result.state.params, b).total) for b in halves)
    count = int(data["mask"].sum())
    assert result.history.last("eval/loss") == pytest.approx(total / count, rel=1e-5)


def _run_to_end(tmp_path, name, **kwargs):
    step, state, _ = _setup()
    rec = Recorder(step)
    logdir = tmp_path / name

    result = ft.train_loop(
        rec,
        state,
        ft.TensorBatches(_data(), BATCH, seed=5),
        epochs=3,
        writer=lambda purge_step: TensorBoardWriter(logdir, purge_step=purge_step),
        checkpoint_manager=CheckpointManager(tmp_path / (name + "_ckpt")),
        **kwargs,
    )
    return result, rec.seen, logdir


def test_resume_continues_bit_for_bit_with_the_same_data_order(tmp_path):
    full, full_seen, full_dir = _run_to_end(tmp_path, "full")
    # 2N == N + resume + N, with N = 9 (mid-epoch: 9 = 6 + 3).
    first, first_seen, logdir = _run_to_end(tmp_path, "split", max_steps=9)
    assert int(first.state.step) == 9 and first.resumed_from is None
    second, second_seen, _ = _run_to_end(tmp_path, "split")
    assert second.resumed_from == 9
    assert first_seen + second_seen == full_seen
    assert int(second.state.step) == int(full.state.step) == 18
    ft.testing.assert_trees_all_equal(second.state, full.state)
    # One curve, each step once, the same values as the uninterrupted run.
    assert _curve(_events(logdir), "train/loss") == _curve(_events(full_dir), "train/loss")


def test_crash_after_a_checkpoint_is_purged_from_tensorboard(tmp_path):
    full, _, full_dir = _run_to_end(tmp_path, "full")

    class Crash(Exception):
        pass

    def crashing(epoch):
        for i, batch in enumerate(ft.TensorBatches(_data(), BATCH, seed=5).iter_epoch(epoch)):
            if epoch == 1 and i == 1:
                raise Crash  # step 8 never happens; the last checkpoint is step 4
            yield batch

    step, state, _ = _setup()
    logdir, ckpt = tmp_path / "crash", tmp_path / "crash_ckpt"
    with pytest.raises(Crash):
        ft.train_loop(
            step,
            state,
            crashing,
            epochs=3,
            writer=lambda purge_step: TensorBoardWriter(logdir, purge_step=purge_step),
            checkpoint_manager=CheckpointManager(ckpt),
            checkpoint_every=4,
        )
    assert CheckpointManager(ckpt).all_steps() == [4]
    assert [s for s, _ in _curve(_events(logdir), "train/loss")] == list(range(1, 8))
    step, state, _ = _setup()
    result = ft.train_loop(
        step,
        state,
        ft.TensorBatches(_data(), BATCH, seed=5),
        epochs=3,
        writer=lambda purge_step: TensorBoardWriter(logdir, purge_step=purge_step),
        checkpoint_manager=CheckpointManager(ckpt),
        checkpoint_every=4,
    )
    assert result.resumed_from == 4
    ft.testing.assert_trees_all_equal(result.state.params, full.state.params)
    # Steps 5..7 were written twice; TensorBoard keeps the resumed run's only.
    assert _curve(_events(logdir), "train/loss") == _curve(_events(full_dir), "train/loss")


def _interrupting(after):
    data = _data()

    def batches(epoch):
        for i, batch in enumerate(ft.TensorBatches(data, BATCH, seed=5).iter_epoch(epoch)):
            if epoch * 6 + i == after:
                raise KeyboardInterrupt
            yield batch

    return batches


def test_ctrl_c_in_the_batch_iterator_saves_flushes_and_reraises(tmp_path):
    full, _, _ = _run_to_end(tmp_path, "full")
    step, state, _ = _setup()
    ckpt = tmp_path / "ckpt"
    writer = TensorBoardWriter(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        ft.train_loop(
            step,
            state,
            _interrupting(after=7),
            epochs=3,
            writer=writer,
            log_every=5,
            checkpoint_manager=CheckpointManager(ckpt),
        )
    # Flushed, not closed (the writer is the caller's): step 7 was logged although 7 % 5 != 0.
    assert [s for s, _ in _curve(_events(tmp_path / "run"), "train/loss")] == [5, 7]
    writer.write_scalars(8, {"still": 1.0})
    writer.close()
    assert CheckpointManager(ckpt).all_steps() == [7]

    step, state, _ = _setup()
    result = ft.train_loop(
        step,
        state,
        ft.TensorBatches(_data(), BATCH, seed=5),
        epochs=3,
        checkpoint_manager=CheckpointManager(ckpt),
    )
    assert result.resumed_from == 7
    ft.testing.assert_trees_all_equal(result.state.params, full.state.params)


def test_catch_interrupt_returns_the_state():
    step, state, _ = _setup()
    result = ft.train_loop(step, state, _interrupting(after=3), epochs=3, catch_interrupt=True)
    assert result.interrupted and int(result.state.step) == 3
    assert result.history.steps("train/loss") == [1, 2, 3]


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="needs Python's default SIGINT handler",
)
def test_sigint_during_a_step_is_held_until_the_step_is_done(tmp_path):
    step, state, loss_fn = _setup(dropout=0.0)
    ref_step, ref, _ = _setup(dropout=0.0)
    calls = []

    def interrupting_loss(p, batch):
        calls.append(None)
        if len(calls) == 5:  # step 3, first micro-batch (k=2)
            signal.raise_signal(signal.SIGINT)
        return loss_fn(p, batch)

    tx_step = ft.make_train_step(interrupting_loss, step.tx, micro_batches=2)
    ckpt = CheckpointManager(tmp_path)
    batches = ft.TensorBatches(_data(), BATCH, seed=5)
    with pytest.raises(KeyboardInterrupt):
        ft.train_loop(tx_step, state, batches, epochs=1, checkpoint_manager=ckpt)
    assert len(calls) == 6  # the step finished both micro-batches
    assert ckpt.all_steps() == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    for batch in list(batches)[:3]:
        ref, _ = ref_step(ref, batch)
    restored = ckpt.restore(3, target=_setup()[1])
    ft.testing.assert_trees_all_equal(restored.params, ref.params)


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_dataloader_with_a_worker_and_pinned_memory():
    data = _data()
    dataset = torch.utils.data.TensorDataset(data["x"], data["y"], data["idx"])

    def run():
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=BATCH,
            shuffle=True,
            generator=torch.Generator(),
            num_workers=1,
            pin_memory=True,
        )
        step, state, _ = _setup()
        rec = Recorder(step)
        as_dict = lambda s, b: rec(s, {"x": b[0], "y": b[1], "idx": b[2]})  # noqa: E731
        return ft.train_loop(as_dict, state, loader, epochs=2), rec.seen

    (first, seen), (second, seen2) = run(), run()
    assert int(first.state.step) == 12
    assert seen == seen2 and seen[:6] != seen[6:12]  # reseeded per epoch, reproducibly
    ft.testing.assert_trees_all_equal(first.state.params, second.state.params)


def test_shuffling_dataloader_without_a_generator_warns():
    data = _data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"], data["y"]), batch_size=BATCH, shuffle=True
    )
    step, state, _ = _setup()
    with pytest.warns(UserWarning, match="global random generator"):
        ft.train_loop(lambda s, b: step(s, {"x": b[0], "y": b[1]}), state, loader, max_steps=1)


def test_max_steps_does_not_consume_an_extra_batch():
    step, state, _ = _setup()
    pulled = []

    def batches(epoch):
        for batch in ft.TensorBatches(_data(), BATCH).iter_epoch(epoch):
            pulled.append(epoch)
            yield batch

    result = ft.train_loop(step, state, batches, epochs=5, max_steps=8)
    assert int(result.state.step) == 8 and len(pulled) == 8


def test_a_one_shot_generator_is_refused_at_its_second_epoch():
    step, state, _ = _setup()
    once = iter(ft.TensorBatches(_data(), BATCH))
    with pytest.raises(ValueError, match="no batch in epoch 1"):
        ft.train_loop(step, state, once, epochs=2)


def test_bad_arguments_are_named():
    step, state, loss_fn = _setup()
    with pytest.raises(ValueError, match="eval_step and eval_batches"):
        ft.train_loop(step, state, [], eval_step=ft.make_eval_step(loss_fn))
    with pytest.raises(ValueError, match="log_every"):
        ft.train_loop(step, state, [], log_every=0)
    with pytest.raises(TypeError, match="TrainState"):
        ft.train_loop(step, {"params": {}}, [])
