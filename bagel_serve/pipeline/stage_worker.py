"""One stage's message handling around its engine, whatever it runs in (this process, a worker process, a
Ray actor): `handle(message)` takes what arrives, `step()` runs one engine step and sends what finished.

Every message is a tuple `(kind, stage, key, data)` of plain values: `key` is `(batch, request index)` (the
batch number keeps a late message of an abandoned batch out of the next one) and `data`, where it holds
objects with tensors or images, is a blob made by the sender's `Codec`, so that a pickling error is the
sender's error for that request (not a message lost in a transport) and an undecodable blob fails only its
request. Stages never talk to each other directly: the parent routes hand-offs and releases.

  parent  -> stage 0  ("request", -, key, blob(Request, Prepared, Flags))
  stage 0 -> stage 1  ("handoff", 0, key, blob(HandoffPayload or Handoff, Flags))       via the parent
  stage 1 -> stage 0  ("release", 1, key, None)     stage 1 is done with the contexts stage 0 lent it
  parent  -> stage s  ("stats", -, ask, None)       ("stop", -, None, None)
                      ("usage", -, ask, None)       ("cancel", -, key, None)   end that request now, if held
  stage s -> parent   ("ready", s, pid, None)       ("token", s, key, token id)
                      ("progress", s, key, (denoising steps done, of how many))
                      ("usage", s, ask, {used_blocks, total_blocks, running, waiting, ...})
                      ("output", s, key, blob(RequestOutput))
                      ("error", s, key, ("TypeName: message", blob(exception) or None, traceback))
                      ("stats", s, ask, blob(RunStats))         ("fatal", s, None, traceback)
                      ("alive", s, None, None)      a heartbeat, while the process lives

Hand-offs. With `lend` (one process per stage on one host) stage 0 lends an image request's contexts in place
and keeps them, with their admission reservation, until stage 1 sends "release": at the end of the request
when stage 1 reads the rows in place (same device), right after copying them when it is on another device.
Without `lend` the rows are copied into the message and stage 0 frees them at once; in one process with one
cache the `Handoff` itself travels. Stage 1 imports a hand-off when its engine admits the request, so a queued
request holds none of stage 1's KV blocks.
"""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from multiprocessing.reduction import ForkingPickler

from bagel_serve.engine.diffusion import Handoff
from bagel_serve.engine.stage_engine import Engine, Stage, release_contexts
from bagel_serve.engine.stats import RunStats
from bagel_serve.pipeline.placement import StageSetup
from bagel_serve.engine.kv_cache import KVCache
from bagel_serve.pipeline.transfer import HandoffPayload, blocks_needed, borrow_cache, borrows, export_handoff, import_handoff


class PeerLostError(RuntimeError):
    """A request's message from another process could not be received: most often its sender (another
    stage's worker) has just died, which the parent then reports for every request in flight."""


@dataclass(frozen=True)
class Flags:
    """Per-request switches that travel with the request."""

    timed: bool = False
    stream: bool = False
    progress: bool = False
    """Send a "progress" message after each denoising step."""


class Codec:
    """Blobs as objects: for stages in one process."""

    @staticmethod
    def dumps(obj: Any) -> Any:
        return obj

    @staticmethod
    def loads(blob: Any) -> Any:
        return blob


class IpcCodec(Codec):
    """`torch.multiprocessing`'s pickler: tensors travel as shared-memory or CUDA IPC handles (one host)."""

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


class RequestCancelledError(RuntimeError):
    """The request was cancelled (its caller went away, gave up, or it ran past its deadline)."""


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class StageWorker:
    """One stage's engine and its side of the message protocol. `send(message)` reaches the parent."""

    def __init__(self, setup: StageSetup, stage: Stage, send: Callable[[tuple], None], codec: type[Codec] = Codec,
                 *, progress: bool = False, leads: bool = True) -> None:
        self.setup = setup
        self.leads = leads
        """Rank 0 of its stage (or its only rank): the one that talks to the parent. The other ranks run the
        same engine on the same messages and send nothing."""
        self.stage_id = setup.stage
        self.stage = stage
        self.engine = Engine(stage, setup.scheduler, progress=progress)
        self.engine.gathers = setup.ranks is None
        self.engine.on_denoise_step = self._denoised
        self._send = send
        self.codec = codec
        self.keys: dict[int, tuple[tuple[int, int], Flags]] = {}  # engine rid -> (key, flags)
        self.steps: dict[int, list[int]] = {}  # engine rid -> [denoising steps done, total] (progress)
        self.lent: dict[tuple[int, int], Handoff] = {}  # stage 0: contexts lent to stage 1, by key
        self.owed: set[tuple[int, int]] = set()  # stage 1: keys whose lender awaits a "release"
        self.lender: KVCache | None = None  # stage 1: the lender's cache, mapped once (see import_handoff)

    @property
    def busy(self) -> bool:
        return self.engine.has_work()

    def send(self, kind: str, key: Any, data: Any) -> None:
        if self.leads:
            self._send((kind, self.stage_id, key, data))

    def step(self) -> None:
        self.engine.step()
        for rid, result, error in self.engine.pop_finished():
            self._finished(rid, result, error)

    def close(self) -> None:
        """Give back everything this worker still holds of other stages (lent contexts, borrowed ones)."""
        for key in list(self.lent):
            self._take_back(key)
        self.engine.close()

    # ------------------------------------------------------------------ messages
    def handle(self, msg: tuple) -> None:
        self.apply(self.receive(msg))

    def receive(self, msg: tuple) -> tuple:
        """A message as `apply` takes it, `(kind, key, data, error)`: a request's or hand-off's blob opened
        (`error` holds why it could not be). The ranks of a multi-rank stage open each blob once, on rank 0,
        and all apply what it gives (`pipeline.lockstep`)."""
        kind, _, key, data = msg
        if kind not in ("request", "handoff"):
            return kind, key, data, None
        try:
            return kind, key, self.codec.loads(data), None
        except Exception as e:
            return kind, key, None, PeerLostError(f"stage {self.stage_id} could not receive request {key[1]}: "
                                                  f"{describe(e)}")

    def apply(self, item: tuple) -> None:
        kind, key, obj, error = item
        if kind == "stats":
            self.send("stats", key, self.codec.dumps(self.engine.stats))
            self.engine.stats = RunStats()
            return
        if kind == "release":
            self._take_back(key)
            return
        if kind == "usage":
            self.send("usage", key, {**self.stage.cache.manager.usage(), "running": len(self.engine.running),
                                     "waiting": len(self.engine.waiting)})
            return
        if kind == "cancel":
            self.cancel(key)
            return
        if error is not None:
            if kind == "handoff":
                self._settle(key, lent=True)
            self._send_error(key, error)
            return
        try:
            if kind == "request":
                req, prep, flags = obj
                cb = (lambda tok, key=key: self.send("token", key, int(tok))) if flags.stream else None
                if self.setup.num_stages == 1:
                    program = self.stage.program(key[1], req, prep, cb)
                else:
                    program = self.stage.context_program(key[1], req, prep, cb)
                blocks, reserved = self.stage.estimate_blocks(req, prep), False
            elif kind == "handoff":
                payload, flags = obj
                req = payload.request
                if isinstance(payload, Handoff):  # one process: the contexts themselves
                    if payload.full.cache is not self.stage.cache:  # on another device: copy them over
                        payload = self._copy_here(payload)
                    program = self.stage.image_program(payload)
                    blocks, reserved = payload.reserved_blocks, payload.reserved_blocks > 0
                else:
                    if payload.lent:
                        self.owed.add(key)
                    blocks, reserved = blocks_needed(payload, self.stage.cache), False
                    program = self._image_program(key, payload)
                del obj, payload
            else:
                raise RuntimeError(f"stage {self.stage_id} got an unknown message {kind!r}")
        except Exception as e:
            self._settle(key)
            self._send_error(key, e)
            return
        self.engine.timed = flags.timed
        rid = self.engine.add_program(program, req, blocks, reserved=reserved)
        self.keys[rid] = (key, flags)
        if flags.progress and req.outputs_image:
            self.steps[rid] = [0, req.steps - 1]

    def cancel(self, key: tuple[int, int]) -> None:
        """End the request `key` here now, if this stage holds it (waiting or running): its KV blocks and
        anything it borrowed go back at once. A request this stage does not hold is ignored (it finished, or
        never got here)."""
        for rid, (k, _) in list(self.keys.items()):
            if k == key:
                self.engine.cancel(rid, RequestCancelledError(f"request {key[1]} was cancelled"))
        for rid, result, error in self.engine.pop_finished():
            self._finished(rid, result, error)

    def _denoised(self, rid: int) -> None:
        done = self.steps.get(rid)
        if done is not None:
            done[0] += 1
            self.send("progress", self.keys[rid][0], (done[0], done[1]))

    def _copy_here(self, h: Handoff) -> Handoff:
        """A hand-off of this process's other stage, its contexts copied into our cache (theirs freed)."""
        theirs = h.full.cache
        try:
            return import_handoff(export_handoff(h), self.stage.cache)
        finally:
            release_contexts(h)
            theirs.manager.unadmit(h.reserved_blocks)

    def _image_program(self, key: tuple[int, int], payload: HandoffPayload):
        """Stage 1's program for a payload: import it once admitted, then denoise and decode."""
        in_place = borrows(payload, self.stage.cache)
        if in_place and self.lender is None:
            self.lender = borrow_cache(payload)
        h = import_handoff(payload, self.stage.cache, self.lender if in_place else None)
        del payload
        if not in_place:
            self._settle(key)  # copied: the lender may free its rows now
        return (yield from self.stage.image_program(h))

    def _settle(self, key: tuple[int, int], lent: bool = False) -> None:
        """Tell stage 0 we are done with the contexts it lent for `key` (once)."""
        if key in self.owed or lent:
            self.owed.discard(key)
            self.send("release", key, None)

    def _take_back(self, key: tuple[int, int]) -> None:
        h = self.lent.pop(key, None)
        if h is not None:
            release_contexts(h)
            self.stage.cache.manager.unadmit(h.reserved_blocks)

    def _send_error(self, key: tuple[int, int], e: BaseException) -> None:
        tb = "".join(traceback.format_exception(e))
        try:
            blob = self.codec.dumps(e)
            self.codec.loads(blob)  # an exception that pickles but cannot be rebuilt is sent as text only
        except Exception:
            blob = None
        self.send("error", key, (describe(e), blob, tb))

    def _finished(self, rid: int, result: Any, error: BaseException | None) -> None:
        key, flags = self.keys.pop(rid)
        self.steps.pop(rid, None)
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
        if self.setup.stage + 1 >= self.setup.num_stages:
            raise RuntimeError(f"stage {self.stage_id} is the last stage but request {key[1]} needs another")
        if self.codec is Codec:  # one process: the receiving stage shares this cache
            self.send("handoff", key, (h, flags))
            return
        if self.setup.lend:
            self.lent[key] = h
            try:
                blob = self.codec.dumps((export_handoff(h, share=True), flags))
            except BaseException:
                self._take_back(key)
                raise
        else:
            try:
                payload = export_handoff(h, to_cpu=self.setup.to_cpu)  # every TP rank: it gathers their heads
                blob = self.codec.dumps((payload, flags)) if self.leads else None
                del payload
            finally:
                release_contexts(h)
                self.stage.cache.manager.unadmit(h.reserved_blocks)
        self.send("handoff", key, blob)
