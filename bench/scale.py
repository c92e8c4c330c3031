"""List-page latency as history grows, and after compaction.

Builds a SQLite datastore with --keys keys and then grows its history with
updates (one revision each) up to --revisions, writing through pykine's own
SQLite backend for speed. At each step it starts pykine on the datastore and
times Kubernetes' list pages (limit 500, exact count) over gRPC: at the
current revision, and at a slightly older one as continuation pages are. At
the end it compacts to the current revision and measures again.

    .venv/bin/python bench/scale.py [--keys 100000] [--revisions 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from aetcd.rpc import rpc_pb2 as pb  # noqa: E402
from harness import PykineServer  # noqa: E402

from pykine.backends.sqlite import SQLiteBackend  # noqa: E402
from pykine.engine.records import Change, KeyValueRow, ReadSet, Snapshot, WriteSet  # noqa: E402

PREFIX = b"/registry/scale/"
PREFIX_END = b"/registry/scale0"
CHUNK = 20_000


def key(index: int) -> bytes:
    return PREFIX + b"%08d" % index


async def grow(path: str, keys: int, target: int, value: bytes, state: dict[bytes, KeyValueRow]) -> int:
    """Write puts (new keys first, then updates of random keys) until the revision reaches target."""
    backend = SQLiteBackend(path, synchronous="OFF")
    await backend.start()
    try:
        revision, _ = await backend.revisions()
        while revision < target:

            def plan(snapshot: Snapshot) -> tuple[WriteSet, int]:
                changes = []
                rev = snapshot.revision
                for _ in range(min(CHUNK, target - rev)):
                    rev += 1
                    name = key(len(state)) if len(state) < keys else key(random.randrange(keys))
                    prev = state.get(name)
                    row = KeyValueRow(
                        name, prev.create_revision if prev else rev, rev, prev.version + 1 if prev else 1, value, 0
                    )
                    state[name] = row
                    changes.append(Change(row, 0, False, prev))
                return WriteSet(rev, snapshot.compact_revision, changes), rev

            _, revision = await backend.commit(ReadSet(), plan)
    finally:
        await backend.close()
    return revision


def pages(server: PykineServer, revision: int, samples: int, keys: int) -> list[float]:
    """Milliseconds per 500-key page with count, at `revision` (0: current), from random start keys."""
    kv = server.stub("KV")
    timings = []
    for _ in range(samples):
        start = key(random.randrange(keys))
        began = time.perf_counter()
        response = kv.Range(pb.RangeRequest(key=start, range_end=PREFIX_END, limit=500, revision=revision), timeout=120)
        timings.append((time.perf_counter() - began) * 1000)
        assert response.count > 0 or not response.kvs
    return timings


def summary(timings: list[float]) -> str:
    ordered = sorted(timings)
    return f"p50 {statistics.median(ordered):7.1f} ms  p99 {ordered[int(len(ordered) * 0.99) - 1]:7.1f} ms"


def measure(workdir: str, label: str, samples: int, keys: int, results: list[str]) -> None:
    server = PykineServer(workdir)
    server.start(timeout=120)
    try:
        current = server.stub("KV").Range(pb.RangeRequest(key=b"x"), timeout=30).header.revision
        now = pages(server, 0, samples, keys)
        older = pages(server, current - 1, samples, keys)
        line = f"{label:>28}  current: {summary(now)}   at revision-1: {summary(older)}"
        results.append(line)
        print(line, flush=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--revisions", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=4, help="measurements between --keys and --revisions")
    parser.add_argument("--value-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=60, help="pages timed per measurement")
    options = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="pykine-scale-")
    path = os.path.join(workdir, "state.db")
    value = b"v" * options.value_size
    state: dict[bytes, KeyValueRow] = {}
    results: list[str] = []
    targets = [
        options.keys + 1 + (options.revisions - options.keys) * step // options.steps
        for step in range(options.steps + 1)
    ]
    for target in targets:
        began = time.perf_counter()
        revision = asyncio.run(grow(path, options.keys, target, value, state))
        print(f"grew history to revision {revision} in {time.perf_counter() - began:.0f} s", flush=True)
        measure(workdir, f"{options.keys} keys, rev {revision}", options.samples, options.keys, results)

    server = PykineServer(workdir)
    server.start(timeout=120)
    try:
        current = server.stub("KV").Range(pb.RangeRequest(key=b"x"), timeout=30).header.revision
        began = time.perf_counter()
        server.stub("KV").Compact(pb.CompactionRequest(revision=current - 1, physical=True), timeout=3600)
        print(f"compacted to {current - 1} in {time.perf_counter() - began:.0f} s", flush=True)
    finally:
        server.stop()
    measure(workdir, f"after compaction to {current - 1}", options.samples, options.keys, results)
    print("\n".join(results))


if __name__ == "__main__":
    main()
