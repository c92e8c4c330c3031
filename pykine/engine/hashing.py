"""Hash and HashKV: a deterministic digest of pykine's MVCC state.

etcd hashes its bbolt pages, which pykine has none of, so the values differ
from etcd's. What is kept is the purpose: two members holding the same data
report the same hash, so `etcdctl endpoint hashkv` finds a diverging member.
Here that means every instance of one datastore, and any two datastores
holding the same history, whatever the backend, because only the logical
rows are hashed, in a fixed order and a fixed byte layout:

- HashKV(R): every key revision in (compact revision, R], in revision order,
  each as its revision, sub-index, create revision, version, lease, deleted
  flag, key and value. Rows above the compact revision are never removed by
  compaction, so the value does not depend on how far physical compaction has
  gone. R = 0 means the current revision.
- Hash: the current state, every live key in key order with its create and
  mod revision, version, lease and value.

CRC-32 (zlib's) over those bytes, as etcd's is a CRC-32 (Castagnoli) too.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pykine.backends.base import Backend
from pykine.engine.errors import CompactedError, FutureRevisionError, UnavailableError
from pykine.engine.records import KeySpan, RangeQuery

# Revisions of history, and live keys, read per step.
STEP = 1000
# A compaction that lands while hashing moves the window; start again, a few times at most.
ATTEMPTS = 3
EVERYTHING = KeySpan(b"\x00", None)
_CHANGE = struct.Struct(">qqqqq?II")
_KEY = struct.Struct(">qqqqII")


@dataclass(frozen=True, slots=True)
class HashResult:
    hash: int
    # The revision hashed up to and the compact revision below it (-1: never compacted, as etcd says).
    revision: int
    compact_revision: int
    # The datastore's revision when the hash was taken (for the response header).
    current_revision: int


async def _revisions(backend: Backend) -> tuple[int, int]:
    try:
        return await backend.revisions()
    except Exception as exc:
        raise UnavailableError(str(exc)) from exc


async def hash_kv(backend: Backend, revision: int) -> HashResult:
    """etcd's HashKV checks and answer, over pykine's history rows."""
    for _ in range(ATTEMPTS):
        current, compact = await _revisions(backend)
        # etcd's order and bounds: the compacted revision itself cannot be asked for.
        if 0 < revision <= compact:
            raise CompactedError()
        if revision > current:
            raise FutureRevisionError()
        target = revision or current
        digest = 0
        moved = False
        first = compact + 1
        while first <= target and not moved:
            last = min(target, first + STEP - 1)
            history = await backend.read_history(first, last, EVERYTHING)
            if history.compact_revision != compact:
                moved = True
                break
            for change in history.changes:
                kv = change.kv
                digest = zlib.crc32(
                    _CHANGE.pack(
                        kv.mod_revision,
                        change.sub,
                        kv.create_revision,
                        kv.version,
                        kv.lease,
                        change.deleted,
                        len(kv.key),
                        len(kv.value),
                    ),
                    digest,
                )
                digest = zlib.crc32(kv.value, zlib.crc32(kv.key, digest))
            first = last + 1
        if not moved:
            return HashResult(digest, target, compact if compact > 0 else -1, current)
    raise UnavailableError("the datastore kept compacting while its history was being hashed")


async def hash_state(backend: Backend) -> HashResult:
    """The live keys at the current revision, read in key order in steps."""
    for _ in range(ATTEMPTS):
        current, compact = await _revisions(backend)
        digest = 0
        start = b"\x00"
        while True:
            query = RangeQuery(KeySpan(start, None), revision=current, limit=STEP)
            try:
                rows = await backend.read_range(query)
            except Exception as exc:
                raise UnavailableError(str(exc)) from exc
            if rows.compact_revision > current:
                break  # compacted past the revision being read: start again at the new one
            for row in rows.rows:
                assert not isinstance(row, bytes)  # no encoded rows were offered
                digest = zlib.crc32(
                    _KEY.pack(
                        row.create_revision, row.mod_revision, row.version, row.lease, len(row.key), len(row.value)
                    ),
                    digest,
                )
                digest = zlib.crc32(row.value, zlib.crc32(row.key, digest))
            if len(rows.rows) < STEP:
                return HashResult(digest, current, compact if compact > 0 else -1, current)
            start = rows.rows[-1].key + b"\x00"
    raise UnavailableError("the datastore kept compacting while its keys were being hashed")
