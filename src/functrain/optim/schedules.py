"""optim/schedules (under construction)."""

__all__: list[str] = []
