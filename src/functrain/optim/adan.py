"""Adan: adaptive Nesterov momentum with gradient differences (optax's ``scale_by_adan``, ``adan``)."""

from __future__ import annotations

__all__: list[str] = []
