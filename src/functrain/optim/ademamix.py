"""AdEMAMix: Adam with a mixture of a fast and a slow momentum (optax.contrib's ``scale_by_ademamix``, ``ademamix``)."""

from __future__ import annotations

__all__: list[str] = []
