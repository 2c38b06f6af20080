"""Connectionist temporal classification (optax's ``ctc_loss`` and its forward variables)."""

from __future__ import annotations

import torch

from functrain.losses import _common as c
from functrain.losses._common import Scalar

__all__ = ["ctc_loss", "ctc_loss_with_forward_probs"]


def _logaddexp_tail(phi: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """``phi`` with ``phi[:, 1:]`` log-added to ``added`` (optax's ``update_phi_score``)."""
    return torch.cat([phi[:, :1], torch.logaddexp(phi[:, 1:], added)], dim=-1)


def ctc_loss_with_forward_probs(
    logits: torch.Tensor,
    logit_paddings: torch.Tensor,
    labels: torch.Tensor,
    label_paddings: torch.Tensor,
    *,
    blank_id: int = 0,
    log_epsilon: Scalar = -1e5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""CTC loss (Graves et al. 2006) and the log forward variables of its recursion.

    The negative log-likelihood of each label sequence, summed over every alignment of it to
    the frames (with repeats and blanks). The recursion is optax's, in log space, one frame
    at a time: ``log_epsilon`` stands for ``log 0`` (so every value stays finite), a padded
    frame leaves the variables unchanged, and ``labels`` must be right-padded. float16 and
    bfloat16 logits are computed in float32 and the results stay float32, as optax's (whose
    recursion starts from float32 constants): values near ``log_epsilon = -1e5`` do not fit
    in float16.

    ``-inf`` logits of classes absent from a sequence's row of ``labels`` (padding included)
    are fine (optax's one-hot contraction gives NaN there); a ``-inf`` logit of one of them,
    or of the blank, gives NaN, as optax's (its arithmetic padding blend takes ``0 · -inf``):
    write such masked classes as a large negative finite logit instead.

    Differences from ``torch.nn.functional.ctc_loss``: batch-major ``[B, T, K]`` logits (not
    time-major log-probabilities ``[T, B, C]``), the log-softmax is taken here, lengths are
    given as padding masks (``1`` = padded), there is no reduction (torch's default divides
    by the target lengths and means), and an impossible alignment gives a large finite loss
    (about ``-log_epsilon``) rather than ``inf``.

    Args:
        logits: ``[B, T, K]`` logits of each class at each frame, blank included.
        logit_paddings: ``[B, T]`` padding indicators of the frames (1.0 = padded).
        labels: ``[B, N]`` integer labels.
        label_paddings: ``[B, N]`` padding indicators of the labels (1.0 = padded), each row
            zeros then ones.
        blank_id: the class of the blank symbol.
        log_epsilon: the finite stand-in for ``log 0``.

    Returns:
        ``(loss, logalpha_blank, logalpha_nonblank)``: the ``[B]`` losses and the ``[T, B,
        N + 1]`` and ``[T, B, N]`` log forward probabilities of the blank and non-blank
        states after each frame.

    Example:
        >>> import torch, functrain as ft
        >>> logits = torch.zeros(1, 3, 2)  # uniform over {blank, "a"}
        >>> loss, blank, emit = ft.ctc_loss_with_forward_probs(
        ...     logits, torch.zeros(1, 3), torch.tensor([[1]]), torch.zeros(1, 1))
        >>> loss  # -log(6 / 8): 6 of the 8 paths read "a"
        tensor([0.2877])
        >>> blank.shape, emit.shape
        (torch.Size([3, 1, 2]), torch.Size([3, 1, 1]))
    """
    return _ctc(
        logits, logit_paddings, labels, label_paddings, blank_id, log_epsilon,
        "ctc_loss_with_forward_probs",
    )  # fmt: skip


def _ctc(
    logits: torch.Tensor,
    logit_paddings: torch.Tensor,
    labels: torch.Tensor,
    label_paddings: torch.Tensor,
    blank_id: int,
    log_epsilon: Scalar,
    fn: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = c.floating(logits, "logits", fn)
    logit_paddings = c.tensor(logit_paddings, "logit_paddings", fn)
    labels = c.integer(labels, "labels", fn)
    label_paddings = c.tensor(label_paddings, "label_paddings", fn)
    c.rank(logits, 3, "logits", fn)
    c.rank(labels, 2, "labels", fn)
    c.same_shape(labels, label_paddings, ("labels", "label_paddings"), fn)
    if logit_paddings.shape != logits.shape[:2]:
        raise ValueError(
            f"{fn}: logit_paddings shape {tuple(logit_paddings.shape)} does not match the "
            f"first two axes {tuple(logits.shape[:2])} of logits shape {tuple(logits.shape)}"
        )
    batch, frames, num_classes = logits.shape
    if labels.shape[0] != batch:
        raise ValueError(
            f"{fn}: labels batch size {labels.shape[0]} does not match logits batch size {batch}"
        )
    if frames == 0:
        raise ValueError(f"{fn}: logits has no frame (shape {tuple(logits.shape)})")
    if isinstance(blank_id, bool) or not isinstance(blank_id, int):
        raise TypeError(f"{fn}: blank_id must be an int, got {blank_id!r}")
    if not 0 <= blank_id < num_classes:
        raise ValueError(
            f"{fn}: blank_id {blank_id} is not in [0, {num_classes}) (logits' classes)"
        )
    max_label_len = labels.shape[1]
    x = c.widen(logits)
    dtype = x.dtype
    logprobs = torch.log_softmax(x, -1)
    label_lens = max_label_len - label_paddings.sum(1).to(torch.int64)

    # repeat[b, n] = 1 where label n + 1 repeats label n (a blank must separate them).
    repeat = (labels[:, :-1] == labels[:, 1:]).to(dtype)
    repeat = torch.nn.functional.pad(repeat, (0, 1))

    logprobs_phi = logprobs[:, :, blank_id : blank_id + 1].transpose(0, 1)  # [T, B, 1]
    # optax contracts with a one-hot (a label out of [0, K) reads 0); a gather reads the same
    # values without a matmul, which autocast would run in bfloat16/float16, and without
    # 0 · -inf = NaN from the -inf logits of classes that are not the label.
    labels = labels.to(torch.int64)
    valid = (labels >= 0) & (labels < num_classes)
    index = labels.clamp(0, num_classes - 1).unsqueeze(1).expand(batch, frames, max_label_len)
    emit_lp = torch.where(valid.unsqueeze(1), torch.gather(logprobs, -1, index), 0.0)
    logprobs_emit = emit_lp.transpose(0, 1)  # [T, B, N]
    pads = logit_paddings.transpose(0, 1).to(dtype)  # [T, B]

    phi = torch.full((batch, max_label_len + 1), 1.0, dtype=dtype, device=x.device) * log_epsilon
    phi = torch.cat([torch.zeros_like(phi[:, :1]), phi[:, 1:]], dim=-1)
    emit = torch.full((batch, max_label_len), 1.0, dtype=dtype, device=x.device) * log_epsilon
    phis, emits = [], []
    for t in range(frames):
        prev_phi_orig = phi
        # emit-to-blank transition, except into the blank before a repeated label
        prev_phi = _logaddexp_tail(phi, emit + log_epsilon * repeat)
        lp_emit, lp_phi, pad = logprobs_emit[t], logprobs_phi[t], pads[t].reshape(batch, 1)
        next_emit = torch.logaddexp(prev_phi[:, :-1] + lp_emit, emit + lp_emit)
        next_phi = prev_phi + lp_phi
        next_phi = _logaddexp_tail(next_phi, emit + lp_phi + log_epsilon * (1.0 - repeat))
        # a padded frame keeps the previous variables (optax's arithmetic blend)
        emit = pad * emit + (1.0 - pad) * next_emit
        phi = pad * prev_phi_orig + (1.0 - pad) * next_phi
        phis.append(phi)
        emits.append(emit)

    # the last frame still takes the final emit-to-blank transition
    phi_last = _logaddexp_tail(phis[-1], emits[-1])
    phis[-1] = phi_last
    logalpha_phi = torch.stack(phis)
    logalpha_emit = torch.stack(emits)
    end = c.one_hot(label_lens, max_label_len + 1, dtype)  # [B, N + 1]
    loss = -(phi_last * end).sum(-1)
    return loss, logalpha_phi, logalpha_emit


def ctc_loss(
    logits: torch.Tensor,
    logit_paddings: torch.Tensor,
    labels: torch.Tensor,
    label_paddings: torch.Tensor,
    *,
    blank_id: int = 0,
    log_epsilon: Scalar = -1e5,
) -> torch.Tensor:
    r"""CTC loss of each sequence (the first result of :func:`ctc_loss_with_forward_probs`).

    Equal to ``torch.nn.functional.ctc_loss(logits.log_softmax(-1).transpose(0, 1), labels,
    input_lengths, target_lengths, blank=blank_id, reduction="none")`` for alignable
    sequences; see :func:`ctc_loss_with_forward_probs` for the differences.

    Args:
        logits: ``[B, T, K]`` logits of each class at each frame, blank included.
        logit_paddings: ``[B, T]`` padding indicators of the frames (1.0 = padded).
        labels: ``[B, N]`` integer labels.
        label_paddings: ``[B, N]`` padding indicators of the labels (1.0 = padded).
        blank_id: the class of the blank symbol.
        log_epsilon: the finite stand-in for ``log 0``.

    Returns:
        The ``[B]`` negative log-likelihoods (float32 for float16/bfloat16 logits).

    Example:
        >>> import torch, functrain as ft
        >>> logits = torch.zeros(1, 3, 2)
        >>> ft.ctc_loss(logits, torch.zeros(1, 3), torch.tensor([[1]]), torch.zeros(1, 1))
        tensor([0.2877])
    """
    loss, _, _ = _ctc(
        logits, logit_paddings, labels, label_paddings, blank_id, log_epsilon, "ctc_loss"
    )
    return loss
