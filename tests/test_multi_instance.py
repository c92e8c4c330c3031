"""Three pykine processes on one PostgreSQL or MySQL database, a 3-node NATS cluster or one dqlite cluster
(a node in each process) behave like one etcd.

Several instances behind a load balancer are how pykine scales out, so this
drives three of them at once from many threads and checks what a single etcd
guarantees:

- every watcher, on every instance, sees one identical, gap-free sequence of
  events that matches what the writers were told;
- every acknowledged write is in the history exactly once and nothing else is;
- the history is linearizable: compare-and-swap updates racing on shared keys
  through different instances have exactly one winner per revision, revision
  order respects real time, and every read and failed compare saw a state the
  key really had during the call (checker below);
- a lease's keys are deleted once, however many instances could expire it.

It also prints how long a commit through one instance takes to reach watchers
on the others (no assertion: a benchmark is not a test).
"""

from __future__ import annotations

import math
import os
import queue
import random
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import databases
import grpc
import pytest
from harness import KeepAliveStream, PykineServer, WatchSession, call, pb
from natscluster import NatsCluster

INSTANCES = 3
THREADS_PER_INSTANCE = 3
ITERATIONS_PER_THREAD = 110  # with CAS_SHARE, about 9 * 110 * 1.5 = 1.5k requests
CAS_SHARE = 0.5
PLAIN_KEYS_PER_THREAD = 15  # each thread rewrites its own keys, so versions grow
COUNTERS = [b"m/c/%d" % n for n in range(3)]
LEASE_KEYS = [b"m/l/%d" % n for n in range(3)]
LATENCY_PUTS = 200
PREFIX, PREFIX_END = b"m/", b"m0"
# Bound for anything that waits on delivery or expiry: far above any sane delay, only hit on failure.
BOUND = 20.0
PUT, DELETE = 0, 1
NEVER = math.inf


# -- what the watchers saw -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One watch event; `fields` is what must be identical on every instance."""

    arrived_ns: int
    type: int
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int

    @property
    def fields(self) -> tuple[Any, ...]:
        return (self.type, self.key, self.value, self.mod_revision, self.create_revision, self.version, self.lease)


class EventLog:
    """One watch on the test prefix, drained by a thread of its own.

    The thread stamps each response with its arrival time as it comes off the
    stream, so latencies are not inflated by the test waiting on another log.
    """

    def __init__(self, server: PykineServer, start_revision: int) -> None:
        self.server = server
        self.watch = WatchSession(server)
        self.watch.create(key=PREFIX, range_end=PREFIX_END, start_revision=start_revision)
        created = self.watch.next(timeout=BOUND)
        assert created.created and not created.canceled, created
        self.events: list[Event] = []
        self.arrivals: dict[int, int] = {}  # revision -> when its first event arrived
        self.failure: str | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed:
            try:
                response = self.watch.responses.get(timeout=0.2)
            except queue.Empty:
                continue
            now = time.monotonic_ns()
            with self._changed:
                if self._closed:
                    return
                if isinstance(response, grpc.RpcError):
                    self.failure = f"watch stream failed: {response.code()} {response.details()}"
                elif response.canceled:
                    self.failure = f"watch canceled: {response}"
                for e in [] if self.failure else response.events:
                    kv = e.kv
                    self.events.append(
                        Event(now, e.type, kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version, kv.lease)
                    )
                    self.arrivals.setdefault(kv.mod_revision, now)
                self._changed.notify_all()
                if self.failure:
                    return

    def wait(self, done: Callable[[list[Event]], bool], what: str, timeout: float = BOUND) -> list[Event]:
        """A copy of the events once `done(events)` holds; fails the test if it does not in time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done(self.events):
                assert self.failure is None, f"{self.server.log_path}: {self.failure}"
                left = deadline - time.monotonic()
                assert left > 0, f"{self.server.log_path}: no {what} within {timeout}s; last {self.events[-3:]}"
                self._changed.wait(left)
            return list(self.events)

    def through(self, revision: int) -> list[Event]:
        """Every event up to `revision`, once it has arrived."""
        events = self.wait(lambda got: bool(got) and got[-1].mod_revision >= revision, f"event at {revision}")
        return [event for event in events if event.mod_revision <= revision]

    def arrival(self, revision: int) -> int:
        self.wait(lambda _: revision in self.arrivals, f"event at {revision}")
        return self.arrivals[revision]

    def close(self) -> None:
        with self._changed:
            self._closed = True
        self.watch.close()


# -- what the clients did --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Op:
    """One client call as the client saw it: interval, request and answer."""

    kind: str  # "put", "cas" (a Txn) or "read" (a Range)
    instance: int
    worker: str
    key: bytes
    value: bytes  # unique per write, so events map back to ops
    invoked: int
    completed: int
    outcome: str  # "ok", "failed" (the compare did not hold) or "error" (unknown: may or may not have applied)
    revision: int = 0  # header.revision; for an applied write, its mod_revision
    compared: int = -1  # cas: the mod_revision it required
    observed: int = -1  # read and failed cas: the key's mod_revision in the answer (0: absent)
    detail: str = ""

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.key.decode()}={self.value.decode()} via {self.instance}/{self.worker}"
            f" [{self.invoked}..{self.completed}] {self.outcome} rev={self.revision}"
            f" compared={self.compared} observed={self.observed} {self.detail}"
        )


def timed(op: Op, send: Callable[[], Any]) -> Any:
    """Run one call, recording its interval and any error on `op`."""
    op.invoked = time.monotonic_ns()
    try:
        response = send()
    except grpc.RpcError as error:
        op.completed = time.monotonic_ns()
        op.outcome, op.detail = "error", f"{error.code()} {error.details()}"
        return None
    op.completed = time.monotonic_ns()
    op.revision = response.header.revision
    return response


def run_worker(kv: Any, instance: int, worker: str, seed: int, ops: list[Op], lock: threading.Lock) -> None:
    """Plain puts to the worker's own keys, and read-then-CAS updates of the shared counters."""
    rng = random.Random(seed)
    mine: list[Op] = []
    for seq in range(ITERATIONS_PER_THREAD):
        value = f"{worker}.{seq}".encode()
        if rng.random() >= CAS_SHARE:
            key = f"m/p/{worker}/{seq % PLAIN_KEYS_PER_THREAD}".encode()
            op = Op("put", instance, worker, key, value, 0, 0, "ok")
            timed(op, lambda k=key, v=value: kv.Put(pb.PutRequest(key=k, value=v), timeout=30))
            mine.append(op)
            continue
        key = rng.choice(COUNTERS)
        read = Op("read", instance, worker, key, b"", 0, 0, "ok")
        got = timed(read, lambda k=key: kv.Range(pb.RangeRequest(key=k), timeout=30))
        mine.append(read)
        if got is None:
            continue
        read.observed = got.kvs[0].mod_revision if got.kvs else 0
        cas = Op("cas", instance, worker, key, value, 0, 0, "ok", compared=read.observed)
        request = pb.TxnRequest(
            compare=[pb.Compare(key=key, target=pb.Compare.MOD, result=pb.Compare.EQUAL, mod_revision=cas.compared)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=value))],
            failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key))],
        )
        answer = timed(cas, lambda r=request: kv.Txn(r, timeout=30))
        if answer is not None and not answer.succeeded:
            cas.outcome = "failed"
            kvs = answer.responses[0].response_range.kvs
            cas.observed = kvs[0].mod_revision if kvs else 0
        mine.append(cas)
    with lock:
        ops.extend(mine)


# -- the checks --------------------------------------------------------------------------------------------------


def match_history(ops: list[Op], history: list[Event]) -> dict[int, int]:
    """Map each write that took effect (by index in `ops`) to its revision, checking (b).

    Values are unique, so each put event names the op that made it. An
    acknowledged write must be there once, at the revision it was told; a
    failed compare must not be there; a call that ended in an error may be
    there at most once (its outcome is unknown to the client).
    """
    counts = Counter(event.value for event in history)
    duplicated = [value for value, n in counts.items() if n > 1]
    assert not duplicated, f"writes applied more than once: {duplicated[:10]}"
    by_value = {event.value: event for event in history}
    applied: dict[int, int] = {}
    for index, op in enumerate(ops):
        if op.kind == "read":
            continue
        event = by_value.pop(op.value, None)
        if op.outcome == "ok":
            assert event is not None, f"acknowledged write missing from the history: {op}"
            assert event.mod_revision == op.revision, f"acknowledged at {op.revision}, stored at {event}: {op}"
        elif op.outcome == "failed":
            assert event is None, f"a failed compare-and-swap was applied: {op} {event}"
        if event is not None:
            assert event.type == PUT and event.key == op.key, (event, str(op))
            applied[index] = event.mod_revision
    assert not by_value, f"events no client wrote: {list(by_value.values())[:10]}"
    return applied


def check_key_metadata(history: list[Event]) -> None:
    """Per key, versions count up from 1 and create_revision is the first write's revision (no deletes here)."""
    seen: dict[bytes, list[Event]] = defaultdict(list)
    for event in history:
        earlier = seen[event.key]
        created = earlier[0].mod_revision if earlier else event.mod_revision
        assert (event.create_revision, event.version) == (created, len(earlier) + 1), (event, earlier[-1:])
        earlier.append(event)


def check_linearizable(ops: list[Op], applied: dict[int, int]) -> list[str]:
    """The CAS/read/put history against a single linearizable key-value store; returns every violation.

    Writes that took effect are totally ordered by revision (`applied`); each
    key is a register whose state is the mod_revision of its latest write
    (0 before the first). Interval endpoints are client-side, so the server's
    real interval lies inside them and every rule is sound (no false alarms):

    1. Chain: per key, the successful writes in revision order each compared
       against the previous one's revision (0 for the first). So exactly one
       CAS wins per compared revision, whichever instances raced.
    2. Real time: if write A completed before write B was invoked, rev(A) < rev(B).
    3. Failed CAS: comparing against r may fail only if the key was not at r at
       some instant in the call: some write to it with revision > r was
       invoked before the failed call completed.
    4. Reads, and the state a failed CAS answered with: the mod_revision m
       returned was current at some instant in the call: the write making it
       was invoked before the call completed, and the next write to the key
       had not completed before the call was invoked. And m is the key's state
       at the answer's header revision h (m = latest write with rev <= h): a
       response is a snapshot at its header revision.
    5. Header revisions respect real time too: if A completed before B was
       invoked, A's point in the revision order (rev for a write, h for a
       read) is not after B's. With 4 this makes the revision order itself a
       witness linearization.

    An op that ended in an error and took effect counts as a write with an
    unknown completion (never); one that did not take effect is ignored.
    """
    violations: list[str] = []
    writes_by_key: dict[bytes, list[tuple[int, Op]]] = defaultdict(list)
    for index, revision in applied.items():
        writes_by_key[ops[index].key].append((revision, ops[index]))
    for writes in writes_by_key.values():
        writes.sort(key=lambda pair: pair[0])

    def completion(op: Op) -> float:
        return op.completed if op.outcome != "error" else NEVER

    # 1. one winner per compared revision, forming a chain
    for key, writes in writes_by_key.items():
        previous = 0
        for revision, op in writes:
            if op.kind == "cas" and op.compared != previous:
                violations.append(f"chain: {key!r} went {previous} -> {revision}, but the winner compared {op}")
            previous = revision

    # 2. revision order of writes respects real time (suffix minimum of completion times)
    in_order = sorted(((revision, ops[index]) for index, revision in applied.items()), key=lambda pair: pair[0])
    earliest_later: float = NEVER
    earliest_op: Op | None = None
    for revision, op in reversed(in_order):
        if earliest_later < op.invoked:
            violations.append(f"real time: {earliest_op} completed before {op} (rev {revision}) was invoked")
        if completion(op) < earliest_later:
            earliest_later, earliest_op = completion(op), op

    # 3 and 4
    def state_at(key: bytes, revision: int) -> int:
        """The key's mod_revision at global revision `revision` (0: absent)."""
        return max((rev for rev, _ in writes_by_key.get(key, []) if rev <= revision), default=0)

    for op in ops:
        if op.kind == "cas" and op.outcome == "failed":
            r = op.compared
            if not any(rev > r and w.invoked < op.completed for rev, w in writes_by_key.get(op.key, [])):
                violations.append(f"failed CAS: nothing overwrote revision {r} during {op}")
        if op.observed < 0:
            continue
        writes = writes_by_key.get(op.key, [])
        revs = [rev for rev, _ in writes]
        if op.observed and op.observed not in revs:
            violations.append(f"read: returned a revision no write to the key made: {op}")
            continue
        position = revs.index(op.observed) + 1 if op.observed else 0  # index of the next write
        if op.observed and writes[position - 1][1].invoked >= op.completed:
            violations.append(f"read: saw {writes[position - 1][1]} that was invoked after it completed: {op}")
        if position < len(writes) and completion(writes[position][1]) < op.invoked:
            violations.append(f"read: stale, {writes[position][1]} completed before it was invoked: {op}")
        current = state_at(op.key, op.revision)
        if current != op.observed:
            violations.append(f"read: at header revision {op.revision} the key was at {current}: {op}")
        if op.kind == "cas" and op.observed == op.compared:
            violations.append(f"failed CAS: the key was at the compared revision in its own answer: {op}")

    # 5. every answered op's point in the revision order respects real time
    points: list[tuple[tuple[int, int], Op]] = [((rev, 0), ops[index]) for index, rev in applied.items()]
    points += [((op.revision, 1), op) for op in ops if op.observed >= 0 and op.outcome != "error"]
    groups: dict[tuple[int, int], list[Op]] = defaultdict(list)
    for point, op in points:
        groups[point].append(op)
    later_min: float = NEVER
    later_op: Op | None = None
    for point in sorted(groups, reverse=True):
        # only ops strictly later in the order count: reads sharing a point may go in either order
        for op in groups[point]:
            if later_min < op.invoked:
                violations.append(f"real time: {later_op} completed before {op} (at {point}) was invoked")
        for op in groups[point]:
            if completion(op) < later_min:
                later_min, later_op = completion(op), op
    return violations


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


# -- the test ----------------------------------------------------------------------------------------------------

KINDS = ["postgres", "mysql", "nats"]
# dqlite's duties follow its Raft leader, which needs three nodes to move: test_dqlite_cluster.py kills it.
LINEARIZABLE_KINDS = [*KINDS, "dqlite"]


@pytest.fixture
def endpoint(kind: str) -> Iterator[str]:
    """A fresh shared datastore: a database, a bucket on a 3-node NATS cluster with 3 replicas, or a dqlite
    cluster that each pykine process joins with a node of its own."""
    name = f"pykine_multi_{secrets.token_hex(6)}"
    if kind == "dqlite":
        directory = tempfile.mkdtemp(prefix="pykine-multi-dqlite-")
        yield f"dqlite://{directory}"
        shutil.rmtree(directory, ignore_errors=True)
        return
    if kind != "nats":
        yield databases.database_endpoint(kind, name)
        return
    cluster = NatsCluster(3).start()
    try:
        yield cluster.endpoint(name)
    finally:
        cluster.destroy()


def range_all(server: PykineServer, key: bytes, range_end: bytes = b"") -> Any:
    outcome = call(server, "KV", "Range", pb.RangeRequest(key=key, range_end=range_end))
    assert outcome.ok, f"{server.log_path}: {outcome.code} {outcome.details}"
    return outcome.response


@pytest.mark.parametrize("kind", LINEARIZABLE_KINDS)
def test_three_instances_on_one_database_are_one_linearizable_store(kind: str, endpoint: str) -> None:
    """Concurrent writes through three instances of one database: one history, linearizable, seen alike."""
    workdir = tempfile.mkdtemp(prefix="pykine-multi-")
    servers: list[PykineServer] = []
    logs: list[EventLog] = []
    started = time.monotonic()
    passed = False
    try:
        for n in range(INSTANCES):
            os.mkdir(os.path.join(workdir, str(n)))
            servers.append(PykineServer(os.path.join(workdir, str(n)), endpoint=endpoint))
            servers[-1].start()
        first = range_all(servers[0], PREFIX, PREFIX_END).header.revision
        assert first == 1, "a fresh database starts at revision 1"
        logs = [EventLog(server, start_revision=first + 1) for server in servers]

        # -- concurrent writers ------------------------------------------------------------------------------
        ops: list[Op] = []
        lock = threading.Lock()
        stubs = [server.stub("KV") for server in servers]
        threads = [
            threading.Thread(target=run_worker, args=(stubs[i], i, f"w{i}{t}", i * 100 + t, ops, lock))
            for i in range(INSTANCES)
            for t in range(THREADS_PER_INSTANCE)
        ]
        writes_began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        writing = time.monotonic() - writes_began
        heads = [range_all(server, PREFIX, PREFIX_END).header.revision for server in servers]
        last = heads[0]
        assert heads == [last] * INSTANCES, f"instances disagree on the revision: {heads}"

        # (a) one identical, gap-free sequence on every instance
        seen = [log.through(last) for log in logs]
        for n in range(1, INSTANCES):
            assert [e.fields for e in seen[n]] == [e.fields for e in seen[0]], f"instance {n}'s watcher disagrees"
        history = seen[0]
        assert [e.mod_revision for e in history] == list(range(first + 1, last + 1)), "revisions not gap-free"
        check_key_metadata(history)
        # ... and the datastore's history replays to a new watcher exactly as it was delivered live
        replay = EventLog(servers[-1], start_revision=first + 1)
        try:
            assert [e.fields for e in replay.through(last)] == [e.fields for e in history]
        finally:
            replay.close()

        # (b) every acknowledged write is there once, at the revision it was told; nothing else is
        applied = match_history(ops, history)
        acknowledged = sum(1 for op in ops if op.kind != "read" and op.outcome == "ok")
        errors = [op for op in ops if op.outcome == "error"]
        assert last == first + len(applied), f"revision {last} after {len(applied)} writes from {first}"
        assert last == acknowledged + 1 or errors, f"final revision {last}, {acknowledged} acknowledged writes"
        latest: dict[bytes, tuple[int, bytes]] = {}
        for index, revision in applied.items():
            latest[ops[index].key] = max(latest.get(ops[index].key, (0, b"")), (revision, ops[index].value))
        for server in servers:
            state = {kv.key: (kv.mod_revision, kv.value) for kv in range_all(server, PREFIX, PREFIX_END).kvs}
            assert state == latest, f"{server.log_path}: final state differs from the history's last writes"

        # (c) linearizability of the whole history, CAS races included
        violations = check_linearizable(ops, applied)
        assert not violations, f"{len(violations)} linearizability violations:\n" + "\n".join(violations[:20])
        cas = [op for op in ops if op.kind == "cas"]
        won = [op for op in cas if op.outcome == "ok"]
        lost = [op for op in cas if op.outcome == "failed"]
        by_compared: defaultdict[tuple[bytes, int], set[int]] = defaultdict(set)
        for op in cas:
            by_compared[op.key, op.compared].add(op.instance)
        cross = sum(1 for instances in by_compared.values() if len(instances) > 1)
        assert won and lost and cross, "the counters saw no races across instances; the test proves little"
        assert not errors, "calls failed:\n" + "\n".join(map(str, errors[:20]))
        print(
            f"\n[{kind}] {len(ops)} calls in {writing:.1f}s ({len(ops) / writing:.0f}/s): "
            f"{len(applied)} writes, CAS {len(won)} won / {len(lost)} lost, "
            f"{cross} compared revisions raced from several instances"
        )

        # (d) a lease's keys are deleted once, whichever instance expires it
        lease_id = call(servers[0], "Lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=2)).response.ID
        assert lease_id
        for n, key in enumerate(LEASE_KEYS):
            put = call(servers[1 + n % 2], "KV", "Put", pb.PutRequest(key=key, value=b"leased", lease=lease_id))
            assert put.ok, put
        keep = KeepAliveStream(servers[2])
        try:
            assert keep.keep_alive(lease_id).TTL > 0
        finally:
            keep.close()  # no more keep-alives: the lease runs out
        attached = range_all(servers[0], PREFIX, PREFIX_END).header.revision

        def deletes(events: list[Event]) -> list[Event]:
            return [e for e in events if e.type == DELETE]

        for log in logs:
            log.wait(lambda got: len(deletes(got)) >= len(LEASE_KEYS), "lease expiry")
        time.sleep(1.5)  # every instance's expiry loop gets more chances to (wrongly) delete again
        expired = [deletes(log.wait(lambda _: True, "a copy")) for log in logs]
        for n in range(INSTANCES):
            assert [e.fields for e in expired[n]] == [e.fields for e in expired[0]], f"instance {n} disagrees"
        assert sorted(e.key for e in expired[0]) == LEASE_KEYS, f"lease keys deleted {expired[0]}"
        assert {e.mod_revision for e in expired[0]} == {attached + 1}, "a lease's keys go in one revision"
        for server in servers:
            after = range_all(server, b"m/l/", b"m/l0")
            assert (after.header.revision, list(after.kvs)) == (attached + 1, []), server.log_path
            ttl = call(server, "Lease", "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=lease_id)).response.TTL
            assert ttl == -1, server.log_path

        # (e) how fast a commit through instance 0 reaches watchers everywhere (printed, not asserted)
        latency: dict[int, list[float]] = defaultdict(list)
        kv = servers[0].stub("KV")
        jitter = random.Random(7)
        for n in range(LATENCY_PUTS):
            # A random pause, so one-at-a-time puts do not fall in step with MySQL instances' 50 ms poll.
            time.sleep(jitter.uniform(0, 0.05))
            revision = kv.Put(pb.PutRequest(key=b"m/lat/%d" % n, value=b"x"), timeout=30).header.revision
            acked = time.monotonic_ns()
            for i, log in enumerate(logs):
                latency[i].append((log.arrival(revision) - acked) / 1e6)
        for i in range(INSTANCES):
            samples = latency[i]
            print(
                f"[{kind}] ack -> event on instance {i}{' (the writer)' if i == 0 else ''}: "
                f"p50 {percentile(samples, 0.5):.1f} ms, p99 {percentile(samples, 0.99):.1f} ms, "
                f"max {max(samples):.1f} ms"
            )

        # the whole session, lease and latency phases included, looked the same everywhere
        final = range_all(servers[0], PREFIX, PREFIX_END).header.revision
        everything = [[e.fields for e in log.through(final)] for log in logs]
        assert all(seq == everything[0] for seq in everything), "watchers disagree on the later phases"
        for server in servers:
            assert "lease expiry failed" not in server.log(), server.log()
            assert "Traceback" not in server.log(), server.log()
        print(f"[{kind}] whole test {time.monotonic() - started:.1f}s")
        passed = True
    finally:
        for log in logs:
            log.close()
        for server in servers:
            server.stop()
        if passed:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"\n[{kind}] server logs kept in {workdir}")


# -- the checker itself ----------------------------------------------------------------------------------------


def synthetic(kind: str, key: bytes, interval: tuple[int, int], **fields: Any) -> Op:
    value = f"{kind}{interval}".encode() if kind != "read" else b""
    return Op(kind, 0, "w", key, value, interval[0], interval[1], fields.pop("outcome", "ok"), **fields)


def test_checker_accepts_a_legal_race_and_flags_each_kind_of_violation() -> None:
    """A checker that never complains proves nothing: each rule must catch a history that breaks it."""
    k = b"m/c/0"
    # Legal: two CAS race from revision 0, the one applied at 2 wins, the other fails seeing 2; a later
    # read sees 2, and a concurrent read may still see the key absent.
    legal = [
        synthetic("cas", k, (0, 10), compared=0, revision=2),
        synthetic("cas", k, (1, 12), compared=0, outcome="failed", revision=2, observed=2),
        synthetic("read", k, (11, 13), revision=2, observed=2),
        synthetic("read", k, (5, 9), revision=1, observed=0),
    ]
    assert check_linearizable(legal, {0: 2}) == []

    def flagged(ops: list[Op], applied: dict[int, int], rule: str) -> bool:
        return any(v.startswith(rule) for v in check_linearizable(ops, applied))

    # Two winners for one compared revision.
    twice = [synthetic("cas", k, (0, 10), compared=0, revision=2), synthetic("cas", k, (0, 10), compared=0, revision=3)]
    assert flagged(twice, {0: 2, 1: 3}, "chain")
    # A write that completed first got the later revision.
    backwards = [synthetic("put", b"a", (0, 5), revision=3), synthetic("put", b"b", (6, 9), revision=2)]
    assert flagged(backwards, {0: 3, 1: 2}, "real time")
    # A CAS failed although nothing changed the key while it ran.
    spurious = [
        synthetic("cas", k, (0, 5), compared=0, revision=2),
        synthetic("cas", k, (6, 9), compared=2, outcome="failed", revision=2, observed=2),
    ]
    assert flagged(spurious, {0: 2}, "failed CAS")
    # A read invoked after a write completed still returned the state before it.
    stale = [synthetic("put", k, (0, 5), revision=2), synthetic("read", k, (6, 9), revision=1, observed=0)]
    assert flagged(stale, {0: 2}, "read")
    # A read returned a write that had not been invoked yet.
    early = [synthetic("read", k, (0, 5), revision=2, observed=2), synthetic("put", k, (6, 9), revision=2)]
    assert flagged(early, {1: 2}, "read")
    # A read whose value is not the key's state at its own header revision.
    torn = [synthetic("put", k, (0, 9), revision=2), synthetic("read", k, (0, 9), revision=1, observed=2)]
    assert flagged(torn, {0: 2}, "read")


@pytest.mark.parametrize("kind", KINDS)
def test_duties_pass_to_another_instance_when_their_holder_dies(kind: str, endpoint: str) -> None:
    """kill -9 the instance that expires leases: another takes the duty lock and expires them instead.

    The first instance to start holds the duties. Once it is killed, the database drops its
    lock with its connection (on NATS, the claim runs out when its holder stops renewing it),
    a survivor claims it (renewing every lease, as a new etcd leader
    does) and the lease granted through the survivor still expires, its key deleted once.
    """
    workdir = tempfile.mkdtemp(prefix="pykine-duty-")
    holder = PykineServer(os.path.join(workdir, "holder"), endpoint=endpoint)
    survivor = PykineServer(os.path.join(workdir, "survivor"), endpoint=endpoint)
    try:
        for server in (holder, survivor):
            os.mkdir(server.workdir)
            server.start()
        assert "now expires leases" in holder.log() and "now expires leases" not in survivor.log()
        granted = call(survivor, "Lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=2))
        assert granted.ok, granted
        assert call(survivor, "KV", "Put", pb.PutRequest(key=b"duty/k", value=b"v", lease=granted.response.ID)).ok
        holder.kill()
        deadline = time.monotonic() + BOUND
        while range_all(survivor, b"duty/k").count:
            assert time.monotonic() < deadline, f"the lease never expired:\n{survivor.log()}"
            time.sleep(0.1)
        assert "now expires leases" in survivor.log()
        history = range_all(survivor, b"duty/", b"duty0")
        assert history.count == 0 and history.header.revision == 3  # the put, then one delete
    finally:
        for server in (holder, survivor):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
