"""The storage client for code without an event loop: the async Client, run on a loop of its own thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from pykine.client.connection import TLSConfig
from pykine.client.storage import Client, Event, Key, Value

T = TypeVar("T")


class SyncClient:
    """Client's calls, blocking. Safe to share between threads; close() it (or use `with`) when done."""

    def __init__(
        self, endpoints: str | Sequence[str], tls: TLSConfig | None = None, *, timeout: float | None = 30.0
    ) -> None:
        self._client = Client(endpoints, tls, timeout=timeout)  # checks endpoints and TLS files here
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pykine-client", daemon=True)
        self._thread.start()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def list(self, prefix: Key, revision: int = 0) -> list[Value]:
        return self._run(self._client.list(prefix, revision))

    def get(self, key: Key) -> Value:
        return self._run(self._client.get(key))

    def create(self, key: Key, data: bytes) -> int:
        return self._run(self._client.create(key, data))

    def update(self, key: Key, revision: int, data: bytes) -> int:
        return self._run(self._client.update(key, revision, data))

    def delete(self, key: Key, revision: int) -> int:
        return self._run(self._client.delete(key, revision))

    def watch(self, prefix: Key, revision: int = 0) -> Iterator[Event]:
        """Client.watch as a blocking iterator; closing it (or leaving a for loop) ends the watch."""
        events = self._client.watch(prefix, revision)
        try:
            while True:
                try:
                    yield self._run(anext(events))
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._run(events.aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
