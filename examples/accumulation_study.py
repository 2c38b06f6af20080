"""Does accumulating K micro-batches with the same learning rate match a K× batch? How should
the learning rate scale with the batch?

Trains the digits MLP for the same number of epochs (the same examples seen) in five ways, for
SGD with momentum and for Adam:

* ``B``            — batch B, learning rate η (the reference);
* ``KB-accum``     — batch K·B as K accumulated micro-batches of B, same η;
* ``KB-direct``    — batch K·B in one piece, same η (accumulation must give exactly this);
* ``KB-accum-lin`` — K·B accumulated, η·K (linear scaling rule, Goyal et al. 2017);
* ``KB-accum-sqrt``— K·B accumulated, η·√K (square-root scaling, e.g. for Adam).

Each run is a TensorBoard run under one directory, with the number of training examples seen as
the x-axis so that the curves line up; a PNG compares the full-training-set loss curves, and a
table summarizes them.

    python examples/accumulation_study.py          # ~20 s on a laptop CPU
    python examples/accumulation_study.py --fast   # 2 epochs (CI)
    tensorboard --logdir runs/accumulation_study
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch

import functrain as ft
from functrain.logging import MetricWriter, TensorBoardWriter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

BASE_LR = {"sgd": 0.01, "adam": 3e-4}


class ExamplesAxis(MetricWriter):
    """Writes at step ``examples seen = step × batch size``, so runs of any batch line up."""

    def __init__(self, writer: MetricWriter, batch_size: int) -> None:
        self.writer, self.batch_size = writer, batch_size

    def write_scalars(self, step: Any, scalars: Mapping[str, Any]) -> None:
        self.writer.write_scalars(int(step) * self.batch_size, scalars)

    def write_hparams(self, hparams: Any, metrics: Any = None, *, step: Any = None) -> None:
        self.writer.write_hparams(hparams, metrics, step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def runs(b: int, k: int, eta: float) -> list[tuple[str, int, int, float]]:
    """``(name, batch size, micro-batches, learning rate)`` of the five runs."""
    return [
        ("B", b, 1, eta),
        ("KB-accum", k * b, k, eta),
        ("KB-direct", k * b, 1, eta),
        ("KB-accum-lin", k * b, k, eta * k),
        ("KB-accum-sqrt", k * b, k, eta * math.sqrt(k)),
    ]


def train_one(
    data: dict, optimizer: str, batch: int, k: int, lr: float, epochs: int, every: int, logdir: str
) -> tuple[ft.LoopResult, float]:
    model, params, _ = ft.functionalize(_common.digits_mlp(seed=0))
    loss_fn = _common.classifier_loss(model)
    if optimizer == "sgd":
        tx = ft.inject_hyperparams(ft.sgd)(learning_rate=lr, momentum=0.9)
    else:
        tx = ft.inject_hyperparams(ft.adam)(learning_rate=lr)
    evaluate = ft.make_eval_step(loss_fn)

    def eval_step(state, _batch):
        on_train, on_test = evaluate(state, data["train"]), evaluate(state, data["test"])
        return {"train_set_loss": on_train["loss"], "test_accuracy": on_test["accuracy"]}

    writer = ExamplesAxis(TensorBoardWriter(logdir), batch)
    writer.write_hparams({"optimizer": optimizer, "batch": batch, "micro_batches": k, "lr": lr})
    start = time.perf_counter()
    with writer:
        result = ft.train_loop(
            ft.make_train_step(loss_fn, tx, micro_batches=k),
            ft.TrainState.create(params=params, tx=tx, seed=0),
            # The same data order for every run: batches of K·B are K batches of B back to back.
            ft.TensorBatches(data["train"], batch, seed=0),
            epochs=epochs,
            eval_step=eval_step,
            eval_batches=[None],  # eval_step reads the whole train and test sets itself
            eval_every=max(1, every // batch),  # at the same examples-seen for every run
            writer=writer,
        )
    return result, time.perf_counter() - start


def plot(results: dict, b: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    optimizers = list(dict.fromkeys(opt for opt, _ in results))
    fig, axes = plt.subplots(
        1, len(optimizers), figsize=(6.5 * len(optimizers), 4.5), squeeze=False
    )
    styles = {
        "B": dict(color="black", lw=2.5),
        "KB-accum": dict(color="tab:blue", lw=2.5),
        "KB-direct": dict(color="tab:orange", ls="--", lw=1.5),
        "KB-accum-lin": dict(color="tab:green", lw=1.8),
        "KB-accum-sqrt": dict(color="tab:red", lw=1.8),
    }
    for ax, opt in zip(axes[0], optimizers):
        for (o, name), (result, batch, k, lr, _) in results.items():
            if o != opt:
                continue
            h = result.history
            examples = [s * batch for s in h.steps("eval/train_set_loss")]
            label = f"{name}: batch {batch}" + (f" = {k}×{batch // k}" if k > 1 else "")
            ax.plot(
                examples,
                h.values("eval/train_set_loss"),
                label=f"{label}, lr {lr:.3g}",
                **styles[name],
            )
        ax.set(
            title=f"{opt}: K×B by accumulation vs batch B={b}",
            xlabel="training examples seen",
            ylabel="loss on the whole training set",
            yscale="log",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gap(a: list[float], b: list[float]) -> float:
    """Mean absolute difference of log losses (0: identical curves)."""
    return sum(abs(math.log(x) - math.log(y)) for x, y in zip(a, b)) / len(a)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--fast", action="store_true", help="2 epochs, for CI")
    parser.add_argument(
        "--logdir", type=_common.logdir, help="default: runs/accumulation_study/<timestamp>"
    )
    parser.add_argument("--png", help="default: <logdir>/loss_curves.png")
    positive_int = _common.positive_int
    parser.add_argument("--epochs", type=positive_int, help="default: 16 (fast: 2)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="B, the reference batch"
    )
    parser.add_argument("--k", type=positive_int, default=4, help="K, micro-batches accumulated")
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adam"], choices=BASE_LR)
    parser.add_argument("--threads", type=positive_int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (2 if args.fast else 16)
    root = args.logdir or _common.run_dir(os.path.join("runs", "accumulation_study"))
    # No checkpoints to resume: a rerun into the same directory would interleave two runs.
    if _common.holds_a_run(root):
        sys.exit(f"error: {root} already holds a run; choose a new --logdir")
    if (error := _common.claim_logdir(root)) is not None:
        sys.exit(f"error: {error}")
    png = args.png or os.path.join(root, "loss_curves.png")
    data = _common.load_digits()
    b, k = args.batch_size, args.k
    if k * b > len(data["train"]["y"]):  # the K×B runs would have no whole batch
        sys.exit(f"error: K×B = {k * b} > {len(data['train']['y'])} training images")
    print(f"TensorBoard runs: {root}/<optimizer>/<run>  (x-axis: training examples seen)")
    print(f"  view them with: tensorboard --logdir {root}")

    results = {}
    for opt in args.optimizers:
        for name, batch, micro, lr in runs(b, k, BASE_LR[opt]):
            result, seconds = train_one(
                data, opt, batch, micro, lr, epochs, k * b, os.path.join(root, opt, name)
            )
            results[opt, name] = (result, batch, micro, lr, seconds)

    print(
        f"\n{epochs} epochs each; B={b}, K={k}; loss: on the whole training set; gap to B: mean "
        "|log loss - log loss of B| at equal examples seen (0: the same curve)"
    )
    header = f"{'optimizer':<9} {'run':<14} {'batch':>5} {'K':>2} {'lr':>8} {'steps':>5} "
    print(
        header
        + f"{'first loss':>10} {'final loss':>10} {'test acc':>8} {'gap to B':>8} {'time':>6}"
    )
    for (opt, name), (result, batch, micro, lr, seconds) in results.items():
        h = result.history
        curve = h.values("eval/train_set_loss")
        reference = results[opt, "B"][0].history.values("eval/train_set_loss")
        print(
            f"{opt:<9} {name:<14} {batch:>5} {micro:>2} {lr:>8.3g} {int(result.state.step):>5} "
            f"{curve[0]:>10.4f} {curve[-1]:>10.4f} {h.last('eval/test_accuracy'):>8.2%} "
            f"{gap(curve, reference):>8.3f} {seconds:>5.1f}s"
        )

    print()
    for opt in args.optimizers:
        accum = results[opt, "KB-accum"][0]
        direct = results[opt, "KB-direct"][0]
        diff = max(
            float((a - d).abs().max())
            for a, d in zip(accum.state.params.values(), direct.state.params.values())
        )
        same = gap(
            accum.history.values("eval/train_set_loss"),
            direct.history.values("eval/train_set_loss"),
        )
        reference = results[opt, "B"][0].history.values("eval/train_set_loss")
        closest = min(
            ("KB-accum", "KB-accum-lin", "KB-accum-sqrt"),
            key=lambda n: gap(results[opt, n][0].history.values("eval/train_set_loss"), reference),
        )
        print(
            f"{opt}: accumulation == the K×B batch (curve gap {same:.1e}, max |Δparam| "
            f"{diff:.1e}); with the same lr it lags batch B at equal examples; closest to B: "
            f"{closest}"
        )
    plot(results, b, png)
    print(f"\nloss curves: {png}")
    return 0


if __name__ == "__main__":
    _common.run_as_script(main)
