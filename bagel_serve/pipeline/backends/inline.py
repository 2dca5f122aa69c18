"""Every stage in this process (`worker_backend="inline"`, and the single-stage topology).

Stages on one device share one `Stage` — one copy of the weights, one KV cache — so a hand-off passes the
contexts themselves, by reference; a stage on another device gets its own copy of the weights there and the
contexts are copied device to device. The workers run in the caller's thread: each `recv` delivers their
messages and steps each busy engine once, so a request that arrives while others run joins them at the next
step, as in the other transports.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from typing import Any

from bagel_serve.engine.stage_engine import Stage
from bagel_serve.engine.tokenizer import BagelTokenizer
from bagel_serve.pipeline.placement import StageSetup, build_stage
from bagel_serve.pipeline.stage_worker import Codec, StageWorker


class InlineTransport:
    codec = Codec

    def __init__(self, setups: list[StageSetup], model: Any, vae: Any, tok: BagelTokenizer, *,
                 progress: bool = False) -> None:
        self.num_stages = len(setups)
        self._outbox: deque[tuple] = deque()
        self._inboxes: list[deque[tuple]] = [deque() for _ in setups]
        by_device: dict[str, Stage] = {}
        self.workers: list[StageWorker] = []
        for setup in setups:  # (their deploy `env` is the caller's to apply: it is this process's environment)
            if setup.device not in by_device:
                peers = [s for s in setups if s.device == setup.device]
                shared = dataclasses.replace(setup, decodes=any(s.decodes for s in peers),
                                             denoises=any(s.denoises for s in peers), borrows_cache=False)
                by_device[setup.device] = build_stage(shared, model, vae, tok)
            self.workers.append(StageWorker(setup, by_device[setup.device], self._outbox.append, progress=progress))
        for w in self.workers:
            w.send("ready", os.getpid(), None)

    @property
    def stages(self) -> list[Stage]:
        return [w.stage for w in self.workers]

    def send(self, stage: int, msg: tuple) -> None:
        self._inboxes[stage].append(msg)

    def recv(self, timeout: float) -> tuple | None:
        if not self._outbox:
            for w, inbox in zip(self.workers, self._inboxes):
                while inbox:
                    w.handle(inbox.popleft())
                if w.busy:
                    hold = w.engine.hold_s()
                    if hold > 0:  # a burst is still arriving: let the submitting threads run
                        time.sleep(min(hold, 0.001))
                    else:
                        w.step()
        return self._outbox.popleft() if self._outbox else None

    def name(self, stage: int) -> str:
        return f"stage {stage} (in this process)"

    def exited(self, stage: int) -> str | None:
        return None

    def heartbeats(self) -> bool:
        return False

    def stop(self, grace: float = 0.0) -> None:
        for w in self.workers:
            w.close()
