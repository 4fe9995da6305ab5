"""The GPU tests as a result: `pytest -m gpu tests/gpu`, every test's outcome
and duration written as JSON with the card, torch, date and commit.

    python3 bench/gpu_tests.py                 # what `bench/gpu_suite.sh tests` runs
    python3 bench/gpu_tests.py -k sleep        # extra arguments go to pytest

Writes bench/results/gpu-tests-<card>-<date>.json (the card's short name,
e.g. h100) and exits with pytest's status.

A test that faults the GPU (an illegal memory access) loses the process's
CUDA context, and every test after it in that process fails on the same
error. Those are run again in a fresh process (up to three times, while
each round gets further): the JSON keeps the faulting test's failure as it
was, and for each test run again its first outcome (`lost_context`) beside
the outcome of its own run.
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
        test = dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                    seconds=round(float(case.get("time") or 0), 2), message=message)
        # What a test measured (its record_property calls), e.g. the reference
        # check's agreement: kept for passed tests too.
        figures = {prop.get("name"): prop.get("value") for prop in case.iter("property")}
        if figures:
            test["figures"] = figures
        tests.append(test)
    return tests


#: A message of a test that ran after the CUDA context was lost.
LOST_CONTEXT = "CUDA error: an illegal memory access"


def node_id(test: str) -> str:
    """'tests.gpu.test_x::test_y[a]' (junit's) -> 'tests/gpu/test_x.py::test_y[a]'."""
    module, name = test.split("::", 1)
    return module.replace(".", "/") + ".py::" + name


def run_pytest(args: list[str]) -> tuple[int, bool, list[dict]]:
    """(pytest's status, whether the stage's limit cut it, the outcomes)."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        # Each failure's reason is printed as it happens (-rf at the end,
        # --tb=line: one line each), without the captured log lines (torch's
        # debug logs buried the message once).
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-m", "gpu",
                                 "-p", "no:cacheprovider", "--tb=line", "-rf",
                                 "--show-capture=no", f"--junitxml={junit}",
                                 # record_property's figures land in the XML (xunit2 drops them)
                                 "-o", "junit_family=xunit1", *args],
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
        return rc, cut, outcomes(junit) if junit.exists() else []


def mark_fault(tests: list[dict]) -> None:
    """The first test of a run that failed on a lost CUDA context lost it:
    marked `faulted` (it is not run again)."""
    for test in tests:
        if test["outcome"] in ("failed", "error") and LOST_CONTEXT in (test["message"] or ""):
            test["faulted"] = True
            return


def lost_context(tests: list[dict]) -> list[dict]:
    """The failures of tests that ran after the CUDA context was lost."""
    return [t for t in tests if t["outcome"] in ("failed", "error") and not t.get("faulted")
            and LOST_CONTEXT in (t["message"] or "")]


def main() -> int:
    name, torch_version = card()
    started = time.time()
    extra = sys.argv[1:]
    rc, cut, tests = run_pytest(["tests/gpu", *extra])
    mark_fault(tests)
    reruns = 0
    try:
        while not cut and reruns < 3:
            again = lost_context(tests)
            if not again:
                break
            reruns += 1
            print(f"== {len(again)} tests ran after the CUDA context was lost: again, in a new "
                  f"process (round {reruns})", flush=True)
            rc_again, cut, rerun = run_pytest([*(node_id(t["test"]) for t in again), *extra])
            mark_fault(rerun)
            by_name = {t["test"]: t for t in rerun}
            for test in again:
                new = by_name.get(test["test"])
                if new is not None:
                    first = test.get("lost_context") or {"outcome": test["outcome"],
                                                         "message": test["message"]}
                    test.update(new, lost_context=first)
            rc = rc or rc_again
            if len(lost_context(tests)) >= len(again):
                break
    except KeyboardInterrupt:     # the stage's limit between two runs: write what ran
        cut = True
    counts: dict[str, int] = {}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    if any(t["outcome"] in ("failed", "error") for t in tests):
        rc = rc or 1
    elif reruns:
        rc = 0       # every test that ran after the lost context passed on its own
    date = time.strftime("%Y-%m-%d", time.gmtime(started))
    report = dict(benchmark="gpu_tests", card=name, torch=torch_version, date=date, commit=git_commit(),
                  pytest_exit=rc, cut_at_time_limit=cut, reruns_after_lost_context=reruns,
                  seconds=round(time.time() - started, 1), counts=counts,
                  tests=tests)
    out = ROOT / "bench" / "results" / f"gpu-tests-{card_slug(name)}-{date}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{counts}; wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
