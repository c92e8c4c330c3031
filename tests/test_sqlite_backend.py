"""The SQLite backend on its own: snapshots, write isolation and compaction steps.

These run the backend in-process (it does not load pykine's protobuf modules).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import threading
from typing import Any

from pykine.backends.sqlite import SQLiteBackend
from pykine.engine.records import Change, KeySpan, KeyValueRow, RangeQuery, ReadSet, Snapshot, WriteSet

ALL = KeySpan(b"\x00", None)


def _put_plan(key: bytes, value: bytes, hold: threading.Event | None = None, entered: threading.Event | None = None):
    def plan(snapshot: Snapshot) -> tuple[WriteSet, int]:
        if entered is not None:
            entered.set()
        if hold is not None:
            assert hold.wait(30), "test never released the writer"
        revision = snapshot.revision + 1
        row = KeyValueRow(key, revision, revision, 1, value, 0)
        return WriteSet(revision, snapshot.compact_revision, [Change(row, 0, False, None)]), revision

    return plan


def test_reads_never_wait_behind_an_open_write_transaction() -> None:
    """On the writer thread (as on slow disks) a batch's transaction is open across awaits; reads go on."""

    async def scenario() -> None:
        path = os.path.join(tempfile.mkdtemp(prefix="pykine-sqlite-"), "state.db")
        backend = SQLiteBackend(path, inline_commits=False)
        await backend.start()
        try:
            await backend.commit(ReadSet(), _put_plan(b"a", b"1"))
            hold, entered = threading.Event(), threading.Event()
            writing = asyncio.ensure_future(backend.commit(ReadSet(), _put_plan(b"b", b"2", hold, entered)))
            await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
            # The writer now holds its transaction open; a read still completes,
            # from the last committed snapshot.
            rows = await asyncio.wait_for(backend.read_range(RangeQuery(ALL)), 30)
            assert not writing.done()
            assert rows.revision == 2
            assert [row.key for row in rows.rows] == [b"a"]
            hold.set()
            _, revision = await writing
            assert revision == 3
            rows = await backend.read_range(RangeQuery(ALL))
            assert (rows.revision, [row.key for row in rows.rows]) == (3, [b"a", b"b"])
        finally:
            await backend.close()

    asyncio.run(scenario())


def test_failed_plan_stores_nothing() -> None:
    async def scenario() -> None:
        backend = SQLiteBackend(os.path.join(tempfile.mkdtemp(prefix="pykine-sqlite-"), "state.db"))
        await backend.start()
        try:

            def broken(snapshot: Snapshot) -> tuple[WriteSet, None]:
                raise RuntimeError("plan failed")

            try:
                await backend.commit(ReadSet(), broken)
            except RuntimeError as error:
                assert str(error) == "plan failed"
            else:
                raise AssertionError("the plan's error was swallowed")
            rows = await backend.read_range(RangeQuery(ALL))
            assert (rows.revision, rows.rows) == (1, [])
            await backend.commit(ReadSet(), _put_plan(b"a", b"1"))
            assert (await backend.revisions()) == (2, -1)
        finally:
            await backend.close()

    asyncio.run(scenario())


def test_compaction_steps_resume_and_keep_what_reads_need() -> None:
    async def scenario() -> None:
        path = os.path.join(tempfile.mkdtemp(prefix="pykine-sqlite-"), "state.db")
        backend = SQLiteBackend(path)
        await backend.start()
        for n in range(10):
            await backend.commit(ReadSet(), _put_plan(b"k", b"%d" % n))
        # Mark revision 8 compacted (as the engine's Compact does), then compact in steps of 3.
        await backend.commit(ReadSet(), lambda s: (WriteSet(s.revision, 8, []), None))
        assert await backend.compaction_progress() == (8, 0)
        assert await backend.compact_step(8, 3) == 3
        await backend.close()

        backend = SQLiteBackend(path)  # a restart resumes where the steps stopped
        await backend.start()
        try:
            assert await backend.compaction_progress() == (8, 3)
            done = 3
            while done < 8:
                done = await backend.compact_step(8, 3)
            assert done == 8
            for revision, value in ((8, b"6"), (9, b"7"), (11, b"9")):
                rows = await backend.read_range(RangeQuery(KeySpan(b"k", b"k\x00"), revision=revision))
                assert [row.value for row in rows.rows] == [value]
            old = await backend.read_range(RangeQuery(KeySpan(b"k", b"k\x00"), revision=7))
            assert old.rows == [] and old.compact_revision == 8
        finally:
            await backend.close()

    asyncio.run(scenario())


def _start_and_close(path: str, barrier: Any, results: Any) -> None:
    async def main() -> int:
        backend = SQLiteBackend(path)
        barrier.wait()
        await backend.start()
        try:
            return await backend.cluster_id()
        finally:
            await backend.close()

    results.put(asyncio.run(main()))


def test_processes_creating_one_new_file_together_all_start() -> None:
    """Three processes open a new file at once (as --workers does): one switches it to WAL, where SQLite
    refuses the others at once, busy timeout or not; they take turns and all share one cluster id."""
    context = multiprocessing.get_context("spawn")
    for _ in range(8):
        path = os.path.join(tempfile.mkdtemp(prefix="pykine-sqlite-"), "state.db")
        barrier, results = context.Barrier(3), context.Queue()
        processes = [context.Process(target=_start_and_close, args=(path, barrier, results)) for _ in range(3)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
        assert [process.exitcode for process in processes] == [0, 0, 0]
        assert len({results.get(timeout=5) for _ in processes}) == 1
