"""NovoGrad: layer-wise normalised second moments (optax's ``scale_by_novograd``, ``novograd``)."""

from __future__ import annotations

__all__: list[str] = []
