"""Prometheus metrics, served at /metrics on the client port and on --metrics-bind-address."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

WRITE_BATCH_REQUESTS = Histogram(
    "pykine_write_batch_requests",
    "Write requests committed together in one datastore transaction (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
WRITE_BATCH_SECONDS = Histogram(
    "pykine_write_batch_seconds",
    "Time to commit one write batch, snapshot read to durable commit.",
)
WRITE_BATCH_FAILURES = Counter(
    "pykine_write_batch_failures_total",
    "Write batches the datastore failed; every request in them got UNAVAILABLE.",
)
PASSTHROUGH_SECONDS = Histogram(
    "pykine_passthrough_call_seconds",
    "Time etcd took to answer a call forwarded by a passthrough (http(s):// endpoint), by method.",
    ["method"],
)
