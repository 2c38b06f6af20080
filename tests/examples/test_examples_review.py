"""The examples' promises: usage errors for bad arguments, Ctrl-C and resume, exact reruns, tags."""

import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from example_files import EXAMPLES, ROOT, load_example

from functrain.logging import read_scalars


def curves(logdir):
    """``{tag: (steps, values)}`` of the run in ``logdir``, purged points removed."""
    return read_scalars(logdir)["."]


USAGE_ERRORS = [
    ("digits", ["--epochs", "0"], "--epochs: must be a positive integer"),
    ("digits", ["--epochs", "-1"], "--epochs: must be a positive integer"),
    ("digits", ["--batch-size", "0"], "--batch-size: must be a positive integer"),
    ("digits", ["--micro-batches", "0"], "--micro-batches: must be a positive integer"),
    ("digits", ["--batch-size", "2", "--micro-batches", "4"], "--micro-batches must be <="),
    ("digits", ["--lr", "-1"], "--lr: must be a positive number"),
    ("digits", ["--lr", "nan"], "--lr: must be a positive number"),
    ("digits", ["--threads", "0"], "--threads: must be a positive integer"),
    ("char_lm", ["--steps", "0"], "--steps: must be a positive integer"),
    ("char_lm", ["--dim", "90"], "--dim must be a multiple of the 4 attention heads"),
    ("char_lm", ["--length", "8"], "--length must be >= 16"),
    ("accumulation_study", ["--k", "0"], "--k: must be a positive integer"),
    ("accumulation_study", ["--epochs", "0"], "--epochs: must be a positive integer"),
    ("per_sample", ["--steps", "0"], "--steps: must be a positive integer"),
    ("per_sample", ["--analysis-every", "0"], "--analysis-every: must be a positive integer"),
    ("per_sample", ["--chunk-size", "0"], "--chunk-size: must be a positive integer"),
    ("per_sample", ["--clip", "0"], "--clip: must be a positive number"),
    ("per_sample", ["--noise-multiplier", "-1"], "--noise-multiplier must be >= 0"),
    ("per_sample", ["--delta", "0"], "--delta must be in (0, 1)"),
]


@pytest.mark.parametrize(("name", "argv", "message"), USAGE_ERRORS)
def test_bad_arguments_are_usage_errors(name, argv, message, capsys):
    example = load_example(name)
    with pytest.raises(SystemExit) as err:
        example.parse_args(argv)
    assert err.value.code == 2  # argparse's usage error, before any training
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "3"], "--batch-size 3 is not a multiple of the 2 ranks"),
        (["--batch-size", "1600"], "--batch-size 1600 > 1497 training images"),
        (["--steps", "0"], "--steps: must be a positive integer"),
    ],
)
def test_digits_ddp_bad_arguments_are_usage_errors(argv, message, monkeypatch, capsys):
    example = load_example("digits_ddp")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node=2 sets
    monkeypatch.setattr(sys, "argv", ["digits_ddp.py", *argv])
    with pytest.raises(SystemExit) as err:
        example.parse_args()
    assert err.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("digits", ["--batch-size", "2000"], "--batch-size 2000 > 1437 training images"),
        ("per_sample", ["--fast", "--batch-size", "600"], "--batch-size 600 > 512 training"),
        ("accumulation_study", ["--batch-size", "400"], "K×B = 1600 > 1437 training images"),
    ],
)
def test_a_batch_larger_than_the_data_is_an_error_not_a_hang(name, argv, message, tmp_path):
    # A subprocess with a timeout: per_sample.py used to loop forever over empty epochs.
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, f"{name}.py"), "--logdir", tmp_path, *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_per_sample_explicit_values_win_over_fast_defaults():
    example = load_example("per_sample")
    args = example.parse_args(["--fast", "--steps", "7", "--top-k", "3"])
    assert (args.steps, args.analysis_every, args.top_k) == (7, 15, 3)
    args = example.parse_args([])
    assert (args.steps, args.analysis_every, args.top_k) == (300, 50, 10)


def test_digits_rerun_of_a_finished_run_reports_its_accuracy(tmp_path, capsys):
    digits = load_example("digits")
    argv = ["--fast", "--no-progress", "--logdir", str(tmp_path)]
    assert digits.main(argv) == 0
    first = capsys.readouterr().out
    # The same --logdir again: it resumes at the end, trains nothing, and still reports.
    assert digits.main(argv) == 0
    second = capsys.readouterr().out
    assert "resumed from the checkpoint at step 33" in second
    accuracy = [line.split("test accuracy ")[1].split()[0] for line in (first, second)]
    assert accuracy[0] == accuracy[1]
    # The report is the last logged evaluation of the first run.
    logged = curves(tmp_path)["eval/accuracy"]
    assert logged[0][-1] == 33
    assert float(accuracy[0].rstrip("%")) == pytest.approx(100 * logged[1][-1], abs=0.005)


def interrupt_after_first_step(cmd):
    """Runs ``cmd``, sends SIGINT once its progress line for step 1 is out, returns the proc."""
    cmd = [os.fspath(arg) for arg in cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    for line in proc.stderr:  # the progress lines (plain lines: not a terminal)
        err.append(line)
        if line.startswith("step 1/"):
            # Not at once: this line is printed by the writer, and a Ctrl-C that lands inside
            # AsyncWriter's replay turns into a RuntimeError (a library bug); a moment later
            # the process is almost surely inside a step.
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            break
    out, rest = proc.communicate(timeout=120)
    return proc.returncode, out, "".join(err) + rest


def test_digits_ctrl_c_then_same_logdir_resumes_bit_for_bit(tmp_path):
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    script = os.path.join(EXAMPLES, "digits.py")
    args = ["--epochs", "100"]  # 1,100 steps: still running when the signal lands
    code, out, err = interrupt_after_first_step(
        [sys.executable, script, *args, "--logdir", interrupted]
    )
    assert code == 130, out + err
    assert f"rerun with --logdir {interrupted} to resume" in out
    stopped = int(out.split("interrupted at step ")[1].split(";")[0])
    assert 1 <= stopped < 1100

    cmd = [sys.executable, script, *args, "--no-progress", "--logdir"]
    resumed = subprocess.run([*cmd, interrupted], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from the checkpoint at step {stopped}" in resumed.stdout
    done = subprocess.run([*cmd, reference], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

    a, b = curves(interrupted), curves(reference)
    assert a["train/loss"][0] == list(range(1, 1101))  # each step once: the restart purged
    for tag in ("train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/accuracy"):
        assert a[tag] == b[tag], tag  # the same numbers, not merely close
    assert b["eval/accuracy"][1][-1] >= 0.95


def test_char_lm_ctrl_c_before_the_first_evaluation_exits_cleanly(tmp_path):
    script = os.path.join(EXAMPLES, "char_lm.py")
    code, out, err = interrupt_after_first_step(
        [sys.executable, script, "--steps", "300", "--logdir", tmp_path]
    )
    assert code == 130, out + err
    assert "Traceback" not in err
    stopped = int(out.split("interrupted at step ")[1].split()[0])
    assert 1 <= stopped < 75  # before the first evaluation, at step 300 // 4
    assert "eval/loss" not in curves(tmp_path)
    assert curves(tmp_path)["train/loss"][0] == list(range(1, stopped + 1))


def test_char_lm_same_seed_same_numbers(tmp_path, capsys):
    char_lm = load_example("char_lm")
    logs = []
    for run in ("a", "b"):
        argv = ["--steps", "4", "--no-progress", "--logdir", str(tmp_path / run)]
        assert char_lm.main(argv) == 0
        logs.append(curves(tmp_path / run))
    capsys.readouterr()
    assert logs[0]["train/loss"] == logs[1]["train/loss"]
    assert logs[0]["eval/loss"] == logs[1]["eval/loss"]
    assert logs[0]["train/loss"][0] == [1, 2, 3, 4]
    # The first loss is the uniform guess over the 97 symbols: log(97) nats per token.
    assert logs[0]["train/loss"][1][0] == pytest.approx(math.log(97), abs=0.1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_digits_ddp_logs_the_train_loop_tags(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd += [os.path.join(EXAMPLES, "digits_ddp.py"), "--fast", "--logdir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = curves(tmp_path)
    expected = {"train/loss", "train/accuracy", "train/grad_norm", "train/update_param_ratio"}
    assert expected <= set(logged)
    assert not [tag for tag in logged if "/" not in tag]  # no bare "loss", "num_examples"
    assert logged["train/loss"][0] == list(range(1, 41))  # the step count after each update
    final = proc.stdout.split("final: ")[1]
    last_loss = float(final.split("last_loss=")[1].split()[0])
    assert logged["train/loss"][1][-1] == pytest.approx(last_loss, abs=1e-4)
