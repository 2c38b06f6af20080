"""Learning the learning rate by differentiating through the train steps (hypergradient descent).

An MLP on scikit-learn's 8x8 digits trains with SGD + momentum from a deliberately small learning
rate. Every ``--unroll`` steps the learning rate is tuned online: the validation loss after the
next ``--unroll`` steps is differentiated with respect to the log learning rate *through those
steps* — ``torch.func.grad`` of a function that calls ``make_train_step``'s step, as ``jax.grad``
through an optax loop — and Adam on the log learning rate takes one step. Then the same steps
run for real with the new rate (the step's fast, donating path). A second run with the initial
rate fixed sees the same batches: the baseline.

TensorBoard gets two runs, ``learned`` and ``fixed``: ``train/loss``, ``val/loss`` and
``train/lr`` for both, ``meta/hypergradient`` for the learned one.

    python examples/learned_lr.py           # seconds on a laptop CPU
    python examples/learned_lr.py --fast    # a few outer steps (CI)
    tensorboard --logdir runs/learned_lr

Exits with status 1 when the learned rate does not end with a lower validation loss than the
fixed one (normal mode only).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

import functrain as ft
from functrain.logging import TensorBoardWriter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few outer steps, for CI")
    parser.add_argument(
        "--logdir", type=_common.logdir, help="run directory (default: runs/learned_lr/<time>)"
    )
    positive_int, positive_float = _common.positive_int, _common.positive_float
    parser.add_argument("--outer-steps", type=positive_int, help="default: 60 (fast: 6)")
    parser.add_argument("--unroll", type=positive_int, default=5, help="steps differentiated")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="initial learning rate")
    parser.add_argument("--meta-lr", type=positive_float, default=0.1, help="Adam on log(lr)")
    parser.add_argument("--seed", type=_common.seed, default=0)
    return parser.parse_args(argv)


def with_learning_rate(state: ft.TrainState, lr: torch.Tensor) -> ft.TrainState:
    """``state`` whose injected learning rate is ``lr`` (optax's ``opt_state.hyperparams``)."""
    opt_state = state.opt_state
    hyperparams = {**opt_state.hyperparams, "learning_rate": lr}
    return state.replace(opt_state=opt_state._replace(hyperparams=hyperparams))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    outer_steps = args.outer_steps or (6 if args.fast else 60)
    torch.set_num_threads(1)
    data = _common.load_digits()
    train, test = data["train"], data["test"]
    # The meta objective is a validation split of the training images; the test set stays out.
    n_val = len(train["y"]) // 5
    val = {k: v[:n_val] for k, v in train.items()}
    fit = {k: v[n_val:] for k, v in train.items()}

    model, params, _ = ft.functionalize(_common.digits_mlp(seed=args.seed))

    def loss_fn(p: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(p, batch["x"]), batch["y"])

    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=args.lr, momentum=0.9)
    step = ft.make_train_step(loss_fn, tx)
    learned = ft.TrainState.create(params=params, tx=tx, seed=args.seed)
    fixed = ft.TrainState.create(params=params, tx=tx, seed=args.seed)
    epochs = ft.TensorBatches(fit, args.batch_size, seed=args.seed)
    batches = (batch for epoch in itertools.count() for batch in epochs.iter_epoch(epoch))

    def val_loss_after(log_lr: torch.Tensor, state: ft.TrainState, chunk: list[Any]):
        state = with_learning_rate(state, log_lr.exp())
        for batch in chunk:
            state, _ = step(state, batch)  # differentiated: second order through each step
        return loss_fn(state.params, val)

    log_lr = torch.tensor(math.log(args.lr))
    meta_tx = ft.adam(args.meta_lr)
    meta_state = meta_tx.init(log_lr)

    logdir = args.logdir or _common.run_dir(os.path.join("runs", "learned_lr"))
    if (error := _common.claim_logdir(logdir)) is not None:
        sys.exit(f"error: {error}")
    writers = {name: TensorBoardWriter(os.path.join(logdir, name)) for name in ("learned", "fixed")}
    _common.print_logdir(logdir, logdir if args.logdir else os.path.join("runs", "learned_lr"))
    print(
        f"learned_lr: {len(fit['y'])} fit / {n_val} validation / {len(test['y'])} test images, "
        f"{outer_steps} outer steps of {args.unroll} inner steps, initial lr {args.lr:g}"
    )

    start = time.perf_counter()
    for outer in range(1, outer_steps + 1):
        chunk = [next(batches) for _ in range(args.unroll)]
        hypergradient = torch.func.grad(val_loss_after)(log_lr, learned, chunk)
        meta_update, meta_state = meta_tx.update(hypergradient, meta_state)
        log_lr = ft.apply_updates(log_lr, meta_update)
        learned = with_learning_rate(learned, log_lr.exp())
        for batch in chunk:  # the same steps for real, then the baseline on the same batches
            learned, learned_metrics = step(learned, batch)
            fixed, fixed_metrics = step(fixed, batch)
        at = outer * args.unroll
        for name, state, metrics in (
            ("learned", learned, learned_metrics),
            ("fixed", fixed, fixed_metrics),
        ):
            scalars = {
                "train/loss": metrics["loss"],
                "train/lr": metrics["lr"],
                "val/loss": loss_fn(state.params, val),
            }
            if name == "learned":
                scalars["meta/hypergradient"] = hypergradient
            writers[name].write_scalars(at, scalars)
    elapsed = time.perf_counter() - start
    for writer in writers.values():
        writer.close()

    evaluate = ft.make_eval_step(_common.classifier_loss(model))
    results = {}
    for name, state in (("learned", learned), ("fixed", fixed)):
        metrics = evaluate(state, test)
        results[name] = (float(loss_fn(state.params, val)), float(metrics["accuracy"]))
    print(f"learning rate {args.lr:g} -> {math.exp(float(log_lr)):.4g} ({elapsed:.1f} s)")
    for name, (val_loss, accuracy) in results.items():
        print(f"{name:>8}: validation loss {val_loss:.4f}, test accuracy {accuracy:.2%}")
    if not args.fast and results["learned"][0] >= results["fixed"][0]:
        print("FAILED: the learned learning rate did not beat the fixed one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    _common.run_as_script(main)
