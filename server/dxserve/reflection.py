"""Server reflection, v1 and v1alpha, so grpcurl and other tools need no .proto files.

grpcio-reflection serves only v1alpha. The two versions' messages are the same on the wire,
so the v1 service hands each request to the v1alpha servicer and re-reads its answers as v1
messages: one implementation, two service names.
"""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb
from grpc_reflection.v1alpha._async import ReflectionServicer as AsyncV1alphaServicer  # what enable_server_reflection uses for grpc.aio

from .v1 import grpc_reflection_v1_pb2 as v1_pb
from .v1 import grpc_reflection_v1_pb2_grpc as v1_grpc

V1_SERVICE_NAME = v1_pb.DESCRIPTOR.services_by_name["ServerReflection"].full_name


class ReflectionV1(v1_grpc.ServerReflectionServicer):
    def __init__(self, service_names: tuple[str, ...]):
        self.v1alpha = AsyncV1alphaServicer(service_names)

    async def ServerReflectionInfo(self, request_iterator, context):
        async def as_v1alpha():
            async for request in request_iterator:
                yield v1alpha_pb.ServerReflectionRequest.FromString(request.SerializeToString())

        async for response in self.v1alpha.ServerReflectionInfo(as_v1alpha(), context):
            yield v1_pb.ServerReflectionResponse.FromString(response.SerializeToString())


def enable(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serve reflection (both versions) listing `service_names` and the reflection services."""
    names = (*service_names, v1alpha.SERVICE_NAME, V1_SERVICE_NAME)
    v1alpha.enable_server_reflection(names, server)
    v1_grpc.add_ServerReflectionServicer_to_server(ReflectionV1(names), server)
