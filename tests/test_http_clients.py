"""Real HTTP clients of etcd's JSON gateway against pykine, beside real etcd: etcd3gw (OpenStack tooz's), curl.

The same scenario runs against both servers; what the client reports must
agree, apart from ids and revisions that differ by nature.
"""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any

from etcd3gw import utils
from etcd3gw.client import Etcd3Client
from harness import Pair, Server


def etcd3gw_scenario(server: Server) -> dict[str, Any]:
    """What an etcd3gw user does: keys, a lease with keys, members, a lock, a watch, a txn."""
    host, port = server.address.rsplit(":", 1)
    client = Etcd3Client(host=host, port=int(port))
    seen: dict[str, Any] = {"put": client.put("gw/k1", "v1"), "get": client.get("gw/k1")}
    lease = client.lease(ttl=30)
    client.put("gw/k2", "v2", lease=lease)
    seen["lease"] = (lease.ttl() > 0, lease.refresh(), lease.keys())
    seen["members"] = len(client.members())
    lock = client.lock("gw-lock", ttl=30)
    seen["lock"] = (lock.acquire(), lock.is_acquired(), lock.release(), lock.is_acquired())
    events, cancel = client.watch("gw/k3")
    writer = threading.Timer(0.3, lambda: client.put("gw/k3", "x"))
    writer.start()
    try:
        event = next(iter(events))
    finally:
        cancel()
        writer.join()
    seen["event"] = (event["kv"]["key"], event["kv"]["value"], event["kv"]["version"])
    compare = [{"key": utils._encode("gw/k1"), "result": "EQUAL", "target": "VALUE", "value": utils._encode("v1")}]
    success = [{"request_put": {"key": utils._encode("gw/k1"), "value": utils._encode("v9")}}]
    seen["txn"] = client.transaction({"compare": compare, "success": success, "failure": []}).get("succeeded")
    seen["after"] = client.get("gw/k1")
    seen["prefix"] = sorted(value for value, _ in client.get_prefix("gw/"))
    seen["revoke"] = lease.revoke()
    seen["gone"] = client.get("gw/k2")
    seen["delete"] = client.delete_prefix("gw/")
    return seen


def test_etcd3gw(fresh: Pair) -> None:
    want, got = etcd3gw_scenario(fresh.etcd), etcd3gw_scenario(fresh.pykine)
    assert got == want
    assert got["lock"] == (True, True, True, False) and got["txn"] is True and got["after"] == [b"v9"]


def curl(server: Server, path: str, body: str) -> str:
    done = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"http://{server.address}{path}", "-d", body],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def test_readme_curl_examples(fresh: Pair) -> None:
    """The README's curl examples, against both servers (values only: ids differ)."""
    for server in (fresh.etcd, fresh.pykine):
        curl(server, "/v3/kv/put", '{"key": "Zm9v", "value": "YmFy"}')
        answer = json.loads(curl(server, "/v3/kv/range", '{"key": "Zm9v"}'))
        assert [(kv["key"], kv["value"]) for kv in answer["kvs"]] == [("Zm9v", "YmFy")]
        answer = json.loads(curl(server, "/v3/kv/range", '{"key": "AA==", "range_end": "AA==", "count_only": true}'))
        assert answer["count"] == "1"
