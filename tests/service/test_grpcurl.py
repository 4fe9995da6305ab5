"""The grpcurl commands of README.md ("From any language: grpcurl"), run as
they are written against a real server (only its address replaced).

The commands with placeholders ("lease-…", "…") are run with the lease id and
epoch that the README's Acquire printed, as a user following it would. The
Watch command streams until the server shuts down, so it runs last.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from lmx.v1 import admission_pb2 as pb

from .support import REPO_ROOT, RPC_TIMEOUT_S, acquire_request, stub

README = REPO_ROOT / "README.md"
SECTION = "### From any language: grpcurl"
README_ADDRESS = "localhost:50051"
GRPCURL = Path(sys.executable).parent / "grpcurl"
COMMAND_TIMEOUT_S = 20


def readme_commands() -> tuple[list[str], list[str]]:
    """The section's grpcurl lines from ```sh blocks: (runnable as written,
    with placeholders)."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1]
    section = re.split(r"^#{1,3} ", section, maxsplit=1, flags=re.MULTILINE)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()
             if line.startswith("grpcurl ")]
    assert lines, "the grpcurl section of README.md has no grpcurl commands"
    return [line for line in lines if "…" not in line], [line for line in lines if "…" in line]


def run_grpcurl(line: str, address: str) -> subprocess.CompletedProcess:
    argv = shlex.split(line.replace(README_ADDRESS, address))
    assert argv[0] == "grpcurl"
    try:
        return subprocess.run([str(GRPCURL), *argv[1:]], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{line!r} did not finish within {COMMAND_TIMEOUT_S}s") from None


def run_ok(line: str, address: str) -> str:
    done = run_grpcurl(line, address)
    assert done.returncode == 0, (f"README command failed with exit code {done.returncode}: "
                                  f"{line}\nstdout: {done.stdout}\nstderr: {done.stderr}")
    return done.stdout


def method_of(line: str) -> str:
    return shlex.split(line)[-1]


def test_grpcurl_is_installed():
    assert GRPCURL.exists(), f"no grpcurl next to {sys.executable} (make setup installs it)"


def test_readme_grpcurl_commands(start_admission):
    runnable, with_placeholders = readme_commands()
    watch_lines = [line for line in runnable if method_of(line).endswith("/Watch")]
    runnable = [line for line in runnable if line not in watch_lines]
    server = start_admission()
    address = server.address

    lease: dict | None = None
    seen = set()
    for line in runnable:
        out = run_ok(line, address)
        method = method_of(line)
        if line.endswith(" list"):
            services = out.split()
            for name in ("lmx.v1.AdmissionService", "grpc.health.v1.Health"):
                assert name in services, f"`{line}` does not list {name}: {out}"
            seen.add("list")
        elif " describe " in line:
            assert "lmx.v1.AdmissionService is a service" in out, out
            for rpc in ("Acquire", "Resize", "Release", "Renew", "Status", "Watch"):
                assert f"rpc {rpc} " in out, f"`{line}` shows no rpc {rpc}: {out}"
            seen.add("describe")
        elif method == "grpc.health.v1.Health/Check":
            assert json.loads(out) == {"status": "SERVING"}, out
            seen.add("health")
        elif method == "lmx.v1.AdmissionService/Acquire":
            lease = json.loads(out)["lease"]
            assert lease["lease_id"].startswith("lease-"), out
            assert int(lease["epoch"]) > 0, out
            sent = json.loads(shlex.split(line)[shlex.split(line).index("-d") + 1])
            assert lease["bytes"] == sent["bytes"], out
            assert lease["holder"]["name"] == sent["holder"]["name"], out
            seen.add("acquire")
        elif method == "lmx.v1.AdmissionService/Status":
            answer = json.loads(out)
            assert [dev["device"] for dev in answer["devices"]] == ["cpu:0"], out
            assert answer["devices"][0]["budget_bytes"] == str(int(8 * 2**30 * 0.9)), out
            if lease is not None:
                assert [held["lease_id"] for held in answer["leases"]] == [lease["lease_id"]], out
            seen.add("status")
        else:
            pytest.fail(f"a README grpcurl command this test does not check: {line}")
    wanted = {"list", "describe", "health", "acquire", "status"}
    assert seen == wanted, f"the README no longer shows these commands: {sorted(wanted - seen)}"

    # The commands with placeholders, filled in from the Acquire above.
    assert lease is not None
    done = set()
    for template in with_placeholders:
        line = template.replace('"lease-…"', json.dumps(lease["lease_id"]))
        line = line.replace('"epoch": "…"', f'"epoch": "{lease["epoch"]}"')
        assert "…" not in line, f"a README placeholder this test cannot fill: {template}"
        out = json.loads(run_ok(line, address))
        method = method_of(line).rsplit("/", 1)[-1]
        sent = json.loads(shlex.split(line)[shlex.split(line).index("-d") + 1])
        if method == "Renew":
            assert out["lease"]["lease_id"] == lease["lease_id"], out
            assert out["lease"]["epoch"] == lease["epoch"], out
        elif method == "Resize":
            assert out["lease"]["bytes"] == sent["bytes"], out
            lease["bytes"] = sent["bytes"]
        elif method == "Release":
            assert out == {"released_bytes": lease["bytes"]}, out
        else:
            pytest.fail(f"a README placeholder command this test does not check: {template}")
        done.add(method)
    assert done == {"Renew", "Resize", "Release"}, f"README placeholder commands: {sorted(done)}"

    assert len(watch_lines) == 1, f"want one README Watch command, found {watch_lines}"
    run_watch_until_shutdown(watch_lines[0], server)


def run_watch_until_shutdown(line: str, server) -> None:
    """The README's Watch prints events as they happen and ends (exit code 0)
    when the server shuts down."""
    argv = shlex.split(line.replace(README_ADDRESS, server.address))
    watch = subprocess.Popen([str(GRPCURL), *argv[1:]], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(watch.stdout), daemon=True)
    reader.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            admission = stub(channel)
            deadline = time.monotonic() + 15
            while True:  # until grpcurl shows an event of ours
                lease = admission.Acquire(acquire_request(1, name="readme/watch"),
                                          timeout=RPC_TIMEOUT_S).lease
                admission.Release(pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                                  timeout=RPC_TIMEOUT_S)
                time.sleep(0.1)
                if lease.lease_id in "".join(output):
                    break
                assert watch.poll() is None, f"`{line}` ended early: {watch.stderr.read()}"
                assert time.monotonic() < deadline, f"`{line}` printed no event in 15 s: {output}"
        server.stop()
        code = watch.wait(COMMAND_TIMEOUT_S)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(5)
    reader.join(5)
    text = "".join(output)
    assert code == 0, f"`{line}` exited {code} on shutdown: {watch.stderr.read()}"
    assert '"granted"' in text and '"released"' in text, text


def test_grpcurl_shows_invalid_argument_with_the_field(admission):
    line = ('grpcurl -plaintext -d \'{"holder": {"name": "agent/code", "pid": 4242}, '
            '"bytes": "0", "purpose": "PURPOSE_KV"}\' localhost:50051 '
            'lmx.v1.AdmissionService/Acquire')
    done = run_grpcurl(line, admission.address)
    assert done.returncode == 64 + grpc.StatusCode.INVALID_ARGUMENT.value[0], done
    assert "Code: InvalidArgument" in done.stderr, done.stderr
    assert "google.rpc.BadRequest" in done.stderr and '"field":"bytes"' in done.stderr, \
        done.stderr
    # And the server is still there.
    assert json.loads(run_ok("grpcurl -plaintext localhost:50051 "
                             "lmx.v1.AdmissionService/Status", admission.address))["devices"]


def test_grpcurl_shows_resource_exhausted_with_retry_info(admission):
    too_much = ('grpcurl -plaintext -d \'{"holder": {"name": "a", "pid": 1}, '
                '"bytes": "6442450944", "purpose": "PURPOSE_KV"}\' localhost:50051 '
                'lmx.v1.AdmissionService/Acquire')
    run_ok(too_much, admission.address)
    done = run_grpcurl(too_much, admission.address)
    assert done.returncode == 64 + grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], done
    assert "Code: ResourceExhausted" in done.stderr, done
    assert "google.rpc.RetryInfo" in done.stderr, done.stderr
    assert "INSUFFICIENT_DEVICE_MEMORY" in done.stderr, done.stderr
