"""Datastore backends, chosen by the --endpoint DSN."""

from __future__ import annotations

from urllib.parse import parse_qsl

from pykine.backends.base import Backend, BackendError, ConnectionOptions
from pykine.redaction import redact

DEFAULT_SQLITE_PATH = "./db/state.db"

# Options kine's SQLite DSNs carry for its Go driver that have no meaning here.
IGNORED_SQLITE_OPTIONS = {"cache", "_txlock", "mode", "_fk", "_foreign_keys"}


def open_backend(endpoint: str, options: ConnectionOptions | None = None) -> Backend:
    """Build the backend an endpoint names; raise BackendError for a bad one."""
    options = options or ConnectionOptions()
    if not endpoint:
        return _sqlite(DEFAULT_SQLITE_PATH, "", options)
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise BackendError(redact(f"endpoint {endpoint!r} is not a DSN (expected scheme://...)"))
    if options.identity_provider and scheme not in ("postgres", "postgresql", "mysql"):
        raise BackendError(f"--identity-provider applies to postgres:// and mysql:// endpoints, not {scheme}://")
    if scheme == "sqlite":
        path, _, query = rest.partition("?")
        return _sqlite(path or DEFAULT_SQLITE_PATH, query, options)
    if scheme in ("postgres", "postgresql"):
        from pykine.backends.postgres import PostgresBackend

        return PostgresBackend(endpoint, options)
    if scheme == "mysql":
        from pykine.backends.mysql import MySQLBackend

        return MySQLBackend(endpoint, options)
    if scheme in ("nats", "tls"):
        from pykine.backends.jetstream import JetStreamBackend

        return JetStreamBackend(endpoint, options)
    if scheme == "dqlite":
        from pykine.backends.dqlite import DqliteBackend

        return DqliteBackend(endpoint, options)
    raise BackendError(
        f"unknown endpoint scheme {scheme!r} "
        "(supported: sqlite, postgres, mysql, nats, dqlite; http and https pass through to etcd)"
    )


def _sqlite(path: str, query: str, options: ConnectionOptions) -> Backend:
    from pykine.backends.sqlite import SQLiteBackend

    if options.identity_provider:
        raise BackendError("--identity-provider applies to postgres:// and mysql:// endpoints, not SQLite")

    synchronous = "FULL"
    busy_timeout_ms = 30000
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in ("_synchronous", "synchronous", "_sync"):
            synchronous = value
        elif name in ("_busy_timeout", "busy_timeout", "_timeout"):
            if not value.isdigit():
                raise BackendError(f"sqlite option {name} must be milliseconds, got {value!r}")
            busy_timeout_ms = int(value)
        elif name in ("_journal", "_journal_mode"):
            if value.upper() != "WAL":
                raise BackendError("pykine runs SQLite in WAL mode only")
        elif name not in IGNORED_SQLITE_OPTIONS:
            raise BackendError(f"unknown sqlite option {name!r}")
    return SQLiteBackend(
        path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, poll_interval=options.poll_interval
    )
