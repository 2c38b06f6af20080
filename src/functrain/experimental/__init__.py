"""Experimental namespaces, as ``optax.experimental``: :mod:`~functrain.experimental.aggregating`.

Example:
    >>> import torch
    >>> from functrain.experimental import aggregating
    >>> agg = aggregating.average_per_element_updates()
    >>> agg.update({"w": torch.tensor([[1.0], [3.0]])}, agg.init(None))[0]
    {'w': tensor([2.])}
"""

from . import aggregating

__all__ = ["aggregating"]
