"""The engine loop under the server, from Python: concurrent `Omni.generate` threads join the running
batches, the async API (`agenerate`, `stream`), cancellation, timeouts, the bounded queue; and the command
line (`bagel-serve serve` starts on the demo model, says it is ready, drains on SIGTERM; the package works
without the serve extra)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bagel_serve import Omni
from bagel_serve.pipeline.submission import QueueFullError, RequestCancelledError, RequestTimeoutError

ROOT = Path(__file__).resolve().parents[1]
TEXT = {"modality": "text2text", "prompt": "Hello there", "max_tokens": 12}
IMAGE = {"modality": "text2img", "prompt": "a cat", "steps": 3, "height": 32, "width": 32, "seed": 1}


def test_threads_join_one_batch(omni: Omni) -> None:
    reqs = [dict(TEXT, prompt=f"Hello #{i}") for i in range(4)] + [IMAGE]
    alone = [omni.generate([r])[0] for r in reqs]
    omni.orchestrator.collect_stats()
    before = omni.orchestrator.totals.shared_forwards
    got: dict[int, object] = {}
    barrier = threading.Barrier(len(reqs))

    def run(i: int) -> None:
        barrier.wait()
        (got[i],) = omni.generate([reqs[i]])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, a in enumerate(alone):
        assert got[i].token_ids == a.token_ids and got[i].ok
    assert got[4].images[0].size == (32, 32)
    omni.orchestrator.collect_stats()  # each generate collected its share too: `totals` holds them all
    assert omni.orchestrator.totals.shared_forwards > before and omni.orchestrator.totals.max_batch_requests >= 2


def test_async_api(omni: Omni) -> None:
    (ref,) = omni.generate([TEXT])

    async def main():
        outs = await asyncio.gather(omni.agenerate([TEXT]), omni.agenerate([IMAGE]))
        kinds: dict[str, int] = {}
        tokens = []
        async with omni.stream([TEXT, IMAGE]) as events:
            async for ev in events:
                kinds[ev.kind] = kinds.get(ev.kind, 0) + 1
                if ev.kind == "token" and ev.index == 0:
                    tokens.append(ev.data)
        return outs, kinds, tokens

    (text_out,), (img_out,) = asyncio.run(main())[0]
    outs, kinds, tokens = asyncio.run(main())
    assert text_out.token_ids == ref.token_ids and img_out.images
    assert tokens == ref.token_ids and kinds["output"] == 2 and kinds["progress"] == 2  # 3 steps: 2 evaluations


def test_a_stream_without_tokens_brings_only_progress_and_outputs(omni: Omni) -> None:
    """What a non-streamed HTTP answer asks for: the engine sends no event per token (only the outputs, and
    denoising progress), and the outputs are the same."""
    (ref,) = omni.generate([TEXT])

    async def main():
        kinds: dict[str, int] = {}
        outs = []
        async with omni.stream([TEXT, IMAGE], tokens=False) as events:
            async for ev in events:
                kinds[ev.kind] = kinds.get(ev.kind, 0) + 1
                if ev.kind == "output":
                    outs.append(ev.data)
        return kinds, outs

    kinds, outs = asyncio.run(main())
    assert kinds == {"output": 2, "progress": 2}
    assert [o.token_ids for o in outs if o.modality == "text2text"] == [ref.token_ids]


def test_cancel_timeout_and_queue_bound(omni: Omni, wait_until, engine_idle) -> None:
    orch = omni.orchestrator
    long = dict(TEXT, max_tokens=3000)
    events: list = []
    sub = omni.submit([long], events.append, stream=True)
    assert wait_until(lambda: any(e.kind == "token" for e in events))
    assert engine_idle.used_blocks() > engine_idle.blocks
    sub.cancel()
    assert isinstance(events[-1].data, RequestCancelledError) and sub.done
    engine_idle.wait()
    (late,) = orch.generate(omni.make_requests([TEXT]))  # the engine goes on
    assert late.ok
    timed: list = []
    omni.submit([long], timed.append, timeout=0.3)
    assert wait_until(lambda: timed and timed[-1].kind == "error")
    assert isinstance(timed[-1].data, RequestTimeoutError)
    engine_idle.wait()
    orch.max_queue = 1
    try:
        sub = omni.submit([long], lambda e: None)
        with pytest.raises(QueueFullError, match="max_queue=1"):
            omni.generate([TEXT])
        sub.cancel()
    finally:
        orch.max_queue = None


def test_serve_command_starts_and_drains(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BAGEL_SERVE_CACHE": str(tmp_path / "cache"),
           "BAGEL_SERVE_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "bagel_serve.entrypoints.cli", "serve", "bagel-serve-demo",
                             "--port", "0", "--deploy-config", "bagel_single_stage.yaml", "--device", "cpu",
                             "--uvicorn-log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("bagel-serve ready: bagel-serve-demo"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split(" on ")[1].split(" ")[0]
        auth = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "bagel-serve-demo"
        got: list = []
        t = threading.Thread(target=lambda: got.append(httpx.post(
            url + "/v1/chat/completions", headers=auth, timeout=60,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400})))
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert got and got[0].status_code == 200  # the request in flight was drained, not dropped
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_package_works_without_the_serve_extra(tmp_path: Path) -> None:
    code = ("import sys\n"
            "for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client', 'multipart'):\n"
            "    sys.modules[m] = None  # as if not installed\n"
            "import bagel_serve.entrypoints.omni, bagel_serve.entrypoints.cli as cli\n"
            "sys.exit(cli.main(['serve', 'bagel-serve-demo', '--port', '0']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "pip install 'bagel-serve[serve]'" in done.stderr, done.stderr
