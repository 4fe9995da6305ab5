"""bench/gpu_tests.py's report: each GPU test's outcome, and what it
measured (record_property) kept in the JSON, passed tests included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_tests  # noqa: E402

TESTS = '''
def test_measures(record_property):
    record_property("choices", "{'agreement': 0.99}")

def test_fails():
    assert 1 == 2, "one is not two"
'''


def test_outcomes_keep_each_tests_figures_and_failures(tmp_path: Path):
    (tmp_path / "test_sample.py").write_text(TESTS)
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "-o", "junit_family=xunit1", f"--junitxml={junit}", "test_sample.py"],
                   cwd=tmp_path, capture_output=True, text=True)
    tests = {t["test"].split("::")[1]: t for t in gpu_tests.outcomes(junit)}
    assert tests["test_measures"]["outcome"] == "passed"
    assert tests["test_measures"]["figures"] == {"choices": "{'agreement': 0.99}"}
    assert tests["test_fails"]["outcome"] == "failed"
    assert "one is not two" in tests["test_fails"]["message"]
    assert "figures" not in tests["test_fails"]
