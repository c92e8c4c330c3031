"""An embedded dqlite node: Debian's libdqlite (1.11) through ctypes.

The node runs raft and serves SQL on its own thread with its own libuv loop;
pykine talks to it only through its socket, with the wire protocol
(backends/dqlitewire.py), like any other client. Starting and stopping block
for tens of milliseconds, so callers run them in an executor. See
docs/dqlite-research.md for what 1.11 has and lacks.
"""

from __future__ import annotations

import ctypes
import os
import secrets

from pykine.backends.base import BackendError

# A node started with this id on an empty data directory bootstraps a new cluster (as node 1 would).
BOOTSTRAP_ID = 0x2DC171858C3155BE
LIBRARY = "libdqlite.so.0"

_node_p = ctypes.c_void_p


def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError as exc:
        raise BackendError(f"dqlite needs {LIBRARY} (Debian: apt-get install libdqlite0): {exc}") from None
    lib.dqlite_node_create.argtypes = [ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_node_p)]
    lib.dqlite_node_create.restype = ctypes.c_int
    lib.dqlite_node_set_bind_address.argtypes = [_node_p, ctypes.c_char_p]
    lib.dqlite_node_set_bind_address.restype = ctypes.c_int
    lib.dqlite_node_set_network_latency_ms.argtypes = [_node_p, ctypes.c_uint]
    lib.dqlite_node_set_network_latency_ms.restype = ctypes.c_int
    lib.dqlite_node_start.argtypes = [_node_p]
    lib.dqlite_node_start.restype = ctypes.c_int
    lib.dqlite_node_stop.argtypes = [_node_p]
    lib.dqlite_node_stop.restype = ctypes.c_int
    lib.dqlite_node_destroy.argtypes = [_node_p]
    lib.dqlite_node_destroy.restype = None
    lib.dqlite_node_errmsg.argtypes = [_node_p]
    lib.dqlite_node_errmsg.restype = ctypes.c_char_p
    return lib


def generate_node_id() -> int:
    """A new random id for a node joining a cluster.

    63 bits, unlike libdqlite's own generator: the node id is also the pykine
    member id etcd clients see, which pykine's member table stores as a signed
    64-bit integer.
    """
    while True:
        node_id = secrets.randbits(63)
        if node_id not in (0, BOOTSTRAP_ID):
            return node_id


class DqliteNode:
    """One dqlite node: created and bound at construction, then start() and stop() (both blocking)."""

    def __init__(self, node_id: int, address: str, data_dir: str, *, network_latency_ms: int = 0) -> None:
        self._lib = _library()
        self.id = node_id
        self.address = address
        os.makedirs(data_dir, exist_ok=True)
        node = _node_p()
        rc = self._lib.dqlite_node_create(node_id, address.encode(), data_dir.encode(), ctypes.byref(node))
        if rc != 0:
            message = self._lib.dqlite_node_errmsg(node) if node else None
            if node:
                self._lib.dqlite_node_destroy(node)
            raise BackendError(f"cannot create dqlite node {node_id} in {data_dir}: {self._text(message, rc)}")
        self._node: ctypes.c_void_p | None = node
        self._started = False
        # Binding happens here, so a port in use fails now, not at start. IPv4 literals only on 1.11.
        self._check(self._lib.dqlite_node_set_bind_address(node, address.encode()), f"cannot bind {address}")
        if network_latency_ms:
            self._check(self._lib.dqlite_node_set_network_latency_ms(node, network_latency_ms), "bad network latency")

    @staticmethod
    def _text(message: bytes | None, rc: int) -> str:
        return message.decode(errors="replace") if message else f"error {rc}"

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            message = self._text(self._lib.dqlite_node_errmsg(self._node), rc)
            self.close()
            raise BackendError(f"dqlite node {self.id}: {what}: {message}")

    def start(self) -> None:
        """Start raft and the SQL server on the node's own thread (bootstraps a new cluster if the id says so)."""
        assert self._node is not None, "closed"
        self._check(self._lib.dqlite_node_start(self._node), "cannot start")
        self._started = True

    def close(self) -> None:
        """Stop the node (no leadership transfer: the caller hands over first) and free it."""
        node, self._node = self._node, None
        if node is None:
            return
        if self._started:
            self._lib.dqlite_node_stop(node)
            self._started = False
        self._lib.dqlite_node_destroy(node)
