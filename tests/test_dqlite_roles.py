"""The dqlite backend's pure parts: role assignment (dqliteroles.adjust), the DSN and the client's statement guard."""

from __future__ import annotations

import pytest

from pykine.backends import dqlitewire as wire
from pykine.backends.base import BackendError, ConnectionOptions
from pykine.backends.dqlite import parse_dsn
from pykine.backends.dqliteclient import is_query
from pykine.backends.dqliteroles import Node, adjust

V, S, X = wire.VOTER, wire.STANDBY, wire.SPARE


def cluster(*roles: int) -> list[Node]:
    return [Node(number, f"127.0.0.1:{9000 + number}", role) for number, role in enumerate(roles, 1)]


@pytest.mark.parametrize(
    ("roles", "offline", "voters", "standbys", "expected"),
    [
        # One or two nodes: a single voter, the leader (node 1).
        ((V,), set(), 3, 0, None),
        ((V, X), set(), 3, 0, None),
        ((V, V), set(), 3, 0, (2, X)),
        # A third node: spares become voters, one at a time.
        ((V, X, X), set(), 3, 0, (2, V)),
        ((V, V, X), set(), 3, 0, (3, V)),
        ((V, V, V), set(), 3, 0, None),
        # Stand-bys are promoted before spares.
        ((V, V, X, S), set(), 3, 0, (4, V)),
        # More voters than wanted: one that is not the leader steps down.
        ((V, V, V, V, V), set(), 3, 0, (2, X)),
        # A dead voter keeps its place while nobody can take it ...
        ((V, V, V), {3}, 3, 0, None),
        # ... and is replaced when a spare answers: promote first, then demote the dead one.
        ((V, V, V, X), {3}, 3, 0, (4, V)),
        ((V, V, V, V), {3}, 3, 0, (3, X)),
        # A dead spare is never promoted.
        ((V, V, X), {3}, 3, 0, None),
        # Stand-bys: wanted ones from spares, extra ones and dead ones back to spare.
        ((V, V, V, X), set(), 3, 1, (4, S)),
        ((V, V, V, S), set(), 3, 0, (4, X)),
        ((V, V, V, S, X), {4}, 3, 1, (5, S)),
        ((V, V, V, S, S), {4}, 3, 1, (4, X)),
        # Five voters wanted.
        ((V, V, V, X, X), set(), 5, 0, (4, V)),
    ],
)
def test_adjust_proposes_one_change_at_a_time(
    roles: tuple[int, ...], offline: set[int], voters: int, standbys: int, expected: tuple[int, int] | None
) -> None:
    assert adjust(cluster(*roles), offline, 1, voters, standbys) == expected


def test_adjust_converges_from_every_join_order() -> None:
    """Applying the proposals one by one ends with the wanted voters and nothing more to do."""
    for size in range(1, 7):
        nodes = cluster(V, *[X] * (size - 1))
        for _ in range(20):
            change = adjust(nodes, set(), 1, 3, 1)
            if change is None:
                break
            nodes = [node._replace(role=change[1]) if node.id == change[0] else node for node in nodes]
        else:
            pytest.fail(f"no fixed point for {size} nodes")
        roles = [node.role for node in nodes]
        assert roles.count(V) == (1 if size < 3 else 3), (size, roles)
        assert roles.count(S) == (0 if size < 4 else 1), (size, roles)


def test_dsn_and_peer_flags() -> None:
    options = ConnectionOptions(peer_bind_address="0.0.0.0:9001", peer_advertise_address="10.0.0.3:9001")
    config = parse_dsn(
        "dqlite:///var/lib/pykine?join=10.0.0.1:9001,10.0.0.2:9001&voters=5&latency=5ms&leaderReads=true", options
    )
    assert config.leader_reads
    assert config.data_dir == "/var/lib/pykine"
    assert config.join == ("10.0.0.1:9001", "10.0.0.2:9001")
    assert (config.bind, config.advertise, config.voters, config.latency_ms) == (
        "0.0.0.0:9001",
        "10.0.0.3:9001",
        5,
        5,
    )
    assert parse_dsn("dqlite://db", ConnectionOptions()).advertise == "127.0.0.1:2380"


@pytest.mark.parametrize(
    ("dsn", "options", "message"),
    [
        ("dqlite://", ConnectionOptions(), "needs a data directory"),
        ("dqlite://d?join=node1:9001", ConnectionOptions(), "join address must be an IPv4 address"),
        ("dqlite://d?voters=2", ConnectionOptions(), "voters must be odd"),
        ("dqlite://d?replicas=3", ConnectionOptions(), "unknown dqlite option 'replicas'"),
        ("dqlite://d?latency=fast", ConnectionOptions(), "dqlite option latency"),
        ("dqlite://d?leaderReads=yes", ConnectionOptions(), "leaderReads must be true or false"),
        ("dqlite://d", ConnectionOptions(peer_bind_address="localhost:9001"), "--peer-bind-address must be"),
        ("dqlite://d", ConnectionOptions(peer_bind_address="0.0.0.0:9001"), "--peer-advertise-address must be"),
    ],
)
def test_bad_dsn(dsn: str, options: ConnectionOptions, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        parse_dsn(dsn, options)


def test_only_reads_go_through_query() -> None:
    """libdqlite 1.11 aborts its process on a write sent as a query or rows from an execution."""
    assert is_query("SELECT 1")
    assert is_query("  with x AS (SELECT 1) SELECT * FROM x")
    assert not is_query("WITH x AS (SELECT 1) DELETE FROM kv WHERE key IN (SELECT * FROM x)")
    assert not is_query("INSERT INTO kv VALUES (1)")
    assert not is_query("BEGIN IMMEDIATE")
    with pytest.raises(ValueError, match="RETURNING"):
        is_query("INSERT INTO kv VALUES (1) RETURNING key")
