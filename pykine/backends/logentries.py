"""The entries of a replicated write log, and their bytes.

A log-based backend (backends/jetstream.py) stores every change to the
datastore as one entry of an ordered log; each instance applies the entries
in order to its own SQLite view (backends/logview.py). An entry holds what
the view must store, not the request that caused it, so applying it needs no
etcd rules and gives the same rows on every instance.

The bytes are msgpack arrays: compact, fast in both directions, and safe to
decode from a server shared with others (no code runs on decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from pykine.engine.records import Change, KeyValueRow, LeaseRow, WriteSet

# The first element of every entry: bumped when the layout changes incompatibly.
FORMAT = 1


@dataclass(frozen=True, slots=True)
class DocumentWrite:
    """A shared document (the auth store) replaced at a new revision."""

    name: str
    revision: int
    value: bytes


@dataclass(frozen=True, slots=True)
class AlarmWrite:
    """One member's alarm raised or cleared."""

    member_id: int
    alarm: int
    raised: bool


@dataclass(frozen=True, slots=True)
class LeaseRenewal:
    """Every lease given its full TTL from `now` (a new duty holder does this, as a new etcd leader)."""

    now: float


Entry = WriteSet | DocumentWrite | AlarmWrite | LeaseRenewal


class EntryError(ValueError):
    """Bytes in the log that are not an entry this pykine understands."""


def encode(entry: Entry) -> bytes:
    if isinstance(entry, WriteSet):
        body: list[object] = [
            "w",
            entry.revision,
            entry.compact_revision,
            [(*c.kv, c.sub, c.deleted, c.prev.mod_revision if c.prev is not None else 0) for c in entry.changes],
            [tuple(lease) for lease in entry.lease_puts],
            entry.lease_deletes,
        ]
    elif isinstance(entry, DocumentWrite):
        body = ["d", entry.name, entry.revision, entry.value]
    elif isinstance(entry, AlarmWrite):
        body = ["a", entry.member_id, entry.alarm, entry.raised]
    else:
        body = ["r", entry.now]
    return msgpack.packb([FORMAT, *body], use_bin_type=True)


def decode(data: bytes) -> Entry:
    try:
        fields = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
        if not isinstance(fields, list) or not fields or fields[0] != FORMAT:
            raise EntryError(f"unknown entry format {fields[0] if isinstance(fields, list) and fields else None!r}")
        kind = fields[1]
        if kind == "w":
            revision, compact, changes, lease_puts, lease_deletes = fields[2:]
            return WriteSet(
                revision,
                compact,
                [_change(row) for row in changes],
                [LeaseRow(*lease) for lease in lease_puts],
                list(lease_deletes),
            )
        if kind == "d":
            return DocumentWrite(fields[2], fields[3], bytes(fields[4]))
        if kind == "a":
            return AlarmWrite(fields[2], fields[3], bool(fields[4]))
        if kind == "r":
            return LeaseRenewal(float(fields[2]))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise EntryError(f"undecodable log entry: {exc}") from exc
    raise EntryError(f"unknown log entry kind {kind!r}")


def _change(row: list[object]) -> Change:
    """A change as the view stores it: the previous row is known by its revision only (the view has the rest)."""
    key, create, mod, version, value, lease, sub, deleted, prev_revision = row
    kv = KeyValueRow(key, create, mod, version, value, lease)  # type: ignore[arg-type]
    prev = KeyValueRow(key, 0, prev_revision, 0, b"", 0) if prev_revision else None  # type: ignore[arg-type]
    return Change(kv, sub, bool(deleted), prev)  # type: ignore[arg-type]
