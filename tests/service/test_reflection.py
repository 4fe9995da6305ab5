"""Server reflection answers under v1 and v1alpha (issue 19: only v1alpha
was served, and newer grpcurl and other tools ask for v1 first), through a
real server and the real grpcurl."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from .support import RPC_TIMEOUT_S

GRPCURL = Path(sys.executable).parent / "grpcurl"


def ask(address: str, version: str, **request) -> rpb.ServerReflectionResponse:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=rpb.ServerReflectionRequest.SerializeToString,
            response_deserializer=rpb.ServerReflectionResponse.FromString)
        return next(iter(call(iter([rpb.ServerReflectionRequest(**request)]),
                              timeout=RPC_TIMEOUT_S)))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_both_versions_list_every_service_and_describe_them(shared_admission, version):
    reply = ask(shared_admission.address, version, list_services="")
    names = {service.name for service in reply.list_services_response.service}
    assert {"lmx.v1.AdmissionService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    for symbol in ("lmx.v1.AdmissionService", "grpc.reflection.v1.ServerReflection"):
        reply = ask(shared_admission.address, version, file_containing_symbol=symbol)
        assert not reply.HasField("error_response"), reply.error_response
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in reply.file_descriptor_response.file_descriptor_proto]
        services = {f"{f.package}.{s.name}" for f in files for s in f.service}
        assert symbol in services


def test_an_unknown_symbol_is_an_error_not_a_crash(shared_admission):
    reply = ask(shared_admission.address, "v1", file_containing_symbol="no.such.Service")
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


@pytest.mark.skipif(not GRPCURL.exists(), reason="grpcurl is installed by make setup")
def test_grpcurl_describes_the_v1_reflection_service(shared_admission):
    done = subprocess.run([str(GRPCURL), "-plaintext", shared_admission.address, "describe",
                           "grpc.reflection.v1.ServerReflection"], capture_output=True,
                          text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert "rpc ServerReflectionInfo" in done.stdout
    assert ".grpc.reflection.v1.ServerReflectionRequest" in done.stdout


@pytest.mark.skipif(not GRPCURL.exists(), reason="grpcurl is installed by make setup")
def test_grpcurl_describe_shows_the_protos_comments_and_finds_methods(shared_admission):
    def describe(symbol: str) -> str:
        done = subprocess.run([str(GRPCURL), "-plaintext", shared_admission.address,
                               "describe", symbol], capture_output=True, text=True,
                              timeout=20, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        return done.stdout

    proto = (Path(__file__).resolve().parents[2] / "protos/lmx/v1/admission.proto").read_text()
    body = proto.split("message AcquireRequest {", 1)[1].split("\n}", 1)[0]
    comments = [line.strip() for line in body.splitlines() if line.strip().startswith("//")]
    assert comments, "AcquireRequest's fields are documented in admission.proto"
    request = describe("lmx.v1.AcquireRequest")
    for comment in comments:   # as written in the .proto
        assert comment in request, comment
    renew = describe("lmx.v1.AdmissionService.Renew")
    assert "rpc Renew" in renew and "Errors:" in renew
