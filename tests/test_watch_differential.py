"""Watch semantics against real etcd.

Both servers get the same watch requests on one stream each and the same
writes; each watcher's sequence of responses must be identical (headers
normalised). The interleaving of different watchers on one stream is not
compared: etcd's own order across watchers is not deterministic.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from harness import Pair, WatchSession, normalise, pair, pb

NOPUT, NODELETE = 0, 1


def by_watch(responses: list[Any]) -> dict[int, list[Any]]:
    grouped: dict[int, list[Any]] = defaultdict(list)
    for response in responses:
        grouped[response.watch_id].append(normalise(response))
    return dict(grouped)


class Streams:
    """One Watch stream on etcd and one on pykine, driven alike."""

    def __init__(self, servers: Pair) -> None:
        self.servers = servers
        self.etcd = WatchSession(servers.etcd)
        self.pykine = WatchSession(servers.pykine)

    def create(self, **options: Any) -> None:
        self.etcd.create(**options)
        self.pykine.create(**options)

    def cancel(self, watch_id: int) -> None:
        self.etcd.cancel(watch_id)
        self.pykine.cancel(watch_id)

    def request_progress(self) -> None:
        self.etcd.request_progress()
        self.pykine.request_progress()

    def same(self, quiet: float = 0.4, limit: float = 10.0) -> dict[int, list[Any]]:
        """Everything both streams sent since the last check must agree, watcher by watcher."""
        want = by_watch(self.etcd.drain(quiet, limit))
        got = by_watch(self.pykine.drain(quiet, limit))
        assert got == want, f"\n--- etcd:\n{want}\n--- pykine:\n{got}"
        return got

    def close(self) -> None:
        self.etcd.close()
        self.pykine.close()


@pytest.fixture
def streams(servers: Pair) -> Iterator[Streams]:
    both = Streams(servers)
    try:
        yield both
    finally:
        both.close()


def put(servers: Pair, key: bytes, value: bytes = b"v") -> Any:
    return servers.kv("Put", pb.PutRequest(key=key, value=value))


def txn(servers: Pair, *ops: pb.RequestOp) -> Any:
    return servers.kv("Txn", pb.TxnRequest(success=list(ops)))


def put_op(key: bytes, value: bytes = b"v") -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value))


def delete_op(key: bytes, range_end: bytes = b"") -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end))


def write_mix(servers: Pair) -> None:
    """Creates, updates, deletes, a multi-key txn and a range delete."""
    put(servers, b"a", b"1")
    put(servers, b"a/x", b"2")
    put(servers, b"a", b"3")
    servers.kv("DeleteRange", pb.DeleteRangeRequest(key=b"a/x"))
    txn(servers, put_op(b"a/y", b"4"), put_op(b"b", b"5"), delete_op(b"a"))
    put(servers, b"\x00bin\xff", b"\x00\xff")
    put(servers, b"a/z", b"6")
    servers.kv("DeleteRange", pb.DeleteRangeRequest(key=b"a/", range_end=b"a0"))
    put(servers, b"a", b"7")


def test_created_responses_and_live_events(servers: Pair, streams: Streams) -> None:
    for options in (
        {"key": b"a"},
        {"key": b"a/", "range_end": b"a0", "prev_kv": True},
        {"key": b"a", "range_end": b"\x00"},
        {"key": b"\x00", "range_end": b"\x00", "prev_kv": True},
        {"key": b"", "range_end": b"\x00"},
        {"key": b"\x00bin\xff"},
        {"key": b"c", "range_end": b"a"},
    ):
        streams.create(**options)
    got = streams.same()
    assert [response.created for response in got[0]] == [True]
    write_mix(servers)
    got = streams.same()
    assert len(got[3]) == 9, "the all-keys watcher sees one response per revision"


def test_filters(servers: Pair, streams: Streams) -> None:
    streams.create(key=b"\x00", range_end=b"\x00", filters=[NOPUT])
    streams.create(key=b"\x00", range_end=b"\x00", filters=[NODELETE], prev_kv=True)
    streams.create(key=b"\x00", range_end=b"\x00", filters=[NOPUT, NODELETE])
    streams.same()
    write_mix(servers)
    got = streams.same()
    assert 2 not in got, "a watcher filtering both kinds hears nothing"


def test_client_chosen_ids_and_duplicates(servers: Pair, streams: Streams) -> None:
    streams.create(key=b"a", watch_id=7)
    streams.create(key=b"a", watch_id=7)  # duplicate: created and canceled at once
    streams.create(key=b"a")  # auto ids start at 0
    streams.create(key=b"a", watch_id=1)
    streams.create(key=b"a")  # skips ids in use
    streams.same()
    put(servers, b"a")
    streams.same()


def test_cancel(servers: Pair, streams: Streams) -> None:
    streams.create(key=b"a")
    streams.create(key=b"a", range_end=b"b")
    streams.same()
    streams.cancel(0)
    streams.cancel(42)  # unknown: no answer
    streams.same()
    put(servers, b"a")
    got = streams.same()
    assert 0 not in got and 1 in got


def test_start_revision_in_the_past_replays_history(servers: Pair, streams: Streams) -> None:
    first = put(servers, b"a", b"0").header.revision
    write_mix(servers)
    streams.create(key=b"\x00", range_end=b"\x00", start_revision=first, prev_kv=True)
    streams.create(key=b"a/", range_end=b"a0", start_revision=first + 3)
    streams.create(key=b"a", start_revision=first, filters=[NODELETE])
    streams.same()
    write_mix(servers)  # live events follow the replay with no gap and no repeat
    streams.same()


def test_compacted_start_revision(servers: Pair, streams: Streams) -> None:
    first = put(servers, b"a", b"0").header.revision
    write_mix(servers)
    now = put(servers, b"a", b"last").header.revision
    servers.kv("Compact", pb.CompactionRequest(revision=first + 4))
    streams.create(key=b"a", start_revision=first + 3)  # compacted: canceled with compact_revision
    streams.create(key=b"a", start_revision=first + 4)  # the compact revision itself still works
    streams.create(key=b"\x00", range_end=b"\x00", start_revision=now)
    got = streams.same()
    assert got[0][-1].canceled and got[0][-1].compact_revision == first + 4


def test_future_start_revision_waits(servers: Pair, streams: Streams) -> None:
    now = put(servers, b"a").header.revision
    streams.create(key=b"\x00", range_end=b"\x00", start_revision=now + 3)
    streams.same()
    for _ in range(4):
        put(servers, b"a")
    got = streams.same()
    assert [response.header.revision for response in got[0]] == [now + 3, now + 4]


def test_request_progress(servers: Pair, streams: Streams) -> None:
    put(servers, b"a")
    streams.request_progress()  # no watchers yet
    streams.create(key=b"a", progress_notify=True)
    streams.create(key=b"b")
    streams.same()
    put(servers, b"a")
    put(servers, b"b")
    streams.same()
    streams.request_progress()
    got = streams.same()
    [progress] = got[-1]
    assert progress.header.revision == servers.kv("Range", pb.RangeRequest(key=b"a")).header.revision


def test_periodic_progress_notify() -> None:
    with pair(
        "--watch-progress-notify-interval=1s", etcd_args=("--experimental-watch-progress-notify-interval=1s",)
    ) as servers:
        streams = Streams(servers)
        try:
            streams.create(key=b"p", progress_notify=True)
            streams.create(key=b"q")
            want = by_watch(streams.etcd.drain(quiet=1.5, limit=3.5))
            got = by_watch(streams.pykine.drain(quiet=1.5, limit=3.5))
            for responses in (want, got):
                assert 1 not in responses or len(responses[1]) == 1, "no progress for a watcher that did not ask"
                notices = responses[0][1:]
                assert len(notices) >= 2, responses
                assert all(not notice.events and notice.header.revision == 1 for notice in notices)
            assert got[0][0] == want[0][0]  # the created responses agree
        finally:
            streams.close()


def test_fragmented_large_revision(servers: Pair, streams: Streams) -> None:
    """With prev_kv, updating four 350 KiB values makes a 2.8 MiB revision: over etcd's 1.5 MiB, so fragments."""
    streams.create(key=b"big/", range_end=b"big0", fragment=True, prev_kv=True)
    streams.create(key=b"big/", range_end=b"big0", prev_kv=True)  # not asking: one large response
    streams.same()
    for fill in (b"A", b"B"):
        txn(servers, *(put_op(b"big/%d" % n, fill * (350 * 1024)) for n in range(4)))
    got = streams.same()
    assert [response.fragment for response in got[0]] == [False, True, False]
    assert [len(response.events) for response in got[0]] == [4, 2, 2]
    assert [len(response.events) for response in got[1]] == [4, 4]


def test_watchers_on_several_streams(servers: Pair) -> None:
    """Each stream gets its own watch ids and its own copy of every event."""
    groups = [Streams(servers) for _ in range(3)]
    try:
        for index, group in enumerate(groups):
            group.create(key=b"a", range_end=b"b", prev_kv=index % 2 == 0)
            group.same()
        write_mix(servers)
        for group in groups:
            assert len(group.same()[0]) == 8
    finally:
        for group in groups:
            group.close()


def test_put_then_delete_in_one_revision_reports_the_state_before_it(servers: Pair, streams: Streams) -> None:
    """etcd's prev_kv is the key at revision - 1, not the put earlier in the same txn."""
    put(servers, b"k", b"before")
    streams.create(key=b"\x00", range_end=b"\x00", prev_kv=True)
    streams.same()
    nested_put = pb.RequestOp(request_txn=pb.TxnRequest(success=[put_op(b"k", b"during"), put_op(b"n", b"new")]))
    nested_delete = pb.RequestOp(request_txn=pb.TxnRequest(success=[delete_op(b"k"), delete_op(b"n")]))
    txn(servers, nested_put, nested_delete)
    [response] = streams.same()[0]
    assert [event.prev_kv.value for event in response.events] == [b"before", b"", b"before", b""]
