"""The orchestrator: runs batches of requests through a pipeline's stages, one `StageWorker` per stage,
whatever the stages run in — that is the transport's business (`backends/`: this process, one process per
stage, Ray actors).

Single stage: the one worker runs whole request programs. Two stages: stage 0 (the Thinker) runs context
programs — prefill, text and think decoding — and for image requests emits a hand-off (the full and CFG
contexts with their RoPE positions and lengths, the output size and the RNG state), which the orchestrator
routes to stage 1 (the DiT), which denoises and decodes.

One loop thread receives what the stages send and delivers it to the callers' submissions, so requests of
different callers (threads, the async API, the HTTP server) share the stages' continuous batches; a request
can be cancelled (its KV blocks are freed at once), may carry a deadline, and the number of unfinished
requests may be bounded (`max_queue`).

A worker that dies (killed, crashed, out of memory) or goes silent (stopped: no heartbeat for
`request_timeout`) never hangs a caller: everything pending fails with `WorkerDiedError`, the other workers
are shut down, and every later call raises `EngineShutDownError` at once. A request that fails inside a
worker fails alone: its output carries the error.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from typing import Any, Callable, Protocol

from bagel_serve.config.pipelines import PipelineSpec
from bagel_serve.engine.preprocess import Prepared
from bagel_serve.engine.request import Request, RequestOutput
from bagel_serve.engine.stats import RunStats
from bagel_serve.pipeline.stage_worker import Codec, Flags, PeerLostError, describe
from bagel_serve.pipeline.submission import (Event, QueueFullError, RequestCancelledError, RequestTimeoutError, Sink,
                                             Submission)

POLL_S = 0.05  # how often the parent looks at its workers while it waits for results
PEER_EXIT_WAIT_S = 1.0  # how long a lost hand-off waits for its sender's exit to show
FATAL_GRACE_S = 1.0  # how long the other workers get to leave once one has died
_TRANSPORT_ONLY = ("handoff", "release")  # messages between stages, which the parent only routes


class WorkerDiedError(RuntimeError):
    """A stage worker died (was killed, crashed, failed to start or went silent); its batch failed."""


class EngineShutDownError(WorkerDiedError):
    """The engine was shut down (explicitly, or after a worker died): it serves no more requests."""


class WorkerRequestError(RuntimeError):
    """A request failed inside a worker with an exception that could not be sent back as itself."""


class Transport(Protocol):
    """How the parent reaches its stage workers."""

    num_stages: int
    codec: type[Codec]

    def send(self, stage: int, msg: tuple) -> None: ...

    def recv(self, timeout: float) -> tuple | None: ...

    def name(self, stage: int) -> str: ...

    def exited(self, stage: int) -> str | None:
        """How a dead worker ended ("exited with code -9"), or None while it lives."""

    def heartbeats(self) -> bool:
        """Whether its workers send "alive" messages (so silence means a stopped worker)."""

    def stop(self, grace: float = 5.0) -> None: ...


def collect_outputs(requests: list[Request], outputs: dict[int, RequestOutput],
                    errors: dict[int, BaseException]) -> list[RequestOutput]:
    """One output per request, in order: a request that failed gets an output carrying its error, so that
    the others of its batch are kept."""
    return [outputs[i] if i in outputs else RequestOutput(request_index=i, modality=r.modality, seed=r.seed,
                                                          error=errors[i])
            for i, r in enumerate(requests)]


class _Ask:
    """A question to every stage ("stats", "usage") and the replies received so far."""

    def __init__(self, num_stages: int) -> None:
        self.replies: dict[int, Any] = {}
        self.num_stages = num_stages
        self.error: BaseException | None = None
        self.done = threading.Event()


class Orchestrator:
    """Runs requests through the stages in one background loop, shared by every caller.

    `submit` queues requests and returns at once (a `Submission`; events go to its sink); `generate` is
    `submit` plus waiting, so `generate` calls from several threads — and the async API and the HTTP server,
    built on `submit` — run their requests in the same continuous batches. The loop thread starts when there
    is something in flight and ends when nothing is, so an idle engine holds no thread. `max_queue` bounds
    the unfinished requests (a submission over it raises `QueueFullError` at once; None: unbounded).

    `shutdown()` stops the workers (idempotent; also done at interpreter exit and when this object is
    collected); pending requests then fail with `EngineShutDownError`."""

    def __init__(self, pipeline: PipelineSpec, prepare: Callable[[int, Request], Prepared], transport: Transport, *,
                 init_timeout: float = 300.0, request_timeout: float = 60.0, max_queue: int | None = None) -> None:
        self.pipeline = pipeline
        self.prepare = prepare
        self.request_timeout = request_timeout
        self.max_queue = max_queue
        self.last_stats: RunStats | None = None
        self.stage_stats: list[RunStats] = []
        self.totals = RunStats()
        """Everything the stages reported since the start (summed over every stats collection)."""
        self._lock = threading.RLock()  # submissions, asks, the loop thread's life
        self._send_lock = threading.Lock()  # one sender at a time on the transport
        self._subs: dict[int, Submission] = {}
        self._asks: dict[tuple[str, int], _Ask] = {}
        self._inflight = 0
        self._cancelled: OrderedDict[tuple[int, int], None] = OrderedDict()  # for hand-offs still on their way
        self._thread: threading.Thread | None = None
        self._threads: list[threading.Thread | None] = [None]  # the last loop thread, for the finalizer
        self._batch = 0
        self._closed: str | None = None  # why we serve no more requests
        self._transport = transport
        self._heard = [time.monotonic()] * transport.num_stages
        # Holds the transport, not self: collecting this object (or exiting) stops the workers.
        self._finalizer = weakref.finalize(self, _stop, transport, self._threads)
        try:
            self._wait_ready(init_timeout)
        except BaseException:
            self._closed = self._closed or "the workers failed to start"
            transport.stop(grace=0.0)
            self._finalizer.detach()
            raise

    @property
    def transport(self) -> Transport:
        return self._transport

    @property
    def is_shut_down(self) -> bool:
        return self._closed is not None

    @property
    def in_flight(self) -> int:
        """Requests submitted and not ended yet (queued in a stage or running)."""
        return self._inflight

    def health(self) -> str | None:
        """None while the engine serves; else why it does not (shut down, or a dead worker)."""
        if self._closed is not None:
            return f"engine is shut down ({self._closed})"
        for s in range(self._transport.num_stages):
            how = self._transport.exited(s)
            if how is not None:
                return f"{self._transport.name(s)} {how}"
        return None

    def shutdown(self) -> None:
        """Stop every worker (idempotent). Pending and later requests fail with `EngineShutDownError`."""
        if self._closed is None:
            self._closed = "shutdown() was called"
        self._fail_all(EngineShutDownError(f"engine is shut down ({self._closed})"))
        self._finalizer()

    # ------------------------------------------------------------------ callers
    def submit(self, requests: list[Request], sink: Sink, *, timed: bool = False, stream: bool = False,
               progress: bool = False, timeout: float | None = None) -> Submission:
        """Queue requests (prepared first: no work is sent if any is bad) and return at once; `sink` gets
        their events (`submission` module). `stream`: token events; `progress`: denoising-step events;
        `timeout`: seconds until a request still pending is cancelled with `RequestTimeoutError`."""
        self._check_open()
        prepared = [self.prepare(i, r) for i, r in enumerate(requests)]
        flags = Flags(timed=timed, stream=stream, progress=progress)
        codec = self._transport.codec
        blobs = [codec.dumps((r, p, flags)) for r, p in zip(requests, prepared)]  # a pickling error sends nothing
        with self._lock:
            self._check_open()
            if self.max_queue is not None and self._inflight + len(requests) > self.max_queue:
                raise QueueFullError(f"the engine holds {self._inflight} unfinished request(s) and takes at most "
                                     f"max_queue={self.max_queue}; try again later")
            self._batch += 1
            deadline = time.monotonic() + timeout if timeout is not None else None
            sub = Submission(self, self._batch, list(requests), prepared, sink, deadline, stream)
            if requests:
                self._subs[sub.batch] = sub
                self._inflight += len(requests)
                self._ensure_loop()
        with self._send_lock:
            for i, blob in enumerate(blobs):
                self._send(0, ("request", None, (sub.batch, i), blob))
        return sub

    def cancel(self, sub: Submission, index: int | None = None, error: BaseException | None = None) -> None:
        """See `Submission.cancel`."""
        with self._lock:
            chosen = sorted(sub.pending) if index is None else [index] if index in sub.pending else []
            for i in chosen:
                self._end(sub, i)
        if not chosen:
            return
        if self._closed is None:
            with self._send_lock:
                for i in chosen:
                    key = (sub.batch, i)
                    self._cancelled[key] = None
                    while len(self._cancelled) > 10_000:
                        self._cancelled.popitem(last=False)
                    for s in range(self._transport.num_stages):
                        self._send(s, ("cancel", None, key, None))
        for i in chosen:
            _deliver(sub, Event("error", i, error or RequestCancelledError(f"request {i} was cancelled")))

    def generate(self, requests: list[Request], *, progress: bool = False, timed: bool = False,
                 on_token: Callable[[int, int], None] | None = None) -> list[RequestOutput]:
        """All requests, prepared first (no work is done if any is bad), then run to completion beside
        whatever else the engine runs. `on_token(request_index, token_id)` streams decoded tokens, in this
        thread; a callback that raises fails (and cancels) its request.

        `last_stats` / `stage_stats` then hold what the stages did since the previous collection: this
        call's work, and that of calls that ran beside it."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        t0 = time.perf_counter()
        sub = self.submit(requests, events.put, timed=timed, stream=on_token is not None)
        outputs: dict[int, RequestOutput] = {}
        errors: dict[int, BaseException] = {}
        callback_errors: dict[int, BaseException] = {}
        while len(outputs) + len(errors) < len(requests):
            ev = events.get()
            if ev.kind == "fatal":
                raise ev.data
            i = ev.index
            if ev.kind == "token":
                _emit(on_token, i, [ev.data], callback_errors)
                if i in callback_errors:
                    sub.cancel(i, callback_errors[i])
            elif ev.kind == "error":
                errors[i] = callback_errors.get(i, ev.data)
            elif ev.kind == "output":
                outputs[i] = ev.data
        self.stage_stats = self.collect_stats()
        self.last_stats = RunStats.merged(self.stage_stats, len(requests), time.perf_counter() - t0)
        return collect_outputs(requests, outputs, errors)

    def collect_stats(self) -> list[RunStats]:
        """Each stage's stats since the previous collection (the stages start counting again); also added
        to `totals`."""
        stats = self._ask("stats")
        with self._lock:
            self.totals = RunStats.merged([self.totals, *stats], self.totals.requests, self.totals.wall_s)
        return stats

    def usage(self) -> list[dict[str, Any]]:
        """Each stage's KV cache use and queue right now (`used_blocks`, `total_blocks`, `running`,
        `waiting`, ...)."""
        return self._ask("usage")

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed is not None:
            raise EngineShutDownError(f"engine is shut down ({self._closed}); create a new Omni to serve again")

    def _ask(self, kind: str) -> list[Any]:
        n = self._transport.num_stages
        ask = _Ask(n)
        with self._lock:
            self._check_open()
            self._batch += 1
            key = (kind, self._batch)
            self._asks[key] = ask
            self._ensure_loop()
        try:
            with self._send_lock:
                for s in range(n):
                    self._send(s, (kind, None, key, None))
        except WorkerDiedError:
            with self._lock:
                self._asks.pop(key, None)
            raise
        ask.done.wait()
        if ask.error is not None:
            raise ask.error
        return [ask.replies[s] for s in range(n)]

    def _ensure_loop(self) -> None:
        """Start the loop thread if it is not running (called with the lock held)."""
        if self._thread is None:
            # The workers' heartbeats were not read while idle: silence counts from now.
            self._heard = [time.monotonic()] * self._transport.num_stages
            self._thread = threading.Thread(target=self._loop, name="bagel-serve-engine", daemon=True)
            self._thread.start()
            self._threads[0] = self._thread

    def _loop(self) -> None:
        """Receive, route and deliver until nothing is in flight; a worker's death fails everything pending."""
        next_check = time.monotonic() + POLL_S
        while True:
            with self._lock:
                if not self._subs and not self._asks:
                    self._thread = None
                    return
            try:
                msg = self._receive(POLL_S)
                now = time.monotonic()
                if msg is None or now >= next_check:
                    self._expire(now)
                    awaiting = self._awaiting()
                    if awaiting:
                        self._check_workers(awaiting)
                    next_check = now + POLL_S
                if msg is not None:
                    self._dispatch(msg)
            except WorkerDiedError as e:
                self._fail_all(e)
            except BaseException as e:  # a bug of ours: never leave a caller waiting forever
                self._fail_all(self._fatal(f"the engine loop failed: {describe(e)}", traceback.format_exc()))

    def _awaiting(self) -> str | None:
        """What the loop waits on, in words, for the error that says a worker died meanwhile."""
        with self._lock:
            if self._inflight:
                return f"{self._inflight} request(s) were in flight"
            missing = sum(a.num_stages - len(a.replies) for a in self._asks.values())
        return f"the stats of {missing} stage(s) were awaited" if missing else None

    def _expire(self, now: float) -> None:
        with self._lock:
            late = [s for s in self._subs.values() if s.deadline is not None and now >= s.deadline]
        for sub in late:
            waited = now - (sub.deadline or now)
            sub.cancel(None, RequestTimeoutError(f"request ran past its timeout (by {waited:.1f} s) and was cancelled"))

    def _end(self, sub: Submission, i: int) -> None:
        """Request i of `sub` has ended (called with the lock held)."""
        sub.pending.discard(i)
        self._inflight -= 1
        if not sub.pending:
            self._subs.pop(sub.batch, None)

    def _fail_all(self, error: BaseException) -> None:
        """End every pending request and question with `error` (the engine cannot serve them)."""
        with self._lock:
            subs, asks = list(self._subs.values()), list(self._asks.values())
            self._subs.clear()
            self._asks.clear()
            for sub in subs:
                self._inflight -= len(sub.pending)
                sub.pending.clear()
        for sub in subs:
            _deliver(sub, Event("fatal", -1, error))
        for ask in asks:
            ask.error = error
            ask.done.set()

    def _dispatch(self, msg: tuple) -> None:
        kind, stage, key, data = msg
        if kind == "fatal":
            raise self._fatal(f"{self._transport.name(stage)} failed while {self._awaiting() or 'idle'}", data)
        if kind in ("stats", "usage"):
            with self._lock:
                ask = self._asks.get(key)
                if ask is None:
                    return
                ask.replies[stage] = self._transport.codec.loads(data) if kind == "stats" else data
                if len(ask.replies) == ask.num_stages:
                    del self._asks[key]
                    ask.done.set()
            return
        if kind not in ("token", "progress", "output", "error"):
            return  # "ready"
        error = self._rebuild_error(*data) if kind == "error" else None
        if isinstance(error, PeerLostError):
            self._await_dead_peer()
        with self._lock:
            sub = self._subs.get(key[0])
            if sub is None or key[1] not in sub.pending:
                return  # a late message of a request that ended (cancelled, timed out)
            i = key[1]
            if kind in ("output", "error"):
                self._end(sub, i)
        if kind == "token":
            sub.streamed[i] += 1
            _deliver(sub, Event("token", i, data))
        elif kind == "progress":
            _deliver(sub, Event("progress", i, data))
        elif kind == "error":
            _deliver(sub, Event("error", i, error))
        else:
            try:
                out: RequestOutput = self._transport.codec.loads(data)
            except Exception as e:
                _deliver(sub, Event("error", i, WorkerRequestError(
                    f"request {i}: its output from stage {stage} could not be received ({describe(e)})")))
                return
            # Tokens travel ahead of the output, but a stage-1 output may overtake stage 0's last tokens:
            # send what has not arrived yet from the output itself.
            if sub.stream:
                for tok in out.token_ids[sub.streamed[i]:]:
                    _deliver(sub, Event("token", i, tok))
            _deliver(sub, Event("output", i, out))

    def _send(self, stage: int, msg: tuple) -> None:
        """A message to a stage's worker (the caller holds the send lock). A connection that is gone is a
        dead worker: WorkerDiedError naming it (the server's 503), never a broken pipe."""
        try:
            self._transport.send(stage, msg)
        except (OSError, EOFError) as e:
            self._await_dead_peer(f"a message to stage {stage} was being sent")
            raise WorkerDiedError(f"{self._transport.name(stage)} could not be reached ({describe(e)})") from None

    def _await_dead_peer(self, what: str = "a hand-off was in flight") -> None:
        """A stage could not receive another's message, or we could not send one: if that worker died, say so
        for every request in flight (WorkerDiedError, the server's 503) rather than fail this one request on
        its own. Its exit may show a moment after the broken connection did."""
        end = time.monotonic() + PEER_EXIT_WAIT_S
        while True:
            self._check_workers(self._awaiting() or what)
            if time.monotonic() >= end:
                return
            time.sleep(POLL_S / 5)

    def _fatal(self, message: str, details: str | None = None) -> WorkerDiedError:
        """Stop the remaining workers and make the error that fails what is pending and closes the engine.
        The worker's own last error line goes into the message, its whole traceback into a note."""
        last = _last_line(details)
        self._closed = message
        self._finalizer.detach()
        self._transport.stop(grace=FATAL_GRACE_S)  # a stopped worker cannot leave on its own: do not wait long
        err = WorkerDiedError(f"{message}: {last}" if last else message)
        if details:
            err.add_note(details)
        return err

    def _receive(self, timeout: float) -> tuple | None:
        """The next message for the parent; routes stage-to-stage messages and notes who is alive."""
        t = self._transport
        deadline = time.monotonic() + timeout
        while True:
            msg = t.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                return None
            kind, stage = msg[0], msg[1]
            if stage is not None:
                self._heard[stage] = time.monotonic()
            if kind in _TRANSPORT_ONLY:
                to = stage + 1 if kind == "handoff" else stage - 1
                with self._send_lock:
                    self._send(to, msg)
                    if kind == "handoff" and msg[2] in self._cancelled:  # cancelled on its way: end it there too
                        del self._cancelled[msg[2]]
                        self._send(to, ("cancel", None, msg[2], None))
            elif kind != "alive":
                return msg
            if time.monotonic() >= deadline:
                return None

    def _check_workers(self, awaiting: str) -> None:
        """Fail what is pending when a worker died, or (with heartbeats) sent nothing for `request_timeout`
        while the parent waits on the workers for `awaiting` ("2 request(s) were in flight"): the loop only
        runs while it waits on them, so silence always means a stopped or hung worker, never a caller's hang."""
        t = self._transport
        for s in range(t.num_stages):
            how = t.exited(s)
            if how is not None:
                raise self._fatal(f"{t.name(s)} {how} while {awaiting}", self._fatal_details(s))
            silent = time.monotonic() - self._heard[s]
            if t.heartbeats() and silent > self.request_timeout:
                raise self._fatal(f"{t.name(s)} sent nothing for {silent:.0f} s (request_timeout="
                                  f"{self.request_timeout:g} s) while {awaiting}: it is stopped or hung")

    def _fatal_details(self, stage: int) -> str | None:
        """The traceback a crashed worker sent, if it is already queued (looked at without waiting long)."""
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            msg = self._transport.recv(0.02)
            if msg is None:
                break
            if msg[0] == "fatal" and msg[1] == stage:
                return f"stage {stage} worker traceback:\n{msg[3]}"
        return None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        t = self._transport
        ready: set[int] = set()
        while len(ready) < t.num_stages:
            msg = self._receive(POLL_S)
            if msg is not None:
                if msg[0] == "ready":
                    ready.add(msg[1])
                elif msg[0] == "fatal":
                    raise self._fatal(f"{t.name(msg[1])} failed to start", msg[3])
                continue
            for s in range(t.num_stages):
                how = t.exited(s) if s not in ready else None
                if how is not None:
                    raise self._fatal(f"{t.name(s)} {how} while starting", self._fatal_details(s))
            if time.monotonic() >= deadline:
                late = ", ".join(t.name(s) for s in range(t.num_stages) if s not in ready)
                self._closed = f"{late} did not start within init_timeout={timeout:g} s"
                raise TimeoutError(f"{late} did not become ready within init_timeout={timeout:g} s "
                                   f"(raise init_timeout if loading is slow)")

    def _rebuild_error(self, text: str, blob: Any, tb: str) -> BaseException:
        err: BaseException | None = None
        if blob is not None:
            try:
                err = self._transport.codec.loads(blob)
            except Exception:
                err = None
        if not isinstance(err, BaseException):
            err = WorkerRequestError(text)
        if self._transport.codec is not Codec:
            err.add_note(f"raised in a worker:\n{tb}")
        return err


def _stop(transport: Transport, threads: list[threading.Thread | None]) -> None:
    """Let the loop thread end (within a poll once nothing is pending: a thread still ending when the
    interpreter exits can abort it), then stop the workers."""
    thread = threads[0]
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=5.0)
    transport.stop()


def _deliver(sub: Submission, event: Event) -> None:
    """Hand an event to its caller's sink; a sink that fails (its event loop closed) loses only its events."""
    try:
        sub.sink(event)
    except Exception:
        pass


def _emit(on_token: Callable[[int, int], None] | None, i: int, tokens: list[int],
          callback_errors: dict[int, BaseException]) -> None:
    """Stream tokens to the callback; a callback that raises fails its request."""
    if on_token is None or i in callback_errors:
        return
    try:
        for tok in tokens:
            on_token(i, tok)
    except Exception as e:
        callback_errors[i] = e


def _last_line(details: str | None) -> str | None:
    if not details:
        return None
    lines = [ln.strip() for ln in details.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None
