"""Data-parallel digits classifier: functrain on ``torch.distributed``, launched with torchrun.

Run on CPU with two processes (gloo)::

    torchrun --nproc_per_node=2 examples/digits_ddp.py
    torchrun --nproc_per_node=2 examples/digits_ddp.py --fast          # a quick check (CI)
    torchrun --nproc_per_node=2 examples/digits_ddp.py --no-shard      # whole optimizer state

Each rank trains on its shard of every epoch (``dist.shard_indices``), the gradients of the
ranks are combined into the exact gradient of the global batch, the optimizer state is sharded
across ranks (ZeRO-1: each rank keeps about half of AdamW's moments), and only rank 0 prints,
writes TensorBoard events (``--logdir``: the ``train/*`` tags of ``ft.train_loop``, at steps 1,
2, ...) and saves the checkpoint (``--checkpoint``).
Without torchrun (``python examples/digits_ddp.py``) the same script runs as one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from sklearn.datasets import load_digits

import functrain as ft
from functrain import distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

N_TEST = 300
N_TRAIN = 1797 - N_TEST  # scikit-learn's digits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    positive_int, positive_float = _common.positive_int, _common.positive_float
    parser.add_argument("--steps", type=positive_int, default=400, help="optimizer steps")
    parser.add_argument("--fast", action="store_true", help="a short run (40 steps) for CI")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="global batch size")
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument("--hidden", type=positive_int, default=64)
    parser.add_argument("--no-shard", action="store_true", help="keep the whole optimizer state")
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
    if args.fast:
        args.steps = min(args.steps, 40)
    return args


def load() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return {"x": x[N_TEST:], "y": y[N_TEST:]}, {"x": x[:N_TEST], "y": y[:N_TEST]}


def batches(train: dict[str, torch.Tensor], local_batch: int):
    """This rank's batches, epoch after epoch: its shard of each epoch's permutation."""
    epoch = 0
    n = len(train["y"])
    while True:
        # drop_last: equal shards, so every rank takes the same number of steps per epoch.
        indices = dist.shard_indices(n, shuffle=True, seed=0, epoch=epoch, drop_last=True)
        for start in range(0, len(indices) - local_batch + 1, local_batch):
            idx = indices[start : start + local_batch]
            yield {"x": train["x"][idx], "y": train["y"][idx]}
        epoch += 1


def main() -> None:
    args = parse_args()
    dist.init(timeout=args.timeout)  # gloo on CPU; does nothing without torchrun
    world, rank = dist.world_size(), dist.rank()
    torch.manual_seed(rank)  # ranks initialise differently: init_state broadcasts rank 0's
    train, test = load()

    model, params, _ = ft.functionalize(
        torch.nn.Sequential(
            torch.nn.Linear(64, args.hidden), torch.nn.ReLU(), torch.nn.Linear(args.hidden, 10)
        )
    )

    def loss_fn(params, batch):
        logits = model(params, batch["x"])
        accuracy = (logits.argmax(-1) == batch["y"]).float().mean()
        return ft.LossOutput(
            torch.nn.functional.cross_entropy(logits, batch["y"]), aux={"accuracy": accuracy}
        )

    warmup = min(20, args.steps - 1)  # the warmup must end before the decay
    schedule = ft.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps)
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(schedule, weight_decay=1e-4))
    step = dist.make_data_parallel_train_step(loss_fn, tx, shard_optimizer=not args.no_shard)
    state = step.init_state(params)

    mine = dist.optimizer_state_bytes(state.opt_state)
    whole = dist.optimizer_state_bytes(tx.init(state.params))
    per_rank = dist.all_reduce_tree({"b": torch.tensor([float(mine)])}, op="max")["b"]
    writer = None
    if args.logdir is not None:
        writer = ft.logging.rank_zero_only(lambda: ft.logging.TensorBoardWriter(args.logdir))
    if dist.is_rank_zero():
        print(
            f"world size {world}, {'sharded' if not args.no_shard else 'whole'} optimizer state: "
            f"{int(per_rank.item())} bytes on the largest rank, {whole} unsharded "
            f"({per_rank.item() / whole:.2f} of it)",
            flush=True,
        )

    local_batch = args.batch_size // world
    data = batches(train, local_batch)
    first_loss = last_loss = float("nan")
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = step(state, next(data))
        if writer is not None:  # the tags and steps (1, 2, ...) that ft.train_loop writes
            writer.write_scalars(i + 1, ft.metric_tags(metrics))
        if i == 0:
            first_loss = float(metrics["loss"])
        if i % 20 == 0 or i == args.steps - 1:
            last_loss = float(metrics["loss"])
            if dist.is_rank_zero():
                print(
                    f"step {i + 1:4d}  loss {last_loss:.4f}  accuracy "
                    f"{float(metrics['accuracy']):.3f}  global batch {int(metrics['num_examples'])}",
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
    dist.shutdown()


if __name__ == "__main__":
    main()
