"""Activation checkpointing and saved-tensor hooks in ``loss_fn``: which step variants work.

The eager ``"loop"`` step with the autograd backend (the default) and the eval step run
``torch.utils.checkpoint`` / ``checkpoint_sequential`` / ``save_on_cpu`` and give the plain
loss's numbers bit for bit. Variants that differentiate with torch.func (``grad_backend="func"``,
``strategy="vmap"``, ``compile=``) cannot, and raise a ``ValueError`` that says why and what
works. A failed compilation no longer leaves saved-tensor hooks disabled for the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import functrain as ft

LR = 0.1


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w1": torch.randn(8, 4, generator=g),
        "b1": torch.randn(8, generator=g),
        "w2": torch.randn(1, 8, generator=g),
    }


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(6, 4, generator=g), "y": torch.randn(6, generator=g)}


def _hidden(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p["w1"].T + p["b1"])


def _head(p: dict[str, torch.Tensor], h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((h @ p["w2"].T).squeeze(-1) - y).square().mean()


def plain(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return _head(p, _hidden(p, b["x"]), b["y"])


def ckpt(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return _head(p, checkpoint(_hidden, p, b["x"], use_reentrant=False), b["y"])


def ckpt_reentrant(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    # The reentrant variant sees only top-level tensor arguments: pass the weights explicitly.
    def hidden(w1: torch.Tensor, b1: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _hidden({"w1": w1, "b1": b1}, x)

    h = checkpoint(hidden, p["w1"], p["b1"], b["x"], use_reentrant=True)
    return _head(p, h, b["y"])


def ckpt_sequential(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    layers = [lambda x: x @ p["w1"].T + p["b1"], torch.tanh, lambda h: h @ p["w2"].T]
    out = checkpoint_sequential(layers, 2, b["x"], use_reentrant=False)
    return (out.squeeze(-1) - b["y"]).square().mean()


def offload(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.autograd.graph.save_on_cpu():
        return plain(p, b)


# The non-reentrant forms: saved-tensor hooks. (The reentrant checkpoint is an
# autograd.Function that torch refuses under backward(inputs=...) and torch.func.)
HOOKS: list[Callable[..., Any]] = [ckpt, ckpt_sequential, offload]


def _step(loss_fn: Callable[..., Any], **kwargs: Any) -> dict[str, torch.Tensor]:
    tx = ft.sgd(LR)
    step = ft.make_train_step(loss_fn, tx, donate=False, **kwargs)
    state = ft.TrainState.create(params=_params(), tx=tx)
    new_state, _ = step(state, _batch())
    return new_state.params


def _float64_sgd() -> dict[str, torch.Tensor]:
    """One SGD step on the full-batch mean loss, differentiated in float64."""
    p = {k: v.double().requires_grad_() for k, v in _params().items()}
    b = {k: v.double() for k, v in _batch().items()}
    grads = torch.autograd.grad(plain(p, b), list(p.values()))
    return {k: (v - LR * g).detach() for (k, v), g in zip(p.items(), grads)}


@pytest.mark.parametrize("micro_batches", [1, 2, [4, 2]])
@pytest.mark.parametrize("loss_fn", HOOKS, ids=lambda f: f.__name__)
def test_eager_loop_step_runs_checkpointed_loss_like_plain_one(
    loss_fn: Callable[..., Any], micro_batches: Any
) -> None:
    want = _step(plain, micro_batches=micro_batches)
    got = _step(loss_fn, micro_batches=micro_batches)
    ref = _float64_sgd()
    for k in want:
        # Checkpointing recomputes the same ops: the same bits.
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_fn", HOOKS, ids=lambda f: f.__name__)
def test_eval_step_runs_checkpointed_loss_like_plain_one(loss_fn: Callable[..., Any]) -> None:
    state = ft.TrainState.create(params=_params(), tx=ft.sgd(LR))
    want = ft.make_eval_step(plain, micro_batches=2)(state, _batch())["loss"]
    got = ft.make_eval_step(loss_fn, micro_batches=2)(state, _batch())["loss"]
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"grad_backend": "func"},
        {"grad_backend": "func", "micro_batches": 2},
        {"strategy": "vmap"},
        {"strategy": "vmap", "micro_batches": 2},
    ],
    ids=["func", "func-k2", "vmap", "vmap-k2"],
)
@pytest.mark.parametrize("loss_fn", HOOKS, ids=lambda f: f.__name__)
def test_torch_func_variants_refuse_saved_tensor_hooks_clearly(
    loss_fn: Callable[..., Any], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="saved-tensor hooks") as info:
        _step(loss_fn, **kwargs)
    message = str(info.value)
    assert "activation checkpointing" in message
    assert "strategy='loop'" in message and "grad_backend='autograd'" in message
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error stays chained


def test_compiled_step_refuses_checkpointing_and_leaves_hooks_usable() -> None:
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="saved-tensor hooks") as info:
        _step(ckpt, micro_batches=2, compile={"backend": "aot_eager"})
    assert "compile=" in str(info.value)
    # The failed compilation used to leave saved-tensor hooks disabled process-wide: every
    # later checkpoint, even in an eager step, raised torch.func's refusal.
    assert torch._C._autograd._saved_tensors_hooks_is_enabled()
    got, want = _step(ckpt, micro_batches=2), _step(plain, micro_batches=2)
    for k in want:
        assert torch.equal(got[k], want[k])


def test_reentrant_checkpoint_is_refused_by_torch_with_the_way_out() -> None:
    # The step differentiates with respect to its own leaves (backward(inputs=...)), which the
    # reentrant checkpoint cannot serve; torch's error already names use_reentrant=False.
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        _step(ckpt_reentrant, micro_batches=2)
