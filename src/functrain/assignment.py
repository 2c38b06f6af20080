"""The linear assignment problem, as ``optax.assignment``.

Given an ``n × m`` cost matrix ``C``, find ``min(n, m)`` (row, column) pairs, no row and no
column used twice, that minimise the sum of their costs:

.. math::

    \\min_X \\sum_{ij} C_{ij} X_{ij}
    \\quad\\text{s.t.}\\quad X_{ij} \\in \\{0, 1\\},\\;
    \\sum_i X_{ij} \\le 1,\\; \\sum_j X_{ij} \\le 1,\\; \\sum_{ij} X_{ij} = \\min(n, m).

Both functions return a pair ``(i, j)`` of 1-d ``int64`` index tensors of length ``min(n, m)``
on the cost matrix's device; the optimal cost is ``cost_matrix[i, j].sum()``. They run the same
algorithms as optax and order their pairs as optax does (see each function), so a port of optax
code gets the same indices, not only the same cost.

**Host read.** The Hungarian algorithm is combinatorial: a data-dependent sequence of scalar
decisions. Both functions therefore copy the matrix to the host (a device synchronization for a
GPU tensor), solve there in float64 with NumPy (``O(n²m)`` for ``n ≤ m``; the matrix is
transposed when it has more rows than columns) and copy the two index tensors back. Do not call
them inside a compiled step; they are for matching (e.g. DETR-style set losses) between steps or
in the data pipeline. They are not differentiable (they return indices) and do not vmap: loop
over a batch of matrices.

Differences from optax:

* Indices are ``int64`` (PyTorch's index dtype; optax: ``int32`` without x64).
* Costs are compared in float64 (optax: float32 without x64), so integer costs up to 2⁵³ are
  exact; on float32 inputs with near-ties the two may pick different optimal matchings.
* ``+inf`` entries mark forbidden pairs. When no matching of finite cost exists, or the matrix
  holds NaN or ``-inf``, a ``ValueError`` is raised (as ``scipy.optimize.linear_sum_assignment``
  does); optax returns an arbitrary matching (``hungarian_algorithm``) or never terminates
  (``base_hungarian_algorithm``).
* No ``jit``/``vmap``: see the host read above.

Example:
    >>> import torch
    >>> from functrain import assignment
    >>> cost = torch.tensor([[8, 4, 7], [5, 2, 3], [9, 6, 7], [9, 4, 8]])
    >>> i, j = assignment.hungarian_algorithm(cost)
    >>> int(cost[i, j].sum())
    15
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["base_hungarian_algorithm", "hungarian_algorithm"]

_Indices = tuple[torch.Tensor, torch.Tensor]


def _to_host(cost_matrix: Any, who: str) -> tuple[np.ndarray, torch.device]:
    """The cost matrix as a float64 NumPy array (one host read) and the device to answer on."""
    if isinstance(cost_matrix, torch.Tensor):
        device = cost_matrix.device
        tensor = cost_matrix.detach()
    else:
        device = torch.device("cpu")
        try:
            tensor = torch.as_tensor(np.asarray(cost_matrix))
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{who}: cost_matrix must be a 2-d tensor or array, got "
                f"{type(cost_matrix).__name__}"
            ) from err
    if tensor.dim() != 2:
        raise ValueError(
            f"{who}: cost_matrix must be 2-d (rows × columns), got shape {tuple(tensor.shape)}"
        )
    if tensor.is_complex() or not (tensor.dtype.is_floating_point or _is_integer(tensor)):
        raise TypeError(f"{who}: cost_matrix must be real (integer or float), got {tensor.dtype}")
    if tensor.dtype == torch.uint64:  # no float64 cast on every build; values are small anyway
        tensor = tensor.to(torch.int64)
    costs = tensor.to(device="cpu", dtype=torch.float64).numpy()
    if np.isnan(costs).any() or np.isneginf(costs).any():
        raise ValueError(f"{who}: cost_matrix contains NaN or -inf (only +inf may forbid a pair)")
    return costs, device


def _is_integer(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.bool or not (tensor.dtype.is_floating_point or tensor.is_complex())


def _infeasible(who: str) -> ValueError:
    return ValueError(f"{who}: cost_matrix is infeasible (every full matching has an inf cost)")


def _answer(i: np.ndarray, j: np.ndarray, device: torch.device) -> _Indices:
    as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a, np.int64)).to(device)  # noqa: E731
    return as_tensor(i), as_tensor(j)


def hungarian_algorithm(cost_matrix: Any) -> _Indices:
    """Solves the linear assignment problem (the Scenic formulation of the Hungarian algorithm).

    The matrix is transposed if it has more rows than columns, so that rows ``r ≤`` columns
    ``c``. Each row in turn is added to the matching by a shortest augmenting path (a Dijkstra
    search over reduced costs ``C[i, j] − u[i] − v[j]`` with dual potentials ``u``, ``v``),
    ``O(r²c)`` in all. The pairs come in optax's order: for a square matrix, ``j`` is
    ``0, 1, …, n − 1`` and ``i[k]`` is the row matched to column ``k``; for a wide matrix
    (``n < m``) the rows in decreasing order; for a tall one (``n > m``) the columns in decreasing
    order.

    Reads the matrix to the host (see the module docstring).

    Args:
        cost_matrix: an ``(n, m)`` real tensor (or array-like) of costs; ``+inf`` forbids a pair.

    Returns:
        ``(i, j)``: two ``int64`` tensors of shape ``(min(n, m),)`` on ``cost_matrix``'s device,
        row and column indices of an optimal matching; its cost is ``cost_matrix[i, j].sum()``.

    Raises:
        TypeError: ``cost_matrix`` is not a real tensor or array.
        ValueError: it is not 2-d, holds NaN or ``-inf``, or has no matching of finite cost.

    Example:
        >>> import torch
        >>> from functrain import assignment
        >>> cost = torch.tensor([[90, 80, 75, 70], [35, 85, 55, 65], [125, 95, 90, 95],
        ...                      [45, 110, 95, 115], [50, 100, 90, 100]])
        >>> i, j = assignment.hungarian_algorithm(cost)
        >>> int(cost[i, j].sum()), i.tolist(), j.tolist()
        (265, [0, 1, 2, 3], [3, 2, 1, 0])
    """
    who = "hungarian_algorithm"
    costs, device = _to_host(cost_matrix, who)
    if costs.shape[0] == 0 or costs.shape[1] == 0:
        return _answer(np.zeros(0), np.zeros(0), device)
    transpose = costs.shape[0] > costs.shape[1]
    if transpose:
        costs = costs.T
    rows, cols = costs.shape
    # 1-based bookkeeping as optax's: column 0 and row 0 are virtual, u has a spare slot.
    u = np.zeros(rows + 2)
    v = np.zeros(cols + 1)
    parent = np.zeros(cols + 1, np.int64)  # parent[c]: the (1-based) row matched to column c
    inf_row = np.full(cols, np.inf)
    for row in range(rows):
        parent[0] = row + 1
        path = np.zeros(cols, np.int64)
        used = np.zeros(cols + 1, bool)
        minv = inf_row.copy()
        col = 0
        # Each pass marks one more column, and at most ``row + 1`` columns are matched or free
        # candidates before a free one is reached, so the loop is O(row) passes of O(cols).
        while parent[col] != 0:
            used[col] = True
            unused = ~used[1:]
            r = parent[col]
            cur = np.where(unused, costs[r - 1] - u[r] - v[1:], np.inf)
            better = cur < minv
            path[better] = col
            minv = np.where(better, cur, minv)
            masked = np.where(unused, minv, np.inf)
            col = int(np.argmin(masked)) + 1
            delta = masked[col - 1]
            if delta == np.inf:  # no finite edge leaves the tree: Hall's condition fails
                raise _infeasible(who)
            u[parent[used]] += delta
            v[used] -= delta
            minv = np.where(unused, minv - delta, minv)
        while col != 0:  # flip the augmenting path
            previous = path[col - 1]
            parent[col] = parent[previous]
            col = previous
    row_of_col = parent[1:] - 1  # -1: column unmatched
    if rows == cols:
        i, j = row_of_col, np.arange(rows)
    else:
        # optax's ``lax.top_k`` on the 1-based rows: matched rows in decreasing order.
        j = np.argsort(-row_of_col, kind="stable")[:rows]
        i = row_of_col[j]
    return _answer(j, i, device) if transpose else _answer(i, j, device)


def _find_augmenting_path(
    costs: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    path: np.ndarray,
    row4col: np.ndarray,
    current_row: int,
) -> tuple[int, float, np.ndarray, np.ndarray, np.ndarray]:
    """One shortest augmenting path from ``current_row`` (Crouse 2016, Algorithm 1, lines 6-24).

    Returns ``(sink, min_value, sr, sc, shortest_path_costs)``; ``path`` is updated in place.
    ``sink`` is ``-1`` when every remaining column is at an infinite distance (infeasible).
    """
    rows, cols = costs.shape
    min_value = 0.0
    remaining = np.arange(cols)[::-1].copy()  # optax's (and scipy's) scan order
    num_remaining = cols
    sr = np.zeros(rows, bool)
    sc = np.zeros(cols, bool)
    shortest = np.full(cols, np.inf)
    i = current_row
    while True:
        sr[i] = True
        js = remaining[:num_remaining]
        r = min_value + costs[i, js] - u[i] - v[js]
        better = r < shortest[js]
        path[js[better]] = i
        shortest[js] = np.minimum(shortest[js], r)
        # optax scans the remaining columns in order, keeping the last one that either lowers
        # the running minimum or ties it while being unassigned: that is the last unassigned
        # column at the minimum if there is one, else the first column at the minimum.
        dist = shortest[js]
        lowest = dist.min()
        if lowest == np.inf:
            return -1, min_value, sr, sc, shortest
        at_min = dist == lowest
        free = at_min & (row4col[js] == -1)
        index = int(np.flatnonzero(free)[-1]) if free.any() else int(np.argmax(at_min))
        min_value = float(lowest)
        j = int(js[index])
        sc[j] = True
        num_remaining -= 1
        remaining[index] = remaining[num_remaining]
        if row4col[j] == -1:
            return j, min_value, sr, sc, shortest
        i = int(row4col[j])


def base_hungarian_algorithm(cost_matrix: Any) -> _Indices:
    """Solves the linear assignment problem (Crouse's shortest augmenting path algorithm).

    The algorithm of Crouse (2016), also used by ``scipy.optimize.linear_sum_assignment``: the
    matrix is transposed if it has more rows than columns, so that rows ``r ≤`` columns ``c``; each row is matched in turn through a shortest augmenting path
    over reduced costs, the dual potentials updated after each, ``O(r²c)`` in all. The pairs
    come sorted by row, as scipy's: ``i`` is ``0, 1, …, n − 1`` unless ``n > m``, in which case
    ``i`` is the increasing list of matched rows.

    Reads the matrix to the host (see the module docstring).

    Args:
        cost_matrix: an ``(n, m)`` real tensor (or array-like) of costs; ``+inf`` forbids a pair.

    Returns:
        ``(i, j)``: two ``int64`` tensors of shape ``(min(n, m),)`` on ``cost_matrix``'s device,
        row and column indices of an optimal matching; its cost is ``cost_matrix[i, j].sum()``.

    Raises:
        TypeError: ``cost_matrix`` is not a real tensor or array.
        ValueError: it is not 2-d, holds NaN or ``-inf``, or has no matching of finite cost.

    Example:
        >>> import torch
        >>> from functrain import assignment
        >>> cost = torch.tensor([[8, 4, 7], [5, 2, 3], [9, 6, 7], [9, 4, 8]])
        >>> i, j = assignment.base_hungarian_algorithm(cost)
        >>> int(cost[i, j].sum()), i.tolist(), j.tolist()
        (15, [0, 1, 3], [0, 2, 1])
    """
    who = "base_hungarian_algorithm"
    costs, device = _to_host(cost_matrix, who)
    if costs.shape[0] == 0 or costs.shape[1] == 0:
        return _answer(np.zeros(0), np.zeros(0), device)
    transpose = costs.shape[1] < costs.shape[0]
    if transpose:
        costs = costs.T
    rows, cols = costs.shape
    u = np.zeros(rows)
    v = np.zeros(cols)
    path = np.full(cols, -1, np.int64)
    col4row = np.full(rows, -1, np.int64)
    row4col = np.full(cols, -1, np.int64)
    for current_row in range(rows):
        sink, min_value, sr, sc, shortest = _find_augmenting_path(
            costs, u, v, path, row4col, current_row
        )
        if sink < 0:
            raise _infeasible(who)
        u[current_row] += min_value
        others = sr.copy()
        others[current_row] = False
        u[others] += min_value - shortest[col4row[others]]
        v[sc] += shortest[sc] - min_value
        while True:  # flip the augmenting path
            i = int(path[sink])
            row4col[sink] = i
            col4row[i], sink = sink, int(col4row[i])
            if i == current_row:
                break
    if transpose:
        order = np.argsort(col4row, kind="stable")
        return _answer(col4row[order], order, device)
    return _answer(np.arange(rows), col4row, device)
