"""``make_eval_step``: a batch's loss and aux metrics as a pure function, with no gradient work.

``eval_step(state, batch) -> metrics`` takes the same ``loss_fn`` forms as
:func:`~functrain.make_train_step` and combines micro-batches exactly in the same way (see
:mod:`functrain.train.combine`), under ``torch.no_grad`` and without consuming the state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from functrain import _func_transforms
from functrain.train import gradient, microbatch, rng
from functrain.train import loss as loss_lib
from functrain.train._step_checks import _check_state
from functrain.train.combine import Combiner, make_objective
from functrain.train.state import TrainState

__all__ = ["EvalStep", "make_eval_step"]


class EvalStep:
    """``eval_step(state, batch) -> metrics`` with no gradient work; see :func:`make_eval_step`.

    Example:
        >>> import torch, functrain as ft
        >>> loss_fn = lambda params, batch: ((batch["x"] * params["w"]).sum(-1) ** 2).mean()
        >>> eval_step = ft.make_eval_step(loss_fn)
        >>> state = ft.TrainState.create(params={"w": torch.ones(3)}, tx=ft.sgd(0.1))
        >>> eval_step(state, {"x": torch.ones(4, 3)})["loss"]
        tensor(9.)
    """

    def __init__(
        self, loss_fn: Callable[..., Any], micro_batches: int | Sequence[int], seed_rng: bool
    ) -> None:
        self.loss_fn = loss_fn
        self.micro_batches = micro_batches
        self.seed_rng = seed_rng
        self.accepted = loss_lib.accepted_inputs(loss_fn)
        self.metas: list[Any] = []
        self.objective = make_objective(loss_fn, self.accepted, self.metas)

    def __call__(self, state: TrainState, batch: Any) -> dict[str, torch.Tensor]:
        """Loss and aux metrics of ``batch`` (combined exactly over micro-batches)."""
        _check_state(state, "eval step")
        params, buffers, key = state.params, state.buffers, state.key
        split = microbatch.split_batch(batch, self.micro_batches)
        devices = gradient._devices(params)
        combiner = Combiner(split.total)
        # Under torch.func.grad/jvp the loss is differentiated (a validation loss in
        # meta-learning); torch.func respects an inner no_grad, which made it a constant.
        tracked = _func_transforms.differentiating()
        with contextlib.nullcontext() if tracked else torch.no_grad():
            for i, size in enumerate(split.sizes):
                mb = microbatch.micro_batch(batch, split, i)
                mb_key = None if key is None else rng.fold_in(key, i + 1)
                self.metas.clear()
                with gradient._seeding(mb_key, self.seed_rng, devices):
                    _, payload = self.objective(params, mb, buffers, mb_key)
                combiner.add(self.metas[-1], size, payload)
        return combiner.metrics(combiner.loss.device)  # type: ignore[union-attr]


def make_eval_step(
    loss_fn: Callable[..., Any],
    *,
    micro_batches: int | Sequence[int] = 1,
    seed_rng: bool = True,
) -> EvalStep:
    """Builds ``eval_step(state, batch) -> metrics``: the loss with no gradient work.

    Runs under ``torch.no_grad`` with the same ``loss_fn`` forms as :func:`make_train_step`
    (micro-batching bounds memory; the combination is exact). Under ``torch.func.grad``/``jvp``
    the metrics are differentiated instead (a validation loss in meta-learning). Buffers are read, never updated:
    buffers a loss returns are ignored, so use an eval-mode model (``model.eval()``) for
    BatchNorm's running statistics (and dropout off). The state is not consumed.

    Metrics: ``loss`` and the aux values (in the dtype ``loss_fn`` gave, summed in at least
    float32), ``num_examples`` (int64) and, for a :class:`~functrain.LossSum` loss,
    ``num_tokens`` (the summed counts, floating point as counts may be weights). Weighting each
    batch's values by these (``num_tokens`` for a ``LossSum`` loss) combines any split of an
    eval set into the metrics of the whole set, as :func:`functrain.train_loop` does.

    Args:
        loss_fn: the loss of one micro-batch, in any form :func:`make_train_step` accepts
            (optional ``buffers=`` / ``key=`` inputs; a mean loss, a ``LossSum`` or a
            ``LossOutput``); see :mod:`functrain.train.loss`.
        micro_batches: the number ``K`` of micro-batches or their sizes, as for
            :func:`make_train_step`; checked against each batch when the step is called.
        seed_rng: seed the global generators (CPU and the params' CUDA devices) from
            micro-batch ``i``'s key ``fold_in(state.key, i + 1)`` around its loss, restoring
            them afterwards, so randomness is reproducible; ignored for states without a key.

    Returns:
        An :class:`EvalStep`, ``eval_step(state, batch) -> metrics``: a ``dict[str, Tensor]``
        of the metrics above (``loss`` and ``num_examples`` 0-d, on the loss's device).
        ``state`` and ``batch`` are not modified, and ``state.key`` is not advanced.

    Raises:
        ValueError: an empty batch (leading size 0). Deliberately refused rather than answered
            with NaNs: the metric keys (aux, ``num_tokens``) are only known by running
            ``loss_fn``, which a model need not accept on zero rows (BatchNorm refuses them),
            and a mean over no examples has no value. Skip empty shards before calling.

    Example:
        >>> import torch, functrain as ft
        >>> evaluate = ft.make_eval_step(lambda p, b: (p["w"] * b).mean(), micro_batches=3)
        >>> state = ft.TrainState.create(params={"w": torch.tensor(2.0)}, tx=ft.sgd(0.1))
        >>> evaluate(state, torch.arange(7.0))["loss"]
        tensor(6.)
    """
    return EvalStep(loss_fn, micro_batches, seed_rng)
