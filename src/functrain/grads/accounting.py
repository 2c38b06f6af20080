"""Privacy accounting for DP-SGD: Rényi DP of the Poisson-subsampled Gaussian mechanism.

One DP-SGD step with Poisson sampling (each example in the batch independently with
probability ``q``), clipping norm ``C`` and noise ``σ·C`` is the *sampled Gaussian mechanism*
(SGM) with sampling rate ``q`` and noise multiplier ``σ``. Its Rényi DP at order ``α`` is
(Mironov, Talwar and Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism")::

    RDP(α) = log(A_α) / (α − 1),   A_α = E_{z ~ N(0, σ²)} [((1 − q) + q·e^{(2z − 1)/(2σ²)})^α]

computed exactly for integer ``α`` (a binomial sum) and by quadrature for fractional ``α``; ``T`` steps compose to ``T·RDP(α)``. A run's ``(ε, δ)`` is the best
over the orders of the conversion of Balle et al. 2020 ("Hypothesis Testing Interpretations
and Renyi Differential Privacy", Theorem 21)::

    ε = RDP(α) + log((α − 1)/α) − (log δ + log α)/(α − 1)

These are the formulas and the default orders of Opacus' ``RDPAccountant`` (and TensorFlow
Privacy), so the same run reports the same ``ε``. Everything here is host arithmetic on Python
floats, done outside the train step.

What the guarantee assumes: batches drawn by Poisson sampling (:class:`PoissonSampler`), the
noisy sum divided by the *expected* batch size (:func:`dp_noisy_mean` does), the noise added at
every step, empty batches included, and a secure noise generator, which functrain's counter-hash
noise is not (see :mod:`functrain.grads.privacy`): use the numbers for research.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["RDPAccountant", "compute_rdp", "get_noise_multiplier", "get_privacy_spent"]

#: Opacus' default orders (``DEFAULT_ALPHAS``): 1.1, 1.2, …, 10.9, then 12, 13, …, 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
)


def _log_binomial(alpha: int, k: int) -> float:
    return math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)


def _log_expm1(x: float) -> float:
    """``log(eˣ − 1)`` for ``x > 0``."""
    return x + math.log(-math.expm1(-x)) if x > 1 else math.log(math.expm1(x))


def _softplus(x: float) -> float:
    """``log(1 + eˣ)``."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """``log A_α`` for an integer ``α ≥ 2``.

    Expanding the power, ``A_α = Σₖ C(α,k) (1−q)^{α−k} qᵏ e^{(k²−k)/(2σ²)}`` (each term a
    Gaussian integral in closed form). Without the exponentials the terms sum to exactly 1, so
    ``A_α − 1 = Σ_{k≥2} C(α,k) (1−q)^{α−k} qᵏ (e^{(k²−k)/(2σ²)} − 1)``: positive terms, which
    keep their precision when ``A_α − 1`` is tiny (small ``q``, large ``σ``).
    """
    log_q, log_1mq = math.log(q), math.log1p(-q)
    terms = [
        _log_binomial(alpha, k)
        + k * log_q
        + (alpha - k) * log_1mq
        + _log_expm1((k * k - k) / (2 * sigma**2))
        for k in range(2, alpha + 1)
    ]
    top = max(terms)
    return _softplus(top + math.log(math.fsum(math.exp(t - top) for t in terms)))


#: Half-width, in ``σ``, of the windows around the integrand's peaks: its Gaussian factor falls
#: by ``e^{−W²/2} = e^{−128}`` at their edges.
_WINDOW = 16.0
#: Above this many nodes on the whole line, an order is integrated over windows instead.
_MAX_NODES = 1 << 15


def _log_parts(z: torch.Tensor, q: float, sigma: float) -> tuple[torch.Tensor, ...]:
    """``log N(z; 0, σ²)``, ``w = (2z − 1)/(2σ²)`` and ``log(1 − q + q·eʷ)`` at the nodes."""
    var = sigma * sigma
    w = (2 * z - 1) / (2 * var)
    log_gauss = -(z * z) / (2 * var) - math.log(sigma * math.sqrt(2 * math.pi))
    log_mix = torch.logaddexp(torch.tensor(math.log1p(-q), dtype=torch.float64), math.log(q) + w)
    return log_gauss, w, log_mix


def _log_excess(z: torch.Tensor, q: float, sigma: float, alpha: float) -> torch.Tensor:
    """``log(N(z)·g(u))``, ``u = q(eʷ − 1)``, ``g(u) = (1 + u)^α − 1 − αu`` (``≥ 0``).

    ``A_α − 1 = ∫ N(z)·g(u) dz``: the subtracted ``αu`` integrates to exactly 0
    (``E[eʷ] = 1``), and without it the integrand's first-order part cancels to all but a
    few digits when ``A_α − 1`` is tiny (``q`` small, ``σ`` large). ``g`` is summed as its
    binomial series where ``|αu| ≤ 0.1`` (each term under 0.07 of the one before, no
    cancellation), directly elsewhere.
    """
    log_gauss, w, log_mix = _log_parts(z, q, sigma)
    x = alpha * log_mix  # log((1 + u)^α)
    u = q * torch.expm1(w.clamp(max=600.0))
    au = alpha * u
    small = au.abs() <= 0.1
    us = torch.where(small, u, 0.0)
    term = alpha * (alpha - 1) / 2 * us * us
    series = term
    for k in range(3, 30):
        term = term * ((alpha - k + 1) / k) * us
        series = series + term
    direct = torch.expm1(x.clamp(max=1.0)) - au  # where x ≤ 1, u is finite
    # x > 1 (so u > 0): g = eˣ·(1 − (1 + αu)·e⁻ˣ), with (1 + αu) ≤ eˣ (Bernoulli).
    log_u = math.log(q) + w + torch.log(-torch.expm1(-w.clamp(min=1e-300)))
    log_1p_au = torch.logaddexp(torch.zeros((), dtype=torch.float64), math.log(alpha) + log_u)
    ratio = torch.exp(log_1p_au - x)
    big = x + torch.log1p(-ratio.clamp(max=1.0))
    log_g = torch.where(
        small,
        torch.log(series.clamp(min=0.0)),
        torch.where(x <= 1, torch.log(direct.clamp(min=0.0)), big),
    )
    return log_gauss + log_g


def _windows(q: float, sigma: float, alpha: float) -> list[tuple[float, float, int]]:
    """``(start, stop, nodes)`` of grids covering the integrand's mass for one order.

    ``log f = log N(z) + α·log(1 − q + q·eʷ)`` rises left of 0 and falls right of ``α``; it is
    at most ``max(two Gaussian branches peaking at 0 and α) + α·log 2``, and the ``α·log 2``
    only within ``Wσ`` of ``z₀ = 1/2 + σ²·log((1 − q)/q)``, where the mixture switches
    branch. So windows ``±Wσ`` around 0, ``α`` and ``z₀`` hold all but ``e^{−128}`` of the
    peak. Only a window that meets the switch (and the branch points ``z₀ ± iπσ²(2k+1)``) needs
    the fine step ``σ²/4``; the others are Gaussian-like and take ``σ/4``.
    """
    half = _WINDOW * sigma
    z0 = 0.5 + sigma * sigma * (math.log1p(-q) - math.log(q))
    lo, hi = -half, alpha + half
    spans = sorted([(-half, half), (alpha - half, alpha + half)])
    switch = (max(lo, z0 - half), min(hi, z0 + half))
    if switch[0] < switch[1]:
        spans = sorted([*spans, switch])
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out = []
    for a, b in merged:
        fine = switch[0] < switch[1] and a < switch[1] and switch[0] < b
        h = min(sigma, sigma * sigma) / 4 if fine else sigma / 4
        n = math.ceil((b - a) / h) + 1
        out.append((a, b, n))
    return out


def _log_a_windowed(
    q: float, sigma: float, alpha: float, cache: dict[tuple[float, float, int], tuple[Any, ...]]
) -> float:
    """``log A_α`` over :func:`_windows`; ``cache`` keeps the nodes' parts (the windows at 0
    and ``z₀``, the long one, are the same for every order)."""
    segments = []
    for a, b, n in _windows(q, sigma, alpha):
        if (a, b, n) not in cache:
            if len(cache) > 8:  # the windows around each α are used once
                cache.clear()
            z = torch.linspace(a, b, n, dtype=torch.float64)
            cache[(a, b, n)] = (z, (b - a) / (n - 1), *_log_parts(z, q, sigma))
        segments.append(cache[(a, b, n)])
    parts = [
        torch.logsumexp(log_gauss + alpha * log_mix, 0).item() + math.log(step)
        for _, step, log_gauss, _, log_mix in segments
    ]
    value = _logsumexp(parts)
    if value < 1e-2:
        excess = [
            torch.logsumexp(_log_excess(z, q, sigma, alpha), 0).item() + math.log(step)
            for z, step, *_ in segments
        ]
        value = math.log1p(math.exp(_logsumexp(excess)))
    return value


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def _log_a_fractional(q: float, sigma: float, alphas: Sequence[float]) -> list[float]:
    """``log A_α`` for fractional orders ``α > 1``, by the trapezoidal rule on the real line.

    The integrand ``N(z; 0, σ²)·((1 − q) + q·e^{(2z−1)/(2σ²)})^α`` is analytic in the strip
    ``|Im z| < πσ²`` (the power's branch points lie on its edges) and decays like a Gaussian,
    so the trapezoidal rule with step ``h`` errs by about ``e^{−2π²σ²/h}``: ``h = min(σ, σ²)/4``
    puts that below ``e^{−78}``. (The paper's two-sided series converges only polynomially
    when ``q`` is large; this needs a few thousand points whatever ``q``.) Its mass lies
    between ``0`` and ``α`` (the Gaussians ``N(k, σ²)`` of the expansion), widened by ``20σ``
    (a Gaussian tail of ``e^{−200}``). Where that grid would exceed ``2¹⁵`` nodes (small
    ``σ``, large ``α``) the order is integrated over windows around the peaks instead
    (:func:`_windows`), so time and memory stay bounded.

    Where ``A_α ≈ 1`` its logarithm would lose the digits of ``A_α − 1``, so that case
    integrates ``A_α − 1`` directly (:func:`_log_excess`).
    """
    h = min(sigma, sigma * sigma) / 4
    short = [a for a in alphas if (a + 40 * sigma) / h < _MAX_NODES]
    cache: dict[tuple[float, float, int], tuple[Any, ...]] = {}
    log_a = {a: _log_a_windowed(q, sigma, a, cache) for a in alphas if a not in short}
    if short:
        lo, hi = -20 * sigma, max(short) + 20 * sigma
        n = math.ceil((hi - lo) / h) + 1
        z = torch.linspace(lo, hi, n, dtype=torch.float64)
        log_step = math.log((hi - lo) / (n - 1))
        log_gauss, _, log_mix = _log_parts(z, q, sigma)
        for chunk in range(0, len(short), 16):  # bounds memory
            rows = short[chunk : chunk + 16]
            a = torch.tensor(rows, dtype=torch.float64)[:, None]
            values = (torch.logsumexp(log_gauss + a * log_mix, 1) + log_step).tolist()
            for alpha, value in zip(rows, values):
                if value < 1e-2:
                    excess = torch.logsumexp(_log_excess(z, q, sigma, alpha), 0).item()
                    value = math.log1p(math.exp(excess + log_step))
                log_a[alpha] = value
    return [log_a[a] for a in alphas]


def _rdp_per_step(q: float, sigma: float, orders: Sequence[float]) -> list[float]:
    if q == 0.0:
        return [0.0] * len(orders)
    if sigma == 0.0:
        return [math.inf] * len(orders)
    if q == 1.0:  # no subsampling: the Gaussian mechanism
        return [a / (2 * sigma**2) for a in orders]
    fractional = [a for a in orders if not a.is_integer()]
    log_a = dict(zip(fractional, _log_a_fractional(q, sigma, fractional))) if fractional else {}
    for a in orders:
        if a.is_integer():
            log_a[a] = _log_a_integer(q, sigma, int(a))
    # A_α ≥ 1: rounding must not make an RDP value negative.
    return [max(log_a[a], 0.0) / (a - 1) for a in orders]


def _check_rate_and_noise(sample_rate: Any, noise_multiplier: Any) -> tuple[float, float]:
    for name, value in (("sample_rate", sample_rate), ("noise_multiplier", noise_multiplier)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    if sample_rate > 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    return float(sample_rate), float(noise_multiplier)


def _check_orders(orders: Sequence[float] | None) -> tuple[float, ...]:
    values = DEFAULT_ORDERS if orders is None else tuple(orders)
    if not values:
        raise ValueError("orders must not be empty")
    for a in values:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 1:
            raise ValueError(f"every RDP order must be a number > 1, got {a!r}")
        if not math.isfinite(a):  # RDP(inf) is the max-divergence: not what these formulas give
            raise ValueError(f"every RDP order must be finite, got {a!r}")
    return tuple(float(a) for a in values)


def _check_delta(name: str, delta: Any) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {delta!r}")


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    return steps


def compute_rdp(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    orders: Sequence[float] | None = None,
) -> list[float]:
    """Rényi DP of ``steps`` sampled-Gaussian steps, one value per order.

    Args:
        sample_rate: ``q``, the probability that an example is in a batch (Poisson sampling:
            the expected batch size over the dataset size).
        noise_multiplier: ``σ``, the noise standard deviation over the clipping norm.
        steps: the number of steps.
        orders: the RDP orders ``α > 1`` (default: Opacus' ``DEFAULT_ALPHAS``).

    Returns:
        ``steps · RDP(α)`` for each order (``inf`` where ``σ = 0``).

    Example:
        >>> import functrain as ft
        >>> ft.compute_rdp(1.0, 2.0, steps=3, orders=[2, 4])  # no subsampling: 3·α/(2σ²)
        [0.75, 1.5]
    """
    q, sigma = _check_rate_and_noise(sample_rate, noise_multiplier)
    steps = _check_steps(steps)
    alphas = _check_orders(orders)
    if steps == 0:
        return [0.0] * len(alphas)
    return [steps * r for r in _rdp_per_step(q, sigma, alphas)]


def get_privacy_spent(
    orders: Sequence[float], rdp: Sequence[float], delta: float
) -> tuple[float, float]:
    """The ``(ε, best order)`` for ``δ``, from RDP values at several orders (as Opacus).

    ``ε = min over α of RDP(α) + log((α−1)/α) − (log δ + log α)/(α − 1)`` (Balle et al. 2020),
    never below 0, and exactly 0 when some order's RDP is 0 (nothing spent; Opacus reports
    the formula's floor, about 0.1 at ``δ = 1e-5``, there). Check the returned order: at the
    edge of ``orders``, a wider range may give a smaller ``ε``.

    Args:
        orders: the orders ``α > 1``.
        rdp: the RDP value at each order (e.g. from :func:`compute_rdp`).
        delta: the target ``δ`` in ``(0, 1)``.

    Returns:
        ``(epsilon, order)``; ``(inf, nan)`` when every order's RDP is infinite.

    Example:
        >>> import functrain as ft
        >>> orders = [2.0, 8.0, 32.0]
        >>> eps, order = ft.get_privacy_spent(orders, ft.compute_rdp(0.01, 1.1, 1000, orders), 1e-5)
        >>> round(eps, 2), order
        (1.8, 8.0)
    """
    alphas = _check_orders(orders)
    try:
        values = [float(v) for v in rdp]
    except (TypeError, ValueError) as err:
        raise ValueError(f"rdp must be a sequence of numbers, one per order: {err}") from None
    if len(values) != len(alphas):
        raise ValueError(f"rdp has {len(values)} values for {len(alphas)} orders")
    _check_delta("delta", delta)
    for a, r in zip(alphas, values):
        if math.isnan(r) or r < 0:
            raise ValueError(f"rdp must be >= 0 (or inf), got {r} at order {a}")
    if 0.0 in values:  # a Rényi divergence of 0 means identical distributions: nothing spent
        return 0.0, alphas[values.index(0.0)]
    best, best_order = math.inf, math.nan
    for a, r in zip(alphas, values):
        eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if eps < best:
            best, best_order = eps, a
    return max(best, 0.0), best_order


def get_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    *,
    orders: Sequence[float] | None = None,
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to a tolerance) whose run spends at most the target ε.

    A bisection on ``σ`` of :func:`compute_rdp` and :func:`get_privacy_spent`, as Opacus'
    ``get_noise_multiplier``. The returned ``σ`` spends ``ε`` in
    ``[target − epsilon_tolerance, target]``.

    Args:
        target_epsilon: the ``ε`` budget (> 0).
        target_delta: the ``δ`` in ``(0, 1)``.
        sample_rate: ``q`` (Poisson sampling rate) in ``(0, 1]``.
        steps: the number of steps of the run (>= 1).
        orders: the RDP orders (default: Opacus' ``DEFAULT_ALPHAS``).
        epsilon_tolerance: how far below the target the result may land (> 0).

    Returns:
        ``σ``.

    Raises:
        ValueError: invalid arguments, or a target below what any noise can reach at these
            orders (the conversion has a floor above 0 for a fixed order range).

    Example:
        >>> import functrain as ft
        >>> sigma = ft.get_noise_multiplier(3.0, 1e-5, sample_rate=256 / 60000, steps=14_000)
        >>> round(sigma, 2)
        1.01
    """
    if (
        isinstance(target_epsilon, bool)
        or not isinstance(target_epsilon, (int, float))
        or not 0 < target_epsilon < math.inf
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if (
        isinstance(epsilon_tolerance, bool)
        or not isinstance(epsilon_tolerance, (int, float))
        or not epsilon_tolerance > 0
    ):
        raise ValueError(f"epsilon_tolerance must be a number > 0, got {epsilon_tolerance!r}")
    _check_delta("target_delta", target_delta)
    q, _ = _check_rate_and_noise(sample_rate, 1.0)
    if q == 0:
        raise ValueError("sample_rate must be > 0: with no sampling nothing is spent")
    # No steps spend nothing at any noise: the bisection would shrink sigma towards 0 forever.
    if _check_steps(steps) == 0:
        raise ValueError("steps must be >= 1: a run of no steps spends nothing, at any noise")
    alphas = _check_orders(orders)

    def epsilon(sigma: float) -> float:
        return get_privacy_spent(alphas, compute_rdp(q, sigma, steps, alphas), target_delta)[0]

    if epsilon(1e6) > target_epsilon:
        raise ValueError(
            f"target_epsilon={target_epsilon} is below what any noise multiplier reaches with "
            f"delta={target_delta} at these orders; raise the target or add larger orders"
        )
    low, high = 0.0, 10.0
    while epsilon(high) > target_epsilon:
        low, high = high, 2 * high
    while True:
        mid = (low + high) / 2
        eps = epsilon(mid)
        if eps > target_epsilon:
            low = mid
        else:
            high = mid
            if eps >= target_epsilon - epsilon_tolerance:
                return high
        if high - low < 1e-12 * high:
            return high


class RDPAccountant:
    """Tracks the privacy spent by a DP-SGD run, as Opacus' ``RDPAccountant``.

    Call :meth:`step` once per optimizer step (or with ``steps=`` for many), with the noise
    multiplier and Poisson sampling rate used; :meth:`get_epsilon` gives the ``ε`` spent for a
    ``δ``. Steps with different settings compose (their RDP adds up). The history is plain
    numbers: :meth:`state_dict` / :meth:`load_state_dict` store it with a checkpoint.

    Example:
        >>> import functrain as ft
        >>> accountant = ft.RDPAccountant()
        >>> accountant.step(noise_multiplier=1.1, sample_rate=0.01, steps=1000)
        >>> round(accountant.get_epsilon(delta=1e-5), 2)
        1.71
        >>> accountant.history
        [(1.1, 0.01, 1000)]
    """

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Records ``steps`` steps with noise multiplier ``σ`` and sampling rate ``q``."""
        q, sigma = _check_rate_and_noise(sample_rate, noise_multiplier)
        steps = _check_steps(steps)
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + steps)
        else:
            self.history.append((sigma, q, steps))

    def get_privacy_spent(
        self, *, delta: float, orders: Sequence[float] | None = None
    ) -> tuple[float, float]:
        """``(ε, best order)`` spent so far for ``δ`` (``ε = 0`` before any step)."""
        alphas = _check_orders(orders)
        total = [0.0] * len(alphas)
        for sigma, q, steps in self.history:
            total = [t + r for t, r in zip(total, compute_rdp(q, sigma, steps, alphas))]
        return get_privacy_spent(alphas, total, delta)

    def get_epsilon(self, delta: float, orders: Sequence[float] | None = None) -> float:
        """The ``ε`` spent so far for ``δ``."""
        return self.get_privacy_spent(delta=delta, orders=orders)[0]

    def __len__(self) -> int:
        """The number of steps recorded (Opacus' ``len`` counts history entries instead)."""
        return sum(steps for _, _, steps in self.history)

    def state_dict(self) -> dict[str, Any]:
        """The history as plain lists (JSON- and checkpoint-friendly)."""
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` (validated before anything is replaced)."""
        entries = state.get("history") if isinstance(state, dict) else None
        if not isinstance(entries, list):
            raise ValueError("an RDPAccountant state_dict has a 'history' list")
        history = []
        for entry in entries:
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(
                    f"history entries are (noise_multiplier, sample_rate, steps): {entry!r}"
                )
            q, sigma = _check_rate_and_noise(entry[1], entry[0])
            history.append((sigma, q, _check_steps(entry[2])))
        self.history = history
