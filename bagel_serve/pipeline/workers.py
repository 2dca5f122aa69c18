"""The process worker backend (`worker_backend="process"` / `"multi_process"`): one OS process per stage.

`ProcessOrchestrator` has the in-process `Orchestrator`'s interface (`generate`, `last_stats`,
`stage_stats`) plus `shutdown()`. It starts one worker per stage with the `spawn` start method of
`torch.multiprocessing`. The weights are loaded once, in this process, and shared: on the CPU they are
moved into shared memory (`Module.share_memory()`) before the workers start, and the modules are
passed to the workers as process arguments, so torch's pickling sends shared-memory handles (CUDA IPC
handles for CUDA tensors) and nothing is loaded or copied again. Each worker builds its own `Runner`
(with its own KV cache) and its own `Engine` with its stage's scheduler limits.

Stage 0 runs context programs (prefill, text and think decoding); an image request ends there with a
`Handoff`, which is exported (`pipeline.transfer`: the KV rows go through shared memory or CUDA IPC) and
sent to stage 1, which imports it into its own KV cache, denoises and decodes.

Messages. Every queue carries tuples `(kind, stage, key, data)` of plain values: `key` is
`(batch, request index)` (the batch number keeps a late message of an abandoned batch out of the next
one) and `data`, where it holds objects with tensors or images, is a blob pickled with torch's
`ForkingPickler` by the sender itself, so that a pickling error is the sender's error for that request
(not a message lost in a queue's feeder thread) and an undecodable blob fails only its request.

  parent  -> stage 0  ("request", -, key, blob(Request, prepared, flags))
  stage 0 -> stage 1  ("handoff", 0, key, blob(HandoffPayload, flags))
  parent  -> stage s  ("stats", -, batch, None)   ("stop", -, None, None)
  stage s -> parent   ("ready", s, pid, None)      ("token", s, key, token id)
                      ("output", s, key, blob(RequestOutput))   (PIL images pickle)
                      ("error", s, key, ("TypeName: message", blob(exception) or None, traceback))
                      ("stats", s, batch, blob(RunStats))       ("fatal", s, None, traceback)

Worker loop: while its engine has work it drains its input queue without blocking, then steps the
engine and sends what finished; when idle it blocks for at most `batch_timeout` seconds, so it notices
a stop message, or the parent's death, soon. A request that fails inside a worker comes back as an
error for that request only, and the worker keeps serving. A worker that dies (killed, crashed) never
hangs the parent: while collecting results the parent polls the result queue with a short timeout and
checks every worker; a dead one fails the whole batch with `WorkerDiedError`, the other workers are
shut down, and every later `generate` raises `EngineShutDownError` at once.

Numerics: a worker uses the parent's `torch.get_num_threads()` (and float32 matmul precision), so a
CPU model computes in the worker exactly what it computes in the parent.

Test hook: `BAGEL_SERVE_TEST_WORKER_START_DELAY` (environment, read by the workers; tests only) delays
a worker's start by some seconds, to exercise `init_timeout`: `"2.5"` delays every stage, `"1:30"`
delays stage 1 by 30 s, `"0:1,1:3"` both.

Usual spawn caveats apply: a script that creates an `Omni` with this backend needs an
`if __name__ == "__main__":` guard, and CPU weights in shared memory need enough room in /dev/shm.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.multiprocessing as tmp
from multiprocessing.reduction import ForkingPickler

from bagel_serve.config.deploy import DeployConfig, PipelineSpec
from bagel_serve.config.engine_options import EngineOptions
from bagel_serve.engine.request import Request, RequestOutput
from bagel_serve.engine.runner import Handoff, RunStats, Runner
from bagel_serve.engine.scheduler import SchedulerConfig
from bagel_serve.pipeline.orchestrator import _merge_stats, scheduler_config
from bagel_serve.pipeline.transfer import export_handoff, import_handoff, release_handoff_contexts

START_DELAY_ENV = "BAGEL_SERVE_TEST_WORKER_START_DELAY"

_POLL_S = 0.05  # how often the parent looks at its workers while it waits for results
_STOP_GRACE_S = 5.0  # how long a worker may take to leave its loop before it is terminated


class WorkerDiedError(RuntimeError):
    """A stage worker process died (was killed, crashed or failed to start); its batch failed."""


class EngineShutDownError(WorkerDiedError):
    """The engine was shut down (explicitly, or after a worker died): it serves no more requests."""


class WorkerRequestError(RuntimeError):
    """A request failed inside a worker with an exception that could not be sent back as itself."""


@dataclass(frozen=True)
class _Flags:
    timed: bool = False
    stream: bool = False


@dataclass(frozen=True)
class _Numerics:
    """Settings the worker copies from the parent so that it computes the same numbers."""

    num_threads: int
    matmul_precision: str

    @classmethod
    def here(cls) -> "_Numerics":
        return cls(torch.get_num_threads(), torch.get_float32_matmul_precision())

    def apply(self) -> None:
        torch.set_num_threads(self.num_threads)
        torch.set_float32_matmul_precision(self.matmul_precision)


def _dumps(obj: Any) -> bytes:
    return bytes(ForkingPickler.dumps(obj))


def _loads(blob: bytes) -> Any:
    return ForkingPickler.loads(blob)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _start_delay(stage: int, spec: str | None) -> float:
    """Seconds to wait before starting, from START_DELAY_ENV ("secs" or "stage:secs[,stage:secs]")."""
    if not spec:
        return 0.0
    try:
        if ":" not in spec:
            return float(spec)
        for part in spec.split(","):
            s, _, secs = part.partition(":")
            if int(s) == stage:
                return float(secs)
    except ValueError:
        raise ValueError(f"{START_DELAY_ENV}={spec!r}: expected seconds or stage:seconds[,stage:seconds]") from None
    return 0.0


# ---------------------------------------------------------------------------------------------- the worker
def _worker_main(stage: int, num_stages: int, model: Any, vae: Any, tokenizer_source: Any, config: SchedulerConfig,
                 inbox: Any, outbox: Any, next_inbox: Any, batch_timeout: float, numerics: _Numerics) -> None:
    """Entry point of a stage worker process (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    try:
        numerics.apply()
        delay = _start_delay(stage, os.environ.get(START_DELAY_ENV))
        if delay > 0:
            time.sleep(delay)
        from tqdm import tqdm

        # The engine's (disabled) progress bars would otherwise create tqdm's default lock, a
        # multiprocessing semaphore that this process, leaving with os._exit, would never unlink.
        tqdm.set_lock(threading.RLock())
        from bagel_serve.engine.runner import Runner
        from bagel_serve.engine.scheduler import Engine
        from bagel_serve.engine.tokenizer import BagelTokenizer

        if model.device.type == "cuda":
            torch.cuda.set_device(model.device)
        tok = tokenizer_source if isinstance(tokenizer_source, BagelTokenizer) else BagelTokenizer(tokenizer_source)
        runner = Runner(model, vae, tok)
        worker = _Worker(stage, num_stages, runner, Engine(runner, config), inbox, outbox, next_inbox, batch_timeout)
        outbox.put(("ready", stage, os.getpid(), None))
        worker.loop()
    except BaseException:
        try:
            outbox.put(("fatal", stage, None, traceback.format_exc()))
            outbox.close()
            outbox.join_thread()  # the parent reads its results while it serves: this does not block long
        finally:
            os._exit(1)
    # Stopped (or orphaned): nothing left to send. Skip the interpreter's teardown, which takes seconds
    # with torch loaded, and the joins of queue feeder threads whose reader may be gone.
    os._exit(0)


class _Worker:
    def __init__(self, stage: int, num_stages: int, runner: Runner, engine: Any, inbox: Any, outbox: Any,
                 next_inbox: Any, batch_timeout: float) -> None:
        self.stage = stage
        self.num_stages = num_stages
        self.runner = runner
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.next_inbox = next_inbox
        self.batch_timeout = batch_timeout
        self.keys: dict[int, tuple[tuple[int, int], _Flags]] = {}  # engine rid -> (key, flags)
        self._parent = tmp.parent_process()
        self._next_parent_check = 0.0

    # ------------------------------------------------------------------ loop
    def loop(self) -> None:
        while True:
            busy = self.engine.has_work()
            for msg in self._receive(block=not busy):
                if msg[0] == "stop":
                    return
                self._handle(msg)
            if self._parent_gone():
                return
            if self.engine.has_work():
                self.engine.step()
                for rid, result, error in self.engine.pop_finished():
                    self._finished(rid, result, error)

    def _receive(self, block: bool) -> list[tuple]:
        msgs = []
        try:
            msgs.append(self.inbox.get(timeout=self.batch_timeout) if block else self.inbox.get_nowait())
            while True:
                msgs.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return msgs

    def _parent_gone(self) -> bool:
        now = time.monotonic()
        if self._parent is None or now < self._next_parent_check:
            return False
        self._next_parent_check = now + 1.0
        return not self._parent.is_alive()

    # ------------------------------------------------------------------ messages
    def _send(self, kind: str, key: Any, data: Any) -> None:
        self.outbox.put((kind, self.stage, key, data))

    def _send_error(self, key: tuple[int, int], e: BaseException) -> None:
        tb = "".join(traceback.format_exception(e))
        try:
            blob = _dumps(e)
            _loads(blob)  # an exception that pickles but cannot be rebuilt is sent as text only
        except Exception:
            blob = None
        self._send("error", key, (_describe(e), blob, tb))

    def _handle(self, msg: tuple) -> None:
        kind, _, key, data = msg
        if kind == "stats":
            self._send("stats", key, _dumps(self.engine.stats))
            self.engine.stats = RunStats()
            return
        try:
            obj = _loads(data)
        except Exception as e:
            self._send_error(key, RuntimeError(f"stage {self.stage} could not receive request {key[1]}: {_describe(e)}"))
            return
        try:
            if kind == "request":
                req, prep, flags = obj
                index = key[1]
                cb = (lambda tok, key=key: self._send("token", key, int(tok))) if flags.stream else None
                if self.num_stages == 1:
                    program = self.runner.program(index, req, prep, cb)
                else:
                    program = self.runner.context_program(index, req, prep, cb)
            elif kind == "handoff":
                payload, flags = obj
                h = import_handoff(payload, self.runner)
                del payload, obj
                req, program = h.request, self.runner.image_program(h)
            else:
                raise RuntimeError(f"stage {self.stage} got an unknown message {kind!r}")
        except Exception as e:
            self._send_error(key, e)
            return
        self.engine.timed = flags.timed
        self.keys[self.engine.add_program(program, req)] = (key, flags)

    def _finished(self, rid: int, result: Any, error: BaseException | None) -> None:
        key, flags = self.keys.pop(rid)
        if error is not None:
            self._send_error(key, error)
            return
        try:
            if isinstance(result, Handoff):
                if self.next_inbox is None:
                    raise RuntimeError(f"stage {self.stage} is the last stage but request {key[1]} needs another")
                blob = _dumps((export_handoff(result), flags))
                release_handoff_contexts(result)
                self.next_inbox.put(("handoff", self.stage, key, blob))
            else:
                self._send("output", key, _dumps(result))
        except Exception as e:
            self._send_error(key, e)


# ---------------------------------------------------------------------------------------------- the parent
class _Workers:
    """The worker processes and their queues; stopping them needs nothing else (finalizer-safe)."""

    def __init__(self, procs: list[Any], inboxes: list[Any], results: Any) -> None:
        self.procs = procs
        self.inboxes = inboxes
        self.results = results
        self.stopped = False

    def stop(self, grace: float = _STOP_GRACE_S) -> None:
        if self.stopped:
            return
        self.stopped = True
        started = [p for p in self.procs if p.pid is not None]
        for p, q in zip(self.procs, self.inboxes):
            if p.pid is not None and p.is_alive():
                try:
                    q.put(("stop", None, None, None))
                except Exception:
                    pass
        deadline = time.monotonic() + grace
        for p in started:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in started:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        for q in [*self.inboxes, self.results]:
            try:
                q.close()
            except Exception:
                pass


def _ensure_fd_limit(modules: list[torch.nn.Module]) -> None:
    """Shared CPU tensors travel as file descriptors (one per storage): make sure we may open enough."""
    try:
        import resource
    except ImportError:
        return
    storages = sum(1 for m in modules for t in [*m.parameters(), *m.buffers()])
    need = 2 * storages + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(hard, need)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass


class ProcessOrchestrator:
    """Runs batches of requests through the pipeline's stages, one worker process per stage.

    `generate` and `last_stats` behave as the in-process `Orchestrator`'s; `shutdown()` stops the
    workers (idempotent; also done at interpreter exit and when this object is collected).
    `model_dir` is where the workers read the tokenizer (default: the parent's tokenizer is pickled).
    """

    def __init__(self, runner: Runner, pipeline: PipelineSpec, deploy: DeployConfig, options: EngineOptions | None = None,
                 *, model_dir: str | os.PathLike | None = None) -> None:
        options = options or EngineOptions()
        if pipeline.num_stages > 2:
            raise NotImplementedError(f"the process worker backend runs pipelines of one or two stages; "
                                      f"{pipeline.name} has {pipeline.num_stages}")
        self.runner = runner
        self.pipeline = pipeline
        self.options = options
        self.configs = [scheduler_config(deploy, s.stage_id) for s in pipeline.stages]
        self.last_stats: RunStats | None = None
        self.stage_stats: list[RunStats] = []
        self._lock = threading.Lock()
        self._batch = 0
        self._closed: str | None = None  # why we serve no more requests

        n = pipeline.num_stages
        ctx = tmp.get_context("spawn")
        model, vae = runner.model, runner.vae
        if model.device.type == "cpu":
            _ensure_fd_limit([model, vae])
            model.share_memory()
            vae.share_memory()
        inboxes = [ctx.Queue() for _ in range(n)]
        results = ctx.Queue()
        for q in [*inboxes, results]:
            q.cancel_join_thread()  # never block this process's exit on a queue a dead worker does not read
        tokenizer_source = str(model_dir) if model_dir is not None else runner.tok
        numerics = _Numerics.here()
        procs = [
            ctx.Process(
                target=_worker_main, name=f"bagel-serve-stage{s}", daemon=True,
                args=(s, n, model, vae, tokenizer_source, self.configs[s], inboxes[s], results,
                      inboxes[s + 1] if s + 1 < n else None, float(options.batch_timeout), numerics))
            for s in range(n)
        ]
        self._workers = _Workers(procs, inboxes, results)
        # Holds the workers, not self: collecting this object (or exiting) stops them.
        self._finalizer = weakref.finalize(self, _Workers.stop, self._workers)
        try:
            for p in procs:
                p.start()
            self._wait_ready()
        except BaseException:
            self._closed = "the workers failed to start"
            self._workers.stop(grace=0.0)
            self._finalizer.detach()
            raise

    # ------------------------------------------------------------------ public
    @property
    def worker_pids(self) -> list[int | None]:
        return [p.pid for p in self._workers.procs]

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
        """All requests, validated first (no work is done if any is bad), then run to completion.

        `on_token(request_index, token_id)` streams decoded tokens as they are produced. `progress` bars
        are not shown by worker processes.
        """
        self._check_open()
        prepared = [self.runner.prepare(i, r) for i, r in enumerate(requests)]
        flags = _Flags(timed=timed, stream=on_token is not None)
        with self._lock:
            self._check_open()
            self._batch += 1
            batch = self._batch
            blobs = [_dumps((r, p, flags)) for r, p in zip(requests, prepared)]  # a pickling error sends nothing
            t0 = time.perf_counter()
            for i, blob in enumerate(blobs):
                self._workers.inboxes[0].put(("request", None, (batch, i), blob))
            outputs, errors = self._collect(batch, len(requests), on_token)
            self.stage_stats = self._collect_stats(batch)
            self.last_stats = _merge_stats(self.stage_stats, len(requests), time.perf_counter() - t0)
        if errors:
            raise errors[min(errors)]
        return [outputs[i] for i in range(len(requests))]

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed is not None:
            raise EngineShutDownError(f"engine is shut down ({self._closed}); create a new Omni to serve again")

    def _recv(self, timeout: float) -> tuple | None:
        try:
            return self._workers.results.get(timeout=timeout)
        except queue.Empty:
            return None

    def _fatal(self, message: str, details: str | None = None) -> WorkerDiedError:
        """Stop the remaining workers and make the error that fails this batch and closes the engine."""
        self._closed = message
        self._finalizer()
        err = WorkerDiedError(message)
        if details:
            err.add_note(details)
        return err

    def _check_workers(self, in_flight: int) -> None:
        for s, p in enumerate(self._workers.procs):
            if not p.is_alive():
                details = self._fatal_details(s)
                raise self._fatal(f"stage {s} worker (pid {p.pid}) exited with code {p.exitcode} while {in_flight} "
                                  f"request(s) were in flight", details)

    def _fatal_details(self, stage: int) -> str | None:
        """The traceback a crashed worker sent, if it is already queued (looked at without waiting long)."""
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            msg = self._recv(0.02)
            if msg is None:
                break
            if msg[0] == "fatal" and msg[1] == stage:
                return f"stage {stage} worker traceback:\n{msg[3]}"
        return None

    def _wait_ready(self) -> None:
        o = self.options
        timeout, name = (o.init_timeout, "init_timeout") if o.init_timeout <= o.stage_init_timeout else \
            (o.stage_init_timeout, "stage_init_timeout")
        deadline = time.monotonic() + timeout
        ready: set[int] = set()
        n = len(self._workers.procs)
        while len(ready) < n:
            msg = self._recv(_POLL_S)
            if msg is not None:
                if msg[0] == "ready":
                    ready.add(msg[1])
                elif msg[0] == "fatal":
                    raise self._fatal(f"stage {msg[1]} worker failed to start", msg[3])
                continue
            for s, p in enumerate(self._workers.procs):
                if s not in ready and not p.is_alive():
                    raise self._fatal(f"stage {s} worker (pid {p.pid}) exited with code {p.exitcode} while starting",
                                      self._fatal_details(s))
            if time.monotonic() >= deadline:
                late = [s for s in range(n) if s not in ready]
                who = ", ".join(f"stage {s} worker (pid {self._workers.procs[s].pid})" for s in late)
                self._closed = f"{who} did not start within {name}={timeout:g} s"
                raise TimeoutError(f"{who} did not become ready within {name}={timeout:g} s "
                                   f"(raise {name} if loading is slow)")

    def _collect(self, batch: int, n: int, on_token: Callable[[int, int], None] | None
                 ) -> tuple[dict[int, RequestOutput], dict[int, BaseException]]:
        pending = set(range(n))
        outputs: dict[int, RequestOutput] = {}
        errors: dict[int, BaseException] = {}
        streamed = [0] * n
        callback_errors: dict[int, BaseException] = {}
        next_check = time.monotonic() + _POLL_S
        while pending:
            msg = self._recv(_POLL_S)
            if msg is None or time.monotonic() >= next_check:
                self._check_workers(len(pending))
                next_check = time.monotonic() + _POLL_S
            if msg is None:
                continue
            kind, stage, key, data = msg
            if kind == "fatal":
                raise self._fatal(f"stage {stage} worker (pid {self._workers.procs[stage].pid}) failed while "
                                  f"{len(pending)} request(s) were in flight", data)
            if kind not in ("token", "output", "error") or key[0] != batch or key[1] not in pending:
                continue  # ready/stats, or a late message of an abandoned batch
            i = key[1]
            if kind == "token":
                streamed[i] += 1
                self._emit(on_token, i, [data], callback_errors)
                continue
            pending.discard(i)
            if kind == "error":
                errors[i] = _rebuild_error(*data)
                continue
            try:
                out: RequestOutput = _loads(data)
            except Exception as e:
                errors[i] = WorkerRequestError(f"request {i}: its output from stage {stage} could not be received "
                                               f"({_describe(e)})")
                continue
            # Tokens travel on the result queue ahead of the output, but a stage-1 output may overtake
            # stage 0's last tokens: send what has not arrived yet from the output itself.
            if on_token is not None and len(out.token_ids) > 1 + streamed[i]:
                self._emit(on_token, i, out.token_ids[1 + streamed[i]:], callback_errors)
            if i in callback_errors:
                errors[i] = callback_errors[i]
            else:
                outputs[i] = out
        return outputs, errors

    @staticmethod
    def _emit(on_token: Callable[[int, int], None] | None, i: int, tokens: list[int],
              callback_errors: dict[int, BaseException]) -> None:
        """Stream tokens to the callback; a callback that raises fails its request (as in process)."""
        if on_token is None or i in callback_errors:
            return
        try:
            for tok in tokens:
                on_token(i, tok)
        except Exception as e:
            callback_errors[i] = e

    def _collect_stats(self, batch: int) -> list[RunStats]:
        n = len(self._workers.procs)
        for q in self._workers.inboxes:
            q.put(("stats", None, batch, None))
        stats: dict[int, RunStats] = {}
        while len(stats) < n:
            msg = self._recv(_POLL_S)
            if msg is None:
                self._check_workers(0)
                continue
            kind, stage, key, data = msg
            if kind == "fatal":
                raise self._fatal(f"stage {stage} worker (pid {self._workers.procs[stage].pid}) failed", data)
            if kind == "stats" and key == batch:
                stats[stage] = _loads(data)
        return [stats[s] for s in range(n)]


def _rebuild_error(text: str, blob: bytes | None, tb: str) -> BaseException:
    err: BaseException | None = None
    if blob is not None:
        try:
            err = _loads(blob)
        except Exception:
            err = None
    if not isinstance(err, BaseException):
        err = WorkerRequestError(text)
    err.add_note(f"raised in a worker process:\n{tb}")
    return err

