"""Reading TensorBoard runs back in the logging tests (imported by a unique module name)."""

import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# 0 = keep every event of every kind (TensorBoard's default samples them).
STORE_EVERYTHING = {"scalars": 0, "histograms": 0, "tensors": 0, "compressedHistograms": 0}


def load_run(path):
    acc = EventAccumulator(os.fspath(path), size_guidance=STORE_EVERYTHING)
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]
