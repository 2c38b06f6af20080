"""Per-sample gradient analysis on scikit-learn's handwritten digits, written to TensorBoard.

A small CNN learns the 8×8 digits of ``sklearn.datasets.load_digits`` with Adam and micro-batch
accumulation (a batch of 128 as 4 micro-batches of 32). Along the way:

* every step, ``grad_stats=ft.noise_scale_hook(cosine=True)`` turns the 4 micro-batch gradients
  the step already computes into the simple noise scale ``B_simple = tr(Σ)/|G|²`` (McCandlish et
  al. 2018): how large a batch is still worth using; and into their mean pairwise cosine (how
  much the micro-batches agree);
* every ``--analysis-every`` steps, one streaming pass of per-sample gradients over the whole
  training set gives per-example losses and gradient norms (histograms, and a text table of the
  hardest examples with their labels), per-parameter gradient signal-to-noise ratios, gradient
  diversity, and an independent per-sample estimate of ``B_simple``;
* optionally (on by default), the same model is trained with DP-SGD (Poisson-sampled batches,
  per-sample clipping, Gaussian noise once per step); its accuracy is compared with the
  non-private run and the privacy it spent, ``(ε, δ)``, comes from an RDP accountant (logged
  as it grows) and, at the end, from the tighter PRV accountant too.

Run::

    python examples/per_sample.py --logdir runs/per_sample
    tensorboard --logdir runs/per_sample

``--fast`` runs a few steps on a subset (for CI), with a larger learning rate so that the
DP-SGD run learns visibly in its 30 noisy steps (at 2e-3 it stays near chance).

Every scalar is logged at the number of optimizer steps done (the convention of
``ft.train_loop`` and ``examples/digits.py``): the metrics of the first step at step 1, the
analysis before training at step 0, the final evaluation at step ``--steps``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain.logging import TensorBoardWriter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

Batch = dict[str, torch.Tensor]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    positive_int, positive_float = _common.positive_int, _common.positive_float
    parser.add_argument(
        "--logdir", type=_common.logdir, help="run directory (default: runs/per_sample/<timestamp>)"
    )
    parser.add_argument("--steps", type=positive_int, help="default: 300 (fast: 30)")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--micro-batches", type=int, default=4, help="K >= 2 micro-batches")
    parser.add_argument("--lr", type=positive_float, help="Adam, both runs: 2e-3 (fast: 1e-2)")
    parser.add_argument("--analysis-every", type=positive_int, help="default: 50 (fast: 15)")
    parser.add_argument("--top-k", type=positive_int, help="hardest examples to list (10; fast: 5)")
    parser.add_argument(
        "--chunk-size", type=positive_int, default=128, help="examples per vmap call"
    )
    parser.add_argument("--no-dp", dest="dp", action="store_false", help="skip the DP-SGD run")
    parser.add_argument("--clip", type=positive_float, default=1.0, help="DP-SGD clipping norm C")
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="DP-SGD sigma >= 0")
    parser.add_argument("--delta", type=float, default=1e-5, help="DP-SGD delta for epsilon")
    parser.add_argument("--seed", type=_common.seed, default=0)
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="CPU threads (1 is fastest for this small CNN)",
    )
    parser.add_argument("--fast", action="store_true", help="a few steps on a subset (CI)")
    args = parser.parse_args(argv)
    if args.micro_batches < 2:
        parser.error("--micro-batches must be >= 2: the noise scale needs two gradients")
    if args.micro_batches > args.batch_size:
        parser.error("--micro-batches must be <= --batch-size")
    # inf passed here and ended in the library's ValueError, a traceback.
    if not (math.isfinite(args.noise_multiplier) and args.noise_multiplier >= 0):
        parser.error(f"--noise-multiplier must be >= 0 and finite, got {args.noise_multiplier}")
    if not 0 < args.delta < 1:
        parser.error(f"--delta must be in (0, 1), got {args.delta}")
    # --fast picks short defaults; values given explicitly win.
    # --fast's larger lr: with 30 steps at 2e-3 DP-SGD's noise leaves it near chance (~12%).
    fast = {"steps": 30, "analysis_every": 15, "top_k": 5, "lr": 1e-2}
    full = {"steps": 300, "analysis_every": 50, "top_k": 10, "lr": 2e-3}
    for name, default in (fast if args.fast else full).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


class Data(NamedTuple):
    train: Batch
    test: Batch


def load_data(seed: int, fast: bool) -> Data:
    """Digits as ``(n, 1, 8, 8)`` images with pixels in [0, 1], a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )

    def split(x: Any, y: Any) -> Batch:
        x = torch.tensor(x, dtype=torch.float32).unsqueeze(1) / 16.0
        return {"x": x, "y": torch.tensor(y, dtype=torch.int64)}

    train, test = split(x_train, y_train), split(x_test, y_test)
    if fast:
        train = {k: v[:512] for k, v in train.items()}
        test = {k: v[:256] for k, v in test.items()}
    return Data(train, test)


def make_model() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 4 * 4, 64),
            relu3=nn.ReLU(),
            fc2=nn.Linear(64, 10),
        )
    )


def batches(train: Batch, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless shuffled batches, epoch after epoch (the last partial batch of each dropped)."""
    loader = ft.TensorBatches(train, batch_size, seed=seed)
    epoch = 0
    while True:
        yield from loader.iter_epoch(epoch)
        epoch += 1


class Analysis(NamedTuple):
    losses: torch.Tensor  # (n,)
    norms: torch.Tensor  # (n,) global per-sample gradient norms
    leaf_norms: dict[str, torch.Tensor]  # per parameter, (n,)
    moments: ft.GradMoments


def per_sample_pass(loss_fn: Any, params: Any, batch: Batch, chunk_size: int) -> Analysis:
    """One streaming pass: only ``chunk_size`` per-sample gradients are alive at a time."""
    losses, norms, leaf_norms, moments = [], [], [], None
    for chunk in ft.per_sample_chunks(loss_fn, params, batch, chunk_size=chunk_size):
        n = ft.per_sample_norms(chunk.grads)
        losses.append(chunk.losses)
        norms.append(n.global_norm)
        leaf_norms.append(n.leaf_norms)
        part = ft.grad_moments(chunk.grads)
        moments = part if moments is None else ft.merge_grad_moments(moments, part)
    assert moments is not None
    leaf = {k: torch.cat([ln[k] for ln in leaf_norms]) for k in leaf_norms[0]}
    return Analysis(torch.cat(losses), torch.cat(norms), leaf, moments)


def ascii_digit(image: torch.Tensor) -> str:
    shades = " .:-=+*#%@"
    rows = ["".join(shades[min(int(v * 10), 9)] * 2 for v in row) for row in image[0].tolist()]
    return "\n".join("    " + r for r in rows)


def hardest_report(a: Analysis, batch: Batch, probs: torch.Tensor, k: int, step: int) -> str:
    """Markdown: the ``k`` examples with the largest per-sample gradient norm."""
    order = torch.argsort(a.norms, descending=True)[:k]
    pred = probs.argmax(1)
    lines = [
        f"Step {step}: the {k} training examples with the largest per-sample gradient norm "
        f"(median norm {a.norms.median():.3g}).",
        "",
        "| rank | index | label | predicted | p(label) | loss | grad norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for rank, i in enumerate(order.tolist(), 1):
        label = int(batch["y"][i])
        lines.append(
            f"| {rank} | {i} | {label} | {int(pred[i])} | {probs[i, label]:.3f} "
            f"| {a.losses[i]:.3f} | {a.norms[i]:.3g} |"
        )
    lines += ["", "The three hardest, as images:", ""]
    for i in order[:3].tolist():
        label, guess = int(batch["y"][i]), int(pred[i])
        lines += [
            f"    index {i}: label {label}, predicted {guess}",
            ascii_digit(batch["x"][i]),
            "",
        ]
    return "\n".join(lines)


def analyse(
    writer: TensorBoardWriter,
    step: int,
    loss_fn: Any,
    model: Any,
    params: Any,
    data: Data,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Per-sample statistics of the whole training set, logged at ``step``."""
    with torch.no_grad():
        a = per_sample_pass(loss_fn, params, data.train, args.chunk_size)
        probs = model(params, data.train["x"]).softmax(-1)
        test_logits = model(params, data.test["x"])
    snr = ft.grad_snr(a.moments)
    estimate = ft.noise_scale_from_moments(a.moments)
    test_acc = (test_logits.argmax(1) == data.test["y"]).float().mean()
    hists: dict[str, torch.Tensor] = {
        "per_sample/grad_norm": a.norms,
        "per_sample/loss": a.losses,
    }
    scalars: dict[str, torch.Tensor] = {
        "per_sample/grad_norm_median": a.norms.median(),
        "per_sample/grad_norm_max": a.norms.max(),
        "per_sample/trace_sigma": estimate.trace_sigma,
        "per_sample/grad_sq": estimate.grad_sq,
        "per_sample/b_simple": estimate.trace_sigma / estimate.grad_sq,
        "grads/diversity": ft.gradient_diversity_from_moments(a.moments),
        "eval/accuracy": test_acc,
        "eval/loss": F.cross_entropy(test_logits, data.test["y"]),
    }
    for name in a.leaf_norms:
        hists[f"per_sample/grad_norm/{name}"] = a.leaf_norms[name]
        # GSNR spans orders of magnitude: the histogram is of log10 values.
        hists[f"grad_snr/log10/{name}"] = snr[name].clamp_min(1e-12).log10()
        scalars[f"grad_snr/median/{name}"] = snr[name].median()
    writer.write_histograms(step, hists)
    writer.write_scalars(step, scalars)
    report = hardest_report(a, data.train, probs, args.top_k, step)
    writer.write_text(step, {"hardest_examples": report})
    hardest = torch.argsort(a.norms, descending=True)[: args.top_k]
    return {
        "step": step,
        "b_simple_per_sample": float(scalars["per_sample/b_simple"]),
        "test_accuracy": float(test_acc),
        "hardest": [
            (i, int(data.train["y"][i]), int(probs[i].argmax()), float(a.norms[i]))
            for i in hardest.tolist()
        ],
        "loss_norm_corr": float(torch.corrcoef(torch.stack([a.losses, a.norms]))[0, 1]),
    }


def train(args: argparse.Namespace, data: Data, logdir: str) -> dict[str, Any]:
    """Non-private training with the noise-scale hook and periodic per-sample analysis."""
    torch.manual_seed(args.seed)
    model, params, _ = ft.functionalize(make_model())

    def loss_fn(params: Any, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(params, batch["x"]), batch["y"])

    tx = ft.adam(args.lr)
    step_fn = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=args.micro_batches,
        grad_stats=ft.noise_scale_hook(decay=0.95, cosine=True),
    )
    state = ft.TrainState.create(params=params, tx=tx, seed=args.seed)
    history: dict[str, list[Any]] = {"loss": [], "b_simple": [], "analyses": []}
    stream = batches(data.train, args.batch_size, args.seed)
    with TensorBoardWriter(os.path.join(logdir, "standard")) as writer:
        writer.write_hparams(
            {"lr": args.lr, "batch_size": args.batch_size, "micro_batches": args.micro_batches},
            {"eval/accuracy": None, "train/noise_scale/b_simple": None},
        )
        for step in range(args.steps + 1):
            if step % args.analysis_every == 0 or step == args.steps:
                history["analyses"].append(
                    analyse(writer, step, loss_fn, model, state.params, data, args)
                )
            if step == args.steps:
                break
            state, metrics = step_fn(state, next(stream))
            # Logged at the number of steps done (step + 1), like ft.train_loop.
            writer.write_scalars(step + 1, {f"train/{k}": v for k, v in metrics.items()})
            history["loss"].append(float(metrics["loss"]))
            history["b_simple"].append(float(metrics["noise_scale/b_simple"]))
    return history


def train_dp(args: argparse.Namespace, data: Data, logdir: str) -> dict[str, Any]:
    """DP-SGD: Poisson-sampled batches, per-sample clipping within each micro-batch, a sum,
    noise once per step (``make_train_step(per_example_clip=C)`` with ``dp_noisy_mean``); the
    privacy spent is tracked by an RDP accountant, and re-read at the end by a PRV one."""
    torch.manual_seed(args.seed)
    model, params, _ = ft.functionalize(make_model())

    def loss_fn(params: Any, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(params, batch["x"]), batch["y"])

    n = len(data.train["y"])
    # Each example joins each batch with probability q: the sampling the accounting assumes.
    sampler = ft.PoissonSampler(
        n, args.batch_size / n, steps=args.steps, generator=torch.Generator().manual_seed(args.seed)
    )
    expected = sampler.expected_batch_size
    tx = ft.chain(
        ft.dp_noisy_mean(
            args.clip, args.noise_multiplier, expected_batch_size=expected, seed=args.seed
        ),
        ft.adam(args.lr),
    )
    # tx receives the sum of per-example gradients clipped to C, micro-batch by micro-batch.
    step_fn = ft.make_train_step(
        loss_fn, tx, micro_batches=args.micro_batches, per_example_clip=args.clip
    )
    state = ft.TrainState.create(params=params, tx=tx, seed=args.seed)
    accountant = ft.RDPAccountant()
    losses = []
    with TensorBoardWriter(os.path.join(logdir, "dp_sgd")) as writer:
        # Logged at the number of steps done, like the standard run and ft.train_loop.
        for step, idx in enumerate(sampler, start=1):  # an empty batch still gets its noise
            state, metrics = step_fn(state, {k: v[idx] for k, v in data.train.items()})
            accountant.step(noise_multiplier=args.noise_multiplier, sample_rate=sampler.sample_rate)
            losses.append(float(metrics["loss"]))
            scalars = {
                "train/loss": metrics["loss"],
                "dp/clipped_fraction": metrics["clipped_fraction"],
                "dp/batch_size": metrics["num_examples"],
            }
            if step % args.analysis_every == 0 or step == args.steps:
                scalars["dp/epsilon"] = accountant.get_epsilon(args.delta)
            writer.write_scalars(step, scalars)
        with torch.no_grad():
            logits = model(state.params, data.test["x"])
        accuracy = (logits.argmax(1) == data.test["y"]).float().mean()
        # The same history, composed numerically (Opacus' default accountant): a tighter ε.
        prv = ft.PRVAccountant()
        prv.load_state_dict(accountant.state_dict())
        epsilon_prv = prv.get_epsilon(args.delta)
        writer.write_scalars(args.steps, {"eval/accuracy": accuracy, "dp/epsilon_prv": epsilon_prv})
    epsilon, order = accountant.get_privacy_spent(delta=args.delta)
    return {
        "loss": losses,
        "test_accuracy": float(accuracy),
        "epsilon": epsilon,
        "order": order,
        "epsilon_prv": epsilon_prv,
        "expected_batch_size": expected,
        "sample_rate": sampler.sample_rate,
    }


def summarize(args: argparse.Namespace, history: dict[str, Any], dp: dict[str, Any] | None) -> str:
    b = history["b_simple"]
    marks = sorted({min(len(b) - 1, max(0, round(f * len(b)) - 1)) for f in (0.1, 0.25, 0.5, 1.0)})
    last = history["analyses"][-1]
    final_b = b[-1]
    lines = [
        f"train loss {history['loss'][0]:.3f} -> {history['loss'][-1]:.3f} over {args.steps} steps "
        f"(batch {args.batch_size} = {args.micro_batches} micro-batches); "
        f"test accuracy {100 * last['test_accuracy']:.1f}%",
        "simple noise scale B_simple (moving average of the micro-batch estimates):",
        *(f"  after step {i + 1:4d}: B_simple ≈ {b[i]:.0f}" for i in marks),
        f"  per-sample estimate on the whole training set at step {last['step']}: "
        f"B_simple ≈ {last['b_simple_per_sample']:.0f}",
    ]
    if math.isfinite(final_b) and final_b > 0:
        # McCandlish et al. 2018: steps S = S_min (1 + B_noise / B) and, for SGD, the best
        # learning rate eps(B) = eps_max / (1 + B_noise / B); B_simple stands in for B_noise.
        gain = (1 + final_b / args.batch_size) / (1 + final_b / (2 * args.batch_size))
        lines.append(
            f"critical batch ≈ B_simple ≈ {final_b:.0f} examples (batch {args.batch_size}): "
            f"doubling the batch (more accumulation) would cut the steps needed ×{gain:.2f} "
            f"(×2 is perfect scaling, ×1 no gain) and, for SGD, allow a ×{gain:.2f} learning rate"
        )
    else:
        lines.append("critical batch: B_simple has not settled (|G|² estimate ≤ 0); train longer")
    hardest = ", ".join(f"#{i} ({y}→{p}, ‖g‖={n:.2g})" for i, y, p, n in last["hardest"][:5])
    lines.append(f"hardest examples (index (label→predicted, grad norm)): {hardest}")
    lines.append(f"correlation of per-sample loss and gradient norm: {last['loss_norm_corr']:.2f}")
    if dp is not None:
        lines += dp_lines(args, dp, last["test_accuracy"])
    return "\n".join(lines)


CHANCE = 0.1  # ten balanced classes (the split is stratified)


def dp_lines(args: argparse.Namespace, dp: dict[str, Any], baseline: float) -> list[str]:
    """The DP-SGD result next to the non-private one and chance, and what its ε means."""
    lines = [
        f"DP-SGD (C={args.clip}, σ={args.noise_multiplier}): test accuracy "
        f"{100 * dp['test_accuracy']:.1f}% vs {100 * baseline:.1f}% non-private "
        f"(chance {100 * CHANCE:.0f}%); "
        f"(ε, δ) = ({dp['epsilon']:.2f}, {args.delta:g}) after {args.steps} Poisson-sampled "
        f"steps of expected batch {dp['expected_batch_size']:.0f} (RDP, best order "
        f"{dp['order']:g}); ε = {dp['epsilon_prv']:.2f} by the tighter PRV accountant",
        # Rough bands of Ponomareva et al. 2023 ("How to DP-fy ML"), so a bare ε means something.
        f"  ε ≤ 1 is a strong guarantee, ε ≤ 10 a reasonable one, more a weak one; ε grows with "
        f"the steps and the sampling rate q = {dp['sample_rate']:.3g} (batch / training images) "
        f"and shrinks as --noise-multiplier σ grows",
    ]
    if dp["test_accuracy"] < 2.5 * CHANCE:
        # The noise std of each step's mean gradient is σC/batch per coordinate: with too few
        # steps (or too small a learning rate) the run is still at its random start.
        lines.append(
            "  DP-SGD has not learned yet (near chance): too few noisy steps for this learning "
            "rate; raise --steps (ε grows) or --lr"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    root = os.path.join("runs", "per_sample")
    logdir = args.logdir or _common.run_dir(root)
    if _common.holds_a_run(logdir):  # no checkpoints to resume: a rerun would mix two runs
        sys.exit(f"error: {logdir} already holds a run; choose a new --logdir")
    if (error := _common.claim_logdir(logdir)) is not None:
        sys.exit(f"error: {error}")
    data = load_data(args.seed, args.fast)
    if args.batch_size > len(data.train["y"]):  # an epoch of whole batches would be empty
        sys.exit(f"error: --batch-size {args.batch_size} > {len(data.train['y'])} training images")
    _common.print_logdir(logdir, "runs" if args.logdir is None else logdir)
    print(
        f"digits: {len(data.train['y'])} train / {len(data.test['y'])} test images; "
        f"runs 'standard' and{'' if args.dp else ' (skipped)'} 'dp_sgd'"
    )
    start = time.perf_counter()
    history = train(args, data, logdir)
    dp = train_dp(args, data, logdir) if args.dp else None
    print(summarize(args, history, dp))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    _common.run_as_script(main)
