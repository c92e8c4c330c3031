"""gRPC method handlers built from our service declarations.

grpcio's generated registration lets a decode failure escape as UNKNOWN with a
Python class name in it. etcd (grpc-go) answers undecodable bytes with
INTERNAL "grpc: error unmarshalling request: ...", so the deserializer here
hands the servicer a MalformedRequest and the error mapping answers like etcd.
Methods a servicer does not define are not registered: gRPC answers UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from pykine.wire import rpc_pb2

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class MalformedRequest:
    """Stands in for a request whose bytes did not decode."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _deserializer(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return MalformedRequest(str(error))

    return parse


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def service_handler(service_name: str, servicer: object) -> grpc.GenericRpcHandler:
    """A handler for etcdserverpb.<service_name> serving the servicer's methods."""
    service = rpc_pb2.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        implementation = getattr(servicer, method.name, None)
        if implementation is None:
            continue
        factory = _FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            implementation,
            request_deserializer=_deserializer(getattr(rpc_pb2, method.input_type.name)),
            response_serializer=_serialize,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
