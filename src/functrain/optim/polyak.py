"""Polyak step sizes from the loss value (optax's ``scale_by_polyak``, ``polyak_sgd``)."""

from __future__ import annotations

__all__: list[str] = []
