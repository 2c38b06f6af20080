"""``split_real_and_imaginary``: a complex leaf behaves as its two real parts.

Reference: the same inner optimizer run on a tree where each complex leaf is replaced by two
real leaves (real part, imaginary part), recombined by hand; and Adam written as a float64 loop.
"""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain import testing

C128 = torch.complex128


def _grad(i: int) -> torch.Tensor:
    s = [1.0, 0.0, -2.0, 0.5, 3.0, -0.1][i % 6]  # zeros and sign flips
    return torch.tensor([s + 2j, -s * 1j, 0.3 - s], dtype=C128)


def test_adam_on_complex_equals_adam_on_the_parts_and_a_float64_loop():
    inner = ft.adam(0.1)
    tx = ft.split_real_and_imaginary(inner)
    params = {"z": torch.tensor([1 + 1j, -0.5j, 2.0], dtype=C128), "r": torch.ones(2).double()}
    pr = {"re": params["z"].real, "im": params["z"].imag, "r": params["r"]}
    state, sr = tx.init(params), inner.init(pr)
    m = torch.zeros(6, dtype=torch.float64)
    v = torch.zeros(6, dtype=torch.float64)
    for t in range(1, 9):
        g = {"z": _grad(t), "r": torch.tensor([0.5, -t], dtype=torch.float64)}
        u, state = tx.update(g, state, params)
        ur, sr = inner.update({"re": g["z"].real, "im": g["z"].imag, "r": g["r"]}, sr, pr)
        assert u["z"].dtype == C128 and u["r"].dtype == torch.float64
        torch.testing.assert_close(u["z"], torch.complex(ur["re"], ur["im"]), rtol=0, atol=0)
        torch.testing.assert_close(u["r"], ur["r"], rtol=0, atol=0)
        # Adam per real part, by hand (b1=0.9, b2=0.999, eps=1e-8)
        gz = torch.cat([g["z"].real, g["z"].imag])
        m = 0.9 * m + 0.1 * gz
        v = 0.999 * v + 0.001 * gz**2
        ref = -0.1 * (m / (1 - 0.9**t)) / (torch.sqrt(v / (1 - 0.999**t)) + 1e-8)
        got = torch.cat([u["z"].real, u["z"].imag])
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)
        params = ft.apply_updates(params, u)
        pr = ft.apply_updates(pr, ur)


def test_state_holds_pairs_and_inputs_are_untouched():
    tx = ft.split_real_and_imaginary(ft.scale_by_adam())
    params = [torch.zeros(3, dtype=torch.complex64)]
    state = tx.init(params)
    assert isinstance(state, ft.SplitRealAndImaginaryState)
    pair = state.inner_state.mu[0]
    assert pair.real.dtype == torch.float32 and pair.imaginary.shape == (3,)
    g = [_grad(2).to(torch.complex64)]
    before = [g[0].clone()]
    u, state = tx.update(g, state)
    testing.assert_trees_all_equal(g, before)
    assert u[0].dtype == torch.complex64


def test_masked_leaves_and_real_only_trees():
    tx = ft.split_real_and_imaginary(ft.masked(ft.sgd(0.1, momentum=0.9), {"a": True, "b": False}))
    params = {"a": torch.ones(2, dtype=C128), "b": torch.ones(2, dtype=C128)}
    g = {"a": _grad(0)[:2], "b": _grad(1)[:2]}
    u, _ = tx.update(g, tx.init(params), params)
    torch.testing.assert_close(u["a"], -0.1 * g["a"])
    assert torch.equal(u["b"], g["b"])  # masked out: passed through, still complex
    real = ft.split_real_and_imaginary(ft.sgd(0.1))
    p = {"w": torch.ones(2)}
    testing.assert_trees_all_close(real.update(p, real.init(p), p)[0], {"w": -0.1 * p["w"]})
    empty = ft.split_real_and_imaginary(ft.adam(0.1))
    assert empty.update({}, empty.init({}))[0] == {}


def test_compiles_fullgraph():
    tx = ft.split_real_and_imaginary(ft.adam(ft.linear_schedule(0.1, 0.01, 5)))
    params = [torch.ones(3, dtype=C128)]
    state = s_e = tx.init(params)
    torch._dynamo.reset()
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    with testing.assert_max_compiles(1):
        for i in range(4):
            uc, state = compiled([_grad(i)], state, params)
            ue, s_e = tx.update([_grad(i)], s_e, params)
            torch.testing.assert_close(uc[0], ue[0], rtol=1e-12, atol=1e-14)


def test_train_step_smoke():
    tx = ft.split_real_and_imaginary(ft.adam(0.05))
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=C128)
    target = torch.tensor([1.0 - 1j, 0.5j, 2.0], dtype=C128)
    batch = {"x": x, "y": x @ target}

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        return (b["x"] @ p["w"] - b["y"]).abs().pow(2).mean()

    params = {"w": torch.zeros(3, dtype=C128)}
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = step.prepare(ft.TrainState.create(params=params, tx=tx))
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]


def test_bad_inner():
    with pytest.raises(TypeError, match="split_real_and_imaginary"):
        ft.split_real_and_imaginary(ft.tree.norm)
