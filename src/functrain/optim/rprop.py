"""Rprop: per-element step sizes grown or shrunk by the sign agreement of successive gradients (optax's ``scale_by_rprop``, ``rprop``)."""

from __future__ import annotations

__all__: list[str] = []
