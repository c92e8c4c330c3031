"""Prometheus metrics, served on --metrics-bind-address when it is set."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

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


def serve_metrics(bind_address: str) -> None:
    """Serve /metrics on host:port from a background thread."""
    host, _, port = bind_address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0")
