"""dqlite's wire protocol (pykine/backends/dqlitewire.py) and the embedded node (dqlitenode.py).

The encoding is checked byte for byte against the protocol's layout, then
spoken to a real node of Debian's libdqlite 1.11 embedded through ctypes:
pykine's own schema, parameters of every type, explicit transactions, rows
that span several ROWS messages, and failures.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from databases import free_port

from pykine.backends import dqlitewire as wire
from pykine.backends.dqlitenode import BOOTSTRAP_ID, DqliteNode
from pykine.backends.sqlite import SQL


def test_message_layout() -> None:
    assert wire.handshake() == struct.pack("<Q", 1)
    # header: body length in words, type, schema, unused; the body padded to a word
    assert wire.leader() == struct.pack("<IBBH", 1, wire.LEADER, 0, 0) + bytes(8)
    assert wire.text("ab") == b"ab\0" + bytes(5)
    assert wire.text("abcdefg") == b"abcdefg\0"
    with pytest.raises(ValueError):
        wire.text("a\0b")


def test_parameters_layout() -> None:
    encoded = wire.parameters([7, "hi", b"xyz", None, 1.5, True])
    types = bytes([6, wire.INTEGER, wire.TEXT, wire.BLOB, wire.NULL, wire.FLOAT, wire.BOOLEAN]) + bytes(1)
    values = (
        struct.pack("<q", 7)
        + b"hi\0" + bytes(5)
        + struct.pack("<Q", 3) + b"xyz" + bytes(5)
        + bytes(8)
        + struct.pack("<d", 1.5)
        + struct.pack("<Q", 1)
    )  # fmt: skip
    assert encoded == types + values
    assert wire.parameters([]) == b""
    assert len(wire.parameters([0] * 255)) == 256 + 255 * 8
    with pytest.raises(ValueError, match="at most 255 parameters"):
        wire.parameters([0] * 256)


def test_decoder_reassembles_messages_from_any_split() -> None:
    stream = wire.message(wire.SERVER, struct.pack("<Q", 3) + wire.text("127.0.0.1:9")) + wire.message(wire.EMPTY, b"")
    for cut in range(len(stream) + 1):
        decoder = wire.Decoder()
        got = list(decoder.feed(stream[:cut])) + list(decoder.feed(stream[cut:]))
        assert [kind for kind, _ in got] == [wire.SERVER, wire.EMPTY]
        assert wire.parse_server(got[0][1]) == (3, "127.0.0.1:9")


def test_rows_layout() -> None:
    """Two columns, two rows: 4-bit types, two per byte, padded to a word, then the values; then the end marker."""
    body = (
        struct.pack("<Q", 2) + wire.text("k") + wire.text("v")
        + bytes([wire.INTEGER | wire.BLOB << 4]) + bytes(7)
        + struct.pack("<q", -1) + struct.pack("<Q", 2) + b"ab" + bytes(6)
        + bytes([wire.NULL | wire.TEXT << 4]) + bytes(7) + bytes(8) + wire.text("x")
        + struct.pack("<Q", wire.ROWS_DONE)
    )  # fmt: skip
    rows = wire.parse_rows(body)
    assert (rows.columns, rows.rows, rows.more) == (["k", "v"], [(-1, b"ab"), (None, "x")], False)


class Client:
    """A blocking client on the codec: one request, one response."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = wire.Decoder()
        self.pending: list[tuple[int, bytes]] = []
        self.sock.sendall(wire.handshake())

    def call(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        return self.receive()

    def receive(self) -> tuple[int, bytes]:
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "the node closed the connection"
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def rows(self, request: bytes) -> list[tuple[Any, ...]]:
        kind, body = self.call(request)
        wire.check(kind, body, wire.ROWS)
        batch = wire.parse_rows(body)
        rows = list(batch.rows)
        while batch.more:
            kind, body = self.receive()
            wire.check(kind, body, wire.ROWS)
            batch = wire.parse_rows(body)
            rows += batch.rows
        return rows

    def exec(self, sql: str, values: list[Any] | None = None) -> tuple[int, int]:
        kind, body = self.call(wire.exec_sql(0, sql, values or []))
        wire.check(kind, body, wire.RESULT)
        return wire.parse_result(body)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[DqliteNode]:
    started = DqliteNode(BOOTSTRAP_ID, f"127.0.0.1:{free_port()}", str(tmp_path / "node"))
    started.start()
    try:
        yield started
    finally:
        started.close()


def test_a_node_serves_pykines_schema_over_the_wire(node: DqliteNode) -> None:
    client = Client(node.address)
    try:
        wire.check(*client.call(wire.client(0)), wire.WELCOME)
        kind, body = client.call(wire.leader())
        wire.check(kind, body, wire.SERVER)
        assert wire.parse_server(body) == (BOOTSTRAP_ID, node.address)  # a bootstrapped node leads at once
        kind, body = client.call(wire.cluster())
        wire.check(kind, body, wire.SERVERS)
        assert wire.parse_servers(body) == [(BOOTSTRAP_ID, node.address, wire.VOTER)]
        wire.check(*client.call(wire.open_database("pykine")), wire.DB)

        for statement in SQL.schema:  # pykine's SQLite schema, unchanged
            client.exec(statement)
        client.exec("BEGIN IMMEDIATE")
        for n in range(300):
            row = [b"k/%03d" % n, n + 2, n + 2, 1, b"v" * 1000, 0]
            client.exec(
                "INSERT INTO kv (key, create_revision, mod_revision, version, value, lease) VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
        client.exec("COMMIT")
        rows = client.rows(wire.query_sql(0, "SELECT key, mod_revision, value FROM kv ORDER BY key"))
        assert len(rows) == 300  # about four 1 KB rows fit one ROWS message: many messages
        assert rows[7] == (b"k/007", 9, b"v" * 1000)

        kind, body = client.call(wire.prepare(0, "SELECT ?, ?, ?, ?, ?"))
        wire.check(kind, body, wire.STMT)
        db, statement, count = wire.parse_stmt(body)
        assert count == 5
        assert client.rows(wire.query(db, statement, [-5, 2.5, "t", b"\0b", None])) == [(-5, 2.5, "t", b"\0b", None)]
        wire.check(*client.call(wire.finalize(db, statement)), wire.EMPTY)

        kind, body = client.call(wire.exec_sql(0, "INSERT INTO nowhere VALUES (1)"))
        with pytest.raises(wire.DqliteFailure) as failure:
            wire.check(kind, body, wire.RESULT)
        assert failure.value.code == 1 and "no such table: nowhere" in failure.value.message
        assert client.exec("DELETE FROM kv WHERE key < ?", [b"k/100"])[1] == 100  # the connection carries on
    finally:
        client.close()


def test_data_survives_a_restart_of_the_node(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    for attempt in range(2):
        node = DqliteNode(BOOTSTRAP_ID, address, str(tmp_path / "node"))
        node.start()
        client = Client(address)
        try:
            wire.check(*client.call(wire.client(0)), wire.WELCOME)
            wire.check(*client.call(wire.open_database("pykine")), wire.DB)
            if attempt == 0:
                client.exec("CREATE TABLE t (n INTEGER)")
                client.exec("INSERT INTO t VALUES (?)", [42])
            else:
                assert client.rows(wire.query_sql(0, "SELECT n FROM t")) == [(42,)]
        finally:
            client.close()
            node.close()


def test_the_asyncio_client_finds_the_leader_through_another_node(tmp_path: Path) -> None:
    """A second node joins (ADD, then ASSIGN voter); asked through it, the client ends up on the leader."""
    import asyncio

    from pykine.backends.dqliteclient import NoLeader, connect_leader
    from pykine.backends.dqlitenode import generate_node_id

    first = DqliteNode(BOOTSTRAP_ID, f"127.0.0.1:{free_port()}", str(tmp_path / "first"))
    second_address = f"127.0.0.1:{free_port()}"
    second = DqliteNode(generate_node_id(), second_address, str(tmp_path / "second"))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there

    async def scenario() -> None:
        leader = await connect_leader([first.address], "pykine")
        await leader.call(wire.add(second.id, second.address), wire.EMPTY)
        await leader.call(wire.assign(second.id, wire.VOTER), wire.EMPTY)
        assert sorted(await leader.cluster()) == sorted(
            [(BOOTSTRAP_ID, first.address, wire.VOTER), (second.id, second.address, wire.VOTER)]
        )
        await leader.exec_sql("CREATE TABLE t (k BLOB PRIMARY KEY, v BLOB)")
        await leader.close()
        via_second = await connect_leader([dead, second.address], "pykine")
        try:
            assert via_second.address == first.address
            await via_second.exec_sql("INSERT INTO t VALUES (?, ?)", [b"k", b"v"])
            assert await via_second.query_sql("SELECT k, v FROM t") == [(b"k", b"v")]
        finally:
            await via_second.close()
        with pytest.raises(NoLeader, match="no dqlite leader"):
            await connect_leader([dead], "pykine")

    first.start()
    second.start()
    try:
        asyncio.run(scenario())
    finally:
        second.close()
        first.close()
