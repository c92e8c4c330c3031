"""dqlite's client wire protocol (version 1, as libdqlite 1.11 speaks it), without I/O.

Requests are built as bytes; a Decoder takes received bytes and yields whole
messages; parse functions turn response bodies into values. The framing:
8-byte words, little-endian integers; every message is a header (body length
in words as uint32, type, schema, two unused bytes) and a body padded to
whole words. The protocol is described in docs/dqlite-research.md, section 2.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
WORD = 8
# At most this many parameters per statement on 1.11 (params32 came with 1.12).
MAX_PARAMETERS = 255

# Request types.
LEADER, CLIENT, OPEN, PREPARE, EXEC, QUERY, FINALIZE, EXEC_SQL, QUERY_SQL = 0, 1, 3, 4, 5, 6, 7, 8, 9
INTERRUPT, ADD, ASSIGN, REMOVE, CLUSTER, TRANSFER, DESCRIBE = 10, 12, 13, 14, 16, 17, 18
# Response types.
FAILURE, SERVER, WELCOME, SERVERS, DB, STMT, RESULT, ROWS, EMPTY, METADATA = 0, 1, 2, 3, 4, 5, 6, 7, 8, 10
# Value types.
INTEGER, FLOAT, TEXT, BLOB, NULL, UNIXTIME, ISO8601, BOOLEAN = 1, 2, 3, 4, 5, 9, 10, 11
# The last word of a ROWS body: the statement is done, or more ROWS follow.
ROWS_DONE = 0xFFFFFFFFFFFFFFFF
ROWS_PART = 0xEEEEEEEEEEEEEEEE
# Node roles (ASSIGN, CLUSTER).
VOTER, STANDBY, SPARE = 0, 1, 2

_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_HEADER = struct.Struct("<IBBH")


class ProtocolError(Exception):
    """Bytes that are not a message this client understands."""


class DqliteFailure(Exception):
    """A FAILURE response: a SQLite or dqlite error code and its message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % WORD)


def text(value: str) -> bytes:
    """A NUL-terminated UTF-8 string padded to a word (so it cannot hold a NUL itself)."""
    encoded = value.encode()
    if b"\0" in encoded:
        raise ValueError("dqlite text cannot contain NUL")
    return _pad(encoded + b"\0")


def handshake() -> bytes:
    return _U64.pack(PROTOCOL_VERSION)


def message(kind: int, body: bytes, schema: int = 0) -> bytes:
    body = _pad(body)
    return _HEADER.pack(len(body) // WORD, kind, schema, 0) + body


def parameters(values: Sequence[Any]) -> bytes:
    """The params tuple: a count byte and a type byte per value, padded, then the values."""
    if len(values) > MAX_PARAMETERS:
        raise ValueError(f"dqlite 1.11 takes at most {MAX_PARAMETERS} parameters, got {len(values)}")
    if not values:
        return b""
    types = bytearray([len(values)])
    encoded = bytearray()
    for value in values:
        if value is None:
            types.append(NULL)
            encoded += _U64.pack(0)
        elif isinstance(value, bool):
            types.append(BOOLEAN)
            encoded += _U64.pack(int(value))
        elif isinstance(value, int):
            types.append(INTEGER)
            encoded += _I64.pack(value)
        elif isinstance(value, float):
            types.append(FLOAT)
            encoded += _F64.pack(value)
        elif isinstance(value, str):
            types.append(TEXT)
            encoded += text(value)
        elif isinstance(value, bytes | bytearray | memoryview):
            types.append(BLOB)
            encoded += _U64.pack(len(value)) + _pad(bytes(value))
        else:
            raise TypeError(f"dqlite cannot bind a {type(value).__name__}")
    return _pad(bytes(types)) + bytes(encoded)


# -- requests -------------------------------------------------------------------------------


def leader() -> bytes:
    return message(LEADER, _U64.pack(0))


def client(client_id: int) -> bytes:
    return message(CLIENT, _U64.pack(client_id))


def open_database(name: str) -> bytes:
    return message(OPEN, text(name) + _U64.pack(0) + text("volatile"))


def prepare(db: int, sql: str) -> bytes:
    return message(PREPARE, _U64.pack(db) + text(sql))


def execute(db: int, statement: int, values: Sequence[Any] = ()) -> bytes:
    return message(EXEC, struct.pack("<II", db, statement) + parameters(values))


def query(db: int, statement: int, values: Sequence[Any] = ()) -> bytes:
    return message(QUERY, struct.pack("<II", db, statement) + parameters(values))


def finalize(db: int, statement: int) -> bytes:
    return message(FINALIZE, struct.pack("<II", db, statement))


def exec_sql(db: int, sql: str, values: Sequence[Any] = ()) -> bytes:
    return message(EXEC_SQL, _U64.pack(db) + text(sql) + parameters(values))


def query_sql(db: int, sql: str, values: Sequence[Any] = ()) -> bytes:
    return message(QUERY_SQL, _U64.pack(db) + text(sql) + parameters(values))


def cluster() -> bytes:
    return message(CLUSTER, _U64.pack(1))


def add(node_id: int, address: str) -> bytes:
    return message(ADD, _U64.pack(node_id) + text(address))


def assign(node_id: int, role: int) -> bytes:
    return message(ASSIGN, _U64.pack(node_id) + _U64.pack(role))


def remove(node_id: int) -> bytes:
    return message(REMOVE, _U64.pack(node_id))


def transfer(node_id: int) -> bytes:
    return message(TRANSFER, _U64.pack(node_id))


# -- responses -------------------------------------------------------------------------------


class Decoder:
    """Received bytes in, whole (type, body) messages out."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            words, kind, _, _ = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + words * WORD
            if len(self._buffer) < end:
                return
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            yield kind, body


class Reader:
    """Values read in order from a response body."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.at = 0

    def uint64(self) -> int:
        value: int = _U64.unpack_from(self.body, self.at)[0]
        self.at += WORD
        return value

    def int64(self) -> int:
        value: int = _I64.unpack_from(self.body, self.at)[0]
        self.at += WORD
        return value

    def uint32(self) -> int:
        value: int = struct.unpack_from("<I", self.body, self.at)[0]
        self.at += 4
        return value

    def text(self) -> str:
        end = self.body.index(b"\0", self.at)
        value = self.body[self.at : end].decode()
        length = end + 1 - self.at
        self.at += length + (-length % WORD)
        return value

    def blob(self) -> bytes:
        size = self.uint64()
        value = self.body[self.at : self.at + size]
        self.at += size + (-size % WORD)
        return value

    def value(self, kind: int) -> Any:
        if kind in (INTEGER, UNIXTIME):
            return self.int64()
        if kind == FLOAT:
            value: float = _F64.unpack_from(self.body, self.at)[0]
            self.at += WORD
            return value
        if kind in (TEXT, ISO8601):
            return self.text()
        if kind == BLOB:
            return self.blob()
        if kind == NULL:
            self.at += WORD
            return None
        if kind == BOOLEAN:
            return bool(self.uint64())
        raise ProtocolError(f"unknown dqlite value type {kind}")


def check(kind: int, body: bytes, expected: int) -> Reader:
    """A reader for a response of type `expected`; a FAILURE raises DqliteFailure."""
    reader = Reader(body)
    if kind == FAILURE:
        raise DqliteFailure(reader.uint64(), reader.text())
    if kind != expected:
        raise ProtocolError(f"expected dqlite response {expected}, got {kind}")
    return reader


def parse_server(body: bytes) -> tuple[int, str]:
    """SERVER: the leader's (id, address); (0, "") when the node does not know one."""
    reader = Reader(body)
    return reader.uint64(), reader.text()


def parse_servers(body: bytes) -> list[tuple[int, str, int]]:
    """SERVERS: every node as (id, address, role)."""
    reader = Reader(body)
    return [(reader.uint64(), reader.text(), reader.uint64()) for _ in range(reader.uint64())]


def parse_stmt(body: bytes) -> tuple[int, int, int]:
    """STMT: (database id, statement id, number of parameters)."""
    reader = Reader(body)
    return reader.uint32(), reader.uint32(), reader.uint64()


def parse_result(body: bytes) -> tuple[int, int]:
    """RESULT: (last insert rowid, rows changed)."""
    reader = Reader(body)
    return reader.uint64(), reader.uint64()


@dataclass(slots=True)
class Rows:
    """One ROWS message: column names, rows, and whether more ROWS messages follow."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    more: bool


def parse_rows(body: bytes) -> Rows:
    reader = Reader(body)
    count = reader.uint64()
    columns = [reader.text() for _ in range(count)]
    rows: list[tuple[Any, ...]] = []
    header_bytes = (count + 1) // 2
    header_size = header_bytes + (-header_bytes % WORD)
    while True:
        marker = _U64.unpack_from(body, reader.at)[0]
        if marker in (ROWS_DONE, ROWS_PART):
            return Rows(columns, rows, marker == ROWS_PART)
        types = body[reader.at : reader.at + header_bytes]
        reader.at += header_size
        kinds = [(types[i // 2] >> (4 * (i % 2))) & 0x0F for i in range(count)]
        rows.append(tuple(reader.value(kind) for kind in kinds))
