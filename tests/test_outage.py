"""The database (or NATS server) goes down under load and comes back: pykine must ride it out without a restart.

While the database is down every request fails with UNAVAILABLE (a client retries those),
not with INTERNAL and not by outliving the client's deadline; pykine itself stays up.
Once the database answers again, requests succeed again on the same pykine process within
seconds, no acknowledged write is lost, and a watch opened before the outage carries on
with every revision, in order, without a gap: including any write whose commit reached
the database although its client was told UNAVAILABLE (such a write may or may not exist).

Each case runs against a database server of its own, so stopping it disturbs no other test.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import databases
import grpc
import pytest
from aetcd.rpc import kv_pb2
from aetcd.rpc import rpc_pb2_grpc as pb_grpc
from harness import PykineServer, WatchSession, call, pb

PREFIX = b"outage/"
PREFIX_END = b"outage0"
WRITERS = 4
# Every request's gRPC deadline. pykine gives up waiting for a database connection after 2 s and
# answers UNAVAILABLE; a client must hear that before its deadline, or it learns nothing. 8 s leaves
# room for a request's own work, not for queueing behind other requests' waits.
TIMEOUT = 8.0
ACKS_BEFORE = 150  # puts acknowledged before the database goes down
ACKS_AFTER = 150  # and after it is back
# Seconds the database stays down while the load goes on. Long enough for requests made while it
# is down to be answered while it is still down, and for a client that retries connecting with a
# doubling back-off (1, 2, 4, 8 s ...) to be 16 s into a wait when the database comes back.
OUTAGE = 17.0
# How soon after the database accepts connections again pykine must serve reads and writes.
RECOVERY = 8.0
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@dataclass
class Attempt:
    """One request as its client saw it: a Put of key=value, or a Range of the prefix (value None)."""

    key: bytes
    value: bytes | None
    started: float
    ended: float = 0.0
    revision: int | None = None  # the header revision, if it succeeded
    code: grpc.StatusCode | None = None
    details: str | None = None


class Load:
    """WRITERS threads putting distinct keys and one thread ranging the prefix, until told to stop.

    Each has its own connection and carries on through failures (pausing briefly after each),
    as a retrying client would.
    """

    def __init__(self, address: str, tag: bytes = b"") -> None:
        self.address = address
        # Told apart from other loads' keys and values (several loads on one datastore).
        self.tag = tag
        self.lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(index,), daemon=True) for index in range(WRITERS)]
        self.threads.append(threading.Thread(target=self._run, args=(None,), daemon=True))

    def _run(self, writer: int | None) -> None:
        channel = grpc.insecure_channel(self.address)
        stub = pb_grpc.KVStub(channel)
        try:
            for number in itertools.count():
                if self.halt.is_set():
                    return
                if writer is None:
                    attempt = Attempt(PREFIX, None, started=time.monotonic())
                    request: Any = pb.RangeRequest(key=PREFIX, range_end=PREFIX_END, count_only=True)
                    method = stub.Range
                else:
                    key = PREFIX + self.tag + b"w%d/%06d" % (writer, number)
                    value = b"value-%s%d-%d" % (self.tag, writer, number)
                    attempt = Attempt(key, value, started=time.monotonic())
                    request, method = pb.PutRequest(key=key, value=value), stub.Put
                try:
                    attempt.revision = method(request, timeout=TIMEOUT).header.revision
                except grpc.RpcError as error:
                    attempt.code, attempt.details = error.code(), error.details()
                attempt.ended = time.monotonic()
                with self.lock:
                    self.attempts.append(attempt)
                time.sleep(0.05 if attempt.code is not None or writer is None else 0)
        finally:
            channel.close()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def acked_count(self, since: float = 0.0) -> int:
        """Acknowledged puts among those started after `since` (monotonic)."""
        with self.lock:
            return sum(a.revision is not None and a.value is not None and a.started > since for a in self.attempts)

    def wait_for_acks(self, count: int, timeout: float, since: float = 0.0) -> None:
        deadline = time.monotonic() + timeout
        while self.acked_count(since) < count:
            assert time.monotonic() < deadline, f"only {self.acked_count(since)} of {count} puts acknowledged in time"
            time.sleep(0.01)

    def stop(self) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(timeout=TIMEOUT + 5)
            assert not thread.is_alive(), "a request outlived its deadline"


def alive(pykine: PykineServer) -> None:
    assert pykine.process is not None and pykine.process.poll() is None, f"pykine died: {pykine.log()}"


def recover(pykine: PykineServer) -> tuple[float, list[Attempt]]:
    """Put and read back a key until both succeed; how many seconds that took, and what failed meanwhile."""
    started = time.monotonic()
    failures: list[Attempt] = []
    for number in itertools.count():
        key = PREFIX + b"probe/%d" % number
        attempt = Attempt(key, b"back", started=time.monotonic())
        put = call(pykine, "KV", "Put", pb.PutRequest(key=key, value=b"back"), timeout=TIMEOUT)
        got = call(pykine, "KV", "Range", pb.RangeRequest(key=key), timeout=TIMEOUT) if put.ok else put
        if got.ok and [kv.value for kv in got.response.kvs] == [b"back"]:
            return time.monotonic() - started, failures
        attempt.ended, attempt.code, attempt.details = time.monotonic(), got.code, got.details
        failures.append(attempt)
        alive(pykine)
        assert time.monotonic() - started < 60, f"pykine did not recover in 60 s: {failures[-3:]}"
        time.sleep(0.2)
    raise AssertionError("unreachable")


def watched_events(watch: WatchSession, last: int, timeout: float = 30) -> list[Any]:
    """Every event the watch delivers up to revision `last` (the stream must not be canceled)."""
    events: list[Any] = []
    deadline = time.monotonic() + timeout
    while not events or events[-1].kv.mod_revision < last:
        remaining = deadline - time.monotonic()
        got = events[-1].kv.mod_revision if events else None
        assert remaining > 0, f"watch reached revision {got}, not {last}"
        response = watch.next(timeout=remaining)
        assert not response.canceled, f"watch canceled after revision {got}: {response.cancel_reason!r}"
        events.extend(response.events)
    return events


def timeline(attempts: list[Attempt], origin: float, ends: int = 12) -> str:
    """The first and last `ends` attempts, in seconds since `origin`, with how each ended."""
    lines = []
    for a in sorted(attempts, key=lambda a: a.started):
        what = f"put {a.key.decode()}" if a.value is not None else "range"
        outcome = f"rev {a.revision}" if a.code is None else f"{a.code.name} {' '.join(str(a.details).split())}"
        lines.append(f"  {a.started - origin:7.2f} .. {a.ended - origin:7.2f}  {what}: {outcome}")
    if len(lines) > 2 * ends:
        lines[ends:-ends] = [f"  ... {len(lines) - 2 * ends} more"]
    return "\n".join(lines)


def describe_gaps(watched: list[int], last: int) -> str:
    seen = set(watched)
    missing = [revision for revision in range(2, last + 1) if revision not in seen]
    out_of_order = [(a, b) for a, b in itertools.pairwise(watched) if b <= a]
    return f"{len(watched)} events up to {last}: missing {missing[:20]}, out of order {out_of_order[:20]}"


CASES = [("postgres", "fast"), ("mysql", "fast"), ("mysql", "crash"), ("nats", "fast"), ("nats", "crash")]


@pytest.mark.parametrize(("kind", "how"), CASES, ids=[f"{kind}-{how}" for kind, how in CASES])
def test_database_outage_under_load(kind: str, how: str, tmp_path: Path) -> None:
    """Writes, reads and a watch span a database restart; pykine keeps running throughout.

    pykine's log and the database's stay in tmp_path (pytest keeps the last few runs').
    """
    server = databases.owned_server(kind)
    pykine = PykineServer(str(tmp_path), endpoint=databases.datastore_url(kind, server.url, "kubernetes_outage"))
    watch: WatchSession | None = None
    load: Load | None = None
    try:
        pykine.start()
        watch = WatchSession(pykine)
        watch.create(key=PREFIX, range_end=PREFIX_END, start_revision=1)
        assert watch.next().created

        load = Load(pykine.address)
        load.start()
        load.wait_for_acks(ACKS_BEFORE, timeout=30)

        server.stop(how)
        down = time.monotonic()
        while time.monotonic() < down + OUTAGE:
            alive(pykine)
            time.sleep(0.5)
        up = time.monotonic()
        server.start()
        answering = time.monotonic()

        recovery, recovery_failures = recover(pykine)
        # Puts started once pykine serves again (ones in flight across that moment do not count).
        load.wait_for_acks(ACKS_AFTER, timeout=30, since=answering + recovery)
        load.stop()

        final = call(pykine, "KV", "Range", pb.RangeRequest(key=PREFIX, range_end=PREFIX_END), timeout=TIMEOUT)
        assert final.ok, final
        last = final.response.header.revision
        events = watched_events(watch, last)
        alive(pykine)
    finally:
        if load is not None:
            load.halt.set()
        if watch is not None:
            watch.close()
        pykine.stop()
        try:
            if server.process is not None:
                server.stop("fast")
        finally:
            shutil.copy(server.log_path, tmp_path / f"{kind}.log")
            server.destroy()

    attempts = load.attempts
    puts = [a for a in attempts if a.value is not None]
    acked = [a for a in puts if a.revision is not None]
    failures = [a for a in attempts + recovery_failures if a.code is not None]
    made_while_down = [a for a in attempts if down <= a.started < up]
    answered_while_down = [a for a in made_while_down if a.ended <= up]
    stored = {kv.key: kv for kv in final.response.kvs}
    took_effect = [a for a in puts if a.revision is None and a.key in stored]
    print(
        f"\n{kind}-{how}: {len(acked)} puts acknowledged, {len(failures)} requests failed; "
        f"database down {up - down:.1f}s, answering {answering - up:.1f}s after its restart; "
        f"{len(made_while_down)} requests made while down, {len(answered_while_down)} of them answered then; "
        f"pykine serving again {recovery:.1f}s later; {len(took_effect)} failed puts took effect; "
        f"watch saw {len(events)} events.\n"
        f"Requests from the outage on (seconds since the database went down):\n"
        f"{timeline([a for a in attempts + recovery_failures if a.ended >= down], down)}"
    )

    # No acknowledged write is lost: each is there, at the revision it was acknowledged with.
    revisions = [a.revision for a in acked]
    assert len(set(revisions)) == len(revisions), "two acknowledged puts were given one revision"
    lost = [a.key for a in acked if a.key not in stored]
    assert not lost, f"{len(lost)} acknowledged puts lost, e.g. {lost[:5]}"
    for a in acked:
        kv = stored[a.key]
        assert (kv.value, kv.mod_revision, kv.create_revision, kv.version) == (a.value, a.revision, a.revision, 1)
    # A failed put may have taken effect (its commit may have reached the database), but only as sent.
    sent = {a.key: a.value for a in puts}
    for key, kv in stored.items():
        assert key.startswith(PREFIX + b"probe/") or sent.get(key) == kv.value, key

    # The watch saw every revision once, in order, before, across and after the outage...
    watched = [event.kv.mod_revision for event in events]
    assert watched == list(range(2, last + 1)), describe_gaps(watched, last)
    assert all(event.type == kv_pb2.Event.PUT for event in events)
    # ...and each is what the store holds (one put per key), so writes that failed but took effect appear too.
    assert {(e.kv.key, e.kv.value, e.kv.mod_revision) for e in events} == {
        (kv.key, kv.value, kv.mod_revision) for kv in stored.values()
    }

    # Checked after what must never go wrong, so a failure here still shows nothing was lost.
    # While it was down: UNAVAILABLE before the deadline, for reads and writes alike, never anything else.
    unexpected = [a for a in failures if a.code != UNAVAILABLE]
    assert not unexpected, (
        f"{len(unexpected)} requests failed with something other than UNAVAILABLE "
        f"(seconds since the database went down):\n{timeline(unexpected, down, ends=4)}"
    )
    assert any(a.value is not None for a in answered_while_down), "no Put was made and answered while down"
    assert any(a.value is None for a in answered_while_down), "no Range was made and answered while down"
    assert all(a.code == UNAVAILABLE for a in answered_while_down)

    # Afterwards: serving again soon, on the same process.
    assert recovery < RECOVERY, (
        f"pykine served again only {recovery:.1f}s after the database did; meanwhile:\n"
        f"{timeline(recovery_failures, down, ends=4)}"
    )
    assert sum(a.started > answering + recovery for a in acked) >= ACKS_AFTER
