"""A local SQLite copy of a replicated write log: what a log-based backend reads from.

The view is an ordinary pykine SQLite datastore plus one number, the log
position it has applied. Entries change it in log order only: either this
process's own write, stored in the same transaction that read its snapshot
once the log has accepted it at the next position, or entries other
processes appended, applied as they arrive. Because every write is planned on
the view at exactly position S and the log accepts it only as entry S + 1,
the plan saw the state every other instance will have before it.

The log is the durable copy, so the view commits with synchronous=NORMAL: a
view that lost its last commits to a power cut re-applies them from the log.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pykine.backends.logentries import AlarmWrite, DocumentWrite, Entry, LeaseRenewal
from pykine.backends.sqlite import SQL, SQLiteBackend
from pykine.backends.sqltext import INITIAL_META, write_statements
from pykine.engine.records import ReadSet, Snapshot, WriteSet

T = TypeVar("T")

# meta rows only a view has: the log position applied, and which log it is a view of.
POSITION = "log_position"
LOG_ID = "log_id"

Statements = list[tuple[str, list[Any]]]
# Appends an entry to the log, expecting it to land right after `position`; returns where it ends.
Append = Callable[[Entry, int], Awaitable[int]]


class AlreadyLogged(Exception):
    """The append had landed although its answer was lost; the entry ends at `position`.

    The view does not store it in the write's transaction (rolled back): it
    comes from the log like another instance's entry. `result` is what the
    write returns once the view has applied it.
    """

    def __init__(self, position: int) -> None:
        super().__init__(f"the entry is in the log through position {position}")
        self.position = position
        self.result: Any = None


class LogView(SQLiteBackend):
    """pykine's SQLite datastore, changed only by entries of one log, in order."""

    def __init__(self, path: str) -> None:
        super().__init__(path, synchronous="NORMAL", inline_commits=True)
        self.position = 0

    async def open(self, log_id: int) -> None:
        """Open the file; a view of another log (or of an older one of the same name) is emptied first."""
        await self.start()
        self.position = await self._write(self._bind, log_id)

    def _bind(self, log_id: int) -> int:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = {name: value for name, value in conn.execute("SELECT name, value FROM meta")}
            if found.get(LOG_ID) != log_id:
                for table in SQL.tables:
                    if table != "meta":
                        conn.execute(f"DELETE FROM {table}")
                for name in ("revision", "compact_revision", "compacted_through"):
                    conn.execute(SQL.set_meta, (INITIAL_META[name], name))
                conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (LOG_ID, log_id))
                conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, 0)", (POSITION,))
                position = 0
            else:
                position = found[POSITION]
            conn.execute("COMMIT")
            return int(position)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def backup(self, target: str) -> int:
        """Copy the view, consistently, to the file `target`; returns the log position the copy holds."""

        def copy() -> int:
            with contextlib.closing(sqlite3.connect(target)) as out:
                self._connection().backup(out)  # one step: a single read transaction, so one consistent state
                return int(out.execute(SQL.meta, (POSITION,)).fetchone()[0])

        return await self._on(self._readers, copy)

    @staticmethod
    def stored_position(path: str, log_id: int) -> int | None:
        """The log position a view file holds, if it is a view of log `log_id` (None: not one)."""
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
                found = dict(conn.execute("SELECT name, value FROM meta WHERE name IN (?, ?)", (POSITION, LOG_ID)))
        except sqlite3.Error:
            return None
        return int(found[POSITION]) if found.get(LOG_ID) == log_id and POSITION in found else None

    # -- this process's writes -----------------------------------------------------

    async def commit_logged(
        self, reads: ReadSet, plan: Callable[[Snapshot], tuple[WriteSet, T]], append: Append
    ) -> tuple[WriteSet, T]:
        """Plan on the view, append the WriteSet after the view's position, then store it here too."""

        def build(conn: sqlite3.Connection) -> tuple[Entry, Statements, tuple[WriteSet, T]]:
            snapshot = self._snapshot(conn, reads)
            write_set, outcome = plan(snapshot)
            return write_set, write_statements(SQL, snapshot, write_set), (write_set, outcome)

        return await self._logged(build, append)

    async def update_document_logged(
        self, name: str, change: Callable[[bytes], bytes | None], append: Append
    ) -> tuple[int, bytes]:
        """A document change, decided on the view and appended after its position (see Backend.update_document)."""

        def build(conn: sqlite3.Connection) -> tuple[Entry | None, Statements, tuple[int, bytes]]:
            row = conn.execute(SQL.document, (name,)).fetchone()
            revision, value = (int(row[0]), bytes(row[1])) if row else (0, b"")
            new = change(value)
            if new is None:
                return None, [], (revision, value)
            entry = DocumentWrite(name, revision + 1, new)
            return entry, self._statements(conn, entry), (revision + 1, new)

        return await self._logged(build, append)

    async def append_logged(self, entry: Entry, append: Append) -> None:
        """An entry that needs no decision on the view's state (alarms, lease renewal)."""
        await self._logged(lambda conn: (entry, self._statements(conn, entry), None), append)

    async def _logged(
        self, build: Callable[[sqlite3.Connection], tuple[Entry | None, Statements, T]], append: Append
    ) -> T:
        async with self._write_lock:
            conn = self._writer_connection
            assert conn is not None, "open() comes first"
            conn.execute("BEGIN IMMEDIATE")  # only this process writes the view: never busy
            try:
                entry, statements, result = build(conn)
                if entry is not None:
                    position = await append(entry, self.position)
                    for sql, rows in statements:
                        conn.executemany(sql, rows)
                    conn.execute(SQL.set_meta, (position, POSITION))
                conn.execute("COMMIT")
            except AlreadyLogged as landed:
                conn.execute("ROLLBACK")
                landed.result = result
                raise
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if entry is not None:
                self.position = position
                self._commits += 1
            return result

    # -- entries from the log ----------------------------------------------------------

    async def apply(self, entries: list[tuple[int, int, Entry | None]]) -> None:
        """Store entries after the view's position in one transaction.

        Each is (first, last, entry): an entry may take several log positions
        (one too large for a message), and None stores nothing at them.
        """
        async with self._write_lock:
            conn = self._writer_connection
            assert conn is not None, "open() comes first"
            conn.execute("BEGIN IMMEDIATE")
            try:
                position = self.position
                for first, last, entry in entries:
                    if last <= position:
                        continue  # this process wrote it, or it came twice
                    if first != position + 1:
                        raise ValueError(f"log entry {first} does not follow the view's position {position}")
                    if entry is not None:
                        for sql, rows in self._statements(conn, entry):
                            conn.executemany(sql, rows)
                    position = last
                conn.execute(SQL.set_meta, (position, POSITION))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.position = position
            self._commits += 1

    @classmethod
    def _statements(cls, conn: sqlite3.Connection, entry: Entry) -> Statements:
        if isinstance(entry, WriteSet):
            revision, compact = cls._revisions(conn)
            return write_statements(SQL, Snapshot(revision, compact, []), entry)
        if isinstance(entry, DocumentWrite):
            return [
                (SQL.insert_document, [(entry.name, b"")]),
                (SQL.set_document, [(entry.revision, entry.value, entry.name)]),
            ]
        if isinstance(entry, AlarmWrite):
            return [(SQL.insert_alarm if entry.raised else SQL.delete_alarm, [(entry.member_id, entry.alarm)])]
        assert isinstance(entry, LeaseRenewal)
        return [(SQL.renew_leases, [(entry.now,)])]
