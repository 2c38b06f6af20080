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
# Four-point Gauss–Legendre on each mesh cell: exact for the cell integrals' polynomial part
# up to degree 7, far beyond what the mean-preserving shift needs.
_NODES, _WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(4))
_CHUNK = 1 << 20  # cells per block of the quadrature (bounds its temporaries)


class GridTooLargeError(ValueError):
    """The accuracy asked needs more than :data:`MAX_POINTS` grid points."""


def tails(t: torch.Tensor, q: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F(t), S(t)) = (P(Y ≤ t), P(Y > t))`` for one step's privacy loss ``Y`` (float64).

    Both are computed directly (not as ``1 − other``), so each keeps its relative precision in
    its own tail: ``δ`` lives in the upper one.
    """
    log_keep = math.log1p(-q) if q < 1 else -math.inf
    inside = t > log_keep
    # log((eᵗ − (1 − q))/q) = t + log1p(−(1 − q)·e^{−t}) − log q: no overflow, exact at q = 1.
    safe_t = torch.where(inside, t, log_keep + 1.0) if q < 1 else t
    u = safe_t + torch.log1p(-torch.exp(log_keep - safe_t)) - math.log(q)
    z = sigma * sigma * u + 0.5
    a, b = z / sigma, (z - 1) / sigma
    cdf = (1 - q) * torch.special.ndtr(a) + q * torch.special.ndtr(b)
    sf = (1 - q) * torch.special.ndtr(-a) + q * torch.special.ndtr(-b)
    return torch.where(inside, cdf, 0.0), torch.where(inside, sf, 1.0)


def _cell_masses(edges: torch.Tensor, q: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cell's probability and ``E[(Y − centre)·1{Y in cell}]`` (unnormalised).

    The second is ``(h/2)·(G(l) + G(r)) − ∫ₗʳ G`` for ``G = F`` (the trapezoid rule's error on
    the CDF, by parts), or its negative with ``G = S``; each cell uses the tail in which it lies.
    """
    cdf, sf = tails(edges, q, sigma)
    upper = cdf[:-1] >= 0.5
    mass = torch.where(upper, sf[:-1] - sf[1:], cdf[1:] - cdf[:-1])
    half = (edges[1] - edges[0]).item() / 2
    deviation = torch.empty_like(mass)
    for start in range(0, mass.numel(), _CHUNK):
        stop = min(start + _CHUNK, mass.numel())
        mid = (edges[start:stop] + edges[start + 1 : stop + 1]) / 2
        nodes_cdf, nodes_sf = tails(mid[:, None] + half * _NODES, q, sigma)
        up = upper[start:stop]
        g_nodes = torch.where(up[:, None], nodes_sf, nodes_cdf)
        g_left = torch.where(up, sf[start:stop], cdf[start:stop])
        g_right = torch.where(up, sf[start + 1 : stop + 1], cdf[start + 1 : stop + 1])
        trapezoid_error = half * (g_left + g_right) - half * (g_nodes @ _WEIGHTS)
        deviation[start:stop] = torch.where(up, -trapezoid_error, trapezoid_error)
    return mass, deviation


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
    centre = math.ceil(half_width / h)
    if 2 * centre + 1 > MAX_POINTS:
        raise GridTooLargeError(
            f"PRV accounting would need {2 * centre + 1:,} grid points (mesh {h:.3g} over "
            f"[-{half_width:.3g}, {half_width:.3g}]), more than {MAX_POINTS:,}: raise eps_error"
        )
    n = _fft_size(2 * centre + 1)
    if np.finfo(np.float64).eps * n > delta:
        raise ValueError(
            f"delta={delta:.3g} is too small for a grid of {n:,} points: float64 rounding "
            "of the composition would reach it; raise delta or eps_error"
        )
    edges = (torch.arange(n + 1, dtype=torch.float64) - centre - 0.5) * h
    spectrum: torch.Tensor | None = None
    total_steps, total_shift = 0, 0.0
    for sigma, q, steps in entries:
        mass, deviation = _cell_masses(edges, q, sigma)
        kept = mass.sum()
        pmf = mass / kept
        shift = (deviation.sum() / kept).item()
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


def epsilon_for(composed: Composed, delta: float) -> float:
    """The ``ε`` at which the composed variable's ``δ(ε) = E[(1 − e^{ε − Y})₊]`` is ``delta``
    (0 when even ``ε = 0`` needs less)."""
    p, t = composed.pmf, composed.grid()
    # Sums over the cells at or above each grid point: δ(t_i) = D1_i − e^{t_i}·D2_i, and on
    # (t_{i−1}, t_i] δ(ε) = D1_i − e^ε·D2_i, which solves in closed form.
    d1 = p.flip(0).cumsum(0).flip(0)
    d2 = (p * torch.exp(-t)).flip(0).cumsum(0).flip(0)
    delta_at = d1 - torch.exp(t) * d2
    below = torch.nonzero(delta_at <= delta)
    i = int(below[0]) if below.numel() else p.numel() - 1
    if i == 0:
        return 0.0
    return max(math.log((float(d1[i]) - delta) / float(d2[i])), 0.0)


def delta_for(composed: Composed, epsilon: float) -> float:
    """``δ(ε)`` of the composed variable."""
    p, t = composed.pmf, composed.grid()
    return float((p * (-torch.expm1(epsilon - t)).clamp(min=0)).sum().clamp(min=0))
