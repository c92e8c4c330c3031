"""Two pykine processes on one datastore: every watcher sees every commit, whoever made it.

Each process's watch hub publishes its own commits at once and follows the
other process's commits from the datastore's history, in revision order, so
watchers on either process see one identical sequence of events.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from harness import PykineServer, WatchSession, default_endpoint, pb


@pytest.fixture
def two() -> Iterator[tuple[PykineServer, PykineServer]]:
    workdir = tempfile.mkdtemp(prefix="pykine-shared-")
    endpoint = default_endpoint(workdir)
    first = PykineServer(workdir, endpoint=endpoint)
    second = PykineServer(workdir, endpoint=endpoint)
    first.start()
    second.start()
    try:
        yield first, second
    finally:
        second.stop()
        first.stop()


def events_until(watch: WatchSession, last: int) -> list[Any]:
    """Every event up to revision `last`, checking that each response holds whole revisions."""
    events: list[Any] = []
    while not events or events[-1].kv.mod_revision < last:
        response = watch.next(timeout=15)
        assert not response.canceled, response
        revisions = {event.kv.mod_revision for event in response.events}
        assert len(revisions) <= 1 or response.header.revision >= max(revisions)
        events.extend(response.events)
    return events


def as_tuples(events: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (e.type, e.kv.key, e.kv.mod_revision, e.kv.create_revision, e.kv.version, e.kv.value, e.prev_kv.value)
        for e in events
    ]


def test_watchers_on_both_processes_see_every_commit_in_order(two: tuple[PykineServer, PykineServer]) -> None:
    first, second = two
    watches = [WatchSession(server) for server in (first, second)]
    try:
        for watch in watches:
            watch.create(key=b"s/", range_end=b"s0", prev_kv=True)
            assert watch.next().created
        revisions: list[int] = []
        lock = threading.Lock()

        def write(server: PykineServer, name: str) -> None:
            kv = server.stub("KV")
            for n in range(60):
                key = b"s/%s/%d" % (name.encode(), n % 7)
                if n % 5 == 4:
                    response = kv.DeleteRange(pb.DeleteRangeRequest(key=key), timeout=10)
                else:
                    ops = [pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"%d" % n))]
                    ops.append(pb.RequestOp(request_put=pb.PutRequest(key=key + b"x", value=b"%d" % n)))
                    response = kv.Txn(pb.TxnRequest(success=ops), timeout=10)
                with lock:
                    revisions.append(response.header.revision)

        threads = [
            threading.Thread(target=write, args=(server, name)) for server, name in ((first, "a"), (second, "b"))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        last = max(revisions)

        seen = [as_tuples(events_until(watch, last)) for watch in watches]
        assert seen[0] == seen[1], "the two processes' watchers disagree"
        # Revision order with no gap: every revision from 2 on was a write under s/, through one process or the other.
        revs = [event[2] for event in seen[0]]
        assert revs == sorted(revs)
        assert sorted(set(revs)) == list(range(2, last + 1))

        # A watcher created later from the start replays the same history from the datastore.
        replay = WatchSession(second)
        try:
            replay.create(key=b"s/", range_end=b"s0", prev_kv=True, start_revision=2)
            assert replay.next().created
            assert as_tuples(events_until(replay, last)) == seen[0]
        finally:
            replay.close()

        # Progress on the other process covers the last write and nothing undelivered.
        kv = first.stub("KV")
        final = kv.Put(pb.PutRequest(key=b"s/final", value=b"x"), timeout=10).header.revision
        watches[1].request_progress()
        heard = []
        while True:
            response = watches[1].next(timeout=15)
            if response.watch_id == -1 and not response.events:
                assert all(event.kv.mod_revision <= response.header.revision for event in heard)
                if response.header.revision >= final:
                    assert any(event.kv.key == b"s/final" for event in heard)
                    break
                watches[1].request_progress()
            heard.extend(response.events)
    finally:
        for watch in watches:
            watch.close()


ROUNDS = 25


def test_a_watch_starts_after_every_write_acknowledged_on_another_process(
    two: tuple[PykineServer, PykineServer],
) -> None:
    """Read-your-writes for watchers (etcd's ReadIndex): a watch created with no start revision on
    one process right after a write through the other starts after that write, says so in its
    created header, and never delivers it as an event."""
    first, second = two
    kv = first.stub("KV")
    for n in range(ROUNDS):
        key = b"ryw/%d" % n
        written = kv.Put(pb.PutRequest(key=key, value=b"before"), timeout=10).header.revision
        watch = WatchSession(second)
        try:
            watch.create(key=key)
            created = watch.next()
            assert created.created and created.header.revision >= written, (n, written, created)
            after = kv.Put(pb.PutRequest(key=key, value=b"after"), timeout=10).header.revision
            response = watch.next(timeout=15)
            assert [(e.kv.mod_revision, e.kv.value) for e in response.events] == [(after, b"after")], (n, response)
        finally:
            watch.close()


def test_a_compacted_start_revision_is_refused_on_every_process(two: tuple[PykineServer, PykineServer]) -> None:
    """Once a compaction through one process is acknowledged, a watch on the other process from
    before it is canceled with the compact revision, not served from that process's memory."""
    first, second = two
    kv = first.stub("KV")
    heard = WatchSession(second)  # so that the second process has heard of the writes, in its memory
    heard.create(key=b"cmp/", range_end=b"cmp0")
    assert heard.next().created
    for n in range(ROUNDS):
        key = b"cmp/%d" % n
        old = kv.Put(pb.PutRequest(key=key, value=b"1"), timeout=10).header.revision
        compact_at = kv.Put(pb.PutRequest(key=key, value=b"2"), timeout=10).header.revision
        events_until(heard, compact_at)
        kv.Compact(pb.CompactionRequest(revision=compact_at), timeout=10)
        watch = WatchSession(second)
        try:
            watch.create(key=key, start_revision=old)
            responses = [watch.next()]
            if not responses[0].canceled:
                responses.append(watch.next())
            assert responses[0].created, (n, responses)
            canceled = responses[-1]
            assert canceled.canceled and canceled.compact_revision == compact_at, (n, old, compact_at, responses)
            assert not any(r.events for r in responses), (n, responses)
        finally:
            watch.close()
    heard.close()
