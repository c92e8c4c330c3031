"""Watch fan-out: one ordered event source per process, delivery per stream.

The hub keeps the most recent committed revisions in a bounded ring. Commits
append to it and wake the streams; writers never wait for watchers. Each
stream delivers to its own watchers from the ring, and a watcher that starts
in the past or falls off the ring (a slow reader) catches up from the
datastore's history in bounded windows, then rejoins the ring, like etcd's
unsynced watchers.

A stream reports progress (a revision with no events) only when each of its
watchers has been sent every event up to that revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pykine.backends.base import Backend
from pykine.engine.records import Change, KeySpan

# Revisions read from the datastore per catch-up step (etcd's watchBatchMaxRevs).
CATCH_UP_REVISIONS = 1000
DUPLICATE_WATCH_ID = "mvcc: duplicate watch ID provided on the WatchStream"
EMPTY_WATCH_RANGE = "mvcc: watcher range is empty"

NOPUT, NODELETE = 0, 1


@dataclass(frozen=True, slots=True)
class RefusedCreate:
    """A create request the caller may not make (auth): answered created and canceled, in order."""

    watch_id: int
    reason: str


@dataclass(slots=True)
class WatchReply:
    """One WatchResponse, before encoding."""

    watch_id: int
    revision: int
    events: list[Change] = field(default_factory=list)
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    prev_kv: bool = False
    fragment: bool = False


class WatchHub:
    """The process's ordered stream of committed changes, and a ring of recent ones."""

    def __init__(self, max_revisions: int = 10_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.head = 0
        self.compact_revision = -1
        self._ring: deque[tuple[int, list[Change], int]] = deque()
        self._ring_bytes = 0
        self._max_revisions = max_revisions
        self._max_bytes = max_bytes
        self._listeners: set[asyncio.Event] = set()

    def start(self, revision: int, compact_revision: int) -> None:
        self.head = revision
        self.compact_revision = compact_revision

    @property
    def first_revision(self) -> int:
        """The oldest revision still in the ring (head + 1 when it is empty)."""
        return self._ring[0][0] if self._ring else self.head + 1

    def publish(self, changes: list[Change]) -> None:
        """Append committed changes (whole revisions, in order) and wake every stream."""
        for revision, group in itertools.groupby(changes, key=lambda change: change.kv.mod_revision):
            events = list(group)
            size = sum(len(c.kv.key) + len(c.kv.value) + (len(c.prev.value) if c.prev else 0) for c in events)
            self._ring.append((revision, events, size))
            self._ring_bytes += size
            self.head = revision
        while self._ring and (len(self._ring) > self._max_revisions or self._ring_bytes > self._max_bytes):
            self._ring_bytes -= self._ring.popleft()[2]
        for listener in self._listeners:
            listener.set()

    def reset(self, revision: int) -> None:
        """Jump to `revision` when the revisions before it can no longer be read.

        The ring is emptied, so every watcher still behind goes to the
        datastore, finds its events compacted and is canceled, as in etcd.
        """
        self._ring.clear()
        self._ring_bytes = 0
        self.head = revision
        for listener in self._listeners:
            listener.set()

    def since(self, first: int, last: int) -> list[tuple[int, list[Change]]]:
        """Ring entries with first <= revision <= last; first must be in the ring."""
        start = first - self.first_revision
        return [(rev, events) for rev, events, _ in itertools.islice(self._ring, start, start + last - first + 1)]

    def listen(self, wake: asyncio.Event) -> None:
        self._listeners.add(wake)

    def unlisten(self, wake: asyncio.Event) -> None:
        self._listeners.discard(wake)


@dataclass(slots=True)
class _Watcher:
    watch_id: int
    span: KeySpan
    next_revision: int
    no_put: bool
    no_delete: bool
    prev_kv: bool
    progress_notify: bool
    fragment: bool
    # Synced watchers get each revision as it commits, in its own response.
    # Unsynced ones (started in the past, or fell off the ring) catch up in
    # batches of up to CATCH_UP_REVISIONS revisions per response.
    synced: bool

    def select(self, changes: list[Change]) -> list[Change]:
        return [
            change
            for change in changes
            if self.span.contains(change.kv.key)
            and not (change.deleted and self.no_delete)
            and not (not change.deleted and self.no_put)
        ]

    def reply(self, revision: int, events: list[Change], compact_revision: int) -> WatchReply:
        if self.prev_kv:
            # etcd gives create events no prev_kv (even when a txn deleted the key just before),
            # and reads prev_kv at the event's revision - 1: once that is compacted, there is none.
            events = [
                change._replace(prev=None)
                if change.prev
                and (
                    (not change.deleted and change.kv.create_revision == change.kv.mod_revision)
                    or change.kv.mod_revision - 1 < compact_revision
                )
                else change
                for change in events
            ]
        return WatchReply(self.watch_id, revision, events, prev_kv=self.prev_kv, fragment=self.fragment)


class WatchStream:
    """The watches of one gRPC Watch stream, served in request order."""

    def __init__(
        self,
        hub: WatchHub,
        backend: Backend,
        progress_interval: float,
        read_index: Callable[[], Awaitable[None]],
    ) -> None:
        self._hub = hub
        self._backend = backend
        self._read_index = read_index
        self._progress_interval = progress_interval
        self._watchers: dict[int, _Watcher] = {}
        self._inbox: deque[Any] = deque()
        self._wake = asyncio.Event()
        self._next_id = 0
        self._progress_requested = False
        hub.listen(self._wake)

    def submit(self, request: Any) -> None:
        """Queue a WatchRequest; it is handled in order with event delivery."""
        self._inbox.append(request)
        self._wake.set()

    def close(self) -> None:
        self._hub.unlisten(self._wake)
        self._watchers.clear()

    @property
    def synced(self) -> bool:
        head = self._hub.head
        return all(watcher.next_revision > head for watcher in self._watchers.values())

    async def replies(self) -> AsyncIterator[WatchReply]:
        loop = asyncio.get_running_loop()
        next_progress = loop.time() + self._progress_interval
        while True:
            self._wake.clear()
            while self._inbox:
                request = self._inbox.popleft()
                if not isinstance(request, RefusedCreate) and request.WhichOneof("request_union") == "create_request":
                    await self._read_index()
                for reply in self._handle(request):
                    yield reply
            for watcher in list(self._watchers.values()):
                async for reply in self._deliver(watcher):
                    yield reply
            if self._inbox or not self.synced:
                continue  # more to do before waiting or reporting progress
            # Every watcher has been sent everything up to this head. Take it
            # once: new commits may land while the replies below are sent.
            synced_through = self._hub.head
            if self._progress_requested:
                self._progress_requested = False
                yield WatchReply(-1, synced_through)
            if loop.time() >= next_progress:
                next_progress = loop.time() + self._progress_interval
                for watcher in list(self._watchers.values()):
                    if watcher.progress_notify:
                        yield WatchReply(watcher.watch_id, synced_through)
            if self._wake.is_set():
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_progress - loop.time()))

    # -- requests ----------------------------------------------------------------

    def _handle(self, request: Any) -> Iterator[WatchReply]:
        if isinstance(request, RefusedCreate):
            yield WatchReply(
                request.watch_id, self._hub.head, created=True, canceled=True, cancel_reason=request.reason
            )
            return
        kind = request.WhichOneof("request_union")
        if kind == "create_request":
            yield from self._create(request.create_request)
        elif kind == "cancel_request":
            watcher = self._watchers.pop(request.cancel_request.watch_id, None)
            if watcher is not None:
                yield WatchReply(watcher.watch_id, self._hub.head, canceled=True)
        elif kind == "progress_request":
            self._progress_requested = True

    def _create(self, create: Any) -> Iterator[WatchReply]:
        head = self._hub.head
        span = KeySpan.from_request(create.key or b"\x00", create.range_end)
        if span.empty:
            yield WatchReply(-1, head, created=True, canceled=True, cancel_reason=EMPTY_WATCH_RANGE)
            return
        watch_id = create.watch_id
        if watch_id == 0:
            while self._next_id in self._watchers:
                self._next_id += 1
            watch_id = self._next_id
            self._next_id += 1
        elif watch_id in self._watchers:
            yield WatchReply(-1, head, created=True, canceled=True, cancel_reason=DUPLICATE_WATCH_ID)
            return
        start = create.start_revision if create.start_revision > 0 else head + 1
        watcher = _Watcher(
            watch_id=watch_id,
            span=span,
            next_revision=start,
            no_put=NOPUT in create.filters,
            no_delete=NODELETE in create.filters,
            prev_kv=create.prev_kv,
            progress_notify=create.progress_notify,
            fragment=create.fragment,
            synced=start > head,
        )
        yield WatchReply(watch_id, head, created=True)
        if start <= head and start < self._hub.compact_revision:
            yield self._compacted(watcher, self._hub.compact_revision)
            return
        self._watchers[watch_id] = watcher

    @staticmethod
    def _compacted(watcher: _Watcher, compact_revision: int) -> WatchReply:
        return WatchReply(watcher.watch_id, 0, canceled=True, compact_revision=compact_revision)

    # -- delivery ------------------------------------------------------------------

    async def _deliver(self, watcher: _Watcher) -> AsyncIterator[WatchReply]:
        """Send the watcher what it has not seen, up to the hub's head now."""
        head = self._hub.head
        if watcher.next_revision > head:
            watcher.synced = True
            return
        in_ring = watcher.next_revision >= self._hub.first_revision
        if watcher.synced and in_ring:
            entries = self._hub.since(watcher.next_revision, head)
            watcher.next_revision = head + 1
            for revision, changes in entries:
                events = watcher.select(changes)
                if events:
                    yield watcher.reply(revision, events, self._hub.compact_revision)
            return
        watcher.synced = False
        last = min(head, watcher.next_revision + CATCH_UP_REVISIONS - 1)
        if in_ring:
            changes = [change for _, group in self._hub.since(watcher.next_revision, last) for change in group]
        else:
            history = await self._backend.read_history(watcher.next_revision, last, watcher.span)
            if watcher.next_revision < history.compact_revision:
                self._watchers.pop(watcher.watch_id, None)
                yield self._compacted(watcher, history.compact_revision)
                return
            changes = history.changes
        watcher.next_revision = last + 1
        events = watcher.select(changes)
        if events and watcher.watch_id in self._watchers:
            yield watcher.reply(head, events, self._hub.compact_revision)
