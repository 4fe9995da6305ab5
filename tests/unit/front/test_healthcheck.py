"""`python -m services.front.healthcheck` against a tiny local HTTP server:
exit 0 on 200, 1 on another status, a timeout or nothing listening, with a
one-line message either way (the front's compose healthcheck, issue 19)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.common.launch import free_port
from services.front.healthcheck import check, health_url

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
SLOW_S = 3.0


class Handler(BaseHTTPRequestHandler):
    """/health 200, /sick 503, /slow answers after SLOW_S, anything else 404."""

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(SLOW_S)
        status = {"/health": 200, "/slow": 200, "/sick": 503}.get(self.path, 404)
        body = b'{"status": "ok"}' if status == 200 else b'{"error": "no"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:   # quiet
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass    # /slow writes to a client that gave up: a broken pipe, expected


@pytest.fixture
def http_server() -> Iterator[str]:
    server = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.front.healthcheck", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)


def test_health_url_from_an_address_or_a_url():
    assert health_url("127.0.0.1:8000") == "http://127.0.0.1:8000/health"
    assert health_url("127.0.0.1:8000", "v1/models") == "http://127.0.0.1:8000/v1/models"
    assert health_url("http://h:1/x") == "http://h:1/x"


def test_200_exits_0(http_server):
    result = run_healthcheck(http_server)
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"front at http://{http_server}/health: HTTP 200"


def test_another_status_exits_1(http_server):
    result = run_healthcheck(http_server, "--path", "/sick")
    assert result.returncode == 1, result
    assert result.stderr.strip() == (f"front at http://{http_server}/sick: "
                                     "HTTP 503 Service Unavailable")
    healthy, message = check(health_url(http_server, "/nowhere"))
    assert not healthy and "HTTP 404" in message


def test_a_slow_answer_times_out(http_server):
    started = time.monotonic()
    healthy, message = check(health_url(http_server, "/slow"), timeout_s=0.5)
    assert not healthy and "timed out" in message, message
    assert time.monotonic() - started < SLOW_S
    assert len(message.splitlines()) == 1


def test_nothing_listening_exits_1():
    address = f"127.0.0.1:{free_port()}"
    result = run_healthcheck(address, "--timeout-s", "2")
    assert result.returncode == 1, result
    assert "refused" in result.stderr.lower(), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_proxy_in_the_environment_is_not_used(http_server):
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}
    result = subprocess.run([sys.executable, "-m", "services.front.healthcheck", http_server],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result
