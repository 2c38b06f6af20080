"""The main job: a digits classifier with 4-step accumulation, warmup-cosine and clipping.

An MLP on scikit-learn's 8x8 digits (1,797 images; a fixed stratified 80/20 split, standardized
with the training statistics), trained with AdamW under a warmup-cosine schedule after global-norm
clipping, each batch of 128 split into K=4 micro-batches whose gradients are combined exactly.
A progress bar shows loss, lr, throughput and ETA; TensorBoard gets the default metrics
(``train/*``, ``perf/*``, ``eval/*``) and the hyperparameters. Checkpoints go to
``<logdir>/checkpoints``: press Ctrl-C, rerun with the same ``--logdir`` (and the same settings)
and training resumes exactly where it stopped.

    python examples/digits.py                 # seconds on a laptop CPU, >= 95% test accuracy
    python examples/digits.py --fast          # a few steps (CI)
    tensorboard --logdir runs

Exits with status 1 when the final test accuracy is below 95% (normal mode only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import functrain as ft
from functrain.checkpoint import CheckpointManager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

TARGET_ACCURACY = 0.95


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few steps, for CI")
    parser.add_argument(
        "--logdir", type=_common.logdir, help="run directory (default: runs/digits/<timestamp>)"
    )
    positive_int, positive_float = _common.positive_int, _common.positive_float
    parser.add_argument("--epochs", type=positive_int, help="default: 40 (fast: 3)")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--micro-batches", type=positive_int, default=4)
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=_common.seed, default=0)
    parser.add_argument("--device", type=_common.device, default=_common.default_device())
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="CPU threads (1 is fastest for this MLP)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.micro_batches > args.batch_size:
        parser.error("--micro-batches must be <= --batch-size (each micro-batch needs an image)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    epochs = args.epochs or (3 if args.fast else 40)
    torch.set_num_threads(args.threads)
    data = _common.load_digits(args.device)
    train, test = data["train"], data["test"]

    model, params, _ = ft.functionalize(_common.digits_mlp(seed=args.seed).to(args.device))
    loss_fn = _common.classifier_loss(model)
    batches = ft.TensorBatches(train, args.batch_size, seed=args.seed)
    if len(batches) == 0:  # the last partial batch is dropped: an epoch would be empty
        sys.exit(f"error: --batch-size {args.batch_size} > {len(train['y'])} training images")
    total_steps = epochs * len(batches)
    schedule = ft.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.lr,
        warmup_steps=min(max(1, total_steps // 10), total_steps - 1),  # ends before the decay
        decay_steps=total_steps,
        end_value=args.lr / 100,
    )
    tx = ft.chain(
        ft.clip_by_global_norm(1.0),
        ft.inject_hyperparams(ft.adamw)(learning_rate=schedule, weight_decay=1e-4),
    )
    step = ft.make_train_step(loss_fn, tx, micro_batches=args.micro_batches)
    state = ft.TrainState.create(params=params, tx=tx, seed=args.seed)

    default_root = os.path.join("runs", "digits")
    logdir = args.logdir or _common.run_dir(default_root)
    hparams = {
        "batch_size": args.batch_size,
        "micro_batches": args.micro_batches,
        "peak_lr": args.lr,
        "epochs": epochs,
        "seed": args.seed,
    }
    if (error := _common.claim_logdir(logdir)) is not None:
        sys.exit(f"error: {error}")
    # A rerun in the same directory resumes its checkpoint: only under the same settings.
    if (error := _common.check_same_run(logdir, hparams)) is not None:
        sys.exit(f"error: {error}")
    writer = _common.writer_factory(
        logdir,
        total_steps=total_steps,
        hparams=hparams,
        console_keys=["train/loss", "train/lr"],
        console=not args.no_progress,
    )
    manager = CheckpointManager(os.path.join(logdir, "checkpoints"), max_to_keep=2)
    _common.print_logdir(logdir, "runs" if args.logdir is None else logdir)
    print(
        f"digits: {len(train['y'])} train / {len(test['y'])} test images, {epochs} epochs of "
        f"{len(batches)} steps, batch {args.batch_size} = {args.micro_batches} micro-batches"
    )

    evaluate = ft.make_eval_step(loss_fn)
    start = time.perf_counter()
    result = ft.train_loop(
        step,
        state,
        batches,
        epochs=epochs,
        eval_step=evaluate,
        eval_batches=[test],
        eval_every=len(batches) * (1 if args.fast else 5),
        writer=writer,
        checkpoint_manager=manager,
        checkpoint_every=len(batches) * 5,
        catch_interrupt=True,
    )
    elapsed = time.perf_counter() - start
    history = result.history
    if result.resumed_from is not None:
        print(f"resumed from the checkpoint at step {result.resumed_from}")
    if result.interrupted:
        print(
            f"interrupted at step {int(result.state.step)}; rerun with --logdir {logdir} to resume"
        )
        return 130
    if "train/loss" in history.tags():
        losses = history.values("train/loss")
        # 4 significant digits: a converged loss of 0.0004 printed as "0.000" looked like a bug.
        print(f"train loss {losses[0]:.4g} -> {losses[-1]:.4g} (a batch's loss)")
    # The final state's own evaluation: a rerun of a finished run resumes at its end and
    # evaluates nothing, yet still reports (and checks) its accuracy.
    final = evaluate(result.state, test)
    accuracy = float(final["accuracy"])
    print(
        f"test loss {float(final['loss']):.3f}, test accuracy {accuracy:.2%} "
        f"after {int(result.state.step)} steps ({elapsed:.1f} s)"
    )
    if not args.fast and accuracy < TARGET_ACCURACY:
        print(f"FAILED: test accuracy {accuracy:.2%} < {TARGET_ACCURACY:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    _common.run_as_script(main)
