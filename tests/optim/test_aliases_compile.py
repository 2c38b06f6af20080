"""Every alias compiles with ``fullgraph=True``, matches eager, and a learning-rate tensor
changed in place does not trigger a recompilation."""

from __future__ import annotations

import pytest
import torch
from _transform_cases import ALIASES, check_compiled_matches_eager
from torch._dynamo.testing import CompileCounter


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_alias_compiles_once_and_matches_eager(name: str) -> None:
    counter = CompileCounter()
    check_compiled_matches_eager(ALIASES[name], counter, rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1, f"{name} compiled {counter.frame_count} times"


# Inductor's import path uses a deprecated torch.jit helper; pytest turns warnings into errors.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_backend_adamw() -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    check_compiled_matches_eager(ALIASES["adamw"], "inductor", rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
