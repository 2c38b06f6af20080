"""Yogi: Adam with an additive, sign-controlled second-moment update (optax's ``scale_by_yogi``, ``yogi``)."""

from __future__ import annotations

__all__: list[str] = []
