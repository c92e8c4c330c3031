"""A real two-node PostgreSQL cluster run by two real Patroni processes, with pykine as their DCS, failing over.

Patroni (its etcd3 module, so etcd's JSON gateway) elects a leader through pykine; the other node clones it
with pg_basebackup and streams from it. Then the leader's machine "dies": its Patroni and its postgres get
SIGKILL, so nobody gives the leader key up. The key lives on the dead node's lease, which nobody keeps alive
any more: pykine must expire it, not before its TTL, and the survivor must then take the key and promote,
keeping the replicated row and accepting writes. pykine's own view (through the JSON gateway) must agree.

The failover bound: the dead leader refreshed its lease in its last HA cycle (every loop_wait), so the lease
ends at most TTL seconds after the kill. pykine looks for expired leases every 0.25 s and deletes the leader
key; the survivor's watch wakes on the delete (or its loop_wait sleep ends), its HA loop finds no healthier
member (the dead node's REST API refuses at once), takes the key and promotes. Patroni retries DCS calls for
up to retry_timeout, twice per cycle at worst; the rest of the 25 s beyond the TTL is room for a promotion
and HA cycles on a busy two-core machine. It is measured from the kill to the survivor's /leader saying 200.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from patronicluster import (
    PatroniCluster,
    PatroniNode,
    patroni_cluster,
    patroni_minimum_timeouts,
    strays,
    unb64,
    wait_for,
)

SCOPE = "pykine-failover"
NAMES = ("pg-a", "pg-b")


TIMEOUTS = patroni_minimum_timeouts()
TTL = TIMEOUTS["ttl"]
FAILOVER_BOUND = TTL + 25  # seconds from the kill until the survivor holds the leader lock (see above)
BOOTSTRAP_BOUND = 90  # initdb, the first start, pg_basebackup and the replica's start, on a busy machine
FIRST_ROW = (1, "written on the first leader")
SECOND_ROW = (2, "written on the new leader")


def status(node: PatroniNode) -> dict[str, Any]:
    code, body = node.api("/patroni")
    return body if code == 200 and isinstance(body, dict) else {}


def settled(cluster: PatroniCluster) -> tuple[PatroniNode, PatroniNode] | None:
    """(leader, replica) once one node holds the leader lock as a running primary and the other streams from it."""
    cluster.check_alive()
    leaders = [node for node in cluster.nodes if node.api("/leader")[0] == 200]
    if len(leaders) != 1:
        return None
    leader = leaders[0]
    replica = next(node for node in cluster.nodes if node is not leader)
    primary, standby = status(leader), status(replica)
    if (primary.get("role"), primary.get("state")) != ("primary", "running"):
        return None
    if (standby.get("role"), standby.get("state"), standby.get("replication_state")) != (
        "replica",
        "running",
        "streaming",
    ):
        return None
    return leader, replica


def read_row(node: PatroniNode, row_id: int) -> tuple[Any, ...] | None:
    try:
        with node.connect() as conn:
            return conn.execute("SELECT id, note FROM failover_check WHERE id = %s", (row_id,)).fetchone()
    except psycopg.Error:  # not up yet, or the table not replayed yet
        return None


def write_on(node: PatroniNode) -> list[tuple[Any, ...]] | None:
    """Write the second row on `node` once it accepts writes; then every row it has."""
    try:
        with node.connect() as conn:
            conn.execute("INSERT INTO failover_check VALUES (%s, %s) ON CONFLICT DO NOTHING", SECOND_ROW)
            return conn.execute("SELECT id, note FROM failover_check ORDER BY id").fetchall()
    except psycopg.Error:  # still in recovery, or restarting
        return None


@pytest.fixture
def cluster() -> Iterator[PatroniCluster]:
    with patroni_cluster(NAMES, SCOPE, TIMEOUTS) as running:
        yield running
    assert running.strays == [], f"processes left behind after the cluster was stopped: {running.strays}"


@pytest.mark.timeout(300)
def test_patroni_failover_with_pykine_as_dcs(cluster: PatroniCluster) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()

    # 1. One leader, one streaming replica; pykine holds the leader key on the leader's lease, and both members.
    leader, replica = wait_for(
        "a leader and a streaming replica", lambda: settled(cluster), BOOTSTRAP_BOUND, cluster.explain
    )
    timings["bootstrap"] = time.monotonic() - started
    held = cluster.leader_key()
    assert held is not None and held[0] == leader.name, (held, leader.name)
    assert cluster.member_keys() == sorted(NAMES)

    # 2. A row written on the leader reaches the replica, which refuses writes of its own.
    with leader.connect() as conn:
        conn.execute("CREATE TABLE failover_check (id integer PRIMARY KEY, note text NOT NULL)")
        conn.execute("INSERT INTO failover_check VALUES (%s, %s)", FIRST_ROW)
    assert wait_for("the row on the replica", lambda: read_row(replica, 1), 30, cluster.explain) == FIRST_ROW
    with replica.connect() as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("INSERT INTO failover_check VALUES (%s, %s)", SECOND_ROW)

    # 3. The leader's lease as pykine has it: granted for the TTL, kept alive, carrying the leader and member keys.
    queried = time.monotonic()
    lease = cluster.lease(held[1])
    remaining, granted = int(lease.get("TTL", 0)), int(lease.get("grantedTTL", 0))
    keys = sorted(unb64(key) for key in lease.get("keys", []))
    assert granted == TTL, lease
    # Patroni refreshes it every HA cycle; a cycle may wait out up to two retry_timeouts on its DCS.
    assert TTL - TIMEOUTS["loop_wait"] - 2 * TIMEOUTS["retry_timeout"] <= remaining <= TTL, lease
    assert keys == [cluster.prefix + "leader", cluster.prefix + "members/" + leader.name], lease

    # 4. The leader's machine dies: Patroni and postgres, SIGKILL, nothing handed over.
    killed = time.monotonic()
    leader.kill()
    wait_for("the old leader's processes gone", lambda: not strays(leader.directory), 10, cluster.explain)
    assert leader.api("/patroni") == (None, None)

    # 5. The survivor takes the leader lock once pykine expires the dead lease: not before, and within the bound.
    def took_over() -> bool:
        if "key released" not in timings and cluster.leader_key() != held:  # pykine's view, polled alongside
            timings["key released"] = time.monotonic() - killed
        return replica.api("/leader")[0] == 200

    wait_for("the replica takes over", took_over, FAILOVER_BOUND + 15, cluster.explain)
    timings["failover"] = time.monotonic() - killed
    assert timings["failover"] <= FAILOVER_BOUND, (timings, cluster.explain())
    # The lease had at least `remaining` whole seconds left when it was queried (etcd rounds down), and
    # nothing but its expiry may take the key from the dead node.
    since_query = killed - queried
    assert timings["key released"] + since_query >= remaining - 0.2, (timings, since_query, lease)
    assert timings["failover"] + since_query >= remaining - 0.2, (timings, since_query, lease)

    # 6. The new leader kept the row and takes writes.
    rows = wait_for("a write on the new leader", lambda: write_on(replica), 30, cluster.explain)
    timings["writable"] = time.monotonic() - killed
    assert rows == [FIRST_ROW, SECOND_ROW]
    assert status(replica).get("role") == "primary"

    # 7. pykine: the leader key names the new leader on another lease; the old lease and its keys are gone.
    now = cluster.leader_key()
    assert now is not None and now[0] == replica.name and now[1] != held[1], (now, held)
    old = cluster.lease(held[1])
    assert int(old.get("TTL", 0)) == -1 and not old.get("keys"), old
    assert cluster.member_keys() == [replica.name]
    code, members = replica.api("/cluster")
    assert code == 200 and [(m["name"], m["role"]) for m in members["members"]] == [(replica.name, "leader")], members
    timings = {name: round(seconds, 2) for name, seconds in timings.items()}
    print(f"\nPatroni on pykine: {leader.name} -> {replica.name}, lease TTL left {remaining} s, timings {timings}")
