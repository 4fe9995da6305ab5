"""TLS and a bearer token, with real processes: admission serving TLS and
needing a token, and a worker (smollm2-135m) that reaches it through
LMX_TLS_CA and LMX_AUTH_TOKEN_FILE, serving TLS and the token itself.
Plaintext or tokenless callers are refused; health checking stays open."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from lmx.v1 import admission_pb2 as apb  # noqa: E402
from lmx.v1 import admission_pb2_grpc  # noqa: E402
from lmx.v1 import worker_pb2 as wpb  # noqa: E402
from lmx.v1 import worker_pb2_grpc  # noqa: E402
from services.common import transport  # noqa: E402
from services.common.launch import start_service  # noqa: E402

pytestmark = pytest.mark.timeout(300, func_only=True)


@pytest.fixture
def pki(tmp_path, monkeypatch):
    """A self-signed certificate for 127.0.0.1 and localhost, a token file,
    and the client environment pointing at both."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    token = tmp_path / "token"
    token.write_text("t0ken-for-this-test\n")
    token.chmod(0o600)
    monkeypatch.setenv(transport.ENV_TLS_CA, str(cert))
    monkeypatch.setenv(transport.ENV_TOKEN_FILE, str(token))
    return {"cert": str(cert), "key": str(key), "token": str(token)}


def server_flags(pki) -> list[str]:
    return ["--tls-cert", pki["cert"], "--tls-key", pki["key"], "--auth-token-file", pki["token"],
            "--log-format", "json"]


def test_tls_and_a_token_end_to_end(pki, tmp_path):
    admission = start_service("services.admission", "lmx.v1.AdmissionService",
                              ["--device", "cpu:0=4GiB", *server_flags(pki)],
                              log_path=tmp_path / "admission.log", timeout_s=60)
    worker = None
    try:
        # Plaintext is refused (the server speaks TLS).
        with grpc.insecure_channel(admission.address) as plain:
            with pytest.raises(grpc.RpcError) as caught:
                admission_pb2_grpc.AdmissionServiceStub(plain).Status(apb.StatusRequest(),
                                                                      timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # TLS without the token: refused; health checking stays open.
        ca = Path(pki["cert"]).read_bytes()
        with grpc.secure_channel(admission.address,
                                 grpc.ssl_channel_credentials(root_certificates=ca)) as tls:
            with pytest.raises(grpc.RpcError) as caught:
                admission_pb2_grpc.AdmissionServiceStub(tls).Status(apb.StatusRequest(),
                                                                    timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "LMX_AUTH_TOKEN_FILE" in caught.value.details()
            health = health_pb2_grpc.HealthStub(tls).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        # The environment's client: TLS and the token.
        with transport.channel(admission.address) as chan:
            status = admission_pb2_grpc.AdmissionServiceStub(chan).Status(apb.StatusRequest(),
                                                                          timeout=5)
            assert status.devices[0].device == "cpu:0"

        # A worker reaching that admission with the same environment, and
        # serving TLS and the token itself.
        worker = start_service("services.worker", "lmx.v1.WorkerService",
                               ["--model", "smollm2-135m", "--admission", admission.address,
                                "--kvstore", "none", "--max-context", "256",
                                *server_flags(pki)],
                               log_path=tmp_path / "worker.log", timeout_s=240)
        with transport.channel(worker.address) as chan:
            stub = worker_pb2_grpc.WorkerServiceStub(chan)
            session = stub.OpenSession(wpb.OpenSessionRequest(), timeout=10)
            replies = list(stub.Generate(wpb.GenerateRequest(
                session_id=session.session_id, token=session.token, prompt="Hello",
                sampling=wpb.SamplingParams(max_tokens=4)), timeout=60))
            assert replies[-1].HasField("finish")
        with transport.channel(admission.address) as chan:
            workers = admission_pb2_grpc.AdmissionServiceStub(chan).ListWorkers(
                apb.ListWorkersRequest(), timeout=5).workers
            assert [w.address for w in workers] == [worker.address]
    finally:
        if worker is not None:
            assert worker.stop() == 0, (tmp_path / "worker.log").read_text()[-3000:]
        assert admission.stop() == 0


def test_unix_sockets_are_owner_only_and_reachable(tmp_path):
    """--listen unix:/PATH: the socket is created owner-only (0600), clients
    dial unix:/PATH, and a worker finds admission there."""
    import os
    import signal
    import stat

    from services.common.launch import wait_serving
    from services.common.parent import child_env

    sock = tmp_path / "admission.sock"
    address = f"unix:{sock}"
    log = open(tmp_path / "admission.log", "wb")
    admission = subprocess.Popen(
        [sys.executable, "-m", "services.admission", "--listen", address,
         "--device", "cpu:0=4GiB", "--log-format", "json"],
        stdout=log, stderr=subprocess.STDOUT, env=child_env(dict(os.environ)))
    worker = None
    try:
        wait_serving(address, "lmx.v1.AdmissionService", 60, admission)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600, oct(sock.stat().st_mode)
        with transport.channel(address) as chan:
            assert admission_pb2_grpc.AdmissionServiceStub(chan).Status(
                apb.StatusRequest(), timeout=5).devices
        worker = start_service("services.worker", "lmx.v1.WorkerService",
                               ["--model", "smollm2-135m", "--admission", address,
                                "--kvstore", "none", "--max-context", "256",
                                "--log-format", "json"],
                               log_path=tmp_path / "worker.log", timeout_s=240)
        with transport.channel(address) as chan:
            workers = admission_pb2_grpc.AdmissionServiceStub(chan).ListWorkers(
                apb.ListWorkersRequest(), timeout=5).workers
        assert [w.address for w in workers] == [worker.address]
    finally:
        if worker is not None:
            assert worker.stop() == 0
        admission.send_signal(signal.SIGTERM)
        assert admission.wait(20) == 0
        log.close()
