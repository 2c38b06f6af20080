r"""Numerics of PRV accounting: discretise, compose by FFT, read ``ε`` off the composed loss.

The privacy loss random variable (PRV) of one DP-SGD step (Poisson rate ``q``, noise
multiplier ``σ``, sensitivity normalised to 1) is ``Y = log(P(ω)/Q(ω))`` with ``ω ~ P``, where
``P = (1 − q)·N(0, σ²) + q·N(1, σ²)`` (the example is in the data) and ``Q = N(0, σ²)`` (it is
not): the pair whose Rényi divergence :mod:`functrain.grads._rdp` computes. The log-ratio is
increasing in ``ω``, so ``Y ≤ t`` exactly when ``ω ≤ z(t)`` with
``z(t) = σ²·log((eᵗ − (1 − q))/q) + 1/2`` (and never for ``t ≤ log(1 − q)``), which gives the
CDF in closed form: ``F(t) = (1 − q)·Φ(z/σ) + q·Φ((z − 1)/σ)``.

A run of ``k`` steps is ``(ε, δ(ε))``-DP with ``δ(ε) = E[(1 − e^{ε − Σ Yᵢ})₊]``, the sum over its
steps. Gopi, Lee and Wutschitz 2021 ("Numerical Composition of Differential Privacy") compute
it by truncating each ``Yᵢ`` to ``[−L, L]``, placing each mesh cell's mass at its centre, then
shifting the grid so that the discrete variable keeps the truncated one's mean (the rounding
errors are then centred, and their sum over ``k`` steps grows like ``√k`` rather than ``k``),
and composing with one FFT. Their error theorem gives, for mesh ``h`` and the domain rule
below, ``δ_Y(ε + ε_err) − δ_err ≤ δ̂(ε) ≤ δ_Y(ε − ε_err) + δ_err``, hence the bounds on ``ε``
returned here. The mesh and domain rules are those of the authors' reference implementation
and of Opacus' ``PRVAccountant``.

The theorem needs the mean exactly: an error of ``c·h`` per step moves the composed curve by
``c·h·k``, about ``c·√k`` times ``ε_err``. The law of ``Y`` can be far narrower than a cell
(small ``q`` or ``σ``: most of the mass within ``1e-5`` of ``log(1 − q)``), where a quadrature
over ``t`` goes wrong by a few % of ``h``; the mean is integrated over ``ω`` instead, where the
integrand is smooth on the scale ``min(σ, σ²)`` whatever the mesh. ``Φ`` is taken from
``erfc`` (``torch.special.ndtr`` has no relative precision in the lower tail), and ``ε`` is
read off the curve with sums that never leave float64's exponent range (``L`` can exceed 709).
Everything runs on the CPU in float64 (host arithmetic outside any train step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

# The largest grid (points) one accounting builds: a few float64 arrays of this size fit
# comfortably in memory; beyond it the caller is told to loosen eps_error.
MAX_POINTS = 1 << 24
# Each of the mixture's components has mass Φ(−12) < 2e-33 beyond 12·σ from its mean:
# nothing float64 arithmetic on δ (rounding ~1e-16) can see, even summed over 10⁹ steps.
_TAILS = 12.0
# Eight-point Gauss–Legendre on panels of the ω axis (the truncated mean's quadrature).
_NODES, _WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(8))
_CHUNK = 1 << 17  # panels per block of the quadrature (bounds its temporaries)
# e^{±_EXP_RANGE} is far inside float64: the block length (in t) of epsilon_for's sums.
_EXP_RANGE = 500.0


class GridTooLargeError(ValueError):
    """The accuracy asked needs more than :data:`MAX_POINTS` grid points."""


def _ndtr(x: torch.Tensor) -> torch.Tensor:
    """``Φ(x)`` to full relative precision in the lower tail.

    ``torch.special.ndtr`` is ``(1 + erf(x/√2))/2`` on the CPU: absolute precision only, so
    ``Φ(−8)`` comes out 2% low and everything below ``−8.4`` is 0; ``erfc`` keeps the tail.
    """
    return 0.5 * torch.special.erfc(x * -math.sqrt(0.5))


def _omega(t: torch.Tensor, q: float, sigma: float) -> torch.Tensor:
    """The ``ω`` whose privacy loss is ``t``: ``z(t) = σ²·log((eᵗ − (1 − q))/q) + 1/2``
    (``−inf`` for ``t ≤ log(1 − q)``, which no ``ω`` reaches)."""
    if q == 1:
        return sigma * sigma * t + 0.5
    log_keep = math.log1p(-q)
    inside = t > log_keep
    safe_t = torch.where(inside, t, log_keep + 1.0)
    # log(eᵗ − (1 − q)) = t + log(1 − e^{log(1−q) − t}): no overflow at large t, and expm1
    # keeps 1 − e^{−d} exact as d = t − log(1 − q) → 0 (log1p(−exp(−d)) loses d's digits).
    u = safe_t + torch.log(-torch.expm1(log_keep - safe_t)) - math.log(q)
    return torch.where(inside, sigma * sigma * u + 0.5, -math.inf)


def _loss(omega: torch.Tensor, q: float, sigma: float) -> torch.Tensor:
    """The privacy loss at ``ω``: ``log(1 − q + q·eˣ)``, ``x = (2ω − 1)/(2σ²)`` (inverse of
    :func:`_omega`), accurate near 0 (``log1p``/``expm1`` where ``|x| < 1``) and elsewhere
    (``logaddexp``: no overflow, and exactly ``x`` at ``q = 1``)."""
    x = (2 * omega - 1) / (2 * sigma * sigma)
    near = x.abs() < 1
    small = torch.log1p(q * torch.expm1(torch.where(near, x, 0.0)))
    log_keep = torch.tensor(math.log1p(-q) if q < 1 else -math.inf, dtype=x.dtype)
    large = torch.logaddexp(log_keep, x + math.log(q))
    return torch.where(near, small, large)


def tails(t: torch.Tensor, q: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F(t), S(t)) = (P(Y ≤ t), P(Y > t))`` for one step's privacy loss ``Y`` (float64).

    Both are computed directly (not as ``1 − other``), so each keeps its relative precision in
    its own tail: ``δ`` lives in the upper one.
    """
    z = _omega(t, q, sigma)
    a, b = z / sigma, (z - 1) / sigma
    cdf = (1 - q) * _ndtr(a) + q * _ndtr(b)
    sf = (1 - q) * _ndtr(-a) + q * _ndtr(-b)
    return cdf, sf


def _support(q: float, sigma: float) -> tuple[float, float]:
    """The ``ω`` range that carries all of ``P``'s mass but ``< 4e-33``."""
    return -_TAILS * sigma, 1 + _TAILS * sigma


def _truncated_mean(q: float, sigma: float, low: float, high: float) -> float:
    """``E[Y·1{low < Y ≤ high}]`` (over :func:`_support`) by Gauss–Legendre in ``ω``.

    In ``ω`` the integrand ``p(ω)·loss(ω)`` is smooth on the scale ``min(σ, σ²)`` (the
    Gaussians' width, and the width of the loss's bend from ``log(1 − q)`` to linear), however
    narrow the law of ``Y`` is in ``t``: eight nodes on panels of half that width leave an
    error far below float64 rounding.
    """
    bounds = _omega(torch.tensor([low, high], dtype=torch.float64), q, sigma).tolist()
    w_low, w_high = _support(q, sigma)
    w_low, w_high = max(bounds[0], w_low), min(bounds[1], w_high)
    if not w_low < w_high:
        return 0.0
    panels = math.ceil((w_high - w_low) / (min(sigma, sigma * sigma) / 2))
    width = (w_high - w_low) / panels
    norm = 1 / (sigma * math.sqrt(2 * math.pi))
    total = 0.0
    for start in range(0, panels, _CHUNK):
        index = torch.arange(start, min(start + _CHUNK, panels), dtype=torch.float64)
        omega = w_low + width * (index[:, None] + (_NODES + 1) / 2)
        density = norm * (
            (1 - q) * torch.exp(-0.5 * (omega / sigma) ** 2)
            + q * torch.exp(-0.5 * ((omega - 1) / sigma) ** 2)
        )
        total += float((density * _loss(omega, q, sigma) @ _WEIGHTS).sum()) * width / 2
    return total


def _cell_masses(edges: torch.Tensor, q: float, sigma: float) -> tuple[torch.Tensor, float]:
    """Each cell's probability, and ``E[Y·1{edges[0] < Y ≤ edges[-1]}]`` (the truncated
    variable's mean, unnormalised; :func:`_truncated_mean`).

    Only the cells that meet :func:`_support` are evaluated (the others keep 0): one step's
    loss is often far narrower than the composed run's domain. The mean is that of the same
    truncated variable, so the mean-preserving shift is exact to rounding even where the
    loss's law varies on scales far below the mesh (small ``q`` or ``σ``: nearly all the
    mass within a cell of ``log(1 − q)``), where a per-cell quadrature in ``t`` fails.
    """
    mass = torch.zeros(edges.numel() - 1, dtype=torch.float64)
    ends = _loss(torch.tensor(_support(q, sigma), dtype=torch.float64), q, sigma).tolist()
    first = max(int(torch.searchsorted(edges, ends[0], right=True)) - 1, 0)
    last = min(int(torch.searchsorted(edges, ends[1])) + 1, edges.numel())
    if first < last - 1:
        cdf, sf = tails(edges[first:last], q, sigma)
        # Each cell from the tail it lies in: a difference of two tiny upper-tail values keeps
        # the digits that 1 − F would have lost.
        upper = cdf[:-1] >= 0.5
        mass[first : last - 1] = torch.where(upper, sf[:-1] - sf[1:], cdf[1:] - cdf[:-1])
    return mass, _truncated_mean(q, sigma, float(edges[0]), float(edges[-1]))


def _fft_size(n: int) -> int:
    """The smallest ``2ᵃ·3ᵇ·5ᶜ ≥ n`` (pocketfft is slow on large prime sizes)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def _power(spectrum: torch.Tensor, k: int) -> torch.Tensor:
    """``spectrumᵏ`` by repeated squaring (a complex ``pow`` goes through ``exp(k·log z)``)."""
    result = None
    base = spectrum
    while k:
        if k & 1:
            result = base if result is None else result * base
        k >>= 1
        if k:
            base = base * base
    assert result is not None
    return result


class Composed(NamedTuple):
    """The composed PRV on the grid ``t_i = (i − centre)·h + shift``."""

    pmf: torch.Tensor
    h: float
    centre: int
    shift: float

    def grid(self) -> torch.Tensor:
        index = torch.arange(self.pmf.numel(), dtype=torch.float64)
        return (index - self.centre) * self.h + self.shift


def mesh(steps: int, eps_error: float, delta_error: float) -> float:
    """The mesh of Gopi et al.'s error theorem for ``steps`` compositions."""
    return eps_error / math.sqrt(steps * math.log(12 / delta_error) / 2)


def compose(
    entries: Sequence[tuple[float, float, int]], half_width: float, h: float, delta: float
) -> Composed:
    """Discretises each ``(σ, q, steps)`` entry's PRV on one grid covering ``[−L, L]`` and
    composes them all (``Σ steps`` variables) with one FFT.

    Raises:
        ValueError: the grid would exceed :data:`MAX_POINTS`, or float64 rounding over it
            would reach ``delta``.
    """
    if not math.isfinite(half_width):
        raise GridTooLargeError(
            "PRV accounting needs a finite domain, and the RDP bound on this run's privacy "
            "loss is infinite: a noise multiplier this close to 0 spends an unbounded epsilon"
        )
    points = 2 * (half_width / h) + 1
    if points > MAX_POINTS:
        raise GridTooLargeError(
            f"PRV accounting would need {points:,.0f} grid points (mesh {h:.3g} over "
            f"[-{half_width:.3g}, {half_width:.3g}]), more than {MAX_POINTS:,}: raise eps_error"
        )
    centre = math.ceil(half_width / h)
    n = _fft_size(2 * centre + 1)
    if np.finfo(np.float64).eps * n > delta:
        raise ValueError(
            f"delta={delta:.3g} is too small for a grid of {n:,} points: float64 rounding "
            "of the composition would reach it; raise delta or eps_error"
        )
    edges = (torch.arange(n + 1, dtype=torch.float64) - centre - 0.5) * h
    spectrum: torch.Tensor | None = None
    total_steps, total_shift = 0, 0.0
    centres = edges[:-1] + h / 2
    for sigma, q, steps in entries:
        mass, mean = _cell_masses(edges, q, sigma)
        kept = float(mass.sum())
        pmf = mass / kept
        # The shift that gives the discrete variable the truncated one's mean.
        shift = (mean - float(mass @ centres)) / kept
        part = _power(torch.fft.rfft(pmf), steps)
        spectrum = part if spectrum is None else spectrum * part
        total_steps += steps
        total_shift += steps * shift
    assert spectrum is not None
    circular = torch.fft.irfft(spectrum, n)
    # Index arithmetic of a sum of K variables on a grid centred at `centre`: the sum of their
    # indices, less (K − 1)·centre, is the sum's index (modulo n, the FFT's wrap-around).
    pmf = torch.roll(circular, -((total_steps - 1) * centre) % n)
    return Composed(pmf, h, centre, total_shift)


def _discounted_suffix_sums(p: torch.Tensor, h: float) -> torch.Tensor:
    """``y_i = Σ_{j ≥ i} p_j·e^{−(j − i)·h}`` (``= e^{t_i}·Σ_{j ≥ i} p_j·e^{−t_j}``).

    Summed in blocks no longer than :data:`_EXP_RANGE` in ``t``, each against its own first
    point, with the blocks above carried down: no exponential leaves float64's range, whatever
    the grid's half width (``e^{−t}`` alone overflows below ``t = −709``). The terms a block
    drops to underflow weigh less than ``e^{−_EXP_RANGE}`` of what it keeps.
    """
    n = p.numel()
    block = max(1, min(n, int(_EXP_RANGE / h)))
    count = -(-n // block)
    blocks = torch.zeros(count * block, dtype=p.dtype)
    blocks[:n] = p
    blocks = blocks.view(count, block)
    offset = torch.arange(block, dtype=p.dtype) * h
    # Within a block: Σ_{j ≥ i} p_j·e^{−(j − s)h}, then times e^{(i − s)h} (s: its first point).
    local = (blocks * torch.exp(-offset)).flip(1).cumsum(1).flip(1) * torch.exp(offset)
    # The sums from the blocks above, at each block's end: a short loop over the blocks.
    carried = torch.zeros(count, dtype=p.dtype)
    decay = math.exp(-block * h)
    for b in range(count - 2, -1, -1):
        carried[b] = local[b + 1, 0] + decay * carried[b + 1]
    local += carried[:, None] * torch.exp(offset - block * h)
    return local.reshape(-1)[:n]


def epsilons_for(composed: Composed, deltas: Sequence[float]) -> list[float]:
    """The ``ε`` at which the composed variable's ``δ(ε) = E[(1 − e^{ε − Y})₊]`` is each of
    ``deltas`` (0 when even ``ε = 0`` needs less; ``inf`` when even the grid's top needs more).
    """
    p, t = composed.pmf, composed.grid()
    # Sums over the cells at or above each grid point: δ(t_i) = D1_i − y_i with
    # y_i = Σ_{j≥i} p_j·e^{t_i − t_j}, and on (t_{i−1}, t_i] δ(ε) = D1_i − e^{ε − t_i}·y_i, which
    # solves in closed form.
    d1 = p.flip(0).cumsum(0).flip(0)
    y = _discounted_suffix_sums(p, composed.h)
    delta_at = d1 - y
    epsilons = []
    for delta in deltas:
        below = torch.nonzero(delta_at <= delta)
        if not below.numel():
            epsilons.append(math.inf)
            continue
        i = int(below[0])
        if i == 0:
            epsilons.append(0.0)
            continue
        top = float(t[i])
        excess, weight = float(d1[i]) - delta, float(y[i])
        # δ(t_{i−1}) > delta puts the root inside the cell (the ratio is > e^{−h}); FFT
        # rounding (a p_j of −1e-17) must not send it out, nor into log(0).
        epsilon = top + math.log(excess / weight) if excess > 0 and weight > 0 else top
        epsilons.append(max(min(epsilon, top), top - composed.h, 0.0))
    return epsilons


def epsilon_for(composed: Composed, delta: float) -> float:
    """:func:`epsilons_for` of one ``delta``."""
    return epsilons_for(composed, [delta])[0]


def delta_for(composed: Composed, epsilon: float) -> float:
    """``δ(ε)`` of the composed variable."""
    p, t = composed.pmf, composed.grid()
    return float((p * (-torch.expm1(epsilon - t)).clamp(min=0)).sum().clamp(min=0))
