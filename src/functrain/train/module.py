"""train/module (under construction)."""

__all__: list[str] = []
