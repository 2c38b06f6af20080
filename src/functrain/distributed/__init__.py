"""Data-parallel training on ``torch.distributed``, with an optional sharded optimizer state.

Launch with ``torchrun --nproc_per_node=N script.py``; in the script::

    from functrain import distributed as dist
    dist.init(timeout=60)                       # gloo on CPU, NCCL on GPU
    step = dist.make_data_parallel_train_step(loss_fn, tx, shard_optimizer=True)
    state = step.init_state(params)              # rank 0's parameters everywhere
    for batch in batches:
        state, metrics = step(state, dist.shard_batch(batch))

See the data-parallel guide for checkpoints, logging on rank 0, randomness and faults.
"""

from functrain.distributed import collectives, data, errors, process, shardable, step, zero
from functrain.distributed.collectives import *  # noqa: F403
from functrain.distributed.data import *  # noqa: F403
from functrain.distributed.errors import *  # noqa: F403
from functrain.distributed.process import *  # noqa: F403
from functrain.distributed.shardable import *  # noqa: F403
from functrain.distributed.step import *  # noqa: F403
from functrain.distributed.zero import *  # noqa: F403

__all__ = [
    *collectives.__all__,
    *data.__all__,
    *errors.__all__,
    *process.__all__,
    *shardable.__all__,
    *step.__all__,
    *zero.__all__,
]
