"""examples/per_sample.py in fast mode: it learns, and TensorBoard reads what it wrote."""

import io
import math
import os
from contextlib import redirect_stdout

import pytest
from example_files import load_example
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

STORE_EVERYTHING = {"scalars": 0, "histograms": 0, "tensors": 0, "compressedHistograms": 0}
LAYERS = ("conv1", "conv2", "fc1", "fc2")


def load_run(path):
    acc = EventAccumulator(os.fspath(path), size_guidance=STORE_EVERYTHING)
    acc.Reload()
    return acc


def values(acc, tag):
    return [e.value for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("per_sample")
    example = load_example("per_sample")
    out = io.StringIO()
    with redirect_stdout(out):
        status = example.main(["--fast", "--logdir", str(logdir)])
    return status, out.getvalue(), logdir


def test_prints_where_and_what(fast_run):
    status, stdout, logdir = fast_run
    assert status == 0
    assert f"TensorBoard logs: {logdir}" in stdout
    assert "tensorboard --logdir" in stdout
    assert "critical batch ≈ B_simple ≈" in stdout
    assert "hardest examples" in stdout
    assert "DP-SGD (C=1.0, σ=1.0): test accuracy" in stdout


def test_learns_and_logs_the_noise_scale(fast_run):
    _, _, logdir = fast_run
    acc = load_run(logdir / "standard")
    scalars = set(acc.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/grad_norm",
        "train/noise_scale/b_simple",
        "train/noise_scale/trace_sigma",
        "train/noise_scale/grad_sq",
        "train/noise_scale/gradient_diversity",
        "train/noise_scale/mean_cosine",
        "per_sample/b_simple",
        "per_sample/trace_sigma",
        "per_sample/grad_sq",
        "per_sample/grad_norm_median",
        "grads/diversity",
        "eval/accuracy",
        "eval/loss",
        *(f"grad_snr/median/{layer}.weight" for layer in LAYERS),
    }
    assert expected <= scalars
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 31))
    loss = values(acc, "train/loss")
    assert sum(loss[-5:]) / 5 < 0.6 * loss[0]  # learned something
    assert values(acc, "eval/accuracy")[-1] > 0.5
    b_simple = values(acc, "train/noise_scale/b_simple")
    assert all(math.isfinite(b) for b in b_simple[1:])
    assert b_simple[-1] > 0
    cosines = values(acc, "train/noise_scale/mean_cosine")
    assert len(cosines) == 30 and all(-1.0 <= c <= 1.0 for c in cosines)
    # Analyses at steps 0, 15 and 30 (the end).
    assert [e.step for e in acc.Scalars("per_sample/b_simple")] == [0, 15, 30]
    assert "_hparams_/session_start_info" in acc.summary_metadata


def test_per_sample_histograms_and_hardest_examples(fast_run):
    _, _, logdir = fast_run
    acc = load_run(logdir / "standard")
    histograms = set(acc.Tags()["histograms"])
    expected = {"per_sample/grad_norm", "per_sample/loss"}
    expected |= {f"per_sample/grad_norm/{layer}.weight" for layer in LAYERS}
    expected |= {f"grad_snr/log10/{layer}.bias" for layer in LAYERS}
    assert expected <= histograms
    norms = acc.Histograms("per_sample/grad_norm")
    assert [h.step for h in norms] == [0, 15, 30]
    assert norms[-1].histogram_value.num == 512  # one norm per training example (fast subset)
    assert norms[-1].histogram_value.min >= 0

    assert "hardest_examples" in acc.Tags()["tensors"]
    text = acc.Tensors("hardest_examples")[-1].tensor_proto.string_val[0].decode()
    assert "| rank | index | label | predicted | p(label) | loss | grad norm |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 5  # --top-k in fast mode
    grad_norms = [float(r.strip("| ").split(" | ")[-1]) for r in rows]
    assert grad_norms == sorted(grad_norms, reverse=True)


def test_dp_sgd_run(fast_run):
    _, _, logdir = fast_run
    acc = load_run(logdir / "dp_sgd")
    assert {"train/loss", "dp/clipped_fraction", "eval/accuracy"} <= set(acc.Tags()["scalars"])
    fractions = values(acc, "dp/clipped_fraction")
    assert len(fractions) == 30 and all(0.0 <= f <= 1.0 for f in fractions)


def test_dp_sgd_run_samples_by_poisson_and_reports_the_privacy_spent(fast_run):
    _, stdout, logdir = fast_run
    acc = load_run(logdir / "dp_sgd")
    sizes = values(acc, "dp/batch_size")
    n, expected = 512, 128  # --fast: 512 training images, --batch-size 128 expected
    assert len(sizes) == 30 and len(set(sizes)) > 1  # batch sizes vary
    q = expected / n
    assert abs(sum(sizes) / 30 - expected) < 4 * math.sqrt(n * q * (1 - q) / 30)
    steps = [e.step for e in acc.Scalars("dp/epsilon")]
    epsilons = values(acc, "dp/epsilon")
    assert steps == [15, 30] and epsilons[0] < epsilons[1]
    # The logged ε (float32) against Opacus' accountant for the same 30 steps.
    opacus = pytest.importorskip("opacus.accountants")
    reference = opacus.RDPAccountant()
    reference.history = [(1.0, q, 30)]
    assert epsilons[1] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)
    assert f"(ε, δ) = ({reference.get_epsilon(1e-5):.2f}, 1e-05) after 30 Poisson-sampled" in stdout
    # And the PRV ε of the same history, against Opacus' PRV accountant.
    prv = opacus.PRVAccountant()
    prv.history = [(1.0, q, 30)]
    (logged_prv,) = values(acc, "dp/epsilon_prv")
    assert logged_prv == pytest.approx(prv.get_epsilon(1e-5), rel=1e-6)
    assert logged_prv < epsilons[1]
    assert f"ε = {prv.get_epsilon(1e-5):.2f} by the tighter PRV accountant" in stdout
