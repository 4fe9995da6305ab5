"""Hostile input into every WorkerService RPC of a real worker (smollm2-135m):
random bytes, valid requests with a byte changed or cut short, and
typed requests with random field values. What does not decode is
INVALID_ARGUMENT; what does is handled like any request. Never INTERNAL or
UNKNOWN, never a hang (every call has a deadline), no traceback in the log,
and a bystander session keeps working token for token."""

from __future__ import annotations

import random

import grpc
import pytest

from lmx.v1 import worker_pb2 as wpb

from ..support import hostile_payloads
from .worker_support import (
    RPC_TIMEOUT_S,
    WORKER_SERVICE,
    Opened,
    WorkerClient,
    generate_request,
)

pytestmark = pytest.mark.timeout(300, func_only=True)

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
METHODS = wpb.DESCRIPTOR.services_by_name["WorkerService"].methods
#: Each call's deadline: a generation asked for is at most 8 tokens.
CALL_TIMEOUT_S = 30.0


def typed(rng: random.Random, session: Opened) -> list[bytes]:
    """Well-formed requests with hostile values: wrong ids and tokens, huge
    and negative numbers, control characters, oversized strings."""
    texts = ["", "\x00", "a" * 70_000, "\ud7ff\ue000", "role", "user", "<|im_start|>"]
    out = []
    for _ in range(40):
        sampling = wpb.SamplingParams(
            max_tokens=rng.choice([0, 1, 8, -5, 2**31 - 1]),
            temperature=rng.choice([0.0, 1.0, -1.0, float("inf"), float("nan"), 1e30]),
            top_p=rng.choice([0.0, 0.5, 1.5, -1.0]), top_k=rng.choice([0, 5, -3, 2**31 - 1]),
            seed=rng.choice([0, 1, 2**63 - 1]),
            stop=rng.sample(texts, rng.randrange(3)))
        sampling.max_tokens = min(sampling.max_tokens, 8) if sampling.max_tokens > 0 \
            else sampling.max_tokens
        request = wpb.GenerateRequest(
            session_id=rng.choice([session.session_id, "sess-0", "", "x" * 5000]),
            token=rng.choice([session.token, "", "wrong"]), sampling=sampling)
        if rng.random() < 0.5:
            request.prompt = rng.choice(texts[:5])
        else:
            request.message.CopyFrom(wpb.ChatMessage(role=rng.choice(texts[4:]),
                                                     content=rng.choice(texts[:5])))
        out.append(request.SerializeToString())
        out.append(wpb.OpenSessionRequest(model=rng.choice(["", "nope", "smollm2-135m"]),
                                          chat_template=rng.choice(texts[:3]),
                                          system_prompt=rng.choice(texts[:3])
                                          ).SerializeToString())
        out.append(wpb.RestoreSessionRequest(entry_id=rng.choice(["", "kv-0", "x" * 3000]),
                                             token=rng.choice(["", "t"])).SerializeToString())
    return out


def test_hostile_bytes_into_every_worker_rpc(smollm2_worker):
    rng = random.Random(8)
    with WorkerClient(smollm2_worker.address) as client:
        bystander = client.open()
        before = client.generate(bystander, prompt="The three primary colors are",
                                 max_tokens=8).token_ids
        victim = client.open()
        known = [
            generate_request(victim, prompt="hi", max_tokens=4).SerializeToString(),
            wpb.OpenSessionRequest().SerializeToString(),
            wpb.CloseSessionRequest(session_id=victim.session_id,
                                    token="wrong").SerializeToString(),
            wpb.ParkSessionRequest(session_id=victim.session_id,
                                   token="wrong").SerializeToString(),
            wpb.GetStatusRequest().SerializeToString(),
        ]
        seen: dict[str, set] = {}
        tried = 0
        channel = client.channel
        for method in METHODS:
            path = f"/{WORKER_SERVICE}/{method.name}"
            payloads = hostile_payloads(rng, known, random_count=30, per_known=6,
                                        extra=(b"\x12\xff\xff\xff\xff\x0f",
                                               rng.randbytes(4096)))
            if method.name == "Generate":
                payloads += typed(rng, victim)
            for payload in payloads:
                tried += 1
                try:
                    if method.server_streaming:
                        list(channel.unary_stream(path)(payload, timeout=CALL_TIMEOUT_S))
                    else:
                        channel.unary_unary(path)(payload, timeout=CALL_TIMEOUT_S)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                assert code in ALLOWED, (f"{method.name}({payload[:80]!r}) -> {code}; log:\n"
                                         f"{smollm2_worker.log_tail(3000)}")
                seen.setdefault(method.name, set()).add(code)
        # Sessions the fuzz opened are closed by nobody: they are the worker's
        # to bound (--max-sessions); they must not break it.
        assert tried > 300
        assert all(grpc.StatusCode.INVALID_ARGUMENT in codes
                   for name, codes in seen.items() if name != "GetStatus"), seen
        log = smollm2_worker.log()
        assert '"rpc_failed"' not in log and "Traceback" not in log, log[-3000:]
        after_fuzz = client.stub.GetStatus(wpb.GetStatusRequest(), timeout=RPC_TIMEOUT_S)
        assert after_fuzz.state == "ready", after_fuzz.state
        control = client.open()
        assert client.generate(control, prompt="The three primary colors are",
                               max_tokens=8).token_ids == before, (
            "after the fuzz the worker answers differently")
        for session in (bystander, victim, control):
            try:
                client.close_session(session)
            except grpc.RpcError:
                pass
