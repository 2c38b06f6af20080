"""SM3: memory-efficient adaptive step sizes from row and column accumulators (optax's ``scale_by_sm3``, ``sm3``)."""

from __future__ import annotations

__all__: list[str] = []
