"""Optimistic gradient descent and the Fromage optimizer (optax's ``scale_by_optimistic_gradient``, ``optimistic_gradient_descent``, ``optimistic_adam``, ``fromage``)."""

from __future__ import annotations

__all__: list[str] = []
