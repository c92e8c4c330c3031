"""Registering servicers' methods with the transport, from the wire declarations.

The transport needs, per method, the handler, how to decode its request and
whether each side streams. All of that is in the service descriptors of
our .proto files, so nothing is listed by hand: a method the servicer does
not define is simply not registered, and the transport answers
UNIMPLEMENTED for it as grpc-go does.
"""

from __future__ import annotations

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from pykine.transport.grpc import Method, Registry


def register(registry: Registry, service: ServiceDescriptor, servicer: object) -> None:
    """Serve the servicer's methods as `service` (e.g. etcdserverpb.KV)."""
    for method in service.methods:
        implementation = getattr(servicer, method.name, None)
        if implementation is None:
            continue
        registry.add(
            service.full_name,
            method.name,
            Method(
                implementation,
                GetMessageClass(method.input_type).FromString,
                client_streaming=method.client_streaming,
                server_streaming=method.server_streaming,
            ),
        )
