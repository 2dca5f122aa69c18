"""The orchestrator: runs batches of requests through a pipeline's stages, one `StageWorker` per stage,
whatever the stages run in — that is the transport's business (`backends/`: this process, one process per
stage, Ray actors).

Single stage: the one worker runs whole request programs. Two stages: stage 0 (the Thinker) runs context
programs — prefill, text and think decoding — and for image requests emits a hand-off (the full and CFG
contexts with their RoPE positions and lengths, the output size and the RNG state), which the orchestrator
routes to stage 1 (the DiT), which denoises and decodes.

A worker that dies (killed, crashed, out of memory) or goes silent (stopped: no heartbeat for
`request_timeout`) never hangs the caller: the batch fails with `WorkerDiedError`, the other workers are shut
down, and every later `generate` raises `EngineShutDownError` at once. A request that fails inside a worker
fails alone: its output carries the error.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Protocol

from bagel_serve.config.pipelines import PipelineSpec
from bagel_serve.engine.preprocess import Prepared
from bagel_serve.engine.request import Request, RequestOutput
from bagel_serve.engine.stats import RunStats
from bagel_serve.pipeline.stage_worker import Codec, Flags, describe

POLL_S = 0.05  # how often the parent looks at its workers while it waits for results
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


class Orchestrator:
    """`generate` runs a batch to completion; `shutdown()` stops the workers (idempotent; also done at
    interpreter exit and when this object is collected)."""

    def __init__(self, pipeline: PipelineSpec, prepare: Callable[[int, Request], Prepared], transport: Transport, *,
                 init_timeout: float = 300.0, request_timeout: float = 60.0) -> None:
        self.pipeline = pipeline
        self.prepare = prepare
        self.request_timeout = request_timeout
        self.last_stats: RunStats | None = None
        self.stage_stats: list[RunStats] = []
        self._lock = threading.Lock()
        self._batch = 0
        self._closed: str | None = None  # why we serve no more requests
        self._transport = transport
        self._heard = [time.monotonic()] * transport.num_stages
        # Holds the transport, not self: collecting this object (or exiting) stops the workers.
        self._finalizer = weakref.finalize(self, transport.stop)
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

    def shutdown(self) -> None:
        """Stop every worker (idempotent). Later `generate` calls raise `EngineShutDownError`."""
        if self._closed is None:
            self._closed = "shutdown() was called"
        self._finalizer()

    def generate(self, requests: list[Request], *, progress: bool = False, timed: bool = False,
                 on_token: Callable[[int, int], None] | None = None) -> list[RequestOutput]:
        """All requests, prepared first (no work is done if any is bad), then run to completion.

        `on_token(request_index, token_id)` streams decoded tokens as they are produced."""
        self._check_open()
        prepared = [self.prepare(i, r) for i, r in enumerate(requests)]
        flags = Flags(timed=timed, stream=on_token is not None)
        codec = self._transport.codec
        with self._lock:
            self._check_open()
            self._batch += 1
            batch = self._batch
            blobs = [codec.dumps((r, p, flags)) for r, p in zip(requests, prepared)]  # a pickling error sends nothing
            t0 = time.perf_counter()
            for i, blob in enumerate(blobs):
                self._transport.send(0, ("request", None, (batch, i), blob))
            outputs, errors = self._collect(batch, len(requests), on_token)
            self.stage_stats = self._collect_stats(batch)
            self.last_stats = RunStats.merged(self.stage_stats, len(requests), time.perf_counter() - t0)
        return collect_outputs(requests, outputs, errors)

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed is not None:
            raise EngineShutDownError(f"engine is shut down ({self._closed}); create a new Omni to serve again")

    def _fatal(self, message: str, details: str | None = None) -> WorkerDiedError:
        """Stop the remaining workers and make the error that fails this batch and closes the engine. The
        worker's own last error line goes into the message, its whole traceback into a note."""
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
                t.send(stage + 1 if kind == "handoff" else stage - 1, msg)
            elif kind != "alive":
                return msg
            if time.monotonic() >= deadline:
                return None

    def _check_workers(self, awaiting: str) -> None:
        """Fail the batch when a worker died, or (with heartbeats) sent nothing for `request_timeout` while
        the parent waits on the workers for `awaiting` ("2 request(s) were in flight"): the parent only ever
        waits on them, so silence always means a stopped or hung worker, never a caller's hang."""
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

    def _collect(self, batch: int, n: int, on_token: Callable[[int, int], None] | None
                 ) -> tuple[dict[int, RequestOutput], dict[int, BaseException]]:
        codec = self._transport.codec
        pending = set(range(n))
        outputs: dict[int, RequestOutput] = {}
        errors: dict[int, BaseException] = {}
        streamed = [0] * n
        callback_errors: dict[int, BaseException] = {}
        next_check = time.monotonic() + POLL_S
        while pending:
            msg = self._receive(POLL_S)
            if msg is None or time.monotonic() >= next_check:
                self._check_workers(f"{len(pending)} request(s) were in flight")
                next_check = time.monotonic() + POLL_S
            if msg is None:
                continue
            kind, stage, key, data = msg
            if kind == "fatal":
                raise self._fatal(f"{self._transport.name(stage)} failed while {len(pending)} request(s) were "
                                  f"in flight", data)
            if kind not in ("token", "output", "error") or key[0] != batch or key[1] not in pending:
                continue  # ready/stats, or a late message of an abandoned batch
            i = key[1]
            if kind == "token":
                streamed[i] += 1
                _emit(on_token, i, [data], callback_errors)
                continue
            pending.discard(i)
            if kind == "error":
                errors[i] = self._rebuild_error(*data)
                continue
            try:
                out: RequestOutput = codec.loads(data)
            except Exception as e:
                errors[i] = WorkerRequestError(f"request {i}: its output from stage {stage} could not be received "
                                               f"({describe(e)})")
                continue
            # Tokens travel ahead of the output, but a stage-1 output may overtake stage 0's last tokens:
            # send what has not arrived yet from the output itself.
            if on_token is not None and len(out.token_ids) > streamed[i]:
                _emit(on_token, i, out.token_ids[streamed[i]:], callback_errors)
            if i in callback_errors:
                errors[i] = callback_errors[i]
            else:
                outputs[i] = out
        return outputs, errors

    def _collect_stats(self, batch: int) -> list[RunStats]:
        t = self._transport
        for s in range(t.num_stages):
            t.send(s, ("stats", None, batch, None))
        stats: dict[int, RunStats] = {}
        while len(stats) < t.num_stages:
            msg = self._receive(POLL_S)
            if msg is None:
                self._check_workers(f"the stats of {t.num_stages - len(stats)} stage(s) were awaited")
                continue
            kind, stage, key, data = msg
            if kind == "fatal":
                raise self._fatal(f"{t.name(stage)} failed", data)
            if kind == "stats" and key == batch:
                stats[stage] = t.codec.loads(data)
        return [stats[s] for s in range(t.num_stages)]

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
