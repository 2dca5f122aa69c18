"""One worker process per stage on this host (`worker_backend="process"` / `"multi_process"`).

Workers are started through an entry point of their own (`python -m bagel_serve.pipeline.worker_main`), not
by multiprocessing's spawn, which re-imports the caller's `__main__`: so an engine starts the same from a
script with or without a main guard, from `python -c`, from standard input and from a notebook. Each worker
connects back to a listener of ours and receives its setup and the model through that connection, pickled by
`torch.multiprocessing`: the weights are loaded once, here, and shared — CUDA IPC handles on a GPU, shared
memory on the CPU (the workers get this process's authentication key so they may fetch those) — and a stage
placed on another GPU copies them to its GPU once. The model is sent from a thread, so a worker that dies
before reading it can never block this process; any start-up failure becomes an error within `init_timeout`,
with the worker's own last error (its traceback message, or the last line it printed).

Each worker is started with its stage's deploy `env` in its environment, so what torch and CUDA read at
import sees it.

Workers send a heartbeat every second from a thread of their own, so a stopped or hung worker is told from a
busy one (`request_timeout`).

A stage of several ranks (tensor or CFG parallelism, HSDP) gets one worker per rank, each with the stage's
setup for its own rank and no weights (each loads its own, `pipeline.ranks`); the stage's messages go to
rank 0 only, which passes them on. The stage counts as exited as soon as any of its ranks has.
"""

from __future__ import annotations

import contextlib
import os
import queue
import multiprocessing
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import torch

from bagel_serve.pipeline.placement import StageSetup
from bagel_serve.pipeline.stage_worker import IpcCodec

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])


class ProcessTransport:
    codec = IpcCodec

    def __init__(self, setups: list[StageSetup], model: Any, vae: Any, tokenizer_dir: str) -> None:
        self.num_stages = len(setups)
        # This process's own key: the resource sharer that hands shared-memory tensors out checks it.
        self._key = bytes(multiprocessing.current_process().authkey)
        self._listener = Listener(authkey=self._key)
        self._conns: list[Connection | None] = [None] * self.num_stages
        self._rank_conns: list[Connection] = []
        self._send_locks = [threading.Lock() for _ in setups]
        self._results: queue.Queue[tuple] = queue.Queue()
        self._stderr: dict[tuple[int, int], deque[str]] = {}
        self.stopped = False
        self._threads: list[threading.Thread] = []
        if model.device.type == "cpu" and any(s.ranks is None for s in setups):
            _ensure_fd_limit([model, vae])
            model.share_memory()
            vae.share_memory()
        self.procs: list[subprocess.Popen] = []
        """Rank 0 of each stage, by stage (the process the stage's messages go to)."""
        self.rank_procs: list[list[subprocess.Popen]] = []
        """Every rank's process, by stage."""
        payloads: dict[tuple[int, int], tuple] = {}
        for s in range(self.num_stages):
            # The stage's deploy `env` is the worker's from its start, before torch is imported.
            env = {**os.environ, **setups[s].env}
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
            procs = []
            for r in range(setups[s].num_ranks):
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bagel_serve.pipeline.worker_main", self._listener.address, str(s), str(r)],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
                proc.stdin.write(self._key.hex() + "\n")
                proc.stdin.close()
                self._stderr[(s, r)] = deque(maxlen=20)
                self._thread(self._drain_stderr, (s, r), proc)
                procs.append(proc)
                # A rank of a multi-rank stage loads its own weights: it gets no model.
                shared = (model, vae) if setups[s].ranks is None else (None, None)
                payloads[(s, r)] = (setups[s].for_rank(r), *shared, tokenizer_dir)
            self.procs.append(procs[0])
            self.rank_procs.append(procs)
        threading.Thread(target=self._accept, args=(payloads,), name="bagel-serve-accept", daemon=True).start()

    def _thread(self, target: Any, *args: Any) -> None:
        """A daemon thread `stop` waits for (once its pipe or connection is closed it ends): one still
        unpickling a worker's tensors while the interpreter exits can abort the process ("terminate called
        without an active exception"). The accept thread is not one: a worker that never connected leaves it
        in `accept`, and it touches no tensors."""
        t = threading.Thread(target=target, args=args, name=f"bagel-serve-{target.__name__.strip('_')}", daemon=True)
        self._threads.append(t)
        t.start()

    # ------------------------------------------------------------------ start-up
    def _accept(self, payloads: dict[tuple[int, int], tuple]) -> None:
        for _ in range(len(payloads)):
            try:
                conn = self._listener.accept()
                kind, stage, rank = conn.recv()
            except (OSError, EOFError, ValueError):
                return  # stopped (the listener closed) or a worker died while connecting
            if kind != "hello" or (stage, rank) not in payloads:
                conn.close()
                continue
            if rank == 0:
                self._conns[stage] = conn
            else:
                self._rank_conns.append(conn)
            self._thread(self._serve, stage, conn, payloads.pop((stage, rank)))

    def _serve(self, stage: int, conn: Connection, payload: tuple) -> None:
        """Send a worker its setup and model, then forward what it sends until it closes (the other ranks of
        a multi-rank stage send only a fatal error, and heartbeats)."""
        try:
            # Rank 0's connection also carries the stage's messages (under its lock); another rank's only this.
            with self._send_locks[stage] if conn is self._conns[stage] else contextlib.nullcontext():
                conn.send(payload)
        except (OSError, EOFError, ValueError):
            return  # it died; `exited` says how
        del payload
        while True:
            try:
                msg = conn.recv()
            except (OSError, EOFError):
                return
            self._results.put(msg)

    def _drain_stderr(self, who: tuple[int, int], proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            if line.strip():
                self._stderr[who].append(line.rstrip())

    # ------------------------------------------------------------------ transport
    def send(self, stage: int, msg: tuple) -> None:
        conn = self._conns[stage]
        if conn is None:
            raise RuntimeError(f"{self.name(stage)} is not connected")
        with self._send_locks[stage]:
            conn.send(msg)

    def recv(self, timeout: float) -> tuple | None:
        try:
            return self._results.get(timeout=timeout)
        except queue.Empty:
            return None

    def name(self, stage: int) -> str:
        return f"stage {stage} worker (pid {self.procs[stage].pid})"

    def exited(self, stage: int) -> str | None:
        """How the stage's worker ended (for a multi-rank stage: the first of its ranks found ended)."""
        for r, proc in enumerate(self.rank_procs[stage]):
            code = proc.poll()
            if code is None:
                continue
            last = self._stderr[(stage, r)][-1] if self._stderr[(stage, r)] else None
            who = f"(its rank {r}, pid {proc.pid}) " if r else ""
            return f"{who}exited with code {code}" + (f" (its last words: {last})" if last else "")
        return None

    def heartbeats(self) -> bool:
        return True

    @property
    def pids(self) -> list[int]:
        return [p.pid for procs in self.rank_procs for p in procs]

    def stop(self, grace: float = 5.0) -> None:
        if self.stopped:
            return
        self.stopped = True
        for s, conn in enumerate(self._conns):
            if conn is not None and self.procs[s].poll() is None:
                try:
                    self.send(s, ("stop", None, None, None))
                except Exception:
                    pass
        for p in [p for procs in self.rank_procs for p in procs]:
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=2.0)
        for conn in [*self._conns, *self._rank_conns]:
            if conn is not None:
                conn.close()
        self._listener.close()
        deadline = time.monotonic() + grace
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(timeout=max(0.0, deadline - time.monotonic()))


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
