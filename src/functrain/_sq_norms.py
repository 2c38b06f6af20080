"""Squared L2 norms of tensors, summed, in as few and as fast kernels as the device allows.

Every global norm of the library (``ft.tree.norm``, the step's ``grad_norm``, ``update_norm``
and ``param_norm`` metrics, clipping, the noise-scale hook's norms) reduces to squared norms
of leaves. ``torch._foreach_norm`` gives them for many leaves in one call. On the CPU it reduces
each leaf on one thread, and sequentially enough that over 2²⁴ normal float32 values its
relative error was 1.3e-3 (PyTorch 2.13). With several threads a large leaf is therefore
reduced as 1024 rows (:data:`ROWS`), in parallel, and their squared norms summed: over 2²⁰
values 130 µs instead of 200 µs with two threads, over 2²⁴ 1.5 ms instead of 6 ms, and the
error fell to 2e-9. Each row is reduced whole by one thread, so the bits are the same for any
number of threads above one (the BLAS dot, as fast, is not: MKL splits it across threads from
2¹⁵ elements). One thread keeps the foreach norm, which is faster there.

"""

from __future__ import annotations

import torch

from functrain import _foreach

__all__: list[str] = []  # internal

# Leaves from this size are reduced as ROWS rows when torch runs several threads (2-core CPU,
# two threads: at 2¹⁹ elements 56 µs against 92 µs for the vector norm, at 2¹⁸ 20 against 27;
# one thread: 124 against 86 at 2¹⁹, hence the foreach norm there).
ROWS_MIN_NUMEL = 1 << 19
ROWS = 1024
_ROW_DTYPES = (torch.float32, torch.float64)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _by_rows(x: torch.Tensor, acc: torch.dtype | None) -> bool:
    """Whether ``x`` is reduced by rows (eager checks done by the caller).

    Not for tensors that autograd records (their gradient stays the foreach norm's),
    subclasses (their ``__torch_function__`` may not take views), or other devices: on a GPU one
    foreach launch for every leaf is the better form.
    """
    return (
        x.numel() >= ROWS_MIN_NUMEL
        and torch.get_num_threads() > 1
        and type(x) in _PLAIN_TYPES
        and x.device.type == "cpu"
        and x.dtype in _ROW_DTYPES
        and (acc is None or acc == x.dtype)
        and x.is_contiguous()
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def _rows_sq(x: torch.Tensor) -> torch.Tensor:
    flat = x.view(-1)
    width = flat.numel() // ROWS
    rows = flat[: ROWS * width].view(ROWS, width)
    sq = torch.linalg.vector_norm(rows, dim=1).square().sum()
    if ROWS * width < flat.numel():
        sq = sq + torch.linalg.vector_norm(flat[ROWS * width :]).square()
    return sq


def _eager() -> bool:
    """Neither traced by ``torch.compile`` nor inside a ``torch.func`` transform."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def sum_sq_norms(leaves: list[torch.Tensor], acc: torch.dtype | None = None) -> torch.Tensor:
    """``Σ ‖x‖²`` over leaves on one device, as a 0-d tensor.

    Args:
        leaves: at least one tensor, all on one device (empty ones add 0).
        acc: the dtype to reduce in (``torch._foreach_norm``'s ``dtype``), e.g. float32 for
            half-precision leaves; ``None`` reduces each leaf in its own dtype.

    Returns:
        The sum in the dtype promoted over the leaves' squared norms.
    """
    # Traced or transformed: the foreach form, which compiles well and which ``_foreach.norm``
    # runs leaf by leaf under torch.func transforms (the kernel has no batching rule).
    eager = _eager()
    by_rows = [eager and _by_rows(x, acc) for x in leaves]
    parts = []
    if not all(by_rows):
        rest = [x for x, r in zip(leaves, by_rows) if not r]
        # torch.stack promotes mixed dtypes before the squares: a float32 norm beside float64
        # ones is squared in float64.
        parts.append(torch.stack(_foreach.norm(rest, 2, dtype=acc)).square().sum())
    parts += [_rows_sq(x) for x, r in zip(leaves, by_rows) if r]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def sq_norm(x: torch.Tensor, acc: torch.dtype | None = None) -> torch.Tensor:
    """``‖x‖²`` of one tensor as a 0-d tensor (``acc`` as in :func:`sum_sq_norms`)."""
    if _eager() and _by_rows(x, acc):
        return _rows_sq(x)
    return torch.linalg.vector_norm(x, dtype=acc).square()
