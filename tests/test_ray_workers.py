"""The Ray worker backend on a local Ray cluster: stages as actors, hand-offs through the object store."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import ray

from bagel_serve import Omni
from bagel_serve.config.engine_options import EngineOptionError
from bagel_serve.pipeline.backends.ray import RayTransport, _wait_placed
from bagel_serve.pipeline.orchestrator import EngineShutDownError
from bagel_serve.pipeline.worker_main import START_DELAY_ENV

from test_process_workers import CASES, check_32_mixed, kill_stage_1_mid_batch, same

ROOT = Path(__file__).resolve().parents[1]
SINGLE_STAGE = "bagel_single_stage.yaml"


@pytest.fixture(scope="module")
def single(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE)


def test_starts_a_local_cluster_when_given_no_address(tiny_checkpoint: Path) -> None:
    """First (before `on_ray`): with no cluster running and no ray_address the engine starts one."""
    assert not ray.is_initialized()
    with Omni(tiny_checkpoint, device="cpu", worker_backend="ray", deploy_config=SINGLE_STAGE) as omni:
        assert ray.is_initialized() and isinstance(omni.orchestrator.transport, RayTransport)
        (out,) = omni.generate([CASES["text2text"]])
        assert out.token_ids
    ray.shutdown()


@pytest.fixture(scope="module")
def on_ray(tiny_checkpoint: Path):
    """Two stages as Ray actors on a local cluster that this module starts: 8 logical CPUs (Ray's
    bookkeeping, one per stage actor), so that the few engines these tests build fit on a 2-core machine."""
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config="bagel.yaml", worker_backend="ray")
    yield omni
    omni.shutdown()
    ray.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_stages_are_ray_actors(on_ray: Omni) -> None:
    transport = on_ray.orchestrator.transport
    assert isinstance(transport, RayTransport)
    assert ray.is_initialized()
    pids = transport.pids
    assert len(pids) == 2 and None not in pids and os.getpid() not in pids and len(set(pids)) == 2
    # The parent holds no weights: its model is a skeleton that validates requests.
    assert on_ray.model.device.type == "meta" and on_ray.device.type == "cpu"


@pytest.mark.parametrize("case", list(CASES))
def test_ray_equals_single_stage(single: Omni, on_ray: Omni, case: str) -> None:
    (a,) = single.generate([CASES[case]])
    (b,) = on_ray.generate([CASES[case]])
    same(a, b)
    stages = on_ray.orchestrator.stage_stats
    assert on_ray.last_stats.requests == 1 and len(stages) == 2
    if a.latents is not None:
        # The rows crossed by value into stage 1's own cache.
        assert stages[1].kv_peak_blocks > 0 and stages[1].images == 1


def test_streaming_tokens(on_ray: Omni) -> None:
    seen: dict[int, list[int]] = {}
    outs = on_ray.generate([CASES["text2text"], CASES["text2img_think"]],
                           on_token=lambda i, t: seen.setdefault(i, []).append(t))
    for i, out in enumerate(outs):
        assert seen[i] == out.token_ids and len(seen[i]) > 0


def test_32_mixed_concurrent_requests(single: Omni, on_ray: Omni) -> None:
    reqs = check_32_mixed(single, on_ray)
    assert on_ray.last_stats.images == sum(1 for r in reqs if r["modality"].endswith("2img"))


def test_request_error_fails_only_that_request(single: Omni, on_ray: Omni) -> None:
    bad = dict(CASES["text2img"], height=100000)
    with pytest.raises(Exception, match="height 100000 is above"):
        on_ray.generate([CASES["text2text"], bad])
    (a,) = single.generate([CASES["img2img"]])
    (b,) = on_ray.generate([CASES["img2img"]])  # the actors keep serving
    same(a, b)


def test_single_stage_on_one_actor(single: Omni, tiny_checkpoint: Path, on_ray: Omni) -> None:
    omni = Omni(tiny_checkpoint, device="cpu", worker_backend="ray", deploy_config=SINGLE_STAGE)
    try:
        assert omni.pipeline.single_stage and len(omni.orchestrator.transport.pids) == 1
        reqs = [CASES["text2img"], CASES["img2text"]]
        for r in reqs:
            (a,) = single.generate([r])
            (b,) = omni.generate([r])
            same(a, b)
    finally:
        omni.shutdown()


def test_stage_env_is_the_actors_from_its_start(tiny_checkpoint: Path, tmp_path: Path, on_ray: Omni) -> None:
    """Each actor's process is started with its stage's deploy `env` (Ray's runtime_env), so what torch reads
    at import sees it: it is in /proc/PID/environ, the environment the process started with."""
    yaml = tmp_path / "env.yaml"
    yaml.write_text("base_config: bagel.yaml\nstages:\n  - {stage_id: 0, env: {BAGEL_SERVE_TEST_ENV: zero}}\n"
                    "  - {stage_id: 1, env: {BAGEL_SERVE_TEST_ENV: one, OMP_NUM_THREADS: 1}}\n")
    with Omni(tiny_checkpoint, device="cpu", deploy_config=yaml, worker_backend="ray") as omni:
        environs = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in omni.orchestrator.transport.pids]
        (out,) = omni.generate([CASES["text2text"]])
        assert out.ok, out.error
    assert b"BAGEL_SERVE_TEST_ENV=zero" in environs[0] and b"BAGEL_SERVE_TEST_ENV=one" in environs[1]
    assert b"OMP_NUM_THREADS=1" in environs[1]


def test_init_timeout_names_the_stage(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, on_ray: Omni) -> None:
    monkeypatch.setenv(START_DELAY_ENV, "1:60")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"stage 1 Ray actor did not become ready within init_timeout=3 s"):
        Omni(tiny_checkpoint, device="cpu", deploy_config="bagel.yaml", worker_backend="ray",
             init_timeout=3.0)
    assert time.monotonic() - t0 < 20


def test_killed_actor_fails_the_batch_fast(single: Omni, tiny_checkpoint: Path, on_ray: Omni) -> None:
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_think.yaml",
                worker_backend="ray")
    transport = omni.orchestrator.transport
    took = kill_stage_1_mid_batch(single, omni, signal.SIGKILL, 1.0, r"stage 1 Ray actor \(pid {pid}\) died .* while "
                                                                     r"2 request\(s\) were in flight")
    assert took < 10
    t0 = time.monotonic()
    with pytest.raises(EngineShutDownError, match="engine is shut down.*stage 1 Ray actor"):
        omni.generate([CASES["text2text"]])
    assert time.monotonic() - t0 < 1
    stage0 = transport.pids[0]
    deadline = time.monotonic() + 10
    while _alive(stage0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(stage0)  # the surviving actor was stopped too
    omni.shutdown()  # idempotent


def test_placement_fails_clearly(on_ray: Omni) -> None:
    """Stages the cluster can never hold fail at once; stages it holds no room for now, after init_timeout."""
    from ray.util.placement_group import placement_group

    t0 = time.monotonic()
    never = [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 100.0}]
    with pytest.raises(RuntimeError, match=r"cannot place the stages: they need \{'CPU': 101.0, 'GPU': 1.0\}, "
                                           r"the cluster has \{'CPU': 8.0, 'GPU': 0.0\} in all"):
        _wait_placed(ray, placement_group(never), never, timeout=30)
    assert time.monotonic() - t0 < 5
    busy = [{"CPU": 7.0}]  # the module's engine holds 2 of the 8
    with pytest.raises(TimeoutError, match=r"did not free \{'CPU': 7.0\} for the stages within init_timeout=1 s "
                                           r"\(available now: \{'CPU': 6.0\}"):
        _wait_placed(ray, placement_group(busy), busy, timeout=1)


def test_ray_address_needs_the_ray_backend(tiny_checkpoint: Path) -> None:
    with pytest.raises(EngineOptionError, match=r"ray_address \(--ray-address\) places the stages with Ray, but "
                                                r"worker_backend \(--worker-backend\) is 'inline'"):
        Omni(tiny_checkpoint, device="cpu", worker_backend="inline", ray_address="auto")


def test_shutdown_stops_the_actors(on_ray: Omni) -> None:
    """Last: shuts the module's engine down."""
    pids = on_ray.orchestrator.transport.pids
    assert all(_alive(p) for p in pids)
    on_ray.shutdown()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    with pytest.raises(EngineShutDownError, match="engine is shut down"):
        on_ray.generate([CASES["text2text"]])
