"""A small causal transformer language model on text that ships with Python.

The corpus is the docstrings of a few dozen standard-library modules (what ``help()`` shows),
cut into paragraphs: sequences of different lengths, right-padded into a batch. The loss is
token-weighted: ``ft.LossSum(total=sum of token losses, count=number of real tokens)``, so the
step divides the summed loss of all K=4 micro-batches by the batch's real token count — the
exact token mean, however the padding falls between micro-batches (averaging per-micro-batch
means, the classic accumulation bug, would weight tokens of short micro-batches more).

``--optimizer`` picks the update rule (all after clipping the global gradient norm to 1):

- ``adamw`` (default): AdamW with a linear warmup and a cosine decay of ``--lr`` (3e-3).
- ``muon``: ``ft.muon``, Keller Jordan's recipe: Muon (orthogonalized momentum) for the
  attention and MLP matrices, AdamW for the token embedding (also the tied output head), the
  positions and every vector; same schedule; ``--lr`` default 2e-2 (the best of 3e-3, 1e-2,
  2e-2 and 4e-2 over 150 steps; the AdamW group shares it).
- ``schedule_free``: ``ft.schedule_free_adamw`` with a linear warmup and no decay (it needs
  none); evaluation and the text sample use the averaged parameters
  ``ft.schedule_free_eval_params``, not the ones the gradients are taken at.

TensorBoard gets the default metrics, including ``perf/tokens_per_s``, and a text sample.

    python examples/char_lm.py            # about a minute on a laptop CPU
    python examples/char_lm.py --fast     # a few steps (CI)
    python examples/char_lm.py --optimizer muon
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain.logging import AsyncWriter, ConsoleWriter, MultiWriter, TensorBoardWriter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

MODULES = [
    "argparse",
    "abc",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "enum",
    "functools",
    "heapq",
    "inspect",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "pprint",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "typing",
    "unittest",
    "zipfile",
]
PAD = 0
HEADS = 4
MIN_LENGTH = 16  # paragraphs' tails shorter than this are dropped
OPTIMIZERS = ("adamw", "muon", "schedule_free")
DEFAULT_LR = {"adamw": 3e-3, "muon": 2e-2, "schedule_free": 3e-3}


def corpus() -> str:
    """The docstrings of ``MODULES`` and of their public functions, classes and methods."""
    docs = []
    with warnings.catch_warnings():
        # Reading typing.io / typing.re warns on Python 3.11; their docstrings are still text.
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in MODULES:
            module = importlib.import_module(name)
            docs.append(inspect.getdoc(module) or "")
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                    continue
                docs.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    for method_name, method in sorted(vars(obj).items()):
                        if inspect.isfunction(method) and not method_name.startswith("_"):
                            docs.append(inspect.getdoc(method) or "")
    return "\n\n".join(d for d in docs if d)


class Vocab:
    """Characters to ids; id 0 is padding, unknown characters read as ``?``."""

    def __init__(self, text: str) -> None:
        self.chars = sorted({c for c in text if c == "\n" or 32 <= ord(c) < 127})
        self.ids = {c: i + 1 for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(c, self.ids["?"]) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 1] for i in ids if i != PAD)


def sequences(text: str, vocab: Vocab, length: int, min_length: int = MIN_LENGTH) -> torch.Tensor:
    """Paragraphs cut into pieces of at most ``length`` characters, right-padded with ``PAD``."""
    rows = []
    for paragraph in text.split("\n\n"):
        for start in range(0, len(paragraph), length):
            piece = paragraph[start : start + length]
            if len(piece) >= min_length:
                rows.append(vocab.encode(piece) + [PAD] * (length - len(piece)))
    return torch.tensor(rows, dtype=torch.long)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        # Causal attention: a real token never sees the padding to its right.
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, length: int, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # it is also the output layer: small logits
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied: ft.functionalize keeps one tensor

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def make_loss(model: ft.FunctionalModel):
    def loss_fn(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> ft.LossSum:
        ids = batch["ids"]
        logits = model(params, ids[:, :-1])
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == PAD, -100)
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        return ft.LossSum(total=total, count=(targets != -100).sum())

    return loss_fn


def muon_dims(params: dict[str, torch.Tensor]) -> dict[str, ft.MuonDimensionNumbers | None]:
    """Muon for the blocks' matrices (``(out, in)`` Linear weights); ``None``: AdamW.

    The embedding (the tied output head) and the positions are matrices too, but Muon's
    orthogonalization suits hidden layers only: their rows are looked-up vectors, as in Keller
    Jordan's recipe they stay with AdamW.
    """
    return {
        name: ft.MuonDimensionNumbers() if name.startswith("blocks.") and p.dim() == 2 else None
        for name, p in params.items()
    }


def make_optimizer(
    name: str, lr: float, steps: int, params: dict[str, torch.Tensor]
) -> ft.GradientTransformation:
    """``clip_by_global_norm(1)`` then the ``--optimizer``, its learning rate in the state."""
    warmup = min(max(1, steps // 20), steps - 1)  # the warmup must end before the decay
    if name == "schedule_free":
        # No decay: schedule-free averaging replaces it. (warmup_steps must be positive.)
        inner = ft.inject_hyperparams(ft.schedule_free_adamw)(
            learning_rate=lr, warmup_steps=max(warmup, 1), weight_decay=0.01
        )
        return ft.chain(ft.clip_by_global_norm(1.0), inner)
    schedule = ft.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=steps, end_value=lr / 20
    )
    if name == "muon":
        inner = ft.inject_hyperparams(ft.muon, static_args=("muon_weight_dimension_numbers",))(
            learning_rate=schedule,
            weight_decay=0.01,
            adam_weight_decay=0.01,
            muon_weight_dimension_numbers=muon_dims(params),
        )
    else:
        inner = ft.inject_hyperparams(ft.adamw)(learning_rate=schedule, weight_decay=0.01)
    return ft.chain(ft.clip_by_global_norm(1.0), inner)


def eval_params(optimizer: str, state: ft.TrainState) -> dict[str, torch.Tensor]:
    """The parameters to evaluate and sample at: schedule-free's average ``x``, else ``params``."""
    if optimizer != "schedule_free":
        return state.params
    # opt_state is (clip's state, inject_hyperparams' state around the ScheduleFreeState).
    return ft.schedule_free_eval_params(state.opt_state[1].inner_state, state.params)


@torch.no_grad()
def sample(model, params, vocab: Vocab, prompt: str, length: int, n: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    device = next(iter(params.values())).device
    ids = vocab.encode(prompt)
    for _ in range(n):
        context = torch.tensor([ids[-(length - 1) :]], device=device)
        logits = model(params, context)[0, -1, 1:].float().cpu()  # never sample padding
        ids.append(1 + int(torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=gen)))
    return vocab.decode(ids)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few steps, for CI")
    parser.add_argument(
        "--logdir", type=_common.logdir, help="run directory (default: runs/char_lm/<timestamp>)"
    )
    positive_int, positive_float = _common.positive_int, _common.positive_float
    parser.add_argument("--steps", type=positive_int, help="default: 600 (fast: 25)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--micro-batches", type=positive_int, default=4)
    parser.add_argument("--length", type=positive_int, default=64, help="characters per sequence")
    parser.add_argument("--dim", type=positive_int, default=96, help=f"a multiple of {HEADS}")
    parser.add_argument("--layers", type=positive_int, default=2)
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="adamw: AdamW, warmup and cosine decay; muon: Muon for the blocks' matrices, "
        "AdamW for the embedding, positions and vectors, same schedule; schedule_free: "
        "schedule-free AdamW (warmup, no decay), evaluated at its averaged parameters",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        help=f"peak learning rate (default: {DEFAULT_LR['adamw']:g} for adamw and "
        f"schedule_free, {DEFAULT_LR['muon']:g} for muon)",
    )
    parser.add_argument("--seed", type=_common.seed, default=0)
    parser.add_argument("--device", type=_common.device, default=_common.default_device())
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="CPU threads (1 is fastest for this small model)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.length < MIN_LENGTH:
        parser.error(f"--length must be >= {MIN_LENGTH}: shorter pieces of text are dropped")
    if args.dim % HEADS:
        parser.error(f"--dim must be a multiple of the {HEADS} attention heads, got {args.dim}")
    if args.micro_batches > args.batch_size:
        parser.error("--micro-batches must be <= --batch-size")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = args.steps or (25 if args.fast else 600)
    torch.set_num_threads(args.threads)
    text = corpus()
    vocab = Vocab(text)
    data = sequences(text, vocab, args.length + 1)  # +1: inputs and shifted targets
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    n_eval = len(data) // 10
    eval_ids, train_ids = data[order[:n_eval]].to(args.device), data[order[n_eval:]]
    train_ids = train_ids.to(args.device)

    torch.manual_seed(args.seed)
    net = CharTransformer(len(vocab), args.length, args.dim, heads=HEADS, layers=args.layers)
    model, params, _ = ft.functionalize(net.to(args.device))
    loss_fn = make_loss(model)
    tx = make_optimizer(args.optimizer, args.lr, steps, params)
    step = ft.make_train_step(loss_fn, tx, micro_batches=args.micro_batches)
    state = ft.TrainState.create(params=params, tx=tx, seed=args.seed)
    batches = ft.TensorBatches({"ids": train_ids}, args.batch_size, seed=args.seed)
    if len(batches) == 0:  # the last partial batch is dropped: an epoch would be empty
        sys.exit(f"error: --batch-size {args.batch_size} > {len(train_ids)} training sequences")
    eval_batches = list(ft.TensorBatches({"ids": eval_ids}, 256, shuffle=False, drop_last=False))
    evaluate = ft.make_eval_step(loss_fn)

    def eval_step(state: ft.TrainState, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return evaluate(state.replace(params=eval_params(args.optimizer, state)), batch)

    logdir = args.logdir or _common.run_dir(os.path.join("runs", "char_lm"))
    if _common.holds_a_run(logdir):  # no checkpoints to resume: a rerun would mix two runs
        sys.exit(f"error: {logdir} already holds a run; choose a new --logdir")
    if (error := _common.claim_logdir(logdir)) is not None:
        sys.exit(f"error: {error}")
    _common.print_logdir(logdir, "runs" if args.logdir is None else logdir)
    real = int((train_ids[:, 1:] != PAD).sum())
    print(
        f"char_lm: {len(text):,} characters of docstrings, vocabulary {len(vocab)}, "
        f"{len(train_ids)} train / {len(eval_ids)} eval sequences of <= {args.length} tokens "
        f"({real / train_ids[:, 1:].numel():.0%} real, the rest padding), "
        f"{sum(p.numel() for p in params.values()):,} parameters"
    )
    writers = [TensorBoardWriter(logdir)]
    if not args.no_progress:
        writers.append(ConsoleWriter(total_steps=steps, keys=["train/loss", "train/lr"]))
    start = time.perf_counter()
    with AsyncWriter(MultiWriter(writers), max_delay_s=0.5) as writer:
        writer.write_hparams(
            {
                "dim": args.dim,
                "layers": args.layers,
                "lr": args.lr,
                "batch": args.batch_size,
                "optimizer": args.optimizer,
            },
            {"eval/loss": None},
        )
        result = ft.train_loop(
            step,
            state,
            batches,
            epochs=-(-steps // len(batches)),
            max_steps=steps,
            eval_step=eval_step,
            eval_batches=eval_batches,
            eval_every=max(steps // 4, 1),
            writer=writer,
            catch_interrupt=True,
        )
        final = eval_params(args.optimizer, result.state)
        text_sample = sample(model, final, vocab, "Return the ", args.length, 200, 0)
        writer.write_text(int(result.state.step), {"sample": f"```\n{text_sample}\n```"})
    elapsed = time.perf_counter() - start
    if result.interrupted:  # no checkpoints here: the curves so far are in TensorBoard
        print(f"interrupted at step {int(result.state.step)} of {steps}")
        return 130
    history = result.history
    losses = history.values("train/loss")
    tokens_per_s = history.values("perf/tokens_per_s")
    print(
        f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} nats/token, eval loss "
        f"{history.last('eval/loss'):.3f}, {sum(tokens_per_s) / len(tokens_per_s):,.0f} "
        f"tokens/s, {int(result.state.step)} steps in {elapsed:.1f} s"
    )
    print("sample:\n" + text_sample)
    return 0


if __name__ == "__main__":
    _common.run_as_script(main)
