"""train_loop, second review: DP steps on Poisson batches, eval weighting, resume, writers."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft
from functrain.checkpoint import CheckpointManager

N = 22  # with batch size 4: five full batches and a final partial one of 2


def _data(n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}


def _loss(params, batch):
    return (batch["x"] @ params["w"] - batch["y"]).square().mean()


def _state(tx):
    return ft.TrainState.create(params={"w": torch.zeros(3, dtype=torch.float64)}, tx=tx)


def _slices(data, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start : start + size] for k, v in data.items()})
        start += size
    return out


def _ref_mean(w, batches):
    """The float64 mean of the squared errors over every example of ``batches``."""
    errors = [(b["x"] @ w - b["y"]).square() for b in batches]
    return torch.cat(errors).mean().item()


# -- evaluation: weights, empty batches, LossSum ------------------------------------------------


def _train_then_evaluate(tx, eval_step, eval_batches):
    """Two training steps on other data, then the loop's evaluation of ``eval_batches``."""
    return ft.train_loop(
        ft.make_train_step(_loss, tx),
        _state(tx),
        _slices(_data(seed=1), [4, 4]),
        eval_step=eval_step,
        eval_batches=eval_batches,
    )


def test_an_empty_eval_batch_adds_nothing_to_the_example_weighted_mean():
    tx = ft.sgd(0.1)
    eval_batches = _slices(_data(), [4, 0, 7, 0, 1])  # an empty batch's mean is NaN

    def eval_step(state, batch):  # no num_examples: the loop weighs by the leading size
        return {"loss": _loss(state.params, batch)}

    result = _train_then_evaluate(tx, eval_step, eval_batches)
    expected = _ref_mean(result.state.params["w"], eval_batches)
    assert result.history.last("eval/loss") == pytest.approx(expected, rel=1e-12)


def test_an_eval_batch_of_zero_examples_with_a_nan_loss_is_left_out():
    tx = ft.sgd(0.1)
    eval_batches = _slices(_data(), [3, 0, 5])

    def eval_step(state, batch):  # int64 counts, as make_train_step's metrics are
        n = batch["x"].shape[0]
        correct = ((batch["x"] @ state.params["w"] - batch["y"]).abs() < 1).sum()
        return {
            "loss": _loss(state.params, batch),
            "acc": correct / n if n else torch.tensor(float("nan")),
            "num_examples": torch.tensor(n, dtype=torch.int64),
        }

    result = _train_then_evaluate(tx, eval_step, eval_batches)
    w = result.state.params["w"]
    assert result.history.last("eval/loss") == pytest.approx(_ref_mean(w, eval_batches))
    errors = torch.cat([(b["x"] @ w - b["y"]).abs() for b in eval_batches])
    assert result.history.last("eval/acc") == pytest.approx((errors < 1).double().mean().item())


def test_losssum_eval_metrics_are_combined_as_total_over_count():
    tx = ft.sgd(0.1)
    data = _data()
    mask = torch.arange(N) % 3 != 0  # "padding" tokens left out of the loss
    data["mask"] = mask
    eval_batches = _slices(data, [5, 0, 9, 8])

    def eval_step(state, batch):
        errors = (batch["x"] @ state.params["w"] - batch["y"]).square()
        return {"loss": ft.LossSum((errors * batch["mask"]).sum(), batch["mask"].sum())}

    result = _train_then_evaluate(tx, eval_step, eval_batches)
    w = result.state.params["w"]
    errors = (data["x"] @ w - data["y"]).square()
    expected = errors[mask].sum().item() / mask.sum().item()  # token-weighted, not per batch
    assert result.history.last("eval/loss") == pytest.approx(expected, rel=1e-12)


# -- a DP step on Poisson batches ---------------------------------------------------------------


def test_a_dp_step_on_poisson_batches_with_empty_ones_logs_finite_perf_metrics():
    data = _data(12)
    sampler = ft.PoissonSampler(12, 0.1, steps=12, generator=torch.Generator().manual_seed(3))
    batches = [
        {k: v[torch.as_tensor(idx, dtype=torch.long)] for k, v in data.items()} for idx in sampler
    ]
    sizes = [b["x"].shape[0] for b in batches]
    assert 0 in sizes and max(sizes) > 0  # the draw has empty and non-empty batches
    tx = ft.chain(ft.dp_noisy_mean(1.0, 1.0, expected_batch_size=1.2, seed=0), ft.sgd(0.1))
    step = ft.make_train_step(_loss, tx, per_example_clip=1.0, donate=False)
    result = ft.train_loop(step, _state(tx), batches)
    # The loop adds nothing to the steps: the same states as plain step calls.
    state = _state(tx)
    for batch in batches:
        state, _ = step(state, batch)
    ft.testing.assert_trees_all_equal(result.state, state)
    per_s = result.history.values("perf/examples_per_s")
    assert len(per_s) == len(batches) and all(math.isfinite(v) for v in per_s)
    assert [v == 0 for v in per_s] == [s == 0 for s in sizes]
    assert all(math.isfinite(v) and v > 0 for v in result.history.values("perf/step_time_s"))
    assert "train/num_examples" not in result.history.tags()  # a count, not a curve


# -- max_steps mid-epoch, partial final batch, resume -------------------------------------------


def _run(tmp_path, max_steps, epochs=2):
    tx = ft.adam(0.05)
    return ft.train_loop(
        ft.make_train_step(_loss, tx),
        _state(tx),
        ft.TensorBatches(_data(), 4, seed=2, drop_last=False),  # a final partial batch of 2
        epochs=epochs,
        max_steps=max_steps,
        eval_step=ft.make_eval_step(_loss),
        eval_batches=[_data(seed=5)],
        eval_every=1000,  # larger than the run: only the final evaluation
        checkpoint_manager=CheckpointManager(tmp_path, max_to_keep=None),
    )


def test_max_steps_mid_epoch_then_resume_continues_exactly(tmp_path):
    whole = _run(tmp_path / "whole", None)
    first = _run(tmp_path / "split", 8)  # 6 batches per epoch: stops inside epoch 1
    rest = _run(tmp_path / "split", None)
    assert int(first.state.step) == 8 and rest.resumed_from == 8
    assert int(rest.state.step) == int(whole.state.step) == 12
    ft.testing.assert_trees_all_equal(rest.state, whole.state)
    losses = whole.history.values("train/loss")
    assert first.history.values("train/loss") == losses[:8]
    assert rest.history.values("train/loss") == losses[8:]
    # eval_every beyond the run: one evaluation, at each run's end.
    assert whole.history.steps("eval/loss") == [12]
    assert first.history.steps("eval/loss") == [8] and rest.history.steps("eval/loss") == [12]


# -- a writer that fails to close ----------------------------------------------------------------


def test_a_writer_failing_in_close_raises_with_the_state_after_the_final_save(tmp_path):
    class Writer:
        def write_scalars(self, step, scalars):
            pass

        def flush(self):
            pass

        def close(self):
            raise OSError("close failed")

    tx = ft.sgd(0.1)
    manager = CheckpointManager(tmp_path)
    with pytest.raises(OSError, match="close failed") as info:
        ft.train_loop(
            ft.make_train_step(_loss, tx),
            _state(tx),
            ft.TensorBatches(_data(), 4, seed=2, drop_last=False),
            writer=lambda purge_step: Writer(),
            checkpoint_manager=manager,
        )
    assert int(info.value.train_state.step) == 6 and manager.all_steps() == [6]


# -- no host reads ---------------------------------------------------------------------------------


class _HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (``.item()``, ``float()``, ``bool()``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_loop_reads_no_tensor_on_the_host():
    def step(state, batch):  # pure tensor maths: any host read comes from the loop
        loss = _loss(state.params, batch)
        new = state.replace(step=state.step + 1)
        return new, {
            "loss": loss,
            "num_examples": torch.tensor(batch["x"].shape[0]),
            "num_tokens": batch["x"].shape[0] * torch.ones((), dtype=torch.int64),
            "skipped_total": torch.zeros((), dtype=torch.int64),
            "update_norm": loss,
            "param_norm": loss + 1,
        }

    def eval_step(state, batch):
        return {"loss": _loss(state.params, batch), "num_examples": torch.tensor(3)}

    tx = ft.sgd(0.1)
    batches = _slices(_data(), [4, 0, 4, 3])
    with _HostReads() as reads:
        result = ft.train_loop(
            step,
            _state(tx),
            batches,
            epochs=2,
            eval_step=eval_step,
            eval_batches=_slices(_data(), [3, 0, 2]),
        )
    assert reads.count == 1  # int(state.step), once before the first step; none after
    assert result.history.steps("train/loss") == list(range(1, 9))
