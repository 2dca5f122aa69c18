"""The loop of one stage worker, whatever process or Ray actor it runs in.

A worker owns a `Runner` (its model and KV pool) and an `Engine`. It reads messages from its inbox,
steps the engine while it has work, and sends what finished. Every queue carries tuples
`(kind, stage, key, data)` of plain values: `key` is `(batch, request index)` (the batch number keeps a
late message of an abandoned batch out of the next one) and `data`, where it holds objects with tensors
or images, is a blob made by the sender's `Codec`, so that a pickling error is the sender's error for
that request (not a message lost in a queue's feeder thread) and an undecodable blob fails only its
request.

  parent  -> stage 0  ("request", -, key, blob(Request, prepared, flags))
  stage 0 -> stage 1  ("handoff", 0, key, blob(HandoffPayload, flags))
  stage 1 -> stage 0  ("release", 1, key, None)     stage 1 is done with the contexts stage 0 lent it
  parent  -> stage s  ("stats", -, batch, None)     ("stop", -, None, None)
  stage s -> parent   ("ready", s, pid, None)       ("token", s, key, token id)
                      ("output", s, key, blob(RequestOutput))   (PIL images pickle)
                      ("error", s, key, ("TypeName: message", blob(exception) or None, traceback))
                      ("stats", s, batch, blob(RunStats))       ("fatal", s, None, traceback)

Hand-offs. With `lend` (one process per stage on one host) stage 0 lends an image request's contexts in
place (`transfer.export_handoff(share=True)`) and keeps them, with their admission reservation, until
stage 1 sends "release": at the end of the request when stage 1 reads the rows in place (same device),
right after copying them when it is on another device. Without `lend` (Ray) the rows are copied into the
message (through the CPU with `to_cpu`) and stage 0 frees them at once. Stage 1 imports a hand-off when
its engine admits the request, so a queued request holds none of stage 1's KV blocks.

Loop: while its engine has work the worker drains its inbox without blocking, then steps the engine and
sends what finished; when idle it blocks for at most `batch_timeout` seconds, so that it notices a stop
message, or its parent's death, soon. A request that fails inside a worker comes back as an error for
that request only, and the worker keeps serving.
"""

from __future__ import annotations

import pickle
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
from multiprocessing.reduction import ForkingPickler

from bagel_serve.engine.runner import Handoff, RunStats, Runner
from bagel_serve.engine.scheduler import Engine, SchedulerConfig
from bagel_serve.pipeline.transfer import (
    HandoffPayload,
    blocks_needed,
    borrows,
    export_handoff,
    import_handoff,
    release_handoff_contexts,
)


@dataclass(frozen=True)
class Flags:
    """Per-request switches that travel with the request."""

    timed: bool = False
    stream: bool = False


@dataclass(frozen=True)
class Numerics:
    """Settings a worker copies from its parent so that it computes the same numbers."""

    num_threads: int
    matmul_precision: str

    @classmethod
    def here(cls) -> "Numerics":
        return cls(torch.get_num_threads(), torch.get_float32_matmul_precision())

    def apply(self) -> None:
        torch.set_num_threads(self.num_threads)
        torch.set_float32_matmul_precision(self.matmul_precision)


@dataclass(frozen=True)
class StageSetup:
    """Everything a stage worker needs besides its model and queues."""

    stage: int
    num_stages: int
    scheduler: SchedulerConfig
    batch_timeout: float
    numerics: Numerics
    device: str | None = None
    """Where this stage computes (None: where its model is)."""
    max_blocks: int | None = None
    """Bound of this stage's KV pool (None: it grows freely)."""
    enable_prefix_caching: bool = False
    lend: bool = False
    """Hand contexts over in place (same host) instead of copying them into the message."""
    to_cpu: bool = False
    """Copied contexts go through the CPU (for transports that pickle by value)."""


class Codec:
    """How blobs are made: `torch.multiprocessing`'s pickler, which sends tensors as shared-memory or
    CUDA IPC handles (for queues between processes of one host)."""

    @staticmethod
    def dumps(obj: Any) -> Any:
        return bytes(ForkingPickler.dumps(obj))

    @staticmethod
    def loads(blob: Any) -> Any:
        return ForkingPickler.loads(blob)


class ValueCodec(Codec):
    """Blobs that carry their tensors by value (plain pickle), for transports that cross hosts."""

    @staticmethod
    def dumps(obj: Any) -> Any:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def loads(blob: Any) -> Any:
        return pickle.loads(blob)


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def make_runner(setup: StageSetup, model: Any, vae: Any, tok: Any) -> Runner:
    """The stage's runner: on its device (the weights are copied there when they live elsewhere), with its
    KV pool bound and its prefix cache."""
    if setup.device is not None and torch.device(setup.device) != model.device:
        model, vae = model.to(setup.device), vae.to(setup.device)
    if model.device.type == "cuda":
        torch.cuda.set_device(model.device)
    runner = Runner(model, vae, tok, enable_prefix_caching=setup.enable_prefix_caching)
    runner.pool.max_blocks = setup.max_blocks
    runner.pool.shared = setup.lend
    return runner


class StageWorker:
    """One stage's message loop around its engine."""

    def __init__(self, setup: StageSetup, runner: Runner, inbox: Any, outbox: Any, next_inbox: Any, prev_inbox: Any,
                 codec: type[Codec] = Codec, alive: Callable[[], bool] | None = None) -> None:
        self.setup = setup
        self.stage = setup.stage
        self.runner = runner
        self.engine = Engine(runner, setup.scheduler)
        self.inbox = inbox
        self.outbox = outbox
        self.next_inbox = next_inbox
        self.prev_inbox = prev_inbox
        self.codec = codec
        self.alive = alive
        self.keys: dict[int, tuple[tuple[int, int], Flags]] = {}  # engine rid -> (key, flags)
        self.lent: dict[tuple[int, int], Handoff] = {}  # stage 0: contexts lent to stage 1, by key
        self.owed: set[tuple[int, int]] = set()  # stage 1: keys whose lender awaits a "release"
        self._next_alive_check = 0.0

    # ------------------------------------------------------------------ loop
    def loop(self) -> None:
        while True:
            busy = self.engine.has_work()
            for msg in self._receive(block=not busy):
                if msg[0] == "stop":
                    return
                self._handle(msg)
            if self._orphaned():
                return
            if self.engine.has_work():
                self.engine.step()
                for rid, result, error in self.engine.pop_finished():
                    self._finished(rid, result, error)

    def _receive(self, block: bool) -> list[tuple]:
        msgs = []
        try:
            msgs.append(self.inbox.get(timeout=self.setup.batch_timeout) if block else self.inbox.get_nowait())
            while True:
                msgs.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return msgs

    def _orphaned(self) -> bool:
        now = time.monotonic()
        if self.alive is None or now < self._next_alive_check:
            return False
        self._next_alive_check = now + 1.0
        return not self.alive()

    # ------------------------------------------------------------------ messages
    def send(self, kind: str, key: Any, data: Any) -> None:
        self.outbox.put((kind, self.stage, key, data))

    def _send_error(self, key: tuple[int, int], e: BaseException) -> None:
        tb = "".join(traceback.format_exception(e))
        try:
            blob = self.codec.dumps(e)
            self.codec.loads(blob)  # an exception that pickles but cannot be rebuilt is sent as text only
        except Exception:
            blob = None
        self.send("error", key, (describe(e), blob, tb))

    def _handle(self, msg: tuple) -> None:
        kind, _, key, data = msg
        if kind == "stats":
            self.send("stats", key, self.codec.dumps(self.engine.stats))
            self.engine.stats = RunStats()
            return
        if kind == "release":
            self._take_back(key)
            return
        try:
            obj = self.codec.loads(data)
        except Exception as e:
            if kind == "handoff":
                self._settle(key, lent=True)
            self._send_error(key, RuntimeError(f"stage {self.stage} could not receive request {key[1]}: {describe(e)}"))
            return
        try:
            if kind == "request":
                req, prep, flags = obj
                index = key[1]
                cb = (lambda tok, key=key: self.send("token", key, int(tok))) if flags.stream else None
                if self.setup.num_stages == 1:
                    program = self.runner.program(index, req, prep, cb)
                else:
                    program = self.runner.context_program(index, req, prep, cb)
                blocks = self.runner.estimate_blocks(req, prep)
            elif kind == "handoff":
                payload, flags = obj
                if payload.lent:
                    self.owed.add(key)
                req = payload.fields["request"]
                blocks = blocks_needed(payload, self.runner)
                program = self._image_program(key, payload)
                del obj, payload
            else:
                raise RuntimeError(f"stage {self.stage} got an unknown message {kind!r}")
        except Exception as e:
            self._settle(key)
            self._send_error(key, e)
            return
        self.engine.timed = flags.timed
        self.keys[self.engine.add_program(program, req, blocks)] = (key, flags)

    def _image_program(self, key: tuple[int, int], payload: HandoffPayload):
        """Stage 1's program for a hand-off: import it once admitted, then denoise and decode."""
        in_place = borrows(payload, self.runner)
        h = import_handoff(payload, self.runner)
        del payload
        if not in_place:
            self._settle(key)  # copied: the lender may free its rows now
        try:
            return (yield from self.runner.image_program(h))
        finally:
            release_handoff_contexts(h)

    def _settle(self, key: tuple[int, int], lent: bool = False) -> None:
        """Tell stage 0 we are done with the contexts it lent for `key` (once)."""
        if (key in self.owed or lent) and self.prev_inbox is not None:
            self.owed.discard(key)
            self.prev_inbox.put(("release", self.stage, key, None))

    def _take_back(self, key: tuple[int, int]) -> None:
        h = self.lent.pop(key, None)
        if h is not None:
            release_handoff_contexts(h)
            self.runner.pool.unadmit(h.reserved_blocks)

    def _finished(self, rid: int, result: Any, error: BaseException | None) -> None:
        key, flags = self.keys.pop(rid)
        self._settle(key)
        if error is not None:
            self._send_error(key, error)
            return
        try:
            if isinstance(result, Handoff):
                self._hand_off(key, result, flags)
            else:
                self.send("output", key, self.codec.dumps(result))
        except Exception as e:
            self._send_error(key, e)

    def _hand_off(self, key: tuple[int, int], h: Handoff, flags: Flags) -> None:
        if self.next_inbox is None:
            raise RuntimeError(f"stage {self.stage} is the last stage but request {key[1]} needs another")
        if self.setup.lend:
            self.lent[key] = h
            try:
                blob = self.codec.dumps((export_handoff(h, share=True), flags))
            except BaseException:
                self._take_back(key)
                raise
        else:
            try:
                blob = self.codec.dumps((export_handoff(h, to_cpu=self.setup.to_cpu), flags))
            finally:
                release_handoff_contexts(h)
                self.runner.pool.unadmit(h.reserved_blocks)
        self.next_inbox.put(("handoff", self.stage, key, blob))
