"""Transforms applied on a condition of the step count (optax's ``conditionally_mask``, ``conditionally_transform``)."""

from __future__ import annotations

__all__: list[str] = []
