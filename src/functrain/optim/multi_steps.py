"""optim/multi_steps (under construction)."""

__all__: list[str] = []
