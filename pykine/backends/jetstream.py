"""NATS JetStream: the datastore is one stream, an ordered log of pykine's writes.

Design (docs/design.md, "NATS JetStream"): every change (a write batch with
all its revisions, a document, an alarm) is one message of the stream
`PYKINE_<bucket>`, appended with `Nats-Expected-Last-Sequence`, so the log
is a compare-and-swap on the whole datastore. Each instance applies the log
in order to a local SQLite view (backends/logview.py) and answers every read
from it; a linearizable read first asks the stream leader for the log's end
and waits until the view has applied it (etcd's ReadIndex). A restarted
instance opens its view and applies only what it missed.

Members and the duty claim (lease expiry) live in the KV bucket
`pykine-<bucket>`, outside the log: they change every few seconds and are
not part of etcd's data.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from pykine.backends.base import Backend, BackendError, ConnectionOptions, DocumentChange, Plan, StorageStatus
from pykine.backends.logentries import AlarmWrite, Entry, EntryError, LeaseRenewal, decode, encode
from pykine.backends.logview import AlreadyLogged, LogView
from pykine.backends.natsconfig import parse_dsn
from pykine.backends.natsserver import EmbeddedServer
from pykine.engine.records import (
    HistoryRows,
    KeySpan,
    KnownRows,
    LeaseRow,
    MemberRow,
    RangeQuery,
    RangeRows,
    ReadSet,
    Snapshot,
    WriteSet,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# nats-server releases older than this lose or half-apply writes pykine relies on:
# #4320 (concurrent compare-and-swap on R3, fixed in 2.9.21), atomic batches (2.12.0,
# lock fix 2.12.8), the last sequence after a purge (2.12.3). See docs/design.md.
MINIMUM_SERVER = (2, 12, 8)
WRONG_LAST_SEQUENCE = 10071
EXPECTED = "Nats-Expected-Last-Sequence"
# Which append wrote an entry (this process's random id and a counter): finds an append whose answer was lost.
WRITER_HEADER = "Pykine-Writer"
# "i/n" on each part of an entry split over n messages of one atomic batch.
PART_HEADER = "Pykine-Part"
HEADER_ROOM = 1024
# How long one append may take before the request fails with UNAVAILABLE (etcd's request timeout is 7 s).
APPEND_TIMEOUT = 7.0
# One try of an append; a try that times out is repeated with the same message id,
# which JetStream deduplicates, so an append that did land is not stored twice.
APPEND_TRY = 1.0
# A read that finds its view behind the log's end for this long resubscribes to the log.
CATCH_UP_STALL = 3.0
APPLY_BATCH = 1000
# Entries received and not yet applied before the consumer is made to wait.
MAX_QUEUED = 10 * APPLY_BATCH
CONNECT_ROUNDS = 3
CONNECT_TIMEOUT = 20.0
DUTY_RENEW = 1.0
DUTY_TIMEOUT = 5.0
SNAPSHOT = "view"
SNAPSHOT_CHECK = 5.0
POSITION_INTERVAL = 2.0
# A view not heard from for this long no longer holds back trimming (it restores a snapshot when it returns).
POSITION_TIMEOUT = 30.0


class LogConflict(Exception):
    """Another instance appended first; the log now ends at `last`."""

    def __init__(self, last: int) -> None:
        super().__init__(f"the log moved on to {last}")
        self.last = last


class JetStreamBackend(Backend):
    name = "nats"

    def __init__(self, dsn: str, options: ConnectionOptions | None = None) -> None:
        self.config = parse_dsn(dsn)
        self.options = options or ConnectionOptions()
        self.stream = f"PYKINE_{self.config.bucket}"
        self.subject = f"pykine.{self.config.bucket}.log"
        self.nc: NATS | None = None
        self.js: Any = None
        self.kv: Any = None
        self.view: LogView | None = None
        self.snapshots: Any = None
        # The log position of the newest snapshot this process knows of.
        self._snapshot_position = 0
        self._server: EmbeddedServer | None = None
        self._view_lock: int | None = None
        self._cluster_id = 0
        self._writer = uuid.uuid4().hex[:16]
        self._appends = 0
        self._subscription: Any = None
        self._arrived: list[tuple[int, int, Entry | None]] = []
        # The parts of a split entry so far, and where it began.
        self._parts: list[bytes] = []
        self._parts_from = 0
        self._arrival = asyncio.Event()
        self._drained = asyncio.Event()
        self._advanced = asyncio.Event()
        self._foreign = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._index_running: asyncio.Future[int] | None = None
        self._index_next: asyncio.Future[int] | None = None
        self._compact_wake = asyncio.Event()
        self._compact_seen = 0
        # Who holds the duties: the view file, so that a restarted instance takes them back at once.
        self._holder = ""
        self._duty_held_at = 0.0
        self._duty_revision = 0
        self._closing = False
        self._start_error: Exception | None = None

    # -- start-up ----------------------------------------------------------------

    async def start(self) -> None:
        servers = self.config.servers
        if self.config.embedded:
            self._server = EmbeddedServer(self.config.data_dir, log_to_stdout=self.config.stdout_logging)
            servers = [await self._server.start()]
        try:
            # nats-py can hang after a failed TLS handshake instead of trying again: bound it.
            self.nc = await asyncio.wait_for(
                nats.connect(
                    servers=servers,
                    connect_timeout=5,
                    allow_reconnect=True,
                    # A few rounds over the servers at start-up (then exit 2); once connected, reconnect for ever.
                    max_reconnect_attempts=CONNECT_ROUNDS,
                    reconnect_time_wait=0.5,
                    error_cb=self._connection_error,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                    **self._client_options(),
                ),
                CONNECT_TIMEOUT,
            )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            await self._stop_server()
            reason = self._start_error or exc or type(exc).__name__
            raise BackendError(f"cannot connect to NATS at {', '.join(servers)}: {reason}") from exc
        self.nc.options["max_reconnect_attempts"] = -1
        self._start_error = None
        try:
            self._check_version()
            self.js = self.nc.jetstream(timeout=APPEND_TRY)
            info = await self._stream()
            self.kv = await self._bucket()
            self._cluster_id = int.from_bytes(hashlib.sha256(f"{self.stream} {info['created']}".encode()).digest()[:8])
            self._cluster_id = (self._cluster_id >> 1) or 1
            self.snapshots = await self._snapshot_store()
            path = self._view_path()
            self._holder = f"{socket.gethostname()}:{os.path.abspath(path)}"
            await self._restore_if_behind(path, int(info["state"]["first_seq"]))
            self.view = LogView(path)
            await self.view.open(self._cluster_id)
            self._snapshot_position = self.view.position
            self._compact_seen, _ = await self.view.compaction_progress()
            end = await self._log_end()
            log.info(
                "nats: stream %s, view %s at log position %d of %d",
                self.stream,
                self.view.path,
                self.view.position,
                end,
            )
            await self._subscribe()
            self._tasks = [
                asyncio.create_task(self._apply_loop(), name="pykine-nats-apply"),
                asyncio.create_task(self._compact_loop(), name="pykine-nats-compact-view"),
                asyncio.create_task(self._snapshot_loop(), name="pykine-nats-snapshots"),
                asyncio.create_task(self._position_loop(), name="pykine-nats-position"),
            ]
            await self._reach(end, timeout=None)
        except BaseException:
            await self.close()
            raise

    def _client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.config.user:
            options.update(user=self.config.user, password=self.config.password)
        if self.config.token:
            options["token"] = self.config.token
        if self.config.creds_file:
            options["user_credentials"] = self.config.creds_file
        if self.config.nkey_seed_file:
            options["nkeys_seed"] = self.config.nkey_seed_file
        tls = self.config.tls or self.options.ca_file or self.options.cert_file
        if tls:
            context = ssl.create_default_context(cafile=self.options.ca_file or None)
            if self.options.cert_file:
                context.load_cert_chain(self.options.cert_file, self.options.key_file or None)
            if self.options.skip_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            options["tls"] = context
        return options

    def _check_version(self) -> None:
        assert self.nc is not None
        version = self.nc.connected_server_version
        found = (version.major, version.minor, version.patch)
        if found < MINIMUM_SERVER:
            raise BackendError(
                f"nats-server {'.'.join(map(str, found))} is too old:"
                f" pykine needs {'.'.join(map(str, MINIMUM_SERVER))} or newer"
                " (older releases can lose compare-and-swap writes with replicas, nats-server#4320, or store"
                " atomic batches one message at a time)"
            )

    async def _stream(self) -> dict[str, Any]:
        """The log's stream, created on first use; returns its info."""
        try:
            info = await self._stream_info()
        except nats.js.errors.NotFoundError:
            pass
        else:
            if not info["config"].get("allow_atomic"):
                raise BackendError(f"NATS stream {self.stream} does not allow atomic batches (allow_atomic)")
            return info
        config = api.StreamConfig(
            name=self.stream,
            subjects=[self.subject],
            storage=api.StorageType.FILE,
            num_replicas=self.config.replicas,
            deny_delete=True,
            allow_direct=True,
            allow_atomic=True,
            max_msg_size=-1,
        )
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:  # created meanwhile by another instance
            if exc.err_code != 10058:
                raise BackendError(f"cannot create NATS stream {self.stream}: {exc.description}") from exc
        info = await self._stream_info()
        if not info["config"].get("allow_atomic"):  # a server that ignores the setting would split big entries
            raise BackendError(f"the NATS server did not enable atomic batches on stream {self.stream}")
        return info

    async def _stream_info(self) -> dict[str, Any]:
        """STREAM.INFO, answered by the stream's leader: the log's end as the quorum has it."""
        assert self.nc is not None
        reply = await self.nc.request(f"$JS.API.STREAM.INFO.{self.stream}", b"", timeout=APPEND_TRY)
        info: dict[str, Any] = json.loads(reply.data)
        error = info.get("error")
        if error:
            raise nats.js.errors.APIError.from_error(error)
        return info

    async def _bucket(self) -> Any:
        name = f"pykine-{self.config.bucket}"
        try:
            return await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_key_value(bucket=name, history=1, replicas=self.config.replicas)

    def _view_path(self) -> str:
        """This process's view file: the first of `nats-<bucket>[-n].db` no other process holds.

        Instances started in one directory each keep a view of their own; a
        restarted one finds the view it left and applies only what it missed.
        """
        directory = self.config.view_dir
        os.makedirs(directory, exist_ok=True)
        for n in range(1, 1000):
            path = os.path.join(directory, f"nats-{self.config.bucket}{'' if n == 1 else f'-{n}'}.db")
            descriptor = os.open(path + "-owner", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                continue
            self._view_lock = descriptor
            return path
        raise BackendError(f"no free view file in {directory}")

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._duty_revision:  # hand the duties on now rather than after DUTY_TIMEOUT
            with contextlib.suppress(Exception):
                await self.kv.delete("duties", last=self._duty_revision)
        if self.kv is not None:  # this view no longer holds back trimming
            with contextlib.suppress(Exception):
                await self.kv.purge(f"position.{self._writer}")
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.view is not None:
            await self.view.close()
        if self._view_lock is not None:
            os.close(self._view_lock)
            self._view_lock = None
        await self._stop_server()

    async def _stop_server(self) -> None:
        if self._server is not None:
            await self._server.stop()

    async def _connection_error(self, exc: Exception) -> None:
        if self.nc is None:  # still starting: the first reason goes into the one error line start() ends with
            self._start_error = self._start_error or exc
        elif not self._closing:
            log.warning("nats: %s", exc or type(exc).__name__)

    async def _disconnected(self) -> None:
        if not self._closing:
            log.warning("nats: disconnected")

    async def _reconnected(self) -> None:
        log.info("nats: reconnected to %s", self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?")

    # -- snapshots of the view, and trimming the log -------------------------------------

    async def _snapshot_store(self) -> Any:
        name = f"pykine-{self.config.bucket}-snapshots"
        try:
            return await self.js.object_store(name)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_object_store(
                name, config=api.ObjectStoreConfig(bucket=name, replicas=self.config.replicas)
            )

    async def _newest_snapshot(self) -> tuple[int, int]:
        """(log position, log id) of the stored snapshot; (0, 0) if there is none."""
        try:
            info = await self.snapshots.get_info(SNAPSHOT)
        except nats.js.errors.NotFoundError:
            return 0, 0
        about = json.loads(info.description or "{}")
        return int(about.get("position", 0)), int(about.get("log_id", 0))

    async def _restore_if_behind(self, path: str, first: int) -> None:
        """Start the view from the newest snapshot when the log no longer holds what it misses, or that is quicker."""
        position = await asyncio.to_thread(LogView.stored_position, path, self._cluster_id) or 0
        snapshot, log_id = await self._newest_snapshot()
        trimmed = position + 1 < first
        if log_id != self._cluster_id or snapshot <= position:
            if trimmed:
                raise BackendError(
                    f"the log starts at {first}, after this view's position {position}, and no snapshot is newer"
                )
            return
        if not trimmed and snapshot - position < self.config.snapshot_entries:
            return
        log.info(
            "nats: restoring the view from the snapshot at log position %d (the view was at %d)", snapshot, position
        )
        download = path + ".snapshot"
        with open(download, "wb") as out:
            await self.snapshots.get(SNAPSHOT, writeinto=out)
        if LogView.stored_position(download, self._cluster_id) != snapshot:
            raise BackendError("the snapshot in NATS is not a view of this log")
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)
        os.replace(download, path)

    async def _snapshot_loop(self) -> None:
        """The duty holder stores a snapshot of its view every snapshotEntries log entries, then trims the log."""
        assert self.view is not None
        while True:
            await asyncio.sleep(SNAPSHOT_CHECK)
            if not self._duty_revision or self.view.position - self._snapshot_position < self.config.snapshot_entries:
                continue
            try:
                stored, _ = await self._newest_snapshot()
                if self.view.position - stored >= self.config.snapshot_entries:
                    stored = await self._take_snapshot()
                self._snapshot_position = stored
                await self._trim(stored)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("nats: storing a snapshot of the view failed: %s", exc)

    async def _take_snapshot(self) -> int:
        assert self.view is not None
        copy = self.view.path + ".backup"
        try:
            position = await self.view.backup(copy)
            about = json.dumps({"position": position, "log_id": self._cluster_id})
            with open(copy, "rb") as data:
                await self.snapshots.put(SNAPSHOT, data, meta=api.ObjectMeta(name=SNAPSHOT, description=about))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(copy)
        log.info("nats: stored a snapshot of the view at log position %d", position)
        return position

    async def _trim(self, snapshot: int) -> None:
        """Drop log entries that neither the snapshot nor any view still following the log needs."""
        needed = [snapshot]
        now = time.time()
        try:
            keys = await self.kv.keys(filters=["position.*"])
        except nats.js.errors.NoKeysError:
            keys = []
        for key in keys:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                about = json.loads((await self.kv.get(key)).value or b"{}")
                if now - float(about.get("at", 0)) < POSITION_TIMEOUT:
                    needed.append(int(about.get("position", 0)))
        keep_from = min(needed) + 1
        info = await self._stream_info()
        if keep_from > int(info["state"]["first_seq"]):
            await self.js.purge_stream(self.stream, seq=keep_from)
            log.info("nats: trimmed the log below position %d", keep_from)

    async def _position_loop(self) -> None:
        """Tell the others how far this view has applied the log, so that trimming leaves what it needs."""
        while True:
            if self.view is not None:
                with contextlib.suppress(Exception):
                    about = json.dumps({"position": self.view.position, "at": time.time()}).encode()
                    await self.kv.put(f"position.{self._writer}", about)
            await asyncio.sleep(POSITION_INTERVAL)

    # -- following the log ----------------------------------------------------------

    async def _subscribe(self) -> None:
        """An ordered consumer from the view's next position: JetStream pushes every entry, in order."""
        assert self.view is not None
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        self._subscription = await self.js.subscribe(
            self.subject,
            cb=self._arrive,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=self.view.position + 1),
            idle_heartbeat=1.0,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )

    async def _arrive(self, msg: Msg) -> None:
        """Queue one message for the applier; the parts of a split entry wait for their last part."""
        sequence = msg.metadata.sequence.stream
        part = (msg.headers or {}).get(PART_HEADER)
        if part is not None:
            number, _, count = part.partition("/")
            if number == "1":
                self._parts, self._parts_from = [], sequence
            self._parts.append(msg.data)
            if number != count:
                return
            data, first = b"".join(self._parts), self._parts_from
            self._parts = []
        else:
            data, first = msg.data, sequence
        try:
            entry: Entry | None = decode(data)
        except EntryError as exc:
            log.error("nats: skipping log entry %d: %s", sequence, exc)
            entry = None
        self._arrived.append((first, sequence, entry))
        self._arrival.set()
        while len(self._arrived) >= MAX_QUEUED:  # hold the consumer (and, by flow control, the server) back
            self._drained.clear()
            await self._drained.wait()

    async def _apply_loop(self) -> None:
        """Apply what arrived, in transactions of up to APPLY_BATCH entries; a failure is retried, never dropped."""
        assert self.view is not None
        failing = False
        while True:
            await self._arrival.wait()
            self._arrival.clear()
            while self._arrived:
                batch = self._arrived[:APPLY_BATCH]
                before = self.view.position
                try:
                    await self.view.apply(batch)
                except ValueError as exc:  # a gap: the consumer skipped entries; start it again after the view
                    log.warning("nats: %s; resubscribing", exc)
                    await self._check_not_trimmed()
                    self._arrived.clear()
                    self._parts = []
                    self._drained.set()
                    await self._resubscribe()
                    break
                except Exception as exc:  # the view's disk: keep the entries and try again
                    if not failing:
                        log.error("nats: applying log entries to the view failed, retrying: %s", exc)
                    failing = True
                    await asyncio.sleep(1)
                    continue
                failing = False
                del self._arrived[: len(batch)]
                self._drained.set()
                if self.view.position > before:
                    self._foreign.set()
                    self._wake_readers()
                self._compaction_requested(
                    max((e.compact_revision for _, _, e in batch if isinstance(e, WriteSet)), default=0)
                )

    async def _check_not_trimmed(self) -> None:
        """Say so when the log was trimmed past this view (it was not heard from for POSITION_TIMEOUT)."""
        assert self.view is not None
        with contextlib.suppress(Exception):
            first = int((await self._stream_info())["state"]["first_seq"])
            if self.view.position + 1 < first:
                log.error(
                    "nats: the log now starts at %d, after this view's position %d: restart pykine to start"
                    " from the newest snapshot (reads wait and fail until then)",
                    first,
                    self.view.position,
                )
                await asyncio.sleep(5)

    async def _resubscribe(self) -> None:
        """_subscribe, until NATS answers."""
        while True:
            try:
                await self._subscribe()
                return
            except Exception as exc:
                log.warning("nats: following the log again failed, retrying: %s", exc)
                await asyncio.sleep(1)

    def _compaction_requested(self, compact_revision: int) -> None:
        """Wake the view's compaction when the log's compact revision rises (every WriteSet carries it)."""
        if compact_revision > self._compact_seen:
            self._compact_seen = compact_revision
            self._compact_wake.set()

    def _wake_readers(self) -> None:
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def _reach(self, position: int, timeout: float | None = APPEND_TIMEOUT) -> None:
        """Wait until the view has applied the log through `position`."""
        assert self.view is not None
        started = time.monotonic()
        stalled_at = started
        last_seen = self.view.position
        while self.view.position < position:
            now = time.monotonic()
            if timeout is not None and now - started > timeout:
                raise TimeoutError(f"the view is at {self.view.position}, behind the log's end {position}")
            if self.view.position != last_seen:
                last_seen, stalled_at = self.view.position, now
            elif now - stalled_at > CATCH_UP_STALL:
                log.warning("nats: no log entries after %d for %.0f s; resubscribing", last_seen, now - stalled_at)
                await self._subscribe()
                stalled_at = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), 0.5)

    async def _log_end(self) -> int:
        info = await self._stream_info()
        return int(info["state"]["last_seq"])

    async def _read_index(self) -> None:
        """ReadIndex: learn the log's end from the leader after this call began, then wait for the view to get there.

        Reads that come while a STREAM.INFO is on its way share the next one,
        so one round trip serves every read of a burst.
        """
        if self._index_running is None:
            future = self._index_running = asyncio.ensure_future(self._log_end())
            future.add_done_callback(self._index_done)
        else:
            if self._index_next is None:
                self._index_next = asyncio.get_running_loop().create_future()
            future = self._index_next
        await self._reach(await asyncio.shield(future))

    def _index_done(self, _: asyncio.Future[int]) -> None:
        waiting, self._index_next = self._index_next, None
        self._index_running = None
        if waiting is None:
            return
        running = self._index_running = asyncio.ensure_future(self._log_end())
        running.add_done_callback(self._index_done)

        def hand_over(done: asyncio.Future[int]) -> None:
            if waiting.done():
                return
            if done.cancelled():
                waiting.cancel()
            elif done.exception() is not None:
                waiting.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                waiting.set_result(done.result())

        running.add_done_callback(hand_over)

    # -- appending ----------------------------------------------------------------------

    async def _append(self, entry: Entry, position: int) -> int:
        """Append `entry` as the log's next message(s) after `position`; returns where it ends.

        A try that times out (a leader election, a lost connection) is
        repeated with the same message id: JetStream stores a message id once,
        so the entry lands at most once however many tries reach it. An entry
        larger than a message is split into the parts of one atomic batch.
        """
        self._appends += 1
        writer = f"{self._writer}-{self._appends}"
        payload = encode(entry)
        room = self._room()
        parts = [payload[at : at + room] for at in range(0, len(payload), room)] or [b""]
        started = time.monotonic()
        while True:
            try:
                if len(parts) == 1:
                    headers = {EXPECTED: str(position), "Nats-Msg-Id": writer, WRITER_HEADER: writer}
                    ack = await self.js.publish(self.subject, parts[0], timeout=APPEND_TRY, headers=headers)
                    landed = int(ack.seq)
                else:
                    landed = await self._append_batch(parts, position, writer)
            except nats.js.errors.APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    await self._check_landed(position, writer)
                    found = re.search(r"(\d+)\s*$", exc.description or "")
                    raise LogConflict(int(found.group(1)) if found else position + 1) from None
                if exc.code != 503 or time.monotonic() - started > APPEND_TIMEOUT:
                    raise
            except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError,
                    nats.errors.ConnectionClosedError, nats.errors.NoRespondersError):  # fmt: skip
                if time.monotonic() - started > APPEND_TIMEOUT:
                    raise
                if len(parts) > 1:  # a batch is not deduplicated: see whether it landed before trying again
                    with contextlib.suppress(nats.errors.Error, TimeoutError):
                        await self._check_landed(position, writer)
            else:
                elapsed = time.monotonic() - started
                if elapsed > self.config.slow_method:
                    log.warning("nats: slow append of %d bytes: %.3f s", len(payload), elapsed)
                return landed
            await asyncio.sleep(0.05)

    def _room(self) -> int:
        """The most entry bytes one message carries: the server's max_payload less room for headers."""
        assert self.nc is not None
        return max(4096, self.nc.max_payload - HEADER_ROOM)

    async def _append_batch(self, parts: list[bytes], position: int, writer: str) -> int:
        """One entry as an atomic batch (ADR-50): stored whole at consecutive positions, or not at all."""
        assert self.nc is not None
        batch = uuid.uuid4().hex
        for number, part in enumerate(parts, 1):
            headers = {
                "Nats-Batch-Id": batch,
                "Nats-Batch-Sequence": str(number),
                PART_HEADER: f"{number}/{len(parts)}",
            }
            if number == 1:
                headers.update({EXPECTED: str(position), WRITER_HEADER: writer})
            if number < len(parts):
                await self.nc.publish(self.subject, part, headers=headers)
                continue
            headers["Nats-Batch-Commit"] = "1"
            reply = await self.nc.request(self.subject, part, timeout=APPEND_TRY, headers=headers)
            answer = json.loads(reply.data)
            if "error" in answer:
                raise nats.js.errors.APIError.from_error(answer["error"])
            if int(answer.get("count", 0)) != len(parts):
                raise BackendError(f"nats-server stored {answer.get('count')} of {len(parts)} parts as one batch")
            return int(answer["seq"])
        raise AssertionError("unreachable")

    async def _check_landed(self, position: int, writer: str) -> None:
        """Raise AlreadyLogged if the entry after `position` is this write's own (its answer was lost)."""
        assert self.nc is not None
        request = json.dumps({"seq": position + 1}).encode()
        reply = await self.nc.request(f"$JS.API.STREAM.MSG.GET.{self.stream}", request, timeout=APPEND_TRY)
        message = json.loads(reply.data).get("message")
        if not message or not message.get("hdrs"):
            return
        headers = base64.b64decode(message["hdrs"]).decode(errors="replace")
        if f"{WRITER_HEADER}: {writer}\r\n" not in headers:
            return
        count = re.search(rf"{PART_HEADER}: 1/(\d+)\r\n", headers)
        raise AlreadyLogged(position + (int(count.group(1)) if count else 1))

    async def _appended(self, write: Callable[[], Any]) -> Any:
        """Run a view write that appends; after another instance's append, catch up and do it again."""
        while True:
            try:
                result = await write()
            except LogConflict as conflict:
                await self._reach(conflict.last)
                continue
            except AlreadyLogged as landed:
                await self._reach(landed.position)
                result = landed.result
            self._wake_readers()
            return result

    async def commit(self, reads: ReadSet, plan: Plan[T]) -> tuple[WriteSet, T]:
        assert self.view is not None
        view = self.view
        result: tuple[WriteSet, T] = await self._appended(lambda: view.commit_logged(reads, plan, self._append))
        self._compaction_requested(result[0].compact_revision)
        return result

    async def update_document(self, name: str, change: DocumentChange) -> tuple[int, bytes]:
        assert self.view is not None
        view = self.view
        result: tuple[int, bytes] = await self._appended(
            lambda: view.update_document_logged(name, change, self._append)
        )
        return result

    async def set_alarm(self, member_id: int, alarm: int, raised: bool) -> None:
        assert self.view is not None
        view = self.view
        await self._appended(lambda: view.append_logged(AlarmWrite(member_id, alarm, raised), self._append))

    async def renew_leases(self, now: float) -> None:
        assert self.view is not None
        view = self.view
        await self._appended(lambda: view.append_logged(LeaseRenewal(now), self._append))

    # -- reads: ReadIndex, then the view -------------------------------------------------

    async def cluster_id(self) -> int:
        return self._cluster_id

    async def revisions(self) -> tuple[int, int]:
        assert self.view is not None
        await self._read_index()
        return await self.view.revisions()

    async def read_range(self, query: RangeQuery, known: KnownRows | None = None) -> RangeRows:
        assert self.view is not None
        await self._read_index()
        return await self.view.read_range(query, known)

    async def read_snapshot(self, reads: ReadSet) -> Snapshot:
        assert self.view is not None
        await self._read_index()
        return await self.view.read_snapshot(reads)

    async def read_history(self, first: int, last: int, span: KeySpan) -> HistoryRows:
        assert self.view is not None
        return await self.view.read_history(first, last, span)

    async def read_lease(self, lease_id: int, with_keys: bool) -> tuple[int, LeaseRow | None, list[bytes]]:
        assert self.view is not None
        await self._read_index()
        return await self.view.read_lease(lease_id, with_keys)

    async def lease_ids(self) -> tuple[int, list[int]]:
        assert self.view is not None
        await self._read_index()
        return await self.view.lease_ids()

    async def due_leases(self, now: float, limit: int) -> list[int]:
        assert self.view is not None
        return await self.view.due_leases(now, limit)

    async def alarms(self) -> list[tuple[int, int]]:
        assert self.view is not None
        return await self.view.alarms()

    async def read_document(self, name: str) -> tuple[int, bytes]:
        assert self.view is not None
        return await self.view.read_document(name)

    async def wait_for_commits(self) -> None:
        """Until the view applies another instance's entries."""
        await self._foreign.wait()
        self._foreign.clear()

    # -- duties and members, in the KV bucket ----------------------------------------------

    async def claim_duties(self) -> bool:
        """Hold the `duties` key: create it, or take it over once its holder stopped renewing it."""
        now = time.time()
        if now - self._duty_held_at < DUTY_RENEW:
            return True
        mine = json.dumps({"holder": self._holder, "at": now}).encode()
        self._duty_held_at = self._duty_revision = 0
        try:
            try:
                found = await self.kv.get("duties")
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                revision = await self.kv.create("duties", mine)
            else:
                holder = json.loads(found.value or b"{}")
                if holder.get("holder") != self._holder and now - float(holder.get("at", 0)) < DUTY_TIMEOUT:
                    return False
                revision = await self.kv.update("duties", mine, last=found.revision)
        except nats.js.errors.APIError:  # another instance claimed or renewed it first
            return False
        self._duty_held_at, self._duty_revision = now, revision
        return True

    async def heartbeat(self, member: MemberRow, now: float) -> None:
        value = json.dumps({"name": member.name, "client_url": member.client_url, "seen_at": now}).encode()
        await self.kv.put(f"member.{member.id}", value)

    async def members(self, since: float) -> list[MemberRow]:
        try:
            keys = await self.kv.keys(filters=["member.*"])
        except nats.js.errors.NoKeysError:
            return []
        found = []
        for key in keys:
            try:
                entry = await self.kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue
            fields = json.loads(entry.value or b"{}")
            if fields.get("seen_at", 0) >= since:
                found.append(MemberRow(int(key.split(".", 1)[1]), fields["name"], fields["client_url"]))
        return sorted(found)

    async def leave(self, member_id: int) -> None:
        await self.kv.purge(f"member.{member_id}")

    # -- compaction and maintenance ----------------------------------------------------------

    async def _compact_loop(self) -> None:
        """Compact this view's history up to the compact revision the log has reached (each view does its own)."""
        assert self.view is not None
        while True:
            await self._compact_wake.wait()
            self._compact_wake.clear()
            try:
                while True:
                    target, done = await self.view.compaction_progress()
                    if done >= target:
                        break
                    await self.view.compact_step(target, 1000)
                    await asyncio.sleep(0)
            except Exception as exc:
                log.error("nats: compacting the view failed, retrying: %s", exc)
                await asyncio.sleep(1)
                self._compact_wake.set()

    async def compact_step(self, target: int, max_revisions: int) -> int:
        assert self.view is not None
        return await self.view.compact_step(target, max_revisions)

    async def compaction_progress(self) -> tuple[int, int]:
        assert self.view is not None
        return await self.view.compaction_progress()

    async def status(self) -> StorageStatus:
        assert self.view is not None
        return await self.view.status()

    async def defragment(self) -> None:
        assert self.view is not None
        await self.view.defragment()
