"""``differentially_private_aggregate(l2_norm_clip, noise_multiplier, key=None, *, seed=None)``:
optax 0.2.8's signature, with the older positional-seed call still meaning the same."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

import functrain as ft

F64 = torch.float64


def _per_example(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(5, 3, 2, generator=gen, dtype=F64),
        "b": torch.randn(5, 2, generator=gen, dtype=F64),
    }


def _steps(tx: ft.GradientTransformation, n: int = 3) -> list[dict[str, torch.Tensor]]:
    state = tx.init(None)
    out = []
    for i in range(n):
        u, state = tx.update(_per_example(i), state)
        out.append(u)
    return out


def _same(a: list[Any], b: list[Any]) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_signature_is_optaxs() -> None:
    params = inspect.signature(ft.differentially_private_aggregate).parameters
    assert list(params) == ["l2_norm_clip", "noise_multiplier", "key", "seed"]
    assert params["key"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params["key"].default is None
    assert params["seed"].kind is inspect.Parameter.KEYWORD_ONLY
    # optax.contrib.dpsgd kept its positional ``seed``: so does ft.dpsgd.
    assert list(inspect.signature(ft.dpsgd).parameters)[3] == "seed"


def test_int_key_positional_keyword_and_seed_are_one_stream() -> None:
    old_positional = _steps(ft.differentially_private_aggregate(1.0, 0.5, 42))
    assert _same(old_positional, _steps(ft.differentially_private_aggregate(1.0, 0.5, key=42)))
    assert _same(old_positional, _steps(ft.differentially_private_aggregate(1.0, 0.5, seed=42)))
    assert not _same(old_positional, _steps(ft.differentially_private_aggregate(1.0, 0.5, 43)))


def test_key_tensor() -> None:
    key = ft.random_key(7)
    frozen = key.clone()
    by_key = _steps(ft.differentially_private_aggregate(1.0, 0.5, key))
    assert torch.equal(key, frozen)  # not consumed in place
    assert _same(by_key, _steps(ft.differentially_private_aggregate(1.0, 0.5, seed=key)))
    other = _steps(ft.differentially_private_aggregate(1.0, 0.5, ft.random_key(8)))
    assert not _same(by_key, other)
    # A saved state's key resumes the stream: step 2 from step 1's key.
    tx = ft.differentially_private_aggregate(1.0, 0.5, key)
    _, state = tx.update(_per_example(0), tx.init(None))
    resumed = ft.differentially_private_aggregate(1.0, 0.5, state.rng_key)
    u, _ = resumed.update(_per_example(1), resumed.init(None))
    assert all(torch.equal(u[k], by_key[1][k]) for k in u)


def test_zero_noise_is_the_clipped_mean() -> None:
    g = _per_example()
    clip = 0.8
    want = {k: torch.zeros_like(v[0]) for k, v in g.items()}
    for i in range(5):  # per example: global norm over the leaves, clip, sum; then / B
        norm = sum(float((v[i] ** 2).sum()) for v in g.values()) ** 0.5
        for k, v in g.items():
            want[k] += v[i] * min(1.0, clip / norm)
    tx = ft.differentially_private_aggregate(clip, 0.0, key=ft.random_key(1))
    u, _ = tx.update(g, tx.init(None))
    for k in g:
        torch.testing.assert_close(u[k], want[k] / 5, rtol=1e-13, atol=1e-14)


def test_key_and_seed_errors() -> None:
    with pytest.raises(ValueError, match="only one of key and seed"):
        ft.differentially_private_aggregate(1.0, 0.5, 1, seed=1)
    with pytest.raises(TypeError, match=r"needs a noise key: pass key .* or seed="):
        ft.differentially_private_aggregate(1.0, 0.5)
    with pytest.raises(TypeError, match="key must be an int or a 0-d integer tensor key"):
        ft.differentially_private_aggregate(1.0, 0.5, 1.5)
    with pytest.raises(ValueError, match=r"key must be an int .* torch.float32"):
        ft.differentially_private_aggregate(1.0, 0.5, torch.tensor(1.0))
    with pytest.raises(TypeError, match="seed must be an int"):
        ft.differentially_private_aggregate(1.0, 0.5, seed="0")


def test_dpsgd_positional_seed_still_works() -> None:
    tx = ft.dpsgd(0.1, 1.0, 0.0, 3, 0.9, True)
    params = {"w": torch.zeros(3, 2, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    u, _ = tx.update(_per_example(), tx.init(params), params)
    assert u["w"].shape == (3, 2)


def test_compiled_update_with_a_key_tensor() -> None:
    tx = ft.differentially_private_aggregate(1.0, 0.5, ft.random_key(2))
    compiled = torch.compile(tx.update, fullgraph=True, backend="eager")
    state = eager = tx.init(None)
    with ft.testing.assert_max_compiles(1):
        for i in range(3):
            got, state = compiled(_per_example(i), state)
            want, eager = tx.update(_per_example(i), eager)
            for k in got:
                torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
