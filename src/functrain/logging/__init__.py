"""Metric writers: TensorBoard, console progress, asynchronous and multi-writers.

A typical set-up logs every step without slowing it down::

    writer = rank_zero_only(
        lambda: AsyncWriter(MultiWriter([TensorBoardWriter(logdir), ConsoleWriter(total_steps)]))
    )
    with writer:
        for batch in batches:
            state, metrics = step(state, batch)
            writer.write_scalars(state.step, metrics)  # tensors: no host sync here
"""

from functrain.logging import async_writer, base, console, multi, rank_zero, readback, tensorboard
from functrain.logging.async_writer import *  # noqa: F403
from functrain.logging.base import *  # noqa: F403
from functrain.logging.console import *  # noqa: F403
from functrain.logging.multi import *  # noqa: F403
from functrain.logging.rank_zero import *  # noqa: F403
from functrain.logging.readback import *  # noqa: F403
from functrain.logging.tensorboard import *  # noqa: F403

__all__ = [
    *async_writer.__all__,
    *base.__all__,
    *console.__all__,
    *multi.__all__,
    *rank_zero.__all__,
    *readback.__all__,
    *tensorboard.__all__,
]
