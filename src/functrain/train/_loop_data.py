"""Batches for :func:`~functrain.train_loop`: in-memory mini-batches, epoch order, device moves."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import optree
import torch

from functrain import tree

__all__ = ["TensorBatches"]


class TensorBatches:
    """Mini-batches of an in-memory pytree of tensors, reshuffled each epoch from a seed.

    The order of epoch ``e`` is a permutation drawn from ``seed`` and ``e`` only, so it is the
    same in a resumed run (``train_loop`` calls :meth:`set_epoch`). Much cheaper than a
    ``DataLoader`` for data that fits in memory: a batch is one indexing operation per leaf.

    Args:
        data: a pytree of tensors sharing their leading dimension (e.g. ``{"x": X, "y": y}``).
        batch_size: examples per batch.
        shuffle: draw a new order every epoch (else the data order).
        seed: the shuffling seed.
        drop_last: drop the last incomplete batch (keeps every step's batch size the same).

    Example:
        >>> import torch, functrain as ft
        >>> batches = ft.TensorBatches({"x": torch.arange(5)}, 2, seed=0, drop_last=False)
        >>> batches.set_epoch(1)
        >>> len(batches), [b["x"].tolist() for b in batches]
        (3, [[2, 0], [1, 3], [4]])
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        leaves = tree.leaves(data)
        if not leaves or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in leaves):
            raise TypeError("data must be a pytree of tensors with a leading batch dimension")
        sizes = {x.shape[0] for x in leaves}
        if len(sizes) != 1:
            raise ValueError(f"data leaves have different leading sizes {sorted(sizes)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.data = data
        self.num_examples = sizes.pop()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[Any]:
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch: int) -> Iterator[Any]:
        """The batches of ``epoch`` (whatever :meth:`set_epoch` selected)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            order = torch.randperm(self.num_examples, generator=gen)
        else:
            order = torch.arange(self.num_examples)
        order = order.to(tree.leaves(self.data)[0].device)  # index on the data's device
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield optree.tree_map(lambda x, idx=idx: x[idx.to(x.device)], self.data)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63 - 1)


def to_device(batch: Any, device: torch.device) -> Any:
    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.device != device:
            # From pinned memory (DataLoader(pin_memory=True)) the copy overlaps with compute.
            return x.to(device, non_blocking=True)
        return x

    return optree.tree_map(move, batch)


def leading_size(batch: Any) -> int:
    for leaf in optree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 0


def epoch_iterable(batches: Any, epoch: int, seed: int) -> Iterable[Any]:
    """The batches of ``epoch``, in an order that depends only on (``seed``, ``epoch``).

    ``batches`` is an iterable or a function ``epoch -> iterable``. What the function returns
    gets the same treatment as an iterable (``set_epoch``, reseeding, the warning), so that a
    loader it builds afresh each epoch (as a resumed process does) keeps a reproducible order,
    except that a generator the function seeded itself keeps its seed (that choice of order
    is the function's to make), with a warning if it has drawn since it was seeded.
    """
    from_function = callable(batches) and not hasattr(batches, "__iter__")
    if from_function:
        batches = batches(epoch)
    if hasattr(batches, "set_epoch"):
        batches.set_epoch(epoch)
    if isinstance(batches, torch.utils.data.DataLoader):
        # The order may come from the sampler or from a batch_sampler's own sampler
        # (DataLoader(batch_sampler=BatchSampler(RandomSampler(ds, generator=g), ...)), whose
        # generator the loader does not know: reseed and set the epoch of every one of them.
        batch_sampler = batches.batch_sampler
        samplers = {
            id(s): s
            for s in (batches.sampler, batch_sampler, getattr(batch_sampler, "sampler", None))
            if s is not None
        }
        for s in samplers.values():
            if hasattr(s, "set_epoch"):  # DistributedSampler
                s.set_epoch(epoch)
        generators = {id(batches.generator): batches.generator}
        generators.update((id(g), g) for s in samplers.values() if (g := _generator(s)))
        generators.pop(id(None), None)
        for g in generators.values():
            chosen = _function_seed(g, seed, epoch) if from_function else None
            if chosen is None:
                g.manual_seed(epoch_seed(seed, epoch))
            elif chosen == "drawn":
                warnings.warn(
                    "train_loop: the batches function returned a DataLoader whose generator it "
                    "seeded once and that has drawn since, so a resumed run sees a different "
                    "data order; seed it in the function from the epoch "
                    "(torch.Generator().manual_seed(epoch)) or leave it unseeded "
                    "(torch.Generator()) and train_loop seeds it from (seed, epoch)",
                    stacklevel=3,
                )
        if any(
            isinstance(s, torch.utils.data.RandomSampler) and s.generator is None
            for s in samplers.values()
        ):
            warnings.warn(
                "train_loop: this DataLoader shuffles with the global random generator, so a "
                "resumed run sees a different data order; pass generator=torch.Generator() to "
                "the DataLoader (or to its RandomSampler) and train_loop reseeds it each epoch "
                "from (seed, epoch)",
                stacklevel=3,
            )
    return batches


# The seed of a generator nobody seeded (torch.Generator() starts from it).
_DEFAULT_SEED = torch.Generator().initial_seed()


def _function_seed(g: torch.Generator, seed: int, epoch: int) -> str | None:
    """Who chose the seed of ``g``, a generator of what ``batches(epoch)`` returned.

    ``None``: the loop (torch's default seed, or the loop's own seed of the previous epoch,
    for a loader the function returns every epoch). ``"fresh"``: the function, which has
    just seeded it. ``"drawn"``: the function, but ``g`` has drawn since (seeded once and
    shared by every epoch), so its stream continues where a resumed process restarts it.
    """
    initial = g.initial_seed()
    if initial == _DEFAULT_SEED or (epoch > 0 and initial == epoch_seed(seed, epoch - 1)):
        return None
    fresh = torch.Generator(device=g.device).manual_seed(initial)
    return "fresh" if torch.equal(g.get_state(), fresh.get_state()) else "drawn"


def _generator(sampler: Any) -> torch.Generator | None:
    g = getattr(sampler, "generator", None)
    return g if isinstance(g, torch.Generator) else None


def length_of(iterable: Any) -> int | None:
    if isinstance(iterable, torch.utils.data.DataLoader) and isinstance(
        iterable.dataset, torch.utils.data.IterableDataset
    ):
        return None  # len() of an iterable-style loader is only an estimate
    try:
        return len(iterable)
    except TypeError:
        return None
