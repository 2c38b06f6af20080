"""L-BFGS (scale_by_lbfgs, lbfgs) and the line searches, against float64 references.

References: a dense BFGS inverse-Hessian recursion written out with matrices (the two-loop
recursion must equal it while the memory holds every pair), ``torch.optim.LBFGS`` (a different
iteration: several inner steps per ``step``, its own tolerances, so the comparison is the point
both converge to, not the trajectory), and closed-form minima. optax parity is checked by
``tools/optax_parity.py``.
"""

from __future__ import annotations

import pytest
import torch

import functrain as ft

D = torch.float64


def _quad(n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=D)
    return a @ a.T + n * torch.eye(n, dtype=D), torch.randn(n, generator=g, dtype=D)


def _rosen(p: list[torch.Tensor]) -> torch.Tensor:
    x = p[0]
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def _run(tx: ft.GradientTransformation, f, params: list[torch.Tensor], steps: int):
    state = tx.init(params)
    vg = ft.value_and_grad_from_state(f)
    for _ in range(steps):
        value, grad = vg(params, state=state)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=f)
        params = ft.apply_updates(params, updates)
    return params, state


def test_two_loop_matches_dense_bfgs_recursion() -> None:
    """P u from the memory equals H_k u with H built by V^T H V + ρ s s^T from γ I."""
    torch.manual_seed(0)
    n, steps = 4, 4
    tx = ft.scale_by_lbfgs(memory_size=10)
    ws = [torch.randn(n, dtype=D) for _ in range(steps)]
    a, _ = _quad(n)
    gs = [a @ w for w in ws]  # gradients of a convex quadratic: positive curvature pairs
    state = tx.init([ws[0]])
    for k in range(steps):
        out, state = tx.update([gs[k]], state, [ws[k]])
        if k == 0:
            expected = min(1.0, 1.0 / gs[0].norm().item()) * gs[0]
        else:
            s_last, y_last = ws[k] - ws[k - 1], gs[k] - gs[k - 1]
            h = (s_last @ y_last / (y_last @ y_last)).item() * torch.eye(n, dtype=D)
            for j in range(1, k + 1):
                s, y = ws[j] - ws[j - 1], gs[j] - gs[j - 1]
                rho = 1.0 / (y @ s)
                v = torch.eye(n, dtype=D) - rho * torch.outer(y, s)
                h = v.T @ h @ v + rho * torch.outer(s, s)
            expected = h @ gs[k]
        torch.testing.assert_close(out[0], expected, rtol=1e-12, atol=1e-12)


def test_memory_wraps_and_keeps_newest_pairs() -> None:
    """With memory 2, step 4 uses only the two newest pairs (a dense recursion over them)."""
    torch.manual_seed(1)
    n = 3
    a, _ = _quad(n, seed=3)
    ws = [torch.randn(n, dtype=D) for _ in range(5)]
    tx = ft.scale_by_lbfgs(memory_size=2, scale_init_precond=False)
    state = tx.init([ws[0]])
    for w in ws:
        out, state = tx.update([a @ w], state, [w])
    h = torch.eye(n, dtype=D)
    for j in (3, 4):
        s, y = ws[j] - ws[j - 1], a @ (ws[j] - ws[j - 1])
        rho = 1.0 / (y @ s)
        v = torch.eye(n, dtype=D) - rho * torch.outer(y, s)
        h = v.T @ h @ v + rho * torch.outer(s, s)
    torch.testing.assert_close(out[0], h @ (a @ ws[4]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("problem", ["quadratic", "rosenbrock"])
def test_converges_like_torch_lbfgs(problem: str) -> None:
    """Both optimizers reach the known minimum in float64 (their iterations differ)."""
    if problem == "quadratic":
        a, b = _quad(6)
        f = lambda p: 0.5 * p[0] @ a @ p[0] - b @ p[0]  # noqa: E731
        x0, xstar, steps = torch.zeros(6, dtype=D), torch.linalg.solve(a, b), 30
    else:
        f, x0 = _rosen, torch.tensor([-1.2, 1.0, -0.5, 0.8], dtype=D)
        xstar, steps = torch.ones(4, dtype=D), 100
    params, _ = _run(ft.lbfgs(), f, [x0.clone()], steps)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x],
        lr=1,
        max_iter=steps,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = f([x])
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    torch.testing.assert_close(x.detach(), xstar, rtol=0, atol=1e-7)
    torch.testing.assert_close(params[0], xstar, rtol=0, atol=1e-7)


def test_backtracking_converges_on_a_quadratic() -> None:
    # On Rosenbrock from (-1.2, 1) this combination stalls near (-0.888, 0.831), in optax too
    # (checked with optax 0.2.8): the step size only grows by increase_factor per update.
    a, b = _quad(5, seed=4)
    f = lambda p: 0.5 * p[0] @ a @ p[0] - b @ p[0]  # noqa: E731
    tx = ft.lbfgs(linesearch=ft.scale_by_backtracking_linesearch(40, store_grad=True))
    params, _ = _run(tx, f, [torch.zeros(5, dtype=D)], 60)
    torch.testing.assert_close(params[0], torch.linalg.solve(a, b), rtol=0, atol=1e-8)


def test_backtracking_armijo_by_hand() -> None:
    """f = x², u = −2x: lr 1 gives no decrease; 0.8 does (checked by hand)."""
    f = lambda p: (p[0] ** 2).sum()  # noqa: E731
    tx = ft.scale_by_backtracking_linesearch(5)
    p = [torch.tensor([1.0], dtype=D)]
    g = [torch.tensor([2.0], dtype=D)]
    u, st = tx.update([-g[0]], tx.init(p), p, value=f(p), grad=g, value_fn=f)
    assert st.learning_rate.item() == pytest.approx(0.8)
    assert st.info.num_linesearch_steps.item() == 2
    torch.testing.assert_close(u[0], torch.tensor([-1.6], dtype=D))
    assert st.value.item() == pytest.approx(0.36)


@pytest.mark.parametrize("make", ["zoom", "backtracking"])
def test_early_exit_gives_the_same_numbers(make: str) -> None:
    def search(early: bool):
        if make == "zoom":
            return ft.scale_by_zoom_linesearch(15, early_exit=early)
        return ft.scale_by_backtracking_linesearch(15, store_grad=True, early_exit=early)

    x0 = [torch.tensor([-1.2, 1.0, 0.3], dtype=D)]
    a, sa = _run(ft.lbfgs(linesearch=search(False)), _rosen, x0, 15)
    b, sb = _run(ft.lbfgs(linesearch=search(True)), _rosen, x0, 15)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(sa[2].info, sb[2].info, rtol=0, atol=0)


def test_update_is_pure() -> None:
    f = _rosen
    params = [torch.tensor([-1.2, 1.0, 0.4], dtype=D)]
    tx = ft.lbfgs()
    state = tx.init(params)
    for _ in range(2):
        value, grad = torch.func.grad_and_value(f)(params)[::-1]
        snap = [t.clone() for t in ft.tree.leaves((params, state, grad))]
        updates, new_state = tx.update(grad, state, params, value=value, grad=grad, value_fn=f)
        for before, after in zip(snap, ft.tree.leaves((params, state, grad))):
            assert torch.equal(before, after)
        params, state = ft.apply_updates(params, updates), new_state


def test_bfloat16_and_masked_leaves() -> None:
    tx = ft.masked(ft.scale_by_lbfgs(), {"a": True, "b": False})
    params = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(2)}
    state = tx.init(params)
    for k in range(3):
        g = {"a": torch.full((3,), 2.0 - k, dtype=torch.bfloat16), "b": torch.ones(2)}
        out, state = tx.update(g, state, params)
        assert out["a"].dtype == torch.bfloat16 and torch.isfinite(out["a"].float()).all()
        torch.testing.assert_close(out["b"], g["b"])
        params = {"a": params["a"] - out["a"], "b": params["b"]}
    # A float64 run of the same numbers is the reference for the bfloat16 maths (to its rounding).
    ref = ft.scale_by_lbfgs()
    p64 = [torch.ones(3, dtype=D)]
    s64 = ref.init(p64)
    for k in range(3):
        o64, s64 = ref.update([torch.full((3,), 2.0 - k, dtype=D)], s64, p64)
        p64 = [p64[0] - o64[0]]
    torch.testing.assert_close(params["a"].double(), p64[0], rtol=2e-2, atol=2e-2)


def test_compiles_fullgraph_without_recompiles() -> None:
    torch._dynamo.reset()
    tx = ft.lbfgs(memory_size=3, linesearch=ft.scale_by_zoom_linesearch(4))
    f = _rosen

    def step(params, state):
        value, grad = torch.func.grad_and_value(f)(params)[::-1]
        return tx.update(grad, state, params, value=value, grad=grad, value_fn=f)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    params = [torch.tensor([-1.2, 1.0], dtype=D)]
    state = tx.init(params)
    eager_p, eager_s = params, state
    with ft.testing.assert_max_compiles(1):
        for _ in range(3):
            u, state = compiled(params, state)
            params = ft.apply_updates(params, u)
            eu, eager_s = step(eager_p, eager_s)
            eager_p = ft.apply_updates(eager_p, eu)
    torch.testing.assert_close(params, eager_p, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="memory_size"):
        ft.scale_by_lbfgs(0)
    with pytest.raises(ValueError, match="initial_guess_strategy"):
        ft.scale_by_zoom_linesearch(5, initial_guess_strategy="two")
    with pytest.raises(ValueError, match="max_linesearch_steps"):
        ft.scale_by_zoom_linesearch(-1)
    with pytest.raises(ValueError, match="decrease_factor"):
        ft.scale_by_backtracking_linesearch(5, decrease_factor=1.5)
    with pytest.raises(ValueError, match="params"):
        tx = ft.scale_by_lbfgs()
        tx.update([torch.ones(1)], tx.init([torch.ones(1)]))
    tx = ft.lbfgs()
    p = [torch.ones(2)]
    with pytest.raises(TypeError, match="make_train_step passes only value="):
        tx.update(p, tx.init(p), p, value=torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"\['extra'\]"):
        tx.update(
            p,
            tx.init(p),
            p,
            value=torch.tensor(1.0),
            grad=p,
            value_fn=lambda q: q[0].sum(),
            extra=1,
        )


def test_value_fn_receives_its_keywords() -> None:
    tx = ft.lbfgs()
    f = lambda p, target: ((p[0] - target) ** 2).sum()  # noqa: E731
    p, t = [torch.zeros(2, dtype=D)], torch.tensor([1.0, 2.0], dtype=D)
    state = tx.init(p)
    for _ in range(3):
        value, grad = ft.value_and_grad_from_state(f)(p, state=state, target=t)
        u, state = tx.update(grad, state, p, value=value, grad=grad, value_fn=f, target=t)
        p = ft.apply_updates(p, u)
    torch.testing.assert_close(p[0], t)


def test_lbfgs_without_linesearch_in_make_train_step() -> None:
    """make_train_step passes only value=: lbfgs runs there without a line search (K=2)."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=D)
    batch = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=D)}

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()

    params = {"w": torch.zeros(3, dtype=D)}
    tx = ft.lbfgs(0.5, memory_size=4, linesearch=None)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = step.prepare(ft.TrainState.create(params=params, tx=tx))
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.1 * losses[0]
