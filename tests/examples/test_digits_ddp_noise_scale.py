"""examples/digits_ddp.py --noise-scale: the gradient noise scale across 2 gloo processes."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from example_files import EXAMPLES, ROOT, load_example

from functrain.logging import read_scalars

NOISE_TAGS = [
    "noise_scale/b_simple",
    "noise_scale/trace_sigma",
    "noise_scale/grad_sq",
    "noise_scale/gradient_diversity",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_noise_scale_is_logged_every_step_and_printed(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd += [os.path.join(EXAMPLES, "digits_ddp.py"), "--noise-scale", "--no-shard", "--fast"]
    cmd += ["--logdir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("noise scale: B_simple=") == 1  # only rank 0 prints

    logged = read_scalars(tmp_path)["."]
    steps = list(range(1, 41))  # --fast: 40 steps, logged at 1, 2, ...
    assert logged["train/loss"][0] == steps
    for tag in NOISE_TAGS:
        # The tags train_loop writes: names with a "/" keep no train/ prefix.
        assert "train/" + tag not in logged
        tag_steps, values = logged[tag]
        assert tag_steps == steps, tag
        # K = 2 per rank, 4 micro-batches in all: the estimator is defined from step 1.
        assert all(math.isfinite(v) for v in values), (tag, values)
    b_simple = logged["noise_scale/b_simple"][1]
    trace_sigma = logged["noise_scale/trace_sigma"][1]
    grad_sq = logged["noise_scale/grad_sq"][1]
    # Both averages share the bias correction, so it cancels in B_simple = tr(Σ) / |G|².
    assert b_simple == pytest.approx([s / g for s, g in zip(trace_sigma, grad_sq)], rel=1e-5)
    # Yin et al.'s diversity of the 4 micro-batch gradients is at least 1/4 (all equal).
    assert all(d >= 0.25 * (1 - 1e-6) for d in logged["noise_scale/gradient_diversity"][1])

    printed = re.search(r"noise scale: B_simple=(\S+) \(global batch 64\)", proc.stdout)
    assert printed, proc.stdout
    # A float32 metric, printed with repr: exactly the value TensorBoard stored.
    assert float(printed.group(1)) == b_simple[-1]
    assert b_simple[-1] > 0 and "critical batch ≈ B_simple ≈" in proc.stdout


def parse(monkeypatch: pytest.MonkeyPatch, *argv: str, world: int = 2):
    example = load_example("digits_ddp")
    monkeypatch.setenv("WORLD_SIZE", str(world))  # what torchrun --nproc_per_node sets
    monkeypatch.setattr(sys, "argv", ["digits_ddp.py", *argv])
    return example.parse_args()


def test_noise_scale_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse(monkeypatch, "--noise-scale", "--no-shard")
    assert (args.noise_scale, args.micro_batches, args.steps) == (True, 2, 400)
    # One micro-batch per rank is enough across 2 ranks: 2 gradient estimates in all.
    assert (
        parse(monkeypatch, "--noise-scale", "--no-shard", "--micro-batches", "1").micro_batches == 1
    )
    # Without the flag nothing changes.
    args = parse(monkeypatch)
    assert (args.noise_scale, args.micro_batches, args.no_shard) == (False, 1, False)


@pytest.mark.parametrize(
    ("argv", "world", "message"),
    [
        (["--noise-scale"], 2, "--noise-scale needs --no-shard"),
        (["--noise-scale", "--no-shard", "--dp"], 2, "--noise-scale does not work with --dp"),
        (["--noise-scale", "--dp"], 2, "--noise-scale does not work with --dp"),
        (
            ["--noise-scale", "--no-shard", "--micro-batches", "1"],
            1,
            "--noise-scale needs at least 2 micro-batches in all",
        ),
    ],
)
def test_refused_combinations_are_usage_errors(argv, world, message, monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        parse(monkeypatch, *argv, world=world)
    assert err.value.code == 2
    assert message in capsys.readouterr().err
