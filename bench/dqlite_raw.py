"""dqlite's own insert rate on this machine, for comparison with pykine-dqlite's rows in `make bench`.

Runs go-dqlite's `dqlite-benchmark` (Debian package go-dqlite, the same
libdqlite 1.11 pykine embeds): workload `kvwrite`, one autocommit
`INSERT OR REPLACE` of a 32-byte key and a 1 KiB value per operation, each
its own raft entry. pykine's create phase writes the same value size, but as
etcd transactions, many per raft entry (group commit).

    .venv/bin/python bench/dqlite_raw.py [--seconds 8] [--workers 1,16] [--nodes 1,3]

Writes bench/results/<date>-dqlite-raw.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(nodes: int, workers: int, seconds: int) -> dict[str, float]:
    """One run: the first node drives the workload and leads; the others join it."""
    binary = shutil.which("dqlite-benchmark")
    if binary is None:
        sys.exit("dqlite-benchmark not found: apt-get install go-dqlite")
    directory = Path(tempfile.mkdtemp(prefix="pykine-dqlite-raw-"))
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(nodes)]
    common = ["--duration", str(seconds), "--workers", str(workers), "-w", "kvwrite"]
    helpers = [
        subprocess.Popen(
            [binary, "-d", address, "-D", str(directory / str(n)), "--join", addresses[0]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n, address in enumerate(addresses[1:], 1)
    ]
    try:
        began = time.monotonic()
        subprocess.run(
            [binary, "-d", addresses[0], "-D", str(directory / "0"), "--driver", "--cluster", ",".join(addresses),
             *common],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=seconds + 180,
            check=True,
        )  # fmt: skip
        elapsed = time.monotonic() - began
        operations = errors = 0
        latencies: list[float] = []
        for result in (directory / "0" / addresses[0] / "results").iterdir():
            lines = result.read_text().splitlines()
            operations += int(lines[0].split()[1])
            errors += int(lines[1].split()[1])
            # A header (n, n_err, avg, max, min, a title), then "<timestamp ns> <ms>" per operation.
            start = next(i for i, line in enumerate(lines) if line.startswith("measurements")) + 1
            latencies += [float(line.split()[1]) for line in lines[start:] if len(line.split()) == 2]
        latencies.sort()
        return {
            "nodes": nodes,
            "workers": workers,
            "seconds": seconds,
            "ops_per_second": operations / seconds,
            "errors": errors,
            "p50_ms": latencies[len(latencies) // 2] if latencies else 0.0,
            "p99_ms": latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
            "wall_seconds": elapsed,
        }
    finally:
        for helper in helpers:
            helper.terminate()
            helper.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--workers", default="1,16")
    parser.add_argument("--nodes", default="1,3")
    args = parser.parse_args()
    rows = []
    for nodes in map(int, args.nodes.split(",")):
        for workers in map(int, args.workers.split(",")):
            row = run(nodes, workers, args.seconds)
            rows.append(row)
            print(
                f"dqlite-benchmark kvwrite  nodes {nodes}  workers {workers:>2}:"
                f" {row['ops_per_second']:8.1f} ops/s  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms"
                f"  errors {row['errors']}"
            )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{datetime.date.today().isoformat()}-dqlite-raw.json"
    path.write_text(json.dumps({"tool": "dqlite-benchmark (go-dqlite 1.11.5, libdqlite 1.11)", "runs": rows}, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
