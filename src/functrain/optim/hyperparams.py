"""optim/hyperparams (under construction)."""

__all__: list[str] = []
