"""The real etcdctl 3.4 against real etcd and pykine: what operators type must behave the same.

Each command runs against both servers; `-w json` output is compared after blanking only what
must differ between two clusters (ids, raft bookkeeping, sizes, names, URLs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from harness import PykineServer, Server, pair

ETCDCTL = shutil.which("etcdctl") or "etcdctl"

# Header fields that belong to a cluster, not to the data.
HEADER_IDS = ("cluster_id", "member_id", "raft_term")
# Status fields that describe the server process and its storage, not the data.
STATUS_FIELDS = ("version", "dbSize", "dbSizeInUse", "raftIndex", "raftTerm", "raftAppliedIndex", "leader")
# Member fields that name a particular cluster member.
MEMBER_FIELDS = ("ID", "name", "peerURLs", "clientURLs")


@dataclass
class Result:
    """What one etcdctl run produced."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """etcdctl's own error lines; the zap warnings before them carry timestamps and client ids."""
        return [line for line in self.stderr.splitlines() if line.startswith("Error:")]


def etcdctl(server: Server, *args: str, stdin: str | None = None, json_output: bool = True) -> Result:
    command = [ETCDCTL, "--endpoints", server.address, "--command-timeout=5s"]
    if json_output:
        command += ["-w", "json"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    done = subprocess.run(
        [*command, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False
    )
    return Result(done.returncode, done.stdout, done.stderr)


def _blank(mapping: dict[str, Any], names: tuple[str, ...]) -> None:
    """Blank the named fields that are present (absent ones must stay absent on both)."""
    for name in names:
        if name in mapping:
            mapping[name] = "<normalised>"


def _blank_header_ids(value: Any) -> None:
    if isinstance(value, dict):
        _blank(value, HEADER_IDS)
        for item in value.values():
            _blank_header_ids(item)
    elif isinstance(value, list):
        for item in value:
            _blank_header_ids(item)


def normalise(args: list[str], stdout: str) -> Any:
    """Parse etcdctl's JSON and blank what differs between two clusters holding the same data."""
    try:
        document = json.loads(stdout)
    except json.JSONDecodeError:
        return stdout  # commands such as `compaction` print text even with -w json
    _blank_header_ids(document)
    if args[:2] == ["endpoint", "status"]:
        for entry in document:
            _blank(entry, ("Endpoint",))
            _blank(entry["Status"], STATUS_FIELDS)
    if args[:2] == ["member", "list"]:
        for member in document.get("members", []):
            # Set even when absent: pykine has no peers, so it may leave peerURLs out entirely.
            for name in MEMBER_FIELDS:
                member[name] = "<normalised>"
    return document


# (label, etcdctl arguments, stdin). Both servers start empty at revision 1, so revisions line up.
TXN_SUCCEEDS = 'value("foo") = "bar3"\nmod("foo/a") > "0"\n\nput t1 yes\nget foo\ndel foo/c\n\nput t1 no\n\n'
TXN_FAILS = 'version("foo") = "99"\n\nput t2 yes\n\nput t2 no\nget t2\nget foo --prefix\n\n'
SEQUENCE: list[tuple[str, list[str], str | None]] = [
    ("put", ["put", "foo", "bar"], None),
    ("put again", ["put", "foo", "bar2"], None),
    ("put foo/a", ["put", "foo/a", "1"], None),
    ("put foo/b", ["put", "foo/b", "2"], None),
    ("put new key with prev-kv", ["put", "foo/c", "3", "--prev-kv"], None),
    ("put with prev-kv", ["put", "foo", "bar3", "--prev-kv"], None),
    ("get", ["get", "foo"], None),
    ("get missing", ["get", "missing"], None),
    ("get prefix", ["get", "--prefix", "foo"], None),
    ("get prefix limit", ["get", "--prefix", "foo/", "--limit", "1"], None),
    ("get prefix sorted", ["get", "--prefix", "foo/", "--sort-by=MODIFY", "--order=DESCEND"], None),
    ("get prefix keys only", ["get", "--prefix", "foo/", "--keys-only"], None),
    ("get from key", ["get", "--from-key", "foo/b"], None),
    ("get old revision", ["get", "--rev", "2", "foo"], None),
    ("get old revision of a prefix", ["get", "--rev", "4", "--prefix", "foo"], None),
    ("txn that succeeds", ["txn"], TXN_SUCCEEDS),
    ("txn that fails", ["txn"], TXN_FAILS),
    ("del prefix with prev-kv", ["del", "--prefix", "--prev-kv", "foo/"], None),
    ("del missing", ["del", "missing"], None),
    ("compaction", ["compaction", "5"], None),
    ("get compacted revision", ["get", "--rev", "3", "foo"], None),
    ("get future revision", ["get", "--rev", "999", "foo"], None),
    ("get at compaction revision", ["get", "--rev", "5", "--prefix", "foo"], None),
    ("endpoint status", ["endpoint", "status"], None),
    ("member list", ["member", "list"], None),
]
ARGS = {label: args for label, args, _ in SEQUENCE}


@dataclass
class Session:
    """One run of SEQUENCE: (etcd's result, pykine's result) per label, and where each listened."""

    etcd_address: str
    pykine_address: str
    results: dict[str, tuple[Result, Result]]


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    """Run the whole sequence once against a fresh etcd and a fresh pykine."""
    with pair() as servers:
        results = {
            label: (etcdctl(servers.etcd, *args, stdin=stdin), etcdctl(servers.pykine, *args, stdin=stdin))
            for label, args, stdin in SEQUENCE
        }
        yield Session(servers.etcd.address, servers.pykine.address, results)


@pytest.mark.parametrize("label", [label for label, _, _ in SEQUENCE])
def test_json_output_matches_etcd(session: Session, label: str) -> None:
    """Same exit code, same error line, same JSON (ids and server facts aside) as etcd."""
    want, got = session.results[label]
    args = ARGS[label]
    assert got.returncode == want.returncode, f"{label}: etcd exited {want.returncode}, pykine {got.returncode}"
    assert got.error_lines == want.error_lines, f"{label}: etcd said {want.error_lines}, pykine {got.error_lines}"
    assert normalise(args, got.stdout) == normalise(args, want.stdout), (
        f"{label}\n--- etcd:\n{want.stdout}\n--- pykine:\n{got.stdout}"
    )


def test_sequence_really_exercised_the_servers(session: Session) -> None:
    """Guard against a comparison of two identical failures: the key commands really worked on etcd."""
    transcripts = session.results
    for label in ("put", "get prefix", "txn that succeeds", "del prefix with prev-kv", "compaction"):
        assert transcripts[label][0].returncode == 0, transcripts[label][0].stderr
    assert json.loads(transcripts["txn that succeeds"][0].stdout)["succeeded"] is True
    assert "succeeded" not in json.loads(transcripts["txn that fails"][0].stdout)
    assert json.loads(transcripts["del prefix with prev-kv"][0].stdout)["deleted"] == 2
    assert transcripts["get compacted revision"][0].error_lines == [
        "Error: etcdserver: mvcc: required revision has been compacted"
    ]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@pytest.mark.pykine_engine
def test_endpoint_status_describes_pykine(session: Session) -> None:
    """Status must claim a version clients accept (>= 3.5.13) and a single self-led member."""
    _, got = session.results["endpoint status"]
    address = session.pykine_address
    [entry] = json.loads(got.stdout)
    status = entry["Status"]
    assert entry["Endpoint"] == address
    assert _version(status["version"]) >= (3, 5, 13), status["version"]
    assert status["leader"] == status["header"]["member_id"]
    assert status["dbSize"] > 0


@pytest.mark.pykine_engine
def test_member_list_describes_pykine(session: Session) -> None:
    """One member, reachable at the address pykine listens on."""
    _, got = session.results["member list"]
    address = session.pykine_address
    document = json.loads(got.stdout)
    [member] = document["members"]
    assert f"http://{address}" in member["clientURLs"]
    assert member["ID"] == document["header"]["member_id"]
    assert member["name"]


@pytest.fixture
def pykine() -> Iterator[PykineServer]:
    workdir = tempfile.mkdtemp(prefix="pykine-etcdctl-")
    server = PykineServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.pykine_engine
def test_plain_transcript(pykine: PykineServer) -> None:
    """A readable session in etcdctl's default output, as an operator would see it."""
    member_id = r"[0-9a-f]+"
    steps: list[tuple[list[str], str | None, str | None]] = [
        (["put", "greeting", "hello"], None, "OK"),
        (["put", "greeting/en", "hi"], None, "OK"),
        (["put", "greeting/fr", "salut"], None, "OK"),
        (["get", "greeting"], None, "greeting\nhello"),
        (["get", "--prefix", "greeting/"], None, "greeting/en\nhi\ngreeting/fr\nsalut"),
        (["get", "--prefix", "--keys-only", "greeting/"], None, "greeting/en\n\ngreeting/fr"),
        (["get", "--print-value-only", "greeting/fr"], None, "salut"),
        (["get", "--rev", "2", "greeting"], None, "greeting\nhello"),
        (["get", "nothing-here"], None, ""),
        (["txn"], 'value("greeting") = "hello"\n\nput greeting/de hallo\nget greeting\n\nput x y\n\n', None),
        (["del", "--prefix", "greeting/"], None, "3"),
        (["get", "--prefix", "greeting/"], None, ""),
        (["compaction", "3"], None, "compacted revision 3"),
        (["endpoint", "health"], None, None),
        (["member", "list"], None, None),
        (["endpoint", "status"], None, None),
    ]
    outputs: list[str] = []
    for args, stdin, expected in steps:
        result = etcdctl(pykine, *args, stdin=stdin, json_output=False)
        assert result.returncode == 0, f"etcdctl {' '.join(args)}: {result.stderr}"
        # etcdctl 3.4 reports `endpoint health` on stderr, for etcd too.
        outputs.append((result.stderr if args == ["endpoint", "health"] else result.stdout).rstrip("\n"))
        if expected is not None:
            assert outputs[-1] == expected, f"etcdctl {' '.join(args)} printed {result.stdout!r}"
    txn, health, members, status = outputs[9], outputs[13], outputs[14], outputs[15]
    assert txn == "SUCCESS\n\nOK\n\ngreeting\nhello"
    assert re.fullmatch(
        rf"{re.escape(pykine.address)} is healthy: successfully committed proposal: took = \S+", health
    ), health
    assert re.fullmatch(rf"{member_id}, started, [^,]+, [^,]*, http://{re.escape(pykine.address)}, false", members), (
        members
    )
    fields = [field.strip() for field in status.split(",")]
    assert fields[0] == pykine.address and fields[1] == members.split(",")[0], status
    assert _version(fields[2]) >= (3, 5, 13) and fields[4:6] == ["true", "false"], status

    compacted = etcdctl(pykine, "get", "--rev", "2", "greeting", json_output=False)
    assert compacted.returncode == 1
    assert compacted.error_lines == ["Error: etcdserver: mvcc: required revision has been compacted"]
    assert compacted.stdout == ""
