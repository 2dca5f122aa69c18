"""The process worker backend: one OS process per stage, KV hand-off through shared memory, dead workers."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from multiprocessing.reduction import ForkingPickler
from PIL import Image

from bagel_serve import Omni
from bagel_serve.engine.kv_cache import Context
from bagel_serve.engine.request import make_request
from bagel_serve.engine.runner import Handoff, Runner
from bagel_serve.engine.scheduler import Engine
from bagel_serve.pipeline.transfer import (
    ContextPayload,
    HandoffPayload,
    _reserve,
    export_context,
    export_handoff,
    import_context,
    import_handoff,
)
from bagel_serve.pipeline.workers import START_DELAY_ENV, EngineShutDownError, ProcessOrchestrator, WorkerDiedError

ROOT = Path(__file__).resolve().parents[1]
EDIT = Path(__file__).resolve().parents[2] / "shared" / "golden" / "config_a" / "inputs" / "edit_rgb_150x100.png"

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
    return Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml")


@pytest.fixture(scope="module")
def proc(tiny_checkpoint: Path):
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config=ROOT / "deploy" / "bagel.yaml")
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


def children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


# ---------------------------------------------------------------------------------------------- transfer
def _context_program_handoff(runner: Runner, req_dict: dict) -> Handoff:
    req = make_request(req_dict, 0)
    return runner.run_alone(runner.context_program(0, req, runner.prepare(0, req)))


def _rows_equal(a: Context, b: Context) -> None:
    assert (a.length, a.rope) == (b.length, b.rope)
    for layer in range(a.num_layers):
        ka, va = a.keys(layer)
        kb, vb = b.keys(layer)
        assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("case", ["text2img_think", "img2img", "text2img"])
def test_handoff_round_trip_is_bit_exact(single: Omni, case: str) -> None:
    runner = single.runner
    h = _context_program_handoff(runner, CASES[case])
    payload = export_handoff(h)
    assert isinstance(payload, HandoffPayload)
    for name, p in payload.contexts().items():
        assert (p is None) == (getattr(h, name) is None)
        if p is not None and p.length:
            assert p.k.is_shared() and p.v.is_shared()  # pickles as a shared-memory handle
    payload = ForkingPickler.loads(ForkingPickler.dumps(payload))  # what a queue does
    other = Runner(runner.model, runner.vae, runner.tok)  # another runner: its own KV cache
    h2 = import_handoff(payload, other)
    for name in ("full", "cfg_text", "cfg_img"):
        a, b = getattr(h, name), getattr(h2, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert b is not a
            _rows_equal(a, b)
    assert torch.equal(h.rng_state, h2.rng_state) and h2.img_is_full == h.img_is_full
    engine = Engine(other)
    engine.add_program(other.image_program(h2), h2.request)
    ((_, out, err),) = list(engine.run())
    assert err is None
    (ref,) = single.generate([CASES[case]])
    same(ref, out)


def test_context_payload_edges(single: Omni) -> None:
    runner = single.runner
    empty = runner._empty()
    empty.rope = 3
    p = export_context(empty)
    assert isinstance(p, ContextPayload) and p.length == 0
    back = import_context(p, runner)
    assert (back.length, back.rope) == (0, 3)
    h = _context_program_handoff(runner, CASES["text2img"])
    h.cfg_img = h.full  # the same context twice: sent once, rebuilt as one context
    h2 = import_handoff(export_handoff(h), runner)
    assert h2.cfg_img is h2.full
    bad = ContextPayload(p.k[:1], p.v[:1], 0, 0)
    with pytest.raises(Exception, match="shape"):
        import_context(bad, runner)

    class OldContext:  # the Context API before the paged pool: reserve(n, like)
        def __init__(self) -> None:
            self.got = None

        def reserve(self, n, like):
            self.got = (n, like.shape)

    old = OldContext()
    _reserve(old, 5, torch.empty((0, 2, 4)))
    assert old.got == (5, (0, 2, 4))


# ---------------------------------------------------------------------------------------------- process backend
def test_backend_is_process_with_two_workers(proc: Omni) -> None:
    orch = proc.orchestrator
    assert isinstance(orch, ProcessOrchestrator)
    pids = orch.worker_pids
    assert len(pids) == 2 and os.getpid() not in pids and set(pids) <= children()


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
        assert seen[i] == out.token_ids[1:] and len(seen[i]) > 0


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


def test_request_error_fails_only_that_request(single: Omni, proc: Omni) -> None:
    dim = single.config.patch_latent_dim
    # A noise tensor of the right shape but without data: prepare accepts it, stage 1 fails on it.
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


def test_init_timeout_names_the_stage(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = children()
    monkeypatch.setenv(START_DELAY_ENV, "1:60")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"stage 1 worker \(pid \d+\) did not become ready within init_timeout=1 s"):
        Omni(tiny_checkpoint, device="cpu", deploy_config=ROOT / "deploy" / "bagel.yaml", init_timeout=1.0)
    assert time.monotonic() - t0 < 15
    assert children() <= before  # both workers of that engine are gone


def kill_stage_1_mid_batch(single: Omni, omni: Omni, died: str, delay: float) -> float:
    """Check the engine serves, then SIGKILL stage 1's worker `delay` s into a long batch: the batch must
    fail with a WorkerDiedError matching `died` (formatted with the pid); returns seconds from kill to error."""
    (a,) = single.generate([CASES["text2img_think"]])
    (b,) = omni.generate([CASES["text2img_think"]])
    same(a, b)
    stage1 = omni.orchestrator.worker_pids[1]
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(delay)
        killed_at.append(time.monotonic())
        os.kill(stage1, signal.SIGKILL)

    long = {"modality": "text2img", "prompt": "slow", "steps": 1000, "height": 16, "width": 16, "seed": 5}
    threading.Thread(target=kill, daemon=True).start()
    with pytest.raises(WorkerDiedError, match=died.format(pid=stage1)):
        omni.generate([long, dict(long, seed=6)])
    return time.monotonic() - killed_at[0]


def test_killed_worker_fails_the_batch_fast(single: Omni, tiny_checkpoint: Path) -> None:
    before = children()
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config=ROOT / "deploy" / "bagel_think.yaml",
                worker_backend="multi_process")
    orch = omni.orchestrator
    assert isinstance(orch, ProcessOrchestrator)
    took = kill_stage_1_mid_batch(single, omni, r"stage 1 worker \(pid {pid}\) exited with code -9 while 2 "
                                                r"request\(s\) were in flight", delay=0.7)
    assert took < 5
    assert not any(p.is_alive() for p in orch._workers.procs)
    assert children() <= before
    t0 = time.monotonic()
    with pytest.raises(EngineShutDownError, match="engine is shut down.*stage 1 worker"):
        omni.generate([CASES["text2text"]])
    assert time.monotonic() - t0 < 1
    omni.shutdown()  # idempotent


# ---------------------------------------------------------------------------------------------- lending
def test_stage_1_reads_lent_contexts_in_place(proc: Omni) -> None:
    proc.generate([CASES["text2img"], CASES["img2img"], CASES["text2img_think"]])
    st = proc.orchestrator.stage_stats
    assert st[0].kv_peak_blocks > 0 and st[1].images == 3
    assert st[1].kv_peak_blocks == 0  # stage 1 never held a row of its own


def test_lent_blocks_come_back_to_stage_0(single: Omni) -> None:
    """Two stage workers in threads of this process, over plain queues: every block stage 0 lends for a
    hand-off returns to its pool once stage 1 is done, and stage 1's own pool stays empty."""
    import queue

    from bagel_serve.engine.scheduler import SchedulerConfig
    from bagel_serve.pipeline.stage_worker import Codec, Flags, Numerics, StageSetup, StageWorker, make_runner

    model, vae, tok = single.runner.model, single.runner.vae, single.runner.tok
    boxes = [queue.Queue() for _ in range(3)]  # stage 0, stage 1, results
    workers = []
    for s in range(2):
        setup = StageSetup(stage=s, num_stages=2, scheduler=SchedulerConfig(), batch_timeout=0.05,
                           numerics=Numerics.here(), lend=True)
        workers.append(StageWorker(setup, make_runner(setup, model, vae, tok), boxes[s], boxes[2],
                                   boxes[1] if s == 0 else None, boxes[0] if s == 1 else None))
    threads = [threading.Thread(target=w.loop, daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        reqs = [CASES["text2img"], CASES["img2img"], CASES["text2img_think"], CASES["text2text"]]
        for i, r in enumerate(reqs):
            req = make_request(r, i)
            boxes[0].put(("request", None, (1, i), Codec.dumps((req, single.runner.prepare(i, req), Flags()))))
        outs = {}
        while len(outs) < len(reqs):
            kind, stage, key, data = boxes[2].get(timeout=30)
            assert kind == "output", data
            outs[key[1]] = Codec.loads(data)
        for i, r in enumerate(reqs):
            (alone,) = single.generate([r])
            same(alone, outs[i], exact=False)  # packed with others: threaded CPU matmuls may move the last bits
        pool0, pool1 = workers[0].runner.pool, workers[1].runner.pool
        deadline = time.monotonic() + 10
        while (pool0.num_blocks_used or pool0.admitted or workers[0].lent) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool0.num_blocks_used == 0 and pool0.admitted == 0 and not workers[0].lent
        assert pool0.capacity_blocks > 0 and pool1.capacity_blocks == 0 and not workers[1].owed
    finally:
        for s in range(2):
            boxes[s].put(("stop", None, None, None))
        for t in threads:
            t.join(5)


def test_shutdown_leaves_no_worker(proc: Omni) -> None:
    """Last: shuts the module's engine down (through the context manager)."""
    orch = proc.orchestrator
    procs = list(orch._workers.procs)
    assert all(p.is_alive() for p in procs)
    with proc:
        pass
    assert not any(p.is_alive() for p in procs)
    assert not {p.pid for p in procs} & children()
    for pid in orch.worker_pids:
        assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(EngineShutDownError, match="engine is shut down"):
        proc.generate([CASES["text2text"]])
    proc.shutdown()

