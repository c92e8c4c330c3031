"""The engine: reads, the group-commit writer, and compaction.

Writes queue up while the previous batch commits; the writer then takes
everything waiting (up to a bound) and commits it in one database
transaction. Each request still gets its own revision and its own outcome,
and nobody is answered before the commit returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pykine import metrics
from pykine.backends.base import Backend, StorageStatus
from pykine.engine import hashing
from pykine.engine.alarms import LEASE_OVERHEAD, Alarms, put_cost, txn_cost
from pykine.engine.auth import AuthStore
from pykine.engine.errors import (
    CompactedError,
    EngineError,
    FutureRevisionError,
    UnavailableError,
)
from pykine.engine.evaluate import (
    BatchState,
    ExpireLease,
    RangeRequest,
    collect_reads,
    finish_range,
    is_write,
    range_query,
)
from pykine.engine.hashing import HashResult
from pykine.engine.records import Change, KeySpan, KnownRows, MemberRow, ReadSet, Snapshot, WriteSet
from pykine.engine.results import (
    CompactResult,
    DeleteResult,
    LeaseInfo,
    LeaseResult,
    PutResult,
    RangeResult,
    TxnResult,
    WriteResult,
)
from pykine.engine.tokens import Tokens
from pykine.engine.watch import CATCH_UP_REVISIONS, WatchHub, WatchStream

log = logging.getLogger(__name__)


# How often the expiry task looks for leases past their deadline.
EXPIRY_INTERVAL = 0.25
# How often an instance tells the datastore it is serving, and when others stop listing it.
HEARTBEAT_INTERVAL = 2.0
MEMBER_TIMEOUT = 10.0
EVERYTHING = KeySpan(b"\x00", None)


@dataclass(slots=True)
class _Pending:
    request: Any
    future: asyncio.Future[Any]
    # A request that reads history at a fixed revision starts its own batch,
    # so the history prefetched for the batch is what it must see.
    reads: ReadSet


class Engine:
    def __init__(
        self,
        backend: Backend,
        *,
        max_batch: int = 256,
        compact_batch_size: int = 1000,
        progress_interval: float = 5.0,
        quota_bytes: int = 0,
        tokens: Tokens | None = None,
    ) -> None:
        self.backend = backend
        self.alarms = Alarms(backend, quota_bytes)
        self.auth = AuthStore(backend, tokens)
        self.hub = WatchHub()
        # Serialises advancing the hub between local commits and the feed.
        self._hub_lock = asyncio.Lock()
        self._progress_interval = progress_interval
        self._max_batch = max_batch
        self._compact_batch_size = compact_batch_size
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._compact_wake = asyncio.Event()
        self._compact_target = 0
        self._compacted_through = 0
        self._compaction_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Whether this process holds the datastore's duties (lease expiry).
        self._leading = False
        self._member: MemberRow | None = None
        self._heard_at = 0.0

    async def start(self) -> None:
        await self.backend.start()
        self.hub.start(*await self.backend.revisions())
        await self._claim_duties()
        target, done = await self.backend.compaction_progress()
        self._compact_target, self._compacted_through = target, done
        await self.alarms.refresh()
        await self.auth.load()
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="pykine-writer"),
            asyncio.create_task(self._compact_loop(), name="pykine-compactor"),
            asyncio.create_task(self._expiry_loop(), name="pykine-lease-expiry"),
            asyncio.create_task(self._feed_loop(), name="pykine-watch-feed"),
            asyncio.create_task(self.alarms.follow(), name="pykine-alarms"),
            asyncio.create_task(self.auth.follow(), name="pykine-auth"),
        ]
        if target > done:
            self._compact_wake.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._member is not None:
            try:
                await self.backend.leave(self._member.id)
            except Exception as exc:
                log.warning("could not remove this member from the datastore: %s", exc)
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(UnavailableError("server is shutting down"))
        await self.backend.close()

    # -- reads --------------------------------------------------------------------

    async def range(self, request: Any, known: KnownRows | None = None) -> RangeResult:
        """A Range; with `known`, rows the caller holds encoded may come back as those bytes.

        Only where no row field is needed here: whole rows in key order, no
        filters (the limit still applies, to the list).
        """
        query = range_query(request)
        # etcd sorts by a non-key target even without a sort order (finish_range): that needs the rows.
        plain = query.whole_rows_in_key_order and request.sort_target == RangeRequest.KEY
        try:
            rows = await self.backend.read_range(query, known if plain else None)
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc
        if query.revision > rows.revision:
            raise FutureRevisionError()
        if 0 < query.revision < rows.compact_revision:
            raise CompactedError()
        return finish_range(request, rows.revision, rows.rows, rows.count)

    async def txn(self, request: Any) -> TxnResult:
        if is_write(request):
            await self.alarms.check_space(txn_cost(request))
            result: TxnResult = await self._submit(request)
            return result
        reads = ReadSet()
        collect_reads(request, reads)
        try:
            snapshot = await self.backend.read_snapshot(reads)
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc
        outcome = BatchState(snapshot, self.backend.max_key_bytes).apply(request)
        if isinstance(outcome, EngineError):
            raise outcome
        assert isinstance(outcome, TxnResult)
        return outcome

    def watch_stream(self) -> WatchStream:
        """The watches of one client stream, fed by this engine's commits."""
        return WatchStream(self.hub, self.backend, self._progress_interval, self.read_index)

    async def read_index(self) -> None:
        """Bring the hub up to everything committed before now, by any process (etcd's ReadIndex).

        A watch created after a write was acknowledged elsewhere must start
        after that write, and one from before a compaction acknowledged
        elsewhere must be refused: neither can wait for the feed to hear of it.
        """
        try:
            revision, compact = await self.backend.revisions()
        except Exception as exc:
            # The datastore is failing: serve from what this process has heard (writes fail meanwhile).
            log.debug("read index unavailable, watching from the hub's head: %s", exc)
            return
        self.hub.compact_revision = max(self.hub.compact_revision, compact)
        if revision > self.hub.head:
            async with self._hub_lock:
                await self._catch_up_hub(revision)

    # -- writes -------------------------------------------------------------------

    async def put(self, request: Any) -> PutResult:
        await self.alarms.check_space(put_cost(request))
        result: PutResult = await self._submit(request)
        return result

    async def delete_range(self, request: Any) -> DeleteResult:
        self.alarms.check_corrupt()
        result: DeleteResult = await self._submit(request)
        return result

    async def compact(self, request: Any) -> CompactResult:
        self.alarms.check_corrupt()
        result: CompactResult = await self._submit(request)
        if request.physical:
            await self._compacted(request.revision)
        return result

    def _submit(self, request: Any) -> asyncio.Future[Any]:
        reads = ReadSet()
        collect_reads(request, reads)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request, future, reads))
        self._wake.set()
        return future

    def _take_batch(self) -> list[_Pending]:
        batch = [self._pending.popleft()]
        while self._pending and len(batch) < self._max_batch and not self._pending[0].reads.historical:
            batch.append(self._pending.popleft())
        return batch

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._commit(self._take_batch())

    async def _commit(self, batch: list[_Pending]) -> None:
        reads = ReadSet()
        for item in batch:
            reads.update(item.reads)

        def plan(snapshot: Snapshot) -> tuple[WriteSet, list[WriteResult | EngineError]]:
            state = BatchState(snapshot, self.backend.max_key_bytes)
            outcomes = [state.apply(item.request) for item in batch]
            return state.write_set(), outcomes

        started = time.perf_counter()
        try:
            write_set, outcomes = await self.backend.commit(reads, plan)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.WRITE_BATCH_FAILURES.inc()
            # Requests that queued while the datastore was failing fail with this batch instead
            # of each waiting out its own failure: clients hear UNAVAILABLE promptly and retry.
            waiting = list(self._pending)
            self._pending.clear()
            log.error("write batch of %d requests failed: %s", len(batch) + len(waiting), exc, exc_info=True)
            for item in batch + waiting:
                if not item.future.done():
                    item.future.set_exception(UnavailableError(str(exc)))
            return
        metrics.WRITE_BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.WRITE_BATCH_REQUESTS.observe(len(batch))
        # Watchers hear of a commit before its writers are answered.
        self.hub.compact_revision = max(self.hub.compact_revision, write_set.compact_revision)
        if write_set.changes:
            await self._publish(write_set.changes)
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.future.done():
                continue
            if isinstance(outcome, EngineError):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
        if write_set.compact_revision > self._compact_target:
            self._compact_target = write_set.compact_revision
            self._compact_wake.set()

    # -- the watch hub's feed -----------------------------------------------------------

    async def _publish(self, changes: list[Change]) -> None:
        """Publish a local commit, after any commits of other processes before it."""
        async with self._hub_lock:
            await self._catch_up_hub(changes[0].kv.mod_revision - 1)
            if self.hub.head < changes[-1].kv.mod_revision:
                self.hub.publish(changes)

    async def _catch_up_hub(self, revision: int) -> None:
        """Publish commits up to `revision` that this process did not make, from the datastore."""
        while self.hub.head < revision:
            last = min(revision, self.hub.head + CATCH_UP_REVISIONS)
            history = await self.backend.read_history(self.hub.head + 1, last, EVERYTHING)
            if self.hub.head + 1 < history.compact_revision:
                self.hub.compact_revision = max(self.hub.compact_revision, history.compact_revision)
                self.hub.reset(revision)
                return
            if history.changes:
                self.hub.publish(history.changes)
            self.hub.head = last

    async def _feed_loop(self) -> None:
        """Follow commits other processes make on a shared datastore, in revision order."""
        failing = False
        while True:
            await self.backend.wait_for_commits()
            try:
                revision, compact = await self.backend.revisions()
                self.hub.compact_revision = max(self.hub.compact_revision, compact)
                if revision > self.hub.head:
                    async with self._hub_lock:
                        await self._catch_up_hub(revision)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # once per outage, not once per poll
                    log.error("following the datastore's commits failed: %s", exc)
                failing = True
                await asyncio.sleep(0.2)
                continue
            if failing:
                log.info("following the datastore's commits again")
                failing = False

    # -- leases ---------------------------------------------------------------------

    async def lease_grant(self, request: Any) -> LeaseResult:
        await self.alarms.check_space(LEASE_OVERHEAD)
        result: LeaseResult = await self._submit(request)
        return result

    async def lease_revoke(self, request: Any) -> LeaseResult:
        self.alarms.check_corrupt()
        result: LeaseResult = await self._submit(request)
        return result

    async def lease_keep_alive(self, request: Any) -> LeaseResult:
        result: LeaseResult = await self._submit(request)
        return result

    async def lease_keys(self, lease_id: int) -> list[bytes]:
        """The keys attached to a lease now (none if there is no such lease)."""
        try:
            _, lease, keys = await self.backend.read_lease(lease_id, True)
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc
        return keys if lease is not None else []

    async def lease_time_to_live(self, request: Any) -> LeaseInfo:
        try:
            revision, lease, keys = await self.backend.read_lease(request.ID, request.keys)
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc
        if lease is None:
            return LeaseInfo(revision, request.ID, -1, 0, [])
        remaining = max(0, int(lease.expires_at - time.time()))
        return LeaseInfo(revision, lease.id, remaining, lease.ttl, keys)

    async def lease_ids(self) -> tuple[int, list[int]]:
        try:
            return await self.backend.lease_ids()
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc

    async def _claim_duties(self) -> None:
        """Take the datastore's duties when free; a new holder renews every lease, as a new etcd leader does."""
        try:
            leading = await self.backend.claim_duties()
            if leading and not self._leading:
                await self.backend.renew_leases(time.time())
                log.info("this instance now expires leases for the datastore")
        except Exception as exc:
            log.error("claiming the datastore's duties failed: %s", exc)
            leading = False
        self._leading = leading

    async def _expiry_loop(self) -> None:
        """Revoke leases past their deadline, found through the deadline index.

        Only the process holding the duties does this. Each expiry goes through
        the write path and re-checks the deadline in the write transaction, so
        a lease renewed meanwhile survives, and even two processes that both
        believe they hold the duties delete a lease's keys only once.
        """
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL)
            if time.time() - self._heard_at >= HEARTBEAT_INTERVAL:
                await self._heartbeat()
            await self._claim_duties()
            if not self._leading:
                continue
            now = time.time()
            try:
                due = await self.backend.due_leases(now, self._max_batch)
            except Exception as exc:
                log.error("looking for expired leases failed: %s", exc)
                continue
            if due:
                outcomes = await asyncio.gather(
                    *(self._submit(ExpireLease(lease_id, now)) for lease_id in due), return_exceptions=True
                )
                for outcome in outcomes:
                    if isinstance(outcome, Exception):
                        log.error("lease expiry failed: %s", outcome)

    # -- members ------------------------------------------------------------------

    async def join(self, member: MemberRow) -> None:
        """Serve as `member`: listed by MemberList on every instance while its heartbeats continue."""
        self._member = member
        self.alarms.member_id = member.id
        await self._heartbeat()

    async def _heartbeat(self) -> None:
        if self._member is None:
            return
        now = time.time()
        try:
            await self.backend.heartbeat(self._member, now)
            self._heard_at = now
        except Exception as exc:
            log.error("member heartbeat failed: %s", exc)

    async def remove_member(self, member_id: int) -> bool:
        """Remove a member from the datastore's cluster (dqlite); False where members are only instances."""
        try:
            if not await self.backend.remove_member(member_id):
                return False
            await self.backend.leave(member_id)
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc
        return True

    async def members(self) -> list[MemberRow]:
        """The instances serving this datastore (this one always among them), by id."""
        try:
            found = await self.backend.members(time.time() - MEMBER_TIMEOUT)
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc
        if self._member is not None and self._member.id not in {member.id for member in found}:
            found = sorted([*found, self._member])
        return found

    # -- compaction -----------------------------------------------------------------

    async def _compact_loop(self) -> None:
        """Delete obsolete history in short steps that interleave with writes."""
        while True:
            await self._compact_wake.wait()
            self._compact_wake.clear()
            while self._compacted_through < self._compact_target:
                try:
                    self._compacted_through = await self.backend.compact_step(
                        self._compact_target, self._compact_batch_size
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("compaction step failed, retrying: %s", exc)
                    await asyncio.sleep(1)
                    continue
                self._wake_compaction_waiters()
                await asyncio.sleep(0)

    def _wake_compaction_waiters(self) -> None:
        still: list[tuple[int, asyncio.Future[None]]] = []
        for revision, future in self._compaction_waiters:
            if self._compacted_through >= revision:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((revision, future))
        self._compaction_waiters = still

    async def _compacted(self, revision: int) -> None:
        if self._compacted_through >= revision:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._compaction_waiters.append((revision, future))
        await future

    # -- maintenance ----------------------------------------------------------------

    async def revision(self) -> int:
        """The current revision, as the datastore has it now."""
        try:
            revision, _ = await self.backend.revisions()
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc
        return revision

    async def hash_kv(self, revision: int) -> HashResult:
        return await hashing.hash_kv(self.backend, revision)

    async def hash_state(self) -> HashResult:
        return await hashing.hash_state(self.backend)

    async def status(self) -> StorageStatus:
        return await self.backend.status()

    async def move_leader(self, member_id: int) -> None:
        try:
            await self.backend.move_leader(member_id)
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc

    async def defragment(self) -> None:
        await self.backend.defragment()
        await self.alarms.refresh()
