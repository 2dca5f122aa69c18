"""One Ray actor per stage (`worker_backend="ray"`, `ray_address`).

Stages may sit on other nodes, so each actor loads its own weights from the model path (a local directory
must exist at the same path on every node; a Hugging Face repo id is resolved on each node) and hand-offs carry
their KV rows by value: stage 0 copies an image request's contexts to the CPU, puts them into Ray's object
store and sends the object's reference; the parent routes it; stage 1 fetches it (from whichever node holds
it) into its own KV cache. The parent holds no weights (a meta-device skeleton validates requests).

Placement: one placement group per engine, one bundle per stage (`PACK`), with one CPU each and, on CUDA, one
GPU for a stage that has its own device or an equal share of one for stages whose deploy `devices` are the
same. With no `ray_address` a local Ray cluster is started (and stopped at exit); `ray_address="auto"` or
`"ray://host:port"` joins an existing one. The actors compute on the engine's `device` (by default CUDA when
this process sees a GPU): on a head node without one, pass `device="cuda"`.

Each actor runs the same `StageWorker` as a worker process, in a thread; the parent talks to it with two actor
methods, `put(message)` and `poll(wait)` (the messages it has sent, waiting up to `wait` seconds for the
first). A dead actor fails its pending `poll` at once, which fails the batch with `WorkerDiedError` and shuts
the engine down, as in the process backend.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
import traceback
from collections import deque
from typing import Any

import torch

from bagel_serve.pipeline.orchestrator import WorkerDiedError
from bagel_serve.pipeline.placement import StageSetup, build_stage, ray_bundles
from bagel_serve.pipeline.stage_worker import StageWorker, ValueCodec, describe
from bagel_serve.engine.tokenizer import BagelTokenizer
from bagel_serve.config.quantization import QuantizationConfig
from bagel_serve.model.loader import load_model
from bagel_serve.pipeline.worker_main import START_DELAY_ENV, start_delay

_POLL_WAIT_S = 1.0  # how long an actor's poll waits for its first message


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("worker_backend=ray needs Ray: pip install 'bagel-serve[ray]'") from None
    return ray


class RayCodec(ValueCodec):
    """Blobs by value; a hand-off arrives as a reference into Ray's object store."""

    @staticmethod
    def loads(blob: Any) -> Any:
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            blob = import_ray().get(blob)
        return ValueCodec.loads(blob)


class StageActor:
    """A stage worker inside a Ray actor (made remote by `RayTransport`)."""

    def __init__(self, setup: StageSetup, model: str, dtype: torch.dtype,
                 quantization: QuantizationConfig | None = None) -> None:
        setup.numerics.apply()
        delay = start_delay(setup.stage, os.environ.get(START_DELAY_ENV))
        if delay > 0:
            time.sleep(delay)
        loaded = load_model(model, device=setup.device, dtype=dtype, quantization=quantization)
        stage = build_stage(setup, loaded.model, loaded.vae, BagelTokenizer(loaded.model_dir))
        self.stage = setup.stage
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.worker = StageWorker(setup, stage, self._send, RayCodec)
        self.outbox.put(("ready", setup.stage, os.getpid(), None))
        threading.Thread(target=self._loop, args=(setup.batch_timeout,), name=f"bagel-serve-stage{setup.stage}",
                         daemon=True).start()

    def _send(self, msg: tuple) -> None:
        if msg[0] == "handoff":  # only the object's reference travels through the parent
            msg = (*msg[:3], import_ray().put(msg[3]))
        self.outbox.put(msg)

    def _loop(self, batch_timeout: float) -> None:
        try:
            while True:
                try:
                    msg = self.inbox.get(timeout=0.0 if self.worker.busy else batch_timeout)
                    if msg[0] == "stop":
                        return
                    self.worker.handle(msg)
                    continue
                except queue.Empty:
                    pass
                if self.worker.busy:
                    self.worker.step()
        except BaseException:
            self.outbox.put(("fatal", self.stage, None, traceback.format_exc()))

    def put(self, msg: tuple) -> None:
        self.inbox.put(msg)

    def poll(self, wait: float) -> list[tuple]:
        out = []
        try:
            out.append(self.outbox.get(timeout=wait))
            while True:
                out.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        return out


class RayTransport:
    codec = RayCodec

    def __init__(self, setups: list[StageSetup], devices: list[torch.device], *, model: str, dtype: torch.dtype,
                 ray_address: str | None, init_timeout: float, quantization: QuantizationConfig | None = None) -> None:
        ray = import_ray()
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
        if devices[0].type == "cuda":
            # Inside an actor Ray shows only its GPU(s): the stage's device is the first one it sees.
            setups = [dataclasses.replace(s, device="cuda:0") for s in setups]
        bundles, gpus = ray_bundles(devices)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group(bundles, strategy="PACK")
        _wait_placed(ray, group, bundles, init_timeout)
        remote = ray.remote(StageActor)
        # Each actor's process starts with its stage's deploy `env` (and the test hook), so that what torch
        # reads at import sees it.
        hook = {k: os.environ[k] for k in (START_DELAY_ENV,) if k in os.environ}
        envs = [{**hook, **setup.env} for setup in setups]
        self.actors = [
            remote.options(
                num_cpus=1, num_gpus=gpus[s], max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=s),
                **({"runtime_env": {"env_vars": envs[s]}} if envs[s] else {}),
            ).remote(setups[s], model, dtype, quantization)
            for s in range(len(setups))
        ]
        self.group = group
        self.num_stages = len(setups)
        self.pids: list[int | None] = [None] * self.num_stages
        self.stopped = False
        self._dead: dict[int, str] = {}
        self._polls = {actor.poll.remote(_POLL_WAIT_S): s for s, actor in enumerate(self.actors)}
        self._buffer: deque[tuple] = deque()

    def send(self, stage: int, msg: tuple) -> None:
        self.actors[stage].put.remote(msg)

    def recv(self, timeout: float) -> tuple | None:
        deadline = time.monotonic() + timeout
        while not self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self._polls:
                return None
            ready, _ = self.ray.wait(list(self._polls), num_returns=1, timeout=left)
            for ref in ready:
                stage = self._polls.pop(ref)
                try:
                    msgs = self.ray.get(ref)
                except Exception as e:  # the actor died (RayActorError and kin)
                    self._dead[stage] = f"died ({describe(e).splitlines()[0]})"
                    continue
                self._polls[self.actors[stage].poll.remote(_POLL_WAIT_S)] = stage
                for msg in msgs:
                    if msg[0] == "ready":
                        self.pids[stage] = msg[2]
                    self._buffer.append(msg)
        return self._buffer.popleft()

    def name(self, stage: int) -> str:
        pid = self.pids[stage]
        return f"stage {stage} Ray actor" + (f" (pid {pid})" if pid is not None else "")

    def exited(self, stage: int) -> str | None:
        return self._dead.get(stage)

    def heartbeats(self) -> bool:
        return False

    def stop(self, grace: float = 0.0) -> None:
        if self.stopped:
            return
        self.stopped = True
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:
                pass
        try:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
        except Exception:
            pass


def _wait_placed(ray: Any, group: Any, bundles: list[dict[str, float]], timeout: float) -> None:
    """Fail at once when the cluster can never hold the stages, and after `timeout` when it is busy."""
    from ray.util.placement_group import remove_placement_group

    total = ray.cluster_resources()
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    short = {k: v for k, v in need.items() if total.get(k, 0.0) < v}
    if short:
        remove_placement_group(group)
        raise WorkerDiedError(f"the Ray cluster cannot place the stages: they need {need}, the cluster has "
                           f"{ {k: total.get(k, 0.0) for k in need} } in all")
    ready, _ = ray.wait([group.ready()], timeout=timeout)
    if not ready:
        remove_placement_group(group)
        free = ray.available_resources()
        raise TimeoutError(f"the Ray cluster did not free {need} for the stages within init_timeout={timeout:g} s "
                           f"(available now: { {k: free.get(k, 0.0) for k in need} }; other engines may hold them)")
