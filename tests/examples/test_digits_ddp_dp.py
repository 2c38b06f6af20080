"""examples/digits_ddp.py --dp: DP-SGD across 2 gloo processes, its ε and its accuracy."""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from example_files import EXAMPLES, ROOT, load_example

import functrain as ft
from functrain.logging import read_scalars

N_TRAIN = 1797 - 300  # the example's training split of scikit-learn's digits
# Measured with the defaults (5 epochs, lr 3e-2, C=1, sigma=1, batch 64) on 2 CPU processes:
# 90.7% at seed 0 (90.3-93.3% over seeds 0-3); the floor leaves room for float noise.
ACCURACY_FLOOR = 0.85


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_epsilons(epochs: int, q: float, sigma: float, delta: float) -> list[float]:
    """ε after each epoch of ``round(1/q)`` Poisson-sampled steps, from a fresh accountant."""
    steps_per_epoch = round(1 / q)
    out = []
    for epoch in range(1, epochs + 1):
        accountant = ft.RDPAccountant()
        accountant.step(noise_multiplier=sigma, sample_rate=q, steps=epoch * steps_per_epoch)
        out.append(accountant.get_epsilon(delta))
    return out


def test_dp_mode_logs_the_accountants_epsilon_and_learns(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd += [os.path.join(EXAMPLES, "digits_ddp.py"), "--dp", "--logdir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("final:") == 1  # only rank 0 prints

    q, epochs, steps_per_epoch = 64 / N_TRAIN, 5, round(N_TRAIN / 64)  # the --dp defaults
    logged = read_scalars(tmp_path)["."]
    steps, epsilons = logged["dp/epsilon"]
    assert steps == [steps_per_epoch * e for e in range(1, epochs + 1)]  # once per epoch
    assert all(a < b for a, b in itertools.pairwise(epsilons))
    # TensorBoard stores float32: compare at its precision.
    expected = reference_epsilons(epochs, q, sigma=1.0, delta=1e-5)
    assert epsilons == pytest.approx(expected, rel=1e-6)
    printed = re.search(r"\(epsilon, delta\) = \(([\d.]+), 1e-05\)", proc.stdout)
    assert printed, proc.stdout
    assert float(printed.group(1)) == pytest.approx(expected[-1], abs=1e-4)
    assert 0 < expected[-1] < 10  # a sane budget for sigma = 1 over 5 epochs

    # The DP step's metrics: no grad_norm; clipping reported; the accuracy of the final model.
    assert "train/clipped_fraction" in logged and "train/grad_norm" not in logged
    assert logged["train/loss"][0] == list(range(1, epochs * steps_per_epoch + 1))
    final = re.search(r"test_accuracy=([\d.]+) steps=(\d+)", proc.stdout)
    assert final, proc.stdout
    assert int(final.group(2)) == epochs * steps_per_epoch
    assert float(final.group(1)) > ACCURACY_FLOOR, proc.stdout


def parse(monkeypatch: pytest.MonkeyPatch, *argv: str):
    example = load_example("digits_ddp")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node=2 sets
    monkeypatch.setattr(sys, "argv", ["digits_ddp.py", *argv])
    return example.parse_args()


def test_defaults_of_the_plain_path_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse(monkeypatch)
    assert (args.steps, args.lr, args.batch_size, args.micro_batches, args.seed) == (
        400,
        3e-3,
        64,
        1,
        0,
    )
    assert not args.dp and parse(monkeypatch, "--fast").steps == 40
    # --epochs counts full batches of the drop_last shards: 748 per rank // 32 = 23 steps.
    assert parse(monkeypatch, "--epochs", "2").steps == 46


def test_dp_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse(monkeypatch, "--dp")
    assert (args.epochs, args.steps, args.lr, args.clip, args.noise_multiplier, args.delta) == (
        5,
        5 * round(N_TRAIN / 64),
        3e-2,
        1.0,
        1.0,
        1e-5,
    )
    assert parse(monkeypatch, "--dp", "--fast").epochs == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dp", "--steps", "10"], "--dp trains whole epochs: use --epochs"),
        (["--steps", "10", "--epochs", "2"], "give --steps or --epochs, not both"),
        (["--dp", "--noise-multiplier", "-1"], "--noise-multiplier must be >= 0"),
        (["--dp", "--delta", "1"], "--delta must be in (0, 1)"),
        (["--micro-batches", "33"], "--micro-batches 33 > the batch of each rank"),
        (["--clip", "0"], "--clip: must be a positive number"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        parse(monkeypatch, *argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err
