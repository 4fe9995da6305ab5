"""Hostile input against a real worker, with a bystander whose stream must
not suffer (issue 19: a 79-character chat template froze a whole worker for
a minute, its health checks and every other session with it).

The attacks: the nested-loop template, a prompt of a million characters, and
a conversation of 20,000 turns. Each is refused with INVALID_ARGUMENT naming
its field; meanwhile the bystander's token rate stays within 2x of its rate
alone, and health checks answer."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmx.v1 import worker_pb2 as wpb

from ..support import rss_bytes
from .worker_support import RPC_TIMEOUT_S, WorkerClient, generate_request, rpc_error

pytestmark = pytest.mark.timeout(300, func_only=True)

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
BYSTANDER_TOKENS = 48


def token_rate(client: WorkerClient, session) -> float:
    """Tokens a second after the first (decode only), streamed one by one."""
    stamps = []
    stream = client.stub.Generate(generate_request(session, prompt=COUNTING,
                                                   max_tokens=BYSTANDER_TOKENS), timeout=120)
    for response in stream:
        if response.WhichOneof("kind") == "delta":
            stamps.extend([time.monotonic()] * len(response.delta.token_ids))
    assert len(stamps) >= BYSTANDER_TOKENS // 2, f"only {len(stamps)} tokens"
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def attacks(client: WorkerClient) -> list[tuple[str, str]]:
    """Each attack once: (what, the field its INVALID_ARGUMENT named)."""
    seen = []
    hostile = client.open(chat_template=LOOP)
    started = time.monotonic()
    error, details = rpc_error(client.stub.Generate, generate_request(
        hostile, message=("user", "hi")), timeout=60)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert time.monotonic() - started < 30
    seen.append(("template", details.field))
    plain = client.open()
    error, details = rpc_error(client.stub.Generate, generate_request(
        plain, prompt="word " * 199_999), timeout=60)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    seen.append(("1 MB prompt", details.field))
    request = wpb.GenerateRequest(session_id=plain.session_id, token=plain.token,
                                  sampling=wpb.SamplingParams(max_tokens=4))
    for index in range(20_000):
        request.conversation.messages.add(role="user" if index % 2 == 0 else "assistant",
                                          content="hi")
    error, details = rpc_error(client.stub.Generate, request, timeout=60)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    seen.append(("20,000 turns", details.field))
    for session in (hostile, plain):
        client.close_session(session)
    return seen


def test_hostile_input_is_refused_and_a_bystander_keeps_its_rate(smollm2_worker):
    with WorkerClient(smollm2_worker.address) as client:
        bystander = client.open()
        token_rate(client, bystander)            # warm: the first run pays for kernels
        client.close_session(bystander)
        bystander = client.open()
        alone = token_rate(client, bystander)
        client.close_session(bystander)

        results: list = []
        failures: list = []
        stop = threading.Event()

        rss: list[int] = []

        def attacker() -> None:
            try:
                while not stop.is_set():
                    results.append(attacks(client))
                    rss.append(rss_bytes(smollm2_worker.proc.pid))
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        health_times = []

        def prober() -> None:
            with grpc.insecure_channel(smollm2_worker.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while not stop.is_set():
                    started = time.monotonic()
                    health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
                    health_times.append(time.monotonic() - started)
                    time.sleep(0.1)

        threads = [threading.Thread(target=attacker), threading.Thread(target=prober)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)   # the attacks under way
            rates = []
            for _ in range(3):
                bystander = client.open()
                rates.append(token_rate(client, bystander))
                client.close_session(bystander)
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)
        assert not failures, failures
        assert results, "no attack round finished"
        assert results[0] == [("template", "chat_template"), ("1 MB prompt", "prompt"),
                              ("20,000 turns", "conversation")]
        under_attack = min(rates)
        assert under_attack >= alone / 2, (
            f"the bystander's rate fell from {alone:.1f} to {under_attack:.1f} tokens/s")
        assert max(health_times) < 1.0, f"a health check took {max(health_times):.2f} s"
        # Refused requests leave nothing behind: round after round, the
        # worker's memory stays where the first round left it.
        assert len(rss) >= 2, f"only {len(rss)} attack round(s) while the bystander ran"
        assert rss[-1] - rss[0] < 64 << 20, f"the worker grew by {rss[-1] - rss[0]} bytes"
