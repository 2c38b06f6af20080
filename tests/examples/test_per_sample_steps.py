"""examples/per_sample.py: its TensorBoard steps follow ft.train_loop's convention (step = optimizer
steps done), the numbers it prints are the ones it logged, and --fast's DP-SGD run learns."""

import io
import math
import os
import re
from contextlib import redirect_stdout

import pytest
from example_files import load_example
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CHANCE = 0.1  # ten balanced digit classes


def run_example(logdir, *argv):
    """``main`` of a fresh module on ``argv``: its stdout and its two runs' event files."""
    out = io.StringIO()
    with redirect_stdout(out):
        status = load_example("per_sample").main([*argv, "--logdir", os.fspath(logdir)])
    assert status == 0
    runs = {}
    for name in ("standard", "dp_sgd"):
        acc = EventAccumulator(os.fspath(logdir / name), size_guidance={"scalars": 0})
        acc.Reload()
        runs[name] = acc
    return out.getvalue(), runs


def steps(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def at(acc, tag, step):
    """The value logged under ``tag`` at ``step`` (exactly one)."""
    (value,) = [e.value for e in acc.Scalars(tag) if e.step == step]
    return value


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    return run_example(tmp_path_factory.mktemp("fast"), "--fast")


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    # 7 steps, analyses every 3: the last step is not a multiple of --analysis-every.
    return run_example(
        tmp_path_factory.mktemp("uneven"), "--fast", "--steps", "7", "--analysis-every", "3"
    )


@pytest.mark.parametrize(
    ("case", "n", "marks"), [("fast", 30, [0, 15, 30]), ("uneven", 7, [0, 3, 6, 7])]
)
def test_steps_count_optimizer_steps_done(case, n, marks, request):
    _, runs = request.getfixturevalue(case)
    standard, dp = runs["standard"], runs["dp_sgd"]
    done = list(range(1, n + 1))  # the first step's metrics at 1, like ft.train_loop
    for tag in standard.Tags()["scalars"]:
        if tag.startswith("train/"):
            assert steps(standard, tag) == done, tag
    # Analyses and evaluations at the steps done when they ran: 0 before training, n at the end.
    for tag in ("per_sample/b_simple", "eval/accuracy", "eval/loss", "grads/diversity"):
        assert steps(standard, tag) == marks, tag
    for tag in ("train/loss", "dp/clipped_fraction", "dp/batch_size"):
        assert steps(dp, tag) == done, tag
    assert steps(dp, "dp/epsilon") == marks[1:]
    assert steps(dp, "eval/accuracy") == [n]
    # The two runs' curves end at the same step as their evaluations.
    assert steps(standard, "train/loss")[-1] == steps(standard, "eval/accuracy")[-1] == n


def test_printed_numbers_are_the_logged_ones(fast):
    stdout, runs = fast
    standard, dp = runs["standard"], runs["dp_sgd"]
    match = re.search(r"train loss (\S+) -> (\S+) over 30 steps .* test accuracy (\S+)%", stdout)
    assert match is not None, stdout
    first, last, accuracy = match.groups()
    assert first == f"{at(standard, 'train/loss', 1):.3f}"
    assert last == f"{at(standard, 'train/loss', 30):.3f}"
    assert accuracy == f"{100 * at(standard, 'eval/accuracy', 30):.1f}"
    # "after step N" is the moving average logged at step N.
    printed = re.findall(r"after step +(\d+): B_simple ≈ (\S+)", stdout)
    assert [int(s) for s, _ in printed] == [3, 8, 15, 30]
    for s, value in printed:
        assert value == f"{at(standard, 'train/noise_scale/b_simple', int(s)):.0f}"
    match = re.search(r"whole training set at step (\d+): B_simple ≈ (\S+)", stdout)
    assert match is not None and match[1] == "30"
    assert match[2] == f"{at(standard, 'per_sample/b_simple', 30):.0f}"

    match = re.search(
        r"DP-SGD \(C=1.0, σ=1.0\): test accuracy (\S+)% vs (\S+)% non-private \(chance 10%\); "
        r"\(ε, δ\) = \((\S+), 1e-05\) after 30 Poisson-sampled",
        stdout,
    )
    assert match is not None, stdout
    assert match[1] == f"{100 * at(dp, 'eval/accuracy', 30):.1f}"
    assert match[2] == accuracy
    assert match[3] == f"{at(dp, 'dp/epsilon', 30):.2f}"
    assert "sampling rate q = 0.25 " in stdout  # 128 expected of 512 training images


def test_fast_dp_sgd_learns(fast):
    stdout, runs = fast
    assert at(runs["dp_sgd"], "eval/accuracy", 30) > 2.5 * CHANCE
    assert "has not learned" not in stdout


def test_near_chance_dp_sgd_is_explained(tmp_path):
    # The old --fast learning rate: 30 noisy steps at 2e-3 leave DP-SGD at chance.
    stdout, runs = run_example(tmp_path, "--fast", "--lr", "2e-3")
    accuracy = at(runs["dp_sgd"], "eval/accuracy", 30)
    assert math.isfinite(accuracy) and accuracy < 2.5 * CHANCE
    assert "DP-SGD has not learned yet (near chance): too few noisy steps" in stdout
