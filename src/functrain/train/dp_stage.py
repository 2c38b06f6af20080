"""``make_train_step(..., per_example_clip=C)``: the gradient stage of a DP-SGD step.

Instead of the mean gradient, the step hands ``tx`` the sum of per-example gradients each
clipped to norm ``C``, ``Σᵢ clip(gᵢ, C)``, formed micro-batch by micro-batch with
:func:`functrain.clipped_grad_sum` (ghost clipping where it pays) and summed exactly; ``tx``
begins with :func:`functrain.dp_noisy_mean`, which adds the noise once per step and divides by
the *expected* batch size. So accumulation composes with DP-SGD: clip per example, sum across
micro-batches, noise once.

Batches from :class:`functrain.PoissonSampler` vary in size: a batch smaller than
``micro_batches`` is split into one micro-batch per example, and an empty batch (a leading
dimension of 0) gives a zero sum, so the step still adds the noise, as the accounting assumes.

Metrics: ``loss`` (the mean over the realized batch, in the dtype ``loss_fn`` returns; the
params' dtype for an empty batch), ``num_examples`` and ``clipped_fraction`` (at least
float32). Sums over micro-batches (losses, clipped gradients) are accumulated in at least
float32 and rounded once. The metrics are exact functions of the data, outside the DP guarantee
(see :mod:`functrain.grads.privacy`); the step reports no ``grad_norm`` (the norm of the sum
before noise), while ``update_norm`` and ``param_norm`` follow the noisy update. ``aux``
values and buffers returned in a ``LossOutput`` are not used (per-example gradients are
vmapped: pass eval-mode buffers with ``buffers=``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from functrain import _foreach, tree
from functrain._precision import accumulation_dtype
from functrain.grads import privacy
from functrain.grads.clipping import _check_number, clipped_grad_sum
from functrain.train import loss as loss_lib
from functrain.train import microbatch, rng
from functrain.train.gradient import GradResult, _seeding

__all__: list[str] = []  # internal: used by make_train_step


def check_options(
    l2_norm_clip: Any,
    *,
    tx: Any,
    micro_batches: Any,
    strategy: str,
    grad_stats: Any,
    loss_scale: Any,
    compile: Any,
    loss_fn: Callable[..., Any],
) -> None:
    """Refuses the step options a DP-SGD step cannot honour, naming them."""
    _check_number("per_example_clip", l2_norm_clip, minimum=0.0)
    conflicts = {
        "strategy='vmap'": strategy != "loop",
        "grad_stats": grad_stats is not None,  # statistics of the non-private gradients
        "loss_scale": loss_scale is not None,
        "compile": compile is not False,
        "micro_batches as sizes (Poisson batches vary in size: give a count)": not isinstance(
            micro_batches, int
        ),
        "a loss_fn with a key parameter (per-example gradients are vmapped: use global "
        "randomness, which the step seeds)": "key" in loss_lib.accepted_inputs(loss_fn),
    }
    bad = [name for name, present in conflicts.items() if present]
    if bad:
        raise ValueError(f"per_example_clip (a DP-SGD step) does not support {', '.join(bad)}")
    _check_tx(tx, l2_norm_clip)


_RECIPE = "chain(dp_noisy_mean(C, noise_multiplier, expected_batch_size, seed), <optimizer>)"


def _check_tx(tx: Any, l2_norm_clip: Any) -> None:
    """Refuses a ``tx`` that cannot make the step's clipped sum a DP-SGD update.

    The step hands ``tx`` the *sum* of the clipped per-example gradients; only
    :func:`functrain.dp_noisy_mean` applied first, with the same ``C``, adds noise calibrated to
    that sum's sensitivity. Any transform before it changes the sensitivity, and
    ``differentially_private_aggregate`` (``dpsgd``) expects per-example gradients. Wrappers
    are judged by :func:`functrain.grads.privacy.dp_members`: seen through
    (``apply_if_finite``, ``inject_hyperparams``), or refused where they break the noise's
    calibration (``MultiSteps``, ``masked``, ``partition`` around the noise).
    """
    try:
        # Guards (zero_nans) are the identity on the finite sums the noise is calibrated for.
        members = [m for m in privacy.dp_members(tx) if m[0] != "guard"]
    except ValueError as err:
        raise ValueError(f"per_example_clip: {err}") from None
    roles = [role for role, _ in members]
    if "aggregate" in roles:
        raise ValueError(
            "per_example_clip: tx contains differentially_private_aggregate (e.g. from "
            "ft.dpsgd), which clips per-example gradients, but this step hands tx their "
            f"clipped sum; use tx = {_RECIPE}"
        )
    if "noisy_mean" not in roles:
        warnings.warn(
            "per_example_clip: tx does not begin with dp_noisy_mean, so the step adds no "
            "noise (not DP-SGD) and tx receives the sum of the clipped per-example gradients, "
            f"not their mean; use tx = {_RECIPE} (noise_multiplier=0.0 to clip without "
            "noise). If a wrapper of your own hides a dp_noisy_mean, ignore this warning.",
            UserWarning,
            # _check_tx < check_options < TrainStep.__init__ < make_train_step < the caller.
            stacklevel=5,
        )
        return
    if roles[0] != "noisy_mean":
        raise ValueError(
            "per_example_clip: dp_noisy_mean must be the first transform of tx; a transform "
            "before it changes the clipped sum, whose sensitivity C the noise is calibrated to "
            f"(position {roles.index('noisy_mean')} of the chain); use tx = {_RECIPE}"
        )
    if roles.count("noisy_mean") > 1:
        raise ValueError(
            "per_example_clip: tx contains dp_noisy_mean more than once, which would add the "
            "noise again and divide by the expected batch size again (position "
            f"{roles.index('noisy_mean', 1)} of the chain); use tx = {_RECIPE}"
        )
    noise_clip = members[0][1]
    numbers = (int, float)
    if (
        isinstance(noise_clip, numbers)
        and isinstance(l2_norm_clip, numbers)
        and noise_clip != l2_norm_clip
    ):
        raise ValueError(
            f"per_example_clip={l2_norm_clip} but tx's dp_noisy_mean has l2_norm_clip="
            f"{noise_clip}: its noise σ·C must use the clipping norm of the sum; give both "
            "the same C"
        )


def split(batch: Any, micro_batches: int) -> microbatch.BatchSplit:
    """``micro_batches`` micro-batches, fewer for a smaller batch, none for an empty one."""
    n = microbatch.batch_size(batch)
    if n == 0:
        return microbatch.BatchSplit((), (), 0)
    return microbatch.split_batch(batch, min(micro_batches, n))


class ClippedSumStage:
    """``Σᵢ clip(gᵢ, C)`` of a batch, micro-batch by micro-batch (internal)."""

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        l2_norm_clip: Any,
        *,
        chunk_size: int | None,
        seed_rng: bool,
    ) -> None:
        self.loss_fn = loss_fn
        self.l2_norm_clip = l2_norm_clip
        self.chunk_size = chunk_size
        self.seed_rng = seed_rng
        self.takes_buffers = "buffers" in loss_lib.accepted_inputs(loss_fn)
        self.metas: list[Any] = []  # the compiled core's interface (DP steps do not compile)

    def __call__(
        self,
        params: Any,
        batch: Any,
        split: microbatch.BatchSplit,
        buffers: Any,
        key: torch.Tensor | None,
        devices: Sequence[torch.device],
    ) -> GradResult:
        first = tree.leaves(params)[0]
        device = first.device
        leaves, spec = tree.flatten(params)
        acc: list[torch.Tensor] | None = None
        # Sums of losses and of clipped gradients over micro-batches are accumulated in at least
        # float32 and rounded once: a bfloat16 loss sum of a few hundred examples has a spacing
        # of 1 or more, and a batch smaller than micro_batches is one micro-batch per example.
        loss_sum = torch.zeros((), dtype=accumulation_dtype(first.dtype), device=device)
        loss_dtype = first.dtype  # an empty batch never calls loss_fn: the params' dtype
        clipped = torch.zeros((), dtype=torch.int64, device=device)
        for i, mb in enumerate(microbatch.micro_batches(batch, split)):
            mb_key = None if key is None else rng.fold_in(key, i + 1)
            with _seeding(mb_key, self.seed_rng, devices):
                out = clipped_grad_sum(
                    self.loss_fn,
                    params,
                    mb,
                    self.l2_norm_clip,
                    chunk_size=self.chunk_size,
                    buffers=buffers if self.takes_buffers else None,
                    randomness="different",
                )
            part = tree.leaves(out.grad_sum)
            if split.num_micro_batches == 1:
                acc = part
            elif acc is None:
                # Copies: autograd may hand one tensor to several leaves, and we add in place.
                acc = [g.to(accumulation_dtype(g.dtype), copy=True) for g in part]
            else:
                _foreach.add_(acc, [g.to(a.dtype) for g, a in zip(part, acc)])
            loss_dtype = out.loss_sum.dtype
            loss_sum = loss_sum + out.loss_sum  # promotes to the wider of the two
            clipped = clipped + out.num_clipped.to(device)
        if acc is None:  # an empty batch: a zero sum, still noised by tx
            grad_sum = tree.zeros_like(params)
        else:
            grad_sum = tree.unflatten(spec, [a.to(p.dtype) for a, p in zip(acc, leaves)])
        count = max(split.total, 1)
        metrics = {
            # The loss keeps the dtype loss_fn gave it, as in a non-DP step (rounded once).
            "loss": (loss_sum / count).to(loss_dtype),
            "num_examples": torch.full((), split.total, dtype=torch.int64, device=device),
            # A ratio of counts: at least float32 (bfloat16 would round 1/3 to 0.334).
            "clipped_fraction": clipped.to(loss_sum.dtype) / count,
        }
        return GradResult(grad_sum, metrics, buffers, None)
