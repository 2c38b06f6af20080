"""Lookahead: fast and slow weights (optax's ``lookahead``, ``LookaheadParams``, ``LookaheadState``)."""

from __future__ import annotations

__all__: list[str] = []
