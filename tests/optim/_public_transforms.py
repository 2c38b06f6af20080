"""Every public name of ``functrain`` and ``functrain.contrib`` that returns a gradient
transformation, built generically with a small learning rate, for the sweep in
``test_public_transforms_sweep.py``.

A name is built as ``fn(learning_rate=LR, **REQUIRED[name])`` when it takes a
``learning_rate`` and otherwise ``fn(**REQUIRED[name])``; the few that need more than keyword
arguments (wrapper classes, factories of factories) have a ``BUILDERS`` entry instead.
Loss-driven transforms get the keyword arguments their docstrings ask for (``value=``,
``grad=``, ``value_fn=``, ``obj_fn=``) from ``EXTRA``, computed on a fixed quadratic loss.
A name that cannot be built on a plain gradient tree goes in ``SKIP`` with the reason;
``public_transform_names()`` finds the names from the return annotations, so that a new
public transform is neither built nor skipped until someone adds it here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import functrain as ft
import functrain.contrib

LR = 1e-2

# A matrix, a vector and a 0-d scalar: the three leaf ranks every transform must handle.
SHAPES = {"w": (3, 4), "b": (4,), "s": ()}


def example_params(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen, dtype=dtype) for k, shape in SHAPES.items()}


def example_grads(steps: int, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Different gradients at every step (a constant gradient hides state bugs)."""
    return [example_params(dtype, seed=100 + i) for i in range(steps)]


def quadratic_loss(params: Any) -> torch.Tensor:
    """A smooth loss of any tree of real tensors, for the loss-driven transforms."""
    total = torch.zeros((), dtype=ft.tree.leaves(params)[0].dtype)
    for x in ft.tree.leaves(params):
        total = total + 0.5 * ((x - 0.25) ** 2).sum()
    return total


def _value(params: Any, grads: Any) -> dict[str, Any]:
    return {"value": quadratic_loss(params)}


def _linesearch(params: Any, grads: Any) -> dict[str, Any]:
    return {"value": quadratic_loss(params), "grad": grads, "value_fn": quadratic_loss}


def _objective(params: Any, grads: Any) -> dict[str, Any]:
    return {"obj_fn": quadratic_loss}


def _every_other_step(step: torch.Tensor) -> torch.Tensor:
    return step % 2 == 0


def _schedule(count: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + count.to(torch.float32))


MASK = {"w": True, "b": False, "s": True}
# freeze/selective_transform: the matrix is trained, so the bad-input checks reach it.
FREEZE = {"w": False, "b": True, "s": False}
LABELS = {"w": "adam", "b": "sgd", "s": "adam"}


def _adam() -> ft.GradientTransformation:
    return ft.adam(LR)


# Keyword arguments each name needs besides ``learning_rate`` (callables: fresh inner
# transforms per build, so that no two cases share one).
REQUIRED: dict[str, Callable[[], dict[str, Any]]] = {
    "adaptive_grad_clip": lambda: {"clipping": 0.05},
    "add_decayed_weights": lambda: {"weight_decay": 1e-2},
    "add_noise": lambda: {"eta": 0.01, "gamma": 0.55, "key": 3},
    "apply_every": lambda: {"k": 2},
    "apply_if_finite": lambda: {"inner": _adam(), "max_consecutive_errors": 2},
    "clip": lambda: {"max_delta": 0.1},
    "clip_by_block_rms": lambda: {"threshold": 0.5},
    "clip_by_global_norm": lambda: {"max_norm": 0.5},
    "conditionally_mask": lambda: {"inner": _adam(), "should_transform_fn": _every_other_step},
    "conditionally_transform": lambda: {
        "inner": _adam(),
        "should_transform_fn": _every_other_step,
    },
    "dp_noisy_mean": lambda: {
        "l2_norm_clip": 1.0,
        "noise_multiplier": 0.5,
        "expected_batch_size": 4.0,
        "seed": 0,
    },
    "ema": lambda: {"decay": 0.9},
    "flatten": lambda: {"inner": _adam()},
    "freeze": lambda: {"mask": FREEZE},
    "galore": lambda: {"rank": 2, "update_proj_gap": 2},
    "hutchinson_estimator_diag_hessian": lambda: {"random_seed": 1},
    "lookahead": lambda: {"fast_optimizer": _adam(), "sync_period": 2, "slow_step_size": 0.5},
    "masked": lambda: {"inner": _adam(), "mask": MASK},
    "measure_with_ema": lambda: {"measure": ft.tree.norm, "decay": 0.9},
    "mechanize": lambda: {"base_optimizer": _adam()},
    "monitor": lambda: {
        "measures": {
            "norm": ft.tree.norm,
            "norm_ema": ft.measure_with_ema(ft.tree.norm, decay=0.9),
        }
    },
    "multi_transform": lambda: {
        "transforms": {"adam": _adam(), "sgd": ft.sgd(LR, momentum=0.9)},
        "param_labels": LABELS,
    },
    "noisy_sgd": lambda: {"key": 1},
    "partition": lambda: {
        "transforms": {"adam": _adam(), "sgd": ft.sgd(LR, momentum=0.9)},
        "param_labels": LABELS,
    },
    "polyak_sgd": lambda: {"max_learning_rate": LR},
    "reduce_on_plateau": lambda: {"patience": 1},
    "sam": lambda: {
        "optimizer": ft.sgd(LR),
        "adv_optimizer": ft.chain(ft.normalize(), ft.sgd(0.05)),
    },
    "scale": lambda: {"step_size": 0.5},
    "scale_by_backtracking_linesearch": lambda: {"max_backtracking_steps": 3},
    "scale_by_dog": lambda: {"init_step": ("heuristic", 1e-6)},
    "scale_by_galore": lambda: {"rank": 2, "update_proj_gap": 2},
    "scale_by_polyak": lambda: {"max_learning_rate": LR},
    "scale_by_schedule": lambda: {"step_size_fn": _schedule},
    "scale_by_zoom_linesearch": lambda: {"max_linesearch_steps": 3},
    "schedule_free": lambda: {"base_optimizer": ft.sgd(LR)},
    "selective_transform": lambda: {"optimizer": _adam(), "freeze_mask": FREEZE},
    "snapshot": lambda: {"measure_name": "norm", "measure": ft.tree.norm},
    "split_real_and_imaginary": lambda: {"inner": _adam()},
    "stateless": lambda: {"f": lambda u, p: ft.tree.map(lambda g: 2.0 * g, u)},
    "stateless_with_tree_map": lambda: {"f": lambda g, p: 2.0 * g},
    "trace": lambda: {"decay": 0.9, "nesterov": True},
    "with_extra_args_support": lambda: {"tx": _adam()},
}


def _muon_matrix_only(**kwargs: Any) -> ft.GradientTransformation:
    return ft.masked(ft.scale_by_muon(**kwargs), {"w": True, "b": False, "s": False})


# Names that are not built by one call of the public name.
BUILDERS: dict[str, Callable[[], ft.GradientTransformation]] = {
    "chain": lambda: ft.chain(ft.clip_by_global_norm(1.0), _adam()),
    "named_chain": lambda: ft.named_chain(("clip", ft.clip_by_global_norm(1.0)), ("opt", _adam())),
    "inject_hyperparams": lambda: ft.inject_hyperparams(ft.adam)(learning_rate=LR),
    # A stateful schedule (the wrapped constant) and a plain number, both injected.
    "inject_stateful_hyperparams": lambda: ft.inject_stateful_hyperparams(ft.adam)(
        learning_rate=ft.WrappedSchedule(ft.constant_schedule(LR)), b1=0.9
    ),
    "MultiSteps": lambda: ft.MultiSteps(_adam(), every_k_schedule=2).gradient_transformation(),
    # Matrices only by contract (muon hands the rest to AdamW): the vector and scalar masked.
    "scale_by_muon": _muon_matrix_only,
}


# Non-default options that take another code path (the updates are the state's moment
# without Nesterov, say), as "name[option]"; they share their name's EXTRA and LIFT_PARAMS.
VARIANTS: dict[str, Callable[[], ft.GradientTransformation]] = {
    "adabelief[nesterov]": lambda: ft.adabelief(LR, nesterov=True),
    "adafactor[factored,momentum]": lambda: ft.adafactor(
        LR, min_dim_size_to_factor=2, momentum=0.9, weight_decay_rate=1e-3
    ),
    "add_decayed_weights[schedule,mask]": lambda: ft.add_decayed_weights(_schedule, mask=MASK),
    "adopt[nesterov]": lambda: ft.adopt(LR, nesterov=True),
    "apply_every[k=1]": lambda: ft.apply_every(k=1),
    "ema[debias=False]": lambda: ft.ema(0.9, debias=False),
    "inject_hyperparams[sgd,momentum]": lambda: ft.inject_hyperparams(ft.sgd)(
        learning_rate=LR, momentum=0.9
    ),
    "lars[nesterov]": lambda: ft.lars(LR, weight_decay=1e-3, nesterov=True),
    "lbfgs[linesearch=None]": lambda: ft.lbfgs(LR, linesearch=None),
    "lookahead[reset_state]": lambda: ft.lookahead(
        _adam(), sync_period=2, slow_step_size=0.5, reset_state=True
    ),
    "mechanize[sgd]": lambda: ft.mechanize(ft.sgd(LR, momentum=0.9)),
    "MultiSteps[sum]": lambda: ft.MultiSteps(
        ft.sgd(LR, momentum=0.9), every_k_schedule=2, use_grad_mean=False
    ).gradient_transformation(),
    "muon[adaptive,nesterov=False]": lambda: ft.muon(LR, adaptive=True, nesterov=False),
    "optimistic_adam[nesterov=False]": lambda: ft.optimistic_adam(LR, nesterov=False),
    "optimistic_adam_v2[nesterov=False]": lambda: ft.optimistic_adam_v2(LR, nesterov=False),
    "polyak_sgd[sps+]": lambda: ft.polyak_sgd(LR, variant="sps+"),
    "prodigy[beta3,safeguard_warmup]": lambda: ft.prodigy(
        LR, beta3=0.9, safeguard_warmup=True, weight_decay=1e-3
    ),
    "rmsprop[centered,momentum]": lambda: ft.rmsprop(LR, centered=True, momentum=0.9),
    "rmsprop[nesterov,bias_correction]": lambda: ft.rmsprop(
        LR, momentum=0.9, nesterov=True, bias_correction=True
    ),
    "sam[sync_period=1]": lambda: ft.sam(ft.sgd(LR), ft.sgd(0.05), sync_period=1),
    "sam[reset_state=False]": lambda: ft.sam(
        ft.adam(LR), ft.chain(ft.normalize(), ft.sgd(0.05, momentum=0.5)), reset_state=False
    ),
    "scale_by_adam[nesterov]": lambda: ft.scale_by_adam(nesterov=True),
    "scale_by_adopt[nesterov]": lambda: ft.scale_by_adopt(nesterov=True),
    "scale_by_amsgrad[no bias correction]": lambda: ft.scale_by_amsgrad(
        bias_correction_mu=False, bias_correction_nu=False
    ),
    "scale_by_factored_rms[factored]": lambda: ft.scale_by_factored_rms(min_dim_size_to_factor=2),
    "scale_by_lion[smooth]": lambda: ft.scale_by_lion(mode="smooth"),
    "scale_by_muon[nesterov=False]": lambda: _muon_matrix_only(nesterov=False),
    "scale_by_rms[bias_correction]": lambda: ft.scale_by_rms(bias_correction=True),
    "scale_by_stddev[bias_correction]": lambda: ft.scale_by_stddev(bias_correction=True),
    "scale_by_zoom_linesearch[one]": lambda: ft.scale_by_zoom_linesearch(
        3, initial_guess_strategy="one"
    ),
    "schedule_free[adam]": lambda: ft.schedule_free(ft.adam(LR), learning_rate=LR),
    "schedule_free_adamw[warmup]": lambda: ft.schedule_free_adamw(
        LR, warmup_steps=2, weight_decay=1e-3
    ),
    "sgd[momentum]": lambda: ft.sgd(LR, momentum=0.9),
    "sgd[nesterov]": lambda: ft.sgd(LR, momentum=0.9, nesterov=True),
    "signum[beta=0]": lambda: ft.signum(LR, beta=0.0),
    "sm3[momentum=0]": lambda: ft.sm3(LR, momentum=0.0),
    "trace[nesterov=False]": lambda: ft.trace(0.9),
}

# Keyword arguments of ``update`` for the loss-driven transforms (see their docstrings).
EXTRA: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
    "hutchinson_estimator_diag_hessian": _objective,
    "lbfgs": _linesearch,
    "momo": _value,
    "momo_adam": _value,
    "polyak_sgd": _value,
    "reduce_on_plateau": _value,
    "scale_by_backtracking_linesearch": _linesearch,
    "scale_by_polyak": _value,
    "scale_by_zoom_linesearch": _linesearch,
    "sophia": _objective,
    "scale_by_sophia": _objective,
}

# Params that are not a plain tree like the gradients.
LIFT_PARAMS: dict[str, Callable[[Any], Any]] = {
    "lookahead": ft.LookaheadParams.init_synced,
}

SKIP: dict[str, str] = {
    "differentially_private_aggregate": "takes per-example gradients (a leading batch "
    "dimension), not a tree like the params; tests/grads/test_privacy*.py",
    "dpsgd": "differentially_private_aggregate + sgd: per-example gradients, not a tree "
    "like the params; tests/grads/test_privacy*.py",
}


@dataclass(frozen=True)
class Case:
    """One public name: how to build it, what ``update`` needs, and how params look."""

    name: str
    build: Callable[[], ft.GradientTransformation]
    extra: Callable[[Any, Any], dict[str, Any]] | None = None
    lift_params: Callable[[Any], Any] | None = None

    def update_kwargs(self, params: Any, grads: Any) -> dict[str, Any]:
        return {} if self.extra is None else self.extra(params, grads)


def _public_object(name: str) -> Any:
    return getattr(ft, name) if hasattr(ft, name) else getattr(functrain.contrib, name)


def public_names() -> list[str]:
    return sorted(set(ft.__all__) | set(functrain.contrib.__all__))


def returns_transform(obj: Any) -> bool:
    """A class with ``gradient_transformation()``, or a function annotated to return one."""
    if inspect.isclass(obj):
        return callable(getattr(obj, "gradient_transformation", None))
    if not inspect.isfunction(obj):
        return False
    return "GradientTransformation" in str(inspect.signature(obj).return_annotation)


def public_transform_names() -> set[str]:
    return {n for n in public_names() if returns_transform(_public_object(n))}


def _generic_builder(name: str) -> Callable[[], ft.GradientTransformation]:
    fn = _public_object(name)
    takes_lr = "learning_rate" in inspect.signature(fn).parameters
    required = REQUIRED.get(name, dict)

    def build() -> ft.GradientTransformation:
        kwargs = required()
        if takes_lr:
            kwargs.setdefault("learning_rate", LR)
        return fn(**kwargs)

    return build


def base_name(case_name: str) -> str:
    """The public name of a case: ``"sgd"`` for ``"sgd[momentum]"``."""
    return case_name.split("[")[0]


def _cases() -> dict[str, Case]:
    builders = {n: BUILDERS.get(n) or _generic_builder(n) for n in public_transform_names()}
    builders = {n: b for n, b in builders.items() if n not in SKIP} | VARIANTS
    return {
        n: Case(n, b, EXTRA.get(base_name(n)), LIFT_PARAMS.get(base_name(n)))
        for n, b in sorted(builders.items())
    }


CASES: dict[str, Case] = _cases()
