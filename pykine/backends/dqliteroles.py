"""Which role each dqlite node should have, decided by the leader's process as nodes come and go.

Voters replicate and elect, stand-bys replicate, spares only hold a place in
the configuration. A new node joins as a spare; the leader's process then
calls `adjust` once a second and makes the one change it proposes (the
approach of go-dqlite's `app` package, without failure domains):

- a cluster of one or two nodes has a single voter, the leader (a second
  voter would only add a way to lose the quorum);
- otherwise the wanted number of voters that answer is kept, promoting
  stand-bys before spares; an offline voter steps down to spare once an
  online node has taken its place, and comes back as voter when needed;
- then the wanted number of stand-bys, the same way.

`adjust` is a pure function of the configuration and of which nodes answer,
so every case is tested without a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Sequence
from typing import NamedTuple

from pykine.backends import dqlitewire as wire
from pykine.backends.dqliteclient import Connection

ROLE_NAMES = {wire.VOTER: "voter", wire.STANDBY: "stand-by", wire.SPARE: "spare"}


class Node(NamedTuple):
    id: int
    address: str
    role: int


def adjust(
    nodes: Sequence[Node], offline: Collection[int], leader: int, voters: int, standbys: int
) -> tuple[int, int] | None:
    """The next (node id, role) assignment the cluster needs, or None when it is as wanted."""
    if len(nodes) < 3:
        for node in nodes:
            if node.role == wire.VOTER and node.id != leader:
                return node.id, wire.SPARE
        return None
    return _balance(nodes, offline, leader, wire.VOTER, voters, (wire.STANDBY, wire.SPARE)) or _balance(
        nodes, offline, leader, wire.STANDBY, standbys, (wire.SPARE,)
    )


def _balance(
    nodes: Sequence[Node], offline: Collection[int], leader: int, role: int, wanted: int, sources: tuple[int, ...]
) -> tuple[int, int] | None:
    holders = [node for node in nodes if node.role == role]
    online = [node for node in holders if node.id not in offline]
    if len(online) < wanted:
        for source in sources:
            for node in nodes:
                if node.role == source and node.id not in offline:
                    return node.id, role
    if len(online) > wanted:
        for node in online:
            if node.id != leader:
                return node.id, wire.SPARE
    if len(online) >= wanted:
        for node in holders:
            if node.id in offline:
                return node.id, wire.SPARE
    return None


async def probe(address: str, timeout: float) -> bool:
    """Whether a node answers a request within `timeout` (any answer will do: spares know no leader)."""
    connection = None
    try:
        async with asyncio.timeout(timeout):
            connection = await Connection.dial(address)
            await connection.leader()
        return True
    except (OSError, TimeoutError, ConnectionError, wire.DqliteFailure, wire.ProtocolError):
        return False
    finally:
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
