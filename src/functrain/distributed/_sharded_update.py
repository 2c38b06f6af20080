"""The sharded optimizer stage of a data-parallel step (internal): ZeRO stage 1.

With ``shard_optimizer=True`` the gradient was reduce-scattered
(:func:`functrain.distributed.zero.start_reduce_scatter`), so each rank holds only its pieces of
the global gradient. This stage makes the global decisions from the pieces (one small all-reduce
of the squared norm and of the non-finite flags, for ``grad_norm``, a leading
``clip_by_global_norm`` and the non-finite check, which also gives every rank rank 0's gradient
of each 0-d parameter, replicated on every rank), runs ``tx.update`` on this rank's pieces of the
parameters and of the optimizer state, and all-gathers the new parameters, written in place
(``donate=True``) only once that last collective succeeded.

Noise (``add_noise``, ``dp_noisy_mean``): their ``update`` gets ``shard_index``, per leaf where
this rank's piece sits in the whole parameter, and draws exactly its slice of the whole
parameter's noise: the sharded step adds the very noise the unsharded one does. A DP-SGD step
(``per_example_clip``) reports no ``grad_norm``, as the replicated one: the norm of the clipped
sum before noise is not private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from functrain import tree
from functrain.distributed import collectives, zero
from functrain.distributed._update import Updated, checked_grads
from functrain.optim.base import _accepts_extra, apply_updates
from functrain.optim.loss_scale import all_finite
from functrain.train import faults as faults_lib
from functrain.train.optimizer_stage import mark_in_place_write

if TYPE_CHECKING:
    from functrain.distributed.step import DataParallelTrainStep


def sharded_update(
    step: DataParallelTrainStep,
    grads: list[torch.Tensor],
    spec: Any,
    params: Any,
    opt_state: Any,
    extra: dict[str, Any],
    metrics: dict[str, torch.Tensor],
) -> Updated:
    """ZeRO-1: the optimizer on this rank's pieces, then all-gather of the parameters."""
    assert step._layout is not None and step.report is not None
    layout, group = step._layout, step.group
    faults = step._local.faults
    clip = step.report.leading_clip
    # A DP-SGD step reports no grad_norm (the clipped sum's norm before noise is not private).
    report_norm = step.norm_metrics and step.per_example_clip is None
    need_norm = report_norm or clip is not None
    # The owned pieces partition every parameter (a 0-d one is replicated, owned by rank 0).
    local_sq = tree.norm(layout.owned_only(grads), squared=True)
    # One all-reduce of [squared norm, non-finite pieces, rank 0's 0-d gradients]; with loss
    # scaling the norm is taken after unscaling, in a second one.
    early_norm = need_norm and faults.loss_scale is None
    entries = []
    if early_norm:
        entries.append(local_sq.to(torch.float64))
    if faults.active:
        finite = all_finite(layout.owned_only(grads))
        entries.append((~finite).to(torch.float64).to(local_sq.device))
    head = len(entries)
    # Every rank updates a replica of each 0-d parameter. The reduce-scatter summed the ranks'
    # rows in different orders, so the replicas' gradients may differ in the last bit and their
    # optimizer states drift apart (a resumed run, which takes rank 0's, would not continue
    # bit for bit): every rank takes rank 0's, exactly (x + 0 + ... + 0 == x).
    shared = layout.replicated if layout.world_size > 1 else []
    for i in shared:
        value = (
            grads[i].to(torch.float64)
            if layout.rank == 0
            else local_sq.new_zeros((), dtype=torch.float64)
        )
        entries.append(value.to(local_sq.device))
    reduced = None
    if entries:
        reduced = collectives.start_all_reduce(
            [torch.stack(entries)], group=group, what="all-reduce of the gradient norm"
        ).wait()[0]
    if shared:
        assert reduced is not None
        grads = list(grads)
        for k, i in enumerate(shared):
            grads[i] = reduced[head + k].to(grads[i].dtype)
        reduced = reduced[:head]
    ok, new_extra = None, extra
    if faults.active:
        assert reduced is not None
        # A non-finite piece anywhere must skip the step on every rank: the check also
        # sees a NaN standing for the other ranks' pieces.
        poison = torch.where(reduced[-1] > 0, float("nan"), 0.0).to(local_sq.dtype)
        checked, ok, new_extra = checked_grads(step, [*grads, poison], metrics, extra, params)
        grads = list(checked[:-1])
    if need_norm:
        if early_norm:
            sq = reduced[0]  # type: ignore[index]
        else:
            sq = collectives.start_all_reduce(
                [tree.norm(layout.owned_only(grads), squared=True).to(torch.float64)],
                group=group,
                what="all-reduce of the gradient norm",
            ).wait()[0]
        grad_norm = sq.sqrt().to(local_sq.dtype)
        if report_norm:
            metrics["grad_norm"] = grad_norm
        if clip is not None:
            # The chain's leading clip_by_global_norm, with the global norm; the clip in
            # the chain then sees pieces of norm at most max_norm and leaves them as they are.
            bound = (
                clip.to(grad_norm)
                if isinstance(clip, torch.Tensor)
                else torch.full_like(grad_norm, float(clip))  # filled on the device
            )
            one = torch.ones_like(grad_norm)
            factor = torch.where(grad_norm < bound, one, bound / grad_norm)
            grads = [g * factor.to(g.dtype) for g in grads]
    tx = step.tx if ok is None else faults_lib.skip_unless(step.tx, ok)
    p_leaves = tree.leaves(params)
    param_pieces = tree.unflatten(spec, layout.pieces(p_leaves))
    kwargs: dict[str, Any] = {}
    if _NOISY & set(step.report.transforms) and _accepts_extra(step.tx.update):
        # Only for the noise transforms, which know it: a custom member declared elementwise
        # may not accept unknown keywords.
        kwargs["shard_index"] = layout.shard_positions(p_leaves)
    if "loss" in metrics and _accepts_extra(step.tx.update):
        kwargs["value"] = metrics["loss"]  # the global mean loss, as the replicated update
    with torch.no_grad():
        updates, new_opt_state = tx.update(
            tree.unflatten(spec, grads), opt_state, param_pieces, **kwargs
        )
        new_pieces = apply_updates(param_pieces, updates)
    pending_sq = None
    if step.norm_metrics:
        pending_sq = collectives.start_all_reduce(
            [tree.norm(layout.owned_only(tree.leaves(updates)), squared=True)],
            group=group,
            what="all-reduce of the update norm",
        )
    outs = p_leaves if step.donate and _writable(p_leaves, new_opt_state) else None
    if outs is not None:
        mark_in_place_write()  # a failing gather may leave the parameters half-written
    pending = zero.start_all_gather(layout, tree.leaves(new_pieces), group, outs)
    update_norm = None if pending_sq is None else pending_sq.wait()[0].sqrt()
    # Last: only when this collective succeeded are the parameters (maybe in place) written.
    new_params = tree.unflatten(spec, pending.wait())
    return Updated(new_params, new_opt_state, new_extra, ok, update_norm)


# The transforms that draw noise by position and accept ``shard_index`` (check_shardable
# refuses them where they would not see the whole update tree).
_NOISY = frozenset({"add_noise", "dp_noisy_mean"})


def _writable(p_leaves: list[torch.Tensor], opt_state: Any) -> bool:
    """Whether the parameters' memory may be overwritten: not shared between leaves or kept
    by the optimizer state."""
    ids = [id(p) for p in p_leaves]
    if len(set(ids)) != len(ids):
        return False
    storages = {p.untyped_storage().data_ptr() for p in p_leaves if p.numel()}
    return not any(
        isinstance(x, torch.Tensor) and x.numel() and x.untyped_storage().data_ptr() in storages
        for x in tree.leaves(opt_state)
    )
