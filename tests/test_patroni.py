"""Patroni's etcd3 DCS against pykine, beside real etcd: what a Patroni node asks of its DCS, driven as a library.

patroni.dcs.etcd3.Etcd3 talks to etcd only through the JSON gateway (/v3/...
over HTTP/1.1): /version and the member list to find its servers, leases and
keep-alives, transactions (one with a nested transaction in its failure
branch), ranges, and a streaming watch that feeds its key cache and wakes the
HA loop. The same scenario runs against both servers at once (the TTL wait
dominates); what Patroni reports must agree, apart from revisions, lease ids
and timings, and must be what a Patroni cluster relies on.

Then the same over TLS with required client certificates and etcd auth (the
patroni.yml options of a locked-down DCS), and etcd's gateway rule for client
certificates that carry a CommonName when auth is on.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import http.client
import json
import os
import shutil
import ssl
import tempfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import certs
import grpc
import pytest
import urllib3.util.connection
from aetcd.rpc import auth_pb2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import EtcdServer, Pair, PykineServer, Server, call, pb
from patroni.dcs import Cluster, Leader, get_dcs
from patroni.dcs.etcd3 import Etcd3, prefix_range_end
from patronicluster import patroni_minimum_timeouts

SCOPE = "pykine-patroni"
PREFIX = f"/service/{SCOPE}/"
NAMES = {"node-1": "A", "node-2": "B", "node-3": "P"}  # P: an observer behind use_proxies


TIMEOUTS = patroni_minimum_timeouts()
TTL = TIMEOUTS["ttl"]
WATCH = 5.0  # a replica's watch timeout while the leader stays silent (Patroni adds 0.5 s)
LSN1, LSN2 = 50331648, 67108864
SYSID = "7400000000000000001"
CONFIG1 = {"ttl": TTL, "loop_wait": 1, "retry_timeout": 3, "postgresql": {"parameters": {"max_connections": 100}}}
CONFIG2 = {**CONFIG1, "failsafe_mode": True}
HISTORY = [[1, 25165984, "no recovery target specified", "2026-01-01T00:00:00+00:00"]]


def member_data(role: str, state: str) -> dict[str, Any]:
    port = {"W": 0, "L": 1}[role]
    return {
        "conn_url": f"postgres://127.0.0.1:{5432 + port}/postgres",
        "api_url": f"http://127.0.0.1:{8008 + port}/patroni",
        "state": state,
        "role": "primary" if role == "W" else "replica",
        "version": "4.1.5",
    }


def failsafe(*roles: str) -> dict[str, str]:
    return {role: member_data(role, "running")["api_url"] for role in roles}


def gateway(server: Server, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One JSON gateway call without Patroni (GET when there is no body)."""
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(f"http://{server.address}{path}", data, timeout=10) as answer:
        return json.loads(answer.read())


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


@dataclass
class Exchange:
    step: str
    node: str
    request: str
    status: int | None
    response: str

    def __str__(self) -> str:
        return f"  [{self.node}] {self.request[:400]}\n    -> {self.status} {self.response[:600]}"


class Transcript:
    """Every HTTP request a Patroni node makes and what it got, by scenario step (for failure messages)."""

    def __init__(self) -> None:
        self.step = "0 connect"
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()

    def attach(self, dcs: Etcd3, role: str) -> None:
        pool = dcs._client.http  # urllib3's PoolManager: every request Patroni makes goes through urlopen
        original = pool.urlopen

        def urlopen(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            request = f"{method} {urllib.parse.urlsplit(url).path} {kwargs.get('body') or ''}".strip()
            step = self.step
            try:
                response = original(method, url, *args, **kwargs)
            except Exception as error:
                self._add(Exchange(step, role, request, None, repr(error)))
                raise
            if url.endswith("/watch"):  # a stream: Patroni's cache reads it for as long as it lasts
                self._add(Exchange(step, role, request, response.status, "<stream>"))
            else:
                self._add(Exchange(step, role, request, response.status, response.data.decode(errors="replace")))
            return response

        pool.urlopen = urlopen

    def _add(self, exchange: Exchange) -> None:
        with self._lock:
            self.exchanges.append(exchange)

    def of_step(self, number: str) -> list[Exchange]:
        """The exchanges of every step numbered `number`."""
        with self._lock:
            return [exchange for exchange in self.exchanges if exchange.step.split()[0] == number]


class StopWatcher(BaseException):
    """Not an Exception: KVCache.run's endless loop lets it through, and its thread ends."""


def stop_watcher(dcs: Etcd3) -> None:
    """End the key cache's watch thread (Patroni never stops it: it loops for the life of the process)."""
    cache = dcs._client._kv_cache
    if cache is None:
        return

    def stop() -> None:
        raise StopWatcher

    cache._build_cache = stop  # type: ignore[method-assign]
    deadline = time.monotonic() + 15
    while cache.is_alive() and time.monotonic() < deadline:
        cache.kill_stream()
        cache.join(0.2)
    dcs._client.http.clear()


def run_scenarios(scenarios: list[Scenario], timeout: float) -> None:
    """Each in a daemon thread at once. Patroni's constructor waits on etcd for ever when it cannot connect:
    a scenario still running at the deadline is reported as such and left behind, not waited on."""
    threads = [threading.Thread(target=scenario.run, name=scenario.server.name, daemon=True) for scenario in scenarios]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for scenario, thread in zip(scenarios, threads, strict=True):
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():  # a copy: the stuck thread keeps writing to the old one
            scenario.seen = {**scenario.seen, "aborted": f"stuck in step {scenario.transcript.step} after {timeout} s"}


def quiet_watcher_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo Patroni's process-wide urllib3 patch afterwards, and let StopWatcher end threads silently."""
    monkeypatch.setattr(urllib3.util.connection, "create_connection", urllib3.util.connection.create_connection)
    previous_hook = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not StopWatcher:  # the watch threads the tests end on purpose
            previous_hook(args)

    monkeypatch.setattr(threading, "excepthook", excepthook)


class Scenario:
    """A Patroni cluster's life on one server: its observations, timings and HTTP transcript."""

    def __init__(self, server: Server, **etcd3: Any) -> None:
        self.server = server
        self.etcd3 = etcd3  # the etcd3 section of patroni.yml, beside hosts
        self.url = f"{etcd3.get('protocol', 'http')}://{server.address}"
        self.seen: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.transcript = Transcript()
        self.nodes: list[Etcd3] = []
        self.roles: dict[str, str] = {}
        self.trace = ""

    # Helpers.

    def step(self, label: str) -> None:
        self.transcript.step = label

    def node(self, name: str, **etcd3: Any) -> Etcd3:
        """A node as Patroni builds it from patroni.yml: get_dcs on the top-level settings and the etcd3 section."""
        section = {"hosts": [self.server.address], **self.etcd3, **etcd3}
        config = {"scope": SCOPE, "name": name, **TIMEOUTS, "etcd3": section}
        dcs = get_dcs(config)
        assert isinstance(dcs, Etcd3)
        self.nodes.append(dcs)
        self.transcript.attach(dcs, NAMES[name])
        return dcs

    def rename(self, value: Any) -> Any:
        """Node names as roles (the race's winner is W, the loser L); tuples as lists."""
        if isinstance(value, str):
            return self.roles.get(value, value)
        if isinstance(value, dict):
            return {self.rename(key): self.rename(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.rename(item) for item in value]
        return value

    def summary(self, cluster: Cluster) -> dict[str, Any]:
        failover, sync = cluster.failover, cluster.sync
        return self.rename(
            {
                "initialize": cluster.initialize,
                "config": cluster.config.data if cluster.config else None,
                "leader": cluster.leader.name if cluster.leader else None,
                "members": {member.name: member.data for member in cluster.members},
                "last_lsn": cluster.status.last_lsn,
                "failover": [failover.leader, failover.candidate] if failover else None,
                "sync": [sync.leader, sync.sync_standby, sync.quorum],
                "history": cluster.history.lines if cluster.history else None,
                "failsafe": cluster.failsafe,
            }
        )

    def view(self, dcs: Etcd3, until: Callable[[Cluster], bool], timeout: float = 5) -> Cluster:
        """get_cluster() as the HA loop calls it, until the node's watch-fed cache shows what `until` waits for."""
        deadline = time.monotonic() + timeout
        while True:
            cluster = dcs.get_cluster()
            if until(cluster) or time.monotonic() > deadline:
                return cluster
            time.sleep(0.05)

    def views(self, until: Callable[[Cluster], bool]) -> dict[str, Any]:
        """The cluster as every node sees it (a wrong view shows after a timeout rather than raising)."""
        return {self.rename(dcs._name): self.summary(self.view(dcs, until)) for dcs in self.nodes}

    def timed_watch(self, watcher: Etcd3, version: str | None, timeout: float, action: Callable[[], Any]) -> Any:
        """`watcher` blocks in watch() while another thread acts after 0.5 s: (woke, seconds, the action's result)."""
        watcher.event.clear()  # only what happens from now on may wake it
        results: list[Any] = []
        actor = threading.Timer(0.5, lambda: results.append(action()))
        started = time.monotonic()
        actor.start()
        try:
            woke = watcher.watch(version, timeout)
        finally:
            actor.join()
        return woke, time.monotonic() - started, results[0] if results else "no result"

    # The scenario.

    def run(self) -> None:
        try:
            self.scenario()
        except Exception as error:
            self.seen["aborted"] = f"in step {self.transcript.step}: {error!r}"
            self.trace = traceback.format_exc()
        finally:
            for dcs in self.nodes:
                stop_watcher(dcs)

    def scenario(self) -> None:
        seen = self.seen
        # 0. Patroni finds its servers with /version and the member list's clientURLs, then uses /v3.
        self.step("0 connect")
        version = gateway(self.server, "/version")
        members = gateway(self.server, "/v3/cluster/member/list", {})["members"]
        seen["0 gateway"] = {
            "cluster version >= 3.4": tuple(map(int, version["etcdcluster"].split("."))) >= (3, 4),
            "clientURLs": [url == self.url for member in members for url in member.get("clientURLs", [])],
        }
        a, b = self.node("node-1"), self.node("node-2")
        proxy = self.node("node-3", use_proxies=True)  # the member list unused: only the configured host
        self.roles = {"node-3": "P"}
        seen["0 nodes"] = [
            [dcs._client.version_prefix, dcs._client.machines_cache == [self.url], bool(dcs._lease)]
            for dcs in (a, b, proxy)
        ]

        # 1. The leader race: both create the leader key on their lease if it does not exist; one wins.
        self.step("1 race")
        barrier = threading.Barrier(2)

        def race(dcs: Etcd3) -> bool:
            barrier.wait(10)
            return bool(dcs.attempt_to_acquire_leader())

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            won = list(pool.map(race, (a, b)))
        seen["1 race"] = sorted(won)
        if won.count(True) != 1:
            raise AssertionError(f"race results {won}")
        w, loser = (a, b) if won[0] else (b, a)
        self.roles.update({w._name: "W", loser._name: "L"})
        seen["1 cluster"] = self.views(lambda c: c.leader is not None)
        held = self.view(w, lambda c: c.leader is not None)
        seen["1 leader key on W's lease"] = held.leader is not None and held.leader.session == w._lease

        # 2. Refreshing the leader key: a keep-alive, or a compare-and-swap transaction with a nested create.
        self.step("2 update_leader")
        assert held.leader is not None
        seen["2 W update_leader"] = bool(w.update_leader(held, None))  # same lease: the keep-alive is the refresh
        seen["2 L update_leader"] = bool(loser.update_leader(self.view(loser, lambda c: c.leader is not None), None))
        after = self.view(loser, lambda c: c.leader is not None)
        seen["2 key untouched"] = [
            self.rename(after.leader and after.leader.name),
            after.leader is not None and after.leader.version == held.leader.version,
            after.leader is not None and after.leader.session == w._lease,
        ]
        # As after a new lease: value == W, so the key is put again on W's lease.
        leader = Leader(held.leader.version, "0", held.leader.member)
        regranted = Cluster(
            *(leader if field == "leader" else value for field, value in zip(Cluster._fields, held, strict=True))
        )
        seen["2 W update_leader, new lease"] = bool(w.update_leader(regranted, None))
        after = self.view(loser, lambda c: c.leader is not None and c.leader.version != held.leader.version)
        seen["2 key rewritten"] = [
            self.rename(after.leader and after.leader.name),
            after.leader is not None and after.leader.version != held.leader.version,
            after.leader is not None and after.leader.session == w._lease,
        ]
        self.step("2 delete_leader")
        assert after.leader is not None
        seen["2 L delete_leader"] = bool(loser.delete_leader(after.leader))  # value != L: nothing deleted
        seen["2 W delete_leader"] = bool(w.delete_leader(after.leader, LSN1))  # writes /status, then deletes
        seen["2 cluster after delete"] = self.views(lambda c: c.leader is None and c.status.last_lsn == LSN1)
        seen["2 W delete_leader again"] = bool(w.delete_leader(after.leader))
        # The key gone: the nested transaction in the failure branch creates it again.
        seen["2 W update_leader, key gone"] = bool(w.update_leader(regranted, None))
        seen["2 cluster after recreate"] = self.views(lambda c: c.leader is not None)
        held = self.view(w, lambda c: c.leader is not None)
        seen["2 recreated on W's lease"] = held.leader is not None and held.leader.session == w._lease

        # 3. TTL expiry: W falls silent; L runs a replica's loop until the lease takes the leader key away.
        self.step("3 ttl")
        seen["3 touch_member"] = [
            w.touch_member(member_data("W", "running")),
            loser.touch_member(member_data("L", "streaming")),
        ]
        held = self.view(w, lambda c: c.leader is not None and len(c.members) == 2)
        seen["3 W update_leader"] = bool(w.update_leader(held, None))  # W's last keep-alive
        refreshed = time.monotonic()
        woke, woke_after = None, 0.0
        while time.monotonic() - refreshed < TTL + 10:
            current = loser.get_cluster()
            if current.leader is None:
                break
            loser.touch_member(member_data("L", "streaming"))
            started = time.monotonic()
            woke = loser.watch(current.leader.version, WATCH)
            woke_after = time.monotonic() - started
        gone = time.monotonic() - refreshed
        self.timings["3 leader key gone after"] = gone
        self.timings["3 L's last watch"] = woke_after
        seen["3 leader key expired with W's lease"] = TTL - 1 <= gone <= TTL + 3
        seen["3 L's watch woke at the expiry"] = woke is True and woke_after < WATCH
        seen["3 cluster after expiry"] = self.views(lambda c: c.leader is None and len(c.members) == 1)
        seen["3 L attempt_to_acquire_leader"] = bool(loser.attempt_to_acquire_leader())
        seen["3 W update_leader, lease expired"] = bool(w.update_leader(held, None))  # a new lease, but L holds the key
        seen["3 W attempt_to_acquire_leader"] = bool(w.attempt_to_acquire_leader())
        seen["3 cluster after takeover"] = self.views(lambda c: c.leader is not None and c.leader.name == loser._name)

        # 4. Failover notice: a node blocked in watch() wakes as soon as the leader key goes, or comes.
        self.step("4 watch")
        held = self.view(loser, lambda c: c.leader is not None)
        watched = self.view(w, lambda c: c.leader is not None)  # W's cache is live before it waits
        assert held.leader is not None and watched.leader is not None
        woke, took, done = self.timed_watch(
            w, watched.leader.version, 10, lambda: bool(loser.delete_leader(held.leader))
        )
        self.timings["4 W woke after"] = took
        seen["4 W's watch woke on the delete"] = [done, woke, 0.4 <= took < 3]
        self.view(loser, lambda c: c.leader is None)
        woke, took, done = self.timed_watch(loser, None, 10, lambda: bool(w.attempt_to_acquire_leader()))
        self.timings["4 L woke after"] = took
        seen["4 L's watch woke on the new leader"] = [done, woke, 0.4 <= took < 3]
        seen["4 cluster"] = self.views(lambda c: c.leader is not None and c.leader.name == w._name)

        # 5. The other keys, each read back through get_cluster().
        self.step("5 members")
        seen["5 touch_member"] = [
            w.touch_member(member_data("W", "running")),
            loser.touch_member(member_data("L", "running")),
        ]
        self.step("5 initialize")
        seen["5 initialize race"] = [bool(w.initialize()), bool(loser.initialize())]
        seen["5 initialize with sysid"] = bool(w.initialize(create_new=False, sysid=SYSID))
        self.step("5 config")
        seen["5 set_config_value"] = bool(w.set_config_value(json.dumps(CONFIG1)))
        config = self.view(loser, lambda c: c.config is not None).config
        assert config is not None
        seen["5 set_config_value, current version"] = bool(loser.set_config_value(json.dumps(CONFIG2), config.version))
        seen["5 set_config_value, stale version"] = bool(w.set_config_value(json.dumps(CONFIG1), config.version))
        self.step("5 history")
        seen["5 set_history_value"] = bool(w.set_history_value(json.dumps(HISTORY)))
        self.step("5 sync")
        first = w.write_sync_state(w._name, [loser._name], None)
        seen["5 write_sync_state"] = first and [self.rename(first.leader), self.rename(first.sync_standby)]
        second = w.write_sync_state(w._name, [loser._name], 1, first and first.version)
        seen["5 write_sync_state, current version"] = second and [self.rename(second.leader), second.quorum]
        seen["5 write_sync_state, stale version"] = w.write_sync_state(w._name, [], None, first and first.version)
        seen["5 cluster with sync"] = self.views(lambda c: c.sync.quorum == 1)
        seen["5 delete_sync_state, stale version"] = bool(w.delete_sync_state(first and first.version))
        seen["5 delete_sync_state, current version"] = bool(w.delete_sync_state(second and second.version))
        self.step("5 failover")
        seen["5 manual_failover"] = bool(w.manual_failover(w._name, loser._name))
        self.step("5 status and failsafe")
        held = self.view(w, lambda c: c.leader is not None and len(c.members) == 2)
        seen["5 update_leader with status and failsafe"] = bool(w.update_leader(held, LSN2, None, failsafe("W", "L")))
        seen["5 cluster"] = self.views(lambda c: c.failsafe is not None and c.sync.leader is None)
        w.write_failsafe(failsafe("W"))
        seen["5 failsafe after write_failsafe"] = self.views(lambda c: c.failsafe is not None and len(c.failsafe) == 1)
        self.step("5 cancel_initialization")
        seen["5 cancel_initialization"] = bool(w.cancel_initialization())
        seen["5 cluster after cancel"] = self.views(lambda c: c.initialize is None)

        # 6. delete_cluster leaves nothing under the scope's prefix.
        self.step("6 delete_cluster")
        seen["6 delete_cluster"] = bool(w.delete_cluster())
        count = gateway(
            self.server,
            "/v3/kv/range",
            {"key": b64(PREFIX), "range_end": b64(prefix_range_end(PREFIX)), "count_only": True},
        )
        seen["6 keys under the prefix"] = int(count.get("count", 0))
        seen["6 cluster"] = self.views(lambda c: c.is_empty())

    def explain(self, want: dict[str, Any], name: str) -> str:
        """Each observation that differs from `want`, with this server's HTTP exchanges in that step."""
        lines = [f"{name} (timings {self.timings}):", self.trace]
        shown: set[str] = set()
        for key in sorted(set(want) | set(self.seen)):
            if self.seen.get(key, "<missing>") == want.get(key, "<missing>"):
                continue
            lines.append(f"- {key}:\n    got  {self.seen.get(key, '<missing>')}\n    want {want.get(key, '<missing>')}")
            number = key.split()[0]
            if number not in shown:  # the HTTP exchanges of that step, once
                shown.add(number)
                lines.extend(str(exchange) for exchange in self.transcript.of_step(number)[-60:])
        return "\n".join(lines)


def expected() -> dict[str, Any]:
    """What a correct etcd gives Patroni, in roles: W won the race, L lost it, P watches through a proxy."""
    empty = {
        "initialize": None,
        "config": None,
        "leader": None,
        "members": {},
        "last_lsn": 0,
        "failover": None,
        "sync": [None, None, 0],
        "history": None,
        "failsafe": None,
    }

    def everyone(**state: Any) -> dict[str, Any]:
        return {role: {**empty, **state} for role in ("W", "L", "P")}

    streaming = {"L": member_data("L", "streaming")}
    both_running = {"W": member_data("W", "running"), "L": member_data("L", "running")}
    final = {
        "members": both_running,
        "config": CONFIG2,
        "history": HISTORY,
        "failover": ["W", "L"],
        "leader": "W",
        "last_lsn": LSN2,
    }
    return {
        "0 gateway": {"cluster version >= 3.4": True, "clientURLs": [True]},
        "0 nodes": [["/v3", True, True]] * 3,
        "1 race": [False, True],
        "1 cluster": everyone(leader="W"),
        "1 leader key on W's lease": True,
        "2 W update_leader": True,
        "2 L update_leader": False,
        "2 key untouched": ["W", True, True],
        "2 W update_leader, new lease": True,
        "2 key rewritten": ["W", True, True],
        "2 L delete_leader": False,
        "2 W delete_leader": True,
        "2 cluster after delete": everyone(last_lsn=LSN1),
        "2 W delete_leader again": False,
        "2 W update_leader, key gone": True,
        "2 cluster after recreate": everyone(leader="W", last_lsn=LSN1),
        "2 recreated on W's lease": True,
        "3 touch_member": [True, True],
        "3 W update_leader": True,
        "3 leader key expired with W's lease": True,
        "3 L's watch woke at the expiry": True,
        # W's member key went with its lease; L's stays.
        "3 cluster after expiry": everyone(members=streaming, last_lsn=LSN1),
        "3 L attempt_to_acquire_leader": True,
        "3 W update_leader, lease expired": False,
        "3 W attempt_to_acquire_leader": False,
        "3 cluster after takeover": everyone(leader="L", members=streaming, last_lsn=LSN1),
        "4 W's watch woke on the delete": [True, True, True],
        "4 L's watch woke on the new leader": [True, True, True],
        "4 cluster": everyone(leader="W", members=streaming, last_lsn=LSN1),
        "5 touch_member": [True, True],
        "5 initialize race": [True, False],
        "5 initialize with sysid": True,
        "5 set_config_value": True,
        "5 set_config_value, current version": True,
        "5 set_config_value, stale version": False,
        "5 set_history_value": True,
        "5 write_sync_state": ["W", "L"],
        "5 write_sync_state, current version": ["W", 1],
        "5 write_sync_state, stale version": None,
        "5 cluster with sync": everyone(
            initialize=SYSID,
            members=both_running,
            config=CONFIG2,
            history=HISTORY,
            sync=["W", "L", 1],
            leader="W",
            last_lsn=LSN1,
        ),
        "5 delete_sync_state, stale version": False,
        "5 delete_sync_state, current version": True,
        "5 manual_failover": True,
        "5 update_leader with status and failsafe": True,
        "5 cluster": everyone(initialize=SYSID, failsafe=failsafe("W", "L"), **final),
        "5 failsafe after write_failsafe": everyone(initialize=SYSID, failsafe=failsafe("W"), **final),
        "5 cancel_initialization": True,
        "5 cluster after cancel": everyone(failsafe=failsafe("W"), **final),
        "6 delete_cluster": True,
        "6 keys under the prefix": 0,
        "6 cluster": everyone(),
    }


@pytest.mark.timeout(180)
def test_patroni_etcd3(fresh: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Patroni cluster's DCS life on pykine and on etcd at once; both must give Patroni the same, right answers."""
    assert TIMEOUTS == {"ttl": 20, "loop_wait": 1, "retry_timeout": 3}
    quiet_watcher_stops(monkeypatch)
    etcd, pykine = Scenario(fresh.etcd), Scenario(fresh.pykine)
    run_scenarios([etcd, pykine], 150)
    assert pykine.seen == etcd.seen, pykine.explain(etcd.seen, "pykine, against etcd")
    want = expected()
    assert etcd.seen == want, etcd.explain(want, "etcd, against the expected")
    assert pykine.seen == want, pykine.explain(want, "pykine, against the expected")


# -- TLS with client certificates, and etcd auth: the patroni.yml options for a locked-down server -------------

PASSWORD = "patroni-secret"
# etcd's answer (embed/serve.go) to any /v3/ gateway request whose client certificate has a CommonName,
# when client certificates are required and auth is on: the CN cannot be carried through the gateway.
COMMON_NAME_REFUSED = "CommonName of client sending a request against gateway will be ignored and not used as expected"


class TlsEtcd(EtcdServer):
    """etcd serving clients over TLS that requires a client certificate from the CA."""

    def __init__(self, workdir: str, ca: str, server: certs.Pair) -> None:
        super().__init__(workdir)
        self.tls = [f"--cert-file={server.cert}", f"--key-file={server.key}"]
        self.tls += ["--client-cert-auth", f"--trusted-ca-file={ca}"]

    def command(self) -> list[str]:
        command = [arg.replace(f"http://{self.address}", f"https://{self.address}") for arg in super().command()]
        return command + self.tls


def issue(authority: certs.Authority, file_name: str, subject: x509.NameAttribute, server: bool) -> certs.Pair:
    """A certificate from `authority`. etcd's gateway dials etcd's own gRPC with the server certificate, so with
    client certificates required that certificate must be good for clientAuth as well as serverAuth."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usages = (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if server
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([subject]))
        .issuer_name(authority._cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(certs.LOOPBACK_NAMES), critical=False)
    pair = certs.Pair(*(os.path.join(authority.directory, f"{file_name}.{kind}") for kind in ("pem", "key")))
    certs._write_cert(pair.cert, builder.sign(authority._key, hashes.SHA256()))
    certs._write_key(pair.key, key)
    return pair


def enable_auth(server: Server) -> None:
    """root, and a patroni user that may read and write under /service/ only; then auth on."""
    perm = auth_pb2.Permission(permType=auth_pb2.Permission.READWRITE, key=b"/service/", range_end=b"/service0")
    for method, request in (
        ("UserAdd", pb.AuthUserAddRequest(name="root", password="root-secret")),
        ("UserGrantRole", pb.AuthUserGrantRoleRequest(user="root", role="root")),
        ("RoleAdd", pb.AuthRoleAddRequest(name="patroni")),
        ("RoleGrantPermission", pb.AuthRoleGrantPermissionRequest(name="patroni", perm=perm)),
        ("UserAdd", pb.AuthUserAddRequest(name="patroni", password=PASSWORD)),
        ("UserGrantRole", pb.AuthUserGrantRoleRequest(user="patroni", role="patroni")),
        ("AuthEnable", pb.AuthEnableRequest()),
    ):
        outcome = call(server, "Auth", method, request)
        assert outcome.ok, (server.name, method, outcome)


@dataclass
class Locked:
    etcd: Server
    pykine: Server
    ca: str
    named: certs.Pair  # a client certificate with CommonName "patroni"
    unnamed: certs.Pair  # one with no CommonName

    def options(self, client: certs.Pair) -> dict[str, Any]:
        """The etcd3 section of patroni.yml, beside hosts."""
        return {
            "protocol": "https",
            "cacert": self.ca,
            "cert": client.cert,
            "key": client.key,
            "username": "patroni",
            "password": PASSWORD,
        }


@pytest.fixture
def locked() -> Iterator[Locked]:
    """etcd and pykine with TLS, required client certificates and auth, as a production DCS would be."""
    workdir = tempfile.mkdtemp(prefix="pykine-patroni-")
    authority = certs.Authority(workdir, "patroni")
    server_cert = issue(authority, "server", x509.NameAttribute(NameOID.COMMON_NAME, "server"), server=True)
    named = issue(authority, "named", x509.NameAttribute(NameOID.COMMON_NAME, "patroni"), server=False)
    unnamed = issue(authority, "unnamed", x509.NameAttribute(NameOID.ORGANIZATION_NAME, "patroni"), server=False)
    tls = [f"--server-cert-file={server_cert.cert}", f"--server-key-file={server_cert.key}"]
    servers: list[Server] = [
        TlsEtcd(os.path.join(workdir, "etcd"), authority.cert, server_cert),
        PykineServer(os.path.join(workdir, "pykine"), *tls, f"--trusted-ca-file={authority.cert}"),
    ]
    try:
        for server in servers:
            os.mkdir(server.workdir)
            server.log_path = os.path.join(server.workdir, f"{server.name}.log")
            with open(authority.cert, "rb") as ca, open(named.key, "rb") as key, open(named.cert, "rb") as cert:
                server.credentials = grpc.ssl_channel_credentials(ca.read(), key.read(), cert.read())
            server.start()
            enable_auth(server)  # over gRPC, where the CommonName is the user when no token is sent
        yield Locked(servers[0], servers[1], authority.cert, named, unnamed)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class LockedScenario(Scenario):
    """The leader race, members, a watched failover and delete_cluster, over TLS with a password."""

    def scenario(self) -> None:
        seen = self.seen
        self.step("0 connect")
        # Patroni's first requests, checked first: its constructor would wait on a refusal for ever.
        login = https(self.server, self.etcd3, "/v3/auth/authenticate", {"name": "patroni", "password": PASSWORD})
        token = json.loads(login[2]).get("token", "") if login[0] == 200 else ""
        listed = https(self.server, self.etcd3, "/v3/cluster/member/list", {}, token)
        seen["0 gateway"] = [login[0], listed[0]]
        if [login[0], listed[0]] != [200, 200]:
            raise AssertionError(f"Patroni could not connect: {login} {listed}")
        try:
            self.node("node-3", password="wrong")
            seen["0 wrong password"] = "connected"
        except SystemExit as stopped:  # Patroni's authenticate_on_start: logger.fatal, then sys.exit(1)
            seen["0 wrong password"] = f"exit {stopped.code}"
        a, b = self.node("node-1"), self.node("node-2")
        seen["0 nodes"] = [
            [dcs._client.version_prefix, dcs._client.machines_cache == [self.url], bool(dcs._client._token)]
            for dcs in (a, b)
        ]
        self.step("1 race")
        won = [bool(a.attempt_to_acquire_leader()), bool(b.attempt_to_acquire_leader())]
        seen["1 race"] = won
        w, loser = (a, b) if won[0] else (b, a)
        self.roles = {w._name: "W", loser._name: "L"}
        seen["1 touch_member"] = [
            w.touch_member(member_data("W", "running")),
            loser.touch_member(member_data("L", "streaming")),
        ]
        seen["1 cluster"] = self.views(lambda c: c.leader is not None and len(c.members) == 2)
        self.step("2 watch")
        held = self.view(w, lambda c: c.leader is not None)
        watched = self.view(loser, lambda c: c.leader is not None)
        assert held.leader is not None and watched.leader is not None
        woke, took, done = self.timed_watch(
            loser, watched.leader.version, 10, lambda: bool(w.delete_leader(held.leader))
        )
        seen["2 L's watch woke on the delete"] = [done, woke, 0.4 <= took < 3]
        seen["2 L attempt_to_acquire_leader"] = bool(loser.attempt_to_acquire_leader())
        seen["2 cluster"] = self.views(lambda c: c.leader is not None and c.leader.name == loser._name)
        self.step("3 delete_cluster")
        seen["3 delete_cluster"] = bool(w.delete_cluster())
        seen["3 cluster"] = self.views(lambda c: c.is_empty())


@pytest.mark.timeout(120)
def test_patroni_etcd3_tls_and_auth(locked: Locked, monkeypatch: pytest.MonkeyPatch) -> None:
    """patroni.yml's https, cacert, cert, key, username and password, with a client certificate etcd accepts."""
    quiet_watcher_stops(monkeypatch)
    options = locked.options(locked.unnamed)
    etcd, pykine = LockedScenario(locked.etcd, **options), LockedScenario(locked.pykine, **options)
    run_scenarios([etcd, pykine], 90)
    assert pykine.seen == etcd.seen, pykine.explain(etcd.seen, "pykine, against etcd")
    members = {"W": member_data("W", "running"), "L": member_data("L", "streaming")}
    state = {"initialize": None, "config": None, "leader": "W", "members": members, "last_lsn": 0}
    state |= {"failover": None, "sync": [None, None, 0], "history": None, "failsafe": None}
    want = {
        "0 gateway": [200, 200],
        "0 wrong password": "exit 1",
        "0 nodes": [["/v3", True, True]] * 2,
        "1 race": [True, False],
        "1 touch_member": [True, True],
        "1 cluster": {"W": state, "L": state},
        "2 L's watch woke on the delete": [True, True, True],
        "2 L attempt_to_acquire_leader": True,
        "2 cluster": {"W": {**state, "leader": "L"}, "L": {**state, "leader": "L"}},
        "3 delete_cluster": True,
        "3 cluster": {role: {**state, "leader": None, "members": {}} for role in ("W", "L")},
    }
    assert etcd.seen == want, etcd.explain(want, "etcd, against the expected")
    assert pykine.seen == want, pykine.explain(want, "pykine, against the expected")


def https(server: Server, options: dict[str, Any], path: str, body: Any, token: str = "") -> list[Any]:
    """One HTTP/1.1 request as Patroni's urllib3 makes it, with its TLS options: [status, content type, body]."""
    context = ssl.create_default_context(cafile=options["cacert"])
    context.load_cert_chain(options["cert"], options["key"])
    host, port = server.address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    headers = {"Content-Type": "application/json"} | ({"authorization": token} if token else {})
    try:
        method = "GET" if body is None else "POST"
        connection.request(method, path, None if body is None else json.dumps(body), headers)
        answer = connection.getresponse()
        return [answer.status, answer.getheader("Content-Type"), answer.read().decode()]
    finally:
        connection.close()


def test_gateway_refuses_client_certificate_common_name(locked: Locked) -> None:
    """With client certificates required and auth on, etcd's gateway refuses /v3/ requests from a certificate
    with a CommonName, token or not (a CN identity cannot pass through the gateway): Patroni configured with
    such a certificate never gets past its member list request and waits on etcd for ever."""
    named, unnamed = locked.options(locked.named), locked.options(locked.unnamed)
    credentials = {"name": "patroni", "password": PASSWORD}
    key = {"key": b64(PREFIX), "range_end": b64(prefix_range_end(PREFIX))}
    seen: dict[str, dict[str, Any]] = {}
    for server in (locked.etcd, locked.pykine):
        token = json.loads(https(server, unnamed, "/v3/auth/authenticate", credentials)[2])["token"]
        seen[server.name] = {
            "version": https(server, named, "/version", None)[0],
            "member list": https(server, named, "/v3/cluster/member/list", {}),
            "authenticate": https(server, named, "/v3/auth/authenticate", credentials),
            "range with a token": https(server, named, "/v3/kv/range", key, token),
            "range on the CommonName alone": https(server, named, "/v3/kv/range", key),
            "range without a CommonName": https(server, unnamed, "/v3/kv/range", key, token)[0],
            "v3beta range": https(server, named, "/v3beta/kv/range", key, token),  # /v3beta/ is /v3/ there
            "no such route": https(server, named, "/v3/nope", {}),
        }
    refused = [400, "text/plain; charset=utf-8", COMMON_NAME_REFUSED + "\n"]
    want = {
        "version": 200,
        "member list": refused,
        "authenticate": refused,
        "range with a token": refused,
        "range on the CommonName alone": refused,
        "range without a CommonName": 200,
        "v3beta range": refused,
        "no such route": refused,
    }
    assert seen["etcd"] == want
    assert seen["pykine"] == seen["etcd"], json.dumps(seen, indent=1)
