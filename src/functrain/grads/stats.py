"""grads/stats (under construction)."""

__all__: list[str] = []
