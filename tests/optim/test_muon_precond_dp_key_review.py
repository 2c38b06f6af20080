"""Review of Muon's dimension-number pytrees under torch.compile and of the DP noise keys."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import functrain as ft

F64 = torch.float64
MDN = ft.MuonDimensionNumbers
COEFFS = (3.4445, -4.7750, 2.0315)


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 5, generator=gen, dtype=F64),
        "e": torch.randn(2, 5, 4, generator=gen, dtype=F64),  # stacked experts
        "b": torch.randn(3, generator=gen, dtype=F64),
    }


def _ns_by_hand(x: torch.Tensor) -> torch.Tensor:
    """optax's Frobenius-preconditioned quintic iteration on one (out, in) matrix."""
    m = x.mT  # optax's (in, out) layout
    transposed = m.shape[0] > m.shape[1]
    if transposed:
        m = m.mT
    m = m / (torch.linalg.matrix_norm(m) + 1e-8)
    for _ in range(5):
        a = m @ m.mT
        m = COEFFS[0] * m + (COEFFS[1] * a + COEFFS[2] * a @ a) @ m
    return (m.mT if transposed else m).mT


def _by_hand(g: dict[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    """First Muon update without Nesterov: the bias-corrected momentum is ``g`` itself."""
    out = {"w": -lr * math.sqrt(max(1.0, 3 / 5)) * _ns_by_hand(g["w"])}
    out["e"] = -lr * math.sqrt(max(1.0, 5 / 4)) * torch.stack([_ns_by_hand(m) for m in g["e"]])
    return out


DIMS: dict[str, Any] = {
    "pytree": {"w": MDN(), "e": MDN(), "b": None},
    "callable": lambda ps: ft.tree.map(lambda p: MDN() if p.dim() >= 2 else None, ps),
}


@pytest.mark.parametrize("kind", sorted(DIMS))
def test_muon_with_dimension_number_pytree_compiles_fullgraph(kind: str) -> None:
    # Old code: PyTreeSpec.flatten_up_to / optree's is_leaf flattening broke the trace
    # ("length mismatch: [2, 3]", then "SourcelessBuilder ... DictMetaData").
    params = _params()
    tx = ft.muon(0.1, nesterov=False, muon_weight_dimension_numbers=DIMS[kind])
    compiled = torch.compile(tx.update, fullgraph=True, backend="eager")
    grads = {k: v * 2 for k, v in params.items()}
    u, _ = compiled(grads, tx.init(params), params)
    want = _by_hand(grads, 0.1)
    for k in ("w", "e"):
        torch.testing.assert_close(u[k], want[k], rtol=1e-12, atol=1e-12)


def test_muon_compiled_train_step_with_callable_dims() -> None:
    def loss_fn(p: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bi,eoi->beo", batch, p["e"]).sum(1)
        return (h @ p["w"].mT + p["b"]).square().mean()

    tx = ft.muon(0.05, muon_weight_dimension_numbers=DIMS["callable"])
    batch = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    params = _params()
    state = tx.init(params)
    for _ in range(2):  # the pure reference: tx.update on the exact full-batch gradient
        u, state = tx.update(torch.func.grad(loss_fn)(params, batch), state, params)
        params = {k: params[k] + u[k] for k in params}
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, compile={"backend": "eager"})
    st = ft.TrainState.create(params=_params(), tx=tx)
    for _ in range(2):
        st, _ = step(st, batch)
    for k in params:
        torch.testing.assert_close(st.params[k], params[k], rtol=1e-12, atol=1e-12)


def test_muon_dims_structure_mismatch_still_names_the_path() -> None:
    tx = ft.muon(0.1, muon_weight_dimension_numbers={"w": MDN(), "b": None})
    with pytest.raises(ft.tree.TreeMismatchError, match="muon_weight_dimension_numbers"):
        tx.init(_params())


def _per_example() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))}


def _noise(tx: ft.GradientTransformation) -> torch.Tensor:
    return tx.update(_per_example(), tx.init(None))[0]["w"]


@pytest.mark.parametrize("value", [np.int64(42), np.int32(42), np.uint8(42)])
def test_numpy_integer_keys_are_int_seeds(value: Any) -> None:
    want = _noise(ft.differentially_private_aggregate(1.0, 1.0, key=42))
    assert torch.equal(_noise(ft.differentially_private_aggregate(1.0, 1.0, key=value)), want)
    assert torch.equal(_noise(ft.differentially_private_aggregate(1.0, 1.0, seed=value)), want)
    assert torch.equal(_noise(ft.dpsgd(-1.0, 1.0, 1.0, value)), want)  # lr −1: the mean itself
    mean = ft.dp_noisy_mean(1.0, 1.0, 4, value)
    assert torch.equal(
        mean.init(None).rng_key, ft.dp_noisy_mean(1.0, 1.0, 4, 42).init(None).rng_key
    )


@pytest.mark.parametrize("key", [True, np.bool_(True), torch.tensor(True), torch.tensor(1 + 0j)])
def test_bool_and_complex_keys_are_refused(key: Any) -> None:
    error = TypeError if not isinstance(key, torch.Tensor) else ValueError
    with pytest.raises(error, match="key must be an int or a 0-d integer tensor key"):
        ft.differentially_private_aggregate(1.0, 1.0, key)


@pytest.mark.parametrize("which", ["aggregate", "noisy_mean"])
@pytest.mark.parametrize("key", [3, ft.random_key(3)])
def test_init_key_is_not_shared_with_the_transform(which: str, key: Any) -> None:
    tx = (
        ft.differentially_private_aggregate(1.0, 1.0, key)
        if which == "aggregate"
        else ft.dp_noisy_mean(1.0, 1.0, 4, key)
    )
    first = tx.init(None)
    original = first.rng_key.clone()
    first.rng_key.add_(1)  # e.g. a checkpoint restored in place into this state
    assert torch.equal(tx.init(None).rng_key, original)
