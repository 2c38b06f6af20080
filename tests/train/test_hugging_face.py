"""Hugging Face BertForSequenceClassification (tiny config, no downloads) with make_train_step."""

import pytest
import torch

import functrain as ft

transformers = pytest.importorskip("transformers")


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def _batch(n=12, t=8):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (n, t), generator=gen)
    lengths = torch.randint(3, t + 1, (n,), generator=gen)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": ids[:, 0] % 3}


def test_bert_trains_with_micro_batches_and_dropout():
    net = _bert()
    net.train()  # dropout on: seeded per micro-batch from the state's key
    model, params, buffers = ft.functionalize(net)
    assert "bert.embeddings.position_ids" in buffers

    def loss_fn(p, batch):
        return model(p, **batch).loss

    tx = ft.adamw(1e-2)
    step = ft.make_train_step(loss_fn, tx, micro_batches=3)
    state = ft.TrainState.create(params=params, tx=tx)
    batch = _batch()
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    evaluate = ft.make_eval_step(lambda p, b: model.eval()(p, **b).loss)
    assert float(evaluate(state, batch)["loss"]) < 0.5 * losses[0]
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_bert_micro_batch_gradient_equals_full_batch(strategy):
    model, params, _ = ft.functionalize(_bert().double())
    model = model.eval()  # deterministic forward
    batch = _batch(n=7)
    if strategy == "vmap":  # HF's padding-mask code branches on values, which vmap cannot batch
        del batch["attention_mask"]

    def loss_fn(p, b):
        return model(p, **b).loss

    full = torch.func.grad(loss_fn)(params, batch)
    tx = ft.sgd(1.0)
    step = ft.make_train_step(loss_fn, tx, micro_batches=3, strategy=strategy, donate=False)
    state = ft.TrainState.create(params=params, tx=tx)
    new, _ = step(state, batch)
    ft.testing.assert_trees_all_close(
        ft.tree.sub(state.params, new.params), full, rtol=1e-8, atol=1e-12
    )


def test_vmap_explains_data_dependent_models():
    model, params, _ = ft.functionalize(_bert())
    tx = ft.sgd(1.0)
    step = ft.make_train_step(lambda p, b: model(p, **b).loss, tx, micro_batches=2, strategy="vmap")
    with pytest.raises(RuntimeError, match=r"strategy='loop'"):
        step(ft.TrainState.create(params=params, tx=tx), _batch(n=4))
