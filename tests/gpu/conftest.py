"""What the GPU tests share: bench/step_memory.py, loaded as a module (its
run_model measures every step shape against the plan)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="session")
def step_memory_bench():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("step_memory_bench", BENCH / "step_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
