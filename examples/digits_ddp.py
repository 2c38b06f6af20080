"""Data-parallel digits classifier: functrain on ``torch.distributed``, launched with torchrun.

Run on CPU with two processes (gloo)::

    torchrun --nproc_per_node=2 examples/digits_ddp.py
    torchrun --nproc_per_node=2 examples/digits_ddp.py --fast          # a quick check (CI)
    torchrun --nproc_per_node=2 examples/digits_ddp.py --no-shard      # whole optimizer state
    torchrun --nproc_per_node=2 examples/digits_ddp.py --dp            # DP-SGD across ranks
    torchrun --nproc_per_node=2 examples/digits_ddp.py --noise-scale --no-shard  # noise scale

Each rank trains on its shard of every epoch (``dist.shard_indices``), the gradients of the
ranks are combined into the exact gradient of the global batch, the optimizer state is sharded
across ranks (ZeRO-1: each rank keeps about half of AdamW's moments), and only rank 0 prints,
writes TensorBoard events (``--logdir``: the ``train/*`` tags of ``ft.train_loop``, at steps 1,
2, ...) and saves the checkpoint (``--checkpoint``). Nothing resumes: a ``--logdir`` that holds
a run, or that another launch is writing, is refused on every rank (status 1).

``--dp`` trains with DP-SGD instead (see docs/guides/data-parallel.md, "DP-SGD across ranks"):
each rank Poisson-samples its fixed shard at rate ``q = batch-size / training images``,
``per_example_clip=--clip`` clips every example's gradient, the ranks add their clipped sums, and
``dp_noisy_mean`` (first in the optimizer, the same seed on every rank) adds the noise once
(with the sharded optimizer state, each rank draws its pieces' slice of it). Rank 0 runs an RDP
accountant and logs ``dp/epsilon`` at the end of every epoch (``round(1/q)`` steps) and prints
the final ``(ε, δ)``.

``--noise-scale`` (with ``--no-shard``; not with ``--dp``: the library refuses ``grad_stats``
with a sharded optimizer state and in DP-SGD steps) passes
``grad_stats=ft.noise_scale_hook()``: the ``world × K`` micro-batch gradients of each step (``K``
= ``--micro-batches``, 2 by default here) give McCandlish et al.'s gradient noise scale,
identical on every rank. Its metrics are logged each step under the tags ``ft.train_loop``
gives them (``noise_scale/b_simple``, ``noise_scale/trace_sigma``, ``noise_scale/grad_sq``,
``noise_scale/gradient_diversity``: names holding a ``/`` keep no ``train/`` prefix), and rank
0 prints the final simple noise scale ``B_simple`` with a critical-batch hint.
Without torchrun (``python examples/digits_ddp.py``) the same script runs as one process.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import torch
from sklearn.datasets import load_digits

import functrain as ft
from functrain import distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

N_TEST = 300
N_TRAIN = 1797 - N_TEST  # scikit-learn's digits
Batch = dict[str, torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    positive_int, positive_float = _common.positive_int, _common.positive_float
    parser.add_argument("--steps", type=positive_int, help="optimizer steps (default: 400)")
    parser.add_argument(
        "--epochs", type=positive_int, help="train whole epochs instead (--dp default: 5; fast: 2)"
    )
    parser.add_argument(
        "--fast", action="store_true", help="a short run for CI: 40 steps (--dp: 2 epochs)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=64, help="global batch size")
    parser.add_argument(
        "--micro-batches",
        type=positive_int,
        default=None,
        help="per rank's batch (default: 1; --noise-scale: 2)",
    )
    parser.add_argument("--lr", type=positive_float, help="peak learning rate: 3e-3 (--dp: 3e-2)")
    parser.add_argument("--hidden", type=positive_int, default=64)
    parser.add_argument(
        "--seed", type=_common.seed, default=0, help="init, shuffling, sampling, noise"
    )
    parser.add_argument("--threads", type=positive_int, help="CPU threads per rank")
    parser.add_argument("--no-shard", action="store_true", help="keep the whole optimizer state")
    parser.add_argument("--dp", action="store_true", help="DP-SGD with Poisson sampling")
    parser.add_argument(
        "--noise-scale",
        action="store_true",
        help="log the gradient noise scale (noise_scale/*) and print B_simple; needs --no-shard",
    )
    parser.add_argument("--clip", type=positive_float, default=1.0, help="DP-SGD clipping norm C")
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="DP-SGD sigma >= 0")
    parser.add_argument("--delta", type=float, default=1e-5, help="DP-SGD delta for epsilon")
    parser.add_argument(
        "--timeout", type=positive_float, default=60.0, help="collective timeout (s)"
    )
    parser.add_argument(
        "--logdir", type=_common.logdir, default=None, help="TensorBoard directory (rank 0 writes)"
    )
    parser.add_argument("--checkpoint", default=None, help="save the final state here (rank 0)")
    args = parser.parse_args()
    # torchrun's environment, read before the process group exists so that a bad value is a
    # usage error on every rank rather than a hang: each rank takes batch-size / world examples.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} is not a multiple of the {world} ranks")
    if args.batch_size > N_TRAIN:
        parser.error(f"--batch-size {args.batch_size} > {N_TRAIN} training images")
    if args.steps is not None and args.epochs is not None:
        parser.error("give --steps or --epochs, not both")
    if args.noise_scale:
        # The library refuses grad_stats in both (a ValueError at step construction): say so
        # here, before the process group exists, as a usage error on every rank.
        if args.dp:
            parser.error("--noise-scale does not work with --dp (DP-SGD steps refuse grad_stats)")
        if not args.no_shard:
            parser.error(
                "--noise-scale needs --no-shard (the noise-scale hook needs the whole global "
                "gradient, which a rank of a sharded optimizer state does not hold)"
            )
    if args.micro_batches is None:
        # The hook needs world × K >= 2 estimates in all; 2 per rank also covers one process
        # (no torchrun) and gives a less noisy estimate than 1.
        args.micro_batches = 2 if args.noise_scale else 1
    elif args.noise_scale and world * args.micro_batches < 2:
        parser.error("--noise-scale needs at least 2 micro-batches in all: raise --micro-batches")
    if args.checkpoint is not None:
        # Checked now, not when the run ends: a bad path there lost the whole run's state.
        target = os.path.abspath(args.checkpoint)
        parent = os.path.dirname(target)
        if os.path.isdir(target):
            parser.error(f"--checkpoint {args.checkpoint} is a directory; give a file path")
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            parser.error(f"--checkpoint {args.checkpoint}: {parent} is not a writable directory")
    if args.dp:
        if args.steps is not None:  # the accountant's epochs are round(1/q) steps
            parser.error("--dp trains whole epochs: use --epochs, not --steps")
        # inf passed here and ended in the library's ValueError, a traceback.
        if not (math.isfinite(args.noise_multiplier) and args.noise_multiplier >= 0):
            parser.error(f"--noise-multiplier must be >= 0 and finite, got {args.noise_multiplier}")
        if not 0 < args.delta < 1:
            parser.error(f"--delta must be in (0, 1), got {args.delta}")
        args.epochs = args.epochs or (2 if args.fast else 5)
        args.steps = args.epochs * steps_per_epoch(args, world)
        args.lr = args.lr or 3e-2
    else:
        # A Poisson batch smaller than K is split into fewer micro-batches; a fixed one is not.
        if args.micro_batches > args.batch_size // world:
            parser.error(f"--micro-batches {args.micro_batches} > the batch of each rank")
        if args.epochs is not None:
            args.steps = args.epochs * steps_per_epoch(args, world)
        elif args.steps is None:
            args.steps = 40 if args.fast else 400
        elif args.fast:
            args.steps = min(args.steps, 40)
        args.lr = args.lr or 3e-3
    return args


def steps_per_epoch(args: argparse.Namespace, world: int) -> int:
    """Steps per epoch: ``round(1/q)`` Poisson batches (``--dp``), else full batches per shard."""
    if args.dp:
        return round(N_TRAIN / args.batch_size)  # PoissonSampler's default at q = B / N
    return (N_TRAIN // world) // (args.batch_size // world)  # drop_last shards, full batches


def noise_scale_summary(b_simple: float, batch_size: int) -> str:
    """The final ``B_simple`` (``repr``: exactly the logged value) and a critical-batch hint."""
    line = f"noise scale: B_simple={b_simple!r} (global batch {batch_size})"
    if not (math.isfinite(b_simple) and b_simple > 0):
        return line + "; not settled (|G|² estimate <= 0): train longer"
    # McCandlish et al. 2018: steps S = S_min (1 + B_noise / B); B_simple stands in for B_noise.
    gain = (1 + b_simple / batch_size) / (1 + b_simple / (2 * batch_size))
    return (
        line + f"; critical batch ≈ B_simple ≈ {b_simple:.0f} examples: doubling the batch "
        f"would cut the steps needed ×{gain:.2f} (×2 is perfect scaling, ×1 no gain)"
    )


def load() -> tuple[Batch, Batch]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return {"x": x[N_TEST:], "y": y[N_TEST:]}, {"x": x[:N_TEST], "y": y[:N_TEST]}


def batches(train: Batch, local_batch: int, seed: int) -> Iterator[Batch]:
    """This rank's batches, epoch after epoch: its shard of each epoch's permutation."""
    epoch = 0
    n = len(train["y"])
    while True:
        # drop_last: equal shards, so every rank takes the same number of steps per epoch.
        indices = dist.shard_indices(n, shuffle=True, seed=seed, epoch=epoch, drop_last=True)
        for start in range(0, len(indices) - local_batch + 1, local_batch):
            idx = indices[start : start + local_batch]
            yield {"x": train["x"][idx], "y": train["y"][idx]}
        epoch += 1


def poisson_batches(train: Batch, sample_rate: float, seed: int) -> Iterator[Batch]:
    """This rank's DP-SGD batches: each example of its shard joins each batch with probability
    ``sample_rate``, independently of the other ranks (the sampling the accountant assumes)."""
    shard = dist.shard_indices(len(train["y"]))  # fixed; the sampler randomizes
    # One generator per rank, seeded from the run's seed: independent, reproducible draws.
    rank_seeds = torch.randint(
        2**62, (dist.world_size(),), generator=torch.Generator().manual_seed(seed)
    )
    generator = torch.Generator().manual_seed(int(rank_seeds[dist.rank()]))
    # The same number of steps on every rank (an empty batch is still a step) and the same
    # generator stream across epochs: each epoch's iteration draws new batches.
    sampler = ft.PoissonSampler(len(shard), sample_rate, generator=generator)
    while True:
        for local in sampler:
            idx = shard[local]
            yield {"x": train["x"][idx], "y": train["y"][idx]}


def make_model(hidden: int) -> Any:
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    )


def claim_logdir(logdir: str) -> str | None:
    """Rank 0's claim on ``--logdir``: why the launch must not write there, or None.

    Refused: a directory another launch is writing (the examples' lock), or one that already
    holds a finished run's events. Nothing here resumes, so a rerun into the same directory
    would log its steps 1, 2, ... a second time, one zigzagging curve in TensorBoard.

    Args:
        logdir: the ``--logdir`` directory, created here when missing.

    Returns:
        The reason for a refusal, or None when the directory is this launch's.
    """
    if (error := _common.claim_logdir(logdir)) is not None:
        return error
    if _common.holds_a_run(logdir):  # checked under the lock: no launch is writing it now
        return f"{logdir} already holds a run; choose a new --logdir"
    return None


def refuse_launch(error: str | None, world: int) -> NoReturn:
    """Ends every rank of a refused launch with a non-zero status, rank 0 saying why once.

    Every rank must fail: torchrun and CI scripts read a rank's status 0 as success. But once a
    rank fails, torchrun stops the others, so rank 0 prints its message first and the other
    ranks wait for that (a barrier) before they exit.

    Args:
        error: rank 0's reason for the refusal; None on the other ranks.
        world: the number of ranks.
    """
    message = f"error: {error}" if error is not None else None
    if world > 1:
        if message is not None:
            print(message, file=sys.stderr, flush=True)
            message = None  # printed: exit with a bare status, not the message again
        dist.barrier()  # the others exit only after rank 0 has printed
    dist.shutdown()
    # One process (no torchrun): sys.exit prints the message itself and exits with 1.
    sys.exit(message if message is not None else 1)


def main() -> None:
    args = parse_args()
    dist.init(timeout=args.timeout)  # gloo on CPU; does nothing without torchrun
    world, rank = dist.world_size(), dist.rank()
    if args.logdir is not None:
        # Two launches into one --logdir both ran, interleaving their curves at the same steps.
        # Rank 0 alone writes there, so it alone takes the examples' lock; every rank learns
        # the answer, so that a refused launch ends on all of them rather than hanging.
        error = claim_logdir(args.logdir) if dist.is_rank_zero() else None
        refused = torch.tensor([float(error is not None)])
        if dist.all_reduce_tree({"refused": refused}, op="max")["refused"].item():
            refuse_launch(error, world)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Ranks initialise differently: init_state broadcasts rank 0's.
    torch.manual_seed((args.seed + rank) % 2**63)
    train, test = load()
    model, params, _ = ft.functionalize(make_model(args.hidden))

    def loss_fn(params: Any, batch: Batch) -> ft.LossOutput:
        logits = model(params, batch["x"])
        accuracy = (logits.argmax(-1) == batch["y"]).float().mean()
        return ft.LossOutput(
            torch.nn.functional.cross_entropy(logits, batch["y"]), aux={"accuracy": accuracy}
        )

    def dp_loss_fn(params: Any, batch: Batch) -> torch.Tensor:
        # A DP step reports no aux metrics: the loss alone, per example under vmap.
        return torch.nn.functional.cross_entropy(model(params, batch["x"]), batch["y"])

    warmup = min(20, args.steps - 1)  # the warmup must end before the decay
    schedule = ft.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps)
    local_batch = args.batch_size // world
    sample_rate = args.batch_size / N_TRAIN  # global expected batch = q × training images
    shard = not args.no_shard
    if args.dp:
        noisy_mean = ft.dp_noisy_mean(
            args.clip,
            args.noise_multiplier,
            expected_batch_size=sample_rate * N_TRAIN,  # global, not this rank's
            seed=args.seed,  # the same on every rank: the noise is drawn once, identically
        )
        tx = ft.chain(noisy_mean, ft.adamw(schedule, weight_decay=1e-4))
        step = dist.make_data_parallel_train_step(
            dp_loss_fn,
            tx,
            per_example_clip=args.clip,
            shard_optimizer=shard,  # each rank draws its pieces' slice of the noise
            micro_batches=args.micro_batches,
        )
        data = poisson_batches(train, sample_rate, args.seed)
    else:
        tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(schedule, weight_decay=1e-4))
        step = dist.make_data_parallel_train_step(
            loss_fn,
            tx,
            shard_optimizer=shard,
            micro_batches=args.micro_batches,
            # Default decay 0.99: B_simple is a ratio of moving averages (the bias cancels).
            grad_stats=ft.noise_scale_hook() if args.noise_scale else None,
        )
        data = batches(train, local_batch, args.seed)
    state = step.init_state(params)

    mine = dist.optimizer_state_bytes(state.opt_state)
    whole = dist.optimizer_state_bytes(tx.init(state.params))
    per_rank = dist.all_reduce_tree({"b": torch.tensor([float(mine)])}, op="max")["b"]
    writer = None
    if args.logdir is not None:
        writer = ft.logging.rank_zero_only(lambda: ft.logging.TensorBoardWriter(args.logdir))
    accountant = ft.RDPAccountant() if args.dp and dist.is_rank_zero() else None
    epoch_steps = steps_per_epoch(args, world)
    epsilon = float("nan")
    if dist.is_rank_zero():
        print(
            f"world size {world}, {'sharded' if shard else 'whole'} optimizer state: "
            f"{int(per_rank.item())} bytes on the largest rank, {whole} unsharded "
            f"({per_rank.item() / whole:.2f} of it)",
            flush=True,
        )
        if args.dp:
            print(
                f"DP-SGD: q={sample_rate:.4f} (expected global batch {args.batch_size}), "
                f"C={args.clip}, sigma={args.noise_multiplier}, {args.epochs} epochs of "
                f"{epoch_steps} steps",
                flush=True,
            )

    first_loss = last_loss = b_simple = float("nan")
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = step(state, next(data))
        scalars = ft.metric_tags(metrics)
        if accountant is not None:  # rank 0 only: the ranks' steps are one global step
            accountant.step(noise_multiplier=args.noise_multiplier, sample_rate=sample_rate)
            if (i + 1) % epoch_steps == 0:
                epsilon = accountant.get_epsilon(args.delta)
                scalars["dp/epsilon"] = epsilon
        if writer is not None:  # the tags and steps (1, 2, ...) that ft.train_loop writes
            writer.write_scalars(i + 1, scalars)
        if i == 0:
            first_loss = float(metrics["loss"])
        if args.noise_scale and i == args.steps - 1:  # one host read, at the end
            b_simple = float(metrics["noise_scale/b_simple"])
        if i % 20 == 0 or i == args.steps - 1:
            last_loss = float(metrics["loss"])
            if dist.is_rank_zero():
                shown = "accuracy" if "accuracy" in metrics else "clipped_fraction"
                print(
                    f"step {i + 1:4d}  loss {last_loss:.4f}  {shown} "
                    f"{float(metrics[shown]):.3f}  global batch {int(metrics['num_examples'])}",
                    flush=True,
                )
    elapsed = time.perf_counter() - start

    # Test accuracy: each rank evaluates its shard; sums and counts are reduced.
    evaluate = ft.make_eval_step(loss_fn)
    mine_test = dist.shard_batch(test)
    m = evaluate(state, mine_test)
    n = torch.tensor(float(len(mine_test["y"])))
    totals = dist.all_reduce_tree({"correct": m["accuracy"] * n, "n": n})
    test_accuracy = float(totals["correct"] / totals["n"])

    if args.checkpoint is not None:
        full = step.full_state(state)  # a collective: every rank takes part
        if dist.is_rank_zero():
            ft.checkpoint.save(args.checkpoint, full)
    if writer is not None:
        writer.close()
    if dist.is_rank_zero():
        print(
            f"final: first_loss={first_loss:.4f} last_loss={last_loss:.4f} "
            f"test_accuracy={test_accuracy:.3f} steps={args.steps} seconds={elapsed:.1f}",
            flush=True,
        )
        if accountant is not None:
            print(
                f"DP-SGD: (epsilon, delta) = ({epsilon:.4f}, {args.delta:g}) after {args.steps} "
                f"steps at q={sample_rate:.6f}, sigma={args.noise_multiplier} (RDP)",
                flush=True,
            )
        if args.noise_scale:
            print(noise_scale_summary(b_simple, args.batch_size), flush=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
