"""Helpers shared by the examples: the digits data, run directories, writers, argument types."""

from __future__ import annotations

import argparse
import datetime
import math
import os
from typing import Any

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


def run_dir(root: str, name: str | None = None) -> str:
    """``root/name``, or ``root/<timestamp>`` so that runs sit side by side in TensorBoard."""
    return os.path.join(root, name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


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
