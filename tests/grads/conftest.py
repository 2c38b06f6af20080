"""Fixtures for the per-sample gradient tests (the models live in ``grad_problems``)."""

from __future__ import annotations

import pytest
from grad_problems import PROBLEMS, Problem


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request: pytest.FixtureRequest) -> Problem:
    return PROBLEMS[request.param]()
