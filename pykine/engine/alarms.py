"""etcd's alarms and space quota, kept in the datastore so every instance agrees.

An alarm is (member id, type), as in etcd's alarm store. Raised alarms
restrict writes for the whole datastore, whichever member raised them:

- NOSPACE refuses what costs space (a put, a txn with a put in its outer
  branches, a lease grant), as etcd's capped applier does; deletes,
  compaction, defragmentation and disarming stay possible.
- CORRUPT refuses every write, compaction and lease change.

The quota is etcd's `--quota-backend-bytes`: when the datastore's size plus a
request's cost would pass it, this member raises NOSPACE and refuses the
request, as etcd's quota check does. The size is read once a second (a
statement on database servers), so a burst of writes may pass the quota by
up to a second's worth. Alarms raised through another instance reach this one
within that second too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pykine.backends.base import Backend
from pykine.engine.errors import CorruptError, NoSpaceError, UnavailableError
from pykine.engine.polling import poll_forever
from pykine.wire import rpc_pb2

log = logging.getLogger(__name__)

NONE, NOSPACE, CORRUPT = rpc_pb2.NONE, rpc_pb2.NOSPACE, rpc_pb2.CORRUPT
# etcd's default quota (2 GiB) for --quota-backend-bytes 0.
DEFAULT_QUOTA_BYTES = 2 << 30
REFRESH_INTERVAL = 1.0
# etcd's cost model: what a request adds to the database, before it is applied.
KV_OVERHEAD = 256
LEASE_OVERHEAD = 64


def put_cost(request: Any) -> int:
    return KV_OVERHEAD + len(request.key) + len(request.value)


def txn_cost(request: Any) -> int:
    """The larger of the two branches' puts; etcd counts nested txns as free."""
    return max(
        sum(put_cost(op.request_put) for op in branch if op.WhichOneof("request") == "request_put")
        for branch in (request.success, request.failure)
    )


class Alarms:
    """This process's view of the datastore's alarms, and the quota check."""

    def __init__(self, backend: Backend, quota_bytes: int) -> None:
        self.backend = backend
        # etcd: 0 means the default, a negative value no quota.
        self.quota_bytes = DEFAULT_QUOTA_BYTES if quota_bytes == 0 else max(quota_bytes, 0)
        self.member_id = 0
        self.raised: list[tuple[int, int]] = []
        self.size = 0
        # Held while NOSPACE is being stored: a request refused for it meanwhile waits, so that its
        # client, asking for the alarms next, finds it.
        self._raising = asyncio.Lock()

    async def refresh(self) -> None:
        """Read the alarms and the datastore's size."""
        self.raised = await self.backend.alarms()
        if self.quota_bytes:
            self.size = (await self.backend.status()).db_size

    async def follow(self) -> None:
        """Keep the view fresh, for alarms raised elsewhere and a quota passed by any instance's writes."""

        async def step() -> None:
            await self.refresh()
            if self.quota_bytes and self.size > self.quota_bytes and not self.has(NOSPACE):
                await self._raise_nospace()

        await poll_forever(step, REFRESH_INTERVAL, "reading alarms")

    def has(self, alarm: int) -> bool:
        return any(kind == alarm for _, kind in self.raised)

    # -- the checks writes pass --------------------------------------------------------

    def check_corrupt(self) -> None:
        if self.raised and self.has(CORRUPT):
            raise CorruptError()

    async def check_space(self, cost: int) -> None:
        """Refuse a request that costs space under NOSPACE, or that would pass the quota (raising NOSPACE)."""
        self.check_corrupt()
        if cost <= 0:
            return
        if self.raised and self.has(NOSPACE):
            if self._raising.locked():
                async with self._raising:
                    pass
            raise NoSpaceError()
        if self.quota_bytes and self.size + cost >= self.quota_bytes:
            await self._raise_nospace()
            raise NoSpaceError()

    async def _raise_nospace(self) -> None:
        async with self._raising:
            if self.has(NOSPACE):
                return
            # Seen at once by the checks of requests running meanwhile, which wait for the store below.
            self.raised = [*self.raised, (self.member_id, NOSPACE)]
            log.warning(
                "datastore size %d bytes reached the quota of %d bytes: raising NOSPACE", self.size, self.quota_bytes
            )
            await self.set(self.member_id, NOSPACE, True)

    # -- the Alarm call ------------------------------------------------------------------

    async def set(self, member_id: int, alarm: int, raised: bool) -> None:
        try:
            await self.backend.set_alarm(member_id, alarm, raised)
            if raised:
                self.raised = await self.backend.alarms()
            else:
                await self.refresh()  # a disarm after a defragmentation must see the new size
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc

    async def current(self) -> list[tuple[int, int]]:
        try:
            self.raised = await self.backend.alarms()
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc
        return self.raised
