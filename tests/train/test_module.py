"""functionalize / FunctionalModel: purity, buffers, tied weights, name checks."""

import pytest
import torch
from torch import nn

import functrain as ft


class TiedLM(nn.Module):
    def __init__(self, vocab=7, dim=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def test_tied_weights_appear_once_and_get_the_summed_gradient():
    torch.manual_seed(0)
    net = TiedLM().double()
    model, params, buffers = ft.functionalize(net)
    assert sorted(params) == ["emb.weight", "mid.bias", "mid.weight"] and buffers == {}
    ids = torch.randint(0, 7, (5, 3))
    targets = torch.randint(0, 7, (5, 3))

    def loss_fn(p):
        return nn.functional.cross_entropy(model(p, ids).flatten(0, 1), targets.flatten())

    grads = torch.func.grad(loss_fn)(params)
    nn.functional.cross_entropy(net(ids).flatten(0, 1), targets.flatten()).backward()
    ft.testing.assert_trees_all_close(
        grads, {k: p.grad for k, p in net.named_parameters()}, rtol=1e-12, atol=1e-15
    )
    # The tied gradient has both contributions (it differs from the embedding use alone).
    assert not torch.allclose(grads["emb.weight"], torch.zeros_like(grads["emb.weight"]))


def test_apply_is_pure_and_returns_updated_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model, params, buffers = ft.functionalize(net, copy=True)
    before = {k: v.clone() for k, v in buffers.items()}
    x = torch.randn(8, 3)
    out, new_buffers = model.apply(params, buffers, x)
    ft.testing.assert_trees_all_equal(buffers, before)
    ft.testing.assert_trees_all_equal({k: v.detach() for k, v in net.named_buffers()}, before)
    ref = net(x)  # the module's own forward updates its buffers: the reference
    ft.testing.assert_trees_all_close(out, ref.detach(), rtol=1e-6)
    ft.testing.assert_trees_all_close(
        new_buffers, {k: v.detach() for k, v in net.named_buffers()}, rtol=1e-6
    )


def test_call_refuses_to_drop_batchnorm_updates_but_eval_works():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model, params, _ = ft.functionalize(net)
    with pytest.raises(RuntimeError, match=r"model\.apply"):
        model(params, torch.randn(5, 3))
    out = model.eval()(params, torch.randn(5, 3))
    assert out.shape == (5, 4) and net.training  # the module's own mode is restored


def test_training_mode_switch_is_scoped():
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.9))
    net.eval()
    model, params, _ = ft.functionalize(net)
    x = torch.ones(2, 3)
    torch.manual_seed(0)
    out_train = model.train()(params, x)
    assert not net.training and not net[1].training
    assert torch.equal(model(params, x), net(x))
    assert not torch.allclose(out_train, model(params, x))


def test_name_checks():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model, params, _ = ft.functionalize(net)
    del params["2.bias"]
    with pytest.raises(KeyError, match=r"missing \['2.bias'\]"):
        model(params, torch.randn(1, 3))
    with pytest.raises(KeyError, match=r"unexpected \['extra'\]"):
        model({**dict(ft.functionalize(net)[1]), "extra": torch.zeros(1)}, torch.randn(1, 3))
    with pytest.raises(TypeError, match="dict"):
        model([torch.zeros(1)], torch.randn(1, 3))


def test_hugging_face_bert_masked_lm_tied_gradients():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    net = transformers.BertForMaskedLM(cfg).double()
    model, params, buffers = ft.functionalize(net)
    assert "cls.predictions.decoder.weight" not in params  # tied to the word embeddings
    assert "bert.embeddings.position_ids" in buffers
    ids = torch.randint(0, 30, (2, 5))

    def loss_fn(p):
        return model(p, input_ids=ids, labels=ids).loss

    grads = torch.func.grad(loss_fn)(params)
    net(input_ids=ids, labels=ids).loss.backward()
    ref = {k: p.grad for k, p in net.named_parameters()}
    ft.testing.assert_trees_all_close(grads, ref, rtol=1e-9, atol=1e-12)


def test_forward_that_raises_leaves_the_module_untouched():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval()
    before = {k: v for k, v in [*net.named_parameters(), *net.named_buffers()]}
    model, params, _ = ft.functionalize(net)
    with pytest.raises(RuntimeError):
        model(params, torch.randn(4, 5))  # wrong feature size: the forward raises
    after = dict([*net.named_parameters(), *net.named_buffers()])
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_parametrized_module_matches_functional_call():
    net = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    model, params, buffers = ft.functionalize(net)
    params = {k: v + 0.5 for k, v in params.items()}  # not the module's own values
    x = torch.randn(4, 3)
    expected = torch.func.functional_call(net, {**params, **buffers}, (x,))
    ft.testing.assert_trees_all_close(model(params, x), expected, rtol=0, atol=0)
    grads = torch.func.grad(lambda p: model(p, x).square().sum())(params)
    expected_grads = torch.func.grad(
        lambda p: torch.func.functional_call(net, p, (x,)).square().sum()
    )(params)
    ft.testing.assert_trees_all_close(grads, expected_grads, rtol=1e-6)
