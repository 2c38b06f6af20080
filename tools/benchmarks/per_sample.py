"""Per-sample gradients: functrain (``torch.func``) vs Opacus hooks vs a naive loop, and DP-SGD.

On the same model, weights and batch of 64, it times

* a plain batch gradient (``torch.autograd.grad`` of the mean loss): the floor;
* ``ft.per_sample_grads`` (its default ``method="auto"``: the layer rules for these models, and
  ``"vmap"``, ``vmap(grad)``), Opacus' ``GradSampleModule`` (forward and backward hooks filling
  ``p.grad_sample``) and a naive loop of one backward pass per example;
* the DP-SGD gradient ``Σᵢ clip(gᵢ, C)``: ``ft.clipped_grad_sum`` vs Opacus' hooks followed by
  the clipping and summation its ``DPOptimizer`` does.

Models: ``mnist_cnn`` is the CNN of Opacus' MNIST example (1×28×28 inputs, 26k parameters), the
issue's reference "small CNN"; ``digits_cnn`` is the CNN of ``examples/per_sample.py`` (1×8×8,
42k parameters); ``separable_cnn`` is a MobileNet-style CNN of depthwise and pointwise
convolutions (1×28×28, 3.9k parameters), which the grouped-convolution rules cover. Inputs are
random: only shapes matter for speed. Ratios are taken within each
interleaved round, then the median over rounds, in wall-clock and in process CPU time. Checks compare the gradients
of the three per-sample methods and the two clipped sums. In full mode a ``torch.compile``-d
``ft.per_sample_grads`` is timed too (compilation excluded), as functrain's opt-in.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from benchmarks import Section

BATCH = 64
CLIP = 1.0
BARS = {"per_sample_vs_opacus": 0.5, "clipped_sum_vs_plain": 4.0}


def mnist_cnn() -> nn.Module:
    """Opacus' ``examples/mnist.py`` ``SampleConvNet``."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 8, 2, padding=3),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2, 1),
            conv2=nn.Conv2d(16, 32, 4, 2),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2, 1),
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 4 * 4, 32),
            relu3=nn.ReLU(),
            fc2=nn.Linear(32, 10),
        )
    )


def digits_cnn() -> nn.Module:
    """``examples/per_sample.py``'s CNN for 8×8 digits."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 4 * 4, 64),
            relu3=nn.ReLU(),
            fc2=nn.Linear(64, 10),
        )
    )


def mnist_mlp() -> nn.Module:
    """A 784-512-512-10 MLP (0.67M parameters): per-sample gradients of 172 MB at batch 64."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def separable_cnn() -> nn.Module:
    """A MobileNet-style CNN for 1×28×28: depthwise 3×3 and pointwise 1×1 convolutions."""
    return nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(1, 16, 3, 2, padding=1),
            relu1=nn.ReLU(),
            dw1=nn.Conv2d(16, 16, 3, padding=1, groups=16),
            pw1=nn.Conv2d(16, 32, 1),
            relu2=nn.ReLU(),
            dw2=nn.Conv2d(32, 32, 3, 2, padding=1, groups=32),
            pw2=nn.Conv2d(32, 64, 1),
            relu3=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(64, 10),
        )
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mnist_cnn": (mnist_cnn, (1, 28, 28)),
    "digits_cnn": (digits_cnn, (1, 8, 8)),
    "mnist_mlp": (mnist_mlp, (1, 28, 28)),
    "separable_cnn": (separable_cnn, (1, 28, 28)),
}


def _opacus() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from opacus import GradSampleModule
    except Exception:  # not installed, or an incompatible version
        return None
    return GradSampleModule


def _opacus_ghost() -> Any:
    """Opacus' ghost clipping module (Opacus ≥ 1.5), or ``None``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
    except Exception:
        return None
    return GradSampleModuleFastGradientClipping


def _max_rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """``max |got − ref| / max |ref|`` over all leaves."""
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((g - r).abs().max()) for g, r in zip(got, ref)) / scale


def _opacus_clipped_sum(grad_samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """What Opacus' ``DPOptimizer.clip_and_accumulate`` does with ``p.grad_sample``."""
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples], dim=1)
    factor = (CLIP / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...", factor, g) for g in grad_samples]


def _bench_model(name: str, quick: bool, section: Section, grad_sample_module: Any) -> None:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    module = factory()
    model, params, _ = ft.functionalize(module)
    gen = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(BATCH, *shape, generator=gen), "y": torch.randint(0, 10, (BATCH,))}
    names = list(params)

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(model(p, b["x"]), b["y"])

    reference = factory()
    reference.load_state_dict(module.state_dict())
    ref_params = list(reference.parameters())

    def plain() -> Any:
        loss = F.cross_entropy(reference(batch["x"]), batch["y"])
        return torch.autograd.grad(loss, ref_params)

    def naive() -> list[torch.Tensor]:
        rows = []
        for i in range(BATCH):
            loss = F.cross_entropy(reference(batch["x"][i : i + 1]), batch["y"][i : i + 1])
            rows.append(torch.autograd.grad(loss, ref_params))
        return [torch.stack(leaf) for leaf in zip(*rows)]

    def functrain() -> list[torch.Tensor]:
        grads = ft.per_sample_grads(loss_fn, params, batch)
        return [grads[k] for k in names]

    def functrain_with(method: str) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            grads = ft.per_sample_grads(loss_fn, params, batch, method=method)
            return [grads[k] for k in names]

        return run

    def clip_with(method: str) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            grads = ft.clipped_grad_sum(loss_fn, params, batch, CLIP, method=method).grad_sum
            return [grads[k] for k in names]

        return run

    def gram_with(method: str) -> Callable[[], torch.Tensor]:
        return lambda: ft.per_sample_gram(loss_fn, params, batch, method=method)

    functrain_clip = clip_with("auto")
    fns: dict[str, Callable[[], Any]] = {
        "plain batch gradient": plain,
        "functrain per_sample_grads": functrain,
        "functrain per_sample_grads, vmap": functrain_with("vmap"),
        "functrain clipped_grad_sum": functrain_clip,
        "functrain clipped_grad_sum, vmap": clip_with("vmap"),
        "functrain clipped_grad_sum, ghost (layers)": clip_with("layers"),
        "functrain per_sample_gram, vmap": gram_with("vmap"),
        "functrain per_sample_gram, ghost (layers)": gram_with("layers"),
    }
    if name != "mnist_mlp":  # 64 backward passes of a 0.67M-parameter model: only slow
        fns["naive loop"] = naive
    if grad_sample_module is not None:
        opacus_model = factory()
        opacus_model.load_state_dict(module.state_dict())
        gsm = grad_sample_module(opacus_model)
        gsm_params = list(gsm.parameters())

        def opacus() -> list[torch.Tensor]:
            for p in gsm_params:
                p.grad, p.grad_sample = None, None
            F.cross_entropy(gsm(batch["x"]), batch["y"]).backward()
            return [p.grad_sample for p in gsm_params]

        fns["opacus GradSampleModule"] = opacus
        fns["opacus hooks + clip + sum"] = lambda: _opacus_clipped_sum(opacus())
    ghost_module = _opacus_ghost()
    if ghost_module is not None:
        ghost_model = factory()
        ghost_model.load_state_dict(module.state_dict())
        ghost = ghost_module(ghost_model, max_grad_norm=CLIP, loss_reduction="sum")
        ghost_params = list(ghost.parameters())

        def opacus_ghost() -> list[torch.Tensor]:
            """What Opacus' ``DPLossFastGradientClipping.backward`` does: two passes."""
            for p in ghost_params:
                p.grad = None
            losses = F.cross_entropy(ghost(batch["x"]), batch["y"], reduction="none")
            losses.sum().backward(retain_graph=True)
            factors = ghost.get_clipping_coef()
            for p in ghost_params:
                p.grad = None
            ghost.disable_hooks()
            (factors * losses).sum().backward()
            ghost.enable_hooks()
            return [p.grad for p in ghost_params]

        fns["opacus ghost clipping"] = opacus_ghost
    if not quick and name == "mnist_cnn":
        try:
            compiled = torch.compile(lambda p, b: ft.per_sample_grads(loss_fn, p, b))
            compiled(params, batch)  # compile outside the timings
            fns["functrain per_sample_grads, torch.compile"] = lambda: compiled(params, batch)
        except Exception as err:  # no C++ compiler, unsupported platform, ...
            section.notes.append(f"{name}: torch.compile unavailable ({type(err).__name__})")

    # Correctness first: every method's gradients against the naive loop.
    expected = naive()
    got = functrain()
    for method, result in (("auto", got), ("vmap", functrain_with("vmap")())):
        err = _max_rel_err(result, expected)
        section.checks.append(
            (
                f"{name}: functrain per-sample ({method}) = naive loop",
                err < 1e-4,
                f"max rel err {err:.1e}",
            )
        )
    per_sample_sq = sum(g.reshape(BATCH, -1).square().sum(1) for g in expected)
    factor = (CLIP / per_sample_sq.sqrt()).clamp(max=1.0)
    expected_clip = [torch.einsum("i,i...", factor, g) for g in expected]
    for method in ("vmap", "layers"):
        err = _max_rel_err(clip_with(method)(), expected_clip)
        section.checks.append(
            (
                f"{name}: functrain clipped sum ({method}) = naive clip + sum",
                err < 1e-4,
                f"max rel err {err:.1e}",
            )
        )
    rows = torch.cat([g.reshape(BATCH, -1) for g in expected], dim=1)
    expected_gram = rows @ rows.T
    for method in ("vmap", "layers"):
        err = _max_rel_err([gram_with(method)()], [expected_gram])
        section.checks.append(
            (
                f"{name}: functrain Gram ({method}) = naive Gram",
                err < 1e-4,
                f"max rel err {err:.1e}",
            )
        )
    if "opacus ghost clipping" in fns:
        # Opacus divides by ‖g‖ + 1e-6 where functrain (as optax) divides by ‖g‖.
        err = _max_rel_err(fns["opacus ghost clipping"](), expected_clip)
        section.checks.append(
            (
                f"{name}: Opacus ghost clipping = naive clip + sum",
                err < 1e-4,
                f"max rel err {err:.1e}",
            )
        )
    if grad_sample_module is not None:
        err = _max_rel_err(got, fns["opacus GradSampleModule"]())
        section.checks.append(
            (
                f"{name}: functrain per-sample = Opacus grad_sample",
                err < 1e-4,
                f"max rel err {err:.1e}",
            )
        )

    wall, cpu = _interleaved_samples(fns, repeats=3 if quick else 40, warmup=1 if quick else 2)
    plain_name = "plain batch gradient"
    has_peer = "opacus GradSampleModule" in wall
    for method in fns:
        peer_name = "opacus GradSampleModule"
        if "clip" in method or method.startswith("opacus ghost"):
            peer_name = "opacus hooks + clip + sum"
        row: dict[str, Any] = {
            "model": name,
            "method": method,
            "ms": 1e3 * statistics.median(wall[method]),
            "× plain": _paired(wall, method, plain_name),
        }
        if has_peer:
            row["× opacus"] = _paired(wall, method, peer_name)
        row["CPU ms"] = 1e3 * statistics.median(cpu[method])
        row["CPU × plain"] = _paired(cpu, method, plain_name)
        if has_peer:
            row["CPU × opacus"] = _paired(cpu, method, peer_name)
        section.rows.append(row)

    def verdict(samples: dict[str, list[float]], method: str, peer: str, bar: float) -> str:
        ratio = _paired(samples, method, peer)
        return f"{ratio:.2f} ({'met' if ratio <= bar else 'NOT met'})"

    bar = BARS["clipped_sum_vs_plain"]
    method = "functrain clipped_grad_sum"
    notes = [
        f"{name}: clipped-sum / plain batch gradient (bar ≤ {bar}) = "
        f"{verdict(wall, method, plain_name, bar)} wall, {verdict(cpu, method, plain_name, bar)} CPU"
    ]
    if "opacus ghost clipping" in wall:
        method, peer_name = "functrain clipped_grad_sum, ghost (layers)", "opacus ghost clipping"
        ratio = _paired(wall, method, peer_name)
        notes.append(f"{name}: functrain ghost / Opacus ghost clipping = {ratio:.2f} wall")
    if has_peer:
        bar = BARS["per_sample_vs_opacus"]
        method, peer_name = "functrain per_sample_grads", "opacus GradSampleModule"
        notes.insert(
            0,
            f"{name}: functrain / Opacus per-sample (bar ≤ {bar}) = "
            f"{verdict(wall, method, peer_name, bar)} wall, {verdict(cpu, method, peer_name, bar)} CPU",
        )
    section.notes.extend(notes)


def _interleaved_samples(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-round wall and process-CPU seconds of each function, run round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def _paired(samples: dict[str, list[float]], method: str, base: str) -> float:
    """Median over rounds of ``method / base`` timed in the same round (drifts cancel)."""
    return statistics.median(t / t0 for t, t0 in zip(samples[method], samples[base]))


def run(quick: bool) -> Section:
    """Times and checks per-sample gradients and the DP-SGD gradient (see the module docstring)."""
    section = Section(f"Per-sample gradients and DP-SGD clipped sums (CPU, batch {BATCH})")
    grad_sample_module = _opacus()
    if grad_sample_module is None:
        section.notes.append("opacus is not installed: Opacus rows and checks skipped")
    models = ("mnist_cnn",) if quick else tuple(MODELS)
    with warnings.catch_warnings():
        # Opacus' hooks warn on every backward when the input does not require gradients.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for name in models:
            _bench_model(name, quick, section, grad_sample_module)
    section.notes.append(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms are medians of "
        "interleaved rounds, ratios medians over rounds of the ratio within a round; CPU columns "
        "use process CPU time (robust to waiting for a core on a shared machine); × opacus "
        "compares clipped sums (and Opacus' ghost clipping) with Opacus' hooks + clip + sum"
    )
    return section
