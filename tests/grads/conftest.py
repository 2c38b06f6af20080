"""Fixtures for the per-sample gradient tests (the models live in ``grad_problems``)."""

from __future__ import annotations

from typing import Any

import pytest
from grad_problems import PROBLEMS, Problem

from functrain.grads import _per_example


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request: pytest.FixtureRequest) -> Problem:
    return PROBLEMS[request.param]()


@pytest.fixture
def loop_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the examples differentiated by the loop."""
    calls: list[int] = []
    inner = _per_example._example_grad

    def spy(*args: Any) -> Any:
        calls.append(1)
        return inner(*args)

    monkeypatch.setattr(_per_example, "_example_grad", spy)
    return calls
