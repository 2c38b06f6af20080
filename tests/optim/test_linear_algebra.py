"""``functrain.optim.linear_algebra``: optax's nnls, power iteration and inverse p-th root.

References: ``scipy.optimize.nnls`` (an active-set solver); ``torch.linalg.eigh`` for the
dominant eigenpair and for ``(A + εI)^(-1/p) = V diag((λ + ε)^(-1/p)) Vᵀ``; and, for optax's
early exits (``lax.while_loop``), float64 NumPy loops written here from optax's update rules
that really stop (``while``), against which the host-read-free frozen iterations must agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft
from functrain.optim import linear_algebra as la

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            raise AssertionError(f"host read of a tensor: {func}")
        return func(*args, **(kwargs or {}))


def spd(n: int, seed: int, low: float = 0.5, high: float = 4.0, gap: bool = True) -> np.ndarray:
    """A float64 SPD matrix with eigenvalues in [low, high]; the top one 1.5x the next (gap)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = rng.uniform(low, high / 1.5 if gap else high, size=n)
    if gap:
        lam[0] = high
    return (q * lam) @ q.T


# ---------------------------------------------------------------------------------------- nnls


def ref_nnls_loop(a: np.ndarray, b: np.ndarray, iters: int, lip: float) -> np.ndarray:
    """optax's fast projected gradient written as a float64 loop."""
    q_mat, q = a.T @ a, a.T @ b
    x = np.zeros((a.shape[1], *b.shape[1:]))
    p, c = x, 0.0
    for _ in range(iters):
        cn = (1 + math.sqrt(1 + 4 * c * c)) / 2
        s = (c - 1) / cn
        xn = np.maximum(p - (q_mat @ p - q) / lip, 0)
        p, x, c = xn + s * (xn - x), xn, cn
    return x


def conditioned(m: int, n: int, seed: int) -> np.ndarray:
    """An (m, n) matrix with singular values in [0.5, 3]: projected gradient converges fast
    (its rate depends on the condition number, not on the problem)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    k = min(m, n)
    return (u[:, :k] * rng.uniform(0.5, 3.0, size=k)) @ v[:, :k].T


@given(m=st.integers(1, 8), n=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_nnls_objective_matches_scipy(m, n, seed):
    a = conditioned(m, n, seed)
    b = 3 * np.random.default_rng(seed + 1).normal(size=m)
    x = la.nnls(torch.tensor(a), torch.tensor(b), 2000).numpy()
    x_ref, residual_ref = scipy.optimize.nnls(a, b)
    assert (x >= 0).all()
    assert np.linalg.norm(a @ x - b) <= residual_ref + 1e-7
    if m >= n:  # full column rank: the solution is unique
        np.testing.assert_allclose(x, x_ref, atol=1e-6)


def test_nnls_matrix_rhs_is_column_wise_and_optax_example():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(9, 4)), rng.normal(size=(9, 3))
    x = la.nnls(torch.tensor(a), torch.tensor(b), 2000).numpy()
    assert x.shape == (4, 3)
    for k in range(3):
        np.testing.assert_allclose(x[:, k], scipy.optimize.nnls(a, b[:, k])[0], atol=1e-6)
    example = la.nnls(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([5.0, 6.0]), 10**3)
    torch.testing.assert_close(example, torch.tensor([0.0, 1.7]), atol=5e-3, rtol=0)


@pytest.mark.parametrize("iters", [0, 1, 2, 7, 40])
def test_nnls_iterates_as_the_update_rule(iters):
    rng = np.random.default_rng(iters)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=6)
    q_mat = a.T @ a
    lip = min(np.linalg.norm(q_mat, "fro"), np.abs(q_mat).sum(axis=0).max())  # the default L
    got = la.nnls(torch.tensor(a), torch.tensor(b), iters)
    np.testing.assert_allclose(got.numpy(), ref_nnls_loop(a, b, iters, lip), rtol=1e-12, atol=1e-14)
    given_l = la.nnls(torch.tensor(a), torch.tensor(b), iters, L=2 * lip)
    np.testing.assert_allclose(given_l.numpy(), ref_nnls_loop(a, b, iters, 2 * lip), atol=1e-14)


def test_nnls_zero_matrix_and_zero_l():
    """A zero A gives L = 0, replaced by 1 (no division by zero); x stays 0."""
    x = la.nnls(torch.zeros(3, 2), torch.ones(3), 5)
    assert torch.equal(x, torch.zeros(2))
    a, b = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, -1.0])
    np.testing.assert_allclose(
        la.nnls(a, b, 3, L=0.0).numpy(),
        ref_nnls_loop(a.double().numpy(), b.double().numpy(), 3, 1.0),
    )


def test_nnls_bad_inputs():
    a, b = torch.ones(3, 2), torch.ones(3)
    with pytest.raises(ValueError, match="A must be 2-d"):
        la.nnls(torch.ones(3), b, 5)
    with pytest.raises(ValueError, match=r"b must have shape .* got \(4,\)"):
        la.nnls(a, torch.ones(4), 5)
    with pytest.raises(TypeError, match="iters must be a Python int"):
        la.nnls(a, b, torch.tensor(5))


# ------------------------------------------------------------------------------ power iteration


def ref_power_iteration(mat: np.ndarray, v0: np.ndarray, num_iters: int, tol: float):
    """optax's while loop, with a real early exit, in float64."""
    v = v0 / np.linalg.norm(v0)
    z, eig, it = mat @ v, 0.0, 0
    while True:
        with np.errstate(divide="ignore", invalid="ignore"):
            converged = abs(np.linalg.norm(z - eig * v) / eig) < tol
        if converged or it >= num_iters:
            break
        v = z / np.linalg.norm(z)
        z = mat @ v
        eig, it = v @ z, it + 1
    return eig, z / np.linalg.norm(z)


@given(n=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_power_iteration_matches_eigh(n, seed):
    mat = torch.tensor(spd(n, seed))
    eig, vec = la.power_iteration(mat, num_iters=300, error_tolerance=1e-12, key=seed)
    values, vectors = torch.linalg.eigh(mat)
    assert float(eig) == pytest.approx(float(values[-1]), rel=1e-10)
    assert float(torch.linalg.norm(vec)) == pytest.approx(1.0, rel=1e-12)
    assert abs(float(vec @ vectors[:, -1])) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("num_iters", "tol"), [(100, 1e-6), (5, 1e-6), (60, 1e-3), (40, 0.0)])
def test_power_iteration_stops_as_optax(num_iters, tol):
    """Frozen iterations give what a loop leaving at the tolerance gives."""
    mat = spd(5, 7, gap=False)
    v0 = np.random.default_rng(0).normal(size=5)
    eig, vec = la.power_iteration(
        torch.tensor(mat), v0=torch.tensor(v0), num_iters=num_iters, error_tolerance=tol
    )
    ref_eig, ref_vec = ref_power_iteration(mat, v0, num_iters, tol)
    assert float(eig) == pytest.approx(ref_eig, rel=1e-13)
    np.testing.assert_allclose(vec.numpy(), ref_vec, atol=1e-13)


def test_power_iteration_callable_on_a_pytree():
    """A block-diagonal operator on {"a": (2,), "b": (3,)} against eigh of the full matrix."""
    a1, a2 = torch.tensor(spd(2, 1, high=2.0)), torch.tensor(spd(3, 2, high=6.0))
    full = torch.block_diag(a1, a2)
    mvp = lambda v: {"a": a1 @ v["a"], "b": a2 @ v["b"]}  # noqa: E731
    v0 = {"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    eig, vec = la.power_iteration(mvp, v0=v0, num_iters=500, error_tolerance=1e-12)
    values, vectors = torch.linalg.eigh(full)
    assert float(eig) == pytest.approx(float(values[-1]), rel=1e-10)
    flat = torch.cat([vec["a"], vec["b"]])
    assert abs(float(flat @ vectors[:, -1])) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="v0 must be provided"):
        la.power_iteration(mvp)


def test_power_iteration_default_start_and_keys():
    mat = torch.tensor(spd(6, 3))
    start = lambda **kw: la.power_iteration(mat, num_iters=0, **kw)[1]  # noqa: E731
    # num_iters=0: the answer is the normalised A v0, so it shows the start vector.
    assert torch.equal(start(), start(key=0))
    assert torch.equal(start(key=ft.random_key(3)), start(key=ft.random_key(3)))
    assert not torch.equal(start(key=1), start(key=2))
    expected = float(torch.linalg.eigvalsh(mat)[-1])
    for key in (None, 5, ft.random_key(9)):
        eig, _ = la.power_iteration(mat, num_iters=300, error_tolerance=1e-12, key=key)
        assert float(eig) == pytest.approx(expected, rel=1e-10)


def test_power_iteration_bad_inputs_and_precision():
    mat = torch.eye(3)
    with pytest.raises(ValueError, match=r"square 2-d, got shape \(3, 2\)"):
        la.power_iteration(torch.ones(3, 2))
    with pytest.raises(TypeError, match="num_iters must be a Python int"):
        la.power_iteration(mat, num_iters=torch.tensor(3))
    with pytest.raises(ValueError, match="precision"):
        la.power_iteration(mat, precision="fastest")
    for precision in (la.Precision.DEFAULT, "high", "HIGHEST", None):
        la.power_iteration(mat, precision=precision, num_iters=2)


# ----------------------------------------------------------------------- inverse p-th root


def ref_inverse_root(mat: np.ndarray, p: int, ridge: float) -> np.ndarray:
    lam, vec = np.linalg.eigh(mat)
    return (vec * (lam + ridge * lam.max()) ** (-1.0 / p)) @ vec.T


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("n", [2, 3, 6])
def test_inverse_pth_root_matches_eigendecomposition(p, n):
    mat = spd(n, 10 * n + p, gap=False)
    root, error = la.matrix_inverse_pth_root(torch.tensor(mat), p, error_tolerance=1e-10)
    assert root.dtype == torch.float64
    np.testing.assert_allclose(root.numpy(), ref_inverse_root(mat, p, 1e-6), atol=1e-9)
    assert float(error) <= 1e-10
    # The root undoes the power: root^p (A + εI) = I.
    damped = mat + 1e-6 * np.linalg.eigvalsh(mat)[-1] * np.eye(n)
    back = np.linalg.matrix_power(root.numpy(), p) @ damped
    np.testing.assert_allclose(back, np.eye(n), atol=1e-8)


def ref_newton_loop(mat, p, num_iters, ridge_epsilon, tol, max_ev):
    """optax's coupled Newton while loop, with its real exits, in float64."""
    n = mat.shape[0]
    eye, alpha = np.eye(n), -1.0 / p
    damped = mat + ridge_epsilon * max(max_ev, 1e-16) * eye
    z = (1 + p) / (2 * np.linalg.norm(damped))
    mat_m, mat_h = damped * z, eye * z ** (1.0 / p)
    old_h, error, run, i = mat_h, np.abs(damped * z - eye).max(), True, 0
    while i < num_iters and error > tol and run:
        mat_m_i = (1 - alpha) * eye + alpha * mat_m
        new_m = np.linalg.matrix_power(mat_m_i, 2 ** round(math.log2(p))) @ mat_m
        new_error = np.abs(new_m - eye).max()
        old_h, mat_h = mat_h, mat_h @ mat_m_i
        mat_m, run, error, i = new_m, new_error < error * 1.2, new_error, i + 1
    return (mat_h if run else old_h), np.abs(mat_m - eye).max()


@pytest.mark.parametrize(
    ("case", "p", "num_iters", "tol"),
    [("spd", 2, 100, 1e-6), ("spd", 4, 3, 1e-6), ("spd", 2, 100, 0.0), ("indefinite", 2, 100, 1e-6),
     ("indefinite", 4, 100, 1e-6), ("spd", 3, 100, 1e-6)],
)  # fmt: skip
def test_inverse_pth_root_exits_as_optax(case, p, num_iters, tol):
    """Frozen iterations give what optax's loop gives when it leaves: converged, out of
    iterations, or stopped by a growing error (an indefinite matrix diverges; the previous
    iterate is returned). p = 3 uses the power 4 in the update, as optax's switch does."""
    mat = spd(4, 5, gap=False)
    if case == "indefinite":
        vec = np.linalg.eigh(mat)[1]
        mat = (vec * np.array([-1.0, 1.0, 2.0, 3.0])) @ vec.T  # one negative eigenvalue
    max_ev, _ = la.power_iteration(torch.tensor(mat), num_iters=100, error_tolerance=1e-6)
    root, error = la.matrix_inverse_pth_root(
        torch.tensor(mat), p, num_iters=num_iters, error_tolerance=tol
    )
    ref_root, ref_error = ref_newton_loop(mat, p, num_iters, 1e-6, tol, float(max_ev))
    np.testing.assert_allclose(root.numpy(), ref_root, rtol=1e-9, atol=1e-12)
    assert float(error) == pytest.approx(ref_error, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("p", [1, 8])
def test_inverse_pth_root_other_powers_and_float32(p):
    mat = spd(4, p, gap=False)
    root, _ = la.matrix_inverse_pth_root(torch.tensor(mat, dtype=torch.float32), p)
    assert root.dtype == torch.float32
    np.testing.assert_allclose(root.numpy(), ref_inverse_root(mat, p, 1e-6), rtol=1e-4, atol=1e-5)


def test_inverse_pth_root_one_by_one_and_zero_iterations():
    root, error = la.matrix_inverse_pth_root(torch.tensor([[9.0]], dtype=torch.float64), 2)
    assert float(root) == pytest.approx((9.0 + 9e-6) ** -0.5, rel=1e-12)
    assert float(error) == 0.0
    mat = spd(3, 0)
    root, _ = la.matrix_inverse_pth_root(torch.tensor(mat), 4, num_iters=0)
    damped = mat + 1e-6 * np.linalg.eigvalsh(mat)[-1] * np.eye(3)
    z = 5 / (2 * np.linalg.norm(damped))  # H₀ = z^(1/p) I
    np.testing.assert_allclose(root.numpy(), z**0.25 * np.eye(3), rtol=1e-6)


def test_inverse_pth_root_bad_inputs():
    with pytest.raises(ValueError, match="square 2-d"):
        la.matrix_inverse_pth_root(torch.ones(2, 3), 2)
    with pytest.raises(ValueError, match="p must be a positive integer"):
        la.matrix_inverse_pth_root(torch.eye(2), 0)
    with pytest.raises(TypeError, match="floating point"):
        la.matrix_inverse_pth_root(torch.eye(2, dtype=torch.int64), 2)


# ------------------------------------------------------------------- no host reads, compile


def test_no_host_reads():
    mat = torch.tensor(spd(4, 1), dtype=torch.float32)
    with NoHostReads():
        la.power_iteration(mat, num_iters=20, key=ft.random_key(0))
        la.matrix_inverse_pth_root(mat, 4, num_iters=20)
        la.matrix_inverse_pth_root(mat, torch.tensor(4.0), num_iters=5)
        la.nnls(mat, torch.ones(4), 20)


def test_traces_without_graph_breaks():
    """fullgraph=True fails on a host read. Python loops unroll (matrix_inverse_pth_root runs
    100 power iterations first), so the backend is eager to keep the test quick."""
    mat = torch.tensor(spd(4, 2), dtype=torch.float32)

    def run(m):
        eig, vec = la.power_iteration(m, num_iters=4)
        root, error = la.matrix_inverse_pth_root(m, 2, num_iters=4)
        return eig, vec, root, error, la.nnls(m, torch.ones(4), 4)

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")(mat)
    for got, want in zip(compiled, run(mat)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_tensor_p_selects_the_same_power():
    mat = torch.tensor(spd(3, 4))
    for p in (1, 2, 4, 8):
        want, _ = la.matrix_inverse_pth_root(mat, p, num_iters=20)
        got, _ = la.matrix_inverse_pth_root(mat, torch.tensor(float(p)), num_iters=20)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
