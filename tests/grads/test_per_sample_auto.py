"""``method="auto"``, the default of ``per_sample_grads``: the layer rules where they apply.

Every result is compared with one autograd call per example in float64 (``naive_per_sample``).
"""

import pytest
import torch
import torch.nn.functional as F
from grad_problems import naive_per_sample

import functrain as ft
from functrain import tree
from functrain.grads import _routes as per_sample_module  # where the routes call the rules

D = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.fixture
def layer_calls(monkeypatch):
    """How many chunks ran the layer rules, and whether they succeeded."""
    calls = []
    original = per_sample_module.per_sample_by_layers

    def spy(*args, **kwargs):
        try:
            out = original(*args, **kwargs)
        except Exception:
            calls.append("refused")
            raise
        calls.append("layers")
        return out

    monkeypatch.setattr(per_sample_module, "per_sample_by_layers", spy)
    return calls


PARAMS = {"w": _randn(3, 4, seed=1), "b": _randn(3, seed=2)}
BATCH = {"x": _randn(6, 4, seed=3), "y": torch.tensor([0, 1, 2, 0, 1, 2])}


def _supported(p, b):
    return F.cross_entropy(F.linear(b["x"], p["w"], p["b"]), b["y"])


def _unsupported(p, b):
    # ``x @ wᵀ`` is a matmul on a parameter: no per-layer rule.
    return F.cross_entropy(b["x"] @ p["w"].T + p["b"], b["y"])


def _flat(grads):
    return torch.cat([g.reshape(g.shape[0], -1) for g in tree.leaves(grads)], 1)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_auto_takes_the_layer_rules_where_they_apply(layer_calls, chunk_size):
    got = ft.per_sample_grads(_supported, PARAMS, BATCH, chunk_size=chunk_size)
    reference = naive_per_sample(_supported, PARAMS, BATCH)
    torch.testing.assert_close(_flat(got), _flat(reference), rtol=1e-12, atol=1e-14)
    assert layer_calls == ["layers"] * (1 if chunk_size is None else 2)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_auto_falls_back_to_vmap_once_and_for_all_chunks(layer_calls, chunk_size):
    calls = []

    def counted(p, b):
        calls.append(1)
        return _unsupported(p, b)

    got = ft.per_sample_grads(counted, PARAMS, BATCH, chunk_size=chunk_size)
    reference = naive_per_sample(_unsupported, PARAMS, BATCH)
    torch.testing.assert_close(_flat(got), _flat(reference), rtol=1e-12, atol=1e-14)
    # One refused try; every chunk after it goes straight to vmap.
    assert layer_calls == ["refused"]
    chunks = 1 if chunk_size is None else 3
    assert len(calls) == chunks + 1
    with pytest.raises(ValueError, match=r"params\['w'\] is used by"):
        ft.per_sample_grads(_unsupported, PARAMS, BATCH, method="layers")


def test_explicit_vmap_never_tries_the_rules(layer_calls):
    ft.per_sample_grads(_supported, PARAMS, BATCH, method="vmap")
    ft.per_sample_value_and_grads(_supported, PARAMS, BATCH, method="vmap")
    list(ft.per_sample_chunks(_supported, PARAMS, BATCH, method="vmap", chunk_size=3))
    assert layer_calls == []


def test_auto_value_and_grads_and_aux_match_vmap(layer_calls):
    def with_aux(p, b):
        logits = F.linear(b["x"], p["w"], p["b"])
        return F.cross_entropy(logits, b["y"]), {"logit_sum": logits.sum()}

    (losses, aux), grads = ft.per_sample_value_and_grads(with_aux, PARAMS, BATCH, has_aux=True)
    (v_losses, v_aux), v_grads = ft.per_sample_value_and_grads(
        with_aux, PARAMS, BATCH, has_aux=True, method="vmap"
    )
    assert layer_calls == ["layers"]
    torch.testing.assert_close(losses, v_losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(aux, v_aux, rtol=1e-12, atol=0)
    torch.testing.assert_close(_flat(grads), _flat(v_grads), rtol=1e-12, atol=1e-14)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="auto"):
        ft.per_sample_grads(_supported, PARAMS, BATCH, method="hooks")
