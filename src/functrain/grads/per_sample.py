"""grads/per_sample (under construction)."""

__all__: list[str] = []
