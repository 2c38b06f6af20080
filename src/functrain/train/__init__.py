"""Pure train steps: TrainState, make_train_step, micro-batching, eval steps."""

from functrain.train import faults, gradient, loop, loss, microbatch, module, rng, state, step
from functrain.train.faults import *  # noqa: F403
from functrain.train.gradient import *  # noqa: F403
from functrain.train.loop import *  # noqa: F403
from functrain.train.loss import *  # noqa: F403
from functrain.train.microbatch import *  # noqa: F403
from functrain.train.module import *  # noqa: F403
from functrain.train.rng import *  # noqa: F403
from functrain.train.state import *  # noqa: F403
from functrain.train.step import *  # noqa: F403

__all__ = [
    *faults.__all__,
    *gradient.__all__,
    *loop.__all__,
    *loss.__all__,
    *microbatch.__all__,
    *module.__all__,
    *rng.__all__,
    *state.__all__,
    *step.__all__,
]
