import io

import numpy as np
import pytest
import torch

from functrain.logging import ConsoleWriter


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(total=None, **kwargs):
    out = io.StringIO()
    w = ConsoleWriter(total, stream=out, **kwargs)
    clock = Clock()
    w._clock = clock
    return w, out, clock


def test_plain_lines_with_rate_eta_and_metrics():
    w, out, clock = make(total=100, tty=False, line_every_s=10.0)
    for step in range(1, 101):  # 0.5 s per step
        w.write_scalars(
            step,
            {
                "train/loss": torch.tensor(1.0 / step),
                "train/lr": 3e-4,
                "perf/examples_per_s": 1280.0,
            },
        )
        clock.t += 0.5
    w.close()
    lines = out.getvalue().splitlines()
    # The first step, then one line per 10 s (20 steps), then the final step.
    assert [line.split(" | ")[0] for line in lines] == [
        "step 1/100 (1%)",
        "step 21/100 (21%)",
        "step 41/100 (41%)",
        "step 61/100 (61%)",
        "step 81/100 (81%)",
        "step 100/100 (100%)",
    ]
    assert (
        lines[1] == "step 21/100 (21%) | 00:10<00:40 | 2 it/s | 1.28k ex/s | loss=0.04762 lr=0.0003"
    )
    assert lines[-1].startswith("step 100/100 (100%) | 00:50<00:00 | 2 it/s")
    assert "perf/" not in out.getvalue()


def test_eval_scalars_text_and_hparams_get_their_own_lines():
    w, out, clock = make(total=10, tty=False, line_every_s=1e9)
    w.write_hparams({"lr": 0.1, "opt": "sgd"}, {"eval/acc": None})
    w.write_scalars(1, {"loss": 2.0})
    clock.t += 1
    w.write_scalars(2, {"loss": 1.0})
    w.write_scalars(2, {"eval/loss": 1.5, "eval/accuracy": torch.tensor(0.5)})
    w.write_text(2, {"note": "hello"})
    w.close()
    assert out.getvalue().splitlines() == [
        "hparams: lr=0.1, opt=sgd",
        "step 1/10 (10%) | 00:00<? | loss=2",
        "step 2 | eval/loss=1.5 eval/accuracy=0.5",
        "step 2 | note: hello",
        "step 2/10 (20%) | 00:01<00:08 | 1 it/s | loss=1",
    ]


def test_tty_bar_redraws_in_place():
    w, out, clock = make(total=8, tty=True, refresh_s=0.0, bar_width=8)
    for step in range(1, 9):
        clock.t += 1.0
        w.write_scalars(step, {"train/loss": 0.5, "train/lr": 0.01})
        if step == 4:
            w.write_scalars(step, {"eval/accuracy": 0.9})
    w.close()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 2  # the eval line and the closing newline
    frames = [f.removesuffix("\x1b[K") for f in text.split("\r") if f]
    assert frames[3] == " 50%|████    | 4/8 [00:03<00:04, 1 it/s] loss=0.5 lr=0.01"
    assert "\x1b[Kstep 4 | eval/accuracy=0.9\n" in text
    assert frames[-1].startswith("100%|████████| 8/8 [00:07<00:00, 1 it/s]")


def test_without_total_and_selected_keys():
    w, out, clock = make(tty=False, line_every_s=0, keys=["train/loss"])
    w.write_scalars(torch.tensor(5), {"train/loss": 0.25, "train/lr": 0.1})
    clock.t += 2
    w.write_scalars(9, {"train/loss": 0.125, "train/lr": 0.1})
    w.close()
    assert out.getvalue().splitlines() == [
        "step 5 | 00:00 | loss=0.25",
        "step 9 | 00:02 | 2 it/s | loss=0.125",
    ]


def test_closed_and_bad_values():
    w, _, _ = make(tty=False)
    with pytest.raises(ValueError, match="'loss'"):
        w.write_scalars(0, {"loss": torch.ones(2)})
    w.close()
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.write_scalars(0, {"loss": 1.0})


@pytest.mark.parametrize(
    "value, expected",
    [
        (torch.tensor(3e-5), "3e-05"),
        (torch.tensor(3e-5, dtype=torch.float64), "3e-05"),
        (torch.tensor(0.1, dtype=torch.float16), "0.1"),
        (torch.tensor([0.001]), "0.001"),
        (np.array(3e-5, dtype=np.float32), "3e-05"),
        (torch.tensor(7), "7"),
        (torch.tensor([1.5, 2.0]), "[1.5, 2.0]"),
        (0.25, "0.25"),
    ],
)
def test_hyperparameters_print_as_written(value, expected):
    # A float32 tensor went through a Python float: 3e-5 printed as 2.9999999242136255e-05.
    from functrain.logging.console import _fmt_hparam

    assert _fmt_hparam(value) == expected
