"""grads/noise_scale (under construction)."""

__all__: list[str] = []
