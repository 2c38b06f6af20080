"""Resuming a torch.optim run in functrain, from its checkpoint, without losing the optimizer.

An MLP on scikit-learn's 8x8 digits trains with ``torch.optim.AdamW`` for ``--torch-steps``
steps, and saves the checkpoint a torch script keeps (``model.state_dict()`` and
``optimizer.state_dict()``, with ``torch.save``). Three runs then continue from that file on
the same batches for ``--steps`` more steps:

* ``torch``: the torch script itself, reloaded (the reference);
* ``functrain``: ``ft.functionalize`` of the reloaded model and
  ``ft.opt_state_from_torch`` of the optimizer's state dict, then ``make_train_step``;
* ``functrain_fresh_moments``: the same step from ``tx.init(params)``, what switching libraries
  mid-run did before: Adam's moments and bias correction start again from zero.

Everything runs in float64, so the ``functrain`` run can be held to the torch run's numbers.
TensorBoard gets one run per line (``train/loss``, ``test/loss``), with the torch phase in the
``torch`` run.

    python examples/resume_from_torch.py          # seconds on a laptop CPU
    python examples/resume_from_torch.py --fast   # a few steps (CI)
    tensorboard --logdir runs/resume_from_torch

Exits with status 1 when the resumed functrain run leaves the torch run's parameters by more
than 1e-9 (relative).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F

import functrain as ft
from functrain.logging import TensorBoardWriter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

TOLERANCE = 1e-9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few steps, for CI")
    parser.add_argument(
        "--logdir",
        type=_common.logdir,
        help="run directory (default: runs/resume_from_torch/<time>)",
    )
    positive_int, positive_float = _common.positive_int, _common.positive_float
    parser.add_argument("--torch-steps", type=positive_int, help="default: 300 (fast: 20)")
    parser.add_argument("--steps", type=positive_int, help="resumed steps (default: 200; fast: 10)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--seed", type=_common.seed, default=0)
    return parser.parse_args(argv)


def torch_step(net: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    """One step of the classic loop; returns the loss (a host read: this is the torch script)."""
    opt.zero_grad()
    loss = F.cross_entropy(net(batch["x"]), batch["y"])
    loss.backward()
    opt.step()
    return float(loss.detach())


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch_steps = args.torch_steps or (20 if args.fast else 300)
    steps = args.steps or (10 if args.fast else 200)
    torch.set_num_threads(1)
    data = {
        split: {"x": d["x"].double(), "y": d["y"]} for split, d in _common.load_digits().items()
    }
    train, test = data["train"], data["test"]
    epochs = ft.TensorBatches(train, args.batch_size, seed=args.seed)
    stream = (b for epoch in itertools.count() for b in epochs.iter_epoch(epoch))
    batches = list(itertools.islice(stream, torch_steps + steps))

    logdir = args.logdir or _common.run_dir(os.path.join("runs", "resume_from_torch"))
    if (error := _common.claim_logdir(logdir)) is not None:
        sys.exit(f"error: {error}")
    names = ("torch", "functrain", "functrain_fresh_moments")
    writers = {name: TensorBoardWriter(os.path.join(logdir, name)) for name in names}
    _common.print_logdir(
        logdir, logdir if args.logdir else os.path.join("runs", "resume_from_torch")
    )

    def hyper(**more: Any) -> dict[str, Any]:
        return {"lr": args.lr, "weight_decay": args.weight_decay, **more}

    # Phase 1: the torch script, then its checkpoint file.
    net = _common.digits_mlp(seed=args.seed).double()
    opt = torch.optim.AdamW(net.parameters(), **hyper())
    for i, batch in enumerate(batches[:torch_steps], start=1):
        writers["torch"].write_scalars(i, {"train/loss": torch_step(net, opt, batch)})
    path = os.path.join(logdir, "torch_checkpoint.pt")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, path)
    print(f"torch.optim.AdamW: {torch_steps} steps, checkpoint {path}")

    # Phase 2a: the torch script resumes from the file.
    checkpoint = torch.load(path, weights_only=True)
    net = _common.digits_mlp(seed=args.seed).double()
    net.load_state_dict(checkpoint["model"])
    opt = torch.optim.AdamW(net.parameters(), **hyper())
    opt.load_state_dict(checkpoint["optimizer"])

    # Phase 2b and 2c: functrain from the same file, with and without the optimizer's state.
    resumed = _common.digits_mlp(seed=args.seed).double()
    resumed.load_state_dict(checkpoint["model"])
    model, params, _ = ft.functionalize(resumed)

    def loss_fn(p: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(p, batch["x"]), batch["y"])

    tx = ft.adamw(args.lr, weight_decay=args.weight_decay)  # torch's AdamW defaults otherwise
    opt_state = ft.opt_state_from_torch(tx, params, checkpoint["optimizer"])
    resumed_at = torch.tensor(torch_steps)  # the state's step counts on from torch's
    states = {
        "functrain": ft.TrainState.create(params=params, tx=tx, seed=None).replace(
            step=resumed_at, opt_state=opt_state
        ),
        "functrain_fresh_moments": ft.TrainState.create(params=params, tx=tx, seed=None),
    }
    step = ft.make_train_step(loss_fn, tx)
    first: dict[str, list[float]] = {name: [] for name in names}
    for i, batch in enumerate(batches[torch_steps:], start=torch_steps + 1):
        losses = {"torch": torch.tensor(torch_step(net, opt, batch))}
        for name, state in states.items():
            states[name], metrics = step(state, batch)
            losses[name] = metrics["loss"]
        for name, loss in losses.items():
            writers[name].write_scalars(i, {"train/loss": loss})
            if len(first[name]) < 5:
                first[name].append(float(loss))
    torch_params = {k: v.detach() for k, v in net.named_parameters()}
    final = {"torch": torch_params, **{name: s.params for name, s in states.items()}}
    print(f"resumed for {steps} steps; train loss at the first resumed steps:")
    for name in names:
        with torch.no_grad():
            test_loss = float(loss_fn(final[name], test))
            accuracy = float(
                (model(final[name], test["x"]).argmax(-1) == test["y"]).double().mean()
            )
        writers[name].write_scalars(torch_steps + steps, {"test/loss": test_loss})
        curve = " ".join(f"{v:.4f}" for v in first[name])
        print(f"  {name:>24}: {curve}  | test loss {test_loss:.4f}, accuracy {accuracy:.2%}")
    for writer in writers.values():
        writer.close()
    drift = max_relative_difference(final["functrain"], final["torch"])
    fresh = max_relative_difference(final["functrain_fresh_moments"], final["torch"])
    print(
        f"parameters after resuming, max relative difference from torch: {drift:.1e} "
        f"(fresh moments: {fresh:.1e})"
    )
    if drift > TOLERANCE:
        print("FAILED: the resumed functrain run left torch's trajectory", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    _common.run_as_script(main)
