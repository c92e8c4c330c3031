"""The SQL pykine's relational backends run, written once for every dialect.

The statements use only SQL that SQLite, PostgreSQL and MySQL/MariaDB all
accept; the few places where dialects differ (parameter marker, quoting of the
`key` column, an empty byte string, a planner hint, column types, indexes,
upserts, a self-referencing delete) come from a Dialect. Statements are
written with `?` markers and translated once per dialect.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from pykine.engine.records import (
    Change,
    KeySpan,
    KeyValueRow,
    KnownRows,
    LeaseRow,
    MemberRow,
    RangeQuery,
    RangeRows,
    ReadSet,
    Snapshot,
    SnapshotRead,
    WriteSet,
)

# 1: meta, kv, kv_history, lease. 2: member (the instances serving the datastore, for MemberList).
# 3: alarm (etcd's alarms, per member). 4: document (the auth store and its tokens).
SCHEMA_VERSION = 4


# Revision 1 is the empty store, as in etcd; -1 means never compacted.
INITIAL_META = {
    "schema_version": SCHEMA_VERSION,
    "revision": 1,
    "compact_revision": -1,
    "compacted_through": 0,
}

KV_FIELDS = ("key", "create_revision", "mod_revision", "version", "value", "lease")


@dataclass(frozen=True)
class Dialect:
    name: str
    marker: str
    # A zero-length byte string literal.
    empty_bytes: str
    # The key column written so the planner will not pick the key index for it.
    unindexed_key: str
    # Types in the schema: keys (indexed), values, names in meta.
    key_type: str
    bytes_type: str
    text_type: str
    integer_type: str
    real_type: str
    # A clause after a table's closing parenthesis (SQLite: WITHOUT ROWID).
    clustered: str
    # MySQL: `key` is a reserved word, indexes are declared inside CREATE TABLE
    # (MySQL 8 has no CREATE INDEX IF NOT EXISTS) and cannot be partial, upserts
    # say ON DUPLICATE KEY UPDATE, and a DELETE cannot select from its own table.
    mysql: bool = False
    # Whether rows can be locked with SELECT ... FOR UPDATE (SQLite and dqlite have one
    # write lock for the whole database, taken by BEGIN IMMEDIATE, and no row locks).
    row_locks: bool = True
    # Keys or lease ids per IN (...) list (dqlite 1.11 binds at most 255 parameters).
    in_chunk: int = 500


SQLITE = Dialect(
    "sqlite", "?", "x''", "+key", "BLOB", "BLOB", "TEXT", "INTEGER", "REAL", " WITHOUT ROWID", row_locks=False
)
# dqlite runs SQLite itself: the same SQL, with fewer parameters per statement.
DQLITE = replace(SQLITE, name="dqlite", in_chunk=250)
POSTGRES = Dialect("postgres", "%s", "'\\x'::bytea", "key", "BYTEA", "BYTEA", "TEXT", "BIGINT", "DOUBLE PRECISION", "")
# InnoDB indexes hold at most 3072 bytes: keys up to MYSQL_MAX_KEY_BYTES leave room for a revision beside them.
MYSQL_MAX_KEY_BYTES = 3000
MYSQL = Dialect(
    "mysql",
    "%s",
    "x''",
    "key",
    f"VARBINARY({MYSQL_MAX_KEY_BYTES})",
    "LONGBLOB",
    "VARCHAR(64)",
    "BIGINT",
    "DOUBLE",
    " ENGINE=InnoDB",
    mysql=True,
)

_KEY_WORD = re.compile(r"\bkey\b")


class Statements:
    """Every statement, in one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect

    def sql(self, text: str) -> str:
        if self.dialect.mysql:
            text = _KEY_WORD.sub("`key`", text)
        return text.replace("?", self.dialect.marker) if self.dialect.marker != "?" else text

    # -- schema ------------------------------------------------------------------

    @cached_property
    def tables(self) -> dict[str, str]:
        """Each table's CREATE TABLE statement (with its indexes, in MySQL)."""
        d = self.dialect
        k, b, i = d.key_type, d.bytes_type, d.integer_type
        tables = {
            "meta": f"name {d.text_type} PRIMARY KEY, value {i} NOT NULL",
            # The live state: one row per existing key.
            "kv": f"key {k} PRIMARY KEY, create_revision {i} NOT NULL, mod_revision {i} NOT NULL,"
            f" version {i} NOT NULL, value {b} NOT NULL, lease {i} NOT NULL",
            # Every change: one row per key per revision; deleted rows are tombstones.
            "kv_history": f"revision {i} NOT NULL, sub {i} NOT NULL, key {k} NOT NULL,"
            f" create_revision {i} NOT NULL, version {i} NOT NULL, value {b} NOT NULL, lease {i} NOT NULL,"
            f" deleted {i} NOT NULL, prev_revision {i} NOT NULL, PRIMARY KEY (revision, sub)",
            "lease": f"id {i} PRIMARY KEY, ttl {i} NOT NULL, expires_at {d.real_type} NOT NULL",
            # Each serving instance and when it last said it was alive.
            "member": f"id {i} PRIMARY KEY, name {b} NOT NULL, client_url {b} NOT NULL, seen_at {d.real_type} NOT NULL",
            # Raised alarms: one row per member and alarm type, as etcd's alarm store keeps them.
            "alarm": f"member_id {i} NOT NULL, alarm {i} NOT NULL, PRIMARY KEY (member_id, alarm)",
            # Small state every instance shares and changes under the row's lock (the auth store).
            "document": f"name {d.text_type} PRIMARY KEY, revision {i} NOT NULL, value {b} NOT NULL",
        }
        statements = {}
        for table, columns in tables.items():
            if d.mysql:
                columns += "".join(f", INDEX {name} ({on})" for name, of, on, _ in self.indexes if of == table)
            clustered = d.clustered if table != "lease" or d.mysql else ""
            statements[table] = self.sql(f"CREATE TABLE IF NOT EXISTS {table} ({columns}){clustered}")
        return statements

    @cached_property
    def indexes(self) -> list[tuple[str, str, str, str]]:
        """(name, table, columns, partial-index condition) of every index."""
        return [
            # Keys and revisions alone: exact counts read this small index instead of rows with values.
            ("kv_keys", "kv", "key, mod_revision", ""),
            # Keys by lease, for revoke and expiry: cost follows the lease's keys only.
            ("kv_lease", "kv", "lease", " WHERE lease != 0"),
            ("kv_history_key", "kv_history", "key, revision", ""),
            ("lease_expiry", "lease", "expires_at", ""),
        ]

    @cached_property
    def schema(self) -> list[str]:
        """The whole schema at SCHEMA_VERSION; every statement is idempotent."""
        statements = list(self.tables.values())
        if not self.dialect.mysql:
            statements += [
                f"CREATE INDEX IF NOT EXISTS {name} ON {of} ({on}){cond}" for name, of, on, cond in self.indexes
            ]
        return statements

    # -- pieces ------------------------------------------------------------------

    @staticmethod
    def span(span: KeySpan, column: str = "key") -> tuple[str, list[Any]]:
        if span.single_key:
            return f"{column} = ?", [span.start]
        if span.end is None:
            return f"{column} >= ?", [span.start]
        return f"{column} >= ? AND {column} < ?", [span.start, span.end]

    @staticmethod
    def filters(query: RangeQuery) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, op, bound in (
            ("mod_revision", ">=", query.min_mod_revision),
            ("mod_revision", "<=", query.max_mod_revision),
            ("create_revision", ">=", query.min_create_revision),
            ("create_revision", "<=", query.max_create_revision),
        ):
            if bound:
                clauses.append(f" AND {column} {op} ?")
                params.append(bound)
        return "".join(clauses), params

    @staticmethod
    def order(query: RangeQuery) -> str:
        if query.sort is None:
            return " ORDER BY key"
        direction = "DESC" if query.sort.descending else "ASC"
        if query.sort.field == "key":
            return f" ORDER BY key {direction}"
        return f" ORDER BY {query.sort.field} {direction}, key"

    def columns(self, keys_only: bool, table: str = "") -> str:
        prefix = f"{table}." if table else ""
        return ", ".join(
            self.dialect.empty_bytes if keys_only and field == "value" else prefix + field for field in KV_FIELDS
        )

    def state_at(self, span: KeySpan, revision: int, current: int) -> tuple[str, list[Any]]:
        """The state at an older revision R, in proportion to what changed since R.

        The live rows not changed after R, plus, for each key changed after R,
        its newest history row at or below R unless that is a tombstone.
        "Newest" orders by (revision, sub): one revision can hold two rows of
        a key (a txn that puts, then deletes it). The keys changed since R
        come from the primary key's revision range: the bounded range and the
        unindexed key keep planners from scanning the span's whole history
        in the key index. The source ends in a WHERE clause filters extend.
        """
        where, params = self.span(span)
        changed_where, _ = self.span(span, self.dialect.unindexed_key)
        source = f"""(
            SELECT key, create_revision, mod_revision, version, value, lease FROM kv
            WHERE {where} AND mod_revision <= ?
            UNION ALL
            SELECT old.key, old.create_revision, old.revision, old.version, old.value, old.lease
            FROM (SELECT DISTINCT key FROM kv_history WHERE revision > ? AND revision <= ? AND {changed_where})
                AS changed
            JOIN kv_history AS old ON old.key = changed.key
            WHERE (old.revision, old.sub) = (
                SELECT revision, sub FROM kv_history
                WHERE key = changed.key AND revision <= ? ORDER BY revision DESC, sub DESC LIMIT 1
            ) AND old.deleted = 0
        ) AS state WHERE TRUE"""
        return source, [*params, revision, revision, current, *params, revision]

    # -- statements ------------------------------------------------------------------

    @cached_property
    def revisions(self) -> str:
        """The revision and compact revision in one row: one statement, so one snapshot."""
        return (
            "SELECT revision.value, compact.value FROM meta AS revision JOIN meta AS compact ON TRUE"
            " WHERE revision.name = 'revision' AND compact.name = 'compact_revision'"
        )

    @cached_property
    def lock_revisions(self) -> str:
        """The same, with both rows locked until commit: a write batch's first statement on a database server."""
        return self.revisions + " FOR UPDATE" if self.dialect.row_locks else self.revisions

    @cached_property
    def meta(self) -> str:
        return self.sql("SELECT value FROM meta WHERE name = ?")

    @cached_property
    def set_meta(self) -> str:
        return self.sql("UPDATE meta SET value = ? WHERE name = ?")

    @cached_property
    def insert_meta(self) -> str:
        return self.sql("INSERT INTO meta (name, value) VALUES (?, ?)")

    def get(self, keys_only: bool) -> str:
        """One key at the current revision, with both revisions: one statement, so one snapshot."""
        return self.sql(
            f"SELECT revision.value, compact.value, {self.columns(keys_only, 'kv')}"
            " FROM meta AS revision JOIN meta AS compact ON TRUE LEFT JOIN kv ON kv.key = ?"
            " WHERE revision.name = 'revision' AND compact.name = 'compact_revision'"
        )

    def range(self, query: RangeQuery, current: int) -> tuple[str | None, str, list[Any], list[Any]]:
        """(count statement or None, rows statement, count params, rows params) for a range."""
        if query.revision and query.revision < current:
            source, params = self.state_at(query.span, query.revision, current)
        else:
            where, params = self.span(query.span)
            source = f"kv WHERE {where}"
        count = self.sql(f"SELECT count(*) FROM {source}") if query.count_only or query.need_count else None
        filters, filter_params = self.filters(query)
        rows = f"SELECT {self.columns(query.keys_only)} FROM {source}{filters}{self.order(query)}"
        rows_params = [*params, *filter_params]
        if query.limit:
            rows += " LIMIT ?"
            rows_params.append(query.limit)
        return count, self.sql(rows), params, rows_params

    def versions(self, query: RangeQuery) -> tuple[str, list[Any]]:
        """(key, mod_revision) of a current-state range, from the covering index kv_keys."""
        where, params = self.span(query.span)
        sql = f"SELECT key, mod_revision FROM kv WHERE {where} ORDER BY key"
        if query.limit:
            sql += " LIMIT ?"
            params = [*params, query.limit]
        return self.sql(sql), params

    def latest(self, span: KeySpan) -> tuple[str, list[Any]]:
        where, params = self.span(span)
        return self.sql(f"SELECT {self.columns(False)} FROM kv WHERE {where}"), params

    def latest_keys(self, count: int) -> str:
        return self.sql(f"SELECT {self.columns(False)} FROM kv WHERE key IN ({', '.join('?' * count)})")

    def state_rows(self, span: KeySpan, revision: int, current: int) -> tuple[str, list[Any]]:
        source, params = self.state_at(span, revision, current)
        return self.sql(f"SELECT {self.columns(False)} FROM {source} ORDER BY key"), params

    @cached_property
    def lease_keys_rows(self) -> str:
        return self.sql(f"SELECT {self.columns(False)} FROM kv WHERE lease = ?")

    def leases(self, count: int) -> str:
        return self.sql(f"SELECT id, ttl, expires_at FROM lease WHERE id IN ({', '.join('?' * count)})")

    def history(self, span: KeySpan) -> tuple[str, list[Any]]:
        """Changes in [first, last] with their previous rows; params: first, last, then the span's."""
        where, params = self.span(span, "h.key")
        return (
            self.sql(
                "SELECT h.key, h.create_revision, h.revision, h.version, h.value, h.lease, h.sub, h.deleted,"
                " p.create_revision, p.revision, p.version, p.value, p.lease"
                " FROM kv_history AS h LEFT JOIN kv_history AS p"
                " ON h.prev_revision > 0 AND p.key = h.key AND p.revision = h.prev_revision"
                f" WHERE h.revision >= ? AND h.revision <= ? AND {where}"
                " ORDER BY h.revision, h.sub"
            ),
            params,
        )

    @cached_property
    def insert_history(self) -> str:
        return self.sql(
            "INSERT INTO kv_history (revision, sub, key, create_revision, version, value, lease,"
            " deleted, prev_revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )

    @cached_property
    def delete_kv(self) -> str:
        return self.sql("DELETE FROM kv WHERE key = ?")

    def upsert(self, table: str, fields: tuple[str, ...]) -> str:
        """Insert a row or replace the one with the same first field (the primary key)."""
        if self.dialect.mysql:
            updates = ", ".join(f"{field} = VALUES({field})" for field in fields[1:])
            conflict = f" ON DUPLICATE KEY UPDATE {updates}"
        else:
            updates = ", ".join(f"{field} = excluded.{field}" for field in fields[1:])
            conflict = f" ON CONFLICT ({fields[0]}) DO UPDATE SET {updates}"
        markers = ", ".join("?" * len(fields))
        return self.sql(f"INSERT INTO {table} ({', '.join(fields)}) VALUES ({markers}){conflict}")

    @cached_property
    def upsert_kv(self) -> str:
        return self.upsert("kv", KV_FIELDS)

    @cached_property
    def upsert_lease(self) -> str:
        return self.upsert("lease", ("id", "ttl", "expires_at"))

    @cached_property
    def delete_lease(self) -> str:
        return self.sql("DELETE FROM lease WHERE id = ?")

    @cached_property
    def lease(self) -> str:
        return self.sql("SELECT id, ttl, expires_at FROM lease WHERE id = ?")

    @cached_property
    def lease_key_names(self) -> str:
        return self.sql("SELECT key FROM kv WHERE lease = ? ORDER BY key")

    @cached_property
    def lease_ids(self) -> str:
        return "SELECT id FROM lease ORDER BY id"

    @cached_property
    def due_leases(self) -> str:
        return self.sql("SELECT id FROM lease WHERE expires_at <= ? ORDER BY expires_at LIMIT ?")

    @cached_property
    def renew_leases(self) -> str:
        return self.sql("UPDATE lease SET expires_at = ? + ttl")

    @cached_property
    def upsert_member(self) -> str:
        return self.upsert("member", ("id", "name", "client_url", "seen_at"))

    @cached_property
    def members(self) -> str:
        return self.sql("SELECT id, name, client_url FROM member WHERE seen_at >= ? ORDER BY id")

    @cached_property
    def delete_member(self) -> str:
        return self.sql("DELETE FROM member WHERE id = ?")

    @cached_property
    def alarms(self) -> str:
        return self.sql("SELECT member_id, alarm FROM alarm ORDER BY alarm, member_id")

    @cached_property
    def insert_alarm(self) -> str:
        """Raising a raised alarm changes nothing."""
        if self.dialect.mysql:
            return self.sql("INSERT IGNORE INTO alarm (member_id, alarm) VALUES (?, ?)")
        return self.sql("INSERT INTO alarm (member_id, alarm) VALUES (?, ?) ON CONFLICT DO NOTHING")

    @cached_property
    def delete_alarm(self) -> str:
        return self.sql("DELETE FROM alarm WHERE member_id = ? AND alarm = ?")

    @cached_property
    def document(self) -> str:
        return self.sql("SELECT revision, value FROM document WHERE name = ?")

    @cached_property
    def lock_document(self) -> str:
        """The row, locked until the transaction ends (SQLite's write transaction locks everything)."""
        return self.document + " FOR UPDATE" if self.dialect.row_locks else self.document

    @cached_property
    def lock_compaction(self) -> str:
        """How far compaction has got, locked until commit, so that instances take turns."""
        return "SELECT value FROM meta WHERE name = 'compacted_through'" + (
            " FOR UPDATE" if self.dialect.row_locks else ""
        )

    @cached_property
    def insert_document(self) -> str:
        """An empty document at revision 0, unless it exists."""
        if self.dialect.mysql:
            return self.sql("INSERT IGNORE INTO document (name, revision, value) VALUES (?, 0, ?)")
        return self.sql("INSERT INTO document (name, revision, value) VALUES (?, 0, ?) ON CONFLICT DO NOTHING")

    @cached_property
    def set_document(self) -> str:
        return self.sql("UPDATE document SET revision = ?, value = ? WHERE name = ?")

    @cached_property
    def compact_superseded(self) -> str:
        """A row at revision r in (done, upto] supersedes every older row of its key."""
        older = (
            " FROM kv_history AS cur JOIN kv_history AS old ON old.key = cur.key"
            " AND (old.revision < cur.revision OR (old.revision = cur.revision AND old.sub < cur.sub))"
            " WHERE cur.revision > ? AND cur.revision <= ?"
        )
        if self.dialect.mysql:  # MySQL cannot delete from a table its subquery reads; a joined delete can
            return self.sql(f"DELETE old{older}")
        return self.sql(f"DELETE FROM kv_history WHERE (revision, sub) IN (SELECT old.revision, old.sub{older})")

    @cached_property
    def compact_tombstones(self) -> str:
        """A tombstone at or below the compact revision goes as well."""
        return self.sql("DELETE FROM kv_history WHERE revision > ? AND revision <= ? AND deleted = 1")


# The tables that bring a schema from version N (the key) to N + 1; each upgrade runs under the schema lock.
MIGRATIONS: dict[int, list[str]] = {1: ["member"], 2: ["alarm"], 3: ["document"]}


def upgrade_statements(sql: Statements, stored: int) -> list[tuple[str, list[Any]]]:
    """What brings a datastore at schema version `stored` to SCHEMA_VERSION, ending with the new version."""
    statements: list[tuple[str, list[Any]]] = []
    for version in range(stored, SCHEMA_VERSION):
        statements += [(sql.tables[table], []) for table in MIGRATIONS[version]]
    if stored < SCHEMA_VERSION:
        statements.append((sql.set_meta, [SCHEMA_VERSION, "schema_version"]))
    return statements


def member_params(member: MemberRow, now: float) -> tuple[Any, ...]:
    return member.id, member.name.encode(), member.client_url.encode(), now


def member_rows(rows: list[tuple[Any, ...]]) -> list[MemberRow]:
    return [MemberRow(row[0], bytes(row[1]).decode(), bytes(row[2]).decode()) for row in rows]


def history_change(row: tuple[Any, ...]) -> Change:
    """A change from SQL.history's columns: the row, its sub, tombstone flag and previous row."""
    return Change(
        KeyValueRow(*row[:6]),
        row[6],
        bool(row[7]),
        KeyValueRow(row[0], *row[8:]) if row[9] is not None else None,
    )


def write_statements(sql: Statements, snapshot: Snapshot, write_set: WriteSet) -> list[tuple[str, list[Any]]]:
    """The statements and rows that store a WriteSet, in order; any backend runs them in its transaction."""
    statements: list[tuple[str, list[Any]]] = []
    if write_set.changes:
        statements.append(
            (
                sql.insert_history,
                [
                    (
                        c.kv.mod_revision,
                        c.sub,
                        c.kv.key,
                        c.kv.create_revision,
                        c.kv.version,
                        c.kv.value,
                        c.kv.lease,
                        int(c.deleted),
                        c.prev.mod_revision if c.prev else 0,
                    )
                    for c in write_set.changes
                ],
            )
        )
        final = {c.kv.key: c for c in write_set.changes}
        deleted = [(key,) for key, c in final.items() if c.deleted]
        if deleted:
            statements.append((sql.delete_kv, deleted))
        live = [c.kv for c in final.values() if not c.deleted]
        if live:
            statements.append((sql.upsert_kv, live))
    if write_set.lease_puts:
        statements.append((sql.upsert_lease, write_set.lease_puts))
    if write_set.lease_deletes:
        statements.append((sql.delete_lease, [(lease_id,) for lease_id in write_set.lease_deletes]))
    if write_set.revision != snapshot.revision:
        statements.append((sql.set_meta, [(write_set.revision, "revision")]))
    if write_set.compact_revision != snapshot.compact_revision:
        statements.append((sql.set_meta, [(write_set.compact_revision, "compact_revision")]))
    return statements


@dataclass(frozen=True)
class SnapshotQuery:
    """One statement of a snapshot read; `history` says which fixed-revision read it answers."""

    statement: str
    params: list[Any]
    kind: str  # "latest", "history" or "leases"
    history: SnapshotRead | None = None


def snapshot_queries(sql: Statements, reads: ReadSet, revision: int, compact: int) -> list[SnapshotQuery]:
    """The statements that read what a batch needs, run in one snapshot at `revision`."""
    queries: list[SnapshotQuery] = []
    singles: list[bytes] = []
    for read in reads.spans:
        if read.revision and read.revision < revision:
            if read.revision >= compact and not read.span.empty:
                statement, params = sql.state_rows(read.span, read.revision, revision)
                queries.append(SnapshotQuery(statement, params, "history", read))
        elif read.span.single_key:
            singles.append(read.span.start)
        elif not read.span.empty:
            statement, params = sql.latest(read.span)
            queries.append(SnapshotQuery(statement, params, "latest"))
    size = sql.dialect.in_chunk
    for start in range(0, len(singles), size):
        chunk = singles[start : start + size]
        queries.append(SnapshotQuery(sql.latest_keys(len(chunk)), chunk, "latest"))
    for lease_id in reads.lease_keys:
        queries.append(SnapshotQuery(sql.lease_keys_rows, [lease_id], "latest"))
    lease_ids = list(reads.leases)
    for start in range(0, len(lease_ids), size):
        chunk = lease_ids[start : start + size]
        queries.append(SnapshotQuery(sql.leases(len(chunk)), chunk, "leases"))
    return queries


def assemble_snapshot(
    revision: int, compact: int, answers: list[tuple[SnapshotQuery, list[tuple[Any, ...]]]]
) -> Snapshot:
    """The Snapshot from each snapshot query's rows."""
    latest: dict[bytes, KeyValueRow] = {}
    history: dict[SnapshotRead, list[KeyValueRow]] = {}
    leases: dict[int, LeaseRow] = {}
    for query, rows in answers:
        if query.kind == "history":
            assert query.history is not None
            history[query.history] = list(map(KeyValueRow._make, rows))
        elif query.kind == "latest":
            for row in rows:
                latest[row[0]] = KeyValueRow._make(row)
        else:
            for row in rows:
                leases[row[0]] = LeaseRow._make(row)
    return Snapshot(revision, compact, list(latest.values()), history, leases)


def known_rows(versions: list[tuple[bytes, int]], known: KnownRows) -> tuple[list[Any], dict[bytes, int]]:
    """A range's rows as what `known` gives for its (key, mod_revision) pairs; the keys still to read, by place."""
    rows: list[Any] = list(map(known, versions))
    if None not in rows:
        return rows, {}
    return rows, {versions[index][0]: index for index, row in enumerate(rows) if row is None}


def key_chunks(keys: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    """Keys in lists of at most `size`, for `latest_keys` statements of bounded length."""
    batch = list(keys)
    for start in range(0, len(batch), size):
        yield batch[start : start + size]


def place_rows(rows: list[Any], missing: dict[bytes, int], fetched: Iterable[Any]) -> None:
    """Put whole rows read by key into the places known_rows left for them."""
    for row in fetched:
        kv = KeyValueRow._make(row)
        rows[missing[kv.key]] = kv


class CountCache:
    """Exact counts by (statement, parameters, revision).

    The live keys of a span at a revision never change, so a count read at
    revision R is the answer for every later count of that span while the
    store is still at R. Counting is a scan of the span's index entries
    (80 µs for 2,000 keys on SQLite, a round trip and more on a server);
    repeated counts between writes (Kubernetes' periodic object counts over
    every resource) cost a lookup instead.
    """

    LIMIT = 1024

    def __init__(self) -> None:
        self._counts: dict[tuple[str, tuple[Any, ...], int], int] = {}

    def get(self, statement: str, params: list[Any], revision: int) -> int | None:
        return self._counts.get((statement, tuple(params), revision))

    def put(self, statement: str, params: list[Any], revision: int, count: int) -> int:
        if len(self._counts) >= self.LIMIT:
            self._counts.clear()
        self._counts[(statement, tuple(params), revision)] = count
        return count


def range_rows(query: RangeQuery, revision: int, compact: int, count: int | None, rows: list[Any]) -> RangeRows:
    """A RangeRows from a range's count (None when not read) and rows."""
    kvs = list(map(KeyValueRow._make, rows))
    return RangeRows(revision, compact, kvs, count if count is not None else len(kvs))
