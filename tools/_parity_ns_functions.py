"""Cases of ``tools/optax_parity_namespaces.py`` for functions: ``second_order``,
``perturbations``, ``assignment``, the linear algebra helpers, ``multi_normal``,
``scale_gradient`` and ``transforms.unitwise_clip``."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from _parity_ns_common import Case, both, leaf_err, quiet, rng, same, spd, tree_err

import functrain as ft
import functrain.perturbations as ft_pert
import functrain.second_order as ft_so

NOT_COMPARED = {
    "perturbations.Normal.sample / Gumbel.sample": "RNGs differ by design (counter hash vs "
    "threefry): shapes and dtypes compared, values not",
    "multi_normal(...).sample": "RNGs differ by design: shape and dtype compared, values not",
    "power_iteration default v0 (key)": "its uniform start vector comes from another RNG: "
    "compared with v0 given",
}

# ---------------------------------------------------------------- second_order


def _loss(xp: Any) -> Any:
    """A small two-layer regression loss with a quartic term, written for torch or jnp."""

    def loss(p: Any, x: Any, y: Any) -> Any:
        hidden = xp.tanh(x @ p["w"] + p["b"])
        return ((hidden @ p["v"] - y) ** 2).mean() + 0.1 * (p["b"] ** 4).sum()

    return loss


def _second_order_data(seed: int) -> tuple[Any, Any, Any, Any]:
    r = rng(seed)
    params = {"w": r.standard_normal((3, 4)), "b": r.standard_normal(4), "v": r.standard_normal(4)}
    data = (r.standard_normal((6, 3)), r.standard_normal(6))
    return params, data, r.standard_normal(3 * 4 + 4 + 4), r


def _second_order(name: str, seed: int) -> float:
    params, (x, y), v, _ = _second_order_data(seed)
    (pt, xt, yt, vt), (pj, xj, yj, vj) = both((params, x, y, v))
    if name == "hvp":
        got = ft_so.hvp(_loss(torch), vt, pt, xt, yt)
        want = jax.jit(lambda *a: quiet(optax.second_order.hvp, _loss(jnp), *a))(vj, pj, xj, yj)
    else:
        got = getattr(ft_so, name)(_loss(torch), pt, xt, yt)
        fn = getattr(optax.second_order, name)
        want = jax.jit(lambda *a: quiet(fn, _loss(jnp), *a))(pj, xj, yj)
    return tree_err(got, want)


# ---------------------------------------------------------------- perturbations


def _argmax_fun(xp: Any) -> Any:
    """A piecewise-constant tree function: a one-hot argmax of ``a + b`` and a ReLU count."""

    def fun(x: Any) -> Any:
        s = x["a"] + x["b"]
        hot = (s == s.max()).astype(s.dtype) if xp is jnp else (s == s.max()).to(s.dtype)
        return {"hot": hot, "pos": (x["a"] > 0).sum() * 1.0}

    return fun


def _smooth_fun(xp: Any) -> Any:
    return lambda x: {"hot": xp.sin(x["a"]) * x["b"], "pos": (x["a"] ** 2).sum()}


def _fixed_noise(base: Any, table: dict[str, Any]) -> Any:
    """A subclass of ``base`` (a Normal or Gumbel class) whose ``sample`` returns pre-drawn
    samples: the leaf's ``(num_samples, *shape)`` block of ``table`` for the functrain key of
    that leaf (torch), or, for optax (called per sample and leaf under ``vmap``), the row of
    the leaf's block whose key equals the traced key (a one-hot sum: no host read in a trace).
    """

    class Fixed(base):
        def sample(self, key: Any, sample_shape: Any = (), dtype: Any = float, **_: Any) -> Any:
            if isinstance(key, torch.Tensor):
                leaf = next(n for n, k in table["torch_keys"].items() if int(k) == int(key))
                return torch.from_numpy(table["z"][leaf]).to(dtype)
            out = 0.0
            for leaf, keys in table["jax_keys"].items():
                if table["z"][leaf].shape[1:] == tuple(sample_shape):
                    hit = jnp.all(keys == key, axis=-1).astype(dtype)
                    out = out + jnp.tensordot(hit, jnp.asarray(table["z"][leaf]), 1)
            return out

    return Fixed()


def _perturbed(noise_name: str, fun_name: str, use_baseline: bool) -> float:
    n, sigma, r = 64, 0.7, rng(7)
    x = {"a": r.standard_normal(5), "b": r.standard_normal(5)}
    draw = r.standard_normal if noise_name == "Normal" else r.gumbel
    z = {k: draw(size=(n, *v.shape)) for k, v in x.items()}
    xt, xj = both(x)
    key_t, key_j = ft.random_key(3), jax.random.PRNGKey(3)
    # optax: split into one key per sample, then one per leaf (optax.tree.random_like).
    per_sample = [optax.tree.split_key_like(k, x) for k in jax.random.split(key_j, n)]
    table = {
        "z": z,
        "torch_keys": ft.tree.split_key_like(key_t, xt),
        "jax_keys": {k: jnp.stack([s[k] for s in per_sample]) for k in x},
    }
    funs = {"argmax": _argmax_fun, "smooth": _smooth_fun}[fun_name]
    weights = {"hot": r.standard_normal(5), "pos": 1.3}
    wt, wj = both(weights)
    kw = {"num_samples": n, "sigma": sigma, "use_baseline": use_baseline}
    pert_t = ft_pert.make_perturbed_fun(
        funs(torch), noise=_fixed_noise(getattr(ft_pert, noise_name), table), **kw
    )
    pert_j = optax.perturbations.make_perturbed_fun(
        funs(jnp), noise=_fixed_noise(getattr(optax.perturbations, noise_name), table), **kw
    )
    xt = ft.tree.map(lambda v: v.requires_grad_(), xt)
    out_t = pert_t(key_t, xt)
    scalar_t = sum((wt[k] * out_t[k]).sum() for k in out_t)
    grad_t = dict(zip(xt, torch.autograd.grad(scalar_t, list(xt.values()))))
    out_j = jax.jit(pert_j)(key_j, xj)

    def scalar_j(xx: Any) -> Any:
        out = pert_j(key_j, xx)
        return sum((wj[k] * out[k]).sum() for k in out)

    return max(tree_err(out_t, out_j), tree_err(grad_t, jax.jit(jax.grad(scalar_j))(xj)))


def _log_prob(noise_name: str) -> float:
    x = rng(8).standard_normal((3, 4)) * 2
    xt, xj = both(x)
    got = getattr(ft_pert, noise_name)().log_prob(xt)
    return leaf_err(got, getattr(optax.perturbations, noise_name)().log_prob(xj))


def _sample_shape(noise_name: str, dtype: str) -> float:
    got = getattr(ft_pert, noise_name)().sample(ft.random_key(0), (3, 4), getattr(torch, dtype))
    want = getattr(optax.perturbations, noise_name)().sample(
        jax.random.PRNGKey(0), (3, 4), getattr(jnp, dtype)
    )
    return same(
        tuple(got.shape) == want.shape and str(got.dtype)[6:] == str(want.dtype),
        f"{tuple(got.shape)} {got.dtype} vs optax {want.shape} {want.dtype}",
    )


# ---------------------------------------------------------------- assignment


def _hungarian(name: str, cost: np.ndarray) -> float:
    ct, cj = both(cost)
    i_t, j_t = getattr(ft.assignment, name)(ct)
    i_j, j_j = jax.jit(getattr(optax.assignment, name))(cj)
    # Indices must be equal (same algorithm, same order of pairs); then the optimal costs.
    same(
        np.array_equal(i_t, i_j) and np.array_equal(j_t, j_j),
        f"pairs {i_t}, {j_t} vs optax {i_j}, {j_j}",
    )
    return leaf_err(ct[i_t, j_t].sum(), cj[i_j, j_j].sum())


def _cost(seed: int, shape: tuple[int, int], ints: bool = False) -> np.ndarray:
    r = rng(seed)
    return r.integers(0, 4, shape).astype(np.float64) if ints else r.uniform(0, 10, shape)


# ---------------------------------------------------------------- linear algebra


def _nnls(shape: tuple[int, int], iters: int, with_l: bool) -> float:
    r = rng(11)
    a, b = r.standard_normal(shape), r.standard_normal(shape[0])
    (at, bt), (aj, bj) = both((a, b))
    lip = float(np.linalg.norm(a, 2) ** 2) * 1.5 if with_l else None
    return leaf_err(ft.nnls(at, bt, iters, L=lip), optax.nnls(aj, bj, iters, L=lip))


def _power_iteration(num_iters: int, tolerance: float, as_fn: bool) -> float:
    m, v0 = spd(12, 6, cond=8.0), rng(13).standard_normal(6)
    (mt, vt), (mj, vj) = both((m, v0))
    kw = {"num_iters": num_iters, "error_tolerance": tolerance}
    if as_fn:  # a matrix-vector product on a dict pytree
        tt = {"x": vt[:2], "y": vt[2:]}
        tj = {"x": vj[:2], "y": vj[2:]}

        def mv_t(v: Any) -> Any:
            return dict(zip(("x", "y"), (mt @ torch.cat([v["x"], v["y"]])).split([2, 4])))

        def mv_j(v: Any) -> Any:
            return dict(zip(("x", "y"), jnp.split(mj @ jnp.concatenate([v["x"], v["y"]]), [2])))

        got = ft.power_iteration(mv_t, v0=tt, **kw)
        want = jax.jit(lambda v: optax.power_iteration(mv_j, v0=v, **kw))(tj)
    else:
        got = ft.power_iteration(mt, v0=vt, **kw)
        want = jax.jit(lambda m, v: optax.power_iteration(m, v0=v, **kw))(mj, vj)
    return tree_err(got, want)


def _exact_alpha_pth_root() -> Any:
    """optax's ``matrix_inverse_pth_root`` with ``alpha = -1/p`` kept in float64 (its source,
    one literal changed): shows that the float32 ``alpha`` is the whole difference."""
    from optax._src import linear_algebra

    source = inspect.getsource(linear_algebra.matrix_inverse_pth_root)
    # A strong float64 (a weak-typed one would round to float32 against optax's float32 eye).
    line = "alpha = jnp.asarray(-1.0 / p, jnp.float32)"
    same(line in source, "optax's alpha line not found")
    patched = source.replace(line, line.replace("float32", "float64"))
    namespace = dict(vars(linear_algebra))
    exec(patched, namespace)  # optax's own code, one literal changed: the reference only
    return namespace["matrix_inverse_pth_root"]


def _pth_root(n: int, p: int, num_iters: int, cond: float, ridge: float, exact: bool) -> float:
    mt, mj = both(spd(14 + n, n, cond))
    got = ft.matrix_inverse_pth_root(mt, p, num_iters=num_iters, ridge_epsilon=ridge)
    fn = _exact_alpha_pth_root() if exact else optax.matrix_inverse_pth_root
    want = jax.jit(fn, static_argnums=(1, 2))(mj, p, num_iters, ridge)
    # error = max|M - I| is a difference of O(1) entries: measured against |I| = 1.
    error = abs(float(got[1]) - float(want[1]))
    return max(leaf_err(got[0], want[0]), error)


# ---------------------------------------------------------------- small utilities


def _multi_normal(
    loc_shape: tuple[int, ...], scale_shape: tuple[int, ...], x_shape: tuple
) -> float:
    r = rng(15)
    loc, log_scale, x = (r.standard_normal(s) for s in (loc_shape, scale_shape, x_shape))
    (lt, st, xt), (lj, sj, xj) = both((loc, log_scale, x))
    dt, dj = ft.multi_normal(lt, st), optax.multi_normal(lj, sj)
    errs = [leaf_err(dt.log_prob(xt), dj.log_prob(xj)), tree_err(dt.params, dj.params)]
    errs.append(leaf_err(dt.log_scale, dj.log_scale))
    sample_t, sample_j = dt.sample((5,), key=0), dj.sample((5,), jax.random.PRNGKey(0))
    errs.append(
        same(sample_t.shape == sample_j.shape and sample_t.dtype == torch.float64, "sample")
    )
    return max(errs)


def _scale_gradient(scale: float) -> float:
    r = rng(16)
    x, w = {"a": r.standard_normal(4), "b": r.standard_normal((2, 3))}, r.standard_normal(4)
    (xt, wt), (xj, wj) = both((x, w))

    def f(lib: Any, xx: Any, ww: Any) -> Any:
        y = lib.scale_gradient(xx, scale)
        return (ww * y["a"] ** 2).sum() + (y["b"] ** 3).sum()

    # torch.func: with scale 0 functrain detaches (no graph at all); the gradient is then 0.
    grad_t, value_t = torch.func.grad_and_value(lambda xx: f(ft, xx, wt))(xt)
    value_j, grad_j = jax.value_and_grad(functools.partial(f, optax), 0)(xj, wj)
    return max(leaf_err(value_t, value_j), tree_err(grad_t, grad_j))


def _unitwise_clip(max_norm: float, div_eps: float, zeros: bool) -> float:
    r = rng(17)
    grad = np.zeros((3, 4)) if zeros else r.standard_normal((3, 4))
    g_norm = np.linalg.norm(grad, axis=1, keepdims=True) * np.ones((1, 4))
    bound = max_norm * rng(18).uniform(0.5, 1.5, (3, 1)) * np.ones((1, 4))  # per-unit bounds
    (gt, nt, bt), (gj, nj, bj) = both((grad, g_norm, bound))
    got = ft.transforms.unitwise_clip(nt, bt, gt, div_eps)
    return leaf_err(got, optax.transforms.unitwise_clip(nj, bj, gj, div_eps))


def cases() -> list[Case]:
    out = []
    for name in ("hvp", "hessian_diag", "fisher_diag"):
        for seed in (0, 1):
            out.append(
                Case(
                    f"second_order.{name}",
                    f"tanh MLP dict params, seed {seed}",
                    functools.partial(_second_order, name, seed),
                )
            )
    for noise in ("Gumbel", "Normal"):
        for fun in ("argmax", "smooth"):
            for base in (True, False):
                out.append(
                    Case(
                        "perturbations.make_perturbed_fun",
                        f"{noise} samples fed to both, {fun} fn, use_baseline={base}; values and "
                        "gradients",
                        functools.partial(_perturbed, noise, fun, base),
                    )
                )
        out.append(Case(f"perturbations.{noise}", "log_prob", functools.partial(_log_prob, noise)))
        for dtype in ("float64", "float32"):
            out.append(
                Case(
                    f"perturbations.{noise}",
                    f"sample shape/dtype, {dtype}",
                    functools.partial(_sample_shape, noise, dtype),
                )
            )
    shapes = [
        ((6, 6), False),
        ((4, 7), False),
        ((7, 4), False),
        ((5, 5), True),
        ((4, 6), True),
        ((1, 5), False),
    ]
    for name in ("hungarian_algorithm", "base_hungarian_algorithm"):
        for k, (shape, ints) in enumerate(shapes):
            kind = "integer costs 0..3 (ties)" if ints else "uniform costs"
            out.append(
                Case(
                    f"assignment.{name}",
                    f"{shape[0]}x{shape[1]} {kind}; equal pairs, cost",
                    functools.partial(_hungarian, name, _cost(20 + k, shape, ints)),
                )
            )
    for shape, iters, with_l in (((8, 5), 200, False), ((8, 5), 30, True), ((4, 6), 100, False)):
        out.append(
            Case(
                "nnls",
                f"A {shape}, iters {iters}, L {'given' if with_l else 'None'}",
                functools.partial(_nnls, shape, iters, with_l),
            )
        )
    for num_iters, tol, as_fn in (
        (100, 1e-6, False),
        (3, 1e-6, False),
        (50, 0.0, False),
        (100, 1e-6, True),
    ):
        out.append(
            Case(
                "power_iteration",
                f"6x6 SPD, v0 given, num_iters {num_iters}, tol {tol:g}"
                + (", matvec fn on a dict" if as_fn else ""),
                functools.partial(_power_iteration, num_iters, tol, as_fn),
            )
        )
    why = "optax rounds alpha = -1/p to float32 (exact for p = 1, 2, 4, 8)"
    for n, p, num_iters, cond, ridge in (
        (5, 2, 100, 20.0, 1e-6),
        (5, 4, 100, 20.0, 0.0),
        (6, 8, 100, 50.0, 1e-6),
        (4, 2, 3, 20.0, 0.0),
        (1, 4, 100, 1.0, 1e-6),
        (5, 3, 100, 20.0, 0.0),
        (5, 6, 100, 20.0, 1e-6),
    ):
        settings = f"{n}x{n} SPD cond {cond:g}, p {p}, num_iters {num_iters}, ridge {ridge:g}"
        run = functools.partial(_pth_root, n, p, num_iters, cond, ridge)
        if p in (1, 2, 4, 8):
            out.append(Case("matrix_inverse_pth_root", settings, functools.partial(run, False)))
            continue
        out.append(
            Case(
                "matrix_inverse_pth_root",
                settings,
                functools.partial(run, False),
                tol=1e-6,
                why=why,
                doc=True,
            )
        )
        out.append(
            Case(
                "matrix_inverse_pth_root",
                settings + "; optax with a float64 alpha",
                functools.partial(run, True),
            )
        )
    for loc, scale, x in (((3, 4), (4,), (3, 4)), ((3, 4), (3, 4), (5, 3, 4)), ((), (), (7,))):
        out.append(
            Case(
                "multi_normal",
                f"loc {loc}, log_scale {scale}, x {x}: log_prob, params, log_scale",
                functools.partial(_multi_normal, loc, scale, x),
            )
        )
    for scale in (0.5, -2.0, 0.0):
        out.append(
            Case(
                "scale_gradient",
                f"dict input, scale {scale:g}: value and gradient",
                functools.partial(_scale_gradient, scale),
            )
        )
    for max_norm, div_eps, zeros in (
        (0.5, 1e-6, False),
        (100.0, 1e-6, False),
        (0.5, 1e-6, True),
        (0.5, 0.3, False),
    ):
        out.append(
            Case(
                "transforms.unitwise_clip",
                f"max_norm ~{max_norm:g} per unit (grad's shape), div_eps {div_eps:g}"
                + (", zero grad" if zeros else ""),
                functools.partial(_unitwise_clip, max_norm, div_eps, zeros),
            )
        )
    return out
