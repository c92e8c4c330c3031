"""The storage client for code without an event loop: the async Client, run on a loop of its own thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from pykine.client.connection import TLSConfig
from pykine.client.errors import ClientError
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
        self._closed = False
        self._closing = threading.Lock()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coroutine.close()
            raise ClientError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        while True:
            try:
                return future.result(timeout=1.0)
            except concurrent.futures.TimeoutError:
                if self._closed and not self._loop.is_running():  # closed by another thread meanwhile
                    future.cancel()
                    raise ClientError("the client was closed") from None

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
        """Client.watch as a blocking iterator; closing it (or leaving a for loop, or Ctrl-C) ends the watch."""
        events = self._client.watch(prefix, revision)
        step: asyncio.Task[Event] | None = None
        try:
            while True:
                step = self._run(_start(anext(events)))  # type: ignore[arg-type]
                try:
                    event: Event = self._run(_finished(step))
                except StopAsyncIteration:
                    return
                step = None
                yield event
        finally:
            self._end_watch(events, step)

    def _end_watch(self, events: AsyncIterator[Event], step: asyncio.Task[Event] | None) -> None:
        """Stop a watch's pending read (still running after an interrupt), then close its stream."""
        if self._closed:
            return  # closing the client ended every stream
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_stop(events, step), self._loop).result(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        with self._closing:
            if self._closed:
                return
            self._closed = True
        asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout=STOP_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


# Longest a closing client or watch waits for the loop thread.
STOP_TIMEOUT = 10.0


async def _start(coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task for the coroutine on the client's loop, returned at once so that it can be cancelled later."""
    return asyncio.ensure_future(coroutine)


async def _finished(task: asyncio.Task[T]) -> T:
    return await asyncio.shield(task)  # an interrupted wait leaves the task for _stop to cancel


async def _stop(events: AsyncIterator[Event], step: asyncio.Task[Event] | None) -> None:
    if step is not None and not step.done():
        step.cancel()
        with contextlib.suppress(BaseException):
            await step
    await events.aclose()  # type: ignore[attr-defined]
