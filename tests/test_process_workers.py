"""The process worker backend: one OS process per stage started through its own entry point, KV hand-off in
place through shared memory, dead or stopped workers, and starting from anywhere."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from multiprocessing.reduction import ForkingPickler
from PIL import Image

from bagel_serve import Omni
from bagel_serve.config.deploy_loader import load_deploy_config, resolve_deploy_path
from bagel_serve.config.pipelines import PIPELINES
from bagel_serve.config.engine_options import EngineOptions
from bagel_serve.engine.diffusion import Handoff
from bagel_serve.engine.kv_cache import Context, KVCache
from bagel_serve.engine.request import make_request
from bagel_serve.engine.stage_engine import Engine, Stage
from bagel_serve.pipeline.backends.process import ProcessTransport
from bagel_serve.pipeline.orchestrator import EngineShutDownError, Orchestrator, WorkerDiedError
from bagel_serve.pipeline.placement import build_stage, stage_setups
from bagel_serve.pipeline.stage_worker import IpcCodec, StageWorker
from bagel_serve.pipeline.transfer import ContextPayload, HandoffPayload, export_context, export_handoff, import_handoff, \
    import_rows
from bagel_serve.pipeline.worker_main import START_DELAY_ENV

ROOT = Path(__file__).resolve().parents[1]
EDIT = Path(__file__).resolve().parents[2] / "shared" / "golden" / "config_a" / "inputs" / "edit_rgb_150x100.png"
SINGLE_STAGE = "bagel_single_stage.yaml"

SMALL = Image.open(EDIT).convert("RGB").resize((64, 64))  # small images keep this file fast on a CPU

CASES = {
    "text2text": {"modality": "text2text", "prompt": "Hello there", "max_tokens": 6},
    "img2text": {"modality": "img2text", "prompt": "What is it?", "image": str(EDIT), "max_tokens": 4},
    "text2img": {"modality": "text2img", "prompt": "a cat", "steps": 3, "height": 16, "width": 32, "seed": 1,
                 "return_latents": True},
    "img2img": {"modality": "img2img", "prompt": "blue", "image": SMALL, "steps": 3, "seed": 3,
                "return_latents": True, "cfg_interval": (0.0, 1.0), "cfg_renorm_type": "text_channel"},
    "text2img_think": {"modality": "text2img", "prompt": "a cat", "steps": 3, "height": 16, "width": 16, "seed": 2,
                       "think": True, "max_think_tokens": 4, "return_latents": True, "cfg_img_scale": 2.0,
                       "negative_prompt": "dog"},
    "img2text_think": {"modality": "img2text", "prompt": "What is it?", "image": SMALL, "max_tokens": 4,
                       "think": True},
}


@pytest.fixture(scope="module")
def single(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE)


@pytest.fixture(scope="module")
def proc(tiny_checkpoint: Path):
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config="bagel.yaml")
    yield omni
    omni.shutdown()


def same(a, b, exact: bool = True) -> None:
    assert a.token_ids == b.token_ids and a.text == b.text and a.think_text == b.think_text
    assert (a.latents is None) == (b.latents is None) and len(a.images) == len(b.images)
    if a.latents is not None:
        if exact:
            assert torch.allclose(a.latents, b.latents, rtol=0, atol=1e-6)
            assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
        else:
            assert torch.allclose(a.latents, b.latents, rtol=1e-5, atol=1e-5)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def other_stage(stage: Stage, blocks: int = 256) -> Stage:
    """Another stage over the same weights, with a KV cache of its own."""
    llm = stage.cfg.llm
    return Stage(stage.model, stage.vae, stage.tok, KVCache(llm.num_hidden_layers, llm.num_key_value_heads,
                                                            llm.head_dim, blocks))


# ---------------------------------------------------------------------------------------------- transfer
def _handoff(stage: Stage, req_dict: dict) -> Handoff:
    req = make_request(req_dict, 0)
    return stage.run_alone(stage.context_program(0, req, stage.prepare(0, req)))


def _rows_equal(a: Context, b: Context) -> None:
    assert (a.length, a.rope) == (b.length, b.rope)
    for layer in range(a.cache.num_layers):
        ka, va = a.rows(layer)
        kb, vb = b.rows(layer)
        assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("case", ["text2img_think", "img2img", "text2img"])
def test_handoff_round_trip_is_bit_exact(single: Omni, case: str) -> None:
    stage = single.stage
    h = _handoff(stage, CASES[case])
    payload = export_handoff(h)
    assert isinstance(payload, HandoffPayload) and not payload.lent
    for name, p in payload.contexts().items():
        assert (p is None) == (getattr(h, name) is None)
        if p is not None and p.length:
            assert p.kv.is_shared()  # pickles as a shared-memory handle
    payload = ForkingPickler.loads(ForkingPickler.dumps(payload))  # what a connection does
    other = other_stage(stage)
    h2 = import_handoff(payload, other.cache)
    for name in ("full", "cfg_text", "cfg_img"):
        a, b = getattr(h, name), getattr(h2, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert b is not a and b.cache is other.cache
            _rows_equal(a, b)
    assert torch.equal(h.rng_state, h2.rng_state) and h2.img_is_full == h.img_is_full
    engine = Engine(other)
    engine.add_program(other.image_program(h2), h2.request)
    ((_, out, err),) = list(engine.run())
    assert err is None
    (ref,) = single.generate([CASES[case]])
    same(ref, out)
    assert other.cache.manager.num_used == 0  # the image program released what it imported


def test_context_payload_edges(single: Omni) -> None:
    stage = single.stage
    empty = Context(stage.cache)
    empty.rope = 3
    p = export_context(empty)
    assert isinstance(p, ContextPayload) and p.length == 0
    back = import_rows(p.kv, p.length, p.rope, stage.cache)
    assert (back.length, back.rope) == (0, 3)
    h = _handoff(stage, CASES["text2img"])
    h.cfg_img = h.full  # the same context twice: sent once, rebuilt as one context
    h2 = import_handoff(export_handoff(h), other_stage(stage).cache)
    assert h2.cfg_img is h2.full
    with pytest.raises(Exception, match="shape"):
        import_rows(p.kv[:1], 0, 0, stage.cache)


class _ThreadlessTransport:
    """The process backend's protocol (IPC pickling, lending) with both workers in this process: a place to
    look at what each stage's cache holds."""

    codec = IpcCodec

    def __init__(self, workers_of) -> None:
        self.out: deque = deque()
        self.inboxes = [deque(), deque()]
        self.workers = workers_of(self.out.append)
        self.num_stages = 2
        for w in self.workers:
            w.send("ready", 0, None)

    def send(self, stage, msg):
        self.inboxes[stage].append(msg)

    def recv(self, timeout):
        if not self.out:
            for w, box in zip(self.workers, self.inboxes):
                while box:
                    w.handle(box.popleft())
                if w.busy:
                    w.step()
        return self.out.popleft() if self.out else None

    name = staticmethod(lambda s: f"stage {s}")
    exited = staticmethod(lambda s: None)
    heartbeats = staticmethod(lambda: False)
    stop = staticmethod(lambda grace=0.0: None)


def test_lent_blocks_come_back_to_stage_0(single: Omni) -> None:
    """Stage 0 lends its contexts, stage 1 reads them in place and allocates nothing of its own, and every
    block stage 0 lent comes back once stage 1 is done."""
    stage = single.stage
    deploy = load_deploy_config(resolve_deploy_path("bagel.yaml"))
    setups = stage_setups(PIPELINES["bagel"], deploy, EngineOptions(), stage.model.device, backend="process")
    stages = [build_stage(s, stage.model, stage.vae, stage.tok) for s in setups]
    transport = _ThreadlessTransport(lambda send: [StageWorker(s, st, send, IpcCodec) for s, st in zip(setups, stages)])
    orch = Orchestrator(PIPELINES["bagel"], stages[0].prepare, transport)
    reqs = [CASES["text2img"], CASES["img2img"], CASES["text2img_think"], CASES["text2text"]]
    outs = orch.generate([make_request(r, i) for i, r in enumerate(reqs)])
    for r, out in zip(reqs, outs):
        (alone,) = single.generate([r])
        same(alone, out, exact=False)  # packed with others: threaded CPU matmuls may move the last bits
    m0, m1 = stages[0].cache.manager, stages[1].cache.manager
    assert m0.num_used == 0 and m0.admitted == 0 and not transport.workers[0].lent
    assert m1.capacity == 1 and m1.num_used == 0 and not transport.workers[1].owed
    assert orch.stage_stats[1].kv_peak_blocks == 0 and orch.stage_stats[0].kv_peak_blocks > 0


# ---------------------------------------------------------------------------------------------- process backend
def test_backend_is_process_with_two_workers(proc: Omni) -> None:
    transport = proc.orchestrator.transport
    assert isinstance(transport, ProcessTransport)
    pids = transport.pids
    assert len(pids) == 2 and os.getpid() not in pids and all(alive(p) for p in pids)


@pytest.mark.parametrize("case", list(CASES))
def test_process_equals_single_stage(single: Omni, proc: Omni, case: str) -> None:
    (a,) = single.generate([CASES[case]])
    (b,) = proc.generate([CASES[case]])
    same(a, b)
    assert proc.last_stats.requests == 1 and len(proc.orchestrator.stage_stats) == 2


def test_streaming_tokens(proc: Omni) -> None:
    seen: dict[int, list[int]] = {}
    reqs = [CASES["text2text"], CASES["text2img_think"], CASES["img2text_think"]]
    outs = proc.generate(reqs, on_token=lambda i, t: seen.setdefault(i, []).append(t))
    for i, out in enumerate(outs):
        assert seen[i] == out.token_ids and len(seen[i]) > 0


def check_32_mixed(single: Omni, omni: Omni) -> list[dict]:
    """32 concurrent requests of every kind on `omni` give the single stage's outputs; returns them."""
    base = list(CASES.values())
    reqs = [dict(base[i % len(base)], prompt=f"{base[i % len(base)]['prompt']} #{i}") for i in range(32)]
    alone = single.generate(reqs)
    together = omni.generate(reqs)
    assert len(together) == 32
    for a, b in zip(alone, together):
        same(a, b, exact=False)  # packed differently: the last bits of threaded CPU matmuls may move
    return reqs


def test_32_mixed_concurrent_requests(single: Omni, proc: Omni) -> None:
    reqs = check_32_mixed(single, proc)
    st = proc.last_stats
    assert st.requests == 32 and st.images == sum(1 for r in reqs if r["modality"].endswith("2img"))


def test_stage_1_reads_lent_contexts_in_place(proc: Omni) -> None:
    proc.generate([CASES["text2img"], CASES["img2img"], CASES["text2img_think"]])
    st = proc.orchestrator.stage_stats
    assert st[0].kv_peak_blocks > 0 and st[1].images == 3
    assert st[1].kv_peak_blocks == 0  # stage 1 never held a row of its own


def test_request_error_fails_only_that_request(single: Omni, proc: Omni) -> None:
    dim = single.config.patch_latent_dim
    # A noise tensor of the right shape but without data: prepare accepts it, the denoising fails on it.
    bad = {"modality": "text2img", "prompt": "x", "steps": 2, "height": 32, "width": 32,
           "noise": torch.empty((4, dim), device="meta")}
    for omni, batch in ((single, [CASES["text2text"], bad]), (proc, [CASES["text2text"], bad, CASES["text2img"]])):
        outs = omni.generate(batch)
        assert isinstance(outs[1].error, NotImplementedError) and "meta" in str(outs[1].error)
        assert not outs[1].ok and not outs[1].images
        assert outs[0].ok and outs[0].text and all(o.ok for o in outs[2:])
        assert all(o.images for o in outs[2:])
    (a,) = single.generate([CASES["text2img"]])
    (b,) = proc.generate([CASES["text2img"]])  # the workers keep serving
    same(a, b)


def test_stage_env_is_the_workers_from_its_start(tiny_checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage's deploy `env` is in its worker's environment when the process starts (/proc/PID/environ is the
    environment it was started with), so what torch reads at import sees it; a stage that sets OMP_NUM_THREADS
    keeps that thread count instead of copying ours. The parent's own environment is left alone."""
    monkeypatch.delenv("BAGEL_SERVE_TEST_ENV", raising=False)
    yaml = tmp_path / "env.yaml"
    yaml.write_text("base_config: bagel.yaml\nstages:\n  - {stage_id: 0, env: {BAGEL_SERVE_TEST_ENV: zero}}\n"
                    "  - {stage_id: 1, env: {BAGEL_SERVE_TEST_ENV: one, OMP_NUM_THREADS: 1}}\n")
    with Omni(tiny_checkpoint, device="cpu", deploy_config=yaml) as omni:
        environs = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in omni.orchestrator.transport.pids]
        (out,) = omni.generate([CASES["text2img"]])
        assert out.ok, out.error
        setups = stage_setups(omni.pipeline, omni.deploy_config, omni.options, torch.device("cpu"), backend="process")
    assert b"BAGEL_SERVE_TEST_ENV=zero" in environs[0] and b"BAGEL_SERVE_TEST_ENV=one" in environs[1]
    assert b"OMP_NUM_THREADS=1" in environs[1]
    assert [s.numerics.num_threads for s in setups] == [torch.get_num_threads(), None]
    assert "BAGEL_SERVE_TEST_ENV" not in os.environ


def test_init_timeout_names_the_stage(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(START_DELAY_ENV, "1:60")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"stage 1 worker \(pid \d+\) did not become ready within init_timeout=1 s"):
        Omni(tiny_checkpoint, device="cpu", deploy_config="bagel.yaml", init_timeout=1.0)
    assert time.monotonic() - t0 < 15


def test_a_worker_that_fails_at_start_says_why(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(START_DELAY_ENV, "soon")  # the worker's start-up raises on it
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"stage \d worker \(pid \d+\) failed to start: ValueError: "
                                              r"BAGEL_SERVE_TEST_WORKER_START_DELAY='soon': expected seconds"):
        Omni(tiny_checkpoint, device="cpu", deploy_config="bagel.yaml", init_timeout=60.0)
    assert time.monotonic() - t0 < 30


def kill_stage_1_mid_batch(single: Omni, omni: Omni, sig: int, delay: float, error: str) -> float:
    """Check the engine serves, then signal stage 1's worker `delay` s into a long batch: the batch must fail
    with a WorkerDiedError matching `error` (formatted with the pid); returns seconds from signal to error."""
    (a,) = single.generate([CASES["text2img_think"]])
    (b,) = omni.generate([CASES["text2img_think"]])
    same(a, b)
    stage1 = omni.orchestrator.transport.pids[1]
    sent_at: list[float] = []

    def kill() -> None:
        time.sleep(delay)
        sent_at.append(time.monotonic())
        os.kill(stage1, sig)

    long = {"modality": "text2img", "prompt": "slow", "steps": 1000, "height": 16, "width": 16, "seed": 5}
    threading.Thread(target=kill, daemon=True).start()
    with pytest.raises(WorkerDiedError, match=error.format(pid=stage1)):
        omni.generate([long, dict(long, seed=6)])
    return time.monotonic() - sent_at[0]


def test_killed_worker_fails_the_batch_fast(single: Omni, tiny_checkpoint: Path) -> None:
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_think.yaml",
                worker_backend="multi_process")
    pids = omni.orchestrator.transport.pids
    took = kill_stage_1_mid_batch(single, omni, signal.SIGKILL, 0.7, r"stage 1 worker \(pid {pid}\) exited with code "
                                                                     r"-9 while 2 request\(s\) were in flight")
    assert took < 5
    time.sleep(0.5)
    assert not any(alive(p) for p in pids)
    t0 = time.monotonic()
    with pytest.raises(EngineShutDownError, match="engine is shut down.*stage 1 worker"):
        omni.generate([CASES["text2text"]])
    assert time.monotonic() - t0 < 1
    omni.shutdown()  # idempotent


def test_stopped_worker_fails_the_batch_after_the_request_timeout(single: Omni, tiny_checkpoint: Path) -> None:
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config="bagel.yaml", request_timeout=2.0)
    pids = omni.orchestrator.transport.pids
    try:
        took = kill_stage_1_mid_batch(single, omni, signal.SIGSTOP, 0.7,
                                      r"stage 1 worker \(pid {pid}\) sent nothing for \d+ s \(request_timeout=2 s\)")
        assert took < 6
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGCONT)
        omni.shutdown()
    time.sleep(0.5)
    assert not any(alive(p) for p in pids)


def test_worker_stopped_before_its_stats_fails_the_batch(tiny_checkpoint: Path) -> None:
    """A worker that stops after sending its outputs, before its stats, does not hang generate: the batch
    still fails after request_timeout."""
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config="bagel.yaml", request_timeout=2.0)
    transport = omni.orchestrator.transport
    stage1 = transport.pids[1]
    real_send = transport.send

    def stop_stage_1_first(stage: int, msg: tuple) -> None:
        if msg[0] == "stats" and stage == 1:
            os.kill(stage1, signal.SIGSTOP)
        real_send(stage, msg)

    transport.send = stop_stage_1_first
    failed: list[BaseException] = []

    def run() -> None:
        try:
            omni.generate([CASES["text2img"]])
        except BaseException as e:
            failed.append(e)

    thread = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    thread.start()
    try:
        thread.join(30)
        hung = thread.is_alive()
    finally:
        if alive(stage1):
            os.kill(stage1, signal.SIGCONT)
        thread.join(30)
        omni.shutdown()
    assert not hung, "generate hung on a stopped worker"
    assert time.monotonic() - t0 < 15
    assert len(failed) == 1 and isinstance(failed[0], WorkerDiedError)
    assert re.search(rf"stage 1 worker \(pid {stage1}\) sent nothing for \d+ s \(request_timeout=2 s\) while the "
                     rf"stats of \d stage\(s\) were awaited", str(failed[0])), failed[0]


# ---------------------------------------------------------------------------------------------- start anywhere
SCRIPT = """
import sys
from bagel_serve import Omni
omni = Omni(sys.argv[1] if len(sys.argv) > 1 else {ckpt!r}, device="cpu", deploy_config={deploy!r})
outs = omni.generate([{{"modality": "text2text", "prompt": "hi", "max_tokens": 2}},
                      {{"modality": "text2img", "prompt": "a cat", "steps": 2, "height": 16, "width": 16}}])
assert all(o.ok for o in outs) and outs[1].images, outs
print("STARTED", sorted(omni.orchestrator.transport.pids) != [])
omni.shutdown()
"""


@pytest.mark.parametrize("how", ["file_with_guard", "file_without_guard", "python_c", "stdin"])
def test_starts_from_anywhere(tiny_checkpoint: Path, tmp_path: Path, how: str) -> None:
    """Stage workers do not re-import the caller's __main__, so every way of running Python starts them."""
    code = SCRIPT.format(ckpt=str(tiny_checkpoint), deploy=str("bagel.yaml"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if how == "file_with_guard":
        body = "def main():\n" + textwrap.indent(code, "    ") + "\nif __name__ == '__main__':\n    main()\n"
        (tmp_path / "run.py").write_text(body)
        cmd, stdin = [sys.executable, str(tmp_path / "run.py")], None
    elif how == "file_without_guard":
        (tmp_path / "run.py").write_text(code)
        cmd, stdin = [sys.executable, str(tmp_path / "run.py")], None
    elif how == "python_c":
        cmd, stdin = [sys.executable, "-c", code], None
    else:
        cmd, stdin = [sys.executable, "-"], code
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 0 and "STARTED True" in done.stdout, done.stderr[-2000:]


def test_shutdown_leaves_no_worker(proc: Omni) -> None:
    """Last: shuts the module's engine down (through the context manager)."""
    pids = proc.orchestrator.transport.pids
    assert all(alive(p) for p in pids)
    with proc:
        pass
    time.sleep(0.2)
    assert not any(alive(p) for p in pids)
    with pytest.raises(EngineShutDownError, match="engine is shut down"):
        proc.generate([CASES["text2text"]])
    proc.shutdown()


class _GoneTransport:
    """Two stages: stage 0's worker has just been killed (its connection is broken), stage 1 sends it a
    "release" through the parent."""

    codec = IpcCodec
    num_stages = 2

    def __init__(self) -> None:
        self.outbox = deque([("ready", 0, 1, None), ("ready", 1, 2, None)])
        self.dead = False
        self.stopped = False

    def send(self, stage: int, msg: tuple) -> None:
        if stage == 0:
            raise BrokenPipeError(32, "Broken pipe")

    def recv(self, timeout: float) -> tuple | None:
        if self.outbox:
            return self.outbox.popleft()
        time.sleep(min(timeout, 0.01))
        return None

    def name(self, stage: int) -> str:
        return f"stage {stage} worker (pid {stage + 1})"

    def exited(self, stage: int) -> str | None:
        return "exited with code -9" if stage == 0 and self.dead else None

    def heartbeats(self) -> bool:
        return False

    def stop(self, grace: float = 5.0) -> None:
        self.stopped = True


def test_a_message_to_a_dead_worker_fails_as_a_dead_worker_not_a_broken_pipe() -> None:
    """The parent routes a message to a worker that was just killed: the broken pipe is reported as that
    worker's death (WorkerDiedError naming it, once its exit shows), for the caller and for the engine loop
    alike — not as "the engine loop failed: BrokenPipeError"."""
    t = _GoneTransport()
    orch = Orchestrator(PIPELINES["bagel"], lambda i, r: None, t, init_timeout=5.0)
    t.dead = True
    t.outbox.append(("release", 1, (0, 0), None))
    with pytest.raises(WorkerDiedError, match=r"stage 0 worker \(pid 1\) exited with code -9"):
        orch._receive(0.5)
    assert t.stopped and orch.is_shut_down
    t2 = _GoneTransport()
    orch2 = Orchestrator(PIPELINES["bagel"], lambda i, r: None, t2, init_timeout=5.0)
    with pytest.raises(WorkerDiedError, match=r"stage 0 worker \(pid 1\) could not be reached \(BrokenPipeError"):
        orch2.usage()  # the exit never shows: still a dead worker, named
    assert not orch2._asks  # the failed ask does not linger
