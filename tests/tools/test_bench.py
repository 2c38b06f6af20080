"""The benchmark sections' quick mode: their correctness checks pass, and fail when they should.

Speed is never asserted here (it lives in ``tools/bench.py``); these tests only run the quick
sections' checks, which compare functrain's fast paths with its pure path and with PyTorch.
"""

import importlib
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture
def sections(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    return lambda name: importlib.import_module(f"benchmarks.{name}")


def failed(section):
    return [f"{name}: {detail}" for name, ok, detail in section.checks if not ok]


@pytest.mark.parametrize("name", ["optimizer", "step", "muon"])
def test_quick_section_checks_pass(sections, name):
    threads = torch.get_num_threads()
    section = sections(name).run(quick=True)
    assert section.rows, "no timings"
    assert section.checks, "no checks"
    assert not failed(section)
    assert torch.get_num_threads() == threads  # quick mode restores the thread count


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["optimizer", "step"])
def test_quick_section_checks_pass_on_cuda(sections, name):
    section = sections(name).run(quick=True, device="cuda")
    assert "CUDA" in section.title
    assert section.rows and section.checks
    assert not failed(section)


def test_optimizer_check_fails_when_the_fast_path_disagrees(sections, monkeypatch):
    from functrain.optim import _fused_engines

    kernel = _fused_engines.ENGINES["kernel"]

    def off_by_a_little(ops, ctx, *args):
        norm = kernel(ops, ctx, *args)
        if norm is not False:
            torch._foreach_add_(ctx.p, 1e-4)
        return norm

    monkeypatch.setitem(_fused_engines.ENGINES, "kernel", off_by_a_little)
    section = sections("optimizer").run(quick=True)
    bad = failed(section)
    assert bad
    assert all("in-step" in line for line in bad)


def test_muon_check_fails_when_functrain_disagrees(sections, monkeypatch):
    import functrain as ft

    muon = ft.muon

    def decaying_more(*args, **kwargs):
        return muon(*args, **{**kwargs, "weight_decay": 1.0})

    monkeypatch.setattr(ft, "muon", decaying_more)
    assert failed(sections("muon").run(quick=True))
