"""train/state (under construction)."""

__all__: list[str] = []
