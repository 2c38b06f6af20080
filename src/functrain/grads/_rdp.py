"""The Rényi DP of one step of the sampled Gaussian mechanism (the maths behind accounting).

``RDP(α) = log(A_α) / (α − 1)`` with ``A_α = E_{z ~ N(0, σ²)}[((1 − q) + q·e^{(2z − 1)/(2σ²)})^α]``
(Mironov, Talwar and Zhang 2019): exactly for integer ``α`` (a binomial sum of positive terms),
by trapezoidal quadrature in float64 for fractional ``α`` (windows around the integrand's peaks),
and from above, within ``log 2``, where ``σ < 1e-4`` makes the quadrature grid too long. The
public API over it is :mod:`functrain.grads.accounting`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["rdp_per_step"]


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
        + _log_expm1((k * k - k) / 2 / (sigma * sigma))
        for k in range(2, alpha + 1)
    ]
    top = max(terms)
    return _softplus(top + math.log(math.fsum(math.exp(t - top) for t in terms)))


#: Half-width, in ``σ``, of the windows around the integrand's peaks: its Gaussian factor falls
#: by ``e^{−W²/2} = e^{−128}`` at their edges.
_WINDOW = 16.0
#: Above this many nodes on the whole line, an order is integrated over windows instead.
_MAX_NODES = 1 << 15
#: Above this many nodes in its windows (``σ`` below about ``1e-4``, where the fine step
#: ``σ²/4`` makes them long), an order is bounded from its integer neighbours instead.
_MAX_WINDOW_NODES = 1 << 20


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
    integrates ``A_α − 1`` directly (:func:`_log_excess`). Where even the windows would exceed
    ``2²⁰`` nodes (``σ`` below about ``1e-4``, RDP above ``1e7``) it returns an upper bound
    (:func:`_log_a_bound`), within ``log 2`` of the exact RDP.
    """
    h = min(sigma, sigma * sigma) / 4
    short = [a for a in alphas if (a + 40 * sigma) / h < _MAX_NODES]
    cache: dict[tuple[float, float, int], tuple[Any, ...]] = {}
    log_a = {}
    for a in alphas:
        if a in short:
            continue
        nodes = [n for *_, n in _windows(q, sigma, a)]
        if sum(nodes) <= _MAX_WINDOW_NODES and min(nodes) > 2:
            log_a[a] = _log_a_windowed(q, sigma, a, cache)
        else:  # tiny σ: the grid would take gigabytes (σ = 1e-6), or round to one node (1e-100)
            log_a[a] = _log_a_bound(q, sigma, a)
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


def _log_a_bound(q: float, sigma: float, alpha: float) -> float:
    """An upper bound on ``log A_α`` for a fractional ``α``, for ``σ`` too small for a grid.

    The smaller of two bounds. ``log A_α = log E[Lᵅ]`` (``L`` the privacy-loss likelihood
    ratio) is convex in ``α`` with ``log A_1 = 0``, so the chord between the integer orders
    ``⌊α⌋`` and ``⌈α⌉`` lies above it. And ``(a + b)^α ≤ 2^{α−1}(aᵅ + bᵅ)`` gives
    ``A_α ≤ 2^{α−1}((1 − q)^α + qᵅ·e^{α(α−1)/(2σ²)})``, within ``log 2`` in RDP of the exact
    value as ``σ → 0`` (where the second term dominates). A valid, slightly conservative RDP.
    """
    low, high = math.floor(alpha), math.ceil(alpha)
    log_low = 0.0 if low == 1 else _log_a_integer(q, sigma, low)
    chord = (high - alpha) * log_low + (alpha - low) * _log_a_integer(q, sigma, high)
    top = alpha * math.log(q) + alpha * (alpha - 1) / 2 / (sigma * sigma)
    if top == math.inf:
        return chord
    return min(chord, (alpha - 1) * math.log(2) + _logsumexp([alpha * math.log1p(-q), top]))


def rdp_per_step(q: float, sigma: float, orders: Sequence[float]) -> list[float]:
    """``RDP(α)`` of one step at each order (``q``, ``σ`` checked by the caller)."""
    if q == 0.0:
        return [0.0] * len(orders)
    var = sigma * sigma  # not sigma**2, which raises OverflowError past 1e154
    if var == 0.0:  # σ = 0, or σ² underflows: RDP ~ α/(2σ²) is past any float (inf bounds it)
        return [math.inf] * len(orders)
    if var > 1e280:
        # A_α − 1 = α(α − 1)q²/(2σ²) + O(σ⁻⁴) (the second moment of e^w − 1, w ~ N(−1/(2σ²),
        # 1/σ²)), so RDP = αq²/(2σ²) to every digit; the grids below would overflow (NaN).
        return [a * q * q / 2 / sigma / sigma for a in orders]  # σ² itself may overflow
    if q == 1.0:  # no subsampling: the Gaussian mechanism
        return [a / (2 * var) for a in orders]
    fractional = [a for a in orders if not a.is_integer()]
    log_a = dict(zip(fractional, _log_a_fractional(q, sigma, fractional))) if fractional else {}
    for a in orders:
        if a.is_integer():
            log_a[a] = _log_a_integer(q, sigma, int(a))
    # A_α ≥ 1: rounding must not make an RDP value negative.
    return [max(log_a[a], 0.0) / (a - 1) for a in orders]
