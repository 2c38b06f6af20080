"""AdaBelief: Adam with the second moment of the gradient's deviation from its momentum (optax's ``scale_by_belief``, ``adabelief``)."""

from __future__ import annotations

__all__: list[str] = []
