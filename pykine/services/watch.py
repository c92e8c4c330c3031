"""etcdserverpb.Watch: a bidirectional stream carrying many watches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pykine.engine.store import Engine
from pykine.engine.watch import RefusedCreate
from pykine.services import auth, encode
from pykine.services.encode import Identity
from pykine.services.validate import MAX_REQUEST_BYTES
from pykine.transport.grpc import Call
from pykine.wire import rpc_pb2


class WatchService:
    def __init__(self, engine: Engine, identity: Identity) -> None:
        self.engine = engine
        self.identity = identity

    async def Watch(self, requests: AsyncIterator[Any], call: Call) -> AsyncIterator[rpc_pb2.WatchResponse]:
        stream = self.engine.watch_stream()

        async def receive() -> None:
            async for request in requests:
                if request.WhichOneof("request_union") == "create_request" and auth.needs_check(self.engine, call):
                    create = request.create_request
                    reason = await auth.watch_refusal(self.engine, call, create.key, create.range_end)
                    if reason is not None:
                        # etcd: created and canceled, watch id -1, grpc-go's error text as the reason.
                        stream.submit(RefusedCreate(-1, reason))
                        continue
                stream.submit(request)

        receiver = asyncio.create_task(receive())
        try:
            async for reply in stream.replies():
                for response in encode.watch_responses(reply, self.identity.header(reply.revision), MAX_REQUEST_BYTES):
                    yield response
        finally:
            receiver.cancel()
            stream.close()
