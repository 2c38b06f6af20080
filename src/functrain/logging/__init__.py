"""Metric writers: TensorBoard, console progress, asynchronous and multi-writers."""

from functrain.logging import base
from functrain.logging.base import *  # noqa: F403

__all__ = [*base.__all__]
