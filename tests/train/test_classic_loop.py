"""make_train_step against the classic imperative accumulation loop, and the padding bug."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        # No biases before BatchNorm: their true gradient is 0, and Adam would amplify rounding.
        nn.Linear(4, 8, bias=False),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3, bias=False),
        nn.BatchNorm1d(3),
    ).double()


@pytest.mark.parametrize("k", [1, 3, 4])
def test_thirty_steps_match_classic_adamw_loop_with_batchnorm(k):
    net = _bn_net()
    ref = copy.deepcopy(net)
    lr, wd, steps, n = 1e-2, 0.05, 30, 12
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for _ in range(steps)
    ]

    # Classic: loss / K, backward, step, zero_grad (exact here: equal micro-batch sizes).
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=wd)
    ref.train()
    for x, y in batches:
        for xc, yc in zip(torch.tensor_split(x, k), torch.tensor_split(y, k)):
            (F.cross_entropy(ref(xc), yc) / k).backward()
        opt.step()
        opt.zero_grad()

    model, params, buffers = ft.functionalize(net)

    def loss_fn(p, batch, buffers):
        out, buffers = model.apply(p, buffers, batch[0])
        return ft.LossOutput(F.cross_entropy(out, batch[1]), buffers=buffers)

    tx = ft.adamw(lr, weight_decay=wd)
    step = ft.make_train_step(loss_fn, tx, micro_batches=k)
    state = ft.TrainState.create(params=params, tx=tx, buffers=buffers)
    for batch in batches:
        state, _ = step(state, batch)

    ft.testing.assert_trees_all_close(
        state.params, {k_: v.detach() for k_, v in ref.named_parameters()}, rtol=1e-9, atol=1e-12
    )
    ft.testing.assert_trees_all_close(
        state.buffers, {k_: v for k_, v in ref.named_buffers()}, rtol=1e-9, atol=1e-12
    )
    assert int(state.buffers["1.num_batches_tracked"]) == steps * k
    assert int(state.step) == steps
    # The module itself was never touched (the state owns copies).
    ft.testing.assert_trees_all_equal(
        dict(_bn_net().named_parameters()), dict(net.named_parameters())
    )


def _padded_lm_batch():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 2, 7, 1, 5, 3, 8, 4])
    t = 10
    ids = torch.randint(1, 11, (len(lengths), t), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    ids = torch.where(mask, ids, 0)  # 0 = padding
    labels = torch.where(mask, torch.roll(ids, -1, 1), -100)
    labels[torch.arange(len(lengths)), lengths - 1] = -100  # no target after the last token
    labels[1, 0] = 5  # keep at least one target in every sequence
    labels[3, 0] = 5
    return {"ids": ids, "labels": labels}


def _lm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 6), nn.Tanh(), nn.Linear(6, 11)).double()


def test_padded_lm_token_mean_for_any_k_and_the_classic_mean_of_means_differs():
    batch = _padded_lm_batch()
    model, params, _ = ft.functionalize(_lm())

    def logits_ce(p, b, reduction):
        logits = model(p, b["ids"])
        return F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction=reduction)

    def token_sum_loss(p, b):  # functrain: report the sum and the count
        return ft.LossSum(logits_ce(p, b, "sum"), (b["labels"] != -100).sum())

    full_grad = torch.func.grad(lambda p: logits_ce(p, batch, "mean"))(params)
    tokens = int((batch["labels"] != -100).sum())
    for strategy in ("loop", "vmap"):
        for k in range(1, 9):
            tx = ft.sgd(1.0)
            step = ft.make_train_step(
                token_sum_loss, tx, micro_batches=k, strategy=strategy, donate=False
            )
            state = ft.TrainState.create(params=params, tx=tx)
            new, metrics = step(state, batch)
            grads = ft.tree.sub(state.params, new.params)
            ft.testing.assert_trees_all_close(grads, full_grad, rtol=1e-10, atol=1e-14)
            assert int(metrics["num_tokens"]) == tokens

    # The classic per-micro-batch token mean, divided by K (the 2024 accumulation bug).
    k = 4
    parts = [
        {key: v for key, v in zip(batch, chunk)}
        for chunk in zip(*(torch.tensor_split(v, k) for v in batch.values()))
    ]
    classic = ft.tree.scale(
        1 / k,
        ft.tree.add(
            *[torch.func.grad(lambda p, b=b: logits_ce(p, b, "mean"))(params) for b in parts]
        ),
    )
    assert not ft.tree.allclose(classic, full_grad, rtol=1e-3)
    # ... and a plain mean loss in make_train_step reproduces that per-micro-batch weighting
    # only up to example counts, which is why token losses must return ft.LossSum.
    tx = ft.sgd(1.0)
    step = ft.make_train_step(
        lambda p, b: logits_ce(p, b, "mean"), tx, micro_batches=k, donate=False
    )
    state = ft.TrainState.create(params=params, tx=tx)
    new, _ = step(state, batch)
    ft.testing.assert_trees_all_close(
        ft.tree.sub(state.params, new.params), classic, rtol=1e-10, atol=1e-14
    )
