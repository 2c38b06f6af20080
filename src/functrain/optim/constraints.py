"""Constraints on parameters and gradients: ``keep_params_nonnegative``, ``centralize`` and ``apply_every`` (optax's names)."""

from __future__ import annotations

__all__: list[str] = []
