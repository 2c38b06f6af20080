"""L-BFGS: the two-loop recursion as a transform, and the ``lbfgs`` alias with a line search."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _utils
from functrain.optim.base import GradientTransformation, chain, identity
from functrain.optim.scaling import scale, scale_by_learning_rate
from functrain.optim.zoom import scale_by_zoom_linesearch

__all__ = ["ScaleByLBFGSState", "lbfgs", "scale_by_lbfgs"]


class ScaleByLBFGSState(NamedTuple):
    """State of :func:`scale_by_lbfgs`, field for field optax's.

    ``count`` (int32), the last ``params`` and ``updates``, the ring buffers
    ``diff_params_memory`` and ``diff_updates_memory`` (each leaf stacked ``memory_size`` times
    on a new first axis) and ``weights_memory`` (``ρ = 1 / ⟨δu, δw⟩`` per slot).

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_lbfgs(memory_size=3).init([torch.zeros(2)]).diff_params_memory[0].shape
        torch.Size([3, 2])
    """

    count: torch.Tensor
    params: Any
    updates: Any
    diff_params_memory: Any
    diff_updates_memory: Any
    weights_memory: torch.Tensor


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision leaves are combined in float32 (rounded once at the end); others as is.
    return torch.promote_types(x.dtype, torch.float32)


def _rdot(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``Re Σ ⟨a_i, b_i⟩`` (``a`` conjugated, as optax's tree vdot) as a 0-d ``dtype`` tensor."""
    total = torch.zeros((), dtype=dtype, device=a[0].device)
    for x, y in zip(a, b):
        w = torch.promote_types(_work_dtype(x), _work_dtype(y))
        total = total + torch.vdot(x.reshape(-1).to(w), y.reshape(-1).to(w)).real.to(dtype)
    return total


def scale_by_lbfgs(
    memory_size: int = 10, scale_init_precond: bool = True
) -> GradientTransformation:
    """Multiplies updates by the L-BFGS approximation of the inverse Hessian (optax's).

    With ``δw_k = w_{k+1} − w_k`` and ``δu_k = u_{k+1} − u_k`` the last ``memory_size``
    differences of parameters and updates (gradients), ``ρ_k = 1 / ⟨δu_k, δw_k⟩`` (``0`` when
    that product is ``0``), the output is ``P_k u_k`` computed by the two-loop recursion
    (Nocedal & Wright, Alg. 7.4)::

        q ← u;   for j newest → oldest:  α_j = ρ_j ⟨δw_j, q⟩;   q ← q − α_j δu_j
        q ← γ q; for j oldest → newest:  β_j = ρ_j ⟨δu_j, q⟩;   q ← q + (α_j − β_j) δw_j

    with ``γ = ⟨δu, δw⟩ / ‖δu‖²`` of the newest pair (``1`` if ``scale_init_precond`` is
    false), and ``γ = min(1, 1/‖u‖)`` at the first step. The memory is updated first, from the
    ``params`` given (so that, chained before a line search, it only sees accepted steps).
    The output is a descent direction only after a sign flip: chain it with ``scale(-1)`` or a
    learning rate, as :func:`lbfgs` does. Differentiated through (``torch.func.grad``,
    meta-learning), the first step's ``‖u‖`` is a constant, as optax's ``stop_gradient``
    there: the derivative is optax's, not the one of the formula above.

    ``update`` needs ``params``. float16/bfloat16 leaves are combined in float32 and rounded
    once (optax rounds after every term); the memories keep the params' dtypes (gradients of
    another dtype are cast to them), the weights are float32 (float64 for float64 params).
    Complex leaves follow optax's formulas.
    ``torch.optim.LBFGS`` runs the same recursion inside ``step(closure)``, with its own
    curvature test and stopping rules (see :func:`lbfgs`).

    Args:
        memory_size: number of pairs of differences kept (``>= 1``).
        scale_init_precond: scale the initial inverse Hessian by ``γ`` (else the identity).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_lbfgs()
        >>> params = [torch.tensor([0.0, 0.0])]
        >>> tx.update([torch.tensor([3.0, 4.0])], tx.init(params), params)[0]
        [tensor([0.6000, 0.8000])]
    """
    if isinstance(memory_size, bool) or not isinstance(memory_size, int):
        raise TypeError(f"memory_size must be a Python int, got {memory_size!r}")
    if memory_size < 1:
        raise ValueError(f"memory_size must be >= 1, got {memory_size}")
    m = memory_size

    def init_fn(params: Any) -> ScaleByLBFGSState:
        leaves, spec = tree.flatten(params)
        dtype = torch.float32
        for x in leaves:
            real = x.real.dtype if x.is_complex() else x.dtype
            dtype = torch.promote_types(dtype, real) if real.is_floating_point else dtype
        zeros = tree.unflatten(spec, [torch.zeros_like(x) for x in leaves])
        stack = [torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device) for x in leaves]
        return ScaleByLBFGSState(
            count=_utils.zero_count(params),
            params=zeros,
            updates=tree.unflatten(spec, [torch.zeros_like(x) for x in leaves]),
            diff_params_memory=tree.unflatten(spec, stack),
            diff_updates_memory=tree.unflatten(spec, [torch.zeros_like(x) for x in stack]),
            weights_memory=torch.zeros(m, dtype=dtype, device=_utils.default_device(params)),
        )

    def update_fn(
        updates: Any, state: ScaleByLBFGSState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByLBFGSState]:
        del extra
        if params is None:
            raise ValueError("scale_by_lbfgs needs params: call update(updates, state, params)")
        u, spec, s = _utils.flat(
            updates,
            {
                "params": params,
                "state.params": state.params,
                "state.updates": state.updates,
            },
        )
        mem_w = tree.flatten(state.diff_params_memory)[0]
        mem_u = tree.flatten(state.diff_updates_memory)[0]
        count = _utils.safe_increment(state.count)
        if not u:
            return updates, state._replace(count=count)
        p = s["params"]
        wdtype = state.weights_memory.dtype
        started = state.count > 0
        idx = torch.remainder(state.count, m).long()
        prev = torch.remainder(state.count - 1, m).long().reshape(1)
        # 1. Store the newest pair of differences (zero at the first step, where none exists).
        dw = [
            torch.where(started, a - b, torch.zeros_like(a)) for a, b in zip(p, s["state.params"])
        ]
        du = [
            torch.where(started, a - b, torch.zeros_like(a)) for a, b in zip(u, s["state.updates"])
        ]
        curv = _rdot(du, dw, wdtype)
        # Double ``where``s (0-d, same values): the branch not taken divided by 0, and its inf
        # times the zero cotangent made derivatives NaN (optax's too) after a step that did not
        # move, e.g. a schedule starting at 0.
        flat = curv == 0.0
        rho = torch.where(flat, torch.zeros_like(curv), 1.0 / torch.where(flat, 1.0, curv))
        rho = torch.where(started, rho, torch.zeros_like(rho))
        # The memories keep the params' dtypes: gradients of another dtype (bfloat16 ones of
        # float32 params) made index_copy fail.
        mem_w = [mw.index_copy(0, prev, d.unsqueeze(0).to(mw.dtype)) for mw, d in zip(mem_w, dw)]
        mem_u = [mu.index_copy(0, prev, d.unsqueeze(0).to(mu.dtype)) for mu, d in zip(mem_u, du)]
        rhos = state.weights_memory.index_copy(0, prev, rho.reshape(1))
        # 2. γ, the scale of the initial inverse Hessian.
        if scale_init_precond:
            den = _rdot(du, du, wdtype)
            curved = den > 0.0
            gamma = torch.where(curved, curv / torch.where(curved, den, 1.0), torch.ones_like(den))
            # optax takes this norm of ``stop_gradient(updates)``: derivatives treat the first
            # step's scale as a constant (numerics follow optax, derivatives included).
            u_const = [x.detach() for x in u]
            first = torch.clamp(1.0 / _rdot(u_const, u_const, wdtype).sqrt(), max=1.0)
            gamma = torch.where(started, gamma, first)
        else:
            gamma = torch.ones((), dtype=wdtype, device=rhos.device)
        # 3. The two-loop recursion, slots ordered oldest → newest from the current index.
        order = torch.remainder(idx + torch.arange(m, device=idx.device), m)
        ow = [x.index_select(0, order) for x in mem_w]
        ou = [x.index_select(0, order) for x in mem_u]
        orho = rhos.index_select(0, order)
        q = [x.to(_work_dtype(x)) for x in u]
        alphas = [None] * m
        for j in reversed(range(m)):
            alphas[j] = orho[j] * _rdot([x[j] for x in ow], q, wdtype)
            q = [a - alphas[j] * b[j] for a, b in zip(q, ou)]
        q = [gamma * a for a in q]
        for j in range(m):
            beta = orho[j] * _rdot([x[j] for x in ou], q, wdtype)
            q = [a + (alphas[j] - beta) * b[j] for a, b in zip(q, ow)]
        out = [a.to(x.dtype) for a, x in zip(q, u)]
        # Copies: the state must not alias the caller's parameters or gradient buffers, which
        # a PyTorch loop updates in place (``p.add_(u)``, ``.grad`` zeroed and accumulated);
        # aliases would make the next differences δw, δu zero or wrong.
        return tree.unflatten(spec, out), ScaleByLBFGSState(
            count=count,
            params=tree.unflatten(spec, [x.clone() for x in p]),
            updates=tree.unflatten(
                spec, [x.to(y.dtype, copy=True) for x, y in zip(u, s["state.updates"])]
            ),
            diff_params_memory=tree.unflatten(spec, mem_w),
            diff_updates_memory=tree.unflatten(spec, mem_u),
            weights_memory=rhos,
        )

    return GradientTransformation(init_fn, update_fn)


# optax's default: a transform is a pair of pure functions, so one shared instance is safe.
_ZOOM = scale_by_zoom_linesearch(max_linesearch_steps=20, initial_guess_strategy="one")


def lbfgs(
    learning_rate: _utils.ScalarOrSchedule | None = None,
    memory_size: int = 10,
    scale_init_precond: bool = True,
    linesearch: GradientTransformation | None = _ZOOM,
) -> GradientTransformation:
    """L-BFGS (optax's): ``chain(scale_by_lbfgs, scale(−1) or −learning_rate, linesearch)``.

    The default ``linesearch`` is ``scale_by_zoom_linesearch(max_linesearch_steps=20,
    initial_guess_strategy="one")``, as optax's; pass ``linesearch=None`` for none (then ``learning_rate`` sets the step).
    With a line search, ``update`` needs ``params`` and the keywords ``value``, ``grad`` and
    ``value_fn``, so :func:`functrain.train.make_train_step` (which passes only ``value=``)
    cannot drive it: write the loop yourself, as in the example; ``lbfgs(learning_rate,
    linesearch=None)`` works in ``make_train_step``. With the default line search each update
    evaluates ``value_fn`` and its gradient 20 times (see :mod:`functrain.optim.linesearch`;
    ``scale_by_zoom_linesearch(20, initial_guess_strategy="one", early_exit=True)`` stops as
    soon as a step is accepted, at the cost of a host read per try).

    Differences from ``torch.optim.LBFGS``: that runs several inner iterations per
    ``step(closure)``, skips pairs with small curvature, has tolerances that stop early, uses
    ``lr`` as its first step and a strong-Wolfe search only if asked; this is one iteration per
    update, optax's numerics. Both converge to the same minimum on smooth problems.

    Args:
        learning_rate: fixed step size or schedule (``None``: the line search, or 1, decides).
        memory_size: number of pairs of differences kept.
        scale_init_precond: scale the initial inverse Hessian (see :func:`scale_by_lbfgs`).
        linesearch: a line-search transform, or ``None`` for none.

    Example:
        >>> import torch, functrain as ft
        >>> f = lambda p: ((p[0] - torch.tensor([1.0, -2.0])) ** 2 * torch.tensor([1.0, 10.0])).sum()
        >>> tx = ft.lbfgs()
        >>> params = [torch.zeros(2)]
        >>> state = tx.init(params)
        >>> value_and_grad = ft.value_and_grad_from_state(f)
        >>> for _ in range(5):
        ...     value, grad = value_and_grad(params, state=state)
        ...     updates, state = tx.update(
        ...         grad, state, params, value=value, grad=grad, value_fn=f
        ...     )
        ...     params = ft.apply_updates(params, updates)
        >>> params[0]
        tensor([ 1., -2.])
    """
    base = scale(-1.0) if learning_rate is None else scale_by_learning_rate(learning_rate)
    search = identity() if linesearch is None else linesearch
    return chain(scale_by_lbfgs(memory_size, scale_init_precond), base, search)
