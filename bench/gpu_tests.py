"""The GPU tests as a result: `pytest -m gpu tests/gpu`, every test's outcome
and duration written as JSON with the card, torch, date and commit.

    python3 bench/gpu_tests.py                 # what `bench/gpu_suite.sh tests` runs
    python3 bench/gpu_tests.py -k sleep        # extra arguments go to pytest

Writes bench/results/gpu-tests-<card>-<date>.json (the card's short name,
e.g. h100) and exits with pytest's status.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from benchkit import card_slug, git_commit  # noqa: E402


def card() -> tuple[str, str]:
    """The card's name and torch's version, from another process (this one
    makes no CUDA context)."""
    code = ("import json, torch; print(json.dumps([torch.cuda.get_device_name(0) "
            "if torch.cuda.is_available() else 'no GPU', torch.__version__]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        name, version = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return "unknown", "unknown"
    return name, version


def outcomes(junit: Path) -> list[dict]:
    tests = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.get("name") is None:    # the entry an interrupted run leaves: not a test
            continue
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (found.get("message") or "")[:500]
                break
        tests.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                          seconds=round(float(case.get("time") or 0), 2), message=message))
    return tests


def main() -> int:
    name, torch_version = card()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        started = time.time()
        # Each failure's reason is printed as it happens (-rf at the end,
        # --tb=line: one line each), without the captured log lines (torch's
        # debug logs buried the message once).
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu",
                                 "-p", "no:cacheprovider", "--tb=line", "-rf",
                                 "--show-capture=no", f"--junitxml={junit}", *sys.argv[1:]],
                                cwd=ROOT)
        cut = False
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            # The stage's time limit (timeout --signal=INT): pytest stops at
            # the test in progress and still writes what ran, then so does this.
            cut = True
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        tests = outcomes(junit) if junit.exists() else []
    counts: dict[str, int] = {}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    date = time.strftime("%Y-%m-%d", time.gmtime(started))
    report = dict(benchmark="gpu_tests", card=name, torch=torch_version, date=date, commit=git_commit(),
                  pytest_exit=rc, cut_at_time_limit=cut,
                  seconds=round(time.time() - started, 1), counts=counts,
                  tests=tests)
    out = ROOT / "bench" / "results" / f"gpu-tests-{card_slug(name)}-{date}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{counts}; wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
