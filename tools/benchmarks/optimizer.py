"""One optimizer update: functrain's pure and in-step paths vs ``torch.optim`` (and torchopt).

For AdamW (``lr=1e-3``, ``weight_decay=1e-2``), AdamW in two parameter groups (``torch.optim``'s
``param_groups`` against ``ft.partition`` of two ``adamw``: half the tensors at a tenth of the
learning rate without decay) and SGD with momentum 0.9, on two layouts of random parameters and
gradients, it times one update of

* ``torch.optim`` with its three implementations: the per-tensor for-loop (``foreach=False``),
  ``foreach=True`` and ``fused=True`` (the reference every ratio is taken against);
* torchopt's functional optimizer (``update`` + ``apply_updates``, both in place), if installed;
* functrain's pure path, ``tx.update`` then ``ft.apply_updates`` (allocates new moments,
  updates and parameters: nothing is written into its inputs). A recognised AdamW chain runs
  ``torch._fused_adamw_`` on fresh copies (``functrain.optim._pure_fused``);
* in full mode, for AdamW on the large-tensor layout, the same pure path under
  ``torch.compile(fullgraph=True)`` (compilation excluded; checked against the eager pure path):
  inductor fuses the update and ``apply_updates`` into one pass that writes only the new
  parameters and moments. The small layout is left out: its 400 tensors take over a minute to
  compile on this CPU;
* for AdamW, a floor for any pure path: allocating and first writing the four fresh outputs it
  must return (new moments, updates, new parameters), with no arithmetic at all. On the CPU the
  page faults of fresh large tensors alone cost about twice the fused in-place update;
* functrain's in-step path, ``functrain.optim.fused.update_in_place``: what a donating
  ``make_train_step`` runs (it owns the state, so it updates it in place with the fused
  kernels), with and without the ``update_norm`` metric the step reports by default.

Layouts: "small tensors" (~0.8M parameters in 400 tensors: per-tensor overhead dominates) and
"large tensors" (~10M parameters in 10 tensors: memory bandwidth dominates). Checks: after a few
steps on varying gradients the in-step path's parameters and moments equal the pure path's (to
float32 rounding), and both follow ``torch.optim``'s trajectory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import functrain as ft
from benchmarks import Section, interleaved_medians, synced
from benchmarks._models import param_layout
from functrain.optim import fused

LR, WEIGHT_DECAY, MOMENTUM = 1e-3, 1e-2, 0.9
LAYOUTS = {"small tensors": (400, 800_000), "large tensors": (10, 10_000_000)}
QUICK_LAYOUTS = {"small tensors": (40, 8_000), "large tensors": (4, 400_000)}
BARS = {"in-step vs fused": 1.0, "pure vs fused": 2.0}
# Tolerances relative to the largest magnitude of the compared tensors: the fused kernels order
# a few float32 operations differently from the pure path, nothing more.
TOL_FAST_VS_PURE = 1e-6
TOL_VS_TORCH = 1e-5
CHECK_STEPS = 5
COMPILED_PURE_LAYOUTS = ("large tensors",)
COMPILED_PURE = "functrain pure, compiled (torch.compile of the two calls)"
# torch.optim's parameter groups: AdamW on half the tensors, AdamW with a tenth of the
# learning rate and no decay on the others; ``ft.partition`` of two ``adamw``.
GROUPS = "AdamW, 2 groups"


def _group_labels(params: list[torch.Tensor]) -> list[str]:
    """``GROUPS``: the first half of the tensors in group "a", the rest in "b"."""
    return ["a" if i < len(params) // 2 else "b" for i in range(len(params))]


def _functrain_tx(name: str) -> ft.GradientTransformation:
    if name == "AdamW":
        return ft.adamw(LR, weight_decay=WEIGHT_DECAY)
    if name == GROUPS:
        return ft.partition(
            {"a": ft.adamw(LR, weight_decay=WEIGHT_DECAY), "b": ft.adamw(LR / 10)}, _group_labels
        )
    return ft.sgd(LR, momentum=MOMENTUM)


def _torch_opt(name: str, params: list[torch.Tensor], **impl: Any) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **impl)
    if name == GROUPS:
        half = len(params) // 2
        groups = [
            {"params": params[:half], "weight_decay": WEIGHT_DECAY},
            {"params": params[half:], "lr": LR / 10, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=LR, **impl)
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **impl)


def _torchopt(name: str) -> Any:
    try:
        import torchopt
    except Exception:  # not installed, or broken against this torch
        return None
    if name == "AdamW":
        return torchopt.adamw(LR, weight_decay=WEIGHT_DECAY)
    if name == GROUPS:
        return None
    return torchopt.sgd(LR, momentum=MOMENTUM)


def _moments(name: str, opt_state: Any) -> list[torch.Tensor]:
    """The moment tensors of a functrain adamw / sgd state, in a fixed order."""
    if name == "AdamW":
        adam = opt_state[0]
        return [*adam.mu, *adam.nu]
    if name == GROUPS:
        adams = [opt_state.inner_states[g].inner_state[0] for g in ("a", "b")]
        return [m for a in adams for m in a.mu if m is not None] + [
            v for a in adams for v in a.nu if v is not None
        ]
    return list(opt_state[0].trace)


def _torch_moments(name: str, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    states = [opt.state[p] for group in opt.param_groups for p in group["params"]]
    if name in ("AdamW", GROUPS):
        return [s["exp_avg"] for s in states] + [s["exp_avg_sq"] for s in states]
    return [s["momentum_buffer"] for s in states]


def _rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """``max |got − ref| / max |ref|`` over all tensors."""
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((g - r).abs().max()) for g, r in zip(got, ref)) / max(scale, 1e-30)


def _check(name: str, layout: str, n: int, total: int, section: Section, device: str) -> None:
    """A few steps of every path on the same varying gradients; compares the results."""
    start = param_layout(n, total, seed=0, device=device)
    grads = [param_layout(n, total, seed=10 + k, device=device) for k in range(CHECK_STEPS)]
    tx = _functrain_tx(name)
    pure, pure_state = [p.clone() for p in start], tx.init(start)
    fast, fast_state = [p.clone() for p in start], tx.init(start)
    engines = set()
    for g in grads:
        updates, pure_state = tx.update(g, pure_state, pure)
        pure = ft.apply_updates(pure, updates)
        done = fused.update_in_place(tx, g, fast_state, fast)
        assert done is not None, "the in-step path did not recognise the optimizer"
        fast_state = done.opt_state
        engines.add(done.engine)
    torch_params = [torch.nn.Parameter(p.clone()) for p in start]
    opt = _torch_opt(name, torch_params, foreach=False)
    for g in grads:
        for p, gi in zip(torch_params, g):
            p.grad = gi
        opt.step()
    reference = [p.detach() for p in torch_params]
    what = f"{name}, {layout}"
    section.checks.append(
        (f"{what}: in-step path used the fused kernel", engines == {"kernel"}, str(engines))
    )
    err = max(
        _rel_err(fast, pure), _rel_err(_moments(name, fast_state), _moments(name, pure_state))
    )
    section.checks.append(
        (
            f"{what}: in-step params and moments = pure path after {CHECK_STEPS} steps",
            err <= TOL_FAST_VS_PURE,
            f"max rel err {err:.1e} (tol {TOL_FAST_VS_PURE:.0e})",
        )
    )
    err = max(
        _rel_err(pure, reference),
        _rel_err(_moments(name, pure_state), _torch_moments(name, opt)),
        _rel_err(fast, reference),
    )
    section.checks.append(
        (
            f"{what}: pure and in-step paths = torch.optim trajectory",
            err <= TOL_VS_TORCH,
            f"max rel err {err:.1e} (tol {TOL_VS_TORCH:.0e})",
        )
    )


def _touch_fresh(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Allocates and writes once the four lists of fresh tensors a pure update must return."""
    return [[torch.empty_like(p).fill_(0.0) for p in params] for _ in range(4)]


def _compiled_pure(
    tx: ft.GradientTransformation,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    what: str,
    section: Section,
) -> Callable[[], None]:
    """The pure update compiled whole; checked against the eager pure path, then warmed up."""

    def update(g: Any, s: Any, p: Any) -> tuple[Any, Any]:
        updates, s = tx.update(g, s, p)
        return ft.apply_updates(p, updates), s

    compiled = torch.compile(update, fullgraph=True)
    eager = ([p.clone() for p in params], tx.init(params))
    box = {"p": [p.clone() for p in params], "s": tx.init(params), "g": [g.clone() for g in grads]}
    for _ in range(CHECK_STEPS):
        eager = update(box["g"], eager[1], eager[0])
        box["p"], box["s"] = compiled(box["g"], box["s"], box["p"])
    err = _rel_err(box["p"], eager[0])
    section.checks.append(
        (
            f"{what}: compiled pure path = eager pure path after {CHECK_STEPS} steps",
            err <= TOL_FAST_VS_PURE,
            f"max rel err {err:.1e} (tol {TOL_FAST_VS_PURE:.0e})",
        )
    )

    def run() -> None:
        box["p"], box["s"] = compiled(box["g"], box["s"], box["p"])

    return run


def _bench(
    name: str, layout: str, n: int, total: int, quick: bool, section: Section, device: str
) -> None:
    # Every method has its own parameters, gradients and state: no row finds the data of the
    # row before it in cache (sharing the gradients made the second reader look faster).
    params = param_layout(n, total, seed=0, device=device)
    grads = param_layout(n, total, seed=1, device=device)
    fns: dict[str, Callable[[], Any]] = {}
    for label, impl in (
        ("torch.optim for-loop", {"foreach": False}),
        ("torch.optim foreach", {"foreach": True}),
        ("torch.optim fused", {"fused": True}),
    ):
        mine = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(mine, grads):
            p.grad = g.clone()
        fns[label] = _torch_opt(name, mine, **impl).step

    torchopt_tx = _torchopt(name)
    if torchopt_tx is not None:
        import torchopt

        box = {"p": [p.clone() for p in params], "g": [g.clone() for g in grads]}
        box["s"] = torchopt_tx.init(box["p"])

        def torchopt_step() -> None:
            updates, box["s"] = torchopt_tx.update(
                box["g"], box["s"], params=box["p"], inplace=True
            )
            torchopt.apply_updates(box["p"], updates, inplace=True)

        fns["torchopt (in place)"] = torchopt_step

    tx = _functrain_tx(name)
    pure = {"p": [p.clone() for p in params], "g": [g.clone() for g in grads]}
    pure["s"] = tx.init(pure["p"])

    def pure_step() -> None:
        updates, pure["s"] = tx.update(pure["g"], pure["s"], pure["p"])
        pure["p"] = ft.apply_updates(pure["p"], updates)

    def in_step(update_norm: bool) -> Callable[[], None]:
        mine = {"p": [p.clone() for p in params], "g": [g.clone() for g in grads]}
        mine["s"] = tx.init(mine["p"])

        def run() -> None:
            done = fused.update_in_place(
                tx, mine["g"], mine["s"], mine["p"], update_norm=update_norm, shapes_known=True
            )
            mine["s"] = done.opt_state  # type: ignore[union-attr]

        return run

    fns["functrain pure (tx.update + apply_updates)"] = pure_step
    if name == "AdamW" and not quick and layout in COMPILED_PURE_LAYOUTS:
        fns[COMPILED_PURE] = _compiled_pure(tx, params, grads, f"{name}, {layout}", section)
    if name == "AdamW":
        fns["floor of a pure path (4 fresh outputs, no arithmetic)"] = lambda: _touch_fresh(params)
    fns["functrain in-step (fused.update_in_place)"] = in_step(False)
    fns["functrain in-step + update_norm"] = in_step(True)

    fns = {label: synced(fn, device) for label, fn in fns.items()}
    times = interleaved_medians(fns, repeats=3 if quick else 9, warmup=1 if quick else 2)
    base = times["torch.optim fused"]
    for method, seconds in times.items():
        section.rows.append(
            {
                "optimizer": name,
                "layout": layout,
                "method": method,
                "ms": 1e3 * seconds,
                "× torch fused": seconds / base,
            }
        )
    if name == GROUPS:
        ratio = times["functrain in-step (fused.update_in_place)"] / base
        section.notes.append(f"{GROUPS}, {layout}: functrain in-step / torch fused = {ratio:.2f}")
    if name == "AdamW":
        for label, key, bar in (
            ("in-step", "functrain in-step (fused.update_in_place)", BARS["in-step vs fused"]),
            ("pure", "functrain pure (tx.update + apply_updates)", BARS["pure vs fused"]),
            ("pure, compiled", COMPILED_PURE, BARS["pure vs fused"]),
        ):
            if key not in times:
                continue
            ratio = times[key] / base
            verdict = "met" if ratio <= bar else "NOT met"
            section.notes.append(
                f"AdamW, {layout}: functrain {label} / torch fused = {ratio:.2f} "
                f"(bar ≤ {bar}: {verdict})"
            )


def run(quick: bool, device: str = "cpu") -> Section:
    """Times and checks one optimizer update (see the module docstring)."""
    layouts = QUICK_LAYOUTS if quick else LAYOUTS
    shapes = ", ".join(f"{k}: {n} × {total // n}" for k, (n, total) in layouts.items())
    section = Section(f"Optimizer update ({device.upper()}; {shapes})")
    if _torchopt("AdamW") is None:
        section.notes.append("torchopt is not installed: its rows are skipped")
    threads = torch.get_num_threads()
    if quick:  # checks first: one thread is faster and steadier on a shared machine
        torch.set_num_threads(1)
    try:
        for name in ("AdamW", GROUPS, "SGD momentum"):
            for layout, (n, total) in layouts.items():
                _check(name, layout, min(n, 40), min(total, 40 * 2_000), section, device)
                _bench(name, layout, n, total, quick, section, device)
    finally:
        torch.set_num_threads(threads)
    section.notes.append(
        f"torch {torch.__version__}, {1 if quick else threads} thread(s); ms are interleaved "
        "medians of one update; × torch fused = time / torch.optim(fused=True) time. "
        "'in-step' is what a donating make_train_step runs (norm_metrics=False); "
        "'+ update_norm' adds the update_norm metric the step reports by default."
    )
    return section
