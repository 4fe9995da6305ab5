"""Server reflection under both names clients ask for.

grpcio-reflection serves only `grpc.reflection.v1alpha.ServerReflection`
(grpc/grpc issue 38576: no v1 in Python yet), while newer grpcurl, Postman
and other tools ask for `grpc.reflection.v1.ServerReflection` first. The two
protos are the same messages under another package, so their bytes on the
wire are the same: one servicer answers both, and v1's descriptor, the
v1alpha file renamed, is added to the pool so that v1 itself can be
described like every other service.
"""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async, reflection_pb2

V1ALPHA = "grpc.reflection.v1alpha"
V1 = "grpc.reflection.v1"
SERVICE_NAMES = (f"{V1}.ServerReflection", f"{V1ALPHA}.ServerReflection")


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
    servicer = _async.ReflectionServicer([*service_names, *SERVICE_NAMES])
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
        for name in SERVICE_NAMES])
