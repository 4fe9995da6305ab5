"""Fuzzing every RPC of a real admission server (and its health Check):

(a) raw bytes through identity serializers: what does not decode must be
    INVALID_ARGUMENT (the error interceptor maps it), what does is a request
    like any other;
(b) well-typed messages generated from the proto descriptors by hypothesis:
    any string (unicode, control characters, huge), integers at the int32 /
    int64 / uint64 edges, unknown enum numbers, mixed with real lease ids and
    device names so that some calls get past validation.

Only OK, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION and
RESOURCE_EXHAUSTED may come back: never INTERNAL or UNKNOWN, never a hang
(every call has a deadline), and the server keeps answering.
"""

from __future__ import annotations

import random
import time
import zlib

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmx.v1 import admission_pb2 as pb

from .support import MiB, SERVICE, acquire_request, admission_servers, stub
from services.admission.client import error_details

FLAGS = ("--device", "cpu:0=1GiB", "--device", "cpu:1=256MiB",
         # fuzzed leases expire and fuzzed waits end soon, whatever was asked
         "--default-ttl-s", "1", "--max-ttl-s", "2", "--max-wait-s", "0.3")
DEADLINE_S = 3.0
WATCH_DEADLINE_S = 0.2
DOMAIN_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
METHODS = pb.DESCRIPTOR.services_by_name["AdmissionService"].methods
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
FUZZ_SETTINGS = settings(max_examples=300, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large,
                                                HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    with admission_servers(tmp_path_factory.mktemp("fuzz")) as start:
        server = start(*FLAGS)
        yield server
        assert_healthy(server)
        log = server.log()
        for marker in ('"rpc_failed"', "Traceback"):
            assert marker not in log, f"the server logged {marker} while fuzzed:\n{log[-5000:]}"


@pytest.fixture(scope="module")
def fuzz_channel(fuzz_server):
    with grpc.insecure_channel(fuzz_server.address) as channel:
        yield channel


def assert_healthy(server) -> None:
    assert server.alive(), f"admission died while fuzzed; log:\n{server.log()[-5000:]}"
    with grpc.insecure_channel(server.address) as channel:
        snap = stub(channel).Status(pb.StatusRequest(), timeout=DEADLINE_S)
        assert {dev.device for dev in snap.devices} == {"cpu:0", "cpu:1"}
        for dev in snap.devices:
            assert 0 <= dev.leased_bytes <= dev.budget_bytes, dev
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=DEADLINE_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def describe(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {(exc.details() or '')[:300]}"


def check_refusal(method: str, exc: grpc.RpcError, allowed: set[grpc.StatusCode]) -> None:
    assert exc.code() in allowed, f"{method} answered {describe(exc)}"
    assert len(exc.details() or "") < 4096, f"{method}: a {len(exc.details())}-char message"
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and method != HEALTH_CHECK:
        assert error_details(exc).field, f"{method}: INVALID_ARGUMENT names no field"


# ---- (a) raw bytes -----------------------------------------------------------

def raw_inputs(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    blobs = [b"", b"\x00", b"\xff", b"\x80" * 11, b"\x0a\xff\xff\xff\xff\x0f",  # huge length
             b"\x0b" * 200, b"\x0a\x7f", b"\x12\x03ab", b"\x08" + b"\xff" * 10 + b"\x01",
             b"\x1a\x02\xc3\x28",  # invalid UTF-8 in a string field
             b"\x0a\x02\x0a\x00\x18\x01\x20\x02",
             bytes(rng.getrandbits(8) for _ in range(256 * 1024))]
    blobs += [rng.randbytes(rng.randint(1, 64)) for _ in range(60)]
    # Valid requests with random garbage appended or cut short.
    valid = acquire_request(MiB, wait_ms=10).SerializeToString()
    blobs += [valid + rng.randbytes(rng.randint(1, 8)) for _ in range(10)]
    blobs += [valid[:rng.randint(1, len(valid) - 1)] for _ in range(10)]
    return blobs


def decodes(message_class, blob: bytes) -> bool:
    try:
        message_class.FromString(blob)
    except DecodeError:
        return False
    return True


@pytest.mark.parametrize("method", [m.name for m in METHODS] + ["Health.Check"])
def test_raw_bytes(fuzz_server, fuzz_channel, method):
    if method == "Health.Check":
        path, request_class, streaming = HEALTH_CHECK, health_pb2.HealthCheckRequest, False
    else:
        found = METHODS[[m.name for m in METHODS].index(method)]
        path = f"/{SERVICE}/{method}"
        request_class = getattr(pb, found.input_type.name)
        streaming = found.server_streaming
    allowed = DOMAIN_CODES
    if path == HEALTH_CHECK:
        # Health is grpc's own servicer, which the interceptor leaves as it
        # is: grpc answers undecodable bytes there with UNKNOWN.
        allowed = DOMAIN_CODES | {grpc.StatusCode.UNKNOWN}
    outcomes = []
    for blob in raw_inputs(seed=zlib.crc32(method.encode())):
        good = decodes(request_class, blob)
        if streaming:
            call = fuzz_channel.unary_stream(path)(blob, timeout=WATCH_DEADLINE_S)
            try:
                for _ in call:
                    pass
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
                if good:
                    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, \
                        f"Watch with {blob[:32]!r}: {describe(exc)}"
                else:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, \
                        f"Watch with undecodable {blob[:32]!r}: {describe(exc)}"
            continue
        try:
            fuzz_channel.unary_unary(path)(blob, timeout=DEADLINE_S)
            outcomes.append("OK")
            assert good, f"{method} accepted undecodable bytes {blob[:32]!r}"
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)
            check_refusal(path, exc, allowed)
            if not good and path != HEALTH_CHECK:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, \
                    f"{method} with undecodable {blob[:32]!r}: {describe(exc)}"
                assert error_details(exc).field == "request"
    assert "INVALID_ARGUMENT" in outcomes or "UNKNOWN" in outcomes, outcomes
    assert_healthy(fuzz_server)


# ---- (b) typed messages ------------------------------------------------------

F = pb_descriptor.FieldDescriptor
INT_EDGES = {
    32: [0, 1, -1, 2**31 - 1, -(2**31), 2**31 - 2],
    64: [0, 1, -1, 2**63 - 1, -(2**63), 2**62, -(2**62), 1000, 10**12],
}
UINT_EDGES = {32: [0, 1, 2**32 - 1, 2**31], 64: [0, 1, 2**64 - 1, 2**63, 2**63 - 1]}
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
HUGE_TEXT = st.builds(lambda char, n: char * n, st.characters(exclude_categories=("Cs",)),
                      st.sampled_from([300, 5_000, 100_000, 1_000_000]))


def _int(bits: int, signed: bool):
    if signed:
        edges, lo, hi = INT_EDGES[bits], -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        edges, lo, hi = UINT_EDGES[bits], 0, 2**bits - 1
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(-5, 5000)
                     .filter(lambda value: lo <= value <= hi))


def scalar_strategy(field: pb_descriptor.FieldDescriptor, hints: dict):
    kind = field.type
    if kind in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        base = _int(32, True)
    elif kind in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        base = _int(64, True)
    elif kind in (F.TYPE_UINT32, F.TYPE_FIXED32):
        base = _int(32, False)
    elif kind in (F.TYPE_UINT64, F.TYPE_FIXED64):
        base = _int(64, False)
    elif kind == F.TYPE_DOUBLE:
        base = st.floats()
    elif kind == F.TYPE_FLOAT:
        base = st.floats(width=32)
    elif kind == F.TYPE_BOOL:
        base = st.booleans()
    elif kind == F.TYPE_STRING:
        base = st.one_of(ANY_TEXT, HUGE_TEXT)
    elif kind == F.TYPE_BYTES:
        base = st.binary(max_size=64)
    elif kind == F.TYPE_ENUM:
        # proto3 enums are open: unknown numbers go over the wire as they are.
        base = st.one_of(st.sampled_from([v.number for v in field.enum_type.values]),
                         _int(32, True))
    else:
        raise NotImplementedError(field.full_name)
    hint = hints.get(field.name)
    return st.one_of(base, hint) if hint is not None else base


def message_strategy(descriptor, hints: dict, depth: int = 0):
    """dicts of field values (absent or set) for a message type."""
    fields = {}
    for field in descriptor.fields:
        if field.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value = message_strategy(field.message_type, hints, depth + 1)
        else:
            value = scalar_strategy(field, hints)
        if field.is_repeated:
            value = st.lists(value, max_size=3)
        fields[field.name] = st.one_of(st.none(), value)
    return st.fixed_dictionaries(fields)


def build(message_class, values: dict):
    message = message_class()
    for name, value in values.items():
        if value is None:
            continue
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.type == F.TYPE_MESSAGE:
            items = value if field.is_repeated else [value]
            for item in items:
                sub = build(message_factory.GetMessageClass(field.message_type), item)
                if field.is_repeated:
                    getattr(message, name).add().CopyFrom(sub)
                else:
                    getattr(message, name).CopyFrom(sub)
        elif field.is_repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


def near_valid(descriptor, valid, hints: dict):
    """A valid request (from `valid`, a strategy of field dicts) with up to
    three of its fields replaced by fuzzed values or left out: such requests
    get past most checks, so the deeper paths are fuzzed too."""
    generic = message_strategy(descriptor, hints)
    names = [field.name for field in descriptor.fields]
    if not names:
        return valid

    def mix(parts):
        fuzzed, base, noise = parts
        return {name: noise[name] if name in fuzzed else base.get(name) for name in names}

    return st.tuples(st.sets(st.sampled_from(names), max_size=3), valid, generic).map(mix)


def valid_requests(method: str, pool: list[pb.Lease]):
    """Field dicts of requests that would succeed (but for the memory left)."""
    holder = st.fixed_dictionaries({"name": st.sampled_from(["fuzz/agent", "é/ü"]),
                                    "pid": st.integers(0, 2**32 - 1)})
    leases = st.sampled_from(pool)
    if method == "Acquire":
        return st.fixed_dictionaries({
            "holder": holder, "bytes": st.integers(1, 300 * MiB),
            "purpose": st.sampled_from([pb.PURPOSE_KV, pb.PURPOSE_WEIGHTS, pb.PURPOSE_OTHER]),
            "device": st.sampled_from(["cpu:0", "cpu:1", ""]),
            "wait_ms": st.integers(0, 100), "ttl_ms": st.integers(0, 1000),
            "priority": st.integers(-1000, 1000)})
    if method == "Resize":
        return st.tuples(leases, st.integers(1, 200 * MiB), st.integers(0, 100)).map(
            lambda t: {"lease_id": t[0].lease_id, "epoch": t[0].epoch, "bytes": t[1],
                       "wait_ms": t[2]})
    if method in ("Renew", "Release"):
        return leases.map(lambda lease: {"lease_id": lease.lease_id, "epoch": lease.epoch})
    return st.just({})


def lease_pool(channel, count: int = 6) -> list[pb.Lease]:
    admission = stub(channel)
    return [admission.Acquire(acquire_request(MiB, name="fuzz/pool", ttl_ms=2000),
                              timeout=DEADLINE_S).lease for _ in range(count)]


def hints_for(pool: list[pb.Lease]) -> dict:
    """Values that get fuzzed requests past the first checks now and then."""
    return {
        "lease_id": st.sampled_from([lease.lease_id for lease in pool]),
        "epoch": st.sampled_from([lease.epoch for lease in pool] + [pool[0].epoch + 1]),
        "device": st.sampled_from(["cpu:0", "cpu:1", "", "gpu:0"]),
        "name": st.sampled_from(["fuzz/agent", "worker/a b", "é"]),
        "bytes": st.sampled_from([1, MiB, 100 * MiB, 300 * MiB, 900 * MiB]),
        "wait_ms": st.sampled_from([0, 1, 50, 500, 10**9]),
        "ttl_ms": st.sampled_from([0, 1, 100, 2000, 10**12]),
    }


@pytest.mark.parametrize("method", ["Acquire", "Resize", "Release", "Renew", "Status"])
def test_typed_messages(fuzz_server, fuzz_channel, method):
    found = METHODS[[m.name for m in METHODS].index(method)]
    request_class = getattr(pb, found.input_type.name)
    response_class = getattr(pb, found.output_type.name)
    rpc = fuzz_channel.unary_unary(f"/{SERVICE}/{method}",
                                   request_serializer=request_class.SerializeToString,
                                   response_deserializer=response_class.FromString)
    pool = lease_pool(fuzz_channel)
    codes = []

    hints = hints_for(pool)
    strategy = st.one_of(message_strategy(request_class.DESCRIPTOR, hints),
                         near_valid(request_class.DESCRIPTOR, valid_requests(method, pool), hints))

    @FUZZ_SETTINGS
    @given(values=strategy)
    def fuzz(values):
        request = build(request_class, values)
        try:
            rpc(request, timeout=DEADLINE_S)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
            check_refusal(f"{method}({str(request)[:300]})", exc, DOMAIN_CODES)

    fuzz()
    assert codes, "hypothesis made no calls"
    if method != "Status":
        assert len(set(codes)) > 1, f"{method}: every fuzzed call ended the same: {set(codes)}"
    assert_healthy(fuzz_server)


def test_typed_health_check(fuzz_server, fuzz_channel):
    check = health_pb2_grpc.HealthStub(fuzz_channel).Check

    @FUZZ_SETTINGS
    @given(service=st.one_of(ANY_TEXT, HUGE_TEXT, st.sampled_from(["", SERVICE])))
    def fuzz(service):
        try:
            answer = check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, \
                f"Check({service[:80]!r}): {describe(exc)}"
            assert service not in ("", SERVICE)
        else:
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service[:80]

    fuzz()
    assert_healthy(fuzz_server)


def test_watch_with_deadlines(fuzz_server, fuzz_channel):
    """Watch streams opened and dropped by deadline, while leases come and go."""
    admission = stub(fuzz_channel)
    for round_ in range(10):
        call = admission.Watch(pb.WatchRequest(), timeout=WATCH_DEADLINE_S)
        lease = admission.Acquire(acquire_request(1, name="fuzz/watch"), timeout=DEADLINE_S).lease
        admission.Release(pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                          timeout=DEADLINE_S)
        seqs = []
        with pytest.raises(grpc.RpcError) as ended:
            for event in call:
                seqs.append(event.seq)
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, describe(ended.value)
        assert seqs == sorted(seqs), seqs
    started = time.monotonic()
    assert_healthy(fuzz_server)
    assert time.monotonic() - started < 2, "the server is slow to answer after the Watch storm"
