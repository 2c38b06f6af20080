"""Every transform and alias of the transforms/aliases modules, built around a tensor learning rate.

Shared by the compile and purity tests. Each case is ``name -> factory(lr) -> transform``;
transforms without a learning rate of their own are chained with ``scale_by_learning_rate(lr)``
so that every case reads the tensor ``lr``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import functrain as ft

Factory = Callable[[torch.Tensor], ft.GradientTransformation]


def _with_lr(tx: ft.GradientTransformation) -> Factory:
    return lambda lr: ft.chain(tx, ft.scale_by_learning_rate(lr))


def _schedule(count: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + count.to(torch.float32))


TRANSFORMS: dict[str, Factory] = {
    "scale": lambda lr: ft.chain(ft.scale(0.5), ft.scale(lr)),
    "scale_by_learning_rate": lambda lr: ft.scale_by_learning_rate(lr),
    "scale_by_schedule": lambda lr: ft.chain(
        ft.scale_by_schedule(_schedule), ft.scale_by_learning_rate(lr)
    ),
    "scale_by_sign": _with_lr(ft.scale_by_sign()),
    "scale_by_trust_ratio": _with_lr(ft.scale_by_trust_ratio(min_norm=1e-3, eps=1e-6)),
    "scale_by_param_block_norm": _with_lr(ft.scale_by_param_block_norm()),
    "scale_by_param_block_rms": _with_lr(ft.scale_by_param_block_rms()),
    "trace": _with_lr(ft.trace(0.9, nesterov=True)),
    "ema": _with_lr(ft.ema(0.9)),
    "add_decayed_weights": _with_lr(ft.add_decayed_weights(1e-2)),
    "add_decayed_weights_schedule": _with_lr(ft.add_decayed_weights(_schedule)),
    "add_noise": _with_lr(ft.add_noise(0.01, 0.55, key=3)),
    "scale_by_adam": _with_lr(ft.scale_by_adam(nesterov=True, eps_root=1e-12)),
    "scale_by_amsgrad": _with_lr(ft.scale_by_amsgrad()),
    "scale_by_adamax": _with_lr(ft.scale_by_adamax()),
    "scale_by_radam": _with_lr(ft.scale_by_radam(b2=0.9)),
    "scale_by_lion": _with_lr(ft.scale_by_lion()),
    "scale_by_rms": _with_lr(ft.scale_by_rms(bias_correction=True)),
    "scale_by_stddev": _with_lr(ft.scale_by_stddev(eps_in_sqrt=False)),
    "scale_by_rss": _with_lr(ft.scale_by_rss()),
    "scale_by_factored_rms": _with_lr(ft.scale_by_factored_rms(min_dim_size_to_factor=2)),
    "clip": _with_lr(ft.clip(0.1)),
    "clip_by_global_norm": _with_lr(ft.clip_by_global_norm(0.5)),
    "clip_by_block_rms": _with_lr(ft.clip_by_block_rms(0.5)),
    "adaptive_grad_clip": _with_lr(ft.adaptive_grad_clip(0.05)),
}

ALIASES: dict[str, Factory] = {
    "sgd": lambda lr: ft.sgd(lr, momentum=0.9, nesterov=True),
    "noisy_sgd": lambda lr: ft.noisy_sgd(lr, key=1),
    "sign_sgd": ft.sign_sgd,
    "adam": ft.adam,
    "adamw": lambda lr: ft.adamw(lr, weight_decay=0.1),
    "nadam": ft.nadam,
    "nadamw": ft.nadamw,
    "radam": ft.radam,
    "amsgrad": ft.amsgrad,
    "adamax": ft.adamax,
    "rmsprop": lambda lr: ft.rmsprop(lr, centered=True, momentum=0.9),
    "adagrad": ft.adagrad,
    "lion": ft.lion,
    "lamb": lambda lr: ft.lamb(lr, weight_decay=0.01),
    "lars": lambda lr: ft.lars(lr, weight_decay=0.01),
    "adafactor": lambda lr: ft.adafactor(lr, min_dim_size_to_factor=2, momentum=0.9),
}

ALL: dict[str, Factory] = {**TRANSFORMS, **ALIASES}


def example_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """A small tree with a matrix (factored by Adafactor above), a vector and a 3-d tensor."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=gen, dtype=dtype),
        "b": torch.randn(4, generator=gen, dtype=dtype),
        "k": torch.randn(2, 2, 3, generator=gen, dtype=dtype),
    }


def example_grads(steps: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    return [example_params(dtype, seed=100 + i) for i in range(steps)]


def check_compiled_matches_eager(factory: Factory, backend, steps: int = 3, **tolerance) -> None:
    """Compiles ``update + apply_updates`` with ``fullgraph=True`` and compares with eager.

    Runs ``steps`` updates, then changes the learning-rate tensor in place and runs one more;
    ``backend`` sees every compilation (a counting backend can then assert there was one).
    """
    from functrain import testing

    lr_eager, lr_compiled = torch.tensor(0.1), torch.tensor(0.1)
    tx_eager, tx_compiled = factory(lr_eager), factory(lr_compiled)

    def make_step(tx: ft.GradientTransformation):
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return ft.apply_updates(params, updates), state

        return step

    eager_step = make_step(tx_eager)
    compiled_step = torch.compile(make_step(tx_compiled), fullgraph=True, backend=backend)
    params = example_params()
    eager = (params, tx_eager.init(params))
    compiled = (params, tx_compiled.init(params))
    grads = example_grads(steps + 1)
    for i, g in enumerate(grads):
        if i == steps:
            lr_eager.fill_(0.03)
            lr_compiled.fill_(0.03)
        eager = eager_step(*eager, g)
        compiled = compiled_step(*compiled, g)
        testing.assert_trees_all_close(compiled, eager, **tolerance)
