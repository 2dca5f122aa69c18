"""What a caller holds while its requests run in the orchestrator's loop: a `Submission` (cancel it, see what
is still pending) and the `Event`s the loop sends to its sink as things happen.

Events, in the order a request sees them (`index` is the request's place in its submission):

  Event("token", i, token id)              a decoded token (answer or think plan), when streaming was asked
  Event("progress", i, (done, total))      a denoising step ran, when progress was asked
  Event("output", i, RequestOutput)        the request finished (its output may carry `.error`)
  Event("error", i, exception)             the request failed, was cancelled or timed out
  Event("fatal", -1, WorkerDiedError)      the engine failed: every pending request of every caller ends

The sink is called from the orchestrator's loop thread: it must be quick and must not block (a
`queue.Queue.put`, or `loop.call_soon_threadsafe` into an asyncio loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from bagel_serve.pipeline.stage_worker import RequestCancelledError

if TYPE_CHECKING:
    from bagel_serve.engine.preprocess import Prepared
    from bagel_serve.engine.request import Request

__all__ = ["Event", "Submission", "QueueFullError", "RequestCancelledError", "RequestTimeoutError"]


class QueueFullError(RuntimeError):
    """The engine already holds `max_queue` unfinished requests: this submission was refused, at once."""


class RequestTimeoutError(TimeoutError):
    """A request ran past its deadline (the submission's `timeout`); it was cancelled."""


@dataclass(frozen=True)
class Event:
    kind: str
    index: int
    data: Any = None


Sink = Callable[[Event], None]


class Submission:
    """Requests submitted together. `pending` holds the indices that have not ended yet."""

    def __init__(self, owner: Any, batch: int, requests: list["Request"], prepared: list["Prepared"], sink: Sink,
                 deadline: float | None, stream: bool) -> None:
        self._owner = owner
        self.batch = batch
        self.requests = requests
        self.prepared = prepared
        self.sink = sink
        self.deadline = deadline
        self.stream = stream
        self.pending: set[int] = set(range(len(requests)))
        self.streamed = [0] * len(requests)

    @property
    def done(self) -> bool:
        return not self.pending

    def cancel(self, index: int | None = None, error: BaseException | None = None) -> None:
        """End request `index` (all pending ones when None) now: the stages drop it and free its KV blocks;
        its sink gets an "error" event with `error` (default: RequestCancelledError). Idempotent."""
        self._owner.cancel(self, index, error)
