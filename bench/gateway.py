"""The JSON gateway's throughput beside real etcd's: Put, Range and Txn over HTTP/1.1.

Starts etcd and pykine (on SQLite) as bench/run.py does, then has nghttp2's
h2load (an independent C client, HTTP/1.1 with keep-alive) POST the same
JSON body to each server's `/v3/kv/...` route, and prints calls per second
and the server's CPU time per call, with pykine/etcd ratios:

    .venv/bin/python bench/gateway.py [--calls 20000] [--clients 8]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import run  # bench/run.py: the servers and how to start and measure them

CALLS = {
    "put": ("/v3/kv/put", '{"key":"Z3cvaw==","value":"' + "eHh4" * 64 + '"}'),
    "range": ("/v3/kv/range", '{"key":"Z3cvaw=="}'),
    "txn": (
        "/v3/kv/txn",
        '{"compare":[{"key":"Z3cvaw==","target":"VERSION","result":"GREATER","version":"0"}],'
        '"success":[{"request_range":{"key":"Z3cvaw=="}}]}',
    ),
}


def h2load(address: str, path: str, body: Path, calls: int, clients: int) -> float:
    """Calls per second h2load reached; every call must have succeeded."""
    command = ["h2load", "--h1", "-n", str(calls), "-c", str(clients), "-d", str(body)]
    done = subprocess.run(
        [*command, "-H", "Content-Type: application/json", f"http://{address}{path}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    succeeded = re.search(r"(\d+) succeeded, (\d+) failed", done.stdout)
    assert succeeded and int(succeeded[2]) == 0 and int(succeeded[1]) == calls, done.stdout
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", done.stdout)
    assert rate, done.stdout
    return float(rate[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("bench: h2load is missing (Debian: nghttp2-client)")
    sys.path[:0] = [str(run.ROOT), str(run.ROOT / "tests")]
    specs = {spec.name: spec for spec in run.SERVERS}
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for name in ("etcd", "pykine"):
        workdir = Path(tempfile.mkdtemp(prefix=f"pykine-gateway-{name}-"))
        running = run.start(specs[name], workdir, None)
        try:
            results[name] = {}
            for call, (path, body) in CALLS.items():
                body_file = workdir / f"{call}.json"
                body_file.write_text(body)
                before = run.proc_cpu_seconds(running.process.pid) or 0.0
                rate = h2load(running.address, path, body_file, args.calls, args.clients)
                cpu = (run.proc_cpu_seconds(running.process.pid) or 0.0) - before
                results[name][call] = (rate, cpu / args.calls * 1e6)
        finally:
            run.stop(running)
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'call':8} {'etcd/s':>9} {'pykine/s':>9} {'ratio':>6} {'etcd µs':>8} {'pykine µs':>9}")
    for call in CALLS:
        (etcd_rate, etcd_cpu), (ours, our_cpu) = results["etcd"][call], results["pykine"][call]
        print(f"{call:8} {etcd_rate:9.0f} {ours:9.0f} {ours / etcd_rate:6.2f} {etcd_cpu:8.0f} {our_cpu:9.0f}")
    print("µs: the server's CPU time per call; ratio: pykine/etcd calls per second (above 1 is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
