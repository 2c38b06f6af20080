import os

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(int(os.environ.get("FUNCTRAIN_TEST_THREADS", "1")))

settings.register_profile(
    "functrain",
    deadline=None,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("functrain")
