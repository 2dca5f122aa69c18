"""Load through HTTP: `benchmarks/load_test.py` drives a real uvicorn server (the tiny checkpoint, single
stage, CPU) with 500 mixed requests — all four modalities, chat and the images endpoints, streaming and not,
about 10 % closed mid-way — at concurrency 32. None may be lost or hang (a global deadline), every answer
read to its end must be a well-formed 200, and the cancelled ones must leave no KV blocks in use."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bagel_serve import Omni
from bagel_serve.serving.run import ServerThread
from bagel_serve.serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 540.0  # the whole run; on 2 loaded cores it takes about a tenth of that


def _load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


load_test = _load_test_module()


@pytest.fixture(scope="module")
def server(omni: Omni) -> ServerThread:
    s = ServerThread(omni, ServerSettings(port=0, max_queue=256, request_timeout=300.0)).start()
    yield s
    s.stop()


def test_plan_covers_every_kind() -> None:
    planned = load_test.plan(500, seed=0, cancel_fraction=0.1)
    assert {(p.kind, p.endpoint) for p in planned} == {
        ("text2text", "chat"), ("img2text", "chat"), ("text2img", "chat"), ("text2img", "generations"),
        ("img2img", "chat"), ("img2img", "edits")}
    assert {p.stream for p in planned} == {True, False}
    cancelled = [p for p in planned if p.cancel]
    assert 30 <= len(cancelled) <= 70 and all(p.stream for p in cancelled)
    assert {p.kind for p in cancelled} == set(load_test.KINDS)
    assert load_test.plan(500, seed=0, cancel_fraction=0.1) == planned  # fixed by the seed


def test_a_malformed_answer_fails_the_check() -> None:
    p = load_test.Planned(0, "text2text", "chat", stream=True, cancel=False)
    assert load_test.check_stream(p, 200, ['data: {"object": "chat.completion.chunk", "choices": []}'])
    assert load_test.check_stream(p, 503, ["data: [DONE]"])
    q = load_test.Planned(1, "text2img", "generations", stream=False, cancel=False)
    assert load_test.check_body(q, 200, b'{"data": []}')


def test_500_mixed_requests_at_concurrency_32(server: ServerThread, engine_idle) -> None:
    report = load_test.run_load(server.url, requests=500, concurrency=32, seed=0, cancel_fraction=0.1,
                                max_tokens=8, steps=2, timeout=300.0, deadline=DEADLINE_S)
    print("\n" + report.summary())
    assert report.lost == 0, f"{report.lost} request(s) hung past the {DEADLINE_S:g} s deadline"
    assert len(report.outcomes) == 500 and not report.failures, report.summary()
    assert sum(o.planned.cancel for o in report.outcomes) >= 30
    engine_idle.wait()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'status="499"' in metrics  # closed connections were seen as cancellations
    assert httpx.get(server.url + "/health").status_code == 200


# ------------------------------------------------------------------------------------------------ faults
def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text().lower()
    except OSError:
        return False


@pytest.mark.parametrize("stage", [1, 0])
def test_a_killed_stage_worker_fails_requests_in_flight_with_503(tiny_checkpoint: Path, stage: int,
                                                                  wait_until) -> None:
    """The default two-stage deploy (one process per stage) behind a real server: SIGKILL of a stage worker
    while chat and image requests (streamed and not) are in flight on both stages. Each fails with 503
    `engine_unavailable` (a stream: an error event, then [DONE]) well within the timeouts; the other worker is
    stopped; then the server keeps answering — /health and every generation request 503 at once, the rest as
    before — until it is stopped, which it does cleanly (docs/serving.md, "When a stage worker dies")."""
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config="bagel.yaml", request_timeout=60.0)
    server = ServerThread(omni, ServerSettings(port=0, request_timeout=120.0)).start()
    try:
        pids = omni.orchestrator.transport.pids
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        url = server.url
        text = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 3000}
        image = {"prompt": "a slow cat", "size": "32x32", "num_inference_steps": 1000, "seed": 1}
        assert httpx.post(url + "/v1/chat/completions", json=dict(text, max_tokens=2), timeout=60).status_code == 200
        results: dict[str, object] = {}
        started = {"chat": threading.Event(), "images": threading.Event()}

        def one_piece(name: str, path: str, body: dict) -> None:
            try:
                results[name] = httpx.post(url + path, json=body, timeout=300)
            except Exception as e:  # a hang past the client timeout, or a dropped connection
                results[name] = e

        def streamed(name: str, path: str, body: dict, first: threading.Event, marker: str) -> None:
            lines = []
            try:
                with httpx.stream("POST", url + path, json=dict(body, stream=True), timeout=300) as r:
                    for line in r.iter_lines():
                        lines.append(line)
                        if marker in line:
                            first.set()
                results[name] = (r.status_code, lines)
            except Exception as e:
                results[name] = e
            first.set()

        threads = [threading.Thread(target=one_piece, args=("chat", "/v1/chat/completions", text)),
                   threading.Thread(target=one_piece, args=("images", "/v1/images/generations", image)),
                   threading.Thread(target=streamed, args=("chat_stream", "/v1/chat/completions", text,
                                                           started["chat"], '"content": "')),
                   threading.Thread(target=streamed, args=("images_stream", "/v1/images/generations", image,
                                                           started["images"], "image_generation.progress"))]
        for t in threads:
            t.start()
        assert started["chat"].wait(120) and started["images"].wait(120), results  # both stages are busy
        assert wait_until(lambda: omni.orchestrator.in_flight == 4, 60), omni.orchestrator.in_flight
        assert not results, "a request ended before the kill"
        os.kill(pids[stage], signal.SIGKILL)
        t0 = time.monotonic()
        for t in threads:
            t.join(120)
        took = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads), f"requests hung after the kill: {results}"
        assert took < 60, took  # far under every timeout (the client's 300 s, the server's 120 s)
        for name in ("chat", "images"):
            r = results[name]
            assert isinstance(r, httpx.Response), r
            err = _error_of(r, 503)
            assert err["code"] == "engine_unavailable" and f"stage {stage} worker" in err["message"], err
        for name in ("chat_stream", "images_stream"):
            status, lines = results[name]
            payloads = [x[len("data: "):] for x in lines if x.startswith("data: ")]
            assert status == 200 and payloads[-1] == "[DONE]", lines[-3:]
            err = json.loads(payloads[-2])["error"]
            assert err["type"] == "service_unavailable" and err["code"] == "engine_unavailable", err
        assert wait_until(lambda: not any(_alive(p) for p in pids), 60), "a stage worker was left running"
        health = _error_of(httpx.get(url + "/health"), 503)
        assert f"stage {stage} worker" in health["message"] and health["code"] == "engine_unavailable"
        t1 = time.monotonic()
        later = httpx.post(url + "/v1/chat/completions", json=dict(text, max_tokens=2), timeout=60)
        assert _error_of(later, 503)["code"] == "engine_unavailable" and time.monotonic() - t1 < 10
        assert httpx.get(url + "/v1/models").status_code == 200  # the server itself still answers
    finally:
        server.stop()
        omni.shutdown()
    assert not server.thread.is_alive()
    omni.shutdown()  # idempotent


def _error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    return err
