"""Watch under load, against a real pykine over gRPC (no etcd needed).

Many writers and watchers at once, a reader that stops reading, RequestProgress
under load, a thousand watches, and delivery latency. Writers own their key
prefixes, so each knows every key's state and predicts the exact events its
writes must produce (revisions come from its responses); that oracle is itself
checked against the datastore's history with KV Range at past revisions.

RSS and latency figures are printed (run with -s) and appended to REPORT_PATH.
"""

from __future__ import annotations

import bisect
import itertools
import queue
import random
import shutil
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
import pytest
from aetcd.rpc import kv_pb2 as mvccpb
from aetcd.rpc import rpc_pb2_grpc as pb_grpc
from harness import PykineServer, WatchSession, pb

REPORT_PATH = "/tmp/pykine-watch-stress-report.txt"
ALL = (b"\x00", b"\x00")  # key and range_end for the whole keyspace
PUT, DELETE = mvccpb.Event.PUT, mvccpb.Event.DELETE
# A reader channel with a fixed, small HTTP/2 window (no BDP growth) on its own
# connection, so a paused reader makes the server's sends block quickly.
PAUSED_READER_OPTIONS = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 65536),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),
]


def report(line: str) -> None:
    """Measurements are for a human (a note), not assertions."""
    print(line, flush=True)
    with open(REPORT_PATH, "a") as out:
        out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


# -- events, as values that compare exactly ----------------------------------------------


class KV(NamedTuple):
    key: bytes
    create_revision: int
    mod_revision: int
    version: int
    value: bytes
    lease: int = 0

    def __repr__(self) -> str:
        value = self.value if len(self.value) <= 24 else self.value[:24] + b"..."
        return f"KV({self.key!r} create={self.create_revision} mod={self.mod_revision} ver={self.version} {value!r})"


class Event(NamedTuple):
    type: int
    kv: KV
    prev: KV | None

    def __repr__(self) -> str:
        kind = "PUT" if self.type == PUT else "DELETE"
        return f"{kind} {self.kv!r} prev={self.prev!r}"


def kv_of(message: Any) -> KV:
    return KV(message.key, message.create_revision, message.mod_revision, message.version, message.value, message.lease)


def event_of(message: Any) -> Event:
    return Event(message.type, kv_of(message.kv), kv_of(message.prev_kv) if message.HasField("prev_kv") else None)


def is_progress(response: Any) -> bool:
    """A RequestProgress answer: watch_id -1, no events, not a create/cancel."""
    return response.watch_id == -1 and not response.created and not response.canceled and not response.events


def is_watcher_progress(response: Any) -> bool:
    """A per-watcher progress notification (progress_notify): no events, not a create/cancel."""
    return response.watch_id >= 0 and not response.created and not response.canceled and not response.events


def describe_mismatch(label: str, expected: list[Event], got: list[Event]) -> str:
    """Enough detail to debug a delivery bug without rerunning."""
    lines = [f"{label}: expected {len(expected)} events, received {len(got)}"]
    first = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), None)
    if first is None:
        first = min(len(expected), len(got))
    lines.append(f"first difference at position {first}:")
    lines.append(f"  expected: {expected[first] if first < len(expected) else '<nothing more>'}")
    lines.append(f"  received: {got[first] if first < len(got) else '<nothing more>'}")
    want = Counter((e.kv.mod_revision, e.kv.key) for e in expected)
    have = Counter((e.kv.mod_revision, e.kv.key) for e in got)
    missing = sorted((want - have).elements())
    extra = sorted((have - want).elements())
    duplicated = sorted(k for k, n in have.items() if n > 1)
    backwards = [i for i in range(1, len(got)) if got[i].kv.mod_revision < got[i - 1].kv.mod_revision]
    wrong = [(e, g) for e, g in zip(expected, got, strict=False) if e != g and e.kv.mod_revision == g.kv.mod_revision]
    if missing:
        lines.append(f"missing (revision, key): {len(missing)}, first {missing[:8]}")
    if extra:
        lines.append(f"unexpected (revision, key): {len(extra)}, first {extra[:8]}")
    if duplicated:
        lines.append(f"received more than once: {len(duplicated)}, first {duplicated[:8]}")
    if backwards:
        at = backwards[0]
        lines.append(
            f"revision went backwards {len(backwards)} times, first at position {at}: "
            f"{got[at - 1].kv.mod_revision} then {got[at].kv.mod_revision}"
        )
    if wrong:
        lines.append(f"same revision, different content: {len(wrong)}, first expected {wrong[0][0]}")
        lines.append(f"                                        received {wrong[0][1]}")
    return "\n".join(lines)


def check_events(label: str, expected: list[Event], got: list[Event]) -> None:
    assert got == expected, describe_mismatch(label, expected, got)


# -- writers that know what their writes must produce -----------------------------------


class ModelWriter:
    """Writes to its own prefix and records the exact events each write must cause.

    Puts, updates, single deletes, range deletes and multi-key txns (with reads
    inside, some taking the failure branch); every write changes something, so
    its response's header revision is the revision of its events.
    """

    def __init__(
        self, server: PykineServer, prefix: bytes, seed: int, keys: int = 8, value_size: int | None = None
    ) -> None:
        self.kv = server.stub("KV")
        self.prefix = prefix
        self.keys = [prefix + b"k%02d" % n for n in range(keys)]
        self.value_size = value_size
        self.rng = random.Random(seed)
        self.state: dict[bytes, KV] = {}
        self.events: list[tuple[int, int, Event]] = []  # (revision, position in revision, event with prev)
        self.writes = 0
        self.last_revision = 0

    def run(self, operations: int | None = None, stop: threading.Event | None = None) -> ModelWriter:
        while (operations is None or self.writes < operations) and not (stop is not None and stop.is_set()):
            self.write_one()
        return self

    def _value(self) -> bytes:
        head = b"%s#%d:" % (self.prefix, self.writes)
        size = self.value_size if self.value_size is not None else self.rng.randint(0, 200)
        return head + self.rng.randbytes(max(0, size - len(head)))

    def write_one(self) -> int:
        roll = self.rng.random()
        existing = [key for key in self.keys if key in self.state]
        low, high = self.prefix + b"k02", self.prefix + b"k05"
        in_range = [key for key in existing if low <= key < high]
        if roll < 0.45 or not existing:
            key, value = self.rng.choice(self.keys), self._value()
            response = self.kv.Put(pb.PutRequest(key=key, value=value), timeout=60)
            revision = self._record(response.header.revision, [(PUT, key, value)])
        elif roll < 0.6:
            key = self.rng.choice(existing)
            response = self.kv.DeleteRange(pb.DeleteRangeRequest(key=key), timeout=60)
            assert response.deleted == 1, f"delete of {key!r} deleted {response.deleted}"
            revision = self._record(response.header.revision, [(DELETE, key, b"")])
        elif roll < 0.68 and in_range:
            response = self.kv.DeleteRange(pb.DeleteRangeRequest(key=low, range_end=high), timeout=60)
            assert response.deleted == len(in_range), f"range delete deleted {response.deleted}, not {len(in_range)}"
            revision = self._record(response.header.revision, [(DELETE, key, b"") for key in in_range])
        else:
            revision = self._txn(existing)
        self.writes += 1
        return revision

    def _txn(self, existing: list[bytes]) -> int:
        chosen = self.rng.sample(self.keys, self.rng.randint(2, 4))
        ops: list[pb.RequestOp] = []
        changes: list[tuple[int, bytes, bytes]] = []
        for key in chosen:
            if key in existing and self.rng.random() < 0.3:
                ops.append(pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key)))
                changes.append((DELETE, key, b""))
            else:
                value = self._value()
                ops.append(pb.RequestOp(request_put=pb.PutRequest(key=key, value=value)))
                changes.append((PUT, key, value))
        if self.rng.random() < 0.3:
            read = pb.RangeRequest(key=self.prefix, range_end=prefix_end(self.prefix))
            ops.insert(self.rng.randint(0, len(ops)), pb.RequestOp(request_range=read))
        guard = chosen[0]
        version = self.state[guard].version if guard in self.state else 0
        succeed = self.rng.random() < 0.75
        compare = pb.Compare(
            key=guard,
            target=pb.Compare.VERSION,
            result=pb.Compare.EQUAL,
            version=version if succeed else version + 1000,
        )
        request = pb.TxnRequest(compare=[compare], success=ops if succeed else [], failure=[] if succeed else ops)
        response = self.kv.Txn(request, timeout=60)
        assert response.succeeded == succeed, f"txn on {guard!r} version {version}: succeeded={response.succeeded}"
        return self._record(response.header.revision, changes)

    def _record(self, revision: int, changes: list[tuple[int, bytes, bytes]]) -> int:
        assert revision > self.last_revision, f"{self.prefix!r}: revision {revision} after {self.last_revision}"
        for position, (kind, key, value) in enumerate(changes):
            before = self.state.get(key)
            if kind == PUT:
                after = KV(
                    key,
                    before.create_revision if before else revision,
                    revision,
                    before.version + 1 if before else 1,
                    value,
                )
                self.state[key] = after
                self.events.append((revision, position, Event(PUT, after, before)))
            else:
                assert before is not None
                del self.state[key]
                self.events.append((revision, position, Event(DELETE, KV(key, 0, revision, 0, b""), before)))
        self.last_revision = revision
        return revision


def merged_events(writers: Iterable[ModelWriter]) -> list[Event]:
    """Every writer's events in revision order (and txn order within a revision)."""
    owner: dict[int, bytes] = {}
    everything: list[tuple[int, int, Event]] = []
    for writer in writers:
        for revision, position, event in writer.events:
            assert owner.setdefault(revision, writer.prefix) == writer.prefix, (
                f"revision {revision} was reported to two writers: {owner[revision]!r} and {writer.prefix!r}"
            )
            everything.append((revision, position, event))
    everything.sort(key=lambda item: (item[0], item[1]))
    return [event for _, _, event in everything]


def check_model_against_history(server: PykineServer, events: list[Event], revisions: Iterable[int]) -> None:
    """The oracle must match the datastore: replay it and compare with KV Range at past revisions."""
    kv = server.stub("KV")
    state: dict[bytes, KV] = {}
    position = 0
    for revision in sorted(set(revisions)):
        while position < len(events) and events[position].kv.mod_revision <= revision:
            event = events[position]
            if event.type == PUT:
                state[event.kv.key] = event.kv
            else:
                state.pop(event.kv.key, None)
            position += 1
        response = kv.Range(pb.RangeRequest(key=ALL[0], range_end=ALL[1], revision=revision), timeout=60)
        got = [kv_of(item) for item in response.kvs]
        want = [state[key] for key in sorted(state)]
        assert got == want, describe_mismatch(
            f"KV Range at revision {revision} vs the writers' model",
            [Event(PUT, item, None) for item in want],
            [Event(PUT, item, None) for item in got],
        )


# -- watchers ------------------------------------------------------------------------------


@dataclass
class WatchSpec:
    key: bytes
    range_end: bytes
    prev_kv: bool
    start_revision: int = 0  # 0: from the revision after the created response's header

    def matches(self, key: bytes) -> bool:
        if self.range_end == b"\x00":
            return key >= self.key
        if not self.range_end:
            return key == self.key
        return self.key <= key < self.range_end

    def request(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "range_end": self.range_end,
            "prev_kv": self.prev_kv,
            "start_revision": self.start_revision,
        }

    def expected(self, events: list[Event], start: int) -> list[Event]:
        return [
            event if self.prev_kv else event._replace(prev=None)
            for event in events
            if event.kv.mod_revision >= start and self.matches(event.kv.key)
        ]


class PausableWatch:
    """A Watch stream whose reader thread pulls from gRPC only while reading is allowed.

    harness.WatchSession drains the call into an unbounded queue, so the server
    never feels a slow client. Here, while paused, nothing calls next() on the
    call: the HTTP/2 window fills and the server's sends really block. Each
    response is stamped with its arrival time.
    """

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._call = pb_grpc.WatchStub(channel).Watch(self._feed())
        self._allowed = threading.Event()
        self._allowed.set()
        self._changed = threading.Condition()
        self._closing = False
        self.received: list[tuple[float, Any]] = []
        self.event_count = 0
        self.progress_count = 0
        self.created_count = 0
        self.error: grpc.RpcError | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _feed(self) -> Iterator[Any]:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            while True:
                self._allowed.wait()
                response = next(self._call)
                arrived = time.perf_counter()
                with self._changed:
                    self.received.append((arrived, response))
                    self.event_count += len(response.events)
                    self.progress_count += is_progress(response)
                    self.created_count += response.created
                    self._changed.notify_all()
        except StopIteration:
            pass
        except grpc.RpcError as error:
            with self._changed:
                self.error = error
                self._changed.notify_all()

    def create(self, **options: Any) -> None:
        self._requests.put(pb.WatchRequest(create_request=pb.WatchCreateRequest(**options)))

    def request_progress(self) -> None:
        self._requests.put(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))

    def pause(self) -> None:
        self._allowed.clear()

    def resume(self) -> None:
        self._allowed.set()

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait for condition (evaluated under the lock); a broken stream fails the test."""
        with self._changed:
            met = self._changed.wait_for(lambda: self.error is not None or condition(), timeout)
            if self.error is not None and not self._closing:
                raise AssertionError(f"watch stream failed: {self.error.code()} {self.error.details()}")
            return bool(met)

    def count_received(self) -> int:
        with self._changed:
            return len(self.received)

    def responses(self) -> list[Any]:
        with self._changed:
            return [response for _, response in self.received]

    def close(self) -> None:
        self._closing = True
        self._call.cancel()
        self._allowed.set()
        self._requests.put(None)


def collect_until_progress(sessions: list[WatchSession], revision: int, timeout: float = 60) -> list[list[Any]]:
    """Everything on each stream up to a RequestProgress answer at >= revision, plus stragglers."""
    for session in sessions:
        session.request_progress()
    collected: list[list[Any]] = []
    deadline = time.monotonic() + timeout
    for session in sessions:
        responses: list[Any] = []
        while True:
            response = session.next(timeout=max(0.1, deadline - time.monotonic()))
            responses.append(response)
            if is_progress(response):
                assert response.header.revision >= revision, (
                    f"progress at {response.header.revision} after every write up to {revision} was acknowledged"
                )
                break
        collected.append(responses)
    time.sleep(0.5)  # anything sent twice or late would arrive now
    for session, responses in zip(sessions, collected, strict=True):
        responses += session.drain(quiet=0.05)
    return collected


def events_by_watcher(responses: list[Any]) -> dict[int, list[tuple[int, Event]]]:
    """watch_id -> [(index of the response that carried it, event)] in arrival order."""
    seen: dict[int, list[tuple[int, Event]]] = defaultdict(list)
    for index, response in enumerate(responses):
        for message in response.events:
            seen[response.watch_id].append((index, event_of(message)))
    return seen


def check_revisions_not_split(label: str, carried: list[tuple[int, Event]]) -> None:
    """All of one revision's events (one txn) must come in a single response."""
    responses_of: dict[int, set[int]] = defaultdict(set)
    for index, event in carried:
        responses_of[event.kv.mod_revision].add(index)
    split = {revision: sorted(indexes) for revision, indexes in responses_of.items() if len(indexes) > 1}
    assert not split, f"{label}: events of one revision split across responses (revision: response indexes): {split}"


def check_headers(label: str, responses: list[Any]) -> None:
    """A response's header revision is never older than the events it carries, and no watch is cancelled."""
    for index, response in enumerate(responses):
        assert not response.canceled, f"{label}: watch {response.watch_id} cancelled at response {index}: {response}"
        if response.events:
            newest = max(event.kv.mod_revision for event in response.events)
            assert response.header.revision >= newest, (
                f"{label}: response {index} (watch {response.watch_id}) has header revision "
                f"{response.header.revision} but carries revision {newest}"
            )


# -- fixtures ------------------------------------------------------------------------------


class RunningPykine:
    """A pykine on a free loopback port in its own directory, stopped and removed on exit."""

    def __init__(self, *args: str) -> None:
        self.workdir = tempfile.mkdtemp(prefix="pykine-watch-stress-")
        self.server = PykineServer(self.workdir, *args)

    def __enter__(self) -> PykineServer:
        try:
            self.server.start()
        except BaseException:
            self.__exit__()
            raise
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def pykine() -> Iterator[PykineServer]:
    """A fresh pykine per test: ring, RSS and revisions start clean."""
    with RunningPykine() as server:
        yield server


def run_writers(writers: list[ModelWriter], operations: int, bound: float) -> None:
    """Run every writer to completion; if they do not finish within bound, fail instead of hanging."""
    pool = ThreadPoolExecutor(len(writers))
    futures = [pool.submit(writer.run, operations) for writer in writers]
    _, pending = wait(futures, timeout=bound)
    if pending:
        pool.shutdown(wait=False, cancel_futures=True)
        done = sum(writer.writes for writer in writers)
        pytest.fail(f"writers did not finish {len(writers) * operations} writes within {bound}s (done: {done})")
    pool.shutdown()
    for future in futures:
        future.result()


# -- 1. many writers, many watchers ----------------------------------------------------------


def test_many_writers_and_watchers_see_every_event_exactly_once(pykine: PykineServer) -> None:
    """50 watchers on 10 streams, some joining mid-run from the past, all see exactly their history."""
    writer_count, operations, streams_count = 10, 200, 10
    writers = [ModelWriter(pykine, b"w%02d/" % n, seed=1000 + n) for n in range(writer_count)]
    prefixes = [(writer.prefix, prefix_end(writer.prefix)) for writer in writers]
    rng = random.Random(7)
    sessions = [WatchSession(pykine) for _ in range(streams_count)]
    specs: list[list[WatchSpec]] = [[] for _ in sessions]
    early: list[list[Any]] = [[] for _ in sessions]  # responses read before the writes
    try:
        for s, session in enumerate(sessions):
            specs[s] += [
                WatchSpec(*prefixes[s % writer_count], prev_kv=False),
                WatchSpec(*prefixes[(s + 1) % writer_count], prev_kv=True),
                WatchSpec(*ALL, prev_kv=s % 2 == 0),
            ]
            for spec in specs[s]:
                session.create(**spec.request())
                early[s].append(session.next())
                assert early[s][-1].created

        pool = ThreadPoolExecutor(writer_count)
        futures = [pool.submit(writer.run, operations) for writer in writers]
        # Mid-run: watchers that start in the past while the writes go on.
        while sum(writer.writes for writer in writers) < writer_count * operations * 0.4:
            assert not any(future.done() and future.exception() for future in futures)
            time.sleep(0.01)
        now = max(writer.last_revision for writer in writers)
        for s, session in enumerate(sessions):
            starts = [1, now] if s == 0 else [now, 0] if s == 9 else [rng.randint(2, now), rng.randint(2, now)]
            late = [
                WatchSpec(*prefixes[(s + 3) % writer_count], prev_kv=s % 3 == 0, start_revision=starts[0]),
                WatchSpec(*ALL, prev_kv=s % 2 == 1, start_revision=starts[1]),
            ]
            specs[s] += late
            for spec in late:
                session.create(**spec.request())
        for future in futures:
            future.result(timeout=120)
        pool.shutdown()

        events = merged_events(writers)
        final = max(writer.last_revision for writer in writers)
        assert len({event.kv.mod_revision for event in events}) == writer_count * operations
        sample = random.Random(3).sample(range(1, final + 1), 30)
        check_model_against_history(pykine, events, [*sample, final])

        for s, rest in enumerate(collect_until_progress(sessions, final)):
            responses = early[s] + rest
            check_headers(f"stream {s}", responses)
            created = [response for response in responses if response.created]
            assert len(created) == len(specs[s]), f"stream {s}: {len(created)} created responses for {len(specs[s])}"
            carried = events_by_watcher(responses)
            for spec, response in zip(specs[s], created, strict=True):
                watch_id = response.watch_id
                start = spec.start_revision or response.header.revision + 1
                label = f"stream {s} watch {watch_id} ({spec.key!r}..{spec.range_end!r} from {start}"
                label += f", prev_kv={spec.prev_kv})"
                expected = spec.expected(events, start)
                check_events(label, expected, [event for _, event in carried.get(watch_id, [])])
                check_revisions_not_split(label, carried.get(watch_id, []))
            assert set(carried) <= {response.watch_id for response in created}
    finally:
        for session in sessions:
            session.close()


# -- 2. a reader that stops reading ------------------------------------------------------------


def test_paused_reader_does_not_stall_writers_and_catches_up_from_history(pykine: PykineServer) -> None:
    """15,000 writes finish while one stream is not read; it then gets every event once, in order."""
    writer_count, operations = 8, 1875
    channel = grpc.insecure_channel(pykine.address, options=PAUSED_READER_OPTIONS)
    slow = PausableWatch(channel)
    try:
        specs = [WatchSpec(*ALL, prev_kv=True), WatchSpec(b"s3/", b"s30", prev_kv=False)]
        for spec in specs:
            slow.create(**spec.request())
        assert slow.wait_until(lambda: slow.created_count == 2, 10), "watches not created"
        created = [response for response in slow.responses() if response.created]
        slow.pause()

        writers = [
            ModelWriter(pykine, b"s%d/" % n, seed=2000 + n, keys=16, value_size=1024) for n in range(writer_count)
        ]
        started = time.monotonic()
        run_writers(writers, operations, bound=150)
        writing = time.monotonic() - started
        read_while_paused = len(slow.received)
        events = merged_events(writers)
        final = max(writer.last_revision for writer in writers)
        check_model_against_history(pykine, events, random.Random(5).sample(range(1, final + 1), 10))

        slow.resume()
        started = time.monotonic()
        total = sum(
            len(spec.expected(events, response.header.revision + 1))
            for spec, response in zip(specs, created, strict=True)
        )
        slow.wait_until(lambda: slow.event_count >= total, 120)
        slow.request_progress()
        slow.wait_until(lambda: slow.progress_count >= 1, 60)
        time.sleep(0.5)  # anything sent twice would arrive now
        catching_up = time.monotonic() - started

        responses = slow.responses()
        check_headers("paused stream", responses)
        carried = events_by_watcher(responses)
        for spec, response in zip(specs, created, strict=True):
            label = f"paused stream watch {response.watch_id} ({spec.key!r}..{spec.range_end!r})"
            expected = spec.expected(events, response.header.revision + 1)
            check_events(label, expected, [event for _, event in carried.get(response.watch_id, [])])
            check_revisions_not_split(label, carried.get(response.watch_id, []))
        batches = [len({event.kv.mod_revision for event in r.events}) for r in responses if r.events]
        report(
            f"paused reader: {writer_count * operations} writes in {writing:.1f}s "
            f"({writer_count * operations / writing:.0f}/s) while {read_while_paused} responses had been read; "
            f"caught up {total} events in {catching_up:.1f}s over {len(batches)} responses "
            f"(most revisions in one response: {max(batches)}; multi-revision responses: "
            f"{sum(n > 1 for n in batches)})"
        )
    finally:
        slow.close()
        channel.close()


# -- 3. progress under load ------------------------------------------------------------------


def progress_violations(
    responses: list[Any],
    expected: dict[int, list[int]],
    counts_as_progress: Callable[[Any], list[int]],
) -> tuple[list[tuple[int, str]], list[int]]:
    """Check each progress response at P against what its watchers had received before it.

    expected: watch_id -> sorted revisions of the events it must get (one per event).
    counts_as_progress(response) -> the watch ids the response vouches for ([] if not progress).
    Returns ([(watch_id of the early response, description)], progress revisions in arrival order).
    """
    received: Counter[int] = Counter()
    newest_event = 0
    violations: list[tuple[int, str]] = []
    revisions: list[int] = []
    for index, response in enumerate(responses):
        for event in response.events:
            newest_event = max(newest_event, event.kv.mod_revision)
        received[response.watch_id] += len(response.events)
        vouched = counts_as_progress(response)
        if not vouched:
            continue
        revision = response.header.revision
        revisions.append(revision)
        if revision < newest_event:
            violations.append(
                (response.watch_id, f"response {index}: progress at {revision} after an event at {newest_event}")
            )
        for watch_id in vouched:
            due = bisect.bisect_right(expected[watch_id], revision)
            if received[watch_id] < due:
                missing = expected[watch_id][received[watch_id] : due]
                violations.append(
                    (
                        response.watch_id,
                        f"response {index} (watch_id {response.watch_id}): progress at revision {revision}, but watch "
                        f"{watch_id} had received {received[watch_id]} of the {due} events at <= {revision}; "
                        f"not yet sent: revisions {missing[:8]}{' ...' if len(missing) > 8 else ''}",
                    )
                )
    return violations, revisions


def start_continuous_writers(
    server: PykineServer, prefixes: list[bytes], stop: threading.Event
) -> tuple[list[ModelWriter], ThreadPoolExecutor, list[Any]]:
    writers = [ModelWriter(server, prefix, seed=3000 + n) for n, prefix in enumerate(prefixes)]
    pool = ThreadPoolExecutor(len(writers))
    return writers, pool, [pool.submit(writer.run, None, stop) for writer in writers]


def stop_writers_then_progress(
    watch: Any, stop: threading.Event, futures: list[Any], pool: Any, writers: list[Any]
) -> int:
    """Stop the writers, then ask for progress once more; returns the last revision written."""
    stop.set()
    for future in futures:
        future.result(timeout=60)
    pool.shutdown()
    answered = watch.progress_count
    watch.request_progress()
    assert watch.wait_until(lambda: watch.progress_count > answered, 30), "final RequestProgress not answered"
    time.sleep(0.3)
    return max(writer.last_revision for writer in writers)


def check_stream(
    name: str, specs: list[WatchSpec], created: list[Any], responses: list[Any], writers: list[Any]
) -> tuple[dict[int, list[int]], list[Any]]:
    """Every watcher of the stream got exactly its expected events; returns their revisions per watch id."""
    check_headers(name, responses)
    events = merged_events(writers)
    carried = events_by_watcher(responses)
    expected_revisions: dict[int, list[int]] = {}
    for spec, response in zip(specs, created, strict=True):
        expected = spec.expected(events, response.header.revision + 1)
        label = f"{name} watch {response.watch_id} ({spec.key!r}..{spec.range_end!r})"
        check_events(label, expected, [event for _, event in carried.get(response.watch_id, [])])
        expected_revisions[response.watch_id] = [event.kv.mod_revision for event in expected]
    return expected_revisions, events


@pytest.mark.pykine_engine
def test_request_progress_under_load_only_reports_delivered_revisions(pykine: PykineServer) -> None:
    """Every RequestProgress answer at P comes after every watched event at <= P, and P never goes back."""
    watch = PausableWatch(pykine.channel)
    stop = threading.Event()
    futures: list[Any] = []
    try:
        specs = [WatchSpec(b"p/", b"p0", prev_kv=False), WatchSpec(b"q/", b"q0", prev_kv=True)]
        for spec in specs:
            watch.create(**spec.request())
        assert watch.wait_until(lambda: watch.created_count == 2, 10), "watches not created"
        created = [response for response in watch.responses() if response.created]

        prefixes = [b"p/0/", b"p/1/", b"p/2/", b"q/0/", b"z/0/"]  # z/ is watched by nobody
        writers, pool, futures = start_continuous_writers(pykine, prefixes, stop)
        while sum(writer.writes for writer in writers) < 100:
            time.sleep(0.005)

        lockstep, burst = 200, 200
        for n in range(lockstep):
            answered = watch.progress_count
            watch.request_progress()
            assert watch.wait_until(lambda answered=answered: watch.progress_count > answered, 30), (
                f"RequestProgress #{n} not answered within 30s under load "
                f"(writes so far: {sum(writer.writes for writer in writers)})"
            )
            time.sleep(0.003)
        before_burst = watch.progress_count
        for _ in range(burst - 1):
            watch.request_progress()
            time.sleep(0.002)
        before_last = watch.count_received()  # the last request's answer can only come after this
        watch.request_progress()
        assert watch.wait_until(
            lambda: any(is_progress(response) for _, response in watch.received[before_last:]), 30
        ), f"the last of a burst of {burst} RequestProgress was not answered within 30s"
        time.sleep(0.3)
        burst_answers = watch.progress_count - before_burst

        final = stop_writers_then_progress(watch, stop, futures, pool, writers)

        responses = watch.responses()
        expected_revisions, events = check_stream("progress stream", specs, created, responses, writers)

        ids = list(expected_revisions)
        violations, revisions = progress_violations(
            responses, expected_revisions, lambda r: ids if is_progress(r) else []
        )
        report(
            f"request progress: {len(revisions)} answers to {lockstep + burst + 1} requests "
            f"({burst_answers} to a burst of {burst}); {sum(len(r) for r in expected_revisions.values())} watched "
            f"events of {len(events)} writes; final revision {final}"
        )
        assert not violations, f"{len(violations)} progress answers came too early:\n" + "\n".join(
            text for _, text in violations[:10]
        )
        backwards = [(a, b) for a, b in itertools.pairwise(revisions) if b < a]
        assert not backwards, f"progress revision went backwards: {backwards[:10]}"
        assert revisions[-1] >= final, f"last progress at {revisions[-1]}, after writes up to {final}"
        # A burst may be answered with fewer responses (etcd 3.5 also coalesces while a stream catches up),
        # but never with more than were asked for.
        assert 1 <= burst_answers <= burst
        assert len(revisions) <= lockstep + burst + 1, f"{len(revisions)} progress responses to {lockstep + burst + 1}"
    finally:
        stop.set()
        for future in futures:
            future.exception(timeout=60)
        watch.close()


def test_progress_notify_under_load_only_reports_delivered_revisions() -> None:
    """Per-watcher progress notifications (progress_notify) must also never run ahead of that watcher's events."""
    with RunningPykine("--watch-progress-notify-interval=5ms") as server:
        watch = PausableWatch(server.channel)
        stop = threading.Event()
        futures: list[Any] = []
        try:
            specs = [WatchSpec(b"%c/" % c, b"%c0" % c, prev_kv=c == ord("q")) for c in b"pqr"]
            for spec in specs:
                watch.create(**spec.request(), progress_notify=True)
            assert watch.wait_until(lambda: watch.created_count == 3, 10), "watches not created"
            created = [response for response in watch.responses() if response.created]
            prefixes = [b"p/0/", b"p/1/", b"q/0/", b"r/0/", b"z/0/"]
            writers, pool, futures = start_continuous_writers(server, prefixes, stop)
            time.sleep(4)
            final = stop_writers_then_progress(watch, stop, futures, pool, writers)

            responses = watch.responses()
            expected_revisions, events = check_stream("progress_notify stream", specs, created, responses, writers)

            violations, _ = progress_violations(
                responses, expected_revisions, lambda r: [r.watch_id] if is_watcher_progress(r) else []
            )
            notified = Counter(r.watch_id for r in responses if is_watcher_progress(r))
            report(
                f"progress_notify: {sum(notified.values())} notifications {dict(notified)} during "
                f"{len(events)} writes up to revision {final}"
            )
            early = Counter(watch_id for watch_id, _ in violations)
            assert not violations, (
                f"{len(violations)} progress notifications came too early (per watch id: {dict(early)}; "
                f"notifications per watch id: {dict(notified)}):\n" + "\n".join(text for _, text in violations[:10])
            )
            for watch_id in expected_revisions:
                revisions = [r.header.revision for r in responses if is_watcher_progress(r) and r.watch_id == watch_id]
                assert revisions, f"watch {watch_id} got no progress notification in 4s at a 5ms interval"
                backwards = [(a, b) for a, b in itertools.pairwise(revisions) if b < a]
                assert not backwards, f"watch {watch_id}: progress revision went backwards: {backwards[:10]}"
        finally:
            stop.set()
            for future in futures:
                future.exception(timeout=60)
            watch.close()


# -- 4. a thousand watches ---------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def test_thousand_watches_stay_healthy_and_all_get_events(pykine: PykineServer) -> None:
    """1,000 watches on 20 streams: the server keeps answering and every watch gets each event."""
    assert pykine.process is not None
    pid = pykine.process.pid
    before = memory_kib(pid)
    sessions = [WatchSession(pykine) for _ in range(20)]
    try:
        shapes = [
            WatchSpec(b"m/", b"m0", prev_kv=False),
            WatchSpec(*ALL, prev_kv=False),
            WatchSpec(b"m/x", b"", prev_kv=False),
            WatchSpec(b"m/", b"m0", prev_kv=True),
        ]
        specs = [[shapes[(s + n) % len(shapes)] for n in range(50)] for s in range(len(sessions))]
        for session, stream_specs in zip(sessions, specs, strict=True):
            for spec in stream_specs:
                session.create(**spec.request())
        ids: list[list[int]] = []
        for s, session in enumerate(sessions):
            created = [session.next(timeout=30) for _ in range(50)]
            assert all(r.created and not r.canceled for r in created), f"stream {s}: {created}"
            ids.append([r.watch_id for r in created])
            assert len(set(ids[-1])) == 50
        with_watches = memory_kib(pid)

        kv = pykine.stub("KV")
        first = kv.Put(pb.PutRequest(key=b"m/x", value=b"one"), timeout=30).header.revision
        second = kv.Put(pb.PutRequest(key=b"m/x", value=b"two"), timeout=30).header.revision
        one = KV(b"m/x", first, first, 1, b"one")
        two = KV(b"m/x", first, second, 2, b"two")
        for s, responses in enumerate(collect_until_progress(sessions, second)):
            carried = events_by_watcher(responses)
            for watch_id, spec in zip(ids[s], specs[s], strict=True):
                expected = [Event(PUT, one, None), Event(PUT, two, one if spec.prev_kv else None)]
                check_events(f"stream {s} watch {watch_id}", expected, [event for _, event in carried[watch_id]])
        after = memory_kib(pid)

        status = pykine.stub("Maintenance").Status(pb.StatusRequest(), timeout=10)
        assert status.header.revision == second
        listing = kv.Range(pb.RangeRequest(key=b"m/x"), timeout=10)
        assert [kv_of(item) for item in listing.kvs] == [two]
        report(
            f"memory: server RSS {before['VmRSS']} KiB at start, {with_watches['VmRSS']} KiB with 1,000 watches "
            f"on 20 streams, {after['VmRSS']} KiB after delivering 2 events to each (peak {after['VmHWM']} KiB)"
        )
    finally:
        for session in sessions:
            session.close()


# -- 5. delivery latency ---------------------------------------------------------------------


def test_delivery_latency_report(pykine: PykineServer) -> None:
    """Measure (not assert) writer-response-to-watcher-receipt latency at about 1,000 writes/s."""
    rate, seconds, threads = 1000, 5.0, 8
    total = int(rate * seconds)
    watch = PausableWatch(pykine.channel)
    try:
        watch.create(key=b"lat/", range_end=b"lat0")
        assert watch.wait_until(lambda: watch.created_count == 1, 10), "watch not created"
        kv = pykine.stub("KV")
        answered: dict[int, float] = {}
        started = time.perf_counter() + 0.1

        def write(thread: int) -> None:
            for n in range(thread, total, threads):
                delay = started + n / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                key = b"lat/%d/%d" % (thread, n % 32)
                revision = kv.Put(pb.PutRequest(key=key, value=b"v" * 100), timeout=30).header.revision
                answered[revision] = time.perf_counter()

        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(write, t) for t in range(threads)]:
                future.result()
        elapsed = max(answered.values()) - started
        assert watch.wait_until(lambda: watch.event_count >= total, 60), (
            f"watcher got {watch.event_count} of {total} events"
        )
        arrived: dict[int, float] = {}
        for at, response in list(watch.received):
            for event in response.events:
                assert event.kv.mod_revision not in arrived, f"revision {event.kv.mod_revision} delivered twice"
                arrived[event.kv.mod_revision] = at
        assert set(arrived) == set(answered)
        latencies = sorted((arrived[revision] - answered[revision]) * 1000 for revision in answered)

        def quantile(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

        report(
            f"latency: {total} writes in {elapsed:.2f}s ({total / elapsed:.0f}/s, {threads} writer threads); "
            f"watcher receipt minus writer response: p50 {quantile(0.5):.2f} ms, p90 {quantile(0.9):.2f} ms, "
            f"p99 {quantile(0.99):.2f} ms, max {latencies[-1]:.2f} ms, min {latencies[0]:.2f} ms"
        )
    finally:
        watch.close()
