"""The real etcd Go client (clientv3, what kube-apiserver uses) against real etcd and pykine.

tests/go/watchprobe is built once per session in GOPATH mode against Debian's etcd sources
(golang-go and golang-etcd-server-dev). Each scenario runs against a fresh etcd and a fresh
pykine; the client's observations, one JSON line each, must be the same on both, with only the
cluster id, member id and raft term blanked (each replaced by the order it first appears in, so
a server that changes its ids mid-run still differs). Both servers start empty, so revisions match.
"""

from __future__ import annotations

import difflib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, Server, pair

from bench import gobuild

SOURCE = Path(ROOT) / "tests" / "go" / "watchprobe" / "main.go"
# Build cache outside the repository, kept between sessions so later builds take seconds.
# Header fields that name a cluster, not the data; raft_term is raft bookkeeping pykine has none of.
IDENTITY_FIELDS = ("cluster_id", "member_id", "raft_term")
# etcd's default periodic progress-notify interval; pykine's own default is shorter, so pin both.
QUIET_INTERVAL = "10m"


@pytest.fixture(scope="session")
def watchprobe() -> str:
    """Build the probe (cached by its source's hash); a missing toolchain fails, it never skips."""
    try:
        return str(gobuild.build(SOURCE, "watchprobe", timeout=280))
    except gobuild.GoBuildError as error:
        pytest.fail(str(error))


@dataclass
class Probe:
    """One run of a scenario against one server."""

    server: str
    returncode: int
    lines: list[dict[str, Any]]
    stderr: str

    def where(self, step: str, watch: str | None = None) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["step"] == step and (watch is None or line.get("watch") == watch)]

    def one(self, step: str, watch: str | None = None) -> dict[str, Any]:
        found = self.where(step, watch)
        assert len(found) == 1, f"{self.server}: expected one {step!r} line for watch {watch!r}, got {found}"
        return found[0]

    def responses(self, step: str, watch: str) -> list[dict[str, Any]]:
        lines = self.where(step, watch)
        assert all("response" in line for line in lines), f"{self.server}: {step} {watch}: {lines}"
        return [line["response"] for line in lines]

    def events(self, step: str, watch: str) -> list[dict[str, Any]]:
        return [event for response in self.responses(step, watch) for event in response["events"]]


def run_probe(binary: str, server: Server, scenario: str) -> Probe:
    done = subprocess.run(
        [binary, "-endpoint", server.address, "-scenario", scenario],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        lines = [json.loads(line) for line in done.stdout.splitlines()]
    except json.JSONDecodeError as error:
        raise AssertionError(f"{server.name}: watchprobe printed something other than JSON: {done.stdout}") from error
    return Probe(server.name, done.returncode, lines, done.stderr)


def normalise(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace each cluster id, member id and raft term by the order it first appeared in."""
    seen: dict[str, dict[Any, str]] = {name: {} for name in IDENTITY_FIELDS}

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            copy = {}
            for name, item in value.items():
                if name in seen:
                    copy[name] = seen[name].setdefault(item, f"<{name} #{len(seen[name]) + 1}>")
                else:
                    copy[name] = walk(item)
            return copy
        if isinstance(value, list):
            return [walk(item) for item in value]
        return value

    return [walk(line) for line in lines]


def render(lines: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(line, sort_keys=True) for line in lines]


def differential(binary: str, scenario: str, interval: str = QUIET_INTERVAL) -> Probe:
    """Run a scenario on a fresh etcd and a fresh pykine; require the same observations; return pykine's."""
    with pair(
        f"--watch-progress-notify-interval={interval}",
        etcd_args=(f"--experimental-watch-progress-notify-interval={interval}",),
    ) as servers:
        want = run_probe(binary, servers.etcd, scenario)
        got = run_probe(binary, servers.pykine, scenario)
    assert want.returncode == 0 and want.lines[-1:] == [{"step": "done"}], (
        f"the {scenario} scenario failed against real etcd (exit {want.returncode}):\n"
        + "\n".join(render(want.lines))
        + f"\n{want.stderr[-3000:]}"
    )
    expected, actual = render(normalise(want.lines)), render(normalise(got.lines))
    diff = "\n".join(difflib.unified_diff(expected, actual, "etcd", "pykine", lineterm="", n=1))
    assert actual == expected, f"{scenario}: the Go client saw something else on pykine than on etcd:\n{diff}"
    assert got.returncode == 0, f"{scenario}: watchprobe exited {got.returncode} on pykine: {got.stderr[-3000:]}"
    return got


def _revision(line: dict[str, Any]) -> int:
    return line["header"]["revision"]


def _is_progress(response: dict[str, Any], revision: int) -> bool:
    return (
        response["is_progress_notify"]
        and response["events"] == []
        and response["header"]["revision"] == revision
        and response["err"] is None
    )


def test_request_progress_reaches_every_watch_of_the_stream(watchprobe: str) -> None:
    """kube-apiserver's watch cache: prefix watches with prev_kv and progress notify on one stream.

    Events carry prev_kv on updates and deletes, a prefix delete arrives as one response, and the
    reply to RequestProgress (watch id -1) is broadcast by the client to both watches with the
    current revision, even though the newest revision touched neither prefix.
    """
    got = differential(watchprobe, "progress")
    current = _revision(got.one("get before progress"))
    [unwatched] = [line for line in got.where("put") if line["key"] == "/registry/c/unwatched"]
    assert current == _revision(unwatched) == 10

    a = got.events("events", "a")
    assert [(e["type"], e["kv"]["key"], e["is_create"]) for e in a] == [
        ("PUT", "/registry/a/one", True),
        ("PUT", "/registry/a/two", True),
        ("PUT", "/registry/a/one", False),
        ("DELETE", "/registry/a/two", False),
    ]
    assert [e["prev_kv"]["value"] if e["has_prev_kv"] else None for e in a] == [None, None, "v1", "v1"]
    b = got.responses("events", "b")
    assert [len(response["events"]) for response in b] == [1, 1, 1, 2]
    assert [(e["kv"]["key"], e["prev_kv"]["value"]) for e in b[-1]["events"]] == [
        ("/registry/b/one", "v2"),
        ("/registry/b/two", "v1"),
    ]

    for watch in ("a", "b"):
        [progress] = got.responses("progress", watch)
        assert _is_progress(progress, current), f"watch {watch}: {progress}"
    [after] = got.responses("after progress", "a")
    assert [e["kv"]["key"] for e in after["events"]] == ["/registry/a/three"]


def test_compacted_revision_is_gone(watchprobe: str) -> None:
    """kube-apiserver's 410 Gone: reads and watches below the compact revision fail with ErrCompacted.

    The watch's one response carries the compact revision and the channel then closes; a watch
    at exactly the compact revision catches up from history (prev_kv included where etcd has it).
    """
    got = differential(watchprobe, "compacted")
    compacts = got.where("compact")
    assert [(c["revision"], c["err"]) for c in compacts] == [
        (4, None),
        (3, "etcdserver: mvcc: required revision has been compacted"),
        (1000, "etcdserver: mvcc: required revision is a future revision"),
    ]
    assert [c["err_is_compacted"] for c in compacts] == [False, True, False]
    assert compacts[2]["err_is_future_rev"]
    reads = got.where("get at revision")
    assert reads[0]["err_is_compacted"] and reads[0]["revision"] == 2
    assert reads[1]["err"] is None and [kv["value"] for kv in reads[1]["kvs"]] == ["v3"]

    first, second = got.where("watch compacted", "old")
    response = first["response"]
    assert response["err_is_compacted"] and response["canceled"], response
    assert response["compact_revision"] == 4 and response["events"] == []
    assert second == {"step": "watch compacted", "watch": "old", "closed": True}

    for watch in ("at", "at-prev-kv"):
        events = got.events("watch at compact revision", watch)
        assert [(e["type"], e["kv"]["mod_revision"]) for e in events] == [
            ("PUT", 4),
            ("PUT", 5),
            ("PUT", 7),
            ("DELETE", 8),
        ], watch


def test_progress_stays_on_its_own_stream(watchprobe: str) -> None:
    """Watches whose contexts carry other metadata (source=cache) get their own gRPC stream.

    RequestProgress on one stream answers only that stream's watch; the other sees the next
    event first. Deletes carry the deleted object in prev_kv, which kube-apiserver decodes.
    """
    got = differential(watchprobe, "streams")
    [created] = got.responses("created notify", "cache-created")
    assert created["created"] and created["header"]["revision"] == 1
    for watch in ("plain", "cache"):
        events = got.events("events", watch)
        assert [e["type"] for e in events] == ["PUT", "PUT", "DELETE"], watch
        assert events[2]["has_prev_kv"] and events[2]["prev_kv"]["value"] == '{"v":2}', watch
        assert events[2]["prev_kv"]["mod_revision"] == 3, watch
    current = _revision(got.one("get before progress"))
    [progress] = got.responses("progress", "plain")
    assert _is_progress(progress, current), progress
    for watch in ("plain", "cache", "cache-created"):
        [after] = got.responses("after progress", watch)
        assert not after["is_progress_notify"], watch
        assert [e["kv"]["key"] for e in after["events"]] == ["/registry/pods/default/p2"], watch


def test_periodic_progress_notification(watchprobe: str) -> None:
    """With a 1s interval on both servers, a WithProgressNotify watch gets a progress notification
    at the current revision; a watch on the same stream that did not ask gets none."""
    got = differential(watchprobe, "periodic", interval="1s")
    current = _revision(got.one("get"))
    [progress] = got.responses("periodic progress", "a")
    assert _is_progress(progress, current), progress
    [event] = got.responses("after periodic progress", "b")
    assert [e["kv"]["key"] for e in event["events"]] == ["/registry/b/new"]


def test_keepalive_pings_are_answered(watchprobe: str) -> None:
    """grpc-go's keepalive PINGs (kube-apiserver sends them) are acknowledged: a quiet watch survives them."""
    got = differential(watchprobe, "keepalive")
    assert [line["step"] for line in got.lines][-2:] == ["after pings", "done"]
