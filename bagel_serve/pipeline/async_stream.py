"""The orchestrator's events as an asyncio stream: what `Omni.stream` / `Omni.agenerate` and the HTTP server
consume. The loop thread hands each event to the caller's event loop (`call_soon_threadsafe`), so nothing
of the engine ever runs on the event loop, and leaving the stream early (an `async with` block that ends, a
task that is cancelled, a client that disconnects) cancels whatever of its requests is still pending.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from bagel_serve.pipeline.submission import Event, Sink, Submission


class AsyncStream:
    """Async iterator over the events of one submission; ends after each request's last event ("output" or
    "error"), or after a "fatal" one (which it yields, then stops)."""

    def __init__(self, submit: Callable[[Sink], Submission]) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._open = 0
        self.submission = submit(lambda ev: loop.call_soon_threadsafe(self._queue.put_nowait, ev))
        self._open = len(self.submission.requests)

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> Event:
        if self._open <= 0:
            raise StopAsyncIteration
        ev = await self._queue.get()
        if ev.kind in ("output", "error"):
            self._open -= 1
        elif ev.kind == "fatal":
            self._open = 0
        return ev

    def cancel(self, index: int | None = None) -> None:
        """Cancel request `index` (None: every pending one); its "error" event still comes."""
        self.submission.cancel(index)

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what is still pending; the stream yields nothing more."""
        if not self.submission.done:
            self.submission.cancel()
        self._open = 0
