"""Stage workers outside this process: the parent side, and the process backend.

`WorkerOrchestrator` has the in-process `Orchestrator`'s interface (`generate`, `last_stats`,
`stage_stats`) plus `shutdown()`; it talks to one worker per stage (`stage_worker.StageWorker`) through
a transport. `ProcessOrchestrator` (`worker_backend="process"` / `"multi_process"`) is its transport of
OS processes on this host; `ray_workers.RayOrchestrator` is the one of Ray actors.

Process backend. Workers start with the `spawn` start method of `torch.multiprocessing`. The weights
are loaded once, in this process, and shared: on the CPU they are moved into shared memory
(`Module.share_memory()`) before the workers start, and the modules are passed to the workers as
process arguments, so torch's pickling sends shared-memory handles (CUDA IPC handles for CUDA tensors)
and nothing is loaded or copied again. A stage placed on another GPU (its `devices` in the deploy
config differ from stage 0's) copies the weights to its GPU once. Each worker builds its own `Runner`
(KV pool bounded as `engine.memory` says) and its own `Engine` with its stage's scheduler limits. Stage 0
lends image requests' contexts to stage 1 in place (zero-copy on one GPU; one device-to-device copy
between GPUs); see `stage_worker`.

A worker that dies (killed, crashed, out of memory) never hangs the parent: while collecting results the
parent polls the results with a short timeout and checks every worker; a dead one fails the whole batch
with `WorkerDiedError`, the other workers are shut down, and every later `generate` raises
`EngineShutDownError` at once.

Numerics: a worker uses the parent's `torch.get_num_threads()` (and float32 matmul precision), so a CPU
model computes in the worker exactly what it computes in the parent.

Test hook: `BAGEL_SERVE_TEST_WORKER_START_DELAY` (environment, read by the workers; tests only) delays a
worker's start by some seconds, to exercise `init_timeout`: `"2.5"` delays every stage, `"1:30"` delays
stage 1 by 30 s, `"0:1,1:3"` both.

Usual spawn caveats apply: a script that creates an `Omni` with this backend needs an
`if __name__ == "__main__":` guard, and CPU weights in shared memory need enough room in /dev/shm.
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Protocol

import torch
import torch.multiprocessing as tmp

from bagel_serve.config.deploy import DeployConfig, PipelineSpec
from bagel_serve.config.engine_options import EngineOptions
from bagel_serve.engine.request import Request, RequestOutput
from bagel_serve.engine.runner import RunStats, Runner
from bagel_serve.pipeline.orchestrator import _merge_stats, collect_outputs, scheduler_config
from bagel_serve.pipeline.stage_worker import Codec, Flags, Numerics, StageSetup, StageWorker, describe, make_runner

START_DELAY_ENV = "BAGEL_SERVE_TEST_WORKER_START_DELAY"

POLL_S = 0.05  # how often the parent looks at its workers while it waits for results
_STOP_GRACE_S = 5.0  # how long a worker may take to leave its loop before it is terminated


class WorkerDiedError(RuntimeError):
    """A stage worker died (was killed, crashed or failed to start); its batch failed."""


class EngineShutDownError(WorkerDiedError):
    """The engine was shut down (explicitly, or after a worker died): it serves no more requests."""


class WorkerRequestError(RuntimeError):
    """A request failed inside a worker with an exception that could not be sent back as itself."""


def start_delay(stage: int, spec: str | None) -> float:
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


def stage_setups(runner: Runner, pipeline: PipelineSpec, deploy: DeployConfig, options: EngineOptions, *,
                 device: torch.device, lend: bool, to_cpu: bool, own_weights: bool) -> list[StageSetup]:
    """Each stage's device, KV bound, prefix caching and hand-off mode, for workers outside this process.

    `device` is where the model is (or, for a skeleton model, would be); `own_weights`: every worker
    loads its own weights (Ray) instead of mapping this process's."""
    from bagel_serve.engine.memory import StagePlacement, kv_block_budgets, weights_bytes

    model = runner.model
    n = pipeline.num_stages
    devices = stage_devices(device, deploy, n)
    placements = [StagePlacement(d, deploy.stage(s).gpu_memory_utilization, own_weights or d != device)
                  for s, d in enumerate(devices)]
    budgets = kv_block_budgets(placements, weights_bytes=weights_bytes(model, runner.vae), block_bytes=runner.pool.bytes_per_block,
                               one_process=False)
    numerics = Numerics.here()
    return [StageSetup(stage=s, num_stages=n, scheduler=scheduler_config(deploy, s),
                       batch_timeout=float(options.batch_timeout), numerics=numerics,
                       device=str(devices[s]), max_blocks=budgets[s],
                       enable_prefix_caching=deploy.prefix_caching_enabled(s), lend=lend, to_cpu=to_cpu)
            for s in range(n)]


def stage_devices(model_device: torch.device, deploy: DeployConfig, num_stages: int) -> list[torch.device]:
    """Where each stage computes. On CUDA, stages whose deploy `devices` equal stage 0's share the model's
    device; any other stage runs on `cuda:<its first device id>`. CPU stages stay on the CPU."""
    if model_device.type != "cuda":
        return [model_device] * num_stages
    first = deploy.stage(0).device_ids
    out = []
    for s in range(num_stages):
        ids = deploy.stage(s).device_ids
        out.append(model_device if ids == first else torch.device("cuda", ids[0]))
    return out


# ---------------------------------------------------------------------------------------------- parent side
class Transport(Protocol):
    """How the parent reaches its stage workers."""

    num_stages: int

    def send(self, stage: int, msg: tuple) -> None: ...

    def recv(self, timeout: float) -> tuple | None: ...

    def name(self, stage: int) -> str: ...

    def exited(self, stage: int) -> str | None:
        """How a dead worker ended ("exited with code -9"), or None while it lives."""

    def stop(self, grace: float = _STOP_GRACE_S) -> None: ...


class WorkerOrchestrator:
    """Runs batches of requests through the pipeline's stages, one worker per stage, over a transport.

    `generate` and `last_stats` behave as the in-process `Orchestrator`'s; `shutdown()` stops the workers
    (idempotent; also done at interpreter exit and when this object is collected).
    """

    codec: type[Codec] = Codec

    def __init__(self, runner: Runner, pipeline: PipelineSpec, options: EngineOptions) -> None:
        self.runner = runner
        self.pipeline = pipeline
        self.options = options
        self.last_stats: RunStats | None = None
        self.stage_stats: list[RunStats] = []
        self._lock = threading.Lock()
        self._batch = 0
        self._closed: str | None = None  # why we serve no more requests

    def _start(self, transport: Transport) -> None:
        """Adopt a started transport and wait for every worker to be ready (or fail, stopping them)."""
        self._transport = transport
        # Holds the transport, not self: collecting this object (or exiting) stops the workers.
        self._finalizer = weakref.finalize(self, transport.stop)
        try:
            self._wait_ready()
        except BaseException:
            self._closed = self._closed or "the workers failed to start"
            transport.stop(grace=0.0)
            self._finalizer.detach()
            raise

    # ------------------------------------------------------------------ public
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
        are not shown by workers.
        """
        self._check_open()
        prepared = [self.runner.prepare(i, r) for i, r in enumerate(requests)]
        flags = Flags(timed=timed, stream=on_token is not None)
        with self._lock:
            self._check_open()
            self._batch += 1
            batch = self._batch
            blobs = [self.codec.dumps((r, p, flags)) for r, p in zip(requests, prepared)]  # a pickling error sends nothing
            t0 = time.perf_counter()
            for i, blob in enumerate(blobs):
                self._transport.send(0, ("request", None, (batch, i), blob))
            outputs, errors = self._collect(batch, len(requests), on_token)
            self.stage_stats = self._collect_stats(batch)
            self.last_stats = _merge_stats(self.stage_stats, len(requests), time.perf_counter() - t0)
        return collect_outputs(requests, outputs, errors)

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed is not None:
            raise EngineShutDownError(f"engine is shut down ({self._closed}); create a new Omni to serve again")

    def _fatal(self, message: str, details: str | None = None) -> WorkerDiedError:
        """Stop the remaining workers and make the error that fails this batch and closes the engine."""
        self._closed = message
        self._finalizer()
        err = WorkerDiedError(message)
        if details:
            err.add_note(details)
        return err

    def _check_workers(self, in_flight: int) -> None:
        t = self._transport
        for s in range(t.num_stages):
            how = t.exited(s)
            if how is not None:
                details = self._fatal_details(s)
                raise self._fatal(f"{t.name(s)} {how} while {in_flight} request(s) were in flight", details)

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

    def _wait_ready(self) -> None:
        o = self.options
        timeout, name = (o.init_timeout, "init_timeout") if o.init_timeout <= o.stage_init_timeout else \
            (o.stage_init_timeout, "stage_init_timeout")
        deadline = time.monotonic() + timeout
        t = self._transport
        ready: set[int] = set()
        while len(ready) < t.num_stages:
            msg = t.recv(POLL_S)
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
                self._closed = f"{late} did not start within {name}={timeout:g} s"
                raise TimeoutError(f"{late} did not become ready within {name}={timeout:g} s "
                                   f"(raise {name} if loading is slow)")

    def _collect(self, batch: int, n: int, on_token: Callable[[int, int], None] | None
                 ) -> tuple[dict[int, RequestOutput], dict[int, BaseException]]:
        pending = set(range(n))
        outputs: dict[int, RequestOutput] = {}
        errors: dict[int, BaseException] = {}
        streamed = [0] * n
        callback_errors: dict[int, BaseException] = {}
        next_check = time.monotonic() + POLL_S
        while pending:
            msg = self._transport.recv(POLL_S)
            if msg is None or time.monotonic() >= next_check:
                self._check_workers(len(pending))
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
                self._emit(on_token, i, [data], callback_errors)
                continue
            pending.discard(i)
            if kind == "error":
                errors[i] = self._rebuild_error(*data)
                continue
            try:
                out: RequestOutput = self.codec.loads(data)
            except Exception as e:
                errors[i] = WorkerRequestError(f"request {i}: its output from stage {stage} could not be received "
                                               f"({describe(e)})")
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
        t = self._transport
        for s in range(t.num_stages):
            t.send(s, ("stats", None, batch, None))
        stats: dict[int, RunStats] = {}
        while len(stats) < t.num_stages:
            msg = t.recv(POLL_S)
            if msg is None:
                self._check_workers(0)
                continue
            kind, stage, key, data = msg
            if kind == "fatal":
                raise self._fatal(f"{t.name(stage)} failed", data)
            if kind == "stats" and key == batch:
                stats[stage] = self.codec.loads(data)
        return [stats[s] for s in range(t.num_stages)]

    def _rebuild_error(self, text: str, blob: Any, tb: str) -> BaseException:
        err: BaseException | None = None
        if blob is not None:
            try:
                err = self.codec.loads(blob)
            except Exception:
                err = None
        if not isinstance(err, BaseException):
            err = WorkerRequestError(text)
        err.add_note(f"raised in a worker:\n{tb}")
        return err


# ---------------------------------------------------------------------------------------------- process backend
def _worker_main(setup: StageSetup, model: Any, vae: Any, tokenizer_source: Any, inbox: Any, outbox: Any,
                 next_inbox: Any, prev_inbox: Any) -> None:
    """Entry point of a stage worker process (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    try:
        setup.numerics.apply()
        delay = start_delay(setup.stage, os.environ.get(START_DELAY_ENV))
        if delay > 0:
            time.sleep(delay)
        from tqdm import tqdm

        # The engine's (disabled) progress bars would otherwise create tqdm's default lock, a
        # multiprocessing semaphore that this process, leaving with os._exit, would never unlink.
        tqdm.set_lock(threading.RLock())
        from bagel_serve.engine.tokenizer import BagelTokenizer

        tok = tokenizer_source if isinstance(tokenizer_source, BagelTokenizer) else BagelTokenizer(tokenizer_source)
        runner = make_runner(setup, model, vae, tok)
        del model, vae
        parent = tmp.parent_process()
        worker = StageWorker(setup, runner, inbox, outbox, next_inbox, prev_inbox,
                             alive=(parent.is_alive if parent is not None else None))
        outbox.put(("ready", setup.stage, os.getpid(), None))
        worker.loop()
        _unmap(worker, runner)
    except BaseException:
        try:
            outbox.put(("fatal", setup.stage, None, traceback.format_exc()))
            outbox.close()
            outbox.join_thread()  # the parent reads its results while it serves: this does not block long
        finally:
            os._exit(1)
    # Stopped (or orphaned): nothing left to send. Skip the interpreter's teardown, which takes seconds
    # with torch loaded, and the joins of queue feeder threads whose reader may be gone.
    os._exit(0)


def _unmap(worker: StageWorker, runner: Runner) -> None:
    """Drop what we mapped of the parent's memory (weights; lent KV slabs go with the contexts) before
    leaving: CUDA IPC counts the mappings, and the process arguments would keep them past os._exit, so
    the parent would warn about (and wait on) every weight tensor it frees later."""
    worker.lent.clear()
    worker.engine = None
    for m in (runner.model, runner.vae):
        for t in (*m.parameters(), *m.buffers()):
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    gc.collect()
    if runner.model.device.type == "cuda":
        torch.cuda.synchronize()


class _Processes:
    """The worker processes and their queues (a `Transport`); stopping them needs nothing else."""

    def __init__(self, procs: list[Any], inboxes: list[Any], results: Any) -> None:
        self.procs = procs
        self.inboxes = inboxes
        self.results = results
        self.num_stages = len(procs)
        self.stopped = False

    def send(self, stage: int, msg: tuple) -> None:
        self.inboxes[stage].put(msg)

    def recv(self, timeout: float) -> tuple | None:
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            return None

    def name(self, stage: int) -> str:
        return f"stage {stage} worker (pid {self.procs[stage].pid})"

    def exited(self, stage: int) -> str | None:
        p = self.procs[stage]
        return None if p.is_alive() else f"exited with code {p.exitcode}"

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


class ProcessOrchestrator(WorkerOrchestrator):
    """One worker process per stage on this host, sharing this process's weights.

    `model_dir` is where the workers read the tokenizer (default: the parent's tokenizer is pickled).
    """

    def __init__(self, runner: Runner, pipeline: PipelineSpec, deploy: DeployConfig, options: EngineOptions | None = None,
                 *, model_dir: str | os.PathLike | None = None) -> None:
        options = options or EngineOptions()
        if pipeline.num_stages > 2:
            raise NotImplementedError(f"the process worker backend runs pipelines of one or two stages; "
                                      f"{pipeline.name} has {pipeline.num_stages}")
        super().__init__(runner, pipeline, options)
        n = pipeline.num_stages
        self.setups = stage_setups(runner, pipeline, deploy, options, device=runner.model.device, lend=True,
                                   to_cpu=False, own_weights=False)
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
        procs = [
            ctx.Process(
                target=_worker_main, name=f"bagel-serve-stage{s}", daemon=True,
                args=(self.setups[s], model, vae, tokenizer_source, inboxes[s], results,
                      inboxes[s + 1] if s + 1 < n else None, inboxes[s - 1] if s > 0 else None))
            for s in range(n)
        ]
        self._workers = _Processes(procs, inboxes, results)
        try:
            for p in procs:
                p.start()
        except BaseException:
            self._closed = "the workers failed to start"
            self._workers.stop(grace=0.0)
            raise
        self._start(self._workers)

    @property
    def worker_pids(self) -> list[int | None]:
        return [p.pid for p in self._workers.procs]
