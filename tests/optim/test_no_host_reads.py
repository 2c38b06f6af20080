"""Optimizers with tensor hyperparameters (``inject_hyperparams``) never read them on the host.

On CUDA such a read is a device synchronisation, every step. Some ``torch._foreach_*`` calls
resolve a 0-d tensor as a Python scalar and read it (``_foreach_add(xs, t)``; ``_foreach_lerp``
has no tensor-weight overload at all); a dispatch mode catches any read on the CPU too. The
pure path is run member by member (the fused pure path reads CPU hyperparameters on purpose:
there they are host memory) and the in-place ``"foreach"`` engine as the step runs it.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft
from functrain.optim import _pure_fused, fused

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}
ALIASES = ["adam", "adamw", "nadam", "nadamw", "radam", "amsgrad", "adamax", "rmsprop"]
ALIASES += ["adagrad", "lion", "lamb", "lars", "sgd", "adafactor", "sign_sgd"]


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            raise AssertionError(f"host read of a tensor: {func}")
        return func(*args, **(kwargs or {}))


def _tree(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=gen).to(dtype),
        "b": torch.randn(3, generator=gen).to(dtype),
        "s": torch.randn((), generator=gen).to(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ALIASES)
def test_pure_update_reads_no_tensor_hyperparameter(name, dtype, monkeypatch):
    monkeypatch.setattr(_pure_fused, "ENABLED", False)
    tx = ft.inject_hyperparams(getattr(ft, name))(learning_rate=0.1)
    params, grads = _tree(0, dtype), _tree(1, dtype)
    state = tx.init(params)
    expected, _ = tx.update(grads, state, params)  # outside the mode
    with _NoHostReads():
        updates, _ = tx.update(grads, state, params)
    for key in params:  # the same numbers, each leaf in its dtype
        assert updates[key].dtype == dtype
        torch.testing.assert_close(updates[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["adam", "adamw", "nadamw", "sgd"])
def test_foreach_engine_reads_no_tensor_hyperparameter(name):
    tx = ft.inject_hyperparams(getattr(ft, name))(learning_rate=0.1)
    params, grads = _tree(0, torch.float32), _tree(1, torch.float32)
    state = tx.init(params)
    with _NoHostReads():
        done = fused.update_in_place(tx, grads, state, params, engines=("foreach",))
    assert done is not None and done.engine == "foreach"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("name", ["adam", "adamw", "nadamw", "radam", "rmsprop", "lion", "sgd"])
def test_cuda_train_step_with_tensor_hyperparameters_reads_nothing(name):
    """On CUDA a host read is a device sync. With tensor hyperparameters on the device, the
    fused kernel engine declines them (it only takes numbers it can read for free) and the
    foreach engine must then run without a single read; a keyless state has no CPU key."""
    tx = ft.inject_hyperparams(getattr(ft, name))(learning_rate=0.1)
    params = {k: v.cuda() for k, v in _tree(0, torch.float32).items()}

    def loss_fn(p, batch):
        return ((batch * p["w"].sum() + p["b"].sum() + p["s"]) ** 2).mean()

    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = ft.TrainState.create(params=params, tx=tx, seed=None)
    batch = torch.randn(4, device="cuda")
    state, _ = step(state, batch)  # first call: checks and planning may read
    with _NoHostReads():
        state, metrics = step(state, batch)
    assert bool(torch.isfinite(metrics["loss"]))
