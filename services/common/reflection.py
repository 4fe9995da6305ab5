"""Server reflection under both names clients ask for, with the protos'
comments.

grpcio-reflection serves only `grpc.reflection.v1alpha.ServerReflection`
(grpc/grpc issue 38576: no v1 in Python yet), while newer grpcurl, Postman
and other tools ask for `grpc.reflection.v1.ServerReflection` first. The two
protos are the same messages under another package, so their bytes on the
wire are the same: one servicer answers both, and v1's descriptor, the
v1alpha file renamed, is added to the pool so that v1 itself can be
described like every other service.

The generated stubs carry no comments, so the stock servicer's descriptors
have none and `grpcurl describe` would show bare fields. `make proto` also
writes lmx/v1/lmx.binpb, the protos compiled with their source info; lmx's
own files are served from it, comments included. Asking for a method
(`describe lmx.v1.AdmissionService.Renew`) finds its service's file.
"""
from __future__ import annotations

from pathlib import Path

import grpc
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async, reflection_pb2

import lmx.v1

log = structlog.get_logger(__name__)

V1ALPHA = "grpc.reflection.v1alpha"
V1 = "grpc.reflection.v1"
SERVICE_NAMES = (f"{V1}.ServerReflection", f"{V1ALPHA}.ServerReflection")
#: lmx's protos compiled with their comments (`make proto`).
DOCUMENTED = Path(lmx.v1.__file__).parent / "lmx.binpb"


def documented_files(path: Path = DOCUMENTED) -> dict[str, bytes]:
    """File name -> its FileDescriptorProto with source info ({} when the
    set was not built: the stock descriptors are served, without comments)."""
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file
    except (OSError, ValueError) as exc:
        log.info("reflection_without_comments", path=str(path), reason=str(exc))
        return {}
    documented = {}
    for proto in files:
        # As the stubs' own descriptors (which carry no json_name): clients
        # such as grpcurl then print the proto's field names, as before.
        for message in _messages(proto.message_type):
            for field in message.field:
                field.ClearField("json_name")
        documented[proto.name] = proto.SerializeToString()
    return documented


def _messages(messages):
    for message in messages:
        yield message
        yield from _messages(message.nested_type)


class Servicer(_async.ReflectionServicer):
    """The stock servicer, answering with documented files where it has them."""

    def __init__(self, service_names, documented: dict[str, bytes]):
        super().__init__(service_names)
        self._documented = documented

    def _answer(self, descriptor, request):
        seen: dict[str, object] = {}
        pending = [descriptor]
        while pending:
            file = pending.pop()
            if file.name not in seen:
                seen[file.name] = file
                pending.extend(file.dependencies)
        serialized = []
        for name, file in seen.items():
            raw = self._documented.get(name)
            if raw is None:
                proto = descriptor_pb2.FileDescriptorProto()
                file.CopyToProto(proto)
                raw = proto.SerializeToString()
            serialized.append(raw)
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=serialized),
            original_request=request)

    def _file_by_filename(self, request, filename):
        try:
            return self._answer(self._pool.FindFileByName(filename), request)
        except KeyError:
            return super()._file_by_filename(request, filename)

    def _file_containing_symbol(self, request, fully_qualified_name):
        name = fully_qualified_name
        for _ in range(2):   # the symbol, else (a method) its service
            try:
                return self._answer(self._pool.FindFileContainingSymbol(name), request)
            except KeyError:
                name = name.rpartition(".")[0]
                if not name:
                    break
        return super()._file_containing_symbol(request, fully_qualified_name)


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """v1's file in the pool: the v1alpha file with its package renamed."""
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = V1
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(f".{V1ALPHA}.", f".{V1}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{V1ALPHA}.", f".{V1}.")
            method.output_type = method.output_type.replace(f".{V1ALPHA}.", f".{V1}.")
    proto.ClearField("options")
    pool.Add(proto)


def enable(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Reflection for `service_names` (and itself, both versions) on an
    asyncio server."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    servicer = Servicer([*service_names, *SERVICE_NAMES], documented_files())
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
        for name in SERVICE_NAMES])
