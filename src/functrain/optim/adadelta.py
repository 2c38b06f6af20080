"""Adadelta: step sizes from running averages of squared gradients and squared updates (optax's ``scale_by_adadelta``, ``adadelta``)."""

from __future__ import annotations

__all__: list[str] = []
