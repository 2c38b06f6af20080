"""A whole train step with K=4 micro-batches: ``make_train_step`` vs the classic PyTorch loop.

Models: ``TinyGPT`` (a ~3.2M-parameter decoder-only transformer LM, batch 8 × 32 tokens, see
``_models.py``) and a smaller MLP (~0.4M parameters, batch 64). Optimizer: AdamW, ``lr=1e-3``,
``weight_decay=1e-2``. Variants, all eager unless said otherwise:

* classic: ``(loss / K).backward()`` per micro-batch, ``torch.optim.AdamW(fused=True).step()``,
  ``zero_grad()`` (the reference of every ratio);
* ``ft.make_train_step(loss_fn, tx, micro_batches=4)`` with ``strategy="loop"`` and
  ``grad_backend="autograd"`` (what the default ``"auto"`` picks for an eager loop) or
  ``"func"``, and with ``strategy="vmap"``; each with ``norm_metrics=False`` (the classic loop
  computes no norms either), plus the all-defaults step (``norm_metrics=True``: ``grad_norm``,
  ``update_norm``, ``param_norm``) and ``nonfinite="ignore"`` (no NaN/inf check, which the
  classic loop lacks too);
* parameter groups: the autograd loop step with ``ft.partition`` of two AdamW (matrices;
  vectors at a tenth of the learning rate without decay) against the classic loop with
  ``torch.optim.AdamW(fused=True)`` on the same two ``param_groups``;
* the autograd loop step with ``grad_stats=ft.noise_scale_hook()`` and with
  ``noise_scale_hook(cosine=True)``: the gradient-noise-scale metrics from the K micro-batch
  gradients; the notes give their cost relative to the same step without them;
* ``make_train_step(..., compile=True)`` (full mode only; compilation time excluded from the
  timing and reported in the notes).

Peak memory is the step's transient memory on the CPU: before each measured step the freed
heap is handed back to the OS (``malloc_trim``) and the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``); the peak is then ``VmHWM`` after the step minus ``VmRSS`` before
it. What every variant keeps between steps (parameters, optimizer state) is in the baseline,
so the number is what one step adds: activations, gradients, optimizer temporaries (the
least of 5 steps: noise such as heap fragmentation only adds). Where
``/proc`` cannot do this the memory columns are left out.

Check: after a few steps on varying batches every functrain variant's parameters equal the
classic loop's (to float32 rounding, amplified a little by Adam's normalisation).
"""

from __future__ import annotations

import ctypes
import gc
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from benchmarks import Section, interleaved_medians, synced
from benchmarks._models import gpt_config, lm_batches, lm_loss, make_gpt

K = 4
LR, WEIGHT_DECAY = 1e-3, 1e-2
BARS = {"time": 1.05, "memory": 1.05}
CHECK_STEPS = 3
# ‖params − classic params‖ / ‖classic params − initial params‖: the loop variants reproduce the
# classic loop's arithmetic, vmap sums the micro-batch gradients in another order (Adam's
# normalisation then magnifies rounding in near-zero gradients); a lost step would show as ~0.3.
TOL = 1e-2
BAR_ROWS = ("functrain loop, autograd", "functrain loop, func")
GROUPS = "functrain loop, autograd, 2 parameter groups (ft.partition)"
CLASSIC_GROUPS = "classic loop, 2 parameter groups (torch.optim fused)"
NOISE_SCALE = "functrain loop, autograd, grad_stats=noise_scale_hook()"
NOISE_SCALE_COSINE = "functrain loop, autograd, grad_stats=noise_scale_hook(cosine=True)"


# --------------------------------------------------------------------------- peak memory


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_step_memory(fn: Callable[[], Any], repeats: int, device: str = "cpu") -> float | None:
    """The least, over ``repeats``, of the bytes one call of ``fn`` adds at its peak.

    The least because the noise only adds (heap fragmentation, lazily mapped pages): the
    smallest of several calls is the closest to what the step itself needs. On a CUDA device:
    the allocator's peak of allocated bytes above what was allocated before the call.
    """
    if device.startswith("cuda"):
        samples = []
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            samples.append(torch.cuda.max_memory_allocated(device) - before)
        return min(samples)
    libc = _libc()
    samples = []
    for _ in range(repeats):
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)
        if not _reset_peak():
            return None
        before = _status("VmRSS")
        fn()
        samples.append(_status("VmHWM") - before)
    return min(samples)


# --------------------------------------------------------------------------- models


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10)
    )


def _mlp_batches(n: int, batch: int, device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "x": torch.randn(batch, 256, generator=gen).to(device),
            "y": torch.randint(0, 10, (batch,), generator=gen).to(device),
        }
        for _ in range(n)
    ]


def _models(
    quick: bool, device: str = "cpu"
) -> dict[str, tuple[Callable[[], nn.Module], Callable, list]]:
    """name -> (fresh module factory, loss of (outputs, batch), batches)."""
    cfg = gpt_config(quick)
    n = (1 if quick else CHECK_STEPS) + 1
    return {
        "TinyGPT": (
            lambda: make_gpt(cfg, seed=0, device=device),
            lambda out, b: lm_loss(out, b["y"]),
            lm_batches(cfg, n, seed=1, device=device),
        ),
        "MLP": (
            lambda: _mlp().to(device),
            lambda out, b: F.cross_entropy(out, b["y"]),
            _mlp_batches(n, 16 if quick else 64, device),
        ),
    }


# --------------------------------------------------------------------------- variants


class Classic:
    """The imperative accumulation loop on its own copy of the model (``groups``: two
    parameter groups, see :func:`_two_groups`)."""

    def __init__(
        self, factory: Callable[[], nn.Module], loss: Callable, groups: bool = False
    ) -> None:
        self.module = factory()
        self.loss = loss
        params: Any = list(self.module.parameters())
        if groups:
            params = [
                {"params": [p for p in params if p.dim() > 1]},
                {"params": [p for p in params if p.dim() <= 1], "lr": LR / 10, "weight_decay": 0.0},
            ]
        self.opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        chunks = {k: v.chunk(K) for k, v in batch.items()}
        for i in range(K):
            mb = {k: v[i] for k, v in chunks.items()}
            (self.loss(self.module(mb["x"]), mb) / K).backward()
        self.opt.step()
        self.opt.zero_grad()

    def params(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.module.parameters()]


class Functrain:
    """``make_train_step`` on its own copy of the model; the state is threaded through calls."""

    def __init__(self, factory: Callable[[], nn.Module], loss: Callable, **options: Any) -> None:
        model, params, _ = ft.functionalize(factory(), copy=True)
        tx = (
            _two_groups()
            if options.pop("groups", False)
            else ft.adamw(LR, weight_decay=WEIGHT_DECAY)
        )

        def loss_fn(p: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
            return loss(model(p, b["x"]), b)

        self.names = list(params)
        self.step = ft.make_train_step(loss_fn, tx, micro_batches=K, **options)
        self.state = ft.TrainState.create(params=params, tx=tx, seed=None)

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        self.state, _ = self.step(self.state, batch)

    def params(self) -> list[torch.Tensor]:
        return [self.state.params[k] for k in self.names]


def _two_groups() -> ft.GradientTransformation:
    """``torch.optim``'s parameter groups as ``ft.partition``: AdamW on the matrices, AdamW at
    a tenth of the learning rate and without decay on the vectors (biases, norms)."""
    return ft.partition(
        {"matrices": ft.adamw(LR, weight_decay=WEIGHT_DECAY), "vectors": ft.adamw(LR / 10)},
        lambda p: ft.tree.map(lambda x: "matrices" if x.dim() > 1 else "vectors", p),
    )


def _variants(quick: bool) -> dict[str, dict[str, Any]]:
    variants: dict[str, dict[str, Any]] = {
        "functrain loop, autograd": {"strategy": "loop", "grad_backend": "autograd"},
        "functrain loop, func": {"strategy": "loop", "grad_backend": "func"},
        "functrain vmap": {"strategy": "vmap"},
    }
    variants = {k: {**v, "norm_metrics": False} for k, v in variants.items()}
    # The cost of the default non-finite check (the classic loop has none).
    variants["functrain loop, autograd, nonfinite='ignore'"] = {
        **variants["functrain loop, autograd"],
        "nonfinite": "ignore",
    }
    variants["functrain defaults (loop, auto backend, norm metrics)"] = {}
    # The gradient-noise-scale metrics from the K micro-batch gradients (issue: "at negligible
    # cost"): compared with the same loop step without them. Fresh hooks: each has its state.
    # Parameter groups: compared with the classic loop's AdamW on the same two groups.
    variants[GROUPS] = {**variants["functrain loop, autograd"], "groups": True}
    for label, hook in (
        (NOISE_SCALE, ft.noise_scale_hook()),
        (NOISE_SCALE_COSINE, ft.noise_scale_hook(cosine=True)),
    ):
        variants[label] = {**variants["functrain loop, autograd"], "grad_stats": hook}
    if not quick:  # compiling takes tens of seconds
        variants["functrain loop, compile=True (func backend)"] = {
            "strategy": "loop",
            "norm_metrics": False,
            "compile": True,
        }
    return variants


def _drift(got: list[torch.Tensor], ref: list[torch.Tensor], start: list[torch.Tensor]) -> float:
    """``‖got − ref‖ / ‖ref − start‖`` over all tensors (0 when the trajectories agree)."""
    diff = sum(float((g - r).double().square().sum()) for g, r in zip(got, ref))
    moved = sum(float((r - s).double().square().sum()) for r, s in zip(ref, start))
    return (diff / moved) ** 0.5


def _bench_model(name: str, quick: bool, section: Section, device: str) -> None:
    factory, loss, batches = _models(quick, device)[name]
    count = sum(p.numel() for p in factory().parameters())
    classic = Classic(factory, loss)
    classic_groups = Classic(factory, loss, groups=True)
    start = [p.clone() for p in classic.params()]
    runners: dict[str, Any] = {
        "classic loop (torch.optim fused)": classic,
        CLASSIC_GROUPS: classic_groups,
    }
    compile_seconds: dict[str, float] = {}
    for label, options in _variants(quick).items():
        try:
            runner = Functrain(factory, loss, **options)
            t0 = time.perf_counter()
            runner(batches[0])  # the first call plans (and compiles, with compile=True)
            if "compile" in options:
                compile_seconds[label] = time.perf_counter() - t0
            runners[label] = runner
        except Exception as err:  # e.g. no C++ compiler for torch.compile
            section.notes.append(f"{name}: {label} unavailable ({type(err).__name__}: {err})")
    classic(batches[0])
    classic_groups(batches[0])

    # Correctness: the same further steps on every runner, compared with the classic loop.
    for batch in batches[1:]:
        for runner in runners.values():
            runner(batch)
    for label, runner in runners.items():
        if runner is classic or runner is classic_groups:
            continue
        reference = (classic_groups if label == GROUPS else classic).params()
        err = _drift(runner.params(), reference, start)
        section.checks.append(
            (
                f"{name}: {label} params = classic loop after {len(batches)} steps",
                err <= TOL,
                f"‖Δ‖ / ‖update‖ = {err:.1e} (tol {TOL:.0e})",
            )
        )

    batch = batches[0]
    fns = {label: synced(lambda r=runner: r(batch), device) for label, runner in runners.items()}
    times = interleaved_medians(fns, repeats=2 if quick else 9, warmup=0 if quick else 2)
    memory = {label: peak_step_memory(fn, 1 if quick else 5, device) for label, fn in fns.items()}
    base_t = times["classic loop (torch.optim fused)"]
    base_m = memory["classic loop (torch.optim fused)"]
    for label, seconds in times.items():
        row: dict[str, Any] = {
            "model": f"{name} ({count / 1e6:.2f}M)",
            "variant": label,
            "ms": 1e3 * seconds,
            "× classic time": seconds / base_t,
        }
        if base_m:
            row["peak MiB"] = memory[label] / 2**20
            row["× classic memory"] = memory[label] / base_m
        section.rows.append(row)
    for label, seconds in compile_seconds.items():
        section.notes.append(f"{name}: {label} compiled in {seconds:.1f} s (not in the timings)")
    without = times.get("functrain loop, autograd")
    for label in (NOISE_SCALE, NOISE_SCALE_COSINE):
        if label in times and without:
            section.notes.append(
                f"{name}: {label.removeprefix('functrain loop, autograd, ')} costs "
                f"{100 * (times[label] / without - 1):+.1f}% of the same step without it"
            )
    if GROUPS in times:
        section.notes.append(
            f"{name}: {GROUPS} / {CLASSIC_GROUPS}: time {times[GROUPS] / times[CLASSIC_GROUPS]:.2f}"
        )
    for label in BAR_ROWS:
        if label not in times:
            continue
        ratio = times[label] / base_t
        verdict = "met" if ratio <= BARS["time"] else "NOT met"
        note = f"{name}: {label} / classic: time {ratio:.2f} (bar ≤ {BARS['time']}: {verdict})"
        if base_m:
            ratio = memory[label] / base_m
            verdict = "met" if ratio <= BARS["memory"] else "NOT met"
            note += f", peak memory {ratio:.2f} (bar ≤ {BARS['memory']}: {verdict})"
        section.notes.append(note)


def run(quick: bool, device: str = "cpu") -> Section:
    """Times, measures and checks the K=4 train step (see the module docstring)."""
    section = Section(
        f"Train step, K={K} micro-batches, AdamW ({device.upper()}, eager unless said)"
    )
    threads = torch.get_num_threads()
    if quick:
        # Quick mode is for the checks: one thread keeps it fast and steady on a shared
        # machine, where waiting for a descheduled worker thread stalls every parallel kernel.
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in ("TinyGPT", "MLP"):
                _bench_model(name, quick, section, device)
    finally:
        torch.set_num_threads(threads)
    section.notes.append(
        f"torch {torch.__version__}, {1 if quick else threads} thread(s); ms are interleaved "
        "medians; peak MiB is what one step adds at its peak, parameters and optimizer state "
        "being in the baseline (CPU: malloc_trim, then VmHWM − VmRSS; CUDA: the caching "
        "allocator's peak of allocated bytes)"
    )
    return section
