"""Helpers shared by the examples: the digits data, run directories, writers, argument types."""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain.logging import (
    AsyncWriter,
    ConsoleWriter,
    MetricWriter,
    MultiWriter,
    TensorBoardWriter,
)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def positive_int(text: str) -> int:
    """An argparse ``type``: an int >= 1, so that a bad value is a usage error, not a traceback."""
    value = int(text)  # a ValueError reads as "invalid positive_int value: 'x'"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float > 0 (learning rates, clipping norms, timeouts)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def seed(text: str) -> int:
    """An argparse ``type``: a seed ``torch.manual_seed`` takes (0 <= seed < 2**63)."""
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text}")
    return value


def device(text: str) -> str:
    """An argparse ``type``: a device this machine has, so ``--device cuda`` on a CPU-only
    build is a usage error, not a traceback from deep inside the data loading."""
    try:
        dev = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from err
    if dev.type == "cpu":
        return text
    module = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    is_available = getattr(module, "is_available", None)
    if is_available is None or not is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no {dev.type} device on this machine")
    count = getattr(module, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} {dev.type} devices")
    return text


def logdir(text: str) -> str:
    """An argparse ``type``: a run directory that can be created, so that ``--logdir`` naming a
    file (or a directory inside one) is a usage error, not a traceback once training starts.

    Nothing is created here: missing parents are fine (the examples create them).
    """
    probe = os.path.abspath(text)
    while not os.path.exists(probe):  # the nearest existing ancestor decides
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise argparse.ArgumentTypeError(f"{text!r}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: no permission to write in {probe}")
    return text


_held_locks: dict[str, Any] = {}  # realpath -> open lock file, for the life of the process


def claim_logdir(logdir: str) -> str | None:
    """Creates ``logdir`` and locks it for this process; returns an error if another run holds it.

    Two runs started into the same directory used to both succeed, interleaving their curves
    at the same steps and overwriting each other's checkpoints. The lock is an ``flock`` on
    ``logdir/.lock``, released by the OS when the process ends (even when killed), so it never
    goes stale. Where ``fcntl`` is missing (Windows) nothing is locked. A process that
    already holds the lock (``main()`` called again, as the tests do) claims it again.
    """
    os.makedirs(logdir, exist_ok=True)
    if os.path.realpath(logdir) in _held_locks:
        return None
    try:
        import fcntl
    except ImportError:
        return None
    lock = open(os.path.join(logdir, ".lock"), "a+")  # noqa: SIM115 (held until exit)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return f"another run is writing to {logdir}; wait for it to end or choose a new --logdir"
    # The lock lasts as long as the process; atexit closes the file tidily.
    _held_locks[os.path.realpath(logdir)] = lock
    atexit.register(lock.close)
    return None


def run_dir(root: str, name: str | None = None) -> str:
    """``root/name``, or a new ``root/<timestamp>`` so that runs sit side by side in TensorBoard.

    The timestamp has a resolution of a second; a run started in the same second as another
    gets ``<timestamp>-2``, ``-3``, ... rather than resuming (or appending to) the other's logs.
    The directory is created here, atomically, so two runs cannot both claim it.
    """
    if name is not None:
        return os.path.join(root, name)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(root, exist_ok=True)
    for attempt in range(1, 1000):
        path = os.path.join(root, stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{root}: too many runs started at {stamp}")


def holds_a_run(logdir: str) -> bool:
    """Whether ``logdir`` (or a run below it) already has TensorBoard event files.

    For the examples that do not resume: a second run into the same directory would interleave
    its curves with the first one's at the same steps.
    """
    for _, _, files in os.walk(logdir):
        if any(name.startswith("events.out.tfevents.") for name in files):
            return True
    return False


def check_same_run(logdir: str, config: dict[str, Any]) -> str | None:
    """Records ``config`` in ``logdir/config.json``; a rerun in the same directory must match it.

    Resuming a checkpoint under other hyperparameters would splice two different runs into one
    set of curves (a new learning-rate schedule from the middle on, a different data order).
    Returns an error message when ``logdir`` holds a run with another configuration, else None.
    """
    path = os.path.join(logdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        changed = sorted(
            k for k in config.keys() | recorded.keys() if config.get(k) != recorded.get(k)
        )
        if changed:
            diff = ", ".join(f"{k}: {recorded.get(k)} -> {config.get(k)}" for k in changed)
            return (
                f"{logdir} holds a run with other settings ({diff}); "
                "rerun with the same ones to resume it, or choose a new --logdir"
            )
        return None
    os.makedirs(logdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return None


def load_digits(device: str = "cpu", test_size: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """scikit-learn's 8x8 digits (1,797 images), split and standardized with train statistics.

    Returns ``{"train": {"x", "y"}, "test": {"x", "y"}}`` as float32 / int64 tensors.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=test_size, random_state=seed, stratify=digits.target
    )
    x_train = torch.tensor(x_train, dtype=torch.float32)
    x_test = torch.tensor(x_test, dtype=torch.float32)
    mean, std = x_train.mean(0), x_train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant border pixels

    def split(x: torch.Tensor, y: Any) -> dict[str, torch.Tensor]:
        return {"x": ((x - mean) / std).to(device), "y": torch.tensor(y).long().to(device)}

    return {"train": split(x_train, y_train), "test": split(x_test, y_test)}


def digits_mlp(hidden: int = 128, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, 10),
    )


def classifier_loss(model: ft.FunctionalModel) -> Any:
    """Cross-entropy (the mean over the micro-batch) with accuracy as an aux metric."""

    def loss_fn(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> ft.LossOutput:
        logits = model(params, batch["x"])
        accuracy = (logits.argmax(-1) == batch["y"]).float().mean()
        return ft.LossOutput(F.cross_entropy(logits, batch["y"]), aux={"accuracy": accuracy})

    return loss_fn


def writer_factory(
    logdir: str,
    *,
    total_steps: int,
    hparams: dict[str, Any],
    console_keys: list[str] | None = None,
    console: bool = True,
) -> Any:
    """``purge_step -> writer``: TensorBoard (+ a progress bar) behind an AsyncWriter.

    ``train_loop`` calls it once it knows whether the run resumed, so a restarted run purges
    the points the interrupted one wrote after its checkpoint.
    """

    def make(purge_step: int | None) -> MetricWriter:
        tensorboard = TensorBoardWriter(logdir, purge_step=purge_step)
        metrics = {"eval/loss": None, "eval/accuracy": None, "train/loss": None}
        tensorboard.write_hparams(hparams, metrics)
        writers: list[MetricWriter] = [tensorboard]
        if console:
            writers.append(ConsoleWriter(total_steps=total_steps, keys=console_keys))
        # The step returns tensors; the background thread turns them into numbers.
        return AsyncWriter(MultiWriter(writers), every_n=10, max_delay_s=0.5)

    return make


def print_logdir(logdir: str, root: str) -> None:
    print(f"TensorBoard logs: {logdir}")
    print(f"  view them with: tensorboard --logdir {root}")


def run_as_script(main: Callable[[], int]) -> NoReturn:
    """Exits with ``main()``'s status; Ctrl-C exits with 130 and a line, not a traceback.

    ``ft.train_loop(catch_interrupt=True)`` handles a Ctrl-C inside training; this catches one
    while the data loads, during a final evaluation, or in an example without that option.
    The TensorBoard files written so far stay readable: each event is written whole.
    """
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; the curves logged so far are in TensorBoard", file=sys.stderr)
        sys.exit(130)
