"""grads/privacy (under construction)."""

__all__: list[str] = []
