"""train/step (under construction)."""

__all__: list[str] = []
