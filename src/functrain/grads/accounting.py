"""Privacy accounting for DP-SGD: Rényi DP of the Poisson-subsampled Gaussian mechanism.

One DP-SGD step with Poisson sampling (each example in the batch independently with
probability ``q``), clipping norm ``C`` and noise ``σ·C`` is the *sampled Gaussian mechanism*
(SGM) with sampling rate ``q`` and noise multiplier ``σ``. Its Rényi DP at order ``α`` is
(Mironov, Talwar and Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism")::

    RDP(α) = log(A_α) / (α − 1),   A_α = E_{z ~ N(0, σ²)} [((1 − q) + q·e^{(2z − 1)/(2σ²)})^α]

computed exactly for integer ``α`` (a binomial sum) and by quadrature for fractional ``α``
(bounded from above, within ``log 2``, where ``σ < 1e-4`` makes the grid too long); ``T``
steps compose to ``T·RDP(α)``. A run's ``(ε, δ)`` is the best
over the orders of the conversion of Balle et al. 2020 ("Hypothesis Testing Interpretations
and Renyi Differential Privacy", Theorem 21)::

    ε = RDP(α) + log((α − 1)/α) − (log δ + log α)/(α − 1)

These are the formulas and the default orders of Opacus' ``RDPAccountant`` (and TensorFlow
Privacy), so the same run reports the same ``ε``. Everything here is host arithmetic on Python
floats, done outside the train step.

Against Opacus 1.6 (``tests/grads/test_accounting_vs_opacus.py``): ``ε``, the best order and
:func:`get_noise_multiplier` agree to 1e-6 relative. RDP values differ only at fractional orders
whose RDP is tiny (small ``q``, large ``σ``), where Opacus' series for ``log A_α`` loses digits to
cancellation (1.3e-3 relative at ``q = 1e-4, σ = 20, α = 1.1``; mpmath agrees with the values
here), orders that are never the best one. By design: ``ε`` is clamped at 0 (Opacus can report a
negative ``ε`` for large ``δ``), an RDP of 0 (``q = 0``, no steps) gives ``ε = 0`` rather than the
conversion's floor, an all-infinite RDP gives order ``nan``, and ``len(accountant)`` counts steps.

What the guarantee assumes: batches drawn by Poisson sampling (:class:`PoissonSampler`), the
noisy sum divided by the *expected* batch size (:func:`dp_noisy_mean` does), the noise added at
every step, empty batches included, and a secure noise generator, which functrain's counter-hash
noise is not (see :mod:`functrain.grads.privacy`): use the numbers for research.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from functrain.grads import _rdp

__all__ = ["RDPAccountant", "compute_rdp", "get_noise_multiplier", "get_privacy_spent"]

#: Opacus' default orders (``DEFAULT_ALPHAS``): 1.1, 1.2, …, 10.9, then 12, 13, …, 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
)


def _check_rate_and_noise(sample_rate: Any, noise_multiplier: Any) -> tuple[float, float]:
    for name, value in (("sample_rate", sample_rate), ("noise_multiplier", noise_multiplier)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
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
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not a > 1:
            raise ValueError(f"every RDP order must be a number > 1, got {a!r}")
        if not math.isfinite(a):  # RDP(inf) is the max-divergence: not what these formulas give
            raise ValueError(f"every RDP order must be finite, got {a!r}")
    return tuple(float(a) for a in values)


def _check_delta(name: str, delta: Any) -> None:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {delta!r}")


def _check_steps(steps: Any) -> int:
    # numbers.Integral: NumPy integers too (a step count from NumPy arithmetic is common).
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    return int(steps)


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
    return [steps * r for r in _rdp.rdp_per_step(q, sigma, alphas)]


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
        rdp = list(rdp)
        # float() alone would take "1.5" and True: a mixed-up argument, not an RDP value.
        bad = [v for v in rdp if isinstance(v, (bool, str, bytes))]
        if bad:
            raise TypeError(f"got {bad[0]!r}")
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
    accountant: str = "rdp",
    eps_error: float = 0.01,
) -> float:
    """The smallest noise multiplier (to a tolerance) whose run spends at most the target ε.

    A search on ``σ`` of :func:`compute_rdp` and :func:`get_privacy_spent`, as Opacus'
    ``get_noise_multiplier`` (false position on ``log σ`` rather than its bisection, and each
    ``ε`` skips the fractional orders that provably are not the best one, so it is the same
    ``ε`` at a fraction of the cost). The returned ``σ`` spends ``ε`` in
    ``[target − epsilon_tolerance, target]``. With ``accountant="prv"`` the ``ε`` is
    :class:`~functrain.PRVAccountant`'s upper bound (tighter, so less noise for the same
    target), except where ``σ`` is so small that its grid would not fit in memory: there the
    RDP ``ε``, also an upper bound and far above any target, stands in.

    Args:
        target_epsilon: the ``ε`` budget (> 0).
        target_delta: the ``δ`` in ``(0, 1)``.
        sample_rate: ``q`` (Poisson sampling rate) in ``(0, 1]``.
        steps: the number of steps of the run (>= 1).
        orders: the RDP orders (default: Opacus' ``DEFAULT_ALPHAS``).
        epsilon_tolerance: how far below the target the result may land (> 0).
        accountant: ``"rdp"`` (:class:`RDPAccountant`, Opacus' default here) or ``"prv"``
            (:class:`~functrain.PRVAccountant`, the default of Opacus' ``PrivacyEngine``).
        eps_error: the PRV accountant's accuracy (``accountant="prv"`` only).

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
        or not isinstance(target_epsilon, numbers.Real)
        or not 0 < target_epsilon < math.inf
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if (
        isinstance(epsilon_tolerance, bool)
        or not isinstance(epsilon_tolerance, numbers.Real)
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
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")

    def rdp_epsilon(sigma: float) -> float:
        return _min_epsilon(q, sigma, steps, alphas, target_delta)

    def prv_epsilon(sigma: float) -> float:
        from functrain.grads import _prv, prv  # prv imports this module

        spent = prv.PRVAccountant()
        spent.history = [(sigma, q, steps)]
        try:
            return spent.get_epsilon(target_delta, eps_error=eps_error)
        except _prv.GridTooLargeError:
            return rdp_epsilon(sigma)

    epsilon = prv_epsilon if accountant == "prv" else rdp_epsilon

    if epsilon(1e6) > target_epsilon:
        raise ValueError(
            f"target_epsilon={target_epsilon} is below what any noise multiplier reaches with "
            f"delta={target_delta} at these orders; raise the target or add larger orders"
        )
    return _search(epsilon, target_epsilon, epsilon_tolerance)


def _search(epsilon: Callable[[float], float], target: float, tol: float) -> float:
    """A ``σ`` with ``epsilon(σ)`` in ``[target − tol, target]`` (``epsilon`` decreasing).

    A bracket ``epsilon(low) > target ≥ epsilon(high)`` from ``σ = 10`` by doubling or halving,
    then the Illinois variant of false position on ``log σ`` towards the middle of the band
    (``ε`` is smooth and nearly linear there, so it lands in a few steps where bisection takes
    a dozen). Illinois halves the weight of an end that stays put, and each step lands at least
    1/64 of the bracket inside it, so the bracket always shrinks; an infinite ``ε`` (tiny ``σ``)
    gives a bisection step instead.
    """
    aim = target - min(tol, target) / 2
    high, eps_high = 10.0, epsilon(10.0)
    low, eps_low = high, eps_high
    while eps_high > target:
        low, eps_low = high, eps_high
        high *= 2
        eps_high = epsilon(high)
    if eps_high >= target - tol:
        return high
    if low == high:  # σ = 10 spends too little: halve towards a low that spends too much
        while eps_low <= target:
            high, eps_high = low, eps_low
            if eps_high >= target - tol:
                return high
            low /= 2
            eps_low = epsilon(low)
            if low == 0.0:  # ε did not exceed the target at any σ > 0
                return high
    x_low, x_high = math.log(low), math.log(high)
    y_low, y_high = eps_low - aim, eps_high - aim  # > 0 and < 0
    side = 0
    while high - low >= 1e-12 * high:
        width = x_high - x_low
        x = x_low + width / 2
        if math.isfinite(y_low) and math.isfinite(y_high):
            x = x_low + width * y_low / (y_low - y_high)
            x = min(max(x, x_low + width / 64), x_high - width / 64)  # strictly inside
        sigma = math.exp(x)
        eps = epsilon(sigma)
        if eps > target:
            x_low, y_low, low = x, eps - aim, sigma
            y_high = y_high / 2 if side == -1 else y_high  # Illinois: unstick the far end
            side = -1
        else:
            if eps >= target - tol:
                return sigma
            x_high, y_high, high = x, eps - aim, sigma
            y_low = y_low / 2 if side == 1 else y_low
            side = 1
    return high


def _min_epsilon(
    q: float, sigma: float, steps: int, alphas: tuple[float, ...], delta: float
) -> float:
    """``get_privacy_spent(alphas, compute_rdp(q, σ, steps, alphas), δ)[0]``, skipping orders.

    Integer orders are exact and cheap; a fractional one costs a quadrature. ``f(α) = log A_α``
    is convex in ``α`` with ``f(1) = 0``, so the chords between its integer neighbours,
    extended, bound it from below; an order whose ``ε`` from that bound is already above the
    best ``ε`` found cannot be the best and is not integrated. The result is the same minimum
    (to rounding: a margin of ``1e-9`` relative keeps near-ties in).
    """
    fractional = [a for a in alphas if not a.is_integer()]
    if not fractional:
        return get_privacy_spent(alphas, compute_rdp(q, sigma, steps, alphas), delta)[0]
    ints = sorted(
        {a for a in alphas if a.is_integer()}
        | {float(k) for a in fractional for k in range(max(2, math.floor(a) - 1), math.ceil(a) + 2)}
    )
    rdp = dict(zip(ints, _rdp.rdp_per_step(q, sigma, ints)))
    log_a = {1.0: 0.0, **{k: r * (k - 1) for k, r in rdp.items()}}
    if not all(math.isfinite(v) and v > 0 for v in rdp.values()):  # σ at the extremes
        return get_privacy_spent(alphas, compute_rdp(q, sigma, steps, alphas), delta)[0]

    def conversion(a: float) -> float:
        return math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)

    def bound(a: float) -> float:  # a lower bound on ε at the fractional order a
        k = float(math.floor(a))
        low = log_a[k + 1] - (k + 1 - a) * (log_a[k + 2] - log_a[k + 1])
        if k >= 2:
            low = max(low, log_a[k] + (a - k) * (log_a[k] - log_a[k - 1]))
        return steps * max(low, 0.0) / (a - 1) + conversion(a)

    best = min((steps * rdp[a] + conversion(a) for a in alphas if a.is_integer()), default=math.inf)
    bounds = {a: bound(a) for a in fractional}
    if best == math.inf:  # no integer orders: the likeliest fractional one sets the bar
        first = min(fractional, key=bounds.__getitem__)
        best = steps * _rdp.rdp_per_step(q, sigma, [first])[0] + conversion(first)
    margin = 1e-9 * (abs(best) + 1)  # the bounds' rounding must not drop a near-tie
    chosen = [a for a in alphas if a.is_integer() or not bounds[a] > best + margin]
    return get_privacy_spent(chosen, compute_rdp(q, sigma, steps, chosen), delta)[0]


class _StepHistory:
    """The ``(σ, q, steps)`` history shared by the accountants: recording, length, state."""

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
            raise ValueError(f"a {type(self).__name__} state_dict has a 'history' list")
        history = []
        for entry in entries:
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(
                    f"history entries are (noise_multiplier, sample_rate, steps): {entry!r}"
                )
            q, sigma = _check_rate_and_noise(entry[1], entry[0])
            history.append((sigma, q, _check_steps(entry[2])))
        self.history = history


class RDPAccountant(_StepHistory):
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
