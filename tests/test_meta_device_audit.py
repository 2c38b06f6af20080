"""Device audit on the ``meta`` device: code that silently assumes the CPU fails here.

There is no GPU in CI, so the CUDA tests skip. The ``meta`` device follows CUDA's device-mixing
rules: a CPU tensor with dimensions combined with a meta tensor raises, a 0-d CPU tensor is
allowed as a scalar, and a host read (``.item()``, ``float()``, ``bool()``) raises. Running the
public capabilities with every parameter, gradient and batch on ``meta`` therefore catches a
``torch.zeros(n)`` without ``device=``, a host read inside a step, or a CPU generator used for a
device tensor, without a GPU. The tests only check that the call runs and that every output
tensor stays on ``meta`` (or is a 0-d CPU tensor where that is the design, e.g. the RNG key).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft
from functrain import tree
from functrain.optim import fused

META = torch.device("meta")


def _params() -> dict[str, torch.Tensor]:
    """A tiny two-layer model's parameters on ``meta`` (one matrix, one vector)."""
    return {"w": torch.empty(4, 3, device=META), "b": torch.empty(3, device=META)}


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    return {"x": torch.empty(n, 4, device=META), "y": torch.empty(n, 3, device=META)}


def _loss(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = torch.tanh(batch["x"] @ params["w"] + params["b"])
    return (out - batch["y"]).square().mean()


def _assert_on_meta(x: Any) -> None:
    """Every tensor leaf of ``x`` lives on ``meta`` (0-d CPU scalars are allowed)."""
    for leaf in tree.leaves(x):
        if isinstance(leaf, torch.Tensor):
            ok = leaf.device.type == "meta" or (leaf.device.type == "cpu" and leaf.dim() == 0)
            assert ok, f"{tuple(leaf.shape)} tensor on {leaf.device}"


_ALIASES: dict[str, Callable[[Any], ft.GradientTransformation]] = {
    "sgd": lambda learning_rate: ft.sgd(learning_rate, momentum=0.9),
    "adam": ft.adam,
    "adamw": ft.adamw,
    "nadam": ft.nadam,
    "nadamw": ft.nadamw,
    "radam": ft.radam,
    "amsgrad": ft.amsgrad,
    "adamax": ft.adamax,
    "rmsprop": lambda learning_rate: ft.rmsprop(learning_rate, centered=True, momentum=0.9),
    "adagrad": ft.adagrad,
    # min_dim_size_to_factor=2 so the 4x3 matrix takes the factored path.
    "adafactor": lambda learning_rate: ft.adafactor(
        learning_rate, min_dim_size_to_factor=2, momentum=0.9
    ),
    "lion": ft.lion,
    "lamb": ft.lamb,
    "lars": ft.lars,
    "noisy_sgd": lambda learning_rate: ft.noisy_sgd(learning_rate, seed=0),
    "sign_sgd": ft.sign_sgd,
    "muon": lambda learning_rate: ft.muon(learning_rate, weight_decay=0.1),
    "muon_bf16": lambda learning_rate: ft.muon(learning_rate, ns_dtype=torch.bfloat16),
    "schedule_free_adamw": lambda learning_rate: ft.schedule_free_adamw(
        learning_rate, weight_decay=0.1
    ),
    "schedule_free_sgd": ft.schedule_free_sgd,
}


def _run_tx(tx: ft.GradientTransformation, steps: int = 2) -> None:
    params = _params()
    state = tx.init(params)
    _assert_on_meta(state)
    for _ in range(steps):
        grads = _params()
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
    _assert_on_meta((params, state))


@pytest.mark.parametrize("name", sorted(_ALIASES))
def test_alias_float_learning_rate(name: str) -> None:
    _run_tx(_ALIASES[name](0.1))


@pytest.mark.parametrize("name", sorted(_ALIASES))
def test_alias_schedule_learning_rate(name: str) -> None:
    _run_tx(_ALIASES[name](ft.cosine_decay_schedule(0.1, 10)))


@pytest.mark.parametrize("name", sorted(_ALIASES))
def test_alias_inject_hyperparams(name: str) -> None:
    # A schedule as the injected learning rate: evaluated on the count inside update.
    _run_tx(ft.inject_hyperparams(_ALIASES[name])(learning_rate=ft.cosine_decay_schedule(0.1, 10)))


@pytest.mark.parametrize(
    "clip",
    [
        lambda: ft.clip_by_global_norm(1.0),
        lambda: ft.clip_by_block_rms(1.0),
        lambda: ft.adaptive_grad_clip(0.1),
    ],
    ids=["global_norm", "block_rms", "adaptive"],
)
def test_clipping(clip: Callable[[], ft.GradientTransformation]) -> None:
    _run_tx(ft.chain(clip(), ft.sgd(0.1)))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "lion"])
def test_fused_update_in_place(name: str) -> None:
    tx = ft.chain(ft.clip_by_global_norm(1.0), _ALIASES[name](0.1))
    params = _params()
    state = tx.init(params)
    found_inf = torch.zeros((), dtype=torch.bool, device=META)
    result = fused.update_in_place(
        tx, _params(), state, params, found_inf=found_inf, update_norm=True, engines=("foreach",)
    )
    if result is not None:
        _assert_on_meta(result)
    result = fused.update_in_place(tx, _params(), state, params, update_norm=True)
    if result is not None:
        _assert_on_meta(result)
    _assert_on_meta(params)


@pytest.fixture
def kernels_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets the ``kernel`` engine (``torch._fused_adam_`` and friends, used on CPU and CUDA)
    accept meta leaves, so that its device handling of lr/step/found_inf is audited."""
    from functrain.optim import _fused_engines

    monkeypatch.setattr(_fused_engines, "_KERNEL_DEVICES", ("cpu", "cuda", "meta"))


def _kernel_update(tx: ft.GradientTransformation) -> None:
    params = _params()
    state = tx.init(params)
    for found_inf in (None, torch.zeros((), dtype=torch.bool, device=META)):
        for update_norm in (False, True):
            result = fused.update_in_place(
                tx,
                _params(),
                state,
                params,
                found_inf=found_inf,
                update_norm=update_norm,
                engines=("kernel",),
            )
            assert result is not None
            _assert_on_meta(result)
            state = result.opt_state
    _assert_on_meta(params)


_KERNEL_CASES = {
    "adam": lambda: ft.adam(0.1),
    "adamw_clipped": lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(0.1)),
    "sgd": lambda: ft.sgd(0.1, momentum=0.9),
    "adamw_schedule": lambda: ft.adamw(ft.cosine_decay_schedule(0.1, 10)),
}
_NO_META_KERNEL = {
    "sgd": "aten::_fused_sgd_ has no Meta kernel",
    "adamw_schedule": "aten::_fused_adamw_.tensor_lr (a tensor learning rate) has no Meta kernel",
}


@pytest.mark.usefixtures("kernels_on_meta")
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=[pytest.mark.xfail(strict=True, raises=Exception, reason=_NO_META_KERNEL[name])]
            if name in _NO_META_KERNEL
            else [],
        )
        for name in _KERNEL_CASES
    ],
)
def test_fused_kernel_engine(name: str) -> None:
    _kernel_update(_KERNEL_CASES[name]())


@pytest.mark.parametrize(
    "skip",
    [
        None,
        pytest.param(
            "finite",
            marks=pytest.mark.xfail(
                strict=True,
                raises=RuntimeError,
                reason="documented: eager MultiSteps reads should_skip_update_fn's bool on the "
                "host (bool(skip) -> Tensor.item(), which meta refuses; a sync on CUDA)",
            ),
        ),
    ],
)
def test_multi_steps(skip: str | None) -> None:
    fn = ft.skip_not_finite if skip else None
    _run_tx(ft.MultiSteps(ft.adam(0.1), 2, should_skip_update_fn=fn), steps=3)


def test_apply_if_finite() -> None:
    _run_tx(ft.apply_if_finite(ft.adam(0.1), 2))


def _train(**options: Any) -> None:
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adam(1e-3))
    step = ft.make_train_step(_loss, tx, **options)
    state = ft.TrainState.create(params=_params(), tx=tx, seed=0)
    _assert_on_meta(state)
    for _ in range(2):
        state, metrics = step(state, _batch())
    _assert_on_meta((state.params, state.opt_state, state.extra, metrics))
    assert state.key is None or state.key.device.type == "cpu"


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_train_step_micro_batches(strategy: str) -> None:
    _train(strategy=strategy, micro_batches=2)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_train_step_noise_scale_stats(strategy: str) -> None:
    _train(strategy=strategy, micro_batches=2, grad_stats=ft.noise_scale_hook(cosine=True))


@pytest.mark.parametrize("fused_", [True, False])
def test_train_step_nonfinite_skip_and_loss_scale(fused_: bool) -> None:
    _train(
        micro_batches=2,
        nonfinite="skip",
        loss_scale=ft.DynamicLossScale(init_scale=2.0**8, growth_interval=2),
        fused=fused_,
    )


def test_train_step_unfused_plain() -> None:
    _train(fused=False, norm_metrics=True)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_train_step_reduce_on_plateau(micro_batches: int) -> None:
    """The loss reaches ``tx.update`` as ``value=``: the plateau state stays on the device."""
    tx = ft.chain(ft.adam(1e-3), ft.reduce_on_plateau(patience=1))
    step = ft.make_train_step(_loss, tx, micro_batches=micro_batches)
    state = ft.TrainState.create(params=_params(), tx=tx)
    for _ in range(3):
        state, metrics = step(state, _batch())
    _assert_on_meta((state.params, state.opt_state, metrics))


def test_parameter_averaging() -> None:
    params, average = _params(), _params()
    _assert_on_meta(ft.incremental_update(params, average, 0.1))
    _assert_on_meta(ft.incremental_update(params, average, torch.tensor(0.1, device=META)))
    _assert_on_meta(ft.periodic_update(params, average, torch.tensor(4, device=META), 2))


def test_schedule_free_eval_params() -> None:
    tx = ft.schedule_free_adamw(0.1)
    params = _params()
    state = tx.init(params)
    updates, state = tx.update(_params(), state, params)
    _assert_on_meta(ft.schedule_free_eval_params(state, ft.apply_updates(params, updates)))


@pytest.fixture
def allow_meta_params(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lifts the per-sample functions' deliberate refusal of meta parameters (a clear error
    for users, since meta results carry no values) so that the code behind it is audited."""
    from functrain.grads import _per_example, clipping, per_sample, streaming

    original = _per_example._check_options

    def check(chunk_size: Any, randomness: Any, loss_fn: Any, params: Any, *rest: Any) -> None:
        real = tree.map(lambda t: torch.empty(0, dtype=t.dtype), params)
        original(chunk_size, randomness, loss_fn, real, *rest)

    for module in (clipping, per_sample, streaming):
        monkeypatch.setattr(module, "_check_options", check)


@pytest.mark.usefixtures("allow_meta_params")
@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_per_sample_grads(method: str) -> None:
    grads = ft.per_sample_grads(_loss, _params(), _batch(), method=method)
    _assert_on_meta(grads)
    assert grads["w"].shape == (4, 4, 3)


@pytest.mark.usefixtures("allow_meta_params")
@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_clipped_grad_sum(method: str) -> None:
    result = ft.clipped_grad_sum(_loss, _params(), _batch(), 0.5, chunk_size=2, method=method)
    _assert_on_meta(result)


@pytest.mark.usefixtures("allow_meta_params")
def test_dp_step() -> None:
    tx = ft.chain(ft.dp_noisy_mean(1.0, 1.1, 4, seed=0), ft.sgd(0.1, momentum=0.9))
    step = ft.make_train_step(_loss, tx, per_example_clip=1.0)
    state = ft.TrainState.create(params=_params(), tx=tx, seed=0)
    for _ in range(2):
        state, metrics = step(state, _batch())
    _assert_on_meta((state.params, state.opt_state, metrics))


def test_dp_noisy_mean_transform() -> None:
    _run_tx(ft.chain(ft.dp_noisy_mean(1.0, 1.1, 4, seed=0), ft.sgd(0.1)))


def test_train_state_create() -> None:
    tx = ft.adamw(0.1)
    state = ft.TrainState.create(params=_params(), tx=tx, seed=0)
    _assert_on_meta((state.params, state.opt_state, state.step))
    assert state.key is not None and state.key.device.type == "cpu"
