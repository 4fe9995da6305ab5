"""The README's grpcurl commands for WorkerService, run against a real worker
serving smollm2-135m: a real model answers through grpcurl."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"
GRPCURL = Path(sys.executable).parent / "grpcurl"
README_ADDRESS = "localhost:50061"


def readme_worker_commands() -> list[str]:
    text = README.read_text()
    lines = [line.strip() for line in text.splitlines()
             if line.startswith("grpcurl ") and "lmx.v1.WorkerService/" in line]
    assert len(lines) >= 4, f"README.md shows too few WorkerService grpcurl commands: {lines}"
    return lines


def run(line: str, address: str, session: dict | None = None) -> str:
    if session is not None:
        line = line.replace('"sess-…"', json.dumps(session["session_id"]))
        line = line.replace('"token": "…"', f'"token": {json.dumps(session["token"])}')
    assert "…" not in line, f"a placeholder this test cannot fill: {line}"
    argv = shlex.split(line.replace(README_ADDRESS, address))
    done = subprocess.run([str(GRPCURL), *argv[1:]], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def stream(output: str) -> list[dict]:
    decoder, items, index = json.JSONDecoder(), [], 0
    while index < len(output):
        if output[index].isspace():
            index += 1
            continue
        item, index = decoder.raw_decode(output, index)
        items.append(item)
    return items


def test_readme_worker_commands_answer_with_a_real_model(smollm2_worker):
    address = smollm2_worker.address
    commands = readme_worker_commands()
    by_method = {}
    for line in commands:
        by_method.setdefault(re.search(r"WorkerService/(\w+)", line).group(1), []).append(line)
    # ParkSession and RestoreSession need a kvstore: test_park_restore.py runs those lines.
    assert set(by_method) == {"OpenSession", "Generate", "CloseSession", "GetStatus",
                              "ParkSession", "RestoreSession"}, by_method

    session = json.loads(run(by_method["OpenSession"][0], address))
    assert session["model"] == "smollm2-135m" and session["chat"], session
    for line in by_method["Generate"]:
        replies = stream(run(line, address, session))
        text = "".join(r["delta"].get("text", "") for r in replies if "delta" in r)
        finish = [r["finish"] for r in replies if "finish" in r]
        assert len(finish) == 1 and finish[0]["reason"] in (
            "FINISH_REASON_STOP", "FINISH_REASON_LENGTH"), replies[-3:]
        assert text.strip(), f"no text from: {line}"
    status = json.loads(run(by_method["GetStatus"][0], address))
    assert status["state"] == "ready" and int(status["tokens_generated"]) > 0, status
    closed = json.loads(run(by_method["CloseSession"][0], address, session))
    assert int(closed["freed_tokens"]) > 0, closed
