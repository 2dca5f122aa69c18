"""Entry point of a stage worker process: `python -m bagel_serve.pipeline.worker_main ADDRESS STAGE [RANK]`.

Reads the parent's authentication key from standard input, connects back to the parent's listener, receives
its setup and the (shared) model, builds its stage and serves messages until told to stop or until the
parent goes away. Started by `backends.process`; never imports the parent's `__main__`.

A rank of a multi-rank stage gets no model: it joins its peers and loads its own weights
(`pipeline.ranks`). Rank 0 serves the parent's messages and passes them on to the others
(`pipeline.lockstep`); only rank 0 reports ready and sends results.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection

import torch

from bagel_serve.engine.stage_engine import Stage
from bagel_serve.engine.tokenizer import BagelTokenizer
from bagel_serve.pipeline.lockstep import broadcast_items
from bagel_serve.pipeline.placement import StageSetup, build_stage
from bagel_serve.pipeline.stage_worker import IpcCodec, StageWorker

HEARTBEAT_S = 1.0
START_DELAY_ENV = "BAGEL_SERVE_TEST_WORKER_START_DELAY"
"""Test hook, read by the workers: delay a worker's start by some seconds ("2.5": every stage; "1:30": stage 1
by 30 s; "0:1,1:3": both), to exercise `init_timeout`."""


def start_delay(stage: int, spec: str | None) -> float:
    """Seconds to wait before starting, from the test hook's "secs" or "stage:secs[,stage:secs]"."""
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
        raise ValueError(f"{START_DELAY_ENV}={spec!r}: expected seconds or "
                         f"stage:seconds[,stage:seconds]") from None
    return 0.0


class _Link:
    """The connection to the parent, safe to send on from the loop and the heartbeat thread."""

    def __init__(self, conn: Connection, stage: int) -> None:
        self.conn = conn
        self.stage = stage
        self.lock = threading.Lock()
        self.closed = False

    def send(self, msg: tuple) -> None:
        with self.lock:
            if not self.closed:
                self.conn.send(msg)

    def heartbeat(self) -> None:
        while not self.closed:
            time.sleep(HEARTBEAT_S)
            try:
                self.send(("alive", self.stage, None, None))
            except (OSError, ValueError):
                return


def serve(link: _Link, setup: StageSetup, worker: StageWorker) -> None:
    """Deliver messages and step the engine until a stop message, or until the parent is gone.

    A worker that shares its GPU with another stage's process hands its cached activation memory back to the
    device whenever it falls idle: the other process may need it, and nothing here does until the next batch."""
    conn, parent = link.conn, os.getppid()
    shares_gpu = setup.device.startswith("cuda") and (setup.borrows_cache or setup.other_processes > 0)
    was_busy = False
    while True:
        if was_busy and not worker.busy and shares_gpu:
            torch.cuda.empty_cache()
        was_busy = worker.busy
        wait = worker.engine.hold_s() if worker.busy else setup.batch_timeout
        try:
            while conn.poll(wait):
                msg = conn.recv()
                if msg[0] == "stop":
                    return
                worker.handle(msg)
                wait = 0.0
        except (EOFError, OSError):
            return  # the parent closed the connection
        if os.getppid() != parent:
            return  # orphaned
        if worker.busy and worker.engine.hold_s() == 0:
            worker.step()


STOP = ("stop", None, None, None)


def serve_ranks(link: _Link, setup: StageSetup, worker: StageWorker) -> None:
    """`serve` for the ranks of a multi-rank stage: rank 0 reads the parent's messages, every rank applies
    rank 0's batch of them, then every rank steps (the same step)."""
    conn, parent = link.conn, os.getppid()
    while True:
        items = None
        if worker.leads:
            items = []
            wait = 0.0 if worker.busy else setup.batch_timeout
            try:
                while conn.poll(wait):
                    msg = conn.recv()
                    if msg[0] == "stop":
                        items.append(STOP)
                        break
                    items.append(worker.receive(msg))
                    wait = 0.0
            except (EOFError, OSError):
                items.append(STOP)  # the parent closed the connection
            if os.getppid() != parent:
                items.append(STOP)  # orphaned
        for item in broadcast_items(items):
            if item[0] == "stop":
                return
            worker.apply(item)
        if worker.busy:
            worker.step()


def main() -> None:
    address, stage = sys.argv[1], int(sys.argv[2])
    rank = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    key = bytes.fromhex(sys.stdin.readline().strip())
    multiprocessing.current_process().authkey = key  # to fetch the parent's shared-memory tensors
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    conn = Client(address, authkey=key)
    conn.send(("hello", stage, rank))
    link = _Link(conn, stage)
    try:
        setup, model, vae, tokenizer_dir = conn.recv()
        delay = start_delay(stage, os.environ.get(START_DELAY_ENV))
        if delay > 0:
            time.sleep(delay)
        setup.numerics.apply()  # the stage's env was this process's from its start (backends.process)
        tok = BagelTokenizer(tokenizer_dir)
        if setup.ranks is not None:
            from bagel_serve.pipeline.ranks import join_stage  # FSDP's import is slow: only ranks pay it

            model, vae = join_stage(setup)
        stage_obj = build_stage(setup, model, vae, tok)
        del model, vae
        worker = StageWorker(setup, stage_obj, link.send, IpcCodec, leads=rank == 0)
        if rank == 0:
            link.send(("ready", stage, os.getpid(), None))
        threading.Thread(target=link.heartbeat, name="heartbeat", daemon=True).start()
        if setup.ranks is None:
            serve(link, setup, worker)
        else:
            serve_ranks(link, setup, worker)
        worker.close()
        if setup.ranks is None:
            _unmap(stage_obj)
    except BaseException:
        try:
            link.send(("fatal", stage, None, traceback.format_exc()))
        finally:
            os._exit(1)
    link.closed = True
    # Skip the interpreter's teardown, which takes seconds with torch loaded.
    os._exit(0)


def _unmap(stage: Stage) -> None:
    """Drop what we mapped of the parent's memory (weights; lent KV goes with the contexts) before leaving:
    CUDA IPC counts the mappings, and the parent would otherwise warn about (and wait on) every weight tensor
    it frees later."""
    for m in (stage.model, stage.vae):
        for t in (*m.parameters(), *m.buffers()):
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    stage.runner.graphs = stage.runner.denoise_graphs = None
    gc.collect()
    if stage.model.device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
