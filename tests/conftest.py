"""Shared fixtures: a real etcd and a pykine, started fresh or reused in lockstep."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from harness import Pair

# Importing Patroni (tests/test_patroni*.py) sets the process umask to 077, and so does its Config
# for a data directory; files the tests then make for other users (a PAM service for PostgreSQL's
# backends, say) would be unreadable to them. Every test runs with the umask pytest started with.
INITIAL_UMASK = os.umask(0o022)
os.umask(INITIAL_UMASK)


def pytest_collection_finish(session: pytest.Session) -> None:
    os.umask(INITIAL_UMASK)


@pytest.fixture(autouse=True)
def _initial_umask() -> Iterator[None]:
    yield
    os.umask(INITIAL_UMASK)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Remember each phase's report so fixtures can tell a failed test."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def fresh() -> Iterator[Pair]:
    """A new etcd and a new pykine, both at revision 1."""
    servers = Pair().start()
    try:
        yield servers
    finally:
        servers.stop()


class _SharedPair:
    def __init__(self) -> None:
        self.servers: Pair | None = None

    def get(self) -> Pair:
        if self.servers is None:
            self.servers = Pair().start()
        return self.servers

    def discard(self) -> None:
        if self.servers is not None:
            self.servers.stop()
            self.servers = None


@pytest.fixture(scope="module")
def _shared() -> Iterator[_SharedPair]:
    shared = _SharedPair()
    try:
        yield shared
    finally:
        shared.discard()


@pytest.fixture
def servers(_shared: _SharedPair, request: pytest.FixtureRequest) -> Iterator[Pair]:
    """A pair reused across a module: every key is deleted first, on both.

    Both servers stay in lockstep as long as every test passes; after a
    failure the pair is replaced so one failure cannot cascade.
    """
    pair = _shared.get()
    pair.wipe()
    yield pair
    report = getattr(request.node, "report_call", None)
    if report is None or report.failed:
        _shared.discard()
