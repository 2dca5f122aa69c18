"""The Ray worker backend (`worker_backend="ray"`, `ray_address`): one Ray actor per stage.

Stages may sit on other nodes, so each actor loads its own weights from the model path (a local
directory must exist at the same path on every node; a Hugging Face repo id is resolved on each node)
and hand-offs carry their KV rows by value: stage 0 copies an image request's contexts to the CPU,
puts them into Ray's object store and sends the object's reference; stage 1 fetches them (from
whichever node holds them) into its own KV pool. The parent only routes: it holds no weights (its
model is a meta-device skeleton for request validation) and forwards the references, never the rows.

Placement: one placement group per engine, one bundle per stage (`PACK`), with one CPU each and, on
CUDA, one GPU for a stage that has its own device or an equal share of one for stages whose deploy
`devices` are the same. With no `ray_address` a local Ray cluster is started (and stopped at exit);
`ray_address="auto"` or `"ray://host:port"` joins an existing one. The actors compute on the engine's
`device` (by default CUDA when this process sees a GPU): on a head node without one, pass `device="cuda"`.

Each actor runs the same `StageWorker` loop as a worker process, in a thread; the parent talks to it
with two actor methods, `put(message)` and `poll(wait)` (the messages it has sent, waiting up to `wait`
seconds for the first). A dead actor (killed, crashed, out of memory) fails its pending `poll` at once,
which fails the batch with `WorkerDiedError` and shuts the engine down, as in the process backend.
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

from bagel_serve.config.deploy import DeployConfig, PipelineSpec
from bagel_serve.config.engine_options import EngineOptions
from bagel_serve.engine.runner import Runner
from bagel_serve.pipeline.stage_worker import StageSetup, StageWorker, ValueCodec, describe, make_runner
from bagel_serve.pipeline.workers import START_DELAY_ENV, WorkerOrchestrator, start_delay, stage_devices, stage_setups

_POLL_WAIT_S = 1.0  # how long an actor's poll waits for its first message
_TRANSPORT_ONLY = ("handoff", "release")  # messages between stages, which the parent only forwards


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


class _ToOtherStage:
    """A stage's view of its neighbour's inbox: the message goes to the parent, which forwards it. A
    hand-off's blob is put into the object store first, so only its reference travels."""

    def __init__(self, outbox: queue.Queue) -> None:
        self.outbox = outbox

    def put(self, msg: tuple) -> None:
        kind, stage, key, data = msg
        if kind == "handoff":
            data = import_ray().put(data)
        self.outbox.put((kind, stage, key, data))


class StageActor:
    """A stage worker inside a Ray actor (made remote by `RayOrchestrator`)."""

    def __init__(self, setup: StageSetup, model: str, dtype: torch.dtype) -> None:
        setup.numerics.apply()
        delay = start_delay(setup.stage, os.environ.get(START_DELAY_ENV))
        if delay > 0:
            time.sleep(delay)
        from bagel_serve.engine.tokenizer import BagelTokenizer
        from bagel_serve.model.loader import load_model

        loaded = load_model(model, device=setup.device, dtype=dtype)
        runner = make_runner(setup, loaded.model, loaded.vae, BagelTokenizer(loaded.model_dir))
        self.stage = setup.stage
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        relay = _ToOtherStage(self.outbox)
        self.worker = StageWorker(setup, runner, self.inbox, self.outbox,
                                  relay if setup.stage + 1 < setup.num_stages else None,
                                  relay if setup.stage > 0 else None, codec=RayCodec)
        self.outbox.put(("ready", setup.stage, os.getpid(), None))
        threading.Thread(target=self._loop, name=f"bagel-serve-stage{setup.stage}", daemon=True).start()

    def _loop(self) -> None:
        try:
            self.worker.loop()
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


class _Actors:
    """The stage actors and their placement group (a `Transport`)."""

    def __init__(self, ray: Any, actors: list[Any], group: Any) -> None:
        self.ray = ray
        self.actors = actors
        self.group = group
        self.num_stages = len(actors)
        self.pids: list[int | None] = [None] * len(actors)
        self.stopped = False
        self._dead: dict[int, str] = {}
        self._polls = {actor.poll.remote(_POLL_WAIT_S): s for s, actor in enumerate(actors)}
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
                    self._route(msg)
        return self._buffer.popleft()

    def _route(self, msg: tuple) -> None:
        kind, stage = msg[0], msg[1]
        if kind == "ready":
            self.pids[stage] = msg[2]
        if kind in _TRANSPORT_ONLY:
            self.send(stage + 1 if kind == "handoff" else stage - 1, msg)
        else:
            self._buffer.append(msg)

    def name(self, stage: int) -> str:
        pid = self.pids[stage]
        return f"stage {stage} Ray actor" + (f" (pid {pid})" if pid is not None else "")

    def exited(self, stage: int) -> str | None:
        return self._dead.get(stage)

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


class RayOrchestrator(WorkerOrchestrator):
    """One Ray actor per stage, in one placement group. `model` is what each actor loads (a path that
    exists on its node, or a Hugging Face repo id); `device`/`dtype` are where and how."""

    codec = RayCodec

    def __init__(self, runner: Runner, pipeline: PipelineSpec, deploy: DeployConfig, options: EngineOptions, *,
                 model: str, device: torch.device, dtype: torch.dtype) -> None:
        ray = import_ray()
        super().__init__(runner, pipeline, options)
        if not ray.is_initialized():
            ray.init(address=options.ray_address, include_dashboard=False, log_to_driver=False)
        setups = stage_setups(runner, pipeline, deploy, options, device=device, lend=False, to_cpu=True,
                              own_weights=True)
        if device.type == "cuda":
            # Inside an actor Ray shows only its GPU(s): the stage's device is the first one it sees.
            setups = [dataclasses.replace(s, device="cuda:0") for s in setups]
        bundles, gpus = _bundles(stage_devices(device, deploy, pipeline.num_stages))
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group(bundles, strategy="PACK")
        _wait_placed(ray, group, bundles, options.init_timeout)
        remote = ray.remote(StageActor)
        env = {k: os.environ[k] for k in (START_DELAY_ENV,) if k in os.environ}
        actors = [
            remote.options(
                num_cpus=1, num_gpus=gpus[s], max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=s),
                **({"runtime_env": {"env_vars": env}} if env else {}),
            ).remote(setups[s], model, dtype)
            for s in range(pipeline.num_stages)
        ]
        self._workers = _Actors(ray, actors, group)
        self._start(self._workers)

    @property
    def worker_pids(self) -> list[int | None]:
        return list(self._workers.pids)


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
        raise RuntimeError(f"the Ray cluster cannot place the stages: they need {need}, the cluster has "
                           f"{ {k: total.get(k, 0.0) for k in need} } in all")
    ready, _ = ray.wait([group.ready()], timeout=timeout)
    if not ready:
        remove_placement_group(group)
        free = ray.available_resources()
        raise TimeoutError(f"the Ray cluster did not free {need} for the stages within init_timeout={timeout:g} s "
                           f"(available now: { {k: free.get(k, 0.0) for k in need} }; other engines may hold them)")


def _bundles(devices: list[torch.device]) -> tuple[list[dict[str, float]], list[float]]:
    """One bundle per stage: a CPU, and a GPU or an equal share of one among stages on the same device."""
    gpus = []
    for d in devices:
        gpus.append(1.0 / sum(1 for e in devices if e == d) if d.type == "cuda" else 0.0)
    return [{"CPU": 1.0, **({"GPU": g} if g else {})} for g in gpus], gpus
