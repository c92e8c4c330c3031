"""A storage client for etcd and pykine: K8E's List/Get/Create/Update/Delete with compare-and-swap, and Watch.

It talks etcd's gRPC API through grpcio with pykine's own wire declarations,
and imports nothing of pykine's server: it needs only grpcio and protobuf.

    async with Client(["http://127.0.0.1:2379"]) as client:
        revision = await client.create("/config/a", b"1")
        value = await client.get("/config/a")
        await client.update("/config/a", value.modified, b"2")
"""

from pykine.client.connection import TLSConfig
from pykine.client.errors import (
    AlreadyExistsError,
    ClientError,
    CompactedError,
    ConfigError,
    EtcdError,
    NotFoundError,
    RevisionMismatchError,
    UnavailableError,
)
from pykine.client.storage import Client, Event, Value
from pykine.client.sync import SyncClient

__all__ = [
    "AlreadyExistsError",
    "Client",
    "ClientError",
    "CompactedError",
    "ConfigError",
    "EtcdError",
    "Event",
    "NotFoundError",
    "RevisionMismatchError",
    "SyncClient",
    "TLSConfig",
    "UnavailableError",
    "Value",
]
