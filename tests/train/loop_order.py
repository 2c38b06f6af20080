"""A tiny regression problem whose batches carry example ids, for data-order tests of
``train_loop`` (shared by test_loop_review3.py and test_loop_batches_fn.py)."""

import torch

import functrain as ft

N, BATCH, LR, EPOCHS = 12, 4, 0.05, 3  # three batches an epoch


def make_dataset() -> torch.utils.data.TensorDataset:
    """``(x, y, id)`` rows of a noiseless linear problem in float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, y, torch.arange(N))


def loss(params, batch):
    return (batch["x"] @ params["w"] - batch["y"]).square().mean()


def fresh_state() -> ft.TrainState:
    return ft.TrainState.create(params={"w": torch.zeros(3, dtype=torch.float64)}, tx=ft.sgd(LR))


class Recorder:
    """A train step over ``(x, y, idx)`` batches that records the example ids it is given."""

    def __init__(self) -> None:
        self.step = ft.make_train_step(loss, ft.sgd(LR))
        self.seen: list[list[int]] = []

    def __call__(self, state, batch):
        x, y, idx = batch
        self.seen.append(idx.tolist())
        return self.step(state, {"x": x, "y": y})


def stop_and_resume(make, dataset, stop: int, directory) -> tuple[list[list[int]], ft.LoopResult]:
    """Runs to ``stop`` with checkpoints in ``directory``, then resumes in a fresh "process"
    (``make(dataset)`` again, as a restarted script would); returns the batches both runs saw,
    in order, and the resumed run's result."""
    from functrain.checkpoint import CheckpointManager

    manager = CheckpointManager(directory)
    first, second = Recorder(), Recorder()
    ft.train_loop(
        first,
        fresh_state(),
        make(dataset),
        epochs=EPOCHS,
        max_steps=stop,
        checkpoint_manager=manager,
    )
    resumed = ft.train_loop(
        second, fresh_state(), make(dataset), epochs=EPOCHS, checkpoint_manager=manager
    )
    assert resumed.resumed_from == stop
    return first.seen + second.seen, resumed
