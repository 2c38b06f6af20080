"""Poisson sampling of batches, the sampling DP-SGD's privacy accounting assumes."""

from __future__ import annotations

import numbers
import sys
from collections.abc import Iterator

import torch

__all__ = ["PoissonSampler"]


class PoissonSampler:
    """Batches in which each example is present independently with probability ``sample_rate``.

    The privacy analysis of DP-SGD (:class:`RDPAccountant`, Opacus, TensorFlow Privacy)
    amplifies privacy by this sampling: shuffled fixed-size batches do not give the reported
    ``ε``. Batch sizes vary around ``sample_rate · num_examples`` (binomially); a batch may be
    empty, and a DP step must still run on it (the noise of a zero sum): normalize with the
    *expected* batch size (:func:`dp_noisy_mean`).

    Each iteration yields lists of example indices in increasing order, so it serves as a
    ``torch.utils.data.DataLoader(dataset, batch_sampler=sampler)`` (give that loader a
    ``collate_fn`` that handles an empty list) or to index tensors directly (``x[idx]``).

    Args:
        num_examples: the dataset size ``N`` (> 0).
        sample_rate: ``q`` in ``(0, 1]``; the expected batch size is ``q·N``.
        steps: batches per iteration over the sampler (default ``round(1/q)``, an epoch in
            expectation; Opacus' ``UniformWithReplacementSampler`` truncates, ``int(1/q)``).
        generator: the ``torch.Generator`` to draw from (default: the global CPU generator);
            the draws are made on its device. Each iteration continues its stream, so
            iterating again gives new batches: seed a fresh generator to replay a run.

    Example:
        >>> import torch, functrain as ft
        >>> sampler = ft.PoissonSampler(1000, 0.05, generator=torch.Generator().manual_seed(0))
        >>> len(sampler), sampler.expected_batch_size
        (20, 50.0)
        >>> sizes = [len(idx) for idx in sampler]
        >>> len(sizes), 30 < sum(sizes) / len(sizes) < 70
        (20, True)
    """

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        # numbers.Integral / numbers.Real: NumPy scalars (len of an array, a computed rate) too.
        if (
            isinstance(num_examples, bool)
            or not isinstance(num_examples, numbers.Integral)
            or num_examples < 1
        ):
            raise ValueError(f"num_examples must be an int >= 1, got {num_examples!r}")
        if (
            isinstance(sample_rate, bool)
            or not isinstance(sample_rate, numbers.Real)
            or not 0 < sample_rate <= 1
        ):
            raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        # A Python float from here on: NumPy float16/float32 scalars warned on overflow in
        # ``1/q`` (and float16 in comparing with sys.maxsize), an error under ``-W error``.
        rate = float(sample_rate)
        if steps is None:
            if not 1 / rate < sys.maxsize:  # len() must fit an index-sized int
                raise ValueError(
                    f"sample_rate={sample_rate!r} is too small for the default steps "
                    "(round(1/sample_rate)): pass steps"
                )
            steps = max(1, round(1 / rate))
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.num_examples = int(num_examples)
        self.sample_rate = rate
        self.steps = int(steps)
        self.generator = generator

    @property
    def expected_batch_size(self) -> float:
        """``q·N``: the normalization of the DP-SGD mean."""
        return self.sample_rate * self.num_examples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            draws = torch.rand(
                self.num_examples,
                generator=self.generator,
                dtype=torch.float64,
                device=None if self.generator is None else self.generator.device,
            )
            yield torch.nonzero(draws < self.sample_rate).flatten().tolist()

    def __repr__(self) -> str:
        return (
            f"PoissonSampler(num_examples={self.num_examples}, sample_rate={self.sample_rate}, "
            f"steps={self.steps})"
        )
