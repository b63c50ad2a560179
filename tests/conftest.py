"""Shared test set-up: one torch thread (the tests use tiny tensors, where a second thread only
adds synchronisation, and CI has 2 cores), and the ``bench`` fixture of the benchmark smoke tests."""

import importlib
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """``importlib.import_module`` with ``benchmarks/`` on the path (the scripts import each other by
    module name): ``bench("markov_bench").main([...])``."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module
