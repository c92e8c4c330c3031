"""`make bench` in miniature: bench/run.py against real etcd and pykine with tiny sizes.

Checks only that every phase ran on both servers and did work without errors (an error here is
a failed call or a wrong answer: a missing watch event, a wrong count); never how fast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT

RUN = Path(ROOT) / "bench" / "run.py"
SERVERS = ("etcd", "pykine", "pykine-passthrough")
# What the load generator reports: list and watch report two views each.
PHASES = ("create", "get", "update", "list", "list_page", "count", "watch", "watch_write", "delete")


def test_bench_runs_every_phase_on_every_server(tmp_path: Path) -> None:
    if shutil.which("go") is None:
        pytest.fail("`go` is not installed: the benchmark needs golang-go and golang-etcd-server-dev")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--objects=50",
            "--clients=2",
            "--phase-seconds=0.5",
            f"--servers={','.join(SERVERS)}",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, f"bench/run.py exited {done.returncode}:\n{done.stdout}\n{done.stderr[-4000:]}"
    document = json.loads(out.read_text())
    assert list(document["servers"]) == list(SERVERS)
    for server in SERVERS:
        result = document["servers"][server]
        assert result["error"] is None, f"{server}: {result['error']}"
        assert result["start_seconds"] > 0 and result["peak_rss_bytes"] > 0, result
        phases = {phase["name"]: phase for phase in result["loadgen"]["phases"]}
        assert list(phases) == list(PHASES), f"{server}: {list(phases)}"
        for name, phase in phases.items():
            assert phase["ops"] > 0, f"{server} {name}: no operations: {phase}"
            assert phase["errors"] == 0, f"{server} {name}: {phase['errors']} errors, first: {phase.get('first_error')}"
        watch = phases["watch"]["extra"]
        assert watch["missing_events"] == 0 and watch["missing_prev_kv"] == 0, f"{server}: {watch}"
        assert phases["delete"]["extra"]["left"] == 0, f"{server}: {phases['delete']}"
    assert "create" in done.stdout and "pykine" in done.stdout, done.stdout
