"""Pure train steps: TrainState, make_train_step, micro-batching, eval steps."""

from functrain.train import module, state, step
from functrain.train.module import *  # noqa: F403
from functrain.train.state import *  # noqa: F403
from functrain.train.step import *  # noqa: F403

__all__ = [*module.__all__, *state.__all__, *step.__all__]
