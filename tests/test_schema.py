"""The stored schema version on every backend: creation, upgrade, refusal, and instances starting together.

Each older schema is the current one without the tables added since (schema 1
lacks `member`, `alarm` and `document`; 2 lacks `alarm` and `document`; 3
lacks `document`), so an older datastore is made by removing those tables and
writing its version; starting pykine on it must upgrade it in place.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator

import databases
import pytest
from harness import ROOT, PykineServer, call, pb

BACKENDS = ("sqlite", "postgres", "mysql")
SCHEMA_VERSION = 4
# The tables each older version lacks.
MISSING = {1: ["member", "alarm", "document"], 2: ["alarm", "document"], 3: ["document"]}


@pytest.fixture(params=BACKENDS)
def endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty datastore on each backend."""
    if request.param == "sqlite":
        yield f"sqlite://{os.path.join(tempfile.mkdtemp(prefix='pykine-schema-'), 'state.db')}"
    else:
        yield databases.database_endpoint(request.param, f"pykine_schema_{uuid.uuid4().hex[:12]}")


def stored_version(endpoint: str) -> int:
    return int(databases.run_sql(endpoint, "SELECT value FROM meta WHERE name = 'schema_version'")[0][0])


def start(endpoint: str) -> PykineServer:
    server = PykineServer(tempfile.mkdtemp(prefix="pykine-schema-"), endpoint=endpoint)
    server.start()
    return server


@pytest.mark.parametrize("old_version", sorted(MISSING))
def test_an_older_datastore_is_upgraded_in_place(endpoint: str, old_version: int) -> None:
    server = start(endpoint)
    try:
        assert call(server, "KV", "Put", pb.PutRequest(key=b"kept", value=b"v1 data")).ok
    finally:
        server.stop()
    assert stored_version(endpoint) == SCHEMA_VERSION
    for table in MISSING[old_version]:
        databases.run_sql(endpoint, f"DROP TABLE {table}")
    databases.run_sql(endpoint, f"UPDATE meta SET value = {old_version} WHERE name = 'schema_version'")

    server = start(endpoint)
    try:
        got = call(server, "KV", "Range", pb.RangeRequest(key=b"kept"))
        assert got.ok and [(kv.key, kv.value, kv.mod_revision) for kv in got.response.kvs] == [(b"kept", b"v1 data", 2)]
        members = call(server, "Cluster", "MemberList", pb.MemberListRequest())
        assert members.ok and [list(m.clientURLs) for m in members.response.members] == [[f"http://{server.address}"]]
        raise_one = pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, memberID=7, alarm=pb.NOSPACE)
        assert call(server, "Maintenance", "Alarm", raise_one).ok
        listed = call(server, "Maintenance", "Alarm", pb.AlarmRequest(action=pb.AlarmRequest.GET))
        assert [(a.memberID, a.alarm) for a in listed.response.alarms] == [(7, pb.NOSPACE)]
    finally:
        server.stop()
    assert stored_version(endpoint) == SCHEMA_VERSION


def test_a_newer_schema_is_refused(endpoint: str) -> None:
    start(endpoint).stop()
    databases.run_sql(endpoint, "UPDATE meta SET value = 99 WHERE name = 'schema_version'")
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "pykine", "--listen-address=127.0.0.1:0", f"--endpoint={endpoint}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2, done
    assert "schema version 99 is newer than this pykine supports (4)" in done.stderr, done.stderr
    assert stored_version(endpoint) == 99  # left as it was


def test_instances_starting_together_create_one_schema(endpoint: str) -> None:
    """Three instances start at the same moment on an empty datastore: one schema, one cluster id."""
    servers = [PykineServer(tempfile.mkdtemp(prefix="pykine-schema-"), endpoint=endpoint) for _ in range(3)]
    errors: list[BaseException] = []

    def launch(server: PykineServer) -> None:
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=launch, args=(server,)) for server in servers]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        headers = [call(server, "KV", "Range", pb.RangeRequest(key=b"x")).response.header for server in servers]
        assert len({header.cluster_id for header in headers}) == 1
        assert all(header.revision == 1 for header in headers)
        rows = databases.run_sql(endpoint, "SELECT name, value FROM meta ORDER BY name")
        names = [row[0] for row in rows]
        assert sorted(names) == ["cluster_id", "compact_revision", "compacted_through", "revision", "schema_version"], (
            rows
        )
        assert stored_version(endpoint) == SCHEMA_VERSION
        listed = call(servers[0], "Cluster", "MemberList", pb.MemberListRequest())
        assert sorted(list(m.clientURLs) for m in listed.response.members) == sorted(
            [[f"http://{server.address}"] for server in servers]
        )
    finally:
        for server in servers:
            server.stop()
