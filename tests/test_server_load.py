"""Load through HTTP: `benchmarks/load_test.py` drives a real uvicorn server (the tiny checkpoint, single
stage, CPU) with 500 mixed requests — all four modalities, chat and the images endpoints, streaming and not,
about 10 % closed mid-way — at concurrency 32. None may be lost or hang (a global deadline), every answer
read to its end must be a well-formed 200, and the cancelled ones must leave no KV blocks in use."""

from __future__ import annotations

import importlib.util
import sys
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
def omni(tiny_checkpoint: Path) -> Omni:
    with Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml") as o:
        yield o


@pytest.fixture(scope="module")
def server(omni: Omni) -> ServerThread:
    s = ServerThread(omni, ServerSettings(port=0, max_queue=256, request_timeout=300.0)).start()
    yield s
    s.stop()


def _wait(cond, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


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


def test_500_mixed_requests_at_concurrency_32(server: ServerThread, omni: Omni) -> None:
    orch = omni.orchestrator
    idle = orch.usage()[0]["used_blocks"]
    report = load_test.run_load(server.url, requests=500, concurrency=32, seed=0, cancel_fraction=0.1,
                                max_tokens=8, steps=2, timeout=300.0, deadline=DEADLINE_S)
    print("\n" + report.summary())
    assert report.lost == 0, f"{report.lost} request(s) hung past the {DEADLINE_S:g} s deadline"
    assert len(report.outcomes) == 500 and not report.failures, report.summary()
    assert sum(o.planned.cancel for o in report.outcomes) >= 30
    assert _wait(lambda: orch.in_flight == 0), f"{orch.in_flight} request(s) still in flight"
    assert _wait(lambda: orch.usage()[0]["used_blocks"] == idle), orch.usage()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'status="499"' in metrics  # closed connections were seen as cancellations
    assert httpx.get(server.url + "/health").status_code == 200
